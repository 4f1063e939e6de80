"""lm-eval result folders named after the checkpoint evaluated, not a random id.

lm-eval writes `--output_path DIR` results to `DIR/<model name>/results_<time>.json`, the model name read from
a `pretrained=` / `model=` / `path=` model arg; `llada_trm` names its checkpoint `checkpoint=` (default
`embedded`), which lm-eval does not look for, so every run landed in a fresh random folder. Importing the
backend (as `llada-trm-lm-eval` and lm-eval's entry-point discovery do) makes the tracker fall back to the
checkpoint: `checkpoint=runs/slot/checkpoints/best` -> `DIR/runs__slot__checkpoints__best/`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["checkpoint_name", "name_results_after_checkpoint"]

DEFAULT_CHECKPOINT = "embedded"


def checkpoint_name(model_args: str | Mapping[str, Any] | None) -> str:
    """The `checkpoint` model arg (`k=v,k=v` text or a mapping); `embedded` when it is not given."""
    if isinstance(model_args, Mapping):
        value = model_args.get("checkpoint")
        return str(value) if value else DEFAULT_CHECKPOINT
    for item in (model_args or "").split(","):
        key, _, value = item.partition("=")
        if key.strip() == "checkpoint" and value.strip():
            return value.strip()
    return DEFAULT_CHECKPOINT


def name_results_after_checkpoint(model_name: str) -> None:
    """Wrap lm-eval's `GeneralConfigTracker.log_experiment_args` (once): for model `model_name` with no
    name lm-eval recognises, the checkpoint names the result folder."""
    from lm_eval.loggers.evaluation_tracker import GeneralConfigTracker
    from lm_eval.utils import sanitize_model_name

    original = GeneralConfigTracker.log_experiment_args
    if getattr(original, "_llada_trm", False):
        return

    def log_experiment_args(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        source = kwargs.get("model_source", args[0] if args else None)
        model_args = kwargs.get("model_args", args[1] if len(args) > 1 else None)
        if source == model_name and GeneralConfigTracker._get_model_name(model_args) is None:
            self.model_name = checkpoint_name(model_args)
            self.model_name_sanitized = sanitize_model_name(self.model_name)

    log_experiment_args._llada_trm = True  # type: ignore[attr-defined]
    GeneralConfigTracker.log_experiment_args = log_experiment_args
