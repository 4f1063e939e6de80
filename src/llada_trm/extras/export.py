"""`llada-trm export RUN OUT`: a trained run as one self-contained Hugging Face-layout directory.

The run is loaded as evaluation loads it (`load_checkpoint`), its parts written into a hidden sibling of OUT
that is swapped in whole (`io.atomic_directory`); the layout is in docs/architecture.md and read by
`evaluate.loading`. --force archives a model directory in OUT as `OUT.old-<timestamp>`, never deletes it.
The model card's tables are read from the run directory (validation row of the exported step, every
`eval/*/summary.json`), never computed here.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open

from llada_trm.build import resolve_backbone_dir
from llada_trm.config import RunConfig
from llada_trm.data.tokenizer import save_tokenizer
from llada_trm.errors import CheckpointError, UserError
from llada_trm.evaluate.loading import EXPORT_FORMAT, EXPORT_KEY, REFINER_FILE, LoadedModel, load_checkpoint
from llada_trm.io import atomic_directory, dtype_named, write_json, write_text_atomic
from llada_trm.model.fingerprint import FINGERPRINT_KEY, directory_fingerprint, short
from llada_trm.model.hybrid import write_refiner_weights
from llada_trm.model.llada_weights import CONFIG_NAME, save_state_dict, stored_dtype
from llada_trm.run_checkpoint import WEIGHTS_FILE, load_trainer_state, read_run_config, resolve_checkpoint_dir
from llada_trm.training.run_dir import archive_run_dir

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
VALIDATION_FILE = "validation_metrics.csv"
_SKIP = {"step", "epoch"}

logger = logging.getLogger("llada_trm")


@dataclass(frozen=True)
class ExportResult:
    """Where the export went, the backbone dtype written, its fingerprint, and where a previous export in
    OUT was archived (--force)."""

    directory: Path
    dtype: str
    fingerprint: str
    files: list[str]
    archived: Path | None = None


def export_run(
    run: str | Path,
    out: str | Path,
    *,
    dtype: str = "auto",
    force: bool = False,
    max_shard_size: int | str | None = "5GB",
    allow_backbone_mismatch: bool = False,
) -> ExportResult:
    """Export a run's checkpoint (a run directory, or its checkpoints/last or best) to `out`.

    `dtype`: the backbone's dtype in the export ("auto": as the run's backbone stores it; the refiners stay
    float32). An existing `out` is refused unless `force`, which archives it (a model directory only), and
    `out` may never hold the run itself.
    """
    if dtype not in DTYPE_CHOICES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPE_CHOICES)}")
    checkpoint = resolve_checkpoint_dir(Path(run).expanduser())
    config = read_run_config(checkpoint)
    out = Path(out).expanduser()
    _check_target(out, checkpoint, force)
    if dtype == "auto":
        dtype = _stored_dtype(resolve_backbone_dir(config.model.backbone))
    loaded = load_checkpoint(
        checkpoint, device="cpu", dtype=dtype, allow_backbone_mismatch=allow_backbone_mismatch
    )
    target = dtype_named(dtype)
    backbone = loaded.model.backbone  # as loaded: the tensors phases 2/3 trained copied in, LoRA merged
    state = {k: (t.to(target) if t.is_floating_point() else t) for k, t in backbone.state_dict().items()}
    source = _source(checkpoint, config.training.phase)
    refiners = loaded.model.refiner_state_dict()
    _check_target(out, checkpoint, force)  # again: OUT may have appeared while the run loaded
    archived = None
    if out.is_dir() and any(out.iterdir()):
        archived = archive_run_dir(out)
        logger.warning("%s held a previous export: archived it as %s (--force)", out, archived)
    with atomic_directory(out) as tmp:
        save_state_dict(state, loaded.model.backbone.config, tmp, max_shard_size)
        del state
        fingerprint = directory_fingerprint(tmp)
        if refiners:
            write_refiner_weights(
                tmp / REFINER_FILE,
                refiners,
                integration=loaded.model.config.integration,
                refiners=list(loaded.model.refinement_head),
                backbone_fingerprint=fingerprint,
            )
        backbone_json = json.loads((tmp / CONFIG_NAME).read_text(encoding="utf-8"))
        section = export_section(config, refiner_file=REFINER_FILE if refiners else None, source=source)
        write_json(tmp / CONFIG_NAME, {**backbone_json, EXPORT_KEY: section})
        save_tokenizer(loaded.tokenizer, tmp)
        card = model_card(loaded, section, fingerprint=fingerprint, dtype=dtype, run_dir=loaded.run_dir)
        write_text_atomic(tmp / "README.md", card)
        files = sorted(p.name for p in tmp.iterdir())
    return ExportResult(directory=out, dtype=dtype, fingerprint=fingerprint, files=files, archived=archived)


def _check_target(out: Path, checkpoint: Path, force: bool) -> None:
    """Refuse an existing `out` without `force`; with it, anything but a model directory (config.json) or
    an empty one; and always one that is, or holds, the run's checkpoint (archiving it would move the run).
    """
    target, held = out.resolve(), checkpoint.resolve()
    if target == held or target in held.parents:
        raise UserError(f"{out}: holds the run being exported ({checkpoint}); export to another directory")
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir():
        raise UserError(f"{out} is a file; choose a new directory to export to")
    if not any(out.iterdir()):
        return
    if not force:
        raise UserError(
            f"{out} already exists; choose a new directory, or pass --force to archive it (renamed to "
            f"{out.name}.old-<timestamp>)"
        )
    if not (out / CONFIG_NAME).is_file():
        raise UserError(
            f"{out} is not empty and holds no model (no {CONFIG_NAME}); --force archives only an earlier "
            "export or backbone: choose a new directory"
        )


def _stored_dtype(backbone_dir: Path) -> str:
    """The dtype the backbone's weight files store (LLaDA-8B: bfloat16), so that "auto" neither widens
    nor rounds it."""
    stored = stored_dtype(backbone_dir)
    if stored is None:
        raise CheckpointError(f"{backbone_dir}: no safetensors weight files")
    return str(stored).removeprefix("torch.")


def _source(checkpoint: Path, phase: int) -> dict[str, object]:
    """Where the export came from, without any path: the run's phase, step, checkpoint name, and the
    fingerprint of the backbone it was trained on."""
    state = load_trainer_state(checkpoint)
    with safe_open(str(checkpoint / WEIGHTS_FILE), framework="pt") as f:
        trained_on = (f.metadata() or {}).get(FINGERPRINT_KEY)
    name = checkpoint.name  # `.last.old`: `last` read during (or after an interrupted) save
    return {
        "phase": phase,
        "step": int(state["train_state"]["step"]),
        "checkpoint": name[1:-4] if name.startswith(".") and name.endswith(".old") else name,
        "trained_on_backbone": trained_on,
    }


def export_section(config: RunConfig, *, refiner_file: str | None, source: dict[str, Any]) -> dict[str, Any]:
    """The `llada_trm` entry of an export's config.json for a run's `config`: nothing that names a path."""
    model = config.model.model_dump(mode="json", exclude={"backbone"})
    data = config.data.model_dump(mode="json", exclude={"path"})
    return {
        "format_version": EXPORT_FORMAT,
        "model": model,
        # the sampler's batch too (the run's training batch since issue 25): the format stays as it was
        "sampling": {**config.sampling.model_dump(mode="json"), "batch_size": config.training.batch_size},
        "data": data,
        "refiner_file": refiner_file,
        "source": source,
    }


# ------------------------------------------------------------------------------------------ the model card


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
