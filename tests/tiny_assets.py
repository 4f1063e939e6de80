"""Tiny models for the tests: a random backbone builder, and shared copies built once per test session.

A random 2-layer, d_model 32 LLaDA backbone with a tokenizer trained on the generated task, and a 2-step
phase-1 slot-refiner run on it. Test modules wrap `tiny_backbone(factory)` / `tiny_run(factory)` in their own
fixtures; the module-level cache makes every module share one copy, built in pytest's temporary directory.
Modules that need their own variant (another vocabulary size, seed or init) call `make_tiny_backbone` /
`save_tiny_backbone` directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from llada_trm.data import SyntheticTaskConfig, build_tokenizer, generate_problems, special_token_ids
from llada_trm.model.llada import LLaDAModel
from llada_trm.model.llada_config import LLaDAConfig

TINY_COUNTS = {"n_train": 24, "n_eval": 8}
# Sampler settings small enough for a random model: 2 blocks of 8 tokens, 2 steps each.
TINY_SAMPLING = {"gen_length": 16, "block_length": 8, "steps": 4}

_cache: dict[str, Path] = {}


def save_tiny_backbone(directory: Path, tokenizer: Any, *, seed: int = 0, **overrides: Any) -> None:
    """Save a random 2-layer, d_model 32 LLaDA backbone sized for `tokenizer` in `directory` (HF layout).

    `seed` picks the weights (another seed: same shapes, other weights); `overrides` replace LLaDAConfig
    fields, e.g. a larger `init_std` for a model whose answers differ from problem to problem.
    """
    ids = special_token_ids(tokenizer)
    torch.manual_seed(seed)
    config = LLaDAConfig(
        d_model=32,
        n_heads=2,
        n_layers=2,
        vocab_size=len(tokenizer),
        mlp_hidden_size=64,
        max_sequence_length=256,
        mask_token_id=ids.mask,
        eos_token_id=ids.eos,
        pad_token_id=ids.pad,
        **overrides,
    )
    LLaDAModel(config).save_pretrained(directory)


def make_tiny_backbone(directory: Path, *, vocab_size: int = 1024, **overrides: Any) -> Path:
    """A tokenizer trained on the generated task and a random backbone for it, saved in `directory`.

    Shared by every test module that needs a real (if untrained) backbone on disk; `overrides` go to
    `save_tiny_backbone`.
    """
    records = generate_problems(SyntheticTaskConfig(max_steps=2, max_number=10), 200, "train")
    texts = [f"{r.question}\n{r.answer}" for r in records]
    tokenizer = build_tokenizer(texts, vocab_size=vocab_size, out_dir=directory)
    save_tiny_backbone(directory, tokenizer, **overrides)
    return directory


def tiny_backbone(factory: pytest.TempPathFactory) -> Path:
    """The backbone directory (HF layout: config.json, model.safetensors, tokenizer files)."""
    if "backbone" not in _cache:
        _cache["backbone"] = make_tiny_backbone(factory.mktemp("tiny_backbone"))
    return _cache["backbone"]


def run_config(backbone_dir: Path, out: Path, refiner: str = "slot", **training: Any) -> dict[str, Any]:
    """A raw run config (as YAML gives it) for a few phase-1 steps on the tiny backbone."""
    settings: dict[str, Any] = {"lr": 3e-3, "batch_size": 8, "max_steps": 2, "warmup_steps": 1}
    settings.update(eval_every=2, save_every=0, seed=0)  # (--device cpu --log-every 1: tests/conftest.py)
    settings.update(training)
    return {
        "model": {
            "backbone": str(backbone_dir),
            "refiner": refiner,
            "max_recursive_steps": 2,
            "chunk_size": 8,
            "confidence_threshold": 1.5,  # above 1: every chunk holding a masked position is refined
            "context_layers": [-1],
            "slot": {"n_heads": 2, "n_blocks": 1},
        },
        "data": {"max_length": 128, **TINY_COUNTS},  # the run's task: the embedded backbone's (fixed)
        "training": settings,
        "output": {"dir": str(out)},
    }


def tiny_run(factory: pytest.TempPathFactory) -> Path:
    """The output directory of a 2-step slot-refiner run: metrics CSVs, checkpoints/last and best."""
    if "run" not in _cache:
        from llada_trm.config import parse_config
        from llada_trm.training.loop import Trainer

        out = factory.mktemp("tiny_run") / "run"
        config = parse_config(run_config(tiny_backbone(factory), out))
        Trainer(config, progress=False).train()
        _cache["run"] = out
    return _cache["run"]
