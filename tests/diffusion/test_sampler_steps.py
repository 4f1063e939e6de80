"""The sampler's per-step hook (`sample(..., on_step=...)`): what it reports, and that it changes nothing."""

from __future__ import annotations

import pytest
import torch
from tiny_assets import TOY_MASK, TOY_VARIANTS, toy_backbone, toy_hybrid, toy_sample

from llada_trm.diffusion.sampler import StepEvent
from llada_trm.model import hybrid as halting_rules


@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
@pytest.mark.parametrize("variant", list(TOY_VARIANTS))
def test_a_callback_changes_nothing_and_sees_every_commit(variant: str, cfg_scale: float):
    model = toy_hybrid(confidence_threshold=0.9, halting="confidence", max_recursive_steps=3)
    events: list[StepEvent] = []
    plain = toy_sample(model, variant, temperature=0.5, cfg_scale=cfg_scale)
    watched = toy_sample(model, variant, events.append, temperature=0.5, cfg_scale=cfg_scale)
    assert torch.equal(watched.tokens, plain.tokens)
    assert watched.nfe == plain.nfe and watched.model_stats_total == plain.model_stats_total

    assert len(events) == plain.nfe  # one event per denoising step, i.e. per model call
    generated = plain.generated
    seen = torch.zeros_like(generated, dtype=torch.int64)
    for event in events:
        assert event.committed.shape == generated.shape == event.tokens.shape
        committed = event.committed
        real = committed & (event.tokens != TOY_MASK)  # a random model may "commit" the mask id: still masked
        seen += real.long()
        assert torch.equal(event.tokens[real], generated[real])
        assert torch.isfinite(event.confidence[committed]).all()
        assert torch.isnan(event.confidence[~committed]).all()
        block_of = torch.arange(16)[None, :].expand_as(committed) // 8
        assert (block_of[committed] <= event.block).all()  # nothing past the block (earlier leftover masks)
    assert (seen == (generated != TOY_MASK).long()).all()  # each answer token committed exactly once
    for block in (0, 1):
        steps = [e.step for e in events if e.block == block]
        assert steps == list(range(len(steps))) and steps
    first = events[0]
    positions = first.committed[0].nonzero()[:, 0].tolist()
    expected = [(p, int(first.tokens[0, p]), float(first.confidence[0, p])) for p in positions]
    assert first.commits(0) == expected


@pytest.mark.parametrize("variant", list(TOY_VARIANTS))
def test_the_refined_chunks_are_those_holding_a_mask_of_the_block(variant: str):
    """Threshold 2 refines every chunk with a masked position of the current block, none other."""
    model = toy_hybrid(confidence_threshold=2.0, halting="none", max_recursive_steps=2)
    events: list[StepEvent] = []
    toy_sample(model, variant, events.append)
    tokens_before = torch.full((2, 16), TOY_MASK)
    for event in events:
        assert event.chunk_size == 4 and event.chunks_refined is not None
        assert event.chunks_refined.shape == (2, 6)  # 7 prompt + 16 answer positions, chunks of 4
        assert not event.chunks_halted.any()  # no halting: every refined chunk ran all its steps
        masked = torch.zeros(2, 24, dtype=torch.bool)
        start = 7 + 8 * event.block
        masked[:, start : start + 8] = tokens_before[:, 8 * event.block : 8 * event.block + 8] == TOY_MASK
        expected = masked.view(2, 6, 4).any(dim=-1)
        assert torch.equal(event.chunks_refined, expected)
        tokens_before = event.tokens
    spans = events[0].chunk_spans("refined")
    assert spans == [(0, 1), (1, 5), (5, 9)]  # chunks 1-3: absolute 4..15, the answer starts at 7


def test_halted_chunks_are_the_refined_chunks_that_stopped_early(monkeypatch: pytest.MonkeyPatch):
    model = toy_hybrid(confidence_threshold=0.9, halting="confidence", max_recursive_steps=4)
    # A random refiner never gets confident: declare every refined chunk confident after its first step.
    def every_chunk_confident(lm_head, h, logits, probe, chunks, threshold):
        return torch.ones_like(probe[:, ::4]), 0

    monkeypatch.setattr(halting_rules, "confident_chunks", every_chunk_confident)
    events: list[StepEvent] = []
    result = toy_sample(model, "exact", events.append)
    halted = torch.stack([e.chunks_halted for e in events])
    refined = torch.stack([e.chunks_refined for e in events])
    assert refined.any() and torch.equal(halted, refined)
    assert int(halted.sum()) == int(result.model_stats_total["chunks_halted"])


def test_a_plain_backbone_reports_no_chunks():
    events: list[StepEvent] = []
    toy_sample(toy_backbone(), "threshold", events.append)
    assert events and all(e.chunks_refined is None and e.chunk_size is None for e in events)
    assert events[0].chunk_spans() == []
