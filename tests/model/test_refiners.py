"""Tests of the recursive refiners (slot TRM refiner and MLP baseline) and their shared interface."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llada_trm.errors import ConfigError
from llada_trm.model.refiners import build_refiner
from llada_trm.model.refiners.base import (
    ActiveRows,
    AttentionContextExtractor,
    Refiner,
    RefinerState,
    StatsAccumulator,
    TransformerBlock,
)
from llada_trm.model.refiners.config import MLPRefinerConfig, SlotConfig
from llada_trm.model.refiners.mlp import RecursiveRefinementHead
from llada_trm.model.refiners.slot import (
    SLOT_NAMES,
    SlotProjector,
    SlotTRMRefiner,
    create_slot_trm_refiner,
    slot_step,
)

D, B, L, K = 32, 2, 6, 3
KINDS = ("slot", "mlp")


def make(kind: str, seed: int = 0, **kwargs) -> Refiner:
    torch.manual_seed(seed)
    defaults = {"slot": {"n_heads": 4, "num_steps": K}, "mlp": {"num_steps": K}}[kind]
    return build_refiner(kind, D, **{**defaults, **kwargs})


def inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, D, generator=g)
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[0, :3] = True
    mask[1, 2:5] = True
    return x, mask


@pytest.mark.parametrize("kind", KINDS)
def test_shapes_and_near_identity_at_init(kind):
    refiner = make(kind)
    x, _ = inputs()
    out = refiner(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert not torch.equal(out, x)
    assert (out - x).abs().max() < 1e-2  # small-init last layer: close to the identity


@pytest.mark.parametrize("kind", KINDS)
def test_chunk_mask_leaves_other_positions_bit_identical(kind):
    refiner = make(kind)
    x, mask = inputs()
    out = refiner(x, chunk_mask=mask)
    assert torch.equal(out[~mask], x[~mask])
    assert (out[mask] != x[mask]).any(dim=-1).all()
    # 0/1 float masks mean the same thing
    assert torch.equal(refiner(x, chunk_mask=mask.float()), out)


@pytest.mark.parametrize("kind", KINDS)
def test_zero_steps_is_identity(kind):
    refiner = make(kind)
    x, mask = inputs()
    assert refiner(x, num_steps=0) is x
    assert refiner(x, num_steps=0, return_all_steps=True) == []
    out, stats = refiner(x, chunk_mask=mask, num_steps=0, return_stats=True)
    assert out is x and stats["steps"] == 0 and stats["delta_norms"] == []
    assert stats["final_confidence"].shape == (B, L)


@pytest.mark.parametrize("kind", KINDS)
def test_return_all_steps_and_num_steps_override(kind):
    refiner = make(kind).eval()
    x, _ = inputs()
    steps = refiner(x, return_all_steps=True)
    assert len(steps) == K
    torch.testing.assert_close(steps[-1], refiner(x), rtol=0, atol=0)
    two, stats = refiner(x, num_steps=2, return_all_steps=True, return_stats=True)
    assert len(two) == 2 and stats["steps"] == 2 and len(stats["delta_norms"]) == 2
    torch.testing.assert_close(two[-1], steps[1], rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_stats_keys_and_values(kind):
    refiner = make(kind)
    x, mask = inputs()
    states, stats = refiner(x, chunk_mask=mask, return_stats=True, return_all_steps=True)
    assert {"steps", "confidence", "delta_norms", "final_confidence", "slot_norms", "gates"} <= stats.keys()
    assert stats["steps"] == K
    assert isinstance(stats["confidence"], float) and 0.0 < stats["confidence"] < 1.0
    final = stats["final_confidence"]
    assert final.shape == (B, L) and not final.requires_grad
    assert ((final[mask] > 0) & (final[mask] < 1)).all()
    assert (final[~mask] == 0).all()  # only the refined rows are computed
    # delta_norms: mean L2 norm of the applied update over the refined positions, one float per step
    previous = x
    for k, h in enumerate(states):
        expected = (h - previous).norm(dim=-1)[mask].mean().item()
        assert stats["delta_norms"][k] == pytest.approx(expected, rel=1e-4)
        previous = h
    if kind == "slot":
        assert list(stats["slot_norms"]) == list(SLOT_NAMES)
        assert all(v > 0 for v in stats["slot_norms"].values())
        assert stats["gates"] == {name: 0.5 for name in SLOT_NAMES}
    else:
        assert stats["slot_norms"] == {} and stats["gates"] == {}


@pytest.mark.parametrize("kind", KINDS)
def test_step_with_active_mask(kind):
    refiner = make(kind)
    x, mask = inputs()
    state = refiner.init_state(x)
    assert isinstance(state, RefinerState) and state.steps == 0
    h, state, step_stats = refiner.step(x, state, active=mask)
    assert torch.equal(h[~mask], x[~mask]) and not torch.equal(h[mask], x[mask])
    assert state.steps == 1
    assert step_stats["confidence"].shape == (B, L) and step_stats["confidence"].requires_grad
    assert step_stats["update_norm"].shape == (B, L)
    assert (step_stats["update_norm"][~mask] == 0).all()
    h2, state, _ = refiner.step(h, state, active=mask)
    assert torch.equal(h2[~mask], x[~mask]) and state.steps == 2
    if state.prev is not None:
        assert not state.prev.requires_grad
    # a caller driving `step` itself gets the same stats as forward
    acc = StatsAccumulator()
    state, h = refiner.init_state(x), x
    for _ in range(K):
        h, state, step_stats = refiner.step(h, state, active=mask)
        acc.add(step_stats, mask)
    _, stats = refiner(x, chunk_mask=mask, return_stats=True)
    assert acc.summary(refiner, x)["delta_norms"] == pytest.approx(stats["delta_norms"])


def test_bf16_states_with_fp32_refiner():
    refiner = make("slot")
    x, mask = inputs()
    x = x.to(torch.bfloat16)
    out = refiner(x, chunk_mask=mask)
    assert out.dtype == torch.bfloat16 and torch.equal(out[~mask], x[~mask])


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_states_are_refined_in_fp32_and_rounded_once(kind):
    """A bf16 input gets the update its fp32 copy gets, rounded to bf16 once at the end: K small updates
    accumulate instead of each being rounded away (an untrained refiner's would change ~1% of elements)."""
    refiner = make(kind)
    with torch.no_grad():  # a trained-sized update, comparable to bf16's rounding step at |h| ~ 1
        (refiner.delta_net if kind == "slot" else refiner.mlp)[-1].weight.mul_(30)
    x, mask = inputs()
    x = x.to(torch.bfloat16)
    steps = refiner(x, chunk_mask=mask, return_all_steps=True)
    reference = refiner(x.float(), chunk_mask=mask, return_all_steps=True)  # the same steps in fp32
    for out, ref in zip(steps, reference, strict=True):
        assert out.dtype == torch.bfloat16 and torch.equal(out[~mask], x[~mask])
        assert torch.equal(out, ref.to(torch.bfloat16))  # the fp32 change, within bf16 rounding
    assert (steps[-1] != x)[mask].float().mean() > 0.25  # and the update is visible


def test_external_context_slot():
    x, _ = inputs()
    ctx = torch.randn(B, L, 48)
    refiner = make("slot", context_dim=48)
    assert refiner.context_proj.weight.shape == (32, 48)
    with_ctx = refiner(x, context=ctx)
    assert not torch.allclose(with_ctx, refiner(x))
    torch.testing.assert_close(refiner(x, context=[ctx, ctx]), with_ctx)  # a list of layers is averaged
    with pytest.raises(ValueError, match="context_dim=40"):
        refiner(x, context=torch.randn(B, L, 40))
    with pytest.raises(ValueError, match=r"\[B, L, Dc\]"):
        refiner(x, context=torch.randn(B, L + 1, 48))
    # without context_dim, contexts as wide as the refiner are used directly; others are refused
    plain = make("slot")
    assert plain.context_proj is None
    assert plain(x, context=torch.randn(B, L, D)).shape == x.shape
    with pytest.raises(ValueError, match="context_dim=48"):
        plain(x, context=ctx)


def test_external_context_mlp():
    x, _ = inputs()
    ctx = torch.randn(B, L, 48)
    with pytest.raises(ValueError, match="context_dim=48"):
        make("mlp")(x, context=ctx)
    refiner = make("mlp", context_dim=48)
    assert not torch.allclose(refiner(x, context=ctx), refiner(x))


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_every_refiner_parameter_and_no_frozen_one(kind):
    refiner = make(kind, context_dim=48)
    backbone = nn.Linear(D, D)
    backbone.requires_grad_(False)
    x, _ = inputs()
    ctx = torch.randn(B, L, 48)
    h, state, loss = backbone(x), refiner.init_state(x), torch.zeros(())
    for _ in range(K):  # deep supervision on every step, plus a calibration term on the confidence
        h, state, step_stats = refiner.step(h, state, context=ctx)
        loss = loss + h.square().mean() + step_stats["confidence"].mean()
    (loss + refiner.orthogonality_loss()).backward()
    assert all(p.grad is None for p in backbone.parameters())
    missing = [n for n, p in refiner.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_frozen_refiner_part_gets_no_gradient():
    refiner = make("slot")
    refiner.blocks.requires_grad_(False)
    x, _ = inputs()
    refiner(x).square().mean().backward()
    assert all(p.grad is None for p in refiner.blocks.parameters())
    assert refiner.delta_net[-1].weight.grad is not None
    assert refiner.slot_proj.W_ctx.weight.grad is not None


def test_orthogonality_loss():
    refiner = make("slot")
    proj = refiner.slot_proj
    loss = refiner.orthogonality_loss()
    assert loss.dim() == 0 and 0 < loss.item() < 1
    loss.backward()
    assert proj.W_ctx.weight.grad is not None
    # rows drawn from one orthonormal basis: the d_inner-wide projections read disjoint subspaces
    q, _ = torch.linalg.qr(torch.randn(D, D))
    with torch.no_grad():
        rows = iter(torch.split(q.T, [16, 8, 4, 4]))
        proj.W_ctx.weight.copy_(next(rows))
        proj.W_refine.weight.copy_(next(rows))
        proj.W_conf.weight.copy_(next(rows))
    assert refiner.orthogonality_loss().item() < 1e-10
    with torch.no_grad():  # the same reading subspace: overlap 1 for that pair, whatever the scale
        proj.W_refine.weight.copy_(100 * proj.W_conf.weight.repeat(2, 1))
    assert refiner.orthogonality_loss().item() == pytest.approx(1 / 3, abs=1e-5)  # one pair of three
    assert make("mlp").orthogonality_loss().item() == 0.0


def test_gate_statistics_and_matrix_gate():
    refiner = make("slot")
    assert refiner.gate_values() == {name: 0.5 for name in SLOT_NAMES}
    refiner.slot_proj.gates["ctx"] = nn.Parameter(torch.tensor([[0.0, 100.0], [0.0, 100.0]]))
    assert refiner.gate_values()["ctx"] == pytest.approx(0.75)
    stats = refiner.slot_statistics()
    assert stats["gate_ctx"] == pytest.approx(0.75) and "orthogonality" in stats and "w_conf_norm" in stats
    assert make("slot", use_gates=False).gate_values() == {}


def test_padding_does_not_leak_into_real_positions():
    refiner = make("slot")
    x, _ = inputs()
    pad = torch.ones(B, L, dtype=torch.bool)
    pad[:, -2:] = False
    changed = x.clone()
    changed[:, -2:] = torch.randn(B, 2, D)
    a = refiner(x, attention_mask=pad)
    b = refiner(changed, attention_mask=pad)
    torch.testing.assert_close(a[:, :-2], b[:, :-2])
    assert not torch.allclose(refiner(x)[:, :-2], refiner(changed)[:, :-2])


def test_building_blocks():
    torch.manual_seed(0)
    x = torch.randn(B, L, D)
    attn = AttentionContextExtractor(D, 4)
    out, ctx = attn(x)
    assert out.shape == ctx.shape == x.shape
    torch.testing.assert_close(out, attn.o_proj(ctx))
    block = TransformerBlock(D, 4)
    y, ctx = block(x)
    assert y.shape == ctx.shape == x.shape
    proj = SlotProjector(SlotConfig(d_model=D, n_heads=4))
    assert [w.shape for w in proj.projection_weights().values()] == [(16, D), (8, 16), (8, D), (4, D)]
    refiner = make("slot")
    first = slot_step(refiner, x, x, ctx, None)
    assert [s.shape[-1] for s in first.slots] == [16, 8, 8, 4] and first.confidence.shape == (B, L)
    assert torch.allclose(first.slots.refine, torch.zeros(()))  # nothing has changed before the first step
    torch.testing.assert_close(first.h_next, x + first.update, rtol=0, atol=0)
    prev = torch.randn(B, L, D, requires_grad=True)
    slot_step(refiner, x, x, ctx, prev).slots.refine.sum().backward()
    assert prev.grad is None  # the previous step is detached


def test_learns_a_simple_target():
    refiner = make("slot", num_steps=2)
    x, mask = inputs()
    target = x + 0.05 * torch.randn_like(x)
    opt = torch.optim.Adam(refiner.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = (refiner(x, chunk_mask=mask) - target)[mask].square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_determinism_under_seed():
    a, b = make("slot", seed=3), make("slot", seed=3)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    x, mask = inputs()
    assert torch.equal(a(x, chunk_mask=mask), b(x, chunk_mask=mask))
    assert not torch.equal(make("slot", seed=4)(x), a(x))


def test_config_defaults_and_validation():
    cfg = SlotConfig(d_model=64)
    assert (cfg.d_inner, cfg.d_ctx, cfg.d_reason, cfg.d_refine, cfg.d_conf) == (64, 32, 16, 16, 8)
    assert SlotConfig(d_model=4096).d_inner == 512
    assert SlotConfig(d_model=64, d_ctx=40).d_ctx == 40
    with pytest.raises(ConfigError, match="n_heads=5"):
        SlotConfig(d_model=64, n_heads=5)
    with pytest.raises(ConfigError, match="d_conf"):
        SlotConfig(d_model=4, n_heads=1)
    with pytest.raises(ConfigError, match="num_steps"):
        SlotConfig(d_model=64, num_steps=-1)
    with pytest.raises(ConfigError, match="delta_scale"):
        SlotConfig(d_model=64, delta_scale=0)
    with pytest.raises(ConfigError, match="hidden_dim"):
        MLPRefinerConfig(d_model=64, hidden_dim=0)
    assert tuple(cfg.slot_dims) == SLOT_NAMES  # the widths in the order the projector concatenates slots
    assert cfg.slot_total == 32 + 16 + 16 + 8
    assert SlotConfig(**cfg.model_dump()) == cfg  # resolved widths validate again (keyword overrides rebuild)
    mult = MLPRefinerConfig(d_model=64, hidden_mult=1.5)
    assert (mult.hidden_dim, mult.hidden_mult) == (96, None)
    assert MLPRefinerConfig(d_model=4096).hidden_dim == 1024
    assert MLPRefinerConfig(d_model=64).hidden_dim == 128
    with pytest.raises(ConfigError, match=r"^SlotConfig: n_heads=5 does not divide d_inner=64"):
        SlotConfig(d_model=64, n_heads=5)
    refiner = make("slot")
    x, mask = inputs()
    with pytest.raises(ValueError, match="num_steps"):
        refiner(x, num_steps=-1)
    with pytest.raises(ValueError, match=r"\[B, L, 32\]"):
        refiner(torch.randn(B, L, D + 1))
    with pytest.raises(ValueError, match="chunk_mask"):
        refiner(x, chunk_mask=mask[:, :-1])


def test_constructors_and_factories():
    assert isinstance(build_refiner("slot", D, n_heads=4), SlotTRMRefiner)
    assert isinstance(build_refiner("mlp", D), RecursiveRefinementHead)
    with pytest.raises(ValueError, match="unknown refiner kind"):
        build_refiner("lstm", D)
    assert SlotTRMRefiner(d_model=D, n_heads=4, num_steps=2).num_steps == 2
    assert SlotTRMRefiner(SlotConfig(d_model=D, n_heads=4), num_steps=5).num_steps == 5
    assert RecursiveRefinementHead(D, num_steps=1).num_steps == 1
    with pytest.raises(ValueError, match="d_model"):
        SlotTRMRefiner()
    assert len(create_slot_trm_refiner(D, "tiny", n_heads=4).blocks) == 1
    no_blocks = SlotTRMRefiner(d_model=D, n_heads=4, n_blocks=0)  # slots read h (or a backbone context) only
    x, mask = inputs()
    assert torch.equal(no_blocks(x, chunk_mask=mask)[~mask], x[~mask])
    with pytest.raises(ValueError, match="size"):
        create_slot_trm_refiner(D, "huge")


def test_parameter_budget_for_llada_8b():
    with torch.device("meta"):
        slot = SlotTRMRefiner(d_model=4096, context_dim=4096)
        mlp = RecursiveRefinementHead(d_model=4096)
    assert slot.num_parameters() < 0.002 * 8e9
    assert mlp.num_parameters() < 0.002 * 8e9


def test_active_rows_pack_gather_scatter():
    active = torch.tensor([[False, True, False, True], [True, False, False, False]])
    rows = ActiveRows.pack(active)
    assert rows.index[:, :1].tolist() == [[1], [0]] and rows.index[0].tolist() == [1, 3]
    assert rows.valid.tolist() == [[True, True], [True, False]]
    x = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    packed = rows.gather(x)
    assert packed.shape == (2, 2, 3) and torch.equal(packed[0], x[0, [1, 3]])
    # scatter writes the valid rows only: padding rows keep what `into` held
    back = rows.scatter(packed + 100, into=x)
    assert torch.equal(back[active], x[active] + 100) and torch.equal(back[~active], x[~active])
    assert torch.equal(rows.scatter(packed[..., 0], length=4), torch.where(active, x[..., 0], 0))
    assert ActiveRows.pack(torch.ones(2, 4, dtype=torch.bool)) is None and ActiveRows.pack(None) is None
    assert ActiveRows.pack(torch.zeros(2, 4, dtype=torch.bool)).index.shape == (2, 0)


@pytest.mark.parametrize(("kind", "n_blocks"), [("slot", 0), ("slot", 1), ("slot", 2), ("mlp", None)])
def test_step_computes_only_active_rows_with_the_full_computations_values(kind, n_blocks, monkeypatch):
    """Packing the active rows is an optimisation: the values and gradients on them match computing every
    row (three steps, one of them after a row halted, so the carried `prev` and the reused attention keys
    and values are checked too), with the backbone context and padding in play."""
    pack = ActiveRows.pack
    extra = {"context_dim": 8} | ({"n_blocks": n_blocks} if kind == "slot" else {})
    refiner = make(kind, **extra)
    x, mask = inputs()
    context = torch.randn(B, L, 8)
    pad = torch.ones(B, L, dtype=torch.bool)
    pad[1, -1] = False
    halted = mask.clone()
    halted[1, 2] = False
    results = {}
    for name in ("packed", "full"):
        unpacked = classmethod(lambda cls, active: None)  # compute every row, as before packing existed
        monkeypatch.setattr(ActiveRows, "pack", pack if name == "packed" else unpacked)
        h = x.clone().requires_grad_(True)
        state, out, confidence = refiner.init_state(h), h, []
        for active in (mask, halted, halted):  # a chunk halts after the first step: its rows go stale
            out, state, stats = refiner.step(out, state, context=context, active=active, attention_mask=pad)
            confidence.append(stats["confidence"])
        (out[mask].square().sum() + confidence[-1][halted].sum()).backward()
        grads = [p.grad.clone() for p in refiner.parameters() if p.grad is not None]
        refiner.zero_grad()
        results[name] = (out[mask], confidence[-1][halted], h.grad[mask], grads)
    for packed, full in zip(results["packed"][:3], results["full"][:3], strict=True):
        torch.testing.assert_close(packed, full, rtol=1e-5, atol=1e-6)
    assert len(results["packed"][3]) == len(results["full"][3])
    for packed, full in zip(results["packed"][3], results["full"][3], strict=True):
        torch.testing.assert_close(packed, full, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_step_with_nothing_active_is_identity(kind):
    refiner = make(kind)
    x, _ = inputs()
    h, _, stats = refiner.step(x, refiner.init_state(x), active=torch.zeros(B, L, dtype=torch.bool))
    assert torch.equal(h, x) and (stats["confidence"] == 0).all() and (stats["update_norm"] == 0).all()
