"""Per-chunk halting (`HybridConfig.halting`: the confidence rule or none), the LM-head reads of a refine
call, and the equal-size MLP control. (Learned halting left the tree in issue 25: docs/levers.md.)"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tiny_assets import REPO
from torch import Tensor

from llada_trm.config import parse_config
from llada_trm.convert import convert_config
from llada_trm.errors import ConfigError
from llada_trm.model.hybrid import LLaDATRMHybrid
from llada_trm.model.hybrid_config import HybridConfig
from llada_trm.model.llada import LLaDAModel
from llada_trm.model.llada_config import LLaDAConfig
from llada_trm.model.refiners import build_refiner, slot_parameter_count
from llada_trm.model.refiners.config import MLPRefinerConfig, mlp_hidden_for_params, mlp_parameter_count

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


def test_halting_switch_is_validated_and_the_legacy_key_converts():
    assert HybridConfig().halting == "confidence"
    with pytest.raises(ConfigError, match="model.halt_on_confidence: a retired setting.*llada-trm convert"):
        parse_config({"model": {"halt_on_confidence": False}})  # legacy: `llada-trm convert` rewrites it
    assert convert_config({"model": {"halt_on_confidence": False}}).data == {"model": {"halting": "none"}}
    for rule in ("sometimes", "learned"):  # learned halting left the tree
        with pytest.raises(ConfigError, match="halting: expected one of 'confidence' or 'none'"):
            HybridConfig(halting=rule)
    with pytest.raises(ConfigError, match="halting_threshold: unknown key"):
        HybridConfig(halting_threshold=0.5)
    with pytest.raises(ConfigError, match="may not set"):
        HybridConfig(mlp={"d_model": 8})


def refine_counting(model: LLaDATRMHybrid, monkeypatch: pytest.MonkeyPatch) -> tuple[dict, list[int]]:
    """Eval-mode stats of one refine call and the rows it sent through the LM head (after the backbone's
    own logits, which `features` computes before the count starts)."""
    model.eval()
    with torch.no_grad():
        features = model.features(noisy_ids())
        seen = count_lm_head_rows(model, monkeypatch)
        return model.refine(features).stats, seen


def test_lm_head_reads_of_each_halting_rule(monkeypatch):
    refined_rows, all_rows = 2 * 8, 2 * 12  # two refined chunks of 4 positions per row; 12 positions per row
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
    for halting in ("none",):
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


# ---------------------------------------------------------------- the equal-size MLP control


def test_mlp_matched_to_the_slot_refiners_count_at_the_main_jobs_width():
    d_model = 4096  # LLaDA-8B; counted on the meta device
    slot = slot_parameter_count(d_model, context_dim=d_model)
    with torch.device("meta"):
        mlp = build_refiner("mlp", d_model, hidden_dim=mlp_hidden_for_params(d_model, slot))
    assert abs(mlp.num_parameters() - slot) <= 0.01 * slot
    assert mlp_hidden_for_params(d_model, slot) == 1604  # the documented width (docs/levers.md)


@pytest.mark.parametrize("halting", ["confidence", "none"])
def test_param_budget_slot_sizes_the_mlp_like_the_slot_refiner(halting):
    both = hybrid(integration="cascade", halting=halting, mlp={"param_budget": "slot"})
    slot, mlp = (both.refinement_head[k].num_parameters() for k in ("slot", "mlp"))
    assert abs(mlp - slot) <= 0.01 * slot and mlp != hybrid("mlp").refinement_head["mlp"].num_parameters()
    alone = hybrid("mlp", halting=halting, mlp={"param_budget": "slot"})  # without a slot refiner built
    assert alone.refinement_head["mlp"].num_parameters() == mlp


def test_mlp_parameter_count_is_the_built_count():
    for context_dim in (None, 24):
        mlp = build_refiner("mlp", D, hidden_dim=40, context_dim=context_dim)
        assert mlp.num_parameters() == mlp_parameter_count(D, 40, context_dim=context_dim)


def test_param_budget_errors():
    with pytest.raises(ConfigError, match="mlp sets both hidden_dim and param_budget"):
        MLPRefinerConfig(d_model=8, hidden_dim=8, param_budget=1000)
    with pytest.raises(ConfigError, match="hidden_dim: unknown key"):  # a run sizes the MLP by its budget
        HybridConfig(mlp={"hidden_dim": 8})
    with pytest.raises(ConfigError, match="below the smallest MLP refiner"):
        hybrid("mlp", mlp={"param_budget": 10})


# ---------------------------------------------------------------- the lever study's configs


def test_each_lever_arm_changes_only_its_lever():

    from llada_trm.study.config import load_compare_config

    study = load_compare_config(REPO / "configs" / "levers_tiny.yaml")
    assert study.reference == "slot" and study.baseline and len(study.seed_list()) == 3
    reference = study.run_for("slot", 0, "out").model_dump()

    def differences(arm: str) -> dict[str, Any]:
        changed = study.run_for(arm, 0, "out").model_dump()
        return {f"{section}.{key}": value for section, values in changed.items()
                for key, value in values.items() if value != reference[section][key]}  # fmt: skip

    matched = {**reference["model"]["mlp"], "param_budget": "slot"}
    assert differences("mlp_matched") == {"model.refiner": "mlp", "model.mlp": matched}
    phase2 = differences("phase2_top")
    assert phase2 == {"model.refiner": "none", "training.phase": 2, "training.unfreeze_last_n_layers": 1,
                      "training.backbone_lr": 1e-4, "training_params.trainable_modules": []}  # fmt: skip
