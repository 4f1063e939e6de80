"""llada-trm: a LLaDA masked-diffusion language model with a recursive slot-based refinement head.

The public names are loaded lazily so that `import llada_trm` stays cheap (the CLI imports torch and
transformers only for the commands that need them) and so that users never need the module layout. This is
the one place that re-exports names: every other module imports a name from the module that defines it.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {  # name -> the module that defines it
    "LLaDAConfig": "llada_trm.model.llada_config",
    "LLaDAModel": "llada_trm.model.llada",
    "BackboneOutput": "llada_trm.model.llada",
    "SlotConfig": "llada_trm.model.refiners.config",
    "SlotTRMRefiner": "llada_trm.model.refiners.slot",
    "RecursiveRefinementHead": "llada_trm.model.refiners.mlp",
    "AttentionContextExtractor": "llada_trm.model.refiners.base",
    "SlotProjector": "llada_trm.model.refiners.slot",
    "TransformerBlock": "llada_trm.model.refiners.base",
    "build_refiner": "llada_trm.model.refiners",
    "LLaDATRMHybrid": "llada_trm.model.hybrid",
    "HybridConfig": "llada_trm.model.hybrid_config",
    "generate": "llada_trm.diffusion.sampler",
    "generate_with_stats": "llada_trm.diffusion.sampler",
    "BackboneFeatures": "llada_trm.model.hybrid",
    "HybridOutput": "llada_trm.model.hybrid",
    "Refiner": "llada_trm.model.refiners.base",
    "MLPRefinerConfig": "llada_trm.model.refiners.config",
    "create_slot_trm_refiner": "llada_trm.model.refiners.slot",
    "GenerationResult": "llada_trm.diffusion.sampler",
    "forward_process": "llada_trm.diffusion.forward_process",
    "masked_diffusion_loss": "llada_trm.diffusion.forward_process",
    "decode_generated": "llada_trm.data.tokenizer",
    "load_config": "llada_trm.config",
    "RunConfig": "llada_trm.config",
    "Trainer": "llada_trm.training.loop",
    "run_train": "llada_trm.training.loop",
    "GSM8KRecord": "llada_trm.data.gsm8k",
    "load_gsm8k": "llada_trm.data.gsm8k",
    "SyntheticTaskConfig": "llada_trm.data.synthetic",
    "generate_problems": "llada_trm.data.synthetic",
    "build_tokenizer": "llada_trm.data.tokenizer",
    "load_tokenizer": "llada_trm.data.tokenizer",
    "embedded_backbone_dir": "llada_trm.assets",
    "load_checkpoint": "llada_trm.evaluate.loading",
    "LoadedModel": "llada_trm.evaluate.loading",
    "Answers": "llada_trm.evaluate.evaluator",
    "SamplingOptions": "llada_trm.diffusion.options",
    "ConfigError": "llada_trm.errors",
    "CheckpointError": "llada_trm.errors",
}

__all__ = ["__version__", *_EXPORTS]


# `AutoConfig` / `AutoModel` know model type `llada` (`extras.hf_auto`; nothing heavy is imported here)
importlib.import_module("llada_trm.extras.hf_auto").install()


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'llada_trm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

