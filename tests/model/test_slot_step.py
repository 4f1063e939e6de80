"""The slot refiner's step against a naive re-implementation of its equations, its key/value reuse, and the
seed's constructor keywords."""

from __future__ import annotations

import dataclasses
import math
import time

import pytest
import torch
import torch.nn.functional as F

from llada_trm.errors import ConfigError
from llada_trm.model.refiners.config import SlotConfig
from llada_trm.model.refiners.slot import SLOT_NAMES, SlotTRMRefiner

D, B, L = 32, 2, 7


def refiner(seed: int = 0, **kwargs) -> SlotTRMRefiner:
    """A refiner whose every parameter matters: weights perturbed off their init (LayerNorm affines, gates),
    and an update large enough that the clamp binds on part of it."""
    torch.manual_seed(seed)
    r = SlotTRMRefiner(d_model=D, n_heads=4, context_dim=8, delta_clamp=0.1, **kwargs)
    with torch.no_grad():
        for p in r.parameters():
            p.add_(0.1 * torch.randn_like(p))
        r.delta_net[-1].weight.normal_(std=0.05)
    return r


def masks() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Active sets that shrink, as the hybrid's halting makes them, and a padding mask."""
    first = torch.zeros(B, L, dtype=torch.bool)
    first[0, 1:5] = True
    first[1, 3:7] = True
    halted = first.clone()
    halted[1, 3:5] = False
    pad = torch.ones(B, L, dtype=torch.bool)
    pad[1, -1] = False
    return first, halted, pad


# --- the naive step: the equations of `slot_step`'s docstring on every row, plain torch ops ---------------


def layer_norm(x, norm):
    return F.layer_norm(x, x.shape[-1:], norm.weight, norm.bias, norm.eps)


def naive_block(block, x, pad):
    """x + attn(LN x), then x + MLP(LN x); also the attention's context: the heads' attn@V, concatenated."""
    attn = block.attn
    a = layer_norm(x, block.attn_norm)
    q, k, v = (a @ lin.weight.T for lin in (attn.q_proj, attn.k_proj, attn.v_proj))
    split = lambda t: t.view(B, L, attn.n_heads, attn.head_dim).transpose(1, 2)  # noqa: E731
    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(attn.head_dim)
    scores = scores.masked_fill(~pad[:, None, None, :], float("-inf"))
    context = (scores.softmax(dim=-1) @ split(v)).transpose(1, 2).reshape(B, L, -1)
    x = x + context @ attn.o_proj.weight.T
    up, down = block.mlp[0], block.mlp[3]
    m = layer_norm(x, block.mlp_norm)
    x = x + F.linear(F.gelu(F.linear(m, up.weight, up.bias)), down.weight, down.bias)
    return x, context


def naive_step(r, h, u_prev, backbone, active, pad):
    """(h_next, u, p) on every row; rows outside `active` keep h."""
    proj, cfg = r.slot_proj, r.config
    u = h @ r.in_proj.weight.T if cfg.d_inner != cfg.d_model else h
    sources = []
    for block in r.blocks:
        u, context = naive_block(block, u, pad)
        sources.append(context)
    sources.append(backbone @ r.context_proj.weight.T)
    c = torch.stack(sources).mean(dim=0)
    gate = {n: torch.sigmoid(proj.gates[n]) if proj.gates is not None else 1.0 for n in SLOT_NAMES}
    ctx_pre = layer_norm(c @ proj.W_ctx.weight.T, proj.norms["ctx"])
    s_ctx = gate["ctx"] * ctx_pre
    s_reason = gate["reason"] * layer_norm(ctx_pre @ proj.W_reason.weight.T, proj.norms["reason"])
    if u_prev is None:
        change = u.new_zeros(B, L, cfg.d_refine)
    else:
        change = ((u - u_prev.detach()) / cfg.delta_scale) @ proj.W_refine.weight.T
    s_refine = gate["refine"] * layer_norm(change, proj.norms["refine"])
    variance = (u - u.mean(dim=-1, keepdim=True)) ** 2
    s_conf = gate["conf"] * layer_norm(variance @ proj.W_conf.weight.T, proj.norms["conf"])
    n1, n2 = r.delta_net[0], r.delta_net[3]
    slots = torch.cat([s_ctx, s_reason, s_refine, s_conf], dim=-1)
    delta = F.linear(F.gelu(F.linear(slots, n1.weight, n1.bias)), n2.weight, n2.bias)
    delta = delta.clamp(-cfg.delta_clamp, cfg.delta_clamp)
    c1, c2 = r.confidence_head[0], r.confidence_head[2]
    p = torch.sigmoid(F.linear(F.gelu(F.linear(s_conf, c1.weight, c1.bias)), c2.weight, c2.bias))
    h_next = torch.where(active[..., None], h + cfg.delta_scale * p * delta, h)
    return h_next, u, p.squeeze(-1)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_blocks": 1},  # the main job's shape: packed rows and reused keys/values
        {"n_blocks": 2, "d_ctx": D},  # d_ctx = d_inner: a reasoning slot read from u would still run
        {"n_blocks": 1, "d_inner": 16, "use_gates": False},
    ],
)
def test_slot_step_matches_its_equations_values_and_gradients(kwargs):
    """In float64, so that the two computations agree to rounding (fp32's would hide small slips)."""
    r = refiner(**kwargs).double()
    first, halted, pad = masks()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, L, D, generator=g, dtype=torch.float64)
    backbone = torch.randn(B, L, 8, generator=g, dtype=torch.float64)
    actives = (first, halted, halted)
    results = {}
    for name in ("module", "naive"):
        h = x.clone().requires_grad_(True)
        out, state, u_prev, loss, outs = h, r.init_state(h), None, 0.0, []
        for active in actives:
            if name == "module":
                out, state, stats = r.step(out, state, context=backbone, active=active, attention_mask=pad)
                p = stats["confidence"]
            else:
                out, u_prev, p = naive_step(r, out, u_prev, backbone, active, pad)
            loss = loss + out[first].square().sum() + p[active].sum()
            outs += [out[first], p[active]]
        loss.backward()
        grads = {n: q.grad.clone() for n, q in r.named_parameters()}
        r.zero_grad(set_to_none=True)
        results[name] = (outs, h.grad, grads)
    module, naive = results["module"], results["naive"]
    assert (naive[0][0] - x[first]).abs().max() > 1e-3  # the steps move h (the reference is not vacuous)
    close = {"rtol": 1e-9, "atol": 1e-10}
    for a, b in zip(module[0], naive[0], strict=True):
        torch.testing.assert_close(a, b, **close)
    torch.testing.assert_close(module[1], naive[1], **close)
    assert module[2].keys() == naive[2].keys()
    for n in module[2]:
        torch.testing.assert_close(module[2][n], naive[2][n], **close, msg=n)


def test_the_clamp_binds_in_the_reference_setting():
    """The reference test above could not see a dropped clamp if no delta reached it."""
    r = refiner(n_blocks=1)
    seen = []
    handle = r.delta_net.register_forward_hook(lambda mod, inp, out: seen.append(out.detach()))
    x = torch.randn(B, L, D)
    r.step(x, r.init_state(x), context=torch.randn(B, L, 8))
    handle.remove()
    assert 0.05 < (seen[0].abs() > r.config.delta_clamp).float().mean() < 0.95


# --- key/value reuse -----------------------------------------------------------------------------------


def count_key_rows(r: SlotTRMRefiner, monkeypatch) -> list[int]:
    """Record how many rows each call of the single block's `keys_values` projects."""
    rows: list[int] = []
    block = r.blocks[0]
    original = block.keys_values
    monkeypatch.setattr(block, "keys_values", lambda u: (rows.append(u.shape[1]), original(u))[1])
    return rows


def test_kv_reuse_projects_only_the_changed_rows_and_changes_nothing(monkeypatch):
    r = refiner(n_blocks=1)
    first, halted, pad = masks()
    x, backbone = torch.randn(B, L, D), torch.randn(B, L, 8)
    rows = count_key_rows(r, monkeypatch)
    h, state = x, r.init_state(x)
    for active in (first, halted, halted):
        fresh = dataclasses.replace(state, reuse=None)  # the same step without anything to reuse
        expected, _, _ = r.step(h, fresh, context=backbone, active=active, attention_mask=pad)
        h, state, _ = r.step(h, state, context=backbone, active=active, attention_mask=pad)
        assert torch.equal(h, expected)
    # each step: L rows without reuse; with it, L at the first step, then the rows the last step changed
    assert rows == [L, L, L, 4, L, 4]  # Q: the most changed rows of a sequence


@pytest.mark.parametrize("change", ["copy", "in_place_h", "in_place_weight"])
def test_kv_reuse_is_skipped_when_its_contract_does_not_hold(change, monkeypatch):
    """Reuse needs step t+1 to get step t's output itself, unmodified, and the same block weights."""
    r = refiner(n_blocks=1)
    first, halted, pad = masks()
    x, backbone = torch.randn(B, L, D), torch.randn(B, L, 8)
    with torch.no_grad():
        h, state, _ = r.step(x, r.init_state(x), context=backbone, active=first, attention_mask=pad)
        if change == "copy":
            h = h.clone()
        elif change == "in_place_h":
            h[0, 0] += 1.0  # a row the step did not change: a stale key would be reused for it
        else:
            r.blocks[0].attn.k_proj.weight.mul_(1.5)  # as an optimizer step between steps would
        rows = count_key_rows(r, monkeypatch)
        out, _, _ = r.step(h, state, context=backbone, active=halted, attention_mask=pad)
        expected, _, _ = r.step(h, dataclasses.replace(state, reuse=None), context=backbone, active=halted,
                                attention_mask=pad)
    assert rows == [L, L] and torch.equal(out, expected)


# --- the seed's constructor keywords ---------------------------------------------------------------------


def test_seed_keywords_build_the_slot_config_refiner():
    torch.manual_seed(0)
    seed = SlotTRMRefiner(d_model=64, n_layers=2, n_heads=8, K=4, slot_dims=(32, 16, 16, 8), use_gating=True,
                          delta_scale=0.1)
    torch.manual_seed(0)
    canonical = SlotTRMRefiner(d_model=64, n_blocks=2, n_heads=8, num_steps=4, d_ctx=32, d_reason=16,
                               d_refine=16, d_conf=8, use_gates=True, delta_scale=0.1)
    assert seed.config == canonical.config
    a, b = seed.state_dict(), canonical.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cfg = SlotTRMRefiner(d_model=64, n_layers=1, K=3, slot_dims=[8, 4, 4, 2], use_gating=False).config
    assert (cfg.n_blocks, cfg.num_steps, cfg.use_gates) == (1, 3, False)
    assert (cfg.d_ctx, cfg.d_reason, cfg.d_refine, cfg.d_conf) == (8, 4, 4, 2)
    assert SlotTRMRefiner(SlotConfig(d_model=64), K=2).num_steps == 2  # aliases override a config too


def test_seed_constructor_at_llada_8b_width():
    """The original integration guide's call, as written."""
    start = time.perf_counter()
    r = SlotTRMRefiner(d_model=4096, n_layers=2, n_heads=8, K=4, slot_dims=(2048, 1024, 1024, 512),
                       use_gating=True, delta_scale=0.1)
    assert time.perf_counter() - start < 10  # a build, not a hang (about 0.3 s on a laptop CPU)
    cfg = r.config
    assert (cfg.n_blocks, cfg.num_steps, cfg.use_gates, cfg.slot_total) == (2, 4, True, 4608)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_layers": 2, "n_blocks": 2}, "n_layers .*n_blocks"),
        ({"K": 2, "num_steps": 2}, "K .*num_steps"),
        ({"use_gating": True, "use_gates": False}, "use_gating .*use_gates"),
        ({"slot_dims": (32, 16, 16, 8), "d_reason": 16}, "slot_dims .*d_reason"),
        ({"slot_dims": (32, 16, 16)}, "slot_dims must be 4 widths"),
        ({"slot_dims": 32}, "slot_dims must be 4 widths"),
    ],
)
def test_seed_keyword_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SlotTRMRefiner(d_model=64, **kwargs)
