"""The backbone and tokenizer a pre-training starts from: new ones, or those of `model.init_from`.

A warm start keeps the backbone's tokenizer (token ids are part of its weights: a rebuilt tokenizer would
renumber them) and its weights, and requires the configured shape to equal the stored one, so that the
config always tells the truth about the model it trains.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from llada_trm.backbone.config import LLaDAConfig
from llada_trm.backbone.modeling import LLaDAModel
from llada_trm.data import GSM8KRecord, build_tokenizer, load_tokenizer, special_token_ids
from llada_trm.errors import CheckpointError, ConfigError

from .config import ArchitectureConfig, PretrainConfig

__all__ = ["SHAPE_FIELDS", "build_backbone", "init_chain"]

SHAPE_FIELDS = ("d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size", "max_sequence_length",
                "rope_theta")  # fmt: skip


# pretrain builds its backbone in memory in float32 with AdamW (16 bytes a parameter): past this a typo in
# d_model or n_layers would exhaust the machine's memory rather than fail.
MAX_PRETRAIN_PARAMETERS = 2_000_000_000


def build_backbone(config: PretrainConfig, train_records: list[GSM8KRecord]) -> tuple[LLaDAModel, Any]:
    """(model in float32, tokenizer): from `model.init_from`, or a new tokenizer and random weights."""
    arch = config.model
    if arch.init_from:
        return _warm_start(Path(arch.init_from), arch)
    texts = [text for r in train_records for text in (r.question, r.answer)]
    tokenizer = build_tokenizer(texts, vocab_size=config.data.vocab_size)
    ids = special_token_ids(tokenizer)
    backbone_config = LLaDAConfig(
        **{name: getattr(arch, name) for name in SHAPE_FIELDS},
        vocab_size=len(tokenizer),
        embedding_size=len(tokenizer),
        mask_token_id=ids.mask,
        eos_token_id=ids.eos,
        pad_token_id=ids.pad,
    )
    if backbone_config.num_parameters() > MAX_PRETRAIN_PARAMETERS:  # before a byte of it is allocated
        raise ConfigError(
            f"model: d_model {arch.d_model} x n_layers {arch.n_layers} (mlp_hidden_size "
            f"{arch.mlp_hidden_size}) is {backbone_config.num_parameters() / 1e9:.1f}B parameters; pretrain "
            f"builds small backbones from scratch (at most {MAX_PRETRAIN_PARAMETERS / 1e9:.0f}B)"
        )
    return LLaDAModel(backbone_config), tokenizer


def _warm_start(directory: Path, arch: ArchitectureConfig) -> tuple[LLaDAModel, Any]:
    if not (directory / "config.json").is_file():
        raise ConfigError(f"model.init_from: {directory} is not a backbone directory (no config.json)")
    stored = LLaDAConfig.from_json_file(directory / "config.json")
    shape = {name: stored.n_heads if name == "n_kv_heads" and stored.n_kv_heads is None else
             getattr(stored, name) for name in SHAPE_FIELDS}  # fmt: skip
    wanted = {name: getattr(arch, name) for name in SHAPE_FIELDS}
    wanted["n_kv_heads"] = wanted["n_kv_heads"] or wanted["n_heads"]
    differ = [f"{k} {wanted[k]} vs {shape[k]}" for k in SHAPE_FIELDS if float(wanted[k]) != float(shape[k])]
    if differ:
        raise ConfigError(
            f"model.init_from: {directory} has another shape ({', '.join(differ)} stored); set model.* to "
            "the stored shape or drop init_from"
        )
    model = LLaDAModel.from_pretrained(directory, dtype=torch.float32)
    tokenizer = load_tokenizer(directory)
    if model.config.vocab_size != len(tokenizer):
        raise CheckpointError(
            f"model.init_from: {directory}: its tokenizer has {len(tokenizer)} tokens, its model "
            f"{model.config.vocab_size}; point init_from at a backbone saved by llada-trm pretrain"
        )
    return model, tokenizer


def init_chain(config: PretrainConfig) -> list[dict[str, Any]]:
    """The backbones this run continues, nearest first: each one's directory, command, seed and steps, as
    its pretrain_summary.json records them (its own chain included); [] for a run from scratch."""
    directory = config.model.init_from
    if not directory:
        return []
    try:
        summary = json.loads((Path(directory) / "pretrain_summary.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return [{"dir": str(directory)}]  # a backbone without a summary: its history is unknown
    training = (summary.get("config") or {}).get("training") or {}
    nearest = {"dir": str(directory), "command": summary.get("command"), "seed": training.get("seed"),
               "steps": summary.get("steps")}  # fmt: skip
    return [nearest, *(summary.get("init_chain") or [])]
