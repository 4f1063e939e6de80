"""GSM8K evaluation: answer extraction, sampled accuracy, refinement efficiency and speed.

`extraction` needs nothing heavy; the evaluator and the checkpoint loader (torch, transformers) are imported
on first use, so `from llada_trm.evaluate import is_correct` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .extraction import extract_flexible, extract_strict, is_correct, normalize_number

_LAZY: dict[str, str] = {
    "EvalResult": "evaluator",
    "SamplingOptions": "evaluator",
    "evaluate_model": "evaluator",
    "PREDICTIONS_FILE": "evaluator",
    "SUMMARY_FILE": "evaluator",
    "Answers": "answering",
    "answer_questions": "answering",
    "LoadedModel": "loading",
    "load_checkpoint": "loading",
    "DATASETS": "records",
    "load_eval_records": "records",
    "synthetic_settings": "records",
    "write_json": "io",
    "write_jsonl": "io",
}

__all__ = [
    "DATASETS",
    "Answers",
    "PREDICTIONS_FILE",
    "SUMMARY_FILE",
    "EvalResult",
    "LoadedModel",
    "SamplingOptions",
    "answer_questions",
    "evaluate_model",
    "extract_flexible",
    "extract_strict",
    "is_correct",
    "load_checkpoint",
    "load_eval_records",
    "normalize_number",
    "synthetic_settings",
    "write_json",
    "write_jsonl",
]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'llada_trm.evaluate' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:  # pragma: no cover
    from .answering import Answers, answer_questions
    from .evaluator import PREDICTIONS_FILE, SUMMARY_FILE, EvalResult, SamplingOptions, evaluate_model
    from .io import write_json, write_jsonl
    from .loading import LoadedModel, load_checkpoint
    from .records import DATASETS, load_eval_records, synthetic_settings
