"""The training side of diffusion: LLaDA's forward (noising) process, its loss, and phase 1's targeted masks.

`draw_noise` and `draw_training_masks` draw each row from its own generator seeded by (seed, example, draw),
so that live training and the phase-1 feature cache see exactly the same masks. docs/training.md has the
story of the mask distributions.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor


def forward_process(
    input_ids: Tensor,
    prompt_lengths: Tensor | None,
    mask_id: int,
    eps: float = 1e-3,
    generator: torch.Generator | None = None,
    t: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Sample x_t ~ q(x_t | x_0) for a batch, as LLaDA's pre-training / SFT code does:
    ``(noisy_ids [B, L] long, masked [B, L] bool, p_mask [B, L] float32)``.

    Per sequence ``t ~ U(0, 1)`` (or the given ``t`` [B]) and ``p_mask = (1 - eps) t + eps`` (eps bounds the
    1/p_mask loss weight); every token after the prompt (``prompt_lengths=None``: every token) is masked
    independently with probability ``p_mask``. Draws come in LLaDA's order (``t``, then the [B, L] uniforms).
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq_len], got shape {tuple(input_ids.shape)}")
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"eps must be in [0, 1), got {eps}")
    batch_size, seq_len = input_ids.shape
    device = input_ids.device

    if t is None:
        t = torch.rand(batch_size, device=device, generator=generator)
    else:
        t = torch.as_tensor(t, dtype=torch.float32, device=device).reshape(-1)
        if t.numel() != batch_size:
            raise ValueError(f"t has {t.numel()} entries for {batch_size} rows; give one t per row")
        if bool(((t < 0) | (t > 1)).any()):
            raise ValueError("t must lie in [0, 1]")
    p_mask = ((1 - eps) * t + eps)[:, None].expand(batch_size, seq_len)

    masked = torch.rand((batch_size, seq_len), device=device, generator=generator) < p_mask
    if prompt_lengths is not None:  # the prompt is the conditioning, never noised
        prompt_lengths = torch.as_tensor(prompt_lengths, device=device).reshape(-1)
        if prompt_lengths.numel() != batch_size:
            raise ValueError(
                f"prompt_lengths has {prompt_lengths.numel()} entries but the batch has {batch_size} rows; "
                "pass one prompt length per sequence"
            )
        masked &= torch.arange(seq_len, device=device)[None, :] >= prompt_lengths[:, None]
    noisy_ids = torch.where(masked, torch.full_like(input_ids, mask_id), input_ids)
    return noisy_ids, masked, p_mask.contiguous()


def noise_seed(seed: int, example: int, draw: int, what: str = "noise") -> int:
    """The generator seed of one (example, draw) for `what` (the forward process's noise, or a targeted mask
    kind's): a hash, so nearby seeds give unrelated streams."""
    digest = hashlib.blake2b(f"llada-trm/{what}/{seed}/{example}/{draw}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def draw_for_epoch(epoch: int, n_draws: int) -> int:
    """Which of `n_draws` stored noise draws epoch `epoch` trains on."""
    return epoch % n_draws


def draw_noise(
    input_ids: Tensor,
    prompt_lengths: Tensor,
    mask_id: int,
    *,
    seed: int,
    examples: Sequence[int],
    draws: int | Sequence[int],
    eps: float = 1e-3,
) -> tuple[Tensor, Tensor, Tensor]:
    """`forward_process` with one CPU generator per row, seeded by (seed, example, draw): an example's noise
    is independent of its batch, its place in it and the device, so the cache can store it."""
    batch = input_ids.shape[0]
    draws = [draws] * batch if isinstance(draws, int) else list(draws)
    if len(examples) != batch or len(draws) != batch:
        raise ValueError(f"draw_noise: {batch} rows but {len(examples)} example ids and {len(draws)} draws")
    ids, prompts = input_ids.cpu(), torch.as_tensor(prompt_lengths).reshape(-1).cpu()
    rows = []
    for row, (example, draw) in enumerate(zip(examples, draws, strict=True)):
        generator = torch.Generator().manual_seed(noise_seed(seed, int(example), int(draw)))
        rows.append(forward_process(ids[row : row + 1], prompts[row : row + 1], mask_id, eps, generator))
    noisy, masked, p_mask = (torch.cat(parts).to(input_ids.device) for parts in zip(*rows, strict=True))
    return noisy, masked, p_mask


Reduction = Literal["mean", "sum", "none"]


def _per_row(values: Tensor | int, batch_size: int, device: torch.device, name: str) -> Tensor:
    """Accept [B], [B, 1] or a scalar and return a float [B] tensor."""
    values = torch.as_tensor(values, device=device, dtype=torch.float32)
    if values.dim() == 0:
        return values.expand(batch_size)
    values = values.reshape(-1)
    if values.numel() != batch_size:
        raise ValueError(f"{name} has {values.numel()} entries but the batch has {batch_size} rows")
    return values


def masked_diffusion_loss(
    logits: Tensor,
    target_ids: Tensor,
    masked: Tensor,
    p_mask: Tensor,
    answer_lengths: Tensor | int,
    reduction: Reduction = "mean",
    token_weights: Tensor | None = None,
) -> Tensor:
    """LLaDA's SFT loss: ``sum_i sum_{masked l} CE(l) / p_mask / answer_length_i / B`` (an upper bound on
    the NLL; with no prompt, LLaDA's pre-training loss ``sum(CE / p_mask) / (B * L)``); cross-entropy in
    float32. p_mask [B, L] or [B]; answer_lengths [B], [B, 1] or one int (padded EOS included, as LLaDA
    counts it); reduction "none" gives the [B] per-row losses. token_weights [B, L]: a factor on each term
    (`llada-trm pretrain` weighs rare-but-decisive tokens up; no longer a likelihood bound then).
    """
    if logits.dim() != 3 or logits.shape[:2] != target_ids.shape or masked.shape != target_ids.shape:
        raise ValueError(
            f"expected logits [B, L, V] with target_ids and masked [B, L]; got {tuple(logits.shape)}, "
            f"{tuple(target_ids.shape)}, {tuple(masked.shape)}"
        )
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    batch_size, seq_len = target_ids.shape
    masked = masked.bool()
    if p_mask.dim() == 1:
        p_mask = p_mask[:, None].expand(batch_size, seq_len)
    answer_lengths = _per_row(answer_lengths, batch_size, logits.device, "answer_lengths")

    # Only masked positions contribute, so gather them before the (vocabulary-sized) cross-entropy.
    rows = masked.nonzero(as_tuple=True)[0]
    token_ce = F.cross_entropy(logits[masked].float(), target_ids[masked], reduction="none")
    token_loss = token_ce / p_mask[masked].float() / answer_lengths[rows]
    if token_weights is not None:
        if token_weights.shape != target_ids.shape:
            raise ValueError(f"token_weights must be [B, L] = {list(target_ids.shape)}, "
                             f"got {list(token_weights.shape)}")  # fmt: skip
        token_loss = token_loss * token_weights[masked].float()

    if reduction == "none":
        per_row = torch.zeros(batch_size, device=logits.device, dtype=token_loss.dtype)
        return per_row.index_add(0, rows, token_loss)
    total = token_loss.sum()
    return total / batch_size if reduction == "mean" else total


def masked_token_accuracy(logits: Tensor, targets: Tensor, masked: Tensor) -> Tensor:
    """Fraction of masked positions whose argmax prediction equals the target (0 when nothing is masked)."""
    masked = masked.bool()
    correct = (logits.argmax(dim=-1) == targets) & masked
    return correct.sum().float() / masked.sum().clamp(min=1).float()


# Targeted masks (`training.masks`; docs/training.md has the distributions): not the forward process, so a
# targeted row's p_mask is 1 and its loss is the plain cross-entropy of its masked tokens.

MaskKind = Literal["forward", "answer_structure", "backbone_errors"]

# A probe margin below this many nats (the right token's logit minus the best other one) marks a position the
# backbone gets wrong (< 0) or nearly so: at 2 nats the right token's probability is at most ~0.88.
HARD_MARGIN = 2.0

_ANNOTATION = re.compile(r"<<[^<>]*?=\s*([^<>=]*?)\s*>>")
_FINAL = re.compile(r"####[ \t]*(-?\d[\d,]*(?:\.\d+)?)?")
_NUMBER_CHARS = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


@dataclass(frozen=True)
class Target:
    """One place an answer can go wrong: its result token positions (answer-relative) and where it starts."""

    positions: tuple[int, ...]
    start: int


class TokenText:
    """The text of each token id, decoded one token at a time (so that characters map to token positions
    exactly, whatever the tokenizer merged around them) and memoised."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._piece = functools.cache(lambda token: decode([token]))

    def pieces(self, ids: Sequence[int]) -> list[str]:
        return [self._piece(int(token)) for token in ids]


def _number_value(text: str) -> str | None:
    match = _NUMBER_CHARS.search(text)
    return None if match is None else match.group(0).replace(",", "")


def answer_targets(pieces: Sequence[str]) -> list[Target]:
    """Every target of an answer given its tokens' texts: each annotation's result, then the `####` line.

    A result is found by its digits: the annotation's `c` (after its last `=`), the copy of `c` written right
    after `>>`, and every later occurrence of the same number as a whole number (not inside a longer one).
    Positions are indices into `pieces`.
    """
    text = "".join(pieces)
    owner = [index for index, piece in enumerate(pieces) for _ in piece]

    def tokens(start: int, end: int) -> list[int]:
        return sorted({owner[i] for i in range(start, end)})

    def later_copies(value: str, after: int) -> list[int]:
        pattern = re.compile(r"(?<![\d.,])" + re.escape(value) + r"(?![\d]|[.,]\d)")
        return [p for m in pattern.finditer(text, after) for p in tokens(m.start(), m.end())]

    targets = []
    for match in _ANNOTATION.finditer(text):
        value = _number_value(match.group(1))
        if value is None:
            continue
        first = match.start(1) + match.group(1).find(value.lstrip("-")[:1])
        result = tokens(first, match.end(1))
        if not result:
            continue
        positions = set(result) | set(later_copies(value, match.end()))
        targets.append(Target(positions=tuple(sorted(positions)), start=min(result)))
    final = _FINAL.search(text)
    if final is not None:
        positions = set(tokens(final.start(), final.end()))
        targets.append(Target(positions=tuple(sorted(positions)), start=min(positions)))
    return targets


@dataclass(frozen=True)
class MaskDistribution:
    """Which masks phase 1 trains on: `kind`, with the forward process mixed in for `forward_mix` of rows."""

    kind: MaskKind = "forward"
    forward_mix: float = 0.0


def draw_training_masks(  # noqa: PLR0913 - the row's identity and what the distributions read
    input_ids: Tensor,
    prompt_lengths: Tensor,
    mask_id: int,
    *,
    distribution: MaskDistribution,
    seed: int,
    examples: Sequence[int],
    draws: int | Sequence[int],
    token_text: TokenText | None = None,
    margins: Tensor | None = None,
    answer_ends: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """`(noisy_ids, masked, p_mask)` of a batch under `distribution`, one seeded generator per row.

    `token_text` (answer_structure) decodes token ids; `margins` [B, L] (backbone_errors) are the rows' probe
    margins (`probe_margins`, +inf where not probed); `answer_ends` [B] is where each row's own tokens end
    (the EOS padding after it is masked like any later position). Forward-process rows are exactly
    `forward_process.draw_noise`'s, so `kind: forward` reproduces earlier runs bit for bit.
    """
    batch, length = input_ids.shape
    draws = [draws] * batch if isinstance(draws, int) else list(draws)
    noisy, masked, p_mask = draw_noise(
        input_ids, prompt_lengths, mask_id, seed=seed, examples=examples, draws=draws
    )
    if distribution.kind == "forward" or distribution.forward_mix >= 1.0:
        return noisy, masked, p_mask
    ids = input_ids.cpu()
    prompts = torch.as_tensor(prompt_lengths).reshape(-1).cpu()
    ends = torch.full((batch,), length) if answer_ends is None else torch.as_tensor(answer_ends).cpu()
    masked, p_mask = masked.cpu().clone(), p_mask.cpu().clone()
    for row, (example, draw) in enumerate(zip(examples, draws, strict=True)):
        row_seed = noise_seed(seed, int(example), int(draw), distribution.kind)
        generator = torch.Generator().manual_seed(row_seed)
        if float(torch.rand((), generator=generator)) < distribution.forward_mix:
            continue
        start, end = int(prompts[row]), int(ends[row])
        if distribution.kind == "answer_structure":
            if token_text is None:
                raise ValueError("answer_structure masks need the tokenizer's token texts (token_text)")
            chosen = _structure_mask(ids[row, start:end].tolist(), token_text, length - start, generator)
        else:
            if margins is None:
                raise ValueError("backbone_errors masks need the backbone's probe margins (margins)")
            chosen = _error_mask(margins[row, start:].cpu(), generator)
        if chosen is None:  # nothing to target in this row: it keeps its forward-process draw
            continue
        masked[row] = False
        masked[row, start:] = chosen
        p_mask[row] = 1.0
    masked = masked.to(input_ids.device)
    noisy = torch.where(masked, torch.full_like(input_ids, mask_id), input_ids)
    return noisy, masked, p_mask.to(input_ids.device)


def _structure_mask(
    answer: list[int], token_text: TokenText, span: int, generator: torch.Generator
) -> Tensor | None:
    """[span] bool: one target's result tokens and later copies, each later position with probability u."""
    targets = answer_targets(token_text.pieces(answer))
    if not targets:
        return None
    target = targets[int(torch.randint(len(targets), (), generator=generator))]
    u = torch.rand((), generator=generator)
    chosen = torch.rand(span, generator=generator) < u
    chosen[: target.start + 1] = False
    chosen[list(target.positions)] = True
    return chosen


def _error_mask(margins: Tensor, generator: torch.Generator) -> Tensor | None:
    """[span] bool: the hard positions, and each position after the first of them with probability u."""
    hard = margins < HARD_MARGIN
    if not bool(hard.any()):
        return None
    first = int(hard.nonzero()[0, 0])
    u = torch.rand((), generator=generator)
    chosen = torch.rand(margins.shape[0], generator=generator) < u
    chosen[: first + 1] = False
    return chosen | hard


@dataclass(eq=False)
class TrainingMasks:
    """A run's phase-1 masks, for the trainer and the feature cache.

    `probe(input_ids, prompt_lengths)` (backbone_errors) returns the frozen backbone's margins [B, L]
    (`probe_margins`); each example is probed the first time a batch holds it and its margins are kept. They
    are part of the run's state (`state_dict`): a probe reads the batch's padding, so a resumed run must not
    re-probe in another batch.
    """

    distribution: MaskDistribution
    mask_id: int
    seed: int
    token_text: TokenText | None = field(default=None, kw_only=True)
    probe: Callable[[Tensor, Tensor], Tensor] | None = field(default=None, kw_only=True)
    margins: dict[int, Tensor] = field(default_factory=dict, init=False)  # example -> its answer's, float16

    def __post_init__(self) -> None:
        if self.distribution.kind == "answer_structure" and self.token_text is None:
            raise ValueError("answer_structure masks need the tokenizer's token texts (token_text)")
        if self.distribution.kind == "backbone_errors" and self.probe is None:
            raise ValueError("backbone_errors masks need a probe of the frozen backbone (probe)")

    def draw(
        self, batch: Mapping[str, Tensor], examples: Sequence[int], draws: int | Sequence[int]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """`(noisy_ids, masked, p_mask)` for a collated batch whose rows are dataset `examples`."""
        ids, prompts = batch["input_ids"], torch.as_tensor(batch["prompt_lengths"]).reshape(-1)
        ends = batch["attention_mask"].sum(-1) if "attention_mask" in batch else None
        margins = None
        if self.distribution.kind == "backbone_errors":
            margins = self._margins(ids, prompts, [int(e) for e in examples])
        return draw_training_masks(
            ids, prompts, self.mask_id, distribution=self.distribution, seed=self.seed, examples=examples,
            draws=draws, token_text=self.token_text, margins=margins, answer_ends=ends,
        )

    def state_dict(self) -> dict[str, Tensor]:
        """The probed margins by example (string keys, as checkpoints store them)."""
        return {str(example): values for example, values in self.margins.items()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        self.margins = {int(example): values for example, values in state.items()}

    def _margins(self, ids: Tensor, prompts: Tensor, examples: list[int]) -> Tensor:
        """[B, L] margins of the batch's rows (+inf on prompts), probing the rows not seen before."""
        new = [row for row, example in enumerate(examples) if example not in self.margins]
        if new and self.probe is not None:
            rows = torch.tensor(new)
            probed = self.probe(ids[rows], prompts[rows]).float().cpu()
            for index, row in enumerate(new):
                self.margins[examples[row]] = probed[index, int(prompts[row]) :].to(torch.float16)
        margins = torch.full(ids.shape, float("inf"))
        for row, example in enumerate(examples):
            start = int(prompts[row])
            values = self.margins[example][: ids.shape[1] - start]
            margins[row, start : start + values.shape[0]] = values.float()
        return margins


@torch.no_grad()
def probe_margins(
    logits_of: Callable[[Tensor], Tensor], input_ids: Tensor, prompt_lengths: Tensor, mask_id: int
) -> Tensor:
    """[B, L] float32 margins of the frozen backbone (`logits_of(noisy_ids)`) at every answer position, +inf
    at prompt positions: the right token's logit minus the largest other one (negative where it is wrong),
    teacher-forced in two passes (the even answer positions masked, then the odd ones)."""
    batch, length = input_ids.shape
    positions = torch.arange(length, device=input_ids.device)
    prompts = torch.as_tensor(prompt_lengths, device=input_ids.device).reshape(-1, 1)
    answer = positions[None, :] >= prompts
    margins = torch.full((batch, length), float("inf"), device=input_ids.device)
    for parity in (0, 1):
        probe = answer & ((positions[None, :] - prompts) % 2 == parity)
        noisy = torch.where(probe, torch.full_like(input_ids, mask_id), input_ids)
        logits = logits_of(noisy).float()
        right = logits.gather(-1, input_ids[..., None]).squeeze(-1)
        others = logits.scatter(-1, input_ids[..., None], float("-inf")).amax(-1)
        margins = torch.where(probe, right - others, margins)
    return margins
