"""The sampler's `digit_order: lsd_first`: it changes only the order of commits, least significant first."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from llada_trm.diffusion.options import SamplingOptions
from llada_trm.diffusion.sampler import sample

VOCAB, MASK, EOS = 64, 63, 62
DIGITS = tuple(range(20, 30))  # token 20 + d writes the digit d
PLUS, EQUALS, SPACE = 40, 41, 42
PROMPT = [50, 51, 52]


def _encode(text: str) -> list[int]:
    other = {"+": PLUS, "=": EQUALS, " ": SPACE}
    return [DIGITS[int(ch)] if ch.isdigit() else other[ch] for ch in text]


# 24 answer tokens, two blocks of 12; "4057" runs across the block boundary (positions 10-13)
ANSWER = _encode("4817+2795=4057 1=99 1234")


class ScriptedModel(nn.Module):
    """Predicts ANSWER at every answer position whatever the context, each with its own fixed confidence
    (seeded strengths, so the confidence order is no digit order); records every input it is given."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.targets = torch.tensor(PROMPT + ANSWER)
        self.strength = 1.0 + 4.0 * torch.rand(len(self.targets), generator=generator)
        self.seen: list[Tensor] = []

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        self.seen.append(input_ids.clone())
        batch, length = input_ids.shape
        logits = torch.zeros(batch, length, VOCAB)
        logits[:, torch.arange(length), self.targets[:length]] = self.strength[:length]
        return logits


def _run(seed: int, **settings) -> tuple[Tensor, list[int], list[int]]:
    """(answer tokens, the step each answer position was committed at, commits per step)."""
    model = ScriptedModel(seed)
    options = SamplingOptions(gen_length=24, block_length=12, mask_id=MASK, eos_id=EOS, digit_ids=DIGITS,
                              **settings)  # fmt: skip
    result = sample(model, torch.tensor([PROMPT]), None, options)
    states = [*model.seen, result.tokens]
    committed_at = [-1] * 24
    per_step = []
    for step, (before, after) in enumerate(zip(states[:-1], states[1:], strict=True)):
        new = ((before[0] == MASK) & (after[0] != MASK))[len(PROMPT) :]
        per_step.append(int(new.sum()))
        for position in torch.nonzero(new).flatten().tolist():
            committed_at[position] = step
    return result.generated[0], committed_at, per_step


def _order_violations(committed_at: list[int]) -> list[int]:
    """Positions p committed strictly before p + 1 where both are digits of one number in one block."""
    return [
        p for p in range(23)
        if ANSWER[p] in DIGITS and ANSWER[p + 1] in DIGITS and p // 12 == (p + 1) // 12
        and committed_at[p] < committed_at[p + 1]
    ]  # fmt: skip


@pytest.mark.parametrize(
    "settings",
    [{"steps": 12}, {"steps": 24}, {"steps": 2}, {"steps": 12, "threshold": 0.05},
     {"steps": 12, "threshold": 0.5}],  # fmt: skip
    ids=["exact-2-per-step", "exact-1-per-step", "exact-12-per-step", "threshold-low", "threshold-high"],
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lsd_first_changes_only_the_order_of_commits(settings: dict, seed: int) -> None:
    tokens, default_at, default_steps = _run(seed, **settings)
    lsd_tokens, lsd_at, lsd_steps = _run(seed, digit_order="lsd_first", **settings)
    assert tokens.tolist() == ANSWER
    assert torch.equal(lsd_tokens, tokens)  # the same tokens...
    assert min(lsd_at) >= 0  # ...every position committed...
    assert not _order_violations(lsd_at)  # ...each number's digits least significant first
    if "threshold" not in settings:
        assert lsd_steps == default_steps  # the fixed schedule's count per step is kept


def test_the_default_order_is_not_already_lsd_first() -> None:
    """The scripted confidences commit some digit before its right neighbour under the default order, so the
    order test above can fail."""
    assert any(_order_violations(_run(seed, steps=12)[1]) for seed in (0, 1, 2))


def test_lsd_first_without_digit_ids_is_one_clear_error() -> None:
    options = SamplingOptions(steps=12, gen_length=24, block_length=12, mask_id=MASK, eos_id=EOS,
                              digit_order="lsd_first")  # fmt: skip
    with pytest.raises(ValueError, match="needs digit_ids"):
        sample(ScriptedModel(0), torch.tensor([PROMPT]), None, options)


def test_unknown_digit_order_is_refused_and_the_default_is_not_recorded() -> None:
    with pytest.raises(ValueError, match="digit_order must be one of confidence, lsd_first"):
        SamplingOptions(digit_order="msd")
    assert "digit_order" not in SamplingOptions().to_dict()
    recorded = SamplingOptions(digit_order="lsd_first", digit_ids=DIGITS).to_dict()
    assert recorded["digit_order"] == "lsd_first" and "digit_ids" not in recorded
