"""Validation during training: loss and masked-token accuracies of the final, backbone and per-step logits.

The noise is drawn from a generator re-seeded for every validation: every validation sees the same masks, so
rows are comparable, and training's RNG streams are untouched (a resume stays exact).

    accuracy        correct masked tokens / masked tokens           (per logits: final, _base, _step_i)
    chunk_accuracy  chunks whose masked tokens are all correct / chunks with a masked token
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from llada_trm.config import RunConfig
from llada_trm.diffusion import forward_process, masked_diffusion_loss
from llada_trm.errors import ConfigError
from llada_trm.hybrid import LLaDATRMHybrid
from llada_trm.hybrid.chunking import chunk_sum
from llada_trm.training.freezing import set_train_mode
from llada_trm.training.metrics import VALIDATION_COLUMNS
from llada_trm.training.stats import forward_statistics

__all__ = ["VALIDATION_SEED_OFFSET", "accuracy_counts", "check_save_best", "validate", "validation_columns"]

VALIDATION_SEED_OFFSET = 2_000_003  # the validation generator's seed is training.seed + this


def _refine_steps(config: RunConfig) -> int:
    return config.model.max_recursive_steps if config.model.refiner != "none" else 0


def validation_columns(config: RunConfig) -> list[str]:
    """The columns of `validation_metrics.csv` for this run (one accuracy pair per refinement step)."""
    k = _refine_steps(config)
    columns = list(VALIDATION_COLUMNS) + ["chunk_accuracy", "chunk_accuracy_base"]
    columns += [f"accuracy_step_{i}" for i in range(1, k + 1)]
    columns += [f"chunk_accuracy_step_{i}" for i in range(1, k + 1)]
    return columns


def check_save_best(config: RunConfig) -> None:
    """`output.save_best` must name a validation metric this run writes."""
    k = _refine_steps(config)
    known = set(VALIDATION_COLUMNS) | {"chunk_accuracy", "chunk_accuracy_base"}
    known |= {f"{kind}_step_{i}" for kind in ("accuracy", "chunk_accuracy") for i in range(1, k + 1)}
    name = config.output.save_best
    if name not in known:
        choices = ", ".join(sorted(known))
        raise ConfigError(f"output.save_best: {name!r} is not a validation metric; choose from {choices}")


def accuracy_counts(
    logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor, chunk_size: int
) -> tuple[float, float, float]:
    """(correct masked tokens, chunks whose masked tokens are all correct, chunks with a masked token)."""
    correct = (logits.argmax(dim=-1) == targets) & masked
    wrong = chunk_sum((masked & ~correct).float(), chunk_size)
    has = chunk_sum(masked.float(), chunk_size) > 0
    chunks_ok = has & (wrong == 0)
    return float(correct.sum()), float(chunks_ok.sum()), float(has.sum())


@torch.no_grad()
def validate(
    model: LLaDATRMHybrid,
    loader: Iterable[Mapping[str, torch.Tensor]],
    *,
    mask_id: int,
    chunk_size: int,
    seed: int,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager],
    max_batches: int | None = None,
) -> dict[str, Any]:
    """Mean losses, accuracies and refinement statistics over `loader` (at most `max_batches`); {} if empty.

    The model is put in eval mode for the pass and back in train mode afterwards.
    """
    generator = torch.Generator(device=device).manual_seed(seed + VALIDATION_SEED_OFFSET)
    totals: dict[str, float] = defaultdict(float)
    batches = 0
    set_train_mode(model, False)
    try:
        for batch in loader:
            if max_batches is not None and batches >= max_batches:
                break
            batch = {k: v.to(device) for k, v in batch.items()}
            ids = batch["input_ids"]
            prompts = batch["prompt_lengths"]
            noisy, masked, p_mask = forward_process(ids, prompts, mask_id, generator=generator)
            lengths = batch["answer_lengths"]
            with autocast():
                out = model.refine(model.features(noisy), masked, return_step_logits=True)
                loss = masked_diffusion_loss(out.logits, ids, masked, p_mask, lengths)
                loss_base = masked_diffusion_loss(out.base_logits, ids, masked, p_mask, lengths)
            totals["loss"] += float(loss)
            totals["loss_base"] += float(loss_base)
            totals["masked"] += float(masked.sum())
            named = [("", out.logits), ("_base", out.base_logits)]
            named += [(f"_step_{i}", logits) for i, logits in enumerate(out.step_logits, start=1)]
            for suffix, logits in named:
                correct, chunks_ok, chunks = accuracy_counts(logits, ids, masked, chunk_size)
                totals[f"correct{suffix}"] += correct
                totals[f"chunks_ok{suffix}"] += chunks_ok
            totals["chunks"] += chunks  # the same for every logits tensor
            stats = forward_statistics(out.stats, masked, chunk_size)
            totals["refine_steps"] += stats.get("refine_steps", 0.0)
            totals["skipped_fraction"] += stats.get("skipped_fraction", 1.0)
            totals["skipped_fraction_masked"] += stats.get("skipped_fraction_masked", 1.0)
            batches += 1
    finally:
        set_train_mode(model, True)
    if not batches:
        return {}
    return _row(totals, batches)


def _row(totals: Mapping[str, float], batches: int) -> dict[str, Any]:
    masked_total = max(totals["masked"], 1.0)
    chunk_total = max(totals["chunks"], 1.0)
    row: dict[str, Any] = {
        "loss": totals["loss"] / batches,
        "loss_base": totals["loss_base"] / batches,
        "refine_steps": totals["refine_steps"] / batches,
        "skipped_fraction": totals["skipped_fraction"] / batches,
        "skipped_fraction_masked": totals["skipped_fraction_masked"] / batches,
    }
    for key in sorted(totals):
        if key.startswith("correct"):
            row["accuracy" + key[len("correct"):]] = totals[key] / masked_total
        elif key.startswith("chunks_ok"):
            row["chunk_accuracy" + key[len("chunks_ok"):]] = totals[key] / chunk_total
    return row
