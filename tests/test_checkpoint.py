"""Checkpoint I/O: round trip, RNG states, validation errors, and atomicity under a crash mid-write."""

from __future__ import annotations

import dataclasses
import json
import os
import random

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from llada_trm import run_checkpoint as ckpt
from llada_trm.errors import CheckpointError
from llada_trm.run_checkpoint import (
    TrainState,
    capture_rng_state,
    load_trainer_state,
    load_weights,
    recorded_names,
    resolve_checkpoint_dir,
    restore_rng_state,
    save_checkpoint,
)


class Toy(nn.Module):
    def __init__(self, d: int = 4):
        super().__init__()
        self.backbone = nn.Linear(d, d)
        self.refinement_head = nn.ModuleDict({"mlp": nn.Linear(d, d)})


def head_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if n.startswith("refinement_head.")}


def save(directory, model, step: int, **extra):
    state = {"train_state": dataclasses.asdict(TrainState(step=step, epoch=1, batches_in_epoch=3)), **extra}
    weights = head_weights(model)
    return save_checkpoint(directory, weights=weights, trainer_state=state, config_yaml=f"step: {step}\n")


def test_round_trip(tmp_path):
    torch.manual_seed(0)
    model = Toy()
    opt = torch.optim.AdamW(model.refinement_head.parameters(), lr=1e-3)
    model.refinement_head["mlp"](torch.randn(2, 4)).sum().backward()
    opt.step()
    directory = save(tmp_path / "checkpoints" / "last", model, 7, optimizer=opt.state_dict())
    files = sorted(p.name for p in directory.iterdir())
    assert files == ["config.yaml", "model.safetensors", "trainer_state.pt"]

    fresh = Toy()
    names = load_weights(fresh, directory, require=head_weights(fresh))
    assert names == sorted(head_weights(model))
    for name, p in head_weights(fresh).items():
        assert torch.equal(p, head_weights(model)[name])
    assert not torch.equal(fresh.backbone.weight, model.backbone.weight)  # frozen parts are not saved

    state = load_trainer_state(directory)
    assert TrainState(**state["train_state"]) == TrainState(step=7, epoch=1, batches_in_epoch=3)
    opt2 = torch.optim.AdamW(fresh.refinement_head.parameters(), lr=1e-3)
    opt2.load_state_dict(state["optimizer"])
    assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    assert resolve_checkpoint_dir(tmp_path) == directory  # a run directory finds checkpoints/last


def test_rng_states_restore_every_stream(tmp_path):
    model = Toy()
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(4)
    state = capture_rng_state()
    directory = save(tmp_path / "c", model, 1, rng=state)
    first = (random.random(), np.random.rand(), torch.rand(2))
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    restore_rng_state(load_trainer_state(directory)["rng"])
    again = (random.random(), np.random.rand(), torch.rand(2))
    assert first[0] == again[0] and first[1] == again[1] and torch.equal(first[2], again[2])


def test_crash_while_writing_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    model = Toy()
    target = tmp_path / "checkpoints" / "last"
    save(target, model, 1)
    before = {n: p.detach().clone() for n, p in head_weights(model).items()}

    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    def crash(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt.torch, "save", crash)  # dies after the weights file, before the state file
    with pytest.raises(OSError, match="simulated"):
        save(target, model, 2)
    monkeypatch.undo()

    assert resolve_checkpoint_dir(target) == target
    fresh = Toy()
    load_weights(fresh, target)
    for name, p in head_weights(fresh).items():
        assert torch.equal(p, before[name])
    assert load_trainer_state(target)["train_state"]["step"] == 1

    save(target, model, 3)  # the next save cleans the half-written temporary directory up
    assert load_trainer_state(target)["train_state"]["step"] == 3
    assert sorted(p.name for p in target.parent.iterdir()) == ["last"]


def test_crash_between_the_renames_is_recovered(tmp_path, monkeypatch):
    model = Toy()
    target = tmp_path / "last"
    save(target, model, 1)
    real_replace = os.replace
    calls = []

    def replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # old moved aside, new not yet in place
            raise OSError("power cut (simulated)")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="simulated"):
        save(target, model, 2)
    monkeypatch.undo()
    assert not target.exists()
    aside = tmp_path / ".last.old"
    assert resolve_checkpoint_dir(target) == aside  # a reader reads the aside copy where it is
    assert load_trainer_state(aside)["train_state"]["step"] == 1
    assert aside.is_dir() and not target.exists()  # ... and renames nothing (a live writer may be mid-swap)
    save(target, model, 3)  # the writer (under the run's lock) puts it back, then swaps the new one in
    assert load_trainer_state(resolve_checkpoint_dir(target))["train_state"]["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]


def test_validation_errors(tmp_path):
    model = Toy()
    directory = save(tmp_path / "c", model, 1)

    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.refinement_head = nn.ModuleDict({"slot": nn.Linear(4, 4)})

    with pytest.raises(CheckpointError, match="do not exist in this model.*refinement_head.mlp"):
        load_weights(Other(), directory)
    with pytest.raises(CheckpointError, match=r"mlp\.bias has shape \(4,\), the model expects \(5,\)"):
        load_weights(Toy(d=5), directory)
    with pytest.raises(
        CheckpointError, match=r"lacks 1 of the 1 tensors this model needs \(backbone.weight\)"
    ):
        load_weights(Toy(), directory, require=["backbone.weight"])
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        resolve_checkpoint_dir(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a llada-trm checkpoint"):
        resolve_checkpoint_dir(tmp_path / "empty")
    (directory / "config.yaml").unlink()
    with pytest.raises(CheckpointError, match="incomplete checkpoint, missing config.yaml"):
        resolve_checkpoint_dir(directory)
    (directory / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="unreadable safetensors"):
        load_weights(Toy(), directory)
    (directory / "trainer_state.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="unreadable trainer state"):
        load_trainer_state(directory)


# ------------------------------------------------------------------------------ the record of tensor names


def rewrite(directory, change, metadata):
    """Rewrite a checkpoint's weights file: `change` the tensors, write `metadata` (None: none at all)."""
    path = directory / "model.safetensors"
    save_file(change(load_file(str(path))), str(path), metadata=metadata)


def test_a_checkpoint_records_the_names_it_holds(tmp_path):
    model = Toy()
    directory = save(tmp_path / "c", model, 1)
    path = directory / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        record = json.loads(f.metadata()[ckpt.TENSORS_KEY])
    assert record == sorted(head_weights(model)) == recorded_names(path)


def test_a_tensor_lost_since_the_save_is_refused_without_any_plan(tmp_path):
    directory = save(tmp_path / "c", Toy(), 1)
    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        metadata = f.metadata()
    rewrite(directory, lambda t: {k: v for k, v in t.items() if not k.endswith("bias")}, metadata)
    with pytest.raises(CheckpointError) as info:
        load_weights(Toy(), directory)  # no `require`: the record alone says what the file must hold
    message = str(info.value)
    assert "lacks 1 of the 2 tensors it records (refinement_head.mlp.bias)" in message
    assert "\n" not in message and "use an earlier checkpoint" in message


def test_a_checkpoint_saved_before_the_record_still_loads(tmp_path):
    model = Toy()
    directory = save(tmp_path / "c", model, 1)
    rewrite(directory, lambda t: t, None)  # as written before the record existed: no metadata at all
    fresh = Toy()
    assert load_weights(fresh, directory) == sorted(head_weights(model))
    assert recorded_names(directory / "model.safetensors") == sorted(head_weights(model))
    for name, p in head_weights(fresh).items():
        assert torch.equal(p, head_weights(model)[name])


def test_a_damaged_record_is_one_line(tmp_path):
    directory = save(tmp_path / "c", Toy(), 1)
    rewrite(directory, lambda t: t, {ckpt.TENSORS_KEY: "[1, 2"})
    with pytest.raises(CheckpointError, match="damaged 'tensors' record") as info:
        load_weights(Toy(), directory)
    assert "\n" not in str(info.value)
