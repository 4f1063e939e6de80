"""The model card (README.md) of an export: what the model is, how to load it, and what its run measured.

The measured tables are read from the run directory, never computed here: the validation row of the
exported step (`validation_metrics.csv`; the last row when that step has none) and every evaluation the run
holds (`eval/*/summary.json`). A run that recorded neither gets a card that says so.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llada_trm.backbone.fingerprint import short

if TYPE_CHECKING:
    from llada_trm.evaluate.loading import LoadedModel

__all__ = ["model_card", "validation_table", "evaluation_table"]

VALIDATION_FILE = "validation_metrics.csv"
_SKIP = {"step", "epoch"}


def _number(value: Any) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return "n/a" if not math.isfinite(number) else f"{number:.4g}"


def validation_table(run_dir: Path | None, step: int) -> list[str]:
    """Markdown lines: the validation metrics at `step` (a `x` / `x_base` pair on one row, refined vs the
    backbone alone); empty when the run logged no validation."""
    path = None if run_dir is None else run_dir / VALIDATION_FILE
    if path is None or not path.is_file():
        return []
    with open(path, encoding="utf-8", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("step")]
    if not rows:
        return []
    at_step = [row for row in rows if _number(row["step"]) == _number(step)]
    row = at_step[-1] if at_step else rows[-1]
    title = f"Validation at step {row['step']}" + ("" if at_step else " (the run's last validation)")
    lines = [f"### {title}", "", "| metric | this model | backbone alone |", "|---|---|---|"]
    for name, value in row.items():
        if name in _SKIP or name.endswith("_base") or value in (None, ""):
            continue
        base = row.get(f"{name}_base")
        lines.append(f"| {name} | {_number(value)} | {_number(base) if base not in (None, '') else ''} |")
    return [*lines, ""]


def evaluation_table(run_dir: Path | None) -> list[str]:
    """Markdown lines: one row per `eval/*/summary.json` of the run; empty when it holds none."""
    summaries = [] if run_dir is None else sorted((run_dir / "eval").glob("*/summary.json"))
    rows = []
    for path in summaries:
        try:
            s = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue  # a damaged summary is left out, not guessed at
        refiner = (s.get("model") or {}).get("refiner", "")
        rows.append(
            f"| {path.parent.name} | {refiner} | {s.get('n', '')} | {_number(s.get('accuracy_strict'))} | "
            f"{_number(s.get('accuracy_flexible'))} |"
        )
    if not rows:
        return []
    head = ["### Evaluations", "", "| evaluation | refiner | n | accuracy strict | accuracy flexible |"]
    return [*head, "|---|---|---|---|---|", *rows, ""]


def model_card(
    loaded: LoadedModel, section: dict[str, Any], *, fingerprint: str, dtype: str, run_dir: Path | None
) -> str:
    """The README.md of an export (`section`: its config.json `llada_trm` entry)."""
    model, source = section["model"], section["source"]
    backbone = loaded.model.backbone.config
    measured = validation_table(run_dir, source["step"]) + evaluation_table(run_dir)
    sampling = " ".join(f"{k}={v}" for k, v in section["sampling"].items())
    lines = [
        f"# llada-trm: {model['refiner']} refiner ({model['integration']}) on a LLaDA backbone",
        "",
        "A LLaDA masked-diffusion language model with a recursive refinement head, exported by "
        "`llada-trm export` from a training run (phase "
        f"{source['phase']}, step {source['step']}, checkpoint `{source['checkpoint']}`).",
        "",
        "## Contents",
        "",
        f"- backbone: {backbone.n_layers} layers, d_model {backbone.d_model}, vocabulary "
        f"{backbone.vocab_size}, stored as {dtype} (`model.safetensors`); fingerprint `{short(fingerprint)}`",
        f"- refiner: `{section['refiner_file'] or 'none'}`, K = {model['max_recursive_steps']} steps, chunks "
        f"of {model['chunk_size']} tokens refined below confidence {model['confidence_threshold']}",
        "- `config.json`: the backbone's fields, and the run's model, data and sampling settings under "
        "`llada_trm`; tokenizer files beside it",
        f"- sampling: {sampling}",
        "",
        "## Use",
        "",
        "```python",
        "from llada_trm import load_checkpoint",
        "",
        'model = load_checkpoint("THIS_DIRECTORY")',
        'question = "Tom has 3 apples. Tom buys 2 more apples. How many apples does Tom have now?"',
        "print(model.generate([question]).answers)",
        "```",
        "",
        "or `llada-trm generate --checkpoint THIS_DIRECTORY \"QUESTION\"` / `llada-trm eval --checkpoint "
        "THIS_DIRECTORY`.",
        "",
        "## Measured by the training run",
        "",
        *(measured or ["The run recorded no validation or evaluation metrics.", ""]),
    ]
    return "\n".join(lines)
