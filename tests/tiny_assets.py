"""Tiny models for the tests: a random backbone builder, and shared copies built once per test session.

A random 2-layer, d_model 32 LLaDA backbone with a tokenizer trained on the generated task, and a 2-step
phase-1 slot-refiner run on it. Test modules wrap `tiny_backbone(factory)` / `tiny_run(factory)` in their own
fixtures; the module-level cache makes every module share one copy, built in pytest's temporary directory.
Modules that need their own variant (another vocabulary size, seed or init) call `make_tiny_backbone` /
`save_tiny_backbone` directly.

Also what several test folders share (a test module never imports another): the repository and fixtures
paths, the tiny compare and pretraining configs, and a toy hybrid for the sampler's per-step hook.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch

from llada_trm.data.synthetic import SyntheticTaskConfig, generate_problems
from llada_trm.data.tokenizer import build_tokenizer, special_token_ids
from llada_trm.model.llada import LLaDAModel
from llada_trm.model.llada_config import LLaDAConfig

if TYPE_CHECKING:
    from llada_trm.model.hybrid import LLaDATRMHybrid

REPO = Path(__file__).resolve().parents[1]  # the repository root
FIXTURES = REPO / "tests" / "fixtures"

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


def model_section(backbone_dir: Path, **overrides: Any) -> dict[str, Any]:
    """The `model:` section of the tests' runs: a small slot refiner, K = 2, on the tiny backbone."""
    return {
        "backbone": str(backbone_dir),
        "refiner": "slot",
        "max_recursive_steps": 2,
        "chunk_size": 8,
        "confidence_threshold": 1.5,  # above 1: every chunk holding a masked position is refined
        "context_layers": [-1],
        "slot": {"n_heads": 2, "n_blocks": 1},
        **overrides,
    }


def run_config(backbone_dir: Path, out: Path, refiner: str = "slot", **training: Any) -> dict[str, Any]:
    """A raw run config (as YAML gives it) for a few phase-1 steps on the tiny backbone."""
    settings: dict[str, Any] = {"lr": 3e-3, "batch_size": 8, "max_steps": 2, "warmup_steps": 1}
    settings.update(eval_every=2, save_every=0, seed=0)  # (--device cpu --log-every 1: tests/conftest.py)
    settings.update(training)
    return {
        "model": model_section(backbone_dir, refiner=refiner),
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


def compare_yaml(backbone_dir: Path, out: Path) -> dict:
    """A raw `llada-trm compare` config: both refiners on the tiny backbone, 3 problems evaluated."""
    run = run_config(backbone_dir, out / "unused")
    del run["output"], run["model"]["refiner"]
    run["sampling"] = dict(TINY_SAMPLING)  # sampled in the training batch (8)
    evaluation = {"n_problems": 3}
    return {"run": run, "refiners": ["mlp", "slot"], "evaluation": evaluation, "output": {"dir": str(out)}}


# `llada-trm pretrain --set` overrides: a few steps of a 1-layer backbone (tests/extras/test_pretrain_runs).
TINY_PRETRAIN = [
    "model.d_model=32",
    "model.n_layers=1",
    "model.n_heads=2",
    "model.mlp_hidden_size=64",
    "data.n_train=80",
    "data.n_eval=4",
    "data.max_steps=2",
    "data.vocab_size=400",
    "training.steps=8",
    "training.batch_size=4",
    "training.warmup_steps=1",
    "training.log_every=1",
    "training.eval_every=4",
    "training.save_every=3",
    "evaluation.n_problems=3",
    "evaluation.n_test=3",
    "evaluation.batch_size=2",
    "evaluation.gen_length=32",
    "evaluation.block_length=32",
    "evaluation.steps=4",
    "output.dtype=float32",
]


def tiny_pretrain(out: Path, *extra: str) -> Any:
    """The pretraining config of `TINY_PRETRAIN` writing to `out`, with `extra` overrides."""
    from llada_trm.extras.pretraining.config import load_pretrain_config

    return load_pretrain_config(None, [*TINY_PRETRAIN, f"output.dir={out}", *extra])


# A toy hybrid for the sampler's per-step hook (diffusion/test_sampler_steps, evaluate/test_diagnostics).
TOY_VOCAB, TOY_MASK, TOY_PAD = 50, 49, 48
TOY_VARIANTS = {
    "exact": {},
    "threshold": {"threshold": 0.5},
    "prefix": {"cache": "prefix"},
    "dual": {"cache": "dual", "threshold": 0.5},
}


def toy_backbone() -> LLaDAModel:
    """A random 2-layer backbone over a 50-token vocabulary ([MASK] 49, padding and EOS 48), in eval mode."""
    torch.manual_seed(0)
    config = LLaDAConfig(
        d_model=32, n_heads=4, n_layers=2, vocab_size=TOY_VOCAB, mlp_hidden_size=64, max_sequence_length=64,
        mask_token_id=TOY_MASK, eos_token_id=TOY_PAD, pad_token_id=TOY_PAD,
    )
    return LLaDAModel(config).eval()


def toy_hybrid(**kwargs: Any) -> LLaDATRMHybrid:
    """A slot-refiner hybrid on `toy_backbone` (`kwargs`: HybridConfig fields), its refiner off identity."""
    from llada_trm.model.hybrid import LLaDATRMHybrid
    from llada_trm.model.hybrid_config import HybridConfig

    settings = {"refiner": "slot", "chunk_size": 4, "slot": {"n_heads": 2, "n_blocks": 1}, **kwargs}
    model = LLaDATRMHybrid(toy_backbone(), HybridConfig(**settings)).eval()
    torch.manual_seed(8)
    with torch.no_grad():  # move the near-identity refiner so that refining changes something
        for p in model.refinement_head.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return model


def toy_prompt() -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts of 7 tokens, the second left-padded by 2."""
    ids = torch.randint(0, TOY_PAD, (2, 7), generator=torch.Generator().manual_seed(3))
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :2] = 0
    ids[attention_mask == 0] = TOY_PAD
    return ids, attention_mask


def toy_sample(model: Any, variant: str, on_step: Any = None, **extra: Any) -> Any:
    """`sample` on `toy_prompt`: 16 tokens in 2 blocks, 8 steps, the `TOY_VARIANTS[variant]` options."""
    from llada_trm.diffusion.options import SamplingOptions
    from llada_trm.diffusion.sampler import sample

    settings = {"steps": 8, "gen_length": 16, "block_length": 8, "mask_id": TOY_MASK}
    settings.update(TOY_VARIANTS[variant], **extra)
    options = SamplingOptions(**settings)
    prompt, attention_mask = toy_prompt()
    generator = torch.Generator().manual_seed(1)
    return sample(model, prompt, attention_mask, options, generator=generator, on_step=on_step)
