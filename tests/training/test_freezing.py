"""Freezing by module-name patterns, the three phases, train/eval modes, optimizer groups, LR schedule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from llada_trm.errors import ConfigError
from llada_trm.training.freezing import apply_freezing, match_pattern, set_train_mode
from llada_trm.training.loop import build_optimizer, build_scheduler, resolve_warmup_steps, warmup_cosine


class ToyBackbone(nn.Module):
    def __init__(self, n_blocks: int = 3, d: int = 8):
        super().__init__()
        self.wte = nn.Embedding(16, d)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(d, d), nn.Dropout(0.5)) for _ in range(n_blocks))
        self.ln_f = nn.LayerNorm(d)
        self.ff_out = nn.Linear(d, 16, bias=False)


class ToyHybrid(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = ToyBackbone()
        self.refinement_head = nn.ModuleDict(
            {"slot": nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Dropout(0.5))}
        )


def freeze(model: nn.Module, phase: int = 1, **kwargs):
    defaults = dict(
        trainable_modules=["refinement_head"], lr=1e-3, backbone_lr=1e-5, unfreeze_last_n_layers=1
    )
    defaults.update(kwargs)
    return apply_freezing(model, phase=phase, **defaults)


def test_pattern_forms():
    assert match_pattern("refinement_head", "refinement_head.slot.0.weight")
    assert match_pattern("refinement_head", "refinement_head")
    assert not match_pattern("refinement_head", "refinement_head_old.weight")  # whole components only
    assert not match_pattern("slot", "refinement_head.slot.0.weight")  # plain names are prefixes
    assert match_pattern("*.slot", "refinement_head.slot.0.weight")  # globs match whole names (or below)
    assert match_pattern("backbone.blocks.*.0", "backbone.blocks.2.0.bias")
    assert match_pattern(r"re:blocks\.(1|2)\.", "backbone.blocks.2.0.weight")
    assert not match_pattern(r"re:blocks\.(1|2)\.", "backbone.blocks.0.0.weight")


def test_phase1_trains_only_the_refiner_and_reports_counts():
    model = ToyHybrid()
    plan = freeze(model, phase=1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if n.startswith("refinement_head.")}
    assert plan.backbone_frozen
    head = sum(p.numel() for p in model.refinement_head.parameters())
    total = sum(p.numel() for p in model.parameters())
    assert plan.trainable_params == head and plan.total_params == total
    report = plan.report()
    assert f"{head / 1e6:10.3f}M" in report and f"{100 * head / total:6.2f}%" in report
    assert "trainable params" in report and "frozen params" in report and "total params" in report


def test_unmatched_pattern_stops_with_existing_module_names():
    # Regression: a pattern matching nothing fails at once, not as "optimizer got an empty parameter list".
    model = ToyHybrid()
    with pytest.raises(ConfigError) as info:
        freeze(model, trainable_modules=["refiner"])
    message = str(info.value)
    assert "training_params.trainable_modules" in message and "'refiner'" in message
    assert "backbone, refinement_head" in message
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        freeze(model, trainable_modules=["re:(("])


def test_pattern_may_name_a_single_parameter():
    model = ToyHybrid()
    plan = freeze(model, trainable_modules=["backbone.ln_f.weight"])
    assert plan.trainable_names == ["backbone.ln_f.weight"]
    assert not plan.backbone_frozen


def test_phase2_unfreezes_last_blocks_with_their_own_lr():
    model = ToyHybrid()
    plan = freeze(model, phase=2, unfreeze_last_n_layers=2)
    groups = {g.name: g for g in plan.groups}
    assert groups["head"].lr == 1e-3 and groups["backbone"].lr == 1e-5
    assert set(groups["backbone"].params) == {
        f"backbone.blocks.{i}.0.{k}" for i in (1, 2) for k in ("weight", "bias")
    }
    assert not model.backbone.blocks[0][0].weight.requires_grad
    assert not model.backbone.wte.weight.requires_grad and not model.backbone.ff_out.weight.requires_grad
    with pytest.raises(ConfigError, match=r"unfreeze_last_n_layers: expected 1\.\.3"):
        freeze(ToyHybrid(), phase=2, unfreeze_last_n_layers=5)


def test_phase3_trains_everything_backbone_at_backbone_lr():
    model = ToyHybrid()
    plan = freeze(model, phase=3)
    assert all(p.requires_grad for p in model.parameters())
    groups = {g.name: g for g in plan.groups}
    backbone = {n for n, _ in model.named_parameters() if n.startswith("backbone.")}
    assert set(groups["backbone"].params) == backbone
    assert plan.trainable_params == plan.total_params


def test_frozen_parts_stay_in_eval_mode_after_train():
    model = ToyHybrid()
    freeze(model, phase=2, unfreeze_last_n_layers=1)
    set_train_mode(model)
    assert model.refinement_head.slot[2].training  # the refiner's dropout is active
    assert not model.backbone.blocks[0].training and not model.backbone.blocks[0][1].training
    assert model.backbone.blocks[2].training and model.backbone.blocks[2][1].training  # unfrozen block
    assert not model.backbone.ln_f.training
    set_train_mode(model, False)
    assert not any(m.training for m in model.modules())


def test_optimizer_groups_split_decay_and_keep_lrs():
    model = ToyHybrid()
    plan = freeze(model, phase=2)
    opt = build_optimizer(plan.groups, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-7)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert set(by_name) == {"head", "head/no_decay", "backbone", "backbone/no_decay"}
    assert by_name["head"]["weight_decay"] == 0.1 and by_name["head/no_decay"]["weight_decay"] == 0.0
    assert by_name["backbone"]["lr"] == 1e-5 and opt.defaults["eps"] == 1e-7
    assert all(p.ndim >= 2 for p in by_name["head"]["params"])


def test_warmup_then_cosine_per_group():
    assert warmup_cosine(0, warmup_steps=4, total_steps=20) == pytest.approx(0.25)
    assert warmup_cosine(3, warmup_steps=4, total_steps=20) == pytest.approx(1.0)
    assert warmup_cosine(12, warmup_steps=4, total_steps=20) == pytest.approx(0.5)  # half-way down the cosine
    assert warmup_cosine(20, warmup_steps=4, total_steps=20, min_ratio=0.1) == pytest.approx(0.1)
    assert resolve_warmup_steps(100, None, 0.05) == 5 and resolve_warmup_steps(100, 200, 0.05) == 100

    model = ToyHybrid()
    plan = freeze(model, phase=2)
    opt = build_optimizer(plan.groups, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
    sched = build_scheduler(opt, warmup_steps=2, total_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert lrs[0][0] == pytest.approx(0.5e-3) and lrs[1][0] == pytest.approx(1e-3)
    backbone = [g["name"] for g in opt.param_groups].index("backbone")
    assert lrs[1][backbone] == pytest.approx(1e-5)  # each group follows its own base LR
    expected = 1e-3 * 0.5 * (1 + math.cos(math.pi * 4 / 8))
    assert lrs[6][0] == pytest.approx(expected)
    assert torch.isfinite(torch.tensor(lrs)).all()
