"""The layout of an exported model (`llada-trm export`): one self-contained Hugging Face-layout directory.

    config.json           the backbone's LLaDA fields (so any LLaDA loader reads the backbone), plus under
                          `llada_trm` what turns it into the trained hybrid: `format_version`, `model` (the
                          run's HybridConfig fields and dtype), `sampling` (the run's sampler settings),
                          `data` (the run's data section less its path: the generated task's knobs),
                          `refiner_file`, and `source` (the run's phase and step, no paths)
    model.safetensors     the backbone, trained tensors of phases 2/3 included (or HF shards + index)
    refiner.safetensors   the refiners (`hybrid.refiner_file`; records this backbone's fingerprint)
    tokenizer.json, tokenizer_config.json, special_tokens_map.json
    README.md             the model card with the run's measured table

The directory names no other file: `evaluate.loading.load_checkpoint(OUT)` builds the run config from the
`llada_trm` section with `model.backbone` set to OUT itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llada_trm.config import RunConfig, parse_config
from llada_trm.errors import CheckpointError

__all__ = [
    "EXPORT_FORMAT",
    "EXPORT_KEY",
    "REFINER_FILE",
    "export_run_config",
    "export_section",
    "read_export_section",
]

EXPORT_KEY = "llada_trm"
EXPORT_FORMAT = 1
REFINER_FILE = "refiner.safetensors"


def export_section(config: RunConfig, *, refiner_file: str | None, source: dict[str, Any]) -> dict[str, Any]:
    """The `llada_trm` entry of an export's config.json for a run's `config`: nothing that names a path."""
    model = config.model.model_dump(mode="json", exclude={"backbone"})
    data = config.data.model_dump(mode="json", exclude={"path"})
    return {
        "format_version": EXPORT_FORMAT,
        "model": model,
        "sampling": config.sampling.model_dump(mode="json"),
        "data": data,
        "refiner_file": refiner_file,
        "source": source,
    }


def read_export_section(directory: Path) -> dict[str, Any] | None:
    """The `llada_trm` entry of `directory/config.json`, or None for a plain backbone (or no config.json:
    the backbone loader reports that)."""
    path = directory / "config.json"
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # JSON or UTF-8 errors
        return None  # the backbone loader names the problem with the file
    section = raw.get(EXPORT_KEY) if isinstance(raw, dict) else None
    if section is None:
        return None
    if not isinstance(section, dict) or section.get("format_version") != EXPORT_FORMAT:
        version = section.get("format_version") if isinstance(section, dict) else None
        raise CheckpointError(
            f"{path}: '{EXPORT_KEY}' is not a llada-trm export of format {EXPORT_FORMAT} (format "
            f"{version!r}); re-export the run with this llada-trm (llada-trm export RUN OUT --force)"
        )
    return section


def export_run_config(directory: Path, section: dict[str, Any]) -> RunConfig:
    """The run config an export stands for, its backbone being the export directory itself."""
    raw = {
        "model": {**section.get("model", {}), "backbone": str(directory)},
        "data": section.get("data", {}),
        "sampling": section.get("sampling", {}),
    }
    return parse_config(raw, source=f"{directory / 'config.json'}: {EXPORT_KEY}")
