"""Validation during training: loss and masked-token accuracies of the final, backbone and per-step logits,
teacher-forced result accuracy, optionally sampled accuracy, and the reachability report (docs/training.md).

Validation example i is noised by its own generator seeded by (`data.validation_seed`, i), so every
validation of every run sees the same masks whatever its seed, batch size or step, and training's RNG
streams stay untouched (a resume stays exact).
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from itertools import islice
from typing import Any

import torch

from llada_trm.config import RunConfig
from llada_trm.diffusion.forward_process import (
    TokenText,
    TrainingMasks,
    answer_targets,
    draw_noise,
    masked_diffusion_loss,
)
from llada_trm.errors import ConfigError
from llada_trm.model.hybrid import LLaDATRMHybrid, chunk_sum
from llada_trm.model.reachability import (
    TARGET_REACHABILITY,
    reachable_fraction,
    required_bounds,
    smallest_sufficient_scale,
    step_bound,
)
from llada_trm.model.refiners.config import DELTA_CLAMP
from llada_trm.training.freezing import set_train_mode
from llada_trm.training.metrics import VALIDATION_COLUMNS, forward_statistics

VALIDATION_SEED_OFFSET = 2_000_003  # validation noise draws from seed data.validation_seed + this
SAMPLED_COLUMNS = ("sampled_accuracy", "sampled_accuracy_flexible")


def validation_columns(config: RunConfig) -> list[str]:
    """The columns of `validation_metrics.csv` for this run (one accuracy pair per refinement step)."""
    k = config.model.max_recursive_steps if config.model.refiner != "none" else 0
    columns = list(VALIDATION_COLUMNS) + ["chunk_accuracy", "chunk_accuracy_base", *RESULT_COLUMNS]
    columns += [f"accuracy_step_{i}" for i in range(1, k + 1)]
    columns += [f"chunk_accuracy_step_{i}" for i in range(1, k + 1)]
    if config.training.val_sampled_problems:
        columns += list(SAMPLED_COLUMNS)
    return columns


def improves(value: float | None, best: float | None, *, lower: bool) -> bool:
    """Whether a validation value beats the best so far (a missing or non-finite value never does)."""
    if value is None or not math.isfinite(value):
        return False
    return best is None or (value < best if lower else value > best)


def check_save_best(config: RunConfig) -> None:
    """`output.save_best` must name a validation metric this run writes."""
    name = config.output.save_best
    if name in SAMPLED_COLUMNS and not config.training.val_sampled_problems:
        raise ConfigError(
            f"output.save_best: {name!r} needs sampled validation; set training.val_sampled_problems to the "
            "number of validation problems to sample (e.g. 32)"
        )
    known = validation_columns(config)
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


def _noised_batches(
    model: LLaDATRMHybrid,
    loader: Iterable[Mapping[str, torch.Tensor]],
    *,
    mask_id: int,
    seed: int,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager],
) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, Any]]:
    """(batch, masked, p_mask, refine output) per validation batch, with the model in eval mode meanwhile.

    `loader` must yield the validation set in order: row i of the set is noised from (seed + offset, i).
    """
    first = 0
    set_train_mode(model, False)
    try:
        for batch in loader:
            rows = batch["input_ids"].shape[0]
            noisy, masked, p_mask = draw_noise(
                batch["input_ids"], batch["prompt_lengths"], mask_id, seed=seed + VALIDATION_SEED_OFFSET,
                examples=range(first, first + rows), draws=0,
            )
            first += rows
            batch = {k: v.to(device) for k, v in batch.items()}
            noisy, masked, p_mask = noisy.to(device), masked.to(device), p_mask.to(device)
            with autocast():
                out = model.refine(model.features(noisy), masked, return_step_logits=True)
            yield batch, masked, p_mask, out
    finally:
        set_train_mode(model, True)


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
) -> dict[str, Any]:
    """Mean losses, accuracies and refinement statistics over `loader`; {} if empty.

    `seed` is the validation seed (`data.validation_seed`), not the training seed. The model is put in eval
    mode for the pass and back in train mode afterwards.
    """
    totals: dict[str, float] = defaultdict(float)
    batches = 0
    passes = _noised_batches(model, loader, mask_id=mask_id, seed=seed, device=device, autocast=autocast)
    for batch, masked, p_mask, out in passes:
        ids, lengths = batch["input_ids"], batch["answer_lengths"]
        totals["loss"] += float(masked_diffusion_loss(out.logits, ids, masked, p_mask, lengths))
        totals["loss_base"] += float(masked_diffusion_loss(out.base_logits, ids, masked, p_mask, lengths))
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
    if not batches:
        return {}
    row = {key: totals[key] / batches for key in
           ("loss", "loss_base", "refine_steps", "skipped_fraction", "skipped_fraction_masked")}  # fmt: skip
    for key in sorted(totals):
        if key.startswith("correct"):
            row["accuracy" + key[len("correct"):]] = totals[key] / max(totals["masked"], 1.0)
        elif key.startswith("chunks_ok"):
            row["chunk_accuracy" + key[len("chunks_ok"):]] = totals[key] / max(totals["chunks"], 1.0)
    return row


@torch.no_grad()
def per_example_validation(
    model: LLaDATRMHybrid,
    loader: Iterable[Mapping[str, torch.Tensor]],
    *,
    mask_id: int,
    seed: int,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> dict[str, list[float]]:
    """Per validation example, on `validate`'s masks: the loss and correct masked tokens of the final
    (`loss`, `correct`) and the backbone's (`loss_base`, `correct_base`) logits, and the masked count.

    Both come from one forward pass on the same masks, so refiner and backbone pair example by example
    (what a paired interval of their difference needs).
    """
    columns: dict[str, list[float]] = defaultdict(list)
    passes = _noised_batches(model, loader, mask_id=mask_id, seed=seed, device=device, autocast=autocast)
    for batch, masked, p_mask, out in passes:
        ids, lengths = batch["input_ids"], batch["answer_lengths"]
        for suffix, logits in (("", out.logits), ("_base", out.base_logits)):
            loss = masked_diffusion_loss(logits, ids, masked, p_mask, lengths, reduction="none")
            correct = ((logits.argmax(dim=-1) == ids) & masked).sum(dim=1)
            columns[f"loss{suffix}"] += loss.float().cpu().tolist()
            columns[f"correct{suffix}"] += correct.float().cpu().tolist()
        columns["masked"] += masked.sum(dim=1).float().cpu().tolist()
    return dict(columns)


def sampled_accuracy(
    model: LLaDATRMHybrid, tokenizer: Any, records: list[Any], options: Any
) -> dict[str, float]:
    """Sampled accuracy on `records` (the first `training.val_sampled_problems` validation problems),
    answered with the run's `sampling` settings: the same sampler a comparison uses."""
    from llada_trm.evaluate.evaluator import evaluate_model

    was_training = model.training
    try:
        result = evaluate_model(model, tokenizer, records, options, progress=False)
    finally:
        set_train_mode(model, was_training)  # evaluate_model's plain model.train() wakes frozen dropout
    return {"sampled_accuracy": result.accuracy_strict, "sampled_accuracy_flexible": result.accuracy_flexible}


@torch.no_grad()
def reachability_report(
    model: LLaDATRMHybrid,
    loader: Iterable[Mapping[str, torch.Tensor]],
    masks: TrainingMasks,
    config: RunConfig,
    *,
    device: torch.device,
    max_batches: int | None = None,
) -> dict[str, Any]:
    """Which of the backbone's wrong tokens on validation can the run's update budget flip
    (`model.reachability` states the bound)?

    Validation rows are masked as the run trains (`training.masks`, seeded by `data.validation_seed`); a token
    is wrong where the frozen backbone's argmax differs from the target. Returns the required bounds' summary:
    the reachable share at the run's K and budget, at K = 1..16, and the smallest sufficient delta_scale.
    """
    clamp, scale, steps = DELTA_CLAMP, config.model.delta_scale, config.model.max_recursive_steps
    backbone = model.backbone
    required: list[torch.Tensor] = []
    masked_total = 0
    first = 0
    for batch in islice(loader, max_batches):
        rows = batch["input_ids"].shape[0]
        noisy, masked, _ = masks.draw(dict(batch), range(first, first + rows), 0)
        first += rows
        logits = model.features(noisy.to(device)).base_logits
        targets = batch["input_ids"].to(device)
        masked = masked.to(device)
        wrong = masked & (logits.argmax(-1) != targets)
        masked_total += int(masked.sum())
        if wrong.any():
            required.append(required_bounds(logits[wrong], targets[wrong], backbone.lm_head_rows).cpu())
    bounds = torch.cat(required) if required else torch.zeros(0)
    candidates = [0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0]
    return {
        "masks": config.training.masks,
        "masked_tokens": masked_total,
        "wrong_tokens": int(bounds.numel()),
        "delta_scale": scale,
        "delta_clamp": clamp,
        "steps": steps,
        "reachable": reachable_fraction(bounds, steps * step_bound(scale, clamp)),
        "reachable_by_steps": {
            k: reachable_fraction(bounds, k * step_bound(scale, clamp)) for k in (1, 2, 4, 8, 16)
        },
        "required_bound_median": float(bounds.median()) if bounds.numel() else float("nan"),
        "suggested_delta_scale": smallest_sufficient_scale(bounds, max(steps, 1), clamp, candidates),
        "target": TARGET_REACHABILITY,
    }


def format_reachability(report: Mapping[str, Any]) -> str:
    """The report as a few lines for a terminal or a log."""
    by_k = ", ".join(f"K={k} {v:.0%}" for k, v in report["reachable_by_steps"].items())
    suggested = report["suggested_delta_scale"]
    advice = (
        f"the smallest delta_scale reaching {report['target']:.0%} at K={report['steps']} is {suggested}"
        if suggested is not None else f"no delta_scale up to 2.0 reaches {report['target']:.0%}"
    )
    return (
        f"reachability ({report['masks']} masks on validation): {report['wrong_tokens']} of "
        f"{report['masked_tokens']} masked tokens wrong; an update within delta_scale "
        f"{report['delta_scale']} x delta_clamp {report['delta_clamp']} for K={report['steps']} steps can "
        f"flip at most {report['reachable']:.1%} of them ({by_k}); {advice}"
    )


RESULT_COLUMNS = ("result_accuracy", "result_accuracy_base")


@torch.no_grad()
def result_accuracy(
    model: LLaDATRMHybrid,
    loader: Iterable[Mapping[str, torch.Tensor]],
    token_text: TokenText,
    *,
    mask_id: int,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager],
) -> dict[str, float]:
    """Teacher-forced accuracy of an answer's results: one row per target of each validation answer (a
    calculator line's result, or the `####` line, `targeted_masks.answer_targets`) with that target's tokens
    and every later copy masked and the rest of the answer given; a target counts when every masked token's
    argmax is right. `result_accuracy` reads the final logits, `_base` the backbone's. {} without targets."""
    right = {"": 0, "_base": 0}
    total = 0
    set_train_mode(model, False)
    try:
        for batch in loader:
            ids, prompts = batch["input_ids"], batch["prompt_lengths"]
            ends = batch["attention_mask"].sum(-1) if "attention_mask" in batch else None
            rows, masks = [], []
            for row in range(ids.shape[0]):
                start = int(prompts[row])
                end = int(ends[row]) if ends is not None else ids.shape[1]
                for target in answer_targets(token_text.pieces(ids[row, start:end].tolist())):
                    masked = torch.zeros(ids.shape[1], dtype=torch.bool)
                    masked[[start + p for p in target.positions]] = True
                    rows.append(row)
                    masks.append(masked)
            if not rows:
                continue
            targets = ids[rows].to(device)
            masked = torch.stack(masks).to(device)
            noisy = torch.where(masked, torch.full_like(targets, mask_id), targets)
            with autocast():
                out = model.refine(model.features(noisy), masked)
            for suffix, logits in (("", out.logits), ("_base", out.base_logits)):
                wrong = (logits.argmax(-1) != targets) & masked
                right[suffix] += int((~wrong.any(-1)).sum())
            total += len(rows)
    finally:
        set_train_mode(model, True)
    return {f"result_accuracy{suffix}": count / total for suffix, count in right.items()} if total else {}
