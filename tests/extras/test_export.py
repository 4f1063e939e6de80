"""Backbone fingerprints on refiner checkpoints, and `llada-trm export` read back by `load_checkpoint`."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_assets import TINY_SAMPLING, run_config, save_tiny_backbone

from llada_trm import load_checkpoint
from llada_trm.cli import main
from llada_trm.config import parse_config
from llada_trm.data.tokenizer import load_tokenizer
from llada_trm.errors import CheckpointError, UserError
from llada_trm.extras.export import export_run
from llada_trm.model.fingerprint import BackboneMismatchError, directory_fingerprint, model_fingerprint
from llada_trm.model.hybrid import LLaDATRMHybrid
from llada_trm.model.hybrid_config import HybridConfig
from llada_trm.model.llada import LLaDAModel
from llada_trm.training.loop import Trainer

QUESTIONS = ["Ann has 3 pens. She buys 2 more. How many pens?", "Bo has 7 cups. He breaks 2. How many?"]


def _train(raw: dict, **kwargs) -> Trainer:
    trainer = Trainer(parse_config(raw), progress=False, **kwargs)
    trainer.train()
    return trainer


@pytest.fixture(scope="module")
def phase2_run(tmp_path_factory, backbone_dir) -> Path:
    """A 2-step phase-2 run (the refiner and the last backbone layer trained), with a validation row and
    the run's own sampler settings."""
    out = tmp_path_factory.mktemp("export_run") / "run"
    raw = run_config(backbone_dir, out, phase=2, unfreeze_last_n_layers=1, backbone_lr=1e-2)
    raw["sampling"] = dict(TINY_SAMPLING)
    _train(raw)
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory, phase2_run) -> Path:
    out = tmp_path_factory.mktemp("export_out") / "model"
    export_run(phase2_run, out)
    return out


def _generations(loaded) -> tuple[list[str], torch.Tensor]:
    answers = loaded.generate(QUESTIONS, gen_length=16, block_length=8, steps=8).answers
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, loaded.model.mask_token_id, loaded.model.mask_token_id]])
    with torch.no_grad():
        logits = loaded.model(ids).logits
    return answers, logits


# ------------------------------------------------------------------------------------------- fingerprint


def test_fingerprint_ignores_layout_and_dtype_but_sees_the_weights(backbone_dir, tmp_path):
    stored = directory_fingerprint(backbone_dir)
    model = LLaDAModel.from_pretrained(backbone_dir)
    assert model_fingerprint(model) == stored
    assert model_fingerprint(LLaDAModel.from_pretrained(backbone_dir, dtype=torch.bfloat16)) == stored
    model.save_pretrained(tmp_path / "sharded", max_shard_size="150KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    assert directory_fingerprint(tmp_path / "sharded") == stored
    with torch.no_grad():  # one sampled row of one layer, nudged: another backbone
        model.transformer.blocks[1].ff_out.weight[-1] += 1e-2
    assert model_fingerprint(model) != stored


def test_refiner_file_refuses_another_backbone_unless_allowed(backbone_dir, tmp_path, caplog):
    config = HybridConfig(refiner="mlp", max_recursive_steps=1, chunk_size=8)
    model = LLaDATRMHybrid.from_pretrained(backbone_dir, config)
    path = model.save_refiner(tmp_path / "refiner.safetensors")
    save_tiny_backbone(tmp_path / "other", load_tokenizer(backbone_dir), seed=1)
    other = LLaDATRMHybrid.from_pretrained(tmp_path / "other", config)
    with pytest.raises(BackboneMismatchError, match="--allow-backbone-mismatch"):
        other.load_refiner(path)
    with caplog.at_level(logging.WARNING, logger="llada_trm"):
        other.load_refiner(path, allow_backbone_mismatch=True)
    assert "loading it anyway" in caplog.text
    for name, tensor in other.refiner_state_dict().items():
        assert torch.equal(tensor, model.refiner_state_dict()[name])
    tensors = load_file(str(path))  # a file saved before fingerprints: loads, with a warning
    save_file(tensors, str(path), metadata={"integration": "replace", "refiners": "mlp"})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="llada_trm"):
        other.load_refiner(path)
    assert "records no backbone fingerprint" in caplog.text


@pytest.fixture(scope="module")
def swapped_run(tmp_path_factory, backbone_dir) -> tuple[Path, Path, dict]:
    """A run whose backbone directory was overwritten with other weights after it trained (same shapes:
    what re-running `pretrain` into the same folder does)."""
    root = tmp_path_factory.mktemp("swapped")
    backbone = root / "backbone"
    shutil.copytree(backbone_dir, backbone)
    raw = run_config(backbone, root / "run")
    _train(raw)
    before = directory_fingerprint(backbone)
    save_tiny_backbone(backbone, load_tokenizer(backbone), seed=1)
    assert directory_fingerprint(backbone) != before
    return root / "run", backbone, raw


def test_run_on_an_overwritten_backbone_is_refused_naming_both_fingerprints(swapped_run, caplog):
    run, backbone, _ = swapped_run
    with pytest.raises(BackboneMismatchError) as error:
        load_checkpoint(run, device="cpu")
    message = str(error.value)
    assert "\n" not in message and "--allow-backbone-mismatch" in message
    assert directory_fingerprint(backbone)[:16] in message
    with caplog.at_level(logging.WARNING, logger="llada_trm"):
        loaded = load_checkpoint(run, device="cpu", allow_backbone_mismatch=True)
    assert loaded.kind == "run" and "loading it anyway" in caplog.text


def test_cli_eval_and_generate_refuse_then_take_the_override(swapped_run, capsys):
    run, _, _ = swapped_run
    args = ["generate", "--checkpoint", str(run), "--device", "cpu", "--gen-length", "8",
            "--block-length", "8", "--steps", "2", QUESTIONS[0]]
    assert main(args) == 2
    assert "--allow-backbone-mismatch" in capsys.readouterr().err
    assert main([*args, "--allow-backbone-mismatch"]) == 0


def test_resume_and_init_from_refuse_another_backbone_unless_allowed(swapped_run, tmp_path):
    run, _, raw = swapped_run
    longer = {**raw, "training": {**raw["training"], "max_steps": 3}}
    with pytest.raises(BackboneMismatchError):
        Trainer(parse_config(longer), progress=False).resume(run)
    Trainer(parse_config(longer), progress=False, allow_backbone_mismatch=True).resume(run)
    fresh = {**raw, "output": {"dir": str(tmp_path / "next")}}
    fresh["training"] = {**raw["training"], "init_from": str(run)}
    with pytest.raises(BackboneMismatchError, match="training.init_from"):
        Trainer(parse_config(fresh), progress=False)
    Trainer(parse_config(fresh), progress=False, allow_backbone_mismatch=True)


def test_checkpoint_saved_before_fingerprints_loads_with_a_warning(phase2_run, tmp_path, caplog):
    old = tmp_path / "old"
    shutil.copytree(phase2_run / "checkpoints" / "last", old)
    weights = old / "model.safetensors"
    save_file(load_file(str(weights)), str(weights), metadata={"format": "pt", "llada_trm_format": "1"})
    with caplog.at_level(logging.WARNING, logger="llada_trm"):
        loaded = load_checkpoint(old, device="cpu")
    assert "records no backbone fingerprint" in caplog.text and loaded.kind == "run"


# ------------------------------------------------------------------------------------------------ export


def test_export_round_trip_generates_token_for_token_as_the_run(phase2_run, exported):
    run, export = load_checkpoint(phase2_run, device="cpu"), load_checkpoint(exported, device="cpu")
    assert export.kind == "export" and export.refiner == run.refiner == "slot"
    assert export.sampling == run.sampling and export.sampling.gen_length == TINY_SAMPLING["gen_length"]
    run_answers, run_logits = _generations(run)
    export_answers, export_logits = _generations(export)
    assert export_answers == run_answers
    assert torch.equal(export_logits, run_logits)
    # Phase 2 trained backbone tensors: the export carries them, not the pretrained backbone's.
    base = LLaDAModel.from_pretrained(run.backbone_dir).state_dict()
    trained = {n: t for n, t in export.model.backbone.state_dict().items() if not torch.equal(t, base[n])}
    assert trained and all(".blocks.1." in name for name in trained)


def test_export_is_self_contained(phase2_run, exported, backbone_dir, tmp_path):
    files = sorted(p.name for p in exported.iterdir())
    for name in ("config.json", "model.safetensors", "refiner.safetensors", "tokenizer.json", "README.md"):
        assert name in files
    for path in exported.iterdir():
        data = path.read_bytes()
        for other in (phase2_run, backbone_dir):
            for spelling in {str(other), str(other.resolve())}:
                assert spelling.encode() not in data, (path.name, spelling)
    card = (exported / "README.md").read_text(encoding="utf-8")
    assert "Validation at step 2" in card and "| loss |" in card
    moved = tmp_path / "elsewhere"  # a copy with the run gone from reach: nothing else is read
    shutil.copytree(exported, moved)
    aside = phase2_run.with_name("run-aside")
    phase2_run.rename(aside)
    try:
        loaded = load_checkpoint(moved, device="cpu")
        assert loaded.generate(QUESTIONS[:1]).answers
    finally:
        aside.rename(phase2_run)


def test_export_refuses_an_existing_directory_without_force(phase2_run, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="--force"):
        export_run(phase2_run, out)
    assert main(["export", str(phase2_run), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and (out / "keep.txt").is_file()
    with pytest.raises(UserError, match="holds the run"):
        export_run(phase2_run, phase2_run.parent, force=True)
    capsys.readouterr()
    # --force archives only what export writes (a model directory): a folder of one's own is refused
    assert main(["export", str(phase2_run), "--out", str(out), "--force"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no config.json" in err[0] and (out / "keep.txt").read_text() == "mine"


def test_export_force_archives_the_previous_export(phase2_run, tmp_path):
    out = tmp_path / "out"
    assert main(["export", str(phase2_run), "--out", str(out)]) == 0
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["export", str(phase2_run), "--out", str(out), "--force", "--dtype", "bfloat16"]) == 0
    archived = list(tmp_path.glob("out.old-*"))
    assert len(archived) == 1  # renamed, never deleted
    assert {p.name: p.read_bytes() for p in archived[0].iterdir()} == first
    loaded = load_checkpoint(out, device="cpu", dtype="bfloat16")
    assert loaded.model.backbone.transformer.wte.weight.dtype == torch.bfloat16


def test_export_with_a_swapped_backbone_is_refused_unless_allowed(exported, backbone_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(exported, copy)
    other = tmp_path / "other"
    save_tiny_backbone(other, load_tokenizer(backbone_dir), seed=1)
    shutil.copy(other / "model.safetensors", copy / "model.safetensors")
    with pytest.raises(BackboneMismatchError, match="refiner weights"):
        load_checkpoint(copy, device="cpu")
    assert load_checkpoint(copy, device="cpu", allow_backbone_mismatch=True).kind == "export"


def _export_copy(exported: Path, tmp_path: Path, refiner_file: object = None) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(exported, copy)
    if refiner_file is not None:
        raw = json.loads((copy / "config.json").read_text())
        raw["llada_trm"]["refiner_file"] = refiner_file
        (copy / "config.json").write_text(json.dumps(raw))
    return copy


@pytest.mark.parametrize("name", ["../refiner.safetensors", "../../etc/refiner", "/abs/refiner.safetensors",
                                  "sub/refiner.safetensors", "..", 7])  # fmt: skip
def test_an_export_may_only_name_its_own_files(exported, tmp_path, name):
    copy = _export_copy(exported, tmp_path, name)
    shutil.copy(copy / "refiner.safetensors", tmp_path / "refiner.safetensors")  # a file `..` would reach
    with pytest.raises(CheckpointError, match="refiner_file .* must be a file name inside the export"):
        load_checkpoint(copy, device="cpu")


def test_an_export_refiner_file_linking_outside_is_refused(exported, tmp_path):
    copy = _export_copy(exported, tmp_path)
    (copy / "refiner.safetensors").rename(tmp_path / "elsewhere.safetensors")
    (copy / "refiner.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(CheckpointError, match="links outside the export"):
        load_checkpoint(copy, device="cpu")


def test_nan_refiner_weights_in_an_export_are_refused(exported, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    copy = _export_copy(exported, tmp_path)
    path = copy / "refiner.safetensors"
    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    name = next(k for k, t in tensors.items() if t.is_floating_point())
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(CheckpointError, match=r"NaN/inf values in 1 tensor"):
        load_checkpoint(copy, device="cpu")
