"""The offline `gsm8k_local` task: GSM8K read with the project's loader from `--metadata '{"gsm8k_data":
PATH}'` or `$LLADA_TRM_GSM8K_DATA` (a folder with test.jsonl and optionally train.jsonl, or one JSONL file)
instead of the Hub; its YAML ships in `assets/lm_eval_tasks/`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from llada_trm.data.gsm8k import DataError, load_gsm8k
from llada_trm.errors import ConfigError

DATA_ENV_VAR = "LLADA_TRM_GSM8K_DATA"
DATA_METADATA_KEY = "gsm8k_data"
_TASKS_DIR = Path(__file__).resolve().parents[2] / "assets" / "lm_eval_tasks"


def tasks_dir() -> Path:
    """The directory of the packaged task YAMLs, for lm-eval's `--include_path`."""
    return _TASKS_DIR


def resolve_data_path(value: str | os.PathLike[str] | None = None) -> Path:
    """The GSM8K data path: `value` (the task metadata's `gsm8k_data`), else $LLADA_TRM_GSM8K_DATA."""
    raw = value if value not in (None, "") else os.environ.get(DATA_ENV_VAR)
    if not raw:
        raise ConfigError(
            f"gsm8k_local needs its data: set {DATA_ENV_VAR}=DIR (a folder with test.jsonl) or pass "
            f'--metadata \'{{"{DATA_METADATA_KEY}": "DIR"}}\''
        )
    path = Path(raw).expanduser()
    if not path.exists():
        raise ConfigError(
            f"gsm8k_local: {path} does not exist (give a folder holding test.jsonl, or a JSONL file)"
        )
    return path


def load_gsm8k_local(**kwargs: Any) -> Any:
    """lm-eval `custom_dataset` hook: a `datasets.DatasetDict` with `test` (and `train` when present).

    lm-eval passes the task metadata (the model args and `--metadata` merged) as keyword arguments; only
    `gsm8k_data` is read.
    """
    import datasets  # installed with lm_eval

    path = resolve_data_path(kwargs.get(DATA_METADATA_KEY))
    splits = {"test": load_gsm8k(path, "test")}
    if path.is_dir():
        try:
            splits["train"] = load_gsm8k(path, "train")
        except DataError:
            pass  # no train.jsonl: only zero-shot variants can run
    return datasets.DatasetDict(
        {name: datasets.Dataset.from_list([r.to_dict() for r in records]) for name, records in splits.items()}
    )
