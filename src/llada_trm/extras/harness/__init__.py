"""lm-evaluation-harness integration (docs/lm_eval.md): the `llada_trm` model and the `gsm8k_local` task.

lm-eval 0.4.13 has no plugin entry points, so importing `harness.model` registers the model;
`llada-trm-lm-eval` (`harness.cli`) is lm-eval's CLI with that import done. `likelihood` and `tasks` import
without lm-eval.
"""
