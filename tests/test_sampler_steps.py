"""The sampler's per-step hook (`sample(..., on_step=...)`): what it reports, and that it changes nothing."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

from llada_trm.diffusion.options import SamplingOptions
from llada_trm.diffusion.sampler import sample
from llada_trm.diffusion.steps import StepEvent
from llada_trm.model import hybrid as halting_rules
from llada_trm.model.hybrid import LLaDATRMHybrid
from llada_trm.model.hybrid_config import HybridConfig
from llada_trm.model.llada import LLaDAModel
from llada_trm.model.llada_config import LLaDAConfig

VOCAB, MASK, PAD = 50, 49, 48
VARIANTS = {
    "exact": {},
    "threshold": {"threshold": 0.5},
    "prefix": {"cache": "prefix"},
    "dual": {"cache": "dual", "threshold": 0.5},
}


def _backbone() -> LLaDAModel:
    torch.manual_seed(0)
    config = LLaDAConfig(
        d_model=32, n_heads=4, n_layers=2, vocab_size=VOCAB, mlp_hidden_size=64, max_sequence_length=64,
        mask_token_id=MASK, eos_token_id=PAD, pad_token_id=PAD,
    )
    return LLaDAModel(config).eval()


def _hybrid(**kwargs: Any) -> LLaDATRMHybrid:
    settings = {"refiner": "slot", "chunk_size": 4, "slot": {"n_heads": 2, "n_blocks": 1}, **kwargs}
    model = LLaDATRMHybrid(_backbone(), HybridConfig(**settings)).eval()
    torch.manual_seed(8)
    with torch.no_grad():  # move the near-identity refiner so that refining changes something
        for p in model.refinement_head.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return model


def _prompt() -> tuple[Tensor, Tensor]:
    ids = torch.randint(0, PAD, (2, 7), generator=torch.Generator().manual_seed(3))
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :2] = 0
    ids[attention_mask == 0] = PAD
    return ids, attention_mask


def _run(model: Any, variant: str, on_step: Any = None, **extra: Any):
    settings = {"steps": 8, "gen_length": 16, "block_length": 8, "mask_id": MASK}
    settings.update(VARIANTS[variant], **extra)
    options = SamplingOptions(**settings)
    prompt, attention_mask = _prompt()
    generator = torch.Generator().manual_seed(1)
    return sample(model, prompt, attention_mask, options, generator=generator, on_step=on_step)


@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_callback_changes_nothing_and_sees_every_commit(variant: str, cfg_scale: float):
    model = _hybrid(confidence_threshold=0.9, halting="confidence", max_recursive_steps=3)
    events: list[StepEvent] = []
    plain = _run(model, variant, temperature=0.5, cfg_scale=cfg_scale)
    watched = _run(model, variant, events.append, temperature=0.5, cfg_scale=cfg_scale)
    assert torch.equal(watched.tokens, plain.tokens)
    assert watched.nfe == plain.nfe and watched.model_stats_total == plain.model_stats_total

    assert len(events) == plain.nfe  # one event per denoising step, i.e. per model call
    generated = plain.generated
    seen = torch.zeros_like(generated, dtype=torch.int64)
    for event in events:
        assert event.committed.shape == generated.shape == event.tokens.shape
        committed = event.committed
        real = committed & (event.tokens != MASK)  # a random model may "commit" the mask id: still masked
        seen += real.long()
        assert torch.equal(event.tokens[real], generated[real])
        assert torch.isfinite(event.confidence[committed]).all()
        assert torch.isnan(event.confidence[~committed]).all()
        block_of = torch.arange(16)[None, :].expand_as(committed) // 8
        assert (block_of[committed] <= event.block).all()  # nothing past the block (earlier leftover masks)
    assert (seen == (generated != MASK).long()).all()  # each answer token committed exactly once
    for block in (0, 1):
        steps = [e.step for e in events if e.block == block]
        assert steps == list(range(len(steps))) and steps
    first = events[0]
    positions = first.committed[0].nonzero()[:, 0].tolist()
    expected = [(p, int(first.tokens[0, p]), float(first.confidence[0, p])) for p in positions]
    assert first.commits(0) == expected


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_refined_chunks_are_those_holding_a_mask_of_the_block(variant: str):
    """Threshold 2 refines every chunk with a masked position of the current block, none other."""
    model = _hybrid(confidence_threshold=2.0, halting="none", max_recursive_steps=2)
    events: list[StepEvent] = []
    _run(model, variant, events.append)
    tokens_before = torch.full((2, 16), MASK)
    for event in events:
        assert event.chunk_size == 4 and event.chunks_refined is not None
        assert event.chunks_refined.shape == (2, 6)  # 7 prompt + 16 answer positions, chunks of 4
        assert not event.chunks_halted.any()  # no halting: every refined chunk ran all its steps
        masked = torch.zeros(2, 24, dtype=torch.bool)
        start = 7 + 8 * event.block
        masked[:, start : start + 8] = tokens_before[:, 8 * event.block : 8 * event.block + 8] == MASK
        expected = masked.view(2, 6, 4).any(dim=-1)
        assert torch.equal(event.chunks_refined, expected)
        tokens_before = event.tokens
    spans = events[0].chunk_spans("refined")
    assert spans == [(0, 1), (1, 5), (5, 9)]  # chunks 1-3: absolute 4..15, the answer starts at 7


def test_halted_chunks_are_the_refined_chunks_that_stopped_early(monkeypatch: pytest.MonkeyPatch):
    model = _hybrid(confidence_threshold=0.9, halting="confidence", max_recursive_steps=4)
    # A random refiner never gets confident: declare every refined chunk confident after its first step.
    def every_chunk_confident(lm_head, h, logits, probe, chunks, threshold):
        return torch.ones_like(probe[:, ::4]), 0

    monkeypatch.setattr(halting_rules, "confident_chunks", every_chunk_confident)
    events: list[StepEvent] = []
    result = _run(model, "exact", events.append)
    halted = torch.stack([e.chunks_halted for e in events])
    refined = torch.stack([e.chunks_refined for e in events])
    assert refined.any() and torch.equal(halted, refined)
    assert int(halted.sum()) == int(result.model_stats_total["chunks_halted"])


def test_a_plain_backbone_reports_no_chunks():
    events: list[StepEvent] = []
    _run(_backbone(), "threshold", events.append)
    assert events and all(e.chunks_refined is None and e.chunk_size is None for e in events)
    assert events[0].chunk_spans() == []
