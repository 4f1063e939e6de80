"""Evaluation: load a checkpoint (`loading`), sample and score it (`evaluator`, `extraction`), and analyse the
results (`statistics`, `paired`, `diagnostics`, `errors`). Import names from the module that defines them;
the package's public API is `llada_trm`'s (lazily loaded). Nothing here imports `llada_trm.training`."""
