"""The native LLaDA backbone: config, model, and Hugging Face-layout checkpoints with LLaDA's key names."""

from llada_trm.backbone.checkpoint import load_weights, read_config, save_checkpoint
from llada_trm.backbone.config import LLaDAConfig
from llada_trm.backbone.modeling import BackboneOutput, LLaDABlock, LLaDAModel, RMSNorm

__all__ = [
    "BackboneOutput",
    "LLaDABlock",
    "LLaDAConfig",
    "LLaDAModel",
    "RMSNorm",
    "load_weights",
    "read_config",
    "save_checkpoint",
]
