"""llada-trm: a LLaDA masked-diffusion language model with a recursive slot-based refinement head.

The public names are loaded lazily so that `import llada_trm` stays cheap (the CLI imports torch and
transformers only for the commands that need them) and so that users never need the module layout.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "LLaDAConfig": "llada_trm.backbone",
    "LLaDAModel": "llada_trm.backbone",
    "BackboneOutput": "llada_trm.backbone",
    "SlotConfig": "llada_trm.refiners",
    "SlotTRMRefiner": "llada_trm.refiners",
    "RecursiveRefinementHead": "llada_trm.refiners",
    "AttentionContextExtractor": "llada_trm.refiners",
    "SlotProjector": "llada_trm.refiners",
    "TransformerBlock": "llada_trm.refiners",
    "build_refiner": "llada_trm.refiners",
    "LLaDATRMHybrid": "llada_trm.hybrid",
    "HybridConfig": "llada_trm.hybrid",
    "generate": "llada_trm.diffusion",
    "generate_with_stats": "llada_trm.diffusion",
    "BackboneFeatures": "llada_trm.hybrid",
    "HybridOutput": "llada_trm.hybrid",
    "Refiner": "llada_trm.refiners",
    "MLPRefinerConfig": "llada_trm.refiners",
    "create_slot_trm_refiner": "llada_trm.refiners",
    "GenerationResult": "llada_trm.diffusion",
    "forward_process": "llada_trm.diffusion",
    "masked_diffusion_loss": "llada_trm.diffusion",
    "decode_generated": "llada_trm.diffusion",
    "load_config": "llada_trm.config",
    "RunConfig": "llada_trm.config",
    "Trainer": "llada_trm.training",
    "run_train": "llada_trm.training",
    "GSM8KRecord": "llada_trm.data",
    "load_gsm8k": "llada_trm.data",
    "SyntheticTaskConfig": "llada_trm.data",
    "generate_problems": "llada_trm.data",
    "build_tokenizer": "llada_trm.data",
    "load_tokenizer": "llada_trm.data",
    "embedded_backbone_dir": "llada_trm.assets",
    "load_checkpoint": "llada_trm.evaluate",
    "LoadedModel": "llada_trm.evaluate",
    "Answers": "llada_trm.evaluate.answering",
    "SamplingOptions": "llada_trm.diffusion",
    "ConfigError": "llada_trm.errors",
    "CheckpointError": "llada_trm.errors",
}

__all__ = ["__version__", *_EXPORTS]


def _register_with_transformers() -> None:
    """`AutoConfig` / `AutoModel` know model type `llada` (`hf_auto`; nothing is imported before they are)."""
    from llada_trm.hf_auto import install

    install()


_register_with_transformers()


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'llada_trm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

