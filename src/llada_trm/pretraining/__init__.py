"""`llada-trm pretrain`: train (or continue) the embedded tiny backbone, resumably, measuring its targets.

Modules: `config` (the schema), `model_setup` (new backbone or `model.init_from`), `loop` (the training
loop, signals), `run_dir` (output guard, checkpoint, exact resume), `targets` (what an evaluation
measures), `metrics_csv`, `export` (test-split figures, the saved backbone), `card` (its model card).
"""

from .config import PretrainConfig, load_pretrain_config
from .loop import PretrainResult, pretrain

__all__ = ["PretrainConfig", "PretrainResult", "load_pretrain_config", "pretrain"]
