"""`llada-trm compare --resume`: reuse what an earlier comparison (interrupted, or run per seed) finished.

A training counts as finished when its run holds `compare_training.json` and its config.yaml is the run this
comparison plans; an evaluation when its directory holds predictions.jsonl + summary.json for the same
problems, sampler and checkpoint (`checkpoint_identity`). Anything else runs again; a finished run planned
differently is an error, never silently reused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llada_trm.config import RunConfig, load_config
from llada_trm.io import write_json
from llada_trm.training.run_dir import RunDirError

TRAINED_FILE = "compare_training.json"
CHECKPOINT_KEY = "checkpoint_identity"


def checkpoint_identity(checkpoint: Path, out: Path) -> dict[str, Any]:
    """What an evaluation sampled: a run checkpoint's name (`last` / `best`), its folder relative to the
    comparison and the step it holds; for the backbone alone, its folder."""
    from llada_trm.run_checkpoint import STATE_FILE, load_trainer_state

    if not (checkpoint / STATE_FILE).is_file():
        return {"checkpoint": "backbone", "path": str(checkpoint)}
    step = int(load_trainer_state(checkpoint)["train_state"]["step"])
    try:
        where = str(checkpoint.relative_to(out))
    except ValueError:
        where = str(checkpoint)
    return {"checkpoint": checkpoint.name, "path": where, "step": step}


def record_training(run_dir: Path, summary: dict[str, Any], train_s: float) -> Path:
    """Mark `run_dir`'s training finished for `--resume`: the trainer's summary and its wall time."""
    return write_json(run_dir / TRAINED_FILE, {"summary": summary, "train_s": train_s})


def finished_training(run_dir: Path, planned: RunConfig) -> tuple[dict[str, Any], float] | None:
    """(summary, seconds) of a finished training of `planned` in `run_dir`, or None when there is none."""
    marker = run_dir / TRAINED_FILE
    if not marker.is_file():
        return None
    trained = load_config(run_dir / "config.yaml")
    if trained.model_dump(mode="json") != planned.model_dump(mode="json"):
        raise RunDirError(
            f"{run_dir}: trained with other settings than this comparison plans; compare without --resume "
            "(--force archives the old comparison) or restore the config it was run with"
        )
    data = json.loads(marker.read_text(encoding="utf-8"))
    return data["summary"], float(data["train_s"])


def finished_evaluation(
    directory: Path, questions: list[str], sampling: dict[str, Any], identity: dict[str, Any] | None = None
) -> Any | None:
    """The `EvalResult` an earlier run wrote to `directory` for these questions, sampler and checkpoint
    (`identity`), or None; one that sampled another checkpoint is refused, never reused."""
    from llada_trm.evaluate.evaluator import PREDICTIONS_FILE, SUMMARY_FILE, EvalResult
    from llada_trm.evaluate.paired import read_predictions

    summary_path, predictions_path = directory / SUMMARY_FILE, directory / PREDICTIONS_FILE
    if not (summary_path.is_file() and predictions_path.is_file()):
        return None
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    _, predictions = read_predictions(predictions_path)
    planned = json.loads(json.dumps(sampling))  # as summary.json stores it
    if [p["question"] for p in predictions] != questions or summary.get("sampling") != planned:
        raise RunDirError(
            f"{directory}: holds an evaluation of other problems or another sampler; compare without "
            "--resume (--force archives the old comparison)"
        )
    recorded = summary.get(CHECKPOINT_KEY)
    if identity is not None and recorded != identity:
        what = "no recorded checkpoint" if recorded is None else _named(recorded)
        raise RunDirError(
            f"{directory}: holds an evaluation of {what}, not of {_named(identity)}; compare without "
            "--resume (--force archives the old comparison)"
        )
    return EvalResult(summary=summary, predictions=predictions, out_dir=directory,
                      files=[predictions_path, summary_path])  # fmt: skip


def _named(identity: dict[str, Any]) -> str:
    step = f" at step {identity['step']}" if "step" in identity else ""
    return f"checkpoint {identity.get('path', '?')}{step}"
