"""Files shipped inside the package: the embedded default backbone.

`tiny_backbone/` is a LLaDA-architecture checkpoint in Hugging Face layout (config.json, model.safetensors,
tokenizer files, a model card), trained by `llada-trm pretrain --config configs/tiny_backbone.yaml`. A run
config's `model.backbone: embedded` and the CLI's `--checkpoint embedded` resolve to it.
"""

from __future__ import annotations

from pathlib import Path

from llada_trm.errors import CheckpointError

EMBEDDED_NAME = "embedded"
_BACKBONE_DIR = Path(__file__).resolve().parent / "tiny_backbone"
_REQUIRED = ("config.json", "tokenizer.json")


def embedded_backbone_dir() -> Path:
    """The packaged tiny backbone's directory; `CheckpointError` naming the re-training command if absent."""
    missing = [name for name in _REQUIRED if not (_BACKBONE_DIR / name).is_file()]
    has_weights = any(_BACKBONE_DIR.glob("*.safetensors"))
    if missing or not has_weights:
        what = ", ".join(missing + ([] if has_weights else ["model.safetensors"]))
        raise CheckpointError(
            f"the embedded tiny backbone is missing from {_BACKBONE_DIR} (no {what}); create it with "
            "`llada-trm pretrain --config configs/tiny_backbone_v4.yaml` and copy its output.dir there "
            "(its card lists the chain it continues), or give a backbone directory instead"
        )
    return _BACKBONE_DIR
