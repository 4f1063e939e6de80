"""The end of a pre-training: measure the backbone on the test split, save it with its summary and card.

The test problems are the first `evaluation.n_test` of the generated task's test split, the ones
`llada-trm compare` reports on; a hash check confirms that no training or validation problem is among
them. The backbone, tokenizer, metrics CSV, summary, test predictions and card are swapped into
`output.dir` whole (`io.atomic_directory`), and only then is the run directory (the checkpoint) removed.
A backbone already in `output.dir` is archived first under --force (`run_dir.archive_output`), never deleted.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from llada_trm.data import GSM8KRecord, SFTDataset, save_tokenizer, special_token_ids
from llada_trm.data.arithmetic import generate_task_records
from llada_trm.data.disjoint import check_disjoint
from llada_trm.evaluate.statistics import proportion
from llada_trm.io import atomic_directory, remove_directory, write_json, write_jsonl, write_text_atomic

from .card import model_card
from .config import PretrainConfig
from .metrics_csv import METRICS_FILE, write_metrics
from .model_setup import init_chain
from .run_dir import PretrainState, archive_output
from .targets import masked_accuracy, sample_predictions, target_metrics

__all__ = ["PREDICTIONS_FILE", "SUMMARY_FILE", "export_backbone"]

SUMMARY_FILE = "pretrain_summary.json"
PREDICTIONS_FILE = "test_predictions.jsonl"


@torch.no_grad()
def export_backbone(  # noqa: PLR0913 - the run's parts, and --force for output.dir
    config: PretrainConfig,
    model: torch.nn.Module,
    tokenizer: Any,
    state: PretrainState,
    splits: Mapping[str, Sequence[GSM8KRecord]],
    elapsed_training: float,
    *,
    command: str | None,
    echo: Callable[[str], None],
    force: bool = False,
) -> dict[str, Any]:
    """Evaluate on the test split, write `output.dir`, remove the run directory; returns the summary.

    `splits` holds the run's "train" and "validation" problems, checked to share none with the test ones.
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
    evaluated = [row for row in state.rows if row.get("eval_strict") is not None]
    summary = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": state.step,
        "planned_steps": config.training.steps,
        "stopped_at_target": state.stopped_at_target,
        "final_train_loss": state.rows[-1]["loss"] if state.rows else None,
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
        "init_chain": init_chain(config),
        "split_check": split_check,
        "sampler": config.evaluation.options().to_dict(),
        "config": config.plain(),
        "samples": [
            {"question": p["question"], "reference": p["reference"], "completion": p["completion"]}
            for p in predictions[:5]
        ],
    }
    out = Path(config.output.dir)
    archived = archive_output(config, force=force)
    if archived is not None:
        echo(f"archived the previous {out} as {archived} (--force)")
    with atomic_directory(out) as staging:
        model.to(getattr(torch, config.output.dtype)).save_pretrained(staging)
        save_tokenizer(tokenizer, staging)
        write_metrics(staging / METRICS_FILE, state.rows)
        write_json(staging / SUMMARY_FILE, summary)
        write_jsonl(staging / PREDICTIONS_FILE, predictions)
        write_text_atomic(staging / "README.md", model_card(config, summary, len(tokenizer), state.rows))
    remove_directory(config.run_dir())
    return summary


def _show(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
