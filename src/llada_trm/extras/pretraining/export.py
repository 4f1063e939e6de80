"""The end of a pre-training: measure the backbone on the test split, save it with its summary and card.

The test problems are the first `evaluation.n_test` of the generated task's test split, the ones
`llada-trm compare` reports on; a hash check confirms that no training or validation problem is among
them. The backbone, tokenizer, the run's metrics CSVs, summary, test predictions and card are swapped into
`output.dir` whole (`io.atomic_directory`), and only then is the run directory (the checkpoint) removed.
A backbone already in `output.dir` is archived first under --force, never deleted.
"""

from __future__ import annotations

import csv
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from llada_trm.data.arithmetic import generate_task_records
from llada_trm.data.collate import SFTDataset
from llada_trm.data.disjoint import check_disjoint
from llada_trm.data.gsm8k import GSM8KRecord
from llada_trm.data.tokenizer import save_tokenizer, special_token_ids
from llada_trm.errors import ConfigError
from llada_trm.evaluate.statistics import proportion
from llada_trm.io import atomic_directory, remove_directory, write_json, write_jsonl, write_text_atomic
from llada_trm.training.run_dir import archive_run_dir

from .card import model_card
from .config import PretrainConfig
from .targets import masked_accuracy, sample_predictions, target_metrics

SUMMARY_FILE = "pretrain_summary.json"
PREDICTIONS_FILE = "test_predictions.jsonl"
METRICS_FILES = ("training_metrics.csv", "validation_metrics.csv")  # the run's, copied beside the backbone


def read_rows(path: Path) -> list[dict[str, float | None]]:
    """A metrics CSV's rows as numbers (an empty cell: None); [] when there is no such file."""
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as handle:
        return [{key: float(value) if value not in ("", None) else None for key, value in row.items()}
                for row in csv.DictReader(handle)]  # fmt: skip


def check_output(config: PretrainConfig, *, force: bool) -> None:
    """Refuse to replace an existing backbone (the shipped one included) unless `--force` was given, and
    refuse even then a folder that is not a model directory (no config.json): --force archives a backbone,
    it never moves an unrelated folder away."""
    out = Path(config.output.dir)
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir():
        raise ConfigError(f"output.dir {out} is a file, not a directory; pass --out DIR for a new one")
    if not any(out.iterdir()):
        return
    if not force:
        raise ConfigError(
            f"output.dir {out} already exists (a backbone, e.g. the shipped one); pass --out DIR for a "
            f"new one, or --force to archive it (renamed to {out.name}.old-<timestamp>) and write anew"
        )
    if not (out / "config.json").is_file():
        raise ConfigError(
            f"output.dir {out} is not empty and holds no backbone (no config.json); --force archives only "
            "a backbone: pass --out DIR for a new or empty directory"
        )


@torch.no_grad()
def export_backbone(  # noqa: PLR0913 - the run's parts, and --force for output.dir
    config: PretrainConfig,
    model: torch.nn.Module,
    tokenizer: Any,
    run_dir: Path,
    state: Mapping[str, Any],
    splits: Mapping[str, Sequence[GSM8KRecord]],
    elapsed_training: float,
    *,
    init_chain: list[dict[str, Any]],
    command: str | None,
    echo: Callable[[str], None],
    force: bool = False,
) -> dict[str, Any]:
    """Evaluate on the test split, write `output.dir`, remove the run directory; returns the summary.

    `state` holds the run's "steps", "stopped_at_target" and "final_train_loss"; `splits` its "train" and
    "validation" problems, checked to share none with the test ones.
    """
    started = time.perf_counter()
    test_records = generate_task_records(config.data.task(), config.evaluation.n_test, split="test")
    split_check = check_disjoint({**splits, "test": test_records})
    ids = special_token_ids(tokenizer)
    test_set = SFTDataset(tokenizer, test_records[: config.data.n_eval], config.data.max_length)
    masked = masked_accuracy(model, test_set, ids.mask, config.training.seed)
    predictions = sample_predictions(model, tokenizer, test_records, config.evaluation)
    found = target_metrics(predictions)
    echo(f"test ({len(test_records)} problems): strict {found['strict']:.3f}, entity copy "
         f"{_show(found['entity_copy'])}, line arithmetic {_show(found['line_arithmetic'])}")  # fmt: skip
    report = found["report"]
    test = {
        "strict": found["strict"],
        "strict_interval": proportion(found["correct"], found["problems"]),
        "entities": report["entities"],
        "arithmetic": report["arithmetic"],
        "entity_copy": found["entity_copy"],
        "line_arithmetic": found["line_arithmetic"],
        "first_deviation": report["categories"],
    }
    rows = read_rows(run_dir / METRICS_FILES[1])
    evaluated = [row for row in rows if row.get("strict") is not None]
    summary = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": state["steps"],
        "planned_steps": config.training.steps,
        "stopped_at_target": state["stopped_at_target"],
        "final_train_loss": state["final_train_loss"],
        "eval_masked_accuracy_t0.5": masked,
        "eval_accuracy_strict": found["strict"],
        "eval_problems": len(test_records),
        "eval_split": "test",
        "test": test,
        "last_validation": evaluated[-1] if evaluated else None,
        "elapsed_training_s": round(elapsed_training, 1),
        "elapsed_s": round(elapsed_training + time.perf_counter() - started, 1),
        "torch_threads": torch.get_num_threads(),
        "command": command,
        "init_chain": init_chain,
        "split_check": split_check,
        "sampler": config.evaluation.options().to_dict(),
        "config": config.plain(),
        "samples": [
            {"question": p["question"], "reference": p["reference"], "completion": p["completion"]}
            for p in predictions[:5]
        ],
    }
    out = Path(config.output.dir)
    check_output(config, force=force)  # again: a backbone may have appeared there during the run
    if out.is_dir() and any(out.iterdir()):  # with --force: archived, never deleted
        echo(f"archived the previous {out} as {archive_run_dir(out)} (--force)")
    with atomic_directory(out) as staging:
        model.to(getattr(torch, config.output.dtype)).save_pretrained(staging)
        save_tokenizer(tokenizer, staging)
        for name in METRICS_FILES:
            if (run_dir / name).is_file():
                shutil.copyfile(run_dir / name, staging / name)
        write_json(staging / SUMMARY_FILE, summary)
        write_jsonl(staging / PREDICTIONS_FILE, predictions)
        write_text_atomic(staging / "README.md", model_card(config, summary, len(tokenizer), evaluated))
    remove_directory(run_dir)
    return summary


def _show(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
