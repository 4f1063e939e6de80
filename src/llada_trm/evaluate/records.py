"""The problems an evaluation runs on: a GSM8K split, or the generated task's held-out problems.

The generated task's knobs come from, in order: the training run's `data.synthetic` (so a refiner is scored
on the distribution it was trained on), the backbone's pretraining summary (the embedded default records
the task it learnt), or the run-config defaults.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from llada_trm.config import ArithmeticDataConfig
from llada_trm.config import SyntheticDataConfig as SyntheticSettings
from llada_trm.data import (
    DataError,
    GSM8KRecord,
    apply_split,
    load_gsm8k,
    parse_split,
)
from llada_trm.data.arithmetic import generate_task_records
from llada_trm.data.synthetic import SPLITS

__all__ = ["DATASETS", "load_eval_records", "synthetic_settings"]

DATASETS = ("gsm8k", "synthetic", "arithmetic")
_TASK_FIELDS = ("min_steps", "max_steps", "max_number", "max_result", "seed")


def synthetic_settings(
    run_data: Any | None = None, backbone_config: Mapping[str, Any] | None = None
) -> SyntheticSettings | ArithmeticDataConfig:
    """The generated task to evaluate on: the run's (its `data.arithmetic` section when the run trains on
    the arithmetic task), else the backbone's pretraining task, else defaults."""
    if run_data is not None:
        return run_data.arithmetic if run_data.dataset == "arithmetic" else run_data.synthetic
    task = (backbone_config or {}).get("data") or {}
    known = {key: task[key] for key in _TASK_FIELDS if key in task}
    if "n_eval" in task:
        known["n_eval"] = task["n_eval"]
    return SyntheticSettings.model_validate(known)


def load_eval_records(
    dataset: str,
    split: str = "test",
    *,
    data_path: str | os.PathLike[str] | None = None,
    synthetic: SyntheticSettings | ArithmeticDataConfig | None = None,
    limit: int | None = None,
) -> list[GSM8KRecord]:
    """Records of `split` (HF slicing syntax, e.g. `test[:200]`), at most `limit` of them.

    gsm8k: read from `data_path` (a JSONL/parquet file, a folder with `test.jsonl`, or a cached HF name).
    synthetic, arithmetic: `split` is `train`, `validation` or `test` of that generated task (report on
    `test`: the trainer validates and picks `best` on `validation`); without a slice, `limit` problems
    (default `synthetic.n_eval`) are generated, and the first ones never depend on how many are asked for.
    """
    if dataset not in DATASETS:
        raise DataError(f"--dataset {dataset!r}: choose one of {', '.join(DATASETS)}")
    if limit is not None and limit < 1:
        raise DataError(f"--limit {limit}: must be a positive number of problems")
    if dataset == "gsm8k":
        if not data_path:
            raise DataError(
                "--dataset gsm8k needs --data-path: a GSM8K JSONL/parquet file or a folder holding "
                "test.jsonl (e.g. --data-path data/gsm8k)"
            )
        records = load_gsm8k(data_path, split)
    elif dataset == "arithmetic":
        settings = synthetic if isinstance(synthetic, ArithmeticDataConfig) else ArithmeticDataConfig()
        records = _synthetic_records(split, settings, limit)
    else:
        settings = synthetic if isinstance(synthetic, SyntheticSettings) else SyntheticSettings()
        records = _synthetic_records(split, settings, limit)
    return records[:limit] if limit is not None else records


def _synthetic_records(
    split: str, settings: SyntheticSettings | ArithmeticDataConfig, limit: int | None
) -> list[GSM8KRecord]:
    name, selection = parse_split(split)
    if name not in SPLITS:
        raise DataError(f"split {split!r}: the generated task has the splits {', '.join(SPLITS)}")
    sliced = selection.start is not None or selection.stop is not None
    count = limit if (limit is not None and not sliced) else (settings.n_eval or 100)
    if sliced and isinstance(selection.stop, int) and selection.stop > 0:
        count = max(count, selection.stop)
    records = generate_task_records(settings, count, split=name)
    if sliced:
        records = apply_split(records, selection)
        if not records:
            raise DataError(f"split {split!r} selects no problems out of {count}")
    return records
