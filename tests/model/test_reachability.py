"""The update budget against the LM head (`model.reachability`), checked by brute force on tiny heads."""

from __future__ import annotations

import itertools

import pytest
import torch

from llada_trm.model.reachability import (
    reachable_fraction,
    required_bounds,
    smallest_sufficient_scale,
    step_bound,
)


def brute_force_flips(weight: torch.Tensor, h: torch.Tensor, target: int, bound: float, grid: int = 81
                      ) -> bool:  # fmt: skip
    """Whether some delta with |delta_i| <= bound makes `target` the argmax of weight @ (h + delta)."""
    axis = torch.linspace(-bound, bound, grid)
    for point in itertools.product(axis.tolist(), repeat=weight.shape[1]):
        logits = weight @ (h + torch.tensor(point))
        if int(logits.argmax()) == target:
            return True
    return False


def test_two_tokens_agree_with_brute_force_exactly():
    # With two tokens the pairwise condition is exact: reachable iff the bound exceeds the required bound.
    generator = torch.Generator().manual_seed(0)
    agree = 0
    for _ in range(40):
        weight = torch.randn(2, 2, generator=generator)
        h = torch.randn(2, generator=generator)
        logits = weight @ h
        target = int(logits.argmin())  # the backbone is wrong
        need = float(required_bounds(logits[None], torch.tensor([target]), weight.__getitem__)[0])
        for bound in (0.5 * need, 1.5 * need):  # clearly below and clearly above the required bound
            assert brute_force_flips(weight, h, target, bound) == (bound > need)
            agree += 1
    assert agree == 80


def test_more_tokens_the_bound_is_necessary():
    # With several competitors every pairwise condition is necessary: a flip found by brute force always lies
    # within the bound, and a budget below the required bound never flips.
    generator = torch.Generator().manual_seed(1)
    for _ in range(25):
        weight = torch.randn(4, 2, generator=generator)
        h = torch.randn(2, generator=generator)
        logits = weight @ h
        target = int(logits.argsort()[1])  # second from the bottom: wrong, with competitors above it
        need = float(required_bounds(logits[None], torch.tensor([target]), weight.__getitem__)[0])
        assert not brute_force_flips(weight, h, target, 0.95 * need)
        top = int(logits.argmax())
        gap = float(logits[top] - logits[target])
        assert need >= gap / float((weight[target] - weight[top]).abs().sum()) - 1e-6  # the formula


def test_far_competitors_use_a_bound_that_only_lowers_the_requirement():
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(50, 3, generator=generator)
    logits = weight @ torch.randn(3, generator=generator)
    target = torch.tensor([int(logits.argmin())])
    exact = required_bounds(logits[None], target, lambda ids: weight[ids], exact=100)
    loose = required_bounds(logits[None], target, lambda ids: weight[ids], exact=2)
    assert float(loose[0]) <= float(exact[0]) + 1e-6
    right = required_bounds(logits[None], torch.tensor([int(logits.argmax())]), lambda ids: weight[ids])
    assert float(right[0]) == 0.0  # already the argmax: nothing to flip


def test_fractions_and_the_suggested_scale():
    required = torch.tensor([0.01, 0.05, 0.2, 0.4, 1.0])
    assert reachable_fraction(required, 0.1) == pytest.approx(0.4)
    none = reachable_fraction(torch.zeros(0), 1.0)
    assert none != none  # NaN: no wrong token to flip
    assert step_bound(0.5, 0.5) == 0.25
    # K = 4, clamp 0.5: 4 * 0.5 * s must exceed 0.4 for 4 of 5 (80%) and 1.0 for all five (>= 90%)
    assert smallest_sufficient_scale(required, 4, 0.5, [0.1, 0.3, 0.6, 1.0]) == 0.6
    assert smallest_sufficient_scale(required, 1, 0.5, [0.1]) is None


def test_lm_head_rows_give_the_logits():
    from llada_trm.model.llada import LLaDAModel
    from llada_trm.model.llada_config import LLaDAConfig

    for tying, scale in ((True, False), (False, True)):
        config = LLaDAConfig(d_model=16, n_heads=2, n_layers=1, mlp_hidden_size=32, vocab_size=40,
                             embedding_size=40, max_sequence_length=32, weight_tying=tying,
                             scale_logits=scale)  # fmt: skip
        model = LLaDAModel(config)
        h = torch.randn(3, 16)
        ids = torch.tensor([0, 7, 39])
        logits = model.lm_head(h)
        bias = 0.0 if tying or model.transformer.ff_out.bias is None else model.transformer.ff_out.bias[ids]
        assert torch.allclose(logits[:, ids], h @ model.lm_head_rows(ids).T + bias, atol=1e-5)
