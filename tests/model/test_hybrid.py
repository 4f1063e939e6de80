"""LLaDATRMHybrid: chunked selective refinement, halting, integrations, context layers, refiner weights."""

from __future__ import annotations

import math
import traceback
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from llada_trm.errors import CheckpointError, ConfigError
from llada_trm.model.hybrid import (
    BackboneFeatures,
    LLaDATRMHybrid,
    chunk_confidence,
    expand_chunks,
    max_probability,
    num_chunks,
    refiner_schedule,
)
from llada_trm.model.hybrid_config import HybridConfig
from llada_trm.model.llada import LLaDAModel
from llada_trm.model.llada_config import LLaDAConfig
from llada_trm.model.refiners.base import Refiner, RefinerState
from llada_trm.model.refiners.config import mlp_hidden_for_params

VOCAB, MASK, D = 50, 49, 32
SLOT = {"n_heads": 2, "n_blocks": 1}


def tiny_backbone(seed: int = 0) -> LLaDAModel:
    torch.manual_seed(seed)
    config = LLaDAConfig(
        d_model=D, n_heads=2, n_layers=2, vocab_size=VOCAB, mlp_hidden_size=64, max_sequence_length=64,
        mask_token_id=MASK, eos_token_id=48, pad_token_id=48,
    )
    return LLaDAModel(config).eval()


def make_model(seed: int = 0, **kwargs: Any) -> LLaDATRMHybrid:
    kwargs.setdefault("slot", SLOT)
    kwargs.setdefault("chunk_size", 4)
    model = LLaDATRMHybrid(tiny_backbone(seed), HybridConfig(**kwargs))
    torch.manual_seed(seed + 1)  # refiners are built after the backbone; re-seed for the next draws
    return model


def noisy_ids(batch: int = 2, length: int = 10, seed: int = 0) -> Tensor:
    """Prompt-like tokens in the first half, masks in the second (chunk 0 of size 4 has no mask)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, MASK - 1, (batch, length), generator=g)
    ids[:, length // 2 :] = MASK
    return ids


# ---------------------------------------------------------------- chunking helpers (no model needed)


def test_num_chunks_and_expand():
    assert num_chunks(10, 4) == 3
    assert num_chunks(8, 4) == 2
    assert num_chunks(1, 16) == 1
    with pytest.raises(ValueError, match="chunk_size"):
        num_chunks(8, 0)
    values = torch.tensor([[1, 2, 3], [4, 5, 6]])
    assert expand_chunks(values, 10, 4).tolist() == [[1] * 4 + [2] * 4 + [3] * 2, [4] * 4 + [5] * 4 + [6] * 2]


def test_max_probability_matches_softmax():
    logits = torch.randn(3, 5, 7)
    assert torch.allclose(max_probability(logits), logits.softmax(-1).amax(-1), atol=1e-6)
    assert torch.allclose(max_probability(logits, rows_per_block=4), logits.softmax(-1).amax(-1), atol=1e-6)
    assert max_probability(torch.zeros(0, 7)).shape == (0,)


def test_chunk_confidence_by_hand():
    # L = 7, chunk_size 3 -> chunks [0,1,2] [3,4,5] [6]; unmasked values (even nan) are ignored
    conf = torch.tensor([[0.9, 0.1, 0.5, 0.2, 0.4, float("nan"), 0.7]])
    masked = torch.tensor([[True, True, False, False, False, False, True]])
    c, n = chunk_confidence(conf, masked, 3)
    assert n.tolist() == [[2, 0, 1]]
    assert torch.allclose(c, torch.tensor([[(0.9 + 0.1) / 2, 1.0, 0.7]]))
    with pytest.raises(ValueError, match="must match"):
        chunk_confidence(conf, masked[:, :5], 3)


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"refiner": "tree"}, r"^HybridConfig\.refiner: expected one of 'none', 'mlp' or 'slot', got 'tree'"),
        ({"integration": "parallel"}, "integration: expected one of"),
        ({"halting": "learned"}, "halting: expected one of 'confidence' or 'none'"),
        ({"refiner": "none", "integration": "hybrid"}, "refiner='none'"),
        ({"max_recursive_steps": -1}, "max_recursive_steps"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"confidence_threshold": -0.1}, "confidence_threshold"),
        ({"context_layers": [1, 1]}, "twice"),
        ({"slot": {"n_head": 2}}, r"slot\.n_head: unknown key; did you mean 'n_heads'\?"),
        ({"slot": {"num_steps": 2}}, "derives them"),
        ({"mlp": {"param_budget": "half"}}, "param_budget"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        HybridConfig(**kwargs)


def test_config_schedules_and_dict_round_trip():
    assert refiner_schedule(HybridConfig(refiner="mlp")) == ["mlp"] * 4
    assert refiner_schedule(HybridConfig(refiner="none")) == []
    assert refiner_schedule(HybridConfig(integration="hybrid"), 2) == ["slot", "slot"]
    assert refiner_schedule(HybridConfig(integration="hybrid"), 2, "mlp") == ["mlp", "mlp"]
    assert refiner_schedule(HybridConfig(integration="cascade")) == ["mlp", "mlp", "slot", "slot"]
    assert refiner_schedule(HybridConfig(integration="cascade"), 3) == ["mlp", "slot", "slot"]
    for retired in ("active_refiner", "cascade_mlp_steps", "return_step_logits", "denoising_carry"):
        with pytest.raises(ConfigError, match=f"{retired}: unknown key"):
            HybridConfig(**{retired: None})
    config = HybridConfig(refiner="mlp", context_layers=[0], mlp={"param_budget": 5000})
    assert HybridConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="unknown HybridConfig field"):
        HybridConfig.from_dict({"refiners": "slot"})


def test_context_layer_out_of_range():
    with pytest.raises(ConfigError, match="out of range for a 2-layer backbone"):
        LLaDATRMHybrid(tiny_backbone(), HybridConfig(context_layers=[2], slot=SLOT))


# A value other than the default for every knob: a new knob needs its entry here, and then this test checks
# that it travels from the config (YAML's `model.slot` / `model.mlp`) into the refiner that is built.
SLOT_KNOBS = {"n_heads": 4, "n_blocks": 1, "d_inner": 16}
MLP_KNOBS: dict[str, object] = {}  # its width knob, param_budget, is checked below


def test_every_refiner_knob_reaches_the_built_refiner():
    assert set(SLOT_KNOBS) == set(type(HybridConfig().slot).model_fields)
    assert set(MLP_KNOBS) | {"param_budget"} == set(type(HybridConfig().mlp).model_fields)
    config = HybridConfig(
        integration="cascade", max_recursive_steps=3, delta_scale=0.2, slot=SLOT_KNOBS, mlp=MLP_KNOBS
    )
    model = LLaDATRMHybrid(tiny_backbone(), config)
    slot, mlp = model.refinement_head["slot"].config, model.refinement_head["mlp"].config
    assert slot.delta_scale == mlp.delta_scale == 0.2  # one model.delta_scale reaches both refiners
    assert {name: getattr(slot, name) for name in SLOT_KNOBS} == SLOT_KNOBS
    assert {name: getattr(mlp, name) for name in MLP_KNOBS} == MLP_KNOBS
    assert (slot.d_model, slot.num_steps, slot.context_dim) == (D, 3, D)  # derived: backbone, K, contexts
    assert (mlp.d_model, mlp.num_steps, mlp.context_dim) == (D, 3, None)
    # the constants (`model.refiners.config`): slot widths from d_inner, no dropout, gates, clamp 0.5,
    # 2 x d_model
    widths = (slot.d_ctx, slot.d_reason, slot.d_refine, slot.d_conf)
    assert widths == (8, 4, 4, 2) and (slot.mlp_ratio, slot.dropout, slot.use_gates) == (4.0, 0.0, True)
    assert slot.delta_clamp == mlp.delta_clamp == 0.5 and mlp.dropout == 0.0 and mlp.hidden_dim == 2 * D
    sized = LLaDATRMHybrid(tiny_backbone(), HybridConfig(refiner="mlp", mlp={"param_budget": 5000}))
    assert sized.refinement_head["mlp"].config.hidden_dim == mlp_hidden_for_params(D, 5000)


# ---------------------------------------------------------------- shapes, refiner kinds, integrations


@pytest.mark.parametrize("refiner", ["mlp", "slot"])
def test_shapes_and_step_logits(refiner):
    model = make_model(refiner=refiner, confidence_threshold=2.0).train()
    ids = noisy_ids()
    out = model(ids)
    assert out.logits.shape == out.base_logits.shape == (2, 10, VOCAB)
    assert out.hidden_states.shape == (2, 10, D)
    assert len(out.step_logits) == 4 and all(s.shape == (2, 10, VOCAB) for s in out.step_logits)
    assert out.logits is out.step_logits[-1]
    stats = out.stats
    assert stats["steps_per_chunk"].tolist() == [[0, 4, 4], [0, 4, 4]]
    assert (stats["chunks_total"], stats["chunks_refined"], stats["refine_steps"]) == (6, 4, 4.0)
    assert stats["skipped_fraction"] == pytest.approx(2 / 6)
    assert len(stats["delta_norms"]) == 4 and math.isfinite(stats["confidence"])
    assert set(stats["slot_norms"]) == ({"ctx", "reason", "refine", "conf"} if refiner == "slot" else set())
    # eval mode computes only the final logits, and they agree
    model.eval()
    with torch.no_grad():
        evaluated = model(ids)
    assert evaluated.step_logits == []
    assert torch.allclose(evaluated.logits, out.logits, atol=1e-6)
    assert model(ids, return_step_logits=True).step_logits[-1].shape == (2, 10, VOCAB)
    assert len(model(ids, num_steps=2, return_step_logits=True).step_logits) == 2
    zero_steps = model(ids, num_steps=0)
    assert torch.equal(zero_steps.logits, out.base_logits) and zero_steps.stats["chunks_refined"] == 0
    assert zero_steps.stats["gates"] == model.refinement_head[refiner].gate_values()
    padding = torch.ones_like(ids)
    padding[1, -2:] = 0  # right padding: the refiner's own attention must skip it
    assert model(ids, attention_mask=padding).logits.shape == (2, 10, VOCAB)


SYNCS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "nonzero", "cpu", "numpy",
         "masked_select", "unique", "argwhere")  # Tensor methods that hand a device value to the host
TORCH_SYNCS = ("nonzero", "masked_select", "unique", "argwhere", "unique_consecutive")


def _recording(original: Any, calls: list[list[str]], when: Any = None) -> Any:
    def counted(*args: Any, **kwargs: Any) -> Any:
        if when is None or when(*args, **kwargs):
            calls.append([frame.name for frame in traceback.extract_stack()])
        return original(*args, **kwargs)

    return counted


def _has_bool_index(index: Any) -> bool:
    """Indexing by a bool tensor (or a tuple holding one) gathers a data-dependent number of rows: a sync."""
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, Tensor) and p.dtype == torch.bool and p.dim() > 0 for p in parts)


def host_syncs(monkeypatch: pytest.MonkeyPatch, run: Any) -> tuple[list[list[str]], Any]:
    """`run()`'s result and, per call that waits for the device (a tensor value converted to Python, a
    data-dependent shape: nonzero, boolean-mask indexing, masked_select, unique, a copy to the host), the
    names of the functions on the stack (set_sync_debug_mode is CUDA-only; this counts on any device)."""
    calls: list[list[str]] = []
    with monkeypatch.context() as patch:
        for name in SYNCS:
            patch.setattr(Tensor, name, _recording(getattr(Tensor, name), calls))
        for name in TORCH_SYNCS:
            patch.setattr(torch, name, _recording(getattr(torch, name), calls))
        patch.setattr(torch, "where", _recording(torch.where, calls, lambda *a, **k: len(a) + len(k) == 1))
        bool_get = _recording(Tensor.__getitem__, calls, lambda _, index: _has_bool_index(index))
        patch.setattr(Tensor, "__getitem__", bool_get)
        bool_set = _recording(Tensor.__setitem__, calls, lambda _, index, value: _has_bool_index(index))
        patch.setattr(Tensor, "__setitem__", bool_set)
        for name in ("index_put", "index_put_"):
            patch.setattr(Tensor, name, _recording(getattr(Tensor, name), calls,
                                                   lambda _, index, *a, **k: _has_bool_index(tuple(index))))
        out = run()
    return calls, out


def test_the_sync_counter_sees_each_kind_of_sync(monkeypatch):
    x, mask = torch.arange(6.0), torch.tensor([True, False] * 3)
    kinds = [lambda: x.sum().item(), lambda: x.tolist(), lambda: bool(x.any()), lambda: float(x[0]),
             lambda: int(x[0]), lambda: x.nonzero(), lambda: torch.nonzero(x), lambda: x[mask],
             lambda: x.masked_select(mask), lambda: torch.unique(x), lambda: x.cpu(),
             lambda: torch.where(mask), lambda: x.index_put((mask,), torch.zeros(3)),
             lambda: x.clone().__setitem__(mask, 0.0)]
    for kind in kinds:
        calls, _ = host_syncs(monkeypatch, kind)
        assert len(calls) >= 1
    calls, _ = host_syncs(monkeypatch, lambda: torch.where(mask, x, 0.0)[torch.tensor([0, 2])])
    assert calls == []  # elementwise selection and integer indexing do not wait for the device


@pytest.mark.parametrize("refiner", ["mlp", "slot"])
@pytest.mark.parametrize("integration", ["replace", "cascade"])
def test_a_refining_forward_without_halting_makes_no_host_sync(monkeypatch, refiner, integration):
    """Issue 25/29: the shipped recipe's forward (every chunk with a masked position refined, no halting, K
    steps) waits for the device nowhere: stats stay 0-d tensors until someone logs them (the sampler sums them
    there too), no 'anything left?' check, the refiner steps run dense over the window's rows, and the logits
    are one LM-head pass. The old forward made 17 (slot), 11 (mlp), 13 (cascade) such calls here."""
    from llada_trm.diffusion.options import SamplingOptions
    from llada_trm.diffusion.sampler import Denoiser  # noqa: PLC0415

    kinds = {"refiner": refiner} if integration == "replace" else {"integration": "cascade"}
    model = make_model(**kinds, halting="none", chunk_selection="all", max_recursive_steps=4)
    model.eval()
    ids = noisy_ids()
    with torch.no_grad():
        model(ids)  # lazily built state is not what is counted
        calls, out = host_syncs(monkeypatch, lambda: model(ids))
    assert calls == [], [c[-3:] for c in calls]

    stats = out.stats  # every key still there, and the numbers right once converted
    assert (stats["chunks_total"], int(stats["chunks_refined"]), float(stats["refine_steps"])) == (6, 4, 4.0)
    assert int(stats["chunks_halted"]) == 0 and float(stats["skipped_fraction"]) == pytest.approx(2 / 6)
    assert len(stats["delta_norms"]) == 4 and math.isfinite(float(stats["confidence"]))
    assert all(math.isfinite(float(v)) for v in [*stats["slot_norms"].values(), *stats["gates"].values()])
    reporter = model.refinement_head["slot" if integration == "cascade" else refiner]
    assert set(stats["gates"]) == set(reporter.gate_values())

    denoiser = Denoiser(model, None, ids != MASK, SamplingOptions(mask_id=MASK))
    calls, _ = host_syncs(monkeypatch, lambda: denoiser._record(stats))
    assert calls == []  # the sampler adds them up on the device, and reads the sums once at the end
    assert denoiser.stats_total["chunks_refined"] == 4.0 and denoiser.stats_mean["refine_steps"] == 4.0


def test_refiner_none_is_the_backbone():
    model = make_model(refiner="none").train()
    assert len(model.refinement_head) == 0 and list(model.refinement_head.parameters()) == []
    ids = noisy_ids()
    out = model(ids)
    assert out.logits is out.base_logits and out.step_logits == []
    assert torch.equal(out.logits, model.backbone(ids).logits)
    assert out.stats["refine_steps"] == 0.0 and out.stats["chunks_refined"] == 0
    assert out.stats["skipped_fraction"] == 1.0 and out.stats["steps_per_chunk"].sum() == 0
    assert model.orthogonality_loss().item() == 0.0


@pytest.mark.parametrize(
    ("mode", "kwargs"),
    [("exact", {}), ("threshold", {"threshold": 0.5}), ("prefix", {"threshold": 0.5, "cache": "prefix"}),
     ("dual", {"threshold": 0.5, "cache": "dual"})],
)
def test_a_call_that_refines_nothing_skips_the_confidence_and_samples_like_the_backbone(
    monkeypatch, mode, kwargs
):
    """Issue 29: with no refiner (or K = 0) no softmax confidence is computed for the masked rows, the stats
    keep every key the sampler, evaluator and trainer read, and sampling is token-identical to the
    backbone's in every mode (the reference fixtures pin the backbone path to LLaDA's and Fast-dLLM's)."""
    from llada_trm.diffusion.options import SamplingOptions
    from llada_trm.diffusion.sampler import sample

    def no_confidence(*args, **kw):
        raise AssertionError("max_probability ran on a call that refines nothing")

    monkeypatch.setattr("llada_trm.model.hybrid.max_probability", no_confidence)
    options = SamplingOptions(gen_length=16, block_length=8, steps=8, mask_id=MASK, **kwargs)
    prompt = noisy_ids(batch=3, length=6)[:, :5]
    expected = sample(tiny_backbone(), prompt, None, options)
    for model, steps in ((make_model(refiner="none"), None), (make_model(refiner="mlp"), 0)):
        model.eval()
        if steps is not None:
            model.config = model.config.model_copy(update={"max_recursive_steps": steps})
        got = sample(model, prompt, None, options)
        assert torch.equal(got.tokens, expected.tokens) and got.nfe == expected.nfe
        assert got.model_stats["chunks_refined"] == 0.0 and got.model_stats["skipped_fraction"] == 1.0
        stats = model(noisy_ids()).stats
        assert stats["steps_per_chunk"].shape == (2, 3) and stats["chunks_total"] == 6
        assert not stats["halted_per_chunk"].any() and stats["lm_head_rows"] == 0
        assert "chunk_confidence" not in stats  # nothing was selected, so nothing was measured


def test_hybrid_builds_both_and_switches():
    model = make_model(integration="hybrid", confidence_threshold=2.0).eval()
    assert set(model.refinement_head) == {"mlp", "slot"}
    ids = noisy_ids()
    slot_out = model(ids)
    model.active_refiner = "mlp"
    mlp_out = model(ids)
    assert not torch.equal(slot_out.logits, mlp_out.logits)
    assert slot_out.stats["slot_norms"] and not mlp_out.stats["slot_norms"]
    with pytest.raises(ValueError, match="choose one of"):
        model.active_refiner = "none"
    heads = model.refinement_head
    expected = heads["slot"].orthogonality_loss() + heads["mlp"].orthogonality_loss()
    assert torch.allclose(model.orthogonality_loss(), expected) and model.orthogonality_loss() > 0


def test_cascade_runs_mlp_then_slot(monkeypatch):
    model = make_model(integration="cascade", confidence_threshold=2.0).eval()
    calls: list[str] = []
    for kind, refiner in model.refinement_head.items():
        original = refiner.step

        def recorded(*args, _kind=kind, _original=original, **kwargs):
            calls.append(_kind)
            return _original(*args, **kwargs)

        monkeypatch.setattr(refiner, "step", recorded)
    out = model(noisy_ids())
    assert calls == ["mlp", "mlp", "slot", "slot"]
    assert out.stats["refine_steps"] == 4.0 and len(out.stats["delta_norms"]) == 4


# ---------------------------------------------------------------- selection by chunk confidence


def crafted_features(model: LLaDATRMHybrid, base_logits: Tensor, masked: Tensor) -> BackboneFeatures:
    torch.manual_seed(3)
    hidden = torch.randn(*base_logits.shape[:2], D)
    return BackboneFeatures(hidden_states=hidden, base_logits=base_logits, masked=masked)


def peaked_logits(length: int, peaks: list[float]) -> Tensor:
    """[1, L, V] logits: position i puts `peaks[i]` on token 0 and 0 elsewhere."""
    logits = torch.zeros(1, length, VOCAB)
    logits[0, :, 0] = torch.tensor(peaks)
    return logits


def test_chunk_confidence_by_hand_through_the_model():
    model = make_model(refiner="mlp", chunk_size=3, confidence_threshold=0.5).eval()
    peaks = [8.0, 8.0, 0.0, 0.0, 1.0, 0.0, 6.0]
    masked = torch.tensor([[True, False, False, True, True, False, True]])
    out = model.refine(crafted_features(model, peaked_logits(7, peaks), masked))

    def p(peak: float) -> float:
        return math.exp(peak) / (math.exp(peak) + VOCAB - 1)

    expected = [p(8.0), (p(0.0) + p(1.0)) / 2, p(6.0)]
    assert torch.allclose(out.stats["chunk_confidence"][0], torch.tensor(expected), atol=1e-6)
    # chunk 1 is below 0.5 and refined; chunks 0 and 2 are confident and pass through bit-identical
    assert out.stats["steps_per_chunk"].tolist() == [[0, 4, 0]]
    features = crafted_features(model, peaked_logits(7, peaks), masked)
    for sl in (slice(0, 3), slice(6, 7)):
        assert torch.equal(out.logits[:, sl], features.base_logits[:, sl])
        assert torch.equal(out.hidden_states[:, sl], features.hidden_states[:, sl])
    assert not torch.equal(out.hidden_states[:, 3:6], features.hidden_states[:, 3:6])


def test_threshold_zero_refines_nothing_and_above_one_everything():
    ids = noisy_ids()
    model = make_model(refiner="slot", confidence_threshold=0.0, context_layers=[-1]).train()
    out = model(ids)
    assert out.stats["chunks_refined"] == 0 and out.stats["skipped_fraction"] == 1.0
    assert torch.equal(out.logits, out.base_logits)
    assert all(torch.equal(s, out.base_logits) for s in out.step_logits) and len(out.step_logits) == 4
    assert torch.equal(out.hidden_states, model.features(ids).hidden_states)

    model.config.confidence_threshold = 1.5
    out = model(ids)
    # every chunk with a masked position is refined; chunk 0 (no mask) is skipped and bit-identical
    assert out.stats["steps_per_chunk"].tolist() == [[0, 4, 4], [0, 4, 4]]
    assert torch.equal(out.logits[:, :4], out.base_logits[:, :4])
    assert not torch.equal(out.logits[:, 4:], out.base_logits[:, 4:])


def test_chunk_selection_all_refines_every_masked_chunk_whatever_the_threshold():
    ids = noisy_ids()
    model = make_model(refiner="slot", confidence_threshold=0.0, chunk_selection="all", halting="none")
    model.train()
    out = model(ids)
    assert out.stats["steps_per_chunk"].tolist() == [[0, 4, 4], [0, 4, 4]]  # chunk 0 holds no mask
    model.config.chunk_selection = "confidence"
    assert model(ids).stats["chunks_refined"] == 0  # the same threshold under the confidence rule


def test_no_masked_positions_means_nothing_to_refine():
    model = make_model(refiner="mlp", confidence_threshold=2.0).train()
    ids = noisy_ids()
    out = model(ids, masked=torch.zeros_like(ids, dtype=torch.bool))
    assert out.stats["chunks_refined"] == 0 and torch.equal(out.logits, out.base_logits)
    with pytest.raises(ValueError, match="masked must be"):
        model(ids, masked=torch.zeros(2, 3, dtype=torch.bool))


def test_bf16_backbone_passes_through_exactly():
    model = make_model(refiner="slot", confidence_threshold=2.0)
    model.backbone.to(torch.bfloat16)
    out = model.eval()(noisy_ids())
    assert out.logits.dtype == out.hidden_states.dtype == torch.bfloat16
    assert torch.equal(out.logits[:, :4], out.base_logits[:, :4])


# ---------------------------------------------------------------- per-chunk halting


class PushRefiner(Refiner):
    """Fake refiner: each step adds `push[l]` to coordinate 0 of h at active positions."""

    def __init__(self, push: Tensor) -> None:
        super().__init__()
        self.d_model, self.num_steps = D, 4
        self.push = nn.Parameter(push.clone())

    def step(self, h, state, *, context=None, active=None, attention_mask=None):
        update = torch.zeros_like(h)
        update[..., 0] = self.push
        if active is not None:
            update = torch.where(active.unsqueeze(-1), update, torch.zeros_like(update))
        stats = {"confidence": torch.full(h.shape[:2], 0.5), "update_norm": update.detach().norm(dim=-1)}
        return h + update, RefinerState(steps=state.steps + 1), stats


def halting_model(**kwargs: Any) -> LLaDATRMHybrid:
    model = make_model(refiner="mlp", chunk_size=2, confidence_threshold=0.9, **kwargs)
    with torch.no_grad():  # lm_head(h) = [h_0, 0, ..., 0]: confidence grows with coordinate 0
        weight = model.backbone.transformer.ff_out.weight
        weight.zero_()
        weight[0, 0] = 1.0
    # chunk 0 jumps to confidence ~1 in one step, chunk 1 creeps and never gets there
    model.refinement_head["mlp"] = PushRefiner(torch.tensor([20.0, 20.0, 0.01, 0.01]))
    return model


def halting_features(model: LLaDATRMHybrid) -> BackboneFeatures:
    hidden = torch.zeros(1, 4, D)
    masked = torch.ones(1, 4, dtype=torch.bool)
    return BackboneFeatures(hidden_states=hidden, base_logits=model.lm_head(hidden), masked=masked)


def test_confident_chunk_halts_and_keeps_its_logits():
    model = halting_model().train()
    out = model.refine(halting_features(model))
    assert out.stats["steps_per_chunk"].tolist() == [[1, 4]]
    assert out.stats["chunks_halted"] == 1 and out.stats["refine_steps"] == 2.5
    assert out.hidden_states[0, :2, 0].tolist() == [20.0, 20.0]  # frozen after one step
    assert out.hidden_states[0, 2:, 0].allclose(torch.tensor([0.04, 0.04]))
    first = out.step_logits[0]
    for later in out.step_logits[1:]:
        assert torch.equal(later[:, :2], first[:, :2])
    assert not torch.equal(out.step_logits[-1][:, 2:], first[:, 2:])

    # the eval path (LM head only on probed rows) halts the same way
    evaluated = model.eval().refine(halting_features(model))
    assert evaluated.step_logits == []
    assert evaluated.stats["steps_per_chunk"].tolist() == [[1, 4]]
    assert torch.allclose(evaluated.logits, out.logits)

    # without halting every refined chunk takes all K steps
    model.config.halting = "none"
    assert model.refine(halting_features(model)).stats["steps_per_chunk"].tolist() == [[4, 4]]


def test_all_chunks_halting_repeats_the_last_logits():
    model = halting_model()
    model.refinement_head["mlp"].push.data.fill_(20.0)
    out = model.train().refine(halting_features(model))
    assert out.stats["steps_per_chunk"].tolist() == [[1, 1]]
    assert len(out.step_logits) == 4 and all(s is out.step_logits[0] for s in out.step_logits)


# ---------------------------------------------------------------- backbone contexts


def test_context_layers_feed_the_slot_refiner(monkeypatch):
    plain = make_model(refiner="slot", confidence_threshold=2.0, context_layers=[]).eval()
    with_ctx = make_model(refiner="slot", confidence_threshold=2.0, context_layers=[0, -1]).eval()
    with_ctx.refinement_head.load_state_dict(plain.refinement_head.state_dict())  # same refiner weights
    ids = noisy_ids()

    seen: list[Any] = []
    original = with_ctx.backbone.forward

    def spy(*args, **kwargs):
        seen.append(list(kwargs["context_layers"]))
        return original(*args, **kwargs)

    monkeypatch.setattr(with_ctx.backbone, "forward", spy)
    features = with_ctx.features(ids)
    assert seen == [[0, 1]]
    direct = original(ids, context_layers=[0, 1]).attention_contexts
    assert torch.allclose(features.contexts, (direct[0] + direct[1]) / 2)
    assert features.contexts.shape == (2, 10, D)
    assert plain.features(ids).contexts is None
    assert make_model(refiner="mlp", context_layers=[0]).features(ids).contexts is None  # slot-only input

    out_ctx, out_plain = with_ctx.refine(features), plain(ids)
    assert torch.equal(out_ctx.base_logits, out_plain.base_logits)
    assert not torch.equal(out_ctx.logits, out_plain.logits)


# ---------------------------------------------------------------- gradients


def test_gradients_reach_the_refiner_not_a_frozen_backbone():
    model = make_model(refiner="slot", confidence_threshold=2.0, context_layers=[-1]).train()
    model.backbone.requires_grad_(False)
    ids = noisy_ids()
    features = model.features(ids)
    assert not features.hidden_states.requires_grad and not features.base_logits.requires_grad
    out = model.refine(features)
    loss = sum(torch.nn.functional.cross_entropy(s.flatten(0, 1), ids.flatten()) for s in out.step_logits)
    (loss + model.orthogonality_loss()).backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    grads = [p.grad for p in model.refinement_head.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_trainable_backbone_builds_a_graph():
    model = make_model(refiner="mlp").train()
    assert model.features(noisy_ids()).hidden_states.requires_grad


# ---------------------------------------------------------------- weights on disk


def test_save_and_load_refiner_round_trip(tmp_path):
    model = make_model(seed=0, integration="hybrid", confidence_threshold=2.0).eval()
    path = model.save_refiner(tmp_path / "sub" / "refiner.safetensors")
    assert sorted(p.name for p in path.parent.iterdir()) == ["refiner.safetensors"]  # no temp file left

    other = make_model(seed=5, integration="hybrid", confidence_threshold=2.0).eval()
    other.backbone.load_state_dict(model.backbone.state_dict())
    ids = noisy_ids()
    assert not torch.equal(other(ids).logits, model(ids).logits)
    other.load_refiner(path)
    assert torch.equal(other(ids).logits, model(ids).logits)
    assert all(name.startswith("refinement_head.") for name in model.refiner_state_dict())

    with pytest.raises(CheckpointError, match="do not match"):
        make_model(refiner="mlp").load_refiner(path)
    with pytest.raises(CheckpointError, match="has shape"):
        bigger = make_model(integration="hybrid", mlp={"param_budget": 5000})  # another MLP width
        bigger.load_refiner(path)
    with pytest.raises(CheckpointError, match="not found"):
        model.load_refiner(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="nothing to save"):
        make_model(refiner="none").save_refiner(tmp_path / "none.safetensors")


def test_from_pretrained_loads_the_backbone(tmp_path):
    source = tiny_backbone(seed=7)
    source.save_pretrained(tmp_path)
    model = LLaDATRMHybrid.from_pretrained(tmp_path, HybridConfig(refiner="mlp", chunk_size=4))
    ids = noisy_ids()
    assert torch.equal(model.eval()(ids).base_logits, source(ids).logits)
    assert isinstance(model.refinement_head["mlp"], Refiner)
