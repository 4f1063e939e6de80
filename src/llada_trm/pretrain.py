"""`llada-trm pretrain`'s public names (the implementation is the `llada_trm.pretraining` package).

    llada-trm pretrain --config configs/tiny_backbone.yaml [--resume [DIR]] [--out DIR] [--force]
"""

from llada_trm.pretraining import PretrainConfig, PretrainResult, load_pretrain_config, pretrain

__all__ = ["PretrainConfig", "PretrainResult", "load_pretrain_config", "pretrain"]
