"""TRM's carry across denoising steps (`refiners.base.RefinerCarry`,
`HybridConfig.denoising_carry`, the unroll).

On the tiny backbone v1 (experiments/tiny_backbone_v1, the embedded default when the fixture was sampled;
unsure enough that the 0.9 threshold refines chunks in consecutive calls, which the carry needs) with a slot
refiner whose weights are perturbed so that it visibly moves the states.
`tests/fixtures/carry_off_tokens.json` holds the tokens main's code (before the carry existed) sampled for
every sampler variant; regenerate it with `python tests/test_carry.py` only on purpose.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from llada_trm.config import RunConfig, fixed_settings, parse_config
from llada_trm.data import SFTDataset, SyntheticTaskConfig, generate_problems, load_tokenizer, prompt_batch
from llada_trm.diffusion.forward_process import forward_process, masked_diffusion_loss
from llada_trm.diffusion.options import SamplingOptions
from llada_trm.diffusion.sampler import generate_with_stats
from llada_trm.errors import ConfigError
from llada_trm.evaluate.evaluator import answer_questions
from llada_trm.hybrid.config import HybridConfig
from llada_trm.hybrid.model import LLaDATRMHybrid
from llada_trm.refiners.base import RefinerCarry
from llada_trm.refiners.slot import SlotTRMRefiner
from llada_trm.training.objective import (
    DenoisingUnroll,
    LossWeights,
    diffusion_objective,
    next_state,
    unrolled_states,
)

FIXTURE = Path(__file__).parent / "fixtures" / "carry_off_tokens.json"
BACKBONE = Path(__file__).resolve().parents[1] / "experiments" / "tiny_backbone_v1"  # the fixture's
VARIANTS: dict[str, dict[str, Any]] = {
    "llada": {},
    "threshold": {"threshold": 0.5},
    "prefix": {"cache": "prefix"},
    "dual": {"cache": "dual"},
    "prefix_threshold": {"cache": "prefix", "threshold": 0.5},
    "dual_threshold": {"cache": "dual", "threshold": 0.5},
    "cfg": {"cfg_scale": 1.0},
}
SAMPLING = {"steps": 8, "gen_length": 16, "block_length": 8}
MASK = 2  # the tiny backbones' mask id


def build(**config: Any) -> LLaDATRMHybrid:
    """Backbone v1 with a 2-step slot refiner on 4-position chunks, weights perturbed (seeded)."""
    settings = {
        "refiner": "slot", "max_recursive_steps": 2, "chunk_size": 4, "confidence_threshold": 0.9,
        "slot": {"n_heads": 4, "n_blocks": 1}, **config,
    }
    torch.manual_seed(0)
    model = LLaDATRMHybrid.from_pretrained(BACKBONE, HybridConfig(**settings)).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.refinement_head.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def prompt() -> tuple[Tensor, Tensor]:
    """Two generated-task questions in the chat template, left-padded (the embedded backbone's own task)."""
    tokenizer = load_tokenizer(BACKBONE)
    records = generate_problems(SyntheticTaskConfig(max_steps=2, max_number=12), 2, "test")
    return prompt_batch(tokenizer, [r.question for r in records])


def sample_tokens(model: LLaDATRMHybrid, variant: str) -> Tensor:
    ids, attention_mask = prompt()
    return generate_with_stats(model, ids, attention_mask, **SAMPLING, **VARIANTS[variant]).generated


def zero_carry_contribution(model: LLaDATRMHybrid) -> None:
    """W_refine reads the change u - sg(u_prev): zeroed, u_prev (hence the carry) changes nothing."""
    with torch.no_grad():
        model.refinement_head["slot"].slot_proj.W_refine.weight.zero_()


class ResumeSpy:
    """Records what each `resume_state` call got: (window length, latent, valid)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[int, Tensor, Tensor]] = []
        original = SlotTRMRefiner.resume_state

        def spy(refiner: SlotTRMRefiner, x: Tensor, latent: Tensor, valid: Tensor) -> Any:
            self.calls.append((x.shape[1], latent.clone(), valid.clone()))
            return original(refiner, x, latent, valid)

        monkeypatch.setattr(SlotTRMRefiner, "resume_state", spy)


# ------------------------------------------------------------------------------------------ the object


def test_carry_is_indexed_by_absolute_position_and_reset_drops_only_the_given_positions():
    carry = RefinerCarry()
    assert carry.read("slot", 0, 8, batch=2) is None  # empty: nothing to resume from
    latent = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2)
    where = torch.tensor([[True, False, True], [True, True, True]])
    carry.write("slot", 4, latent, where)  # a window at absolute positions 4..6
    read = carry.read("slot", 5, 4, batch=2)  # another window, 5..8 (past the storage: nothing there)
    assert read is not None
    got, valid = read
    assert valid.tolist() == [[False, True, False, False], [True, True, False, False]]
    assert torch.equal(got[1, :2], latent[1, 1:])
    assert carry.read("slot", 0, 4, batch=2) is None  # no latent before position 4
    drop = torch.zeros(2, 8, dtype=torch.bool)
    drop[1, 5] = True
    carry.reset(drop)
    assert carry.held("slot")[1].tolist() == [False] * 4 + [True, False, True]
    assert carry.held("slot")[0].tolist() == [False] * 4 + [True, False, True]
    assert float(carry.latents["slot"][1, 5].abs().sum()) == 0.0
    with pytest.raises(ValueError, match="batch of 2 rows"):
        carry.read("slot", 0, 4, batch=4)


# ------------------------------------------------------------------------------------------ sampling


@pytest.fixture(scope="module")
def main_tokens() -> dict[str, list]:
    return json.loads(FIXTURE.read_text())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_carry_off_samples_exactly_what_main_sampled(variant: str, main_tokens: dict, monkeypatch) -> None:
    model = build()
    assert model.new_carry() is None
    seen: list[dict] = []
    original = LLaDATRMHybrid.forward

    def forward(self: LLaDATRMHybrid, *args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LLaDATRMHybrid, "forward", forward)
    assert sample_tokens(model, variant).tolist() == main_tokens[variant]
    assert seen and not any("carry" in kwargs for kwargs in seen)  # the call itself is main's


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_carry_with_its_contribution_zeroed_samples_what_carry_off_does(variant: str, monkeypatch) -> None:
    off, on = build(), build(denoising_carry=True)
    zero_carry_contribution(off)
    zero_carry_contribution(on)
    spy = ResumeSpy(monkeypatch)
    assert torch.equal(sample_tokens(on, variant), sample_tokens(off, variant))
    assert any(bool(valid.any()) for _, _, valid in spy.calls)  # the carry was there, and resumed from


def test_the_carry_changes_what_the_refiner_computes():
    """Not vacuous: with its W_refine intact, a resumed first step moves the states differently."""
    model = build(denoising_carry=True, confidence_threshold=2.0)
    ids, attention_mask = prompt()
    ids = torch.cat([ids, torch.full((2, 8), MASK)], dim=1)
    attention_mask = torch.cat([attention_mask, torch.ones(2, 8, dtype=attention_mask.dtype)], dim=1)
    carry = model.new_carry()
    with torch.no_grad():
        first = model(ids, attention_mask, carry=carry)
        second = model(ids, attention_mask, carry=carry)
    assert torch.equal(first.hidden_states, model(ids, attention_mask).hidden_states)  # nothing carried yet
    assert not torch.equal(second.hidden_states, first.hidden_states)


def test_the_carry_survives_a_dual_cache_window_shift(monkeypatch):
    """A full call (window at 0) then a dual-cache call on the block (window at `start`): the windowed call
    resumes each still-masked position from the latent the full call left at its absolute position."""
    model = build(denoising_carry=True, confidence_threshold=2.0)
    ids, attention_mask = prompt()
    start = ids.shape[1]
    ids = torch.cat([ids, torch.full((2, 8), MASK)], dim=1)
    attention_mask = torch.cat([attention_mask, torch.ones(2, 8, dtype=attention_mask.dtype)], dim=1)
    carry = model.new_carry()
    with torch.no_grad():
        full = model(ids, attention_mask, use_cache=True, carry=carry)
        kept = carry.latents["slot"].clone()
        assert carry.held("slot")[:, start:].all() and not carry.held("slot")[:, :start].any()
        ids[:, start + 1] = 7  # commit one position of the block
        spy = ResumeSpy(monkeypatch)
        window = ids[:, start:]
        cache = full.past_key_values
        with_carry = model(window, attention_mask[:, start:], past_key_values=cache, cache_position=start,
                           carry=carry)
        without = model(window, attention_mask[:, start:], past_key_values=cache, cache_position=start)
    (length, latent, valid), = spy.calls
    assert length == 8
    expected = torch.ones(2, 8, dtype=torch.bool)
    expected[:, 1] = False  # the committed position drops its latent before it could be read
    assert torch.equal(valid, expected)
    assert torch.equal(latent[valid], kept[:, start:][valid])  # re-indexed by absolute position
    assert not carry.held("slot")[:, start + 1].any()
    assert not torch.equal(with_carry.hidden_states, without.hidden_states)


def test_chunks_not_refined_keep_their_latent_and_committed_positions_drop_theirs():
    model = build(denoising_carry=True, confidence_threshold=2.0)
    ids, attention_mask = prompt()
    length = ids.shape[1]
    ids = torch.cat([ids, torch.full((2, 8), MASK)], dim=1)
    attention_mask = torch.cat([attention_mask, torch.ones(2, 8, dtype=attention_mask.dtype)], dim=1)
    carry = model.new_carry()
    with torch.no_grad():
        model(ids, attention_mask, carry=carry)
        held, latents = carry.held("slot").clone(), carry.latents["slot"].clone()
        model.config = model.config.model_copy(update={"confidence_threshold": 0.0})  # refine nothing
        ids[:, length] = 7
        out = model(ids, attention_mask, carry=carry)
    assert out.stats["chunks_refined"] == 0
    dropped = torch.zeros_like(held)
    dropped[:, length] = True
    assert torch.equal(carry.held("slot"), held & ~dropped)
    assert torch.equal(carry.latents["slot"][~dropped], latents[~dropped])


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_sampling_with_a_carry_never_resumes_a_committed_position(cache: str, monkeypatch) -> None:
    """Through the sampler: each call resumes only positions still masked in its window, though committed
    positions held a latent before the call (they were refined while masked), and some calls do resume."""
    model = build(denoising_carry=True, confidence_threshold=2.0)
    spy = ResumeSpy(monkeypatch)
    resumed, stale = 0, 0
    original = LLaDATRMHybrid.refine

    def refine(self: LLaDATRMHybrid, features: Any, masked: Any = None, **kwargs: Any) -> Any:
        nonlocal resumed, stale
        held = kwargs["carry"].held("slot")
        offset, window = features.position_offset, features.masked
        if held is not None:
            seen = held[:, offset : offset + window.shape[1]]
            stale += int((seen & ~window[:, : seen.shape[1]]).sum())
        before = len(spy.calls)
        out = original(self, features, masked, **kwargs)
        for _, _, valid in spy.calls[before:]:  # what this call resumed from
            assert not (valid & ~window).any()
            resumed += int(valid.sum())
        return out

    monkeypatch.setattr(LLaDATRMHybrid, "refine", refine)
    ids, attention_mask = prompt()
    generate_with_stats(model, ids, attention_mask, cache=cache, **SAMPLING)
    assert resumed > 0
    assert stale > 0  # committed positions did hold a latent when their call began


def test_evaluation_samples_with_the_carry(monkeypatch):
    """The evaluator's wrapper passes the model's carry factory on: answers are sampled with the carry."""
    model = build(denoising_carry=True, confidence_threshold=2.0)
    spy = ResumeSpy(monkeypatch)
    questions = [r.question for r in generate_problems(SyntheticTaskConfig(max_steps=2), 2, "test")]
    answer_questions(model, load_tokenizer(BACKBONE), questions, SamplingOptions(**SAMPLING))
    assert any(bool(valid.any()) for _, _, valid in spy.calls)


# ------------------------------------------------------------------------------------------ training


def unroll_batch() -> dict[str, Tensor]:
    tokenizer = load_tokenizer(BACKBONE)
    records = generate_problems(SyntheticTaskConfig(max_steps=2, max_number=12), 2, "train")
    dataset = SFTDataset(tokenizer, records, max_length=128)
    return dataset.collate([dataset[0], dataset[1]])


def test_next_state_commits_the_most_confident_masked_positions_to_their_targets():
    targets = torch.tensor([[10, 11, 12, 13, 14]])
    noisy = torch.tensor([[10, MASK, MASK, MASK, MASK]])
    masked = noisy == MASK
    logits = torch.zeros(1, 5, 20)
    logits[0, 1, 3], logits[0, 2, 4], logits[0, 3, 5], logits[0, 4, 6] = 1.0, 5.0, 3.0, 0.5
    noisy2, masked2, p2 = next_state(logits, targets, (noisy, masked, torch.full((1, 5), 0.8)), 0.5)
    assert noisy2.tolist() == [[10, MASK, 12, 13, MASK]]  # the two most confident (5.0, 3.0)
    assert masked2.tolist() == [[False, True, False, False, True]]
    assert torch.allclose(p2, torch.full((1, 5), 0.4))


def frozen_training_model() -> LLaDATRMHybrid:
    model = build(denoising_carry=True, confidence_threshold=2.0)
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    return model


def test_training_with_the_unroll_runs_and_gives_gradients_to_the_refiner():
    model = frozen_training_model().train()
    batch = unroll_batch()
    weights = LossWeights()
    result = diffusion_objective(
        model, batch, mask_id=MASK, weights=weights, backbone_frozen=True, chunk_size=4,
        unroll=DenoisingUnroll(steps=3, fraction=0.5),
        noise=forward_process(batch["input_ids"], batch["prompt_lengths"], MASK, t=torch.tensor([0.9, 0.9])),
    )
    assert torch.isfinite(result.loss)
    result.loss.backward()
    grads = [p.grad for p in model.refinement_head.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    w_refine = model.refinement_head["slot"].slot_proj.W_refine.weight.grad
    assert float(w_refine.abs().sum()) > 0  # the carried change reaches the refinement slot
    assert (result.masked.sum(dim=1) < (batch["input_ids"] != MASK).sum(dim=1)).all()


def test_no_gradient_crosses_a_denoising_step():
    """The last step's loss has the gradient it has with the earlier steps run without autograd."""
    model = frozen_training_model()
    batch = unroll_batch()
    noise = forward_process(batch["input_ids"], batch["prompt_lengths"], MASK, t=torch.tensor([0.9, 0.9]))
    unroll = DenoisingUnroll(steps=2, fraction=0.5)

    def forward(noisy: Tensor, masked: Tensor, carry: RefinerCarry | None) -> Any:
        return model(noisy, masked=masked, carry=carry, return_step_logits=True)

    def last_loss(output: Any, masked: Tensor, p_mask: Tensor) -> Tensor:
        targets, lengths = batch["input_ids"], batch["answer_lengths"]
        return masked_diffusion_loss(output.logits, targets, masked, p_mask, lengths)

    carry = model.new_carry()
    *_, last = list(unrolled_states(forward, batch["input_ids"], noise, unroll, carry))
    assert not carry.latents["slot"].requires_grad
    last_loss(*last).backward()
    through = [p.grad.clone() for p in model.refinement_head.parameters()]
    model.zero_grad(set_to_none=True)

    carry = model.new_carry()
    with torch.no_grad():
        first = forward(noise[0], noise[1], carry)
    state = next_state(first.logits, batch["input_ids"], noise, unroll.fraction)
    last_loss(forward(state[0], state[1], carry), state[1], state[2]).backward()
    for a, p in zip(through, model.refinement_head.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad)


def test_the_unroll_is_off_by_default_and_refuses_the_feature_cache():
    assert DenoisingUnroll.for_run(RunConfig()) is None  # a retired lever (issue 25): reached by the hook
    with fixed_settings({"training_params.denoising_unroll_steps": 3}):
        assert DenoisingUnroll.for_run(RunConfig()) == DenoisingUnroll(steps=3, fraction=0.5)
    with fixed_settings({"training_params.denoising_unroll_steps": 2}):
        with pytest.raises(ConfigError, match="feature_cache"):
            DenoisingUnroll.for_run(parse_config({"advanced": {"feature_cache": True}}))


if __name__ == "__main__":  # writes the fixture from whatever code is on PYTHONPATH (main's, on purpose)
    model = build()
    tokens = {name: sample_tokens(model, name).tolist() for name in VARIANTS}
    rows = ",\n".join(f" {json.dumps(name)}: {json.dumps(value)}" for name, value in tokens.items())
    FIXTURE.write_text("{\n" + rows + "\n}\n")
    sys.exit(0)
