"""Forward process and masked-diffusion loss against LLaDA's equations, computed by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llada_trm.diffusion.forward_process import (
    forward_process,
    masked_diffusion_loss,
    masked_token_accuracy,
)

MASK = 9
IDS = torch.zeros(2, 3, dtype=torch.long)


def _hand_case() -> tuple[torch.Tensor, ...]:
    """Two rows, vocabulary of 3, logits chosen so that every probability is a simple fraction.

    Row 0: prompt length 1, answer length 2, positions 1 and 2 masked, p_mask 0.5.
        position 1: logits log(1, 1, 2) -> p = (1/4, 1/4, 1/2), target 2 -> CE = log 2
        position 2: same logits,                               target 0 -> CE = log 4
        row loss = (log 2 / 0.5 + log 4 / 0.5) / 2 = 3 log 2
    Row 1: prompt length 2, answer length 1, position 2 masked, p_mask 0.25.
        position 2: uniform logits -> CE = log 3; row loss = log 3 / 0.25 / 1 = 4 log 3
    """
    skewed = [0.0, 0.0, math.log(2.0)]
    uniform = [0.0, 0.0, 0.0]
    logits = torch.tensor(
        [
            [[5.0, -1.0, 2.0], skewed, skewed],  # position 0 is prompt: its logits must not matter
            [[3.0, 1.0, -4.0], [0.5, 7.0, 1.0], uniform],  # positions 0, 1 are prompt
        ]
    )
    targets = torch.tensor([[1, 2, 0], [0, 1, 1]])
    masked = torch.tensor([[False, True, True], [False, False, True]])
    p_mask = torch.tensor([[0.5] * 3, [0.25] * 3])
    answer_lengths = torch.tensor([2, 1])
    return logits, targets, masked, p_mask, answer_lengths


def test_loss_matches_hand_computation() -> None:
    logits, targets, masked, p_mask, answer_lengths = _hand_case()
    row_losses = [3 * math.log(2.0), 4 * math.log(3.0)]
    loss = masked_diffusion_loss(logits, targets, masked, p_mask, answer_lengths)
    assert loss.item() == pytest.approx(sum(row_losses) / 2, rel=1e-6)

    per_row = masked_diffusion_loss(logits, targets, masked, p_mask, answer_lengths, reduction="none")
    assert per_row.tolist() == pytest.approx(row_losses, rel=1e-6)
    total = masked_diffusion_loss(logits, targets, masked, p_mask, answer_lengths, reduction="sum")
    assert total.item() == pytest.approx(sum(row_losses), rel=1e-6)


def test_token_weights_scale_each_positions_term() -> None:
    logits, targets, masked, p_mask, answer_lengths = _hand_case()
    ones = torch.ones(targets.shape)
    plain = masked_diffusion_loss(logits, targets, masked, p_mask, answer_lengths, reduction="none")
    same = masked_diffusion_loss(logits, targets, masked, p_mask, answer_lengths, "none", token_weights=ones)
    assert torch.equal(plain, same)
    weights = torch.tensor([[9.0, 1.0, 3.0], [9.0, 9.0, 2.0]])  # the 9s sit on unmasked positions
    per_row = masked_diffusion_loss(logits, targets, masked, p_mask, answer_lengths, "none",
                                    token_weights=weights)  # fmt: skip
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    expected = (ce * masked * weights / p_mask).sum(1) / answer_lengths
    assert per_row.tolist() == pytest.approx(expected.tolist(), rel=1e-6)
    with pytest.raises(ValueError, match=r"token_weights must be \[B, L\] = \[2, 3\]"):
        masked_diffusion_loss(logits, targets, masked, p_mask, answer_lengths, token_weights=ones[:, :2])


def test_loss_accepts_per_row_p_mask_and_column_answer_lengths() -> None:
    logits, targets, masked, p_mask, answer_lengths = _hand_case()
    expected = masked_diffusion_loss(logits, targets, masked, p_mask, answer_lengths)
    other = masked_diffusion_loss(logits, targets, masked, p_mask[:, 0], answer_lengths[:, None])
    assert torch.equal(expected, other)


def test_unmasked_positions_get_no_gradient() -> None:
    logits, targets, masked, p_mask, answer_lengths = _hand_case()
    logits.requires_grad_(True)
    masked_diffusion_loss(logits, targets, masked, p_mask, answer_lengths).backward()
    assert (logits.grad[~masked] == 0).all()
    assert (logits.grad[masked].abs().sum(-1) > 0).all()


def test_loss_is_zero_with_a_gradient_when_nothing_is_masked() -> None:
    logits = torch.randn(2, 4, 5, requires_grad=True)
    masked = torch.zeros(2, 4, dtype=torch.bool)
    loss = masked_diffusion_loss(logits, torch.zeros(2, 4, dtype=torch.long), masked, torch.ones(2, 4), 4)
    assert loss.item() == 0.0
    loss.backward()  # a graph exists, so a data-parallel step with an unlucky draw still works


def test_pretraining_flavour_equals_llada_pretraining_normalisation() -> None:
    """With no prompt, answer length = L and the loss is sum(CE / p_mask) / (B * L)."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 8, (3, 6), generator=generator)
    noisy, masked, p_mask = forward_process(input_ids, None, MASK, generator=generator)
    logits = torch.randn(3, 6, 10, generator=generator)
    answer_lengths = torch.full((3,), 6)  # no prompt: the whole sequence

    ce = F.cross_entropy(logits.reshape(-1, 10), input_ids.reshape(-1), reduction="none").reshape(3, 6)
    expected = (ce / p_mask * masked).sum() / (3 * 6)
    loss = masked_diffusion_loss(logits, input_ids, masked, p_mask, answer_lengths)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_forward_process_draws_t_then_token_uniforms_like_llada() -> None:
    input_ids = torch.arange(40).reshape(4, 10) % 8
    prompt_lengths = torch.tensor([0, 3, 5, 10])
    eps = 1e-3
    noisy, masked, p_mask = forward_process(
        input_ids, prompt_lengths, MASK, eps=eps, generator=torch.Generator().manual_seed(123)
    )

    replay = torch.Generator().manual_seed(123)
    t = torch.rand(4, generator=replay)
    uniforms = torch.rand(4, 10, generator=replay)
    expected_p = ((1 - eps) * t + eps)[:, None].expand(4, 10)
    after_prompt = torch.arange(10)[None, :] >= prompt_lengths[:, None]
    expected_masked = (uniforms < expected_p) & after_prompt

    assert torch.allclose(p_mask, expected_p)
    assert torch.equal(masked, expected_masked)
    assert torch.equal(noisy, torch.where(expected_masked, torch.tensor(MASK), input_ids))
    assert not masked[3].any()  # a row that is all prompt is never noised


def test_forward_process_with_fixed_t() -> None:
    input_ids = torch.zeros(2, 2000, dtype=torch.long)
    prompt_lengths = torch.tensor([1000, 0])
    t = torch.tensor([1.0, 0.5])
    generator = torch.Generator().manual_seed(0)
    noisy, masked, p_mask = forward_process(input_ids, prompt_lengths, MASK, t=t, generator=generator)
    assert masked[0, 1000:].all() and not masked[0, :1000].any()  # t = 1 masks the whole answer
    assert p_mask[1, 0].item() == pytest.approx(0.999 * 0.5 + 0.001)
    assert 0.45 < masked[1].float().mean().item() < 0.55
    assert (noisy[masked] == MASK).all() and (noisy[~masked] == 0).all()


def test_masked_token_accuracy() -> None:
    logits = torch.zeros(1, 4, 3)
    logits[0, torch.arange(4), torch.tensor([0, 1, 2, 2])] = 1.0
    targets = torch.tensor([[0, 1, 0, 0]])
    masked = torch.tensor([[True, False, True, False]])
    assert masked_token_accuracy(logits, targets, masked).item() == pytest.approx(0.5)
    assert masked_token_accuracy(logits, targets, torch.zeros_like(masked)).item() == 0.0


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: forward_process(torch.zeros(4, dtype=torch.long), None, MASK), "input_ids must be"),
        (lambda: forward_process(IDS, torch.tensor([1]), MASK), "prompt_lengths"),
        (lambda: forward_process(IDS, None, MASK, t=torch.tensor([2.0, 0.1])), "t must"),
        (lambda: masked_diffusion_loss(*_hand_case(), reduction="avg"), "reduction"),
        (lambda: masked_diffusion_loss(*_hand_case()[:4], torch.tensor([1, 2, 3])), "answer_lengths"),
    ],
)
def test_bad_input_raises_clear_errors(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()
