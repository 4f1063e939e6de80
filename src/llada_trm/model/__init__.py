"""The model: the LLaDA backbone, the refiners and the hybrid that joins them, with their weights on disk.

- `llada` (`LLaDAModel`), `llada_config` (`LLaDAConfig`, LLaDA's `config.json`), `kv_cache` (Fast-dLLM's
  prefix / dual caches), `llada_weights` (Hugging Face-layout weights with LLaDA's key names), `fingerprint`
  (which backbone a refiner was trained on), `lora` (peft adapters on the backbone);
- `refiners/`: one file per refiner kind (`slot`, `mlp`), what they share (`base`), their settings (`config`);
  the subpackage's `__init__` is the registry (`build_refiner`);
- `hybrid` (`LLaDATRMHybrid`: backbone + refiner, chunked selective refinement), `hybrid_config`
  (`HybridConfig`), `reachability` (the update budget against the LM head), `refiner_weights` (the refiners'
  weights file).

This package re-exports nothing: import from the defining module.
"""
