"""Learned per-chunk halting (`HybridConfig.halting`), its loss, and the equal-size MLP control."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

from llada_trm.backbone.config import LLaDAConfig
from llada_trm.backbone.modeling import LLaDAModel
from llada_trm.errors import ConfigError
from llada_trm.hybrid.config import HybridConfig
from llada_trm.hybrid.model import BackboneFeatures, LLaDATRMHybrid
from llada_trm.refiners import build_refiner, slot_parameter_count
from llada_trm.refiners.config import mlp_hidden_for_params, mlp_parameter_count
from llada_trm.training.objective import LossWeights, diffusion_objective, halting_loss

VOCAB, MASK, D, K, CHUNK = 50, 49, 32, 4, 4


def hybrid(refiner: str = "slot", **kwargs: Any) -> LLaDATRMHybrid:
    torch.manual_seed(0)
    backbone = LLaDAModel(
        LLaDAConfig(
            d_model=D, n_heads=2, n_layers=2, vocab_size=VOCAB, mlp_hidden_size=64, max_sequence_length=64,
            mask_token_id=MASK, eos_token_id=48, pad_token_id=48,
        )
    ).eval()  # fmt: skip
    config = dict(refiner=refiner, max_recursive_steps=K, chunk_size=CHUNK, confidence_threshold=2.0)
    config.update(kwargs)
    config.setdefault("slot", {"n_heads": 2, "n_blocks": 1})
    return LLaDATRMHybrid(backbone, HybridConfig(**config))


def noisy_ids(batch: int = 2, length: int = 12) -> Tensor:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, MASK - 1, (batch, length), generator=g)
    ids[:, length // 3 :] = MASK  # chunk 0 holds no mask: it is never refined
    return ids


def force_halting(model: LLaDATRMHybrid, bias: float) -> None:
    for refiner in model.refinement_head.values():
        torch.nn.init.constant_(refiner.halting_head.proj.bias, bias)


def count_lm_head_rows(model: LLaDATRMHybrid, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Rows the hybrid actually sends through the backbone's LM head (its logits pass excluded)."""
    seen: list[int] = []
    original = model.backbone.lm_head

    def counting(h: Tensor) -> Tensor:
        seen.append(h.reshape(-1, h.shape[-1]).shape[0])
        return original(h)

    monkeypatch.setattr(model.backbone, "lm_head", counting)
    return seen


# ---------------------------------------------------------------- the config switch


def test_halting_switch_is_validated_and_reads_the_legacy_key():
    assert HybridConfig().halting == "confidence"
    assert HybridConfig(halt_on_confidence=False).halting == "none"
    assert HybridConfig.from_dict({"halt_on_confidence": True}).halting == "confidence"
    assert HybridConfig(halt_on_confidence=True, halting="learned").halting == "learned"  # the new key wins
    with pytest.raises(ConfigError, match="halting: expected one of 'confidence', 'learned' or 'none'"):
        HybridConfig(halting="sometimes")
    with pytest.raises(ConfigError, match="halting_threshold"):
        HybridConfig(halting_threshold=1.5)
    with pytest.raises(ConfigError, match="may not set"):
        HybridConfig(mlp={"learned_halting": True})


def test_only_learned_halting_builds_heads():
    assert hybrid().refinement_head["slot"].halting_head is None
    model = hybrid(integration="cascade", halting="learned")
    assert all(r.halting_head is not None for r in model.refinement_head.values())
    names = model.refiner_state_dict()  # saved with the refiner, trained by `refinement_head`
    assert "refinement_head.slot.halting_head.proj.weight" in names


# ---------------------------------------------------------------- halting decisions


@pytest.mark.parametrize("refiner", ["slot", "mlp"])
@pytest.mark.parametrize("training", [False, True])
def test_always_halt_gives_one_step_and_never_gives_k(refiner, training):
    model = hybrid(refiner, halting="learned").train(training)
    force_halting(model, 30.0)
    stats = model(noisy_ids()).stats
    assert stats["steps_per_chunk"].tolist() == [[0, 1, 1], [0, 1, 1]]
    assert stats["chunks_halted"] == stats["chunks_refined"] == 4 and stats["refine_steps"] == 1.0

    force_halting(model, -30.0)
    stats = model(noisy_ids()).stats
    assert stats["steps_per_chunk"].tolist() == [[0, K, K], [0, K, K]]
    assert stats["chunks_halted"] == 0 and stats["refine_steps"] == K


def test_untrained_head_halts_nothing_and_the_threshold_decides():
    model = hybrid("mlp", halting="learned").train()
    out = model(noisy_ids())
    assert out.stats["chunks_halted"] == 0  # zero-initialised: p = 0.5, not > 0.5
    assert all(bool((q == 0).all()) for q in out.halt_logits)
    model.eval()
    model.config.halting_threshold = 0.4
    assert model(noisy_ids()).stats["steps_per_chunk"].tolist() == [[0, 1, 1], [0, 1, 1]]


def refine_counting(model: LLaDATRMHybrid, monkeypatch: pytest.MonkeyPatch) -> tuple[dict, list[int]]:
    """Eval-mode stats of one refine call and the rows it sent through the LM head (after the backbone's
    own logits, which `features` computes before the count starts)."""
    model.eval()
    with torch.no_grad():
        features = model.features(noisy_ids())
        seen = count_lm_head_rows(model, monkeypatch)
        return model.refine(features).stats, seen


def test_learned_halting_runs_no_lm_head_inside_the_loop(monkeypatch):
    refined_rows, all_rows = 2 * 8, 2 * 12  # two refined chunks of 4 positions per row; 12 positions per row
    learned = hybrid(halting="learned", chunk_selection="all")
    force_halting(learned, -30.0)  # K steps, so a probe would have run K - 1 times
    stats, seen = refine_counting(learned, monkeypatch)
    assert stats["steps_per_chunk"].tolist() == [[0, K, K], [0, K, K]]
    assert seen == [all_rows] and stats["lm_head_rows"] == 0  # the one output pass, nothing else

    probing = hybrid(halting="confidence", confidence_threshold=1.5)  # refines all, never confident
    stats, seen = refine_counting(probing, monkeypatch)
    assert stats["steps_per_chunk"].tolist() == [[0, K, K], [0, K, K]]
    assert stats["lm_head_rows"] == K * refined_rows  # K - 1 probes + the refined rows' final logits
    assert seen == [all_rows] + [refined_rows] * K  # the backbone's logits first: the selection reads them
    stats, seen = refine_counting(hybrid(halting="none"), monkeypatch)
    assert stats["lm_head_rows"] == refined_rows and seen == [all_rows, refined_rows]
    stats, seen = refine_counting(hybrid(halting="none", chunk_selection="all"), monkeypatch)
    assert stats["lm_head_rows"] == 0 and seen == [all_rows]  # the recipe: one LM-head read per call


def test_unmasked_positions_of_refined_chunks_keep_the_backbones_logits(monkeypatch):
    ids = noisy_ids()
    ids[:, 5] = 3  # chunk 1 (positions 4-7) is refined but now holds a committed token
    for halting in ("none", "learned"):
        for selection in ("confidence", "all"):
            model = hybrid(halting=halting, chunk_selection=selection).eval()
            with torch.no_grad():
                features = model.features(ids)
                seen = count_lm_head_rows(model, monkeypatch)
                out = model.refine(features)
                passes = list(seen)
                base = features.base_logits
            masked = ids == MASK
            assert out.stats["steps_per_chunk"].tolist() == [[0, K, K], [0, K, K]]
            # 'all': one pass over every row (the refined states at the masked rows); 'confidence': the
            # backbone's logits, which the selection reads, then the refined chunks' masked rows
            assert passes == ([ids.numel()] if selection == "all" else [ids.numel(), int(masked.sum())])
            assert torch.equal(out.logits[~masked], base[~masked])
            assert not torch.equal(out.hidden_states[:, 5], features.hidden_states[:, 5])  # still refined
            assert not torch.allclose(out.logits[masked], base[masked])


def test_learned_halting_needs_a_head():
    model = hybrid("mlp", halting="learned")
    model.refinement_head["mlp"].halting_head = None
    with pytest.raises(ValueError, match="has no halting head"):
        model(noisy_ids())


# ---------------------------------------------------------------- the loss and its gradients


def objective(model: LLaDATRMHybrid, weights: LossWeights) -> tuple[Any, Tensor]:
    """The training objective on a fixed random batch; returns the result and the batch's targets."""
    torch.manual_seed(1)
    targets = torch.randint(3, MASK - 1, (2, 12))
    lengths = {"prompt_lengths": torch.tensor([2, 2]), "answer_lengths": torch.tensor([10, 10])}
    batch = {"input_ids": targets, **lengths}
    return diffusion_objective(model, batch, mask_id=MASK, weights=weights, chunk_size=CHUNK), targets


def test_halting_loss_trains_the_head_alone():
    model = hybrid(halting="learned").train()
    for p in model.parameters():  # the backbone too: nothing but the head may receive the halting gradient
        p.requires_grad_(True)
    head = {n for n, _ in model.named_parameters() if ".halting_head." in n}
    proj = model.refinement_head["slot"].halting_head.proj
    torch.nn.init.normal_(proj.weight, std=0.01)  # a gradient path to h (a zero weight would hide a leak)
    torch.nn.init.constant_(proj.bias, -5.0)  # and no chunk halts: K steps, K halting logits
    result, targets = objective(model, LossWeights(deep_supervision=0.3, orthogonality=0.0, halting=0.0))
    out = result.output
    assert len(out.halt_logits) == len(out.halt_chunks) == len(out.step_logits) == K
    assert float(result.terms["loss_halting"]) == 0.0

    loss = halting_loss(out, targets, result.masked, CHUNK)
    loss.backward(retain_graph=True)
    grads = {n for n, p in model.named_parameters() if p.grad is not None and bool(p.grad.abs().sum() > 0)}
    assert grads and grads <= head  # the bias at least; nothing outside the head

    model.zero_grad(set_to_none=True)
    result.loss.backward()  # the main loss (deep supervision included) never reaches the head
    assert all(p.grad is None or not bool(p.grad.any()) for n, p in model.named_parameters() if n in head)
    rest = [p.grad for n, p in model.named_parameters() if n not in head]
    assert any(g is not None and bool(g.any()) for g in rest)


def test_halting_loss_targets_are_whole_chunks_right():
    """One step, two chunks: chunk 0 all right -> target 1, chunk 1 one wrong position -> target 0."""
    targets = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8]])
    masked = torch.tensor([[True, True, False, True, True, True, True, True]])
    predicted = targets.clone()
    predicted[0, 2] = 9  # unmasked: does not count
    predicted[0, 6] = 9  # masked and wrong
    logits = torch.nn.functional.one_hot(predicted, VOCAB).float()
    q = torch.tensor([[2.0, -1.0]], requires_grad=True)

    class Out:
        halt_logits, halt_chunks, step_logits = [q], [torch.tensor([[True, True]])], [logits]

    loss = halting_loss(Out(), targets, masked, 4)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(q.detach()[0], torch.tensor([1.0, 0.0]))
    assert loss.item() == pytest.approx(expected.item())
    Out.halt_chunks = [torch.tensor([[True, False]])]  # an inactive chunk is left out
    one = torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor(2.0), torch.tensor(1.0))
    assert halting_loss(Out(), targets, masked, 4).item() == pytest.approx(one.item())


def test_objective_adds_the_weighted_halting_term():
    model = hybrid(halting="learned").train()
    plain, _ = objective(model, LossWeights(orthogonality=0.0, halting=0.0))
    weighted, _ = objective(model, LossWeights(orthogonality=0.0, halting=2.0))
    halt = float(weighted.terms["loss_halting"])
    total = float(weighted.terms["loss"])
    assert halt > 0 and total == pytest.approx(float(plain.terms["loss"]) + 2.0 * halt, rel=1e-5)
    head = model.refinement_head["slot"].halting_head.proj
    weighted.loss.backward()
    assert head.bias.grad is not None and bool(head.bias.grad.abs().sum() > 0)


# ---------------------------------------------------------------- the equal-size MLP control


def test_mlp_matched_to_the_slot_refiners_count_at_the_main_jobs_width():
    d_model = 4096  # LLaDA-8B; counted on the meta device
    slot = slot_parameter_count(d_model, context_dim=d_model)
    with torch.device("meta"):
        mlp = build_refiner("mlp", d_model, hidden_dim=mlp_hidden_for_params(d_model, slot))
    assert abs(mlp.num_parameters() - slot) <= 0.01 * slot
    assert mlp_hidden_for_params(d_model, slot) == 1604  # the documented width (docs/levers.md)


@pytest.mark.parametrize("halting", ["confidence", "learned"])
def test_param_budget_slot_sizes_the_mlp_like_the_slot_refiner(halting):
    both = hybrid(integration="cascade", halting=halting, mlp={"param_budget": "slot"})
    slot, mlp = (both.refinement_head[k].num_parameters() for k in ("slot", "mlp"))
    assert abs(mlp - slot) <= 0.01 * slot and mlp != hybrid("mlp").refinement_head["mlp"].num_parameters()
    alone = hybrid("mlp", halting=halting, mlp={"param_budget": "slot"})  # without a slot refiner built
    assert alone.refinement_head["mlp"].num_parameters() == mlp


def test_mlp_parameter_count_is_the_built_count():
    for context_dim in (None, 24):
        for learned in (False, True):
            mlp = build_refiner("mlp", D, hidden_dim=40, context_dim=context_dim, learned_halting=learned)
            count = mlp_parameter_count(D, 40, context_dim=context_dim, learned_halting=learned)
            assert mlp.num_parameters() == count


def test_param_budget_errors():
    with pytest.raises(ConfigError, match="mlp sets both hidden_dim and param_budget"):
        HybridConfig(mlp={"hidden_dim": 8, "param_budget": 1000})
    with pytest.raises(ConfigError, match="below the smallest MLP refiner"):
        hybrid("mlp", mlp={"param_budget": 10})


def test_learned_halting_features_path_matches_forward():
    """`refine(features)` (the feature cache's path) halts as `forward` does."""
    model = hybrid("mlp", halting="learned").eval()
    force_halting(model, 30.0)
    ids = noisy_ids()
    features = model.features(ids)
    cached = BackboneFeatures(hidden_states=features.hidden_states, base_logits=features.base_logits)
    out = model.refine(cached, ids == MASK)
    assert torch.equal(out.logits, model(ids).logits)
    assert out.stats["steps_per_chunk"].tolist() == [[0, 1, 1], [0, 1, 1]]


# ---------------------------------------------------------------- the lever study's configs


def test_each_lever_arm_changes_only_its_lever():
    from pathlib import Path

    from llada_trm.compare import load_compare_config

    study = load_compare_config(Path(__file__).resolve().parents[1] / "configs" / "levers_tiny.yaml")
    assert study.reference == "slot" and study.baseline and len(study.seed_list()) == 3
    reference = study.run_for("slot", 0, "out").model_dump()

    def differences(arm: str) -> dict[str, Any]:
        changed = study.run_for(arm, 0, "out").model_dump()
        return {f"{section}.{key}": value for section, values in changed.items()
                for key, value in values.items() if value != reference[section][key]}  # fmt: skip

    matched = {**reference["model"]["mlp"], "hidden_mult": None, "param_budget": "slot"}
    assert differences("mlp_matched") == {"model.refiner": "mlp", "model.mlp": matched}
    assert differences("slot_halting") == {"model.halting": "learned"}  # weight 1.0: the default
    phase2 = differences("phase2_top")
    assert phase2 == {"model.refiner": "none", "training.phase": 2, "training.unfreeze_last_n_layers": 1,
                      "training.backbone_lr": 1e-4, "training_params.trainable_modules": []}  # fmt: skip
