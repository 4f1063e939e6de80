"""`training.init_from`: phase 2/3 (or another phase-1 run) starts from a finished run's saved weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_assets import run_config, tiny_backbone, tiny_run

from llada_trm.config import parse_config
from llada_trm.errors import CheckpointError, ConfigError
from llada_trm.training.loop import Trainer

WEIGHTS = Path("checkpoints") / "last" / "model.safetensors"


def build(backbone: Path, out: Path, refiner: str = "slot", model: dict | None = None, **training) -> Trainer:
    raw = run_config(backbone, out, refiner=refiner, **{"eval_every": 0, "max_steps": 1, **training})
    raw["model"].update(model or {})
    return Trainer(parse_config(raw), progress=False)


def params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


@pytest.fixture(scope="module")
def phase1(tmp_path_factory) -> Path:
    """A finished 2-step phase-1 slot-refiner run (its output directory)."""
    return tiny_run(tmp_path_factory)


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> Path:
    return tiny_backbone(tmp_path_factory)


@pytest.fixture(scope="module")
def phase3(backbone, phase1, tmp_path_factory) -> Path:
    """One phase-3 step started from `phase1`: its checkpoint holds backbone tensors too."""
    out = tmp_path_factory.mktemp("phase3") / "run"
    build(backbone, out, phase=3, backbone_lr=1e-3, init_from=str(phase1)).train()
    return out


def test_phase3_starts_with_the_phase1_refiner(backbone, phase1, tmp_path):
    saved = load_file(str(phase1 / WEIGHTS))
    assert saved and all(name.startswith("refinement_head.") for name in saved)
    fresh = params(build(backbone, tmp_path / "fresh", phase=3))
    started = params(build(backbone, tmp_path / "p3", phase=3, init_from=str(phase1)))
    for name, tensor in saved.items():
        assert torch.equal(started[name], tensor), name
    assert any(not torch.equal(fresh[name], tensor) for name, tensor in saved.items())  # phase 1 trained
    untouched = [n for n in started if n not in saved]
    assert untouched and all(torch.equal(started[n], fresh[n]) for n in untouched)  # backbone as loaded


def test_backbone_tensors_are_loaded_and_kept(backbone, phase3, tmp_path):
    saved = load_file(str(phase3 / WEIGHTS))
    trained_backbone = [name for name in saved if name.startswith("backbone.")]
    assert trained_backbone
    checkpoint = phase3 / "checkpoints" / "last"
    trainer = build(backbone, tmp_path / "p1", phase=1, init_from=str(checkpoint))
    started = params(trainer)
    assert all(torch.equal(started[name], saved[name]) for name in saved)
    trainer.train()
    kept = load_file(str(tmp_path / "p1" / WEIGHTS))  # frozen here, but not the backbone directory's
    assert all(torch.equal(kept[name], saved[name]) for name in trained_backbone)


def test_init_from_errors_name_the_key_and_the_file(backbone, phase1, phase3, tmp_path):
    with pytest.raises(CheckpointError, match=r"^training\.init_from: .*nowhere: no such checkpoint"):
        build(backbone, tmp_path / "a", init_from=str(tmp_path / "nowhere"))
    with pytest.raises(CheckpointError, match=r"^training\.init_from: .*config\.yaml .*model\.refiner: slot"):
        build(backbone, tmp_path / "b", refiner="mlp", init_from=str(phase1))
    with pytest.raises(CheckpointError, match=r"^training\.init_from: .*model\.safetensors: .* has shape"):
        build(backbone, tmp_path / "c", model={"slot": {"n_heads": 2, "n_blocks": 1, "d_inner": 16}},
              init_from=str(phase1))
    with pytest.raises(ConfigError, match=r"^advanced\.feature_cache: training\.init_from"):
        raw = run_config(backbone, tmp_path / "d", init_from=str(phase3))
        raw["advanced"] = {"feature_cache": True}
        Trainer(parse_config(raw), progress=False)


def test_init_from_is_a_config_key():
    config = parse_config({"training": {"init_from": "outputs/phase1"}})
    assert config.training.init_from == "outputs/phase1"
    assert parse_config({}).training.init_from is None
