"""End-to-end training on a tiny random backbone: files written, exact resume, NaN stop, phases, errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny_assets import REPO, make_tiny_backbone, model_section

from llada_trm.config import fixed_settings, parse_config
from llada_trm.errors import CheckpointError, ConfigError, NonFiniteLossError
from llada_trm.run_checkpoint import load_trainer_state
from llada_trm.training import objective
from llada_trm.training.loop import Trainer, run_train, trainer_from_cli


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: intra-op threads only add contention on a shared CPU (16 ms vs 0.3 ms per matmul)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def log_every_two_steps():
    """These runs log a training row every 2 steps (`--log-every 2`; conftest's default is every step)."""
    with fixed_settings({"training.log_every": 2}):
        yield


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory) -> Path:
    """A random 2-layer LLaDA backbone and a tokenizer trained on the generated task, in HF layout."""
    return make_tiny_backbone(tmp_path_factory.mktemp("tiny_backbone"))


def raw_config(backbone_dir: Path, out: Path, **training) -> dict:
    defaults = {"lr": 3e-3, "batch_size": 4, "gradient_accumulation_steps": 2, "max_steps": 10}  # 2 epochs
    defaults.update(warmup_steps=2, eval_every=3, save_every=4)
    training = {**defaults, "seed": 0, **training}
    return {
        "model": model_section(backbone_dir),
        "data": {
            "max_length": 128,
            "n_train": 40,
            "n_eval": 8,
        },
        "training": training,
        "output": {"dir": str(out)},
    }


def make_trainer(backbone_dir: Path, out: Path, **training) -> Trainer:
    return Trainer(parse_config(raw_config(backbone_dir, out, **training)), progress=False)


def trainable(trainer: Trainer) -> dict[str, torch.Tensor]:
    params = dict(trainer.model.named_parameters())
    return {name: params[name].detach().clone() for name in trainer.plan.trainable_names}


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture
def keep_two_snapshots():
    """Numbered copies of `last` (the retired `output.keep_last`, reached through its hook)."""
    with fixed_settings({"output.keep_last": 2}):
        yield


def test_end_to_end_run_writes_every_file(backbone_dir, tmp_path, capsys, keep_two_snapshots):
    raw = raw_config(backbone_dir, tmp_path / "run")
    trainer = Trainer(parse_config(raw), progress=False)
    names = trainer.plan.trainable_names
    assert names and all(n.startswith("refinement_head.slot.") for n in names)
    report = capsys.readouterr().out
    assert "trainable params" in report and "frozen params" in report and "%" in report
    backbone_before = {k: v.clone() for k, v in trainer.model.backbone.state_dict().items()}
    head_before = trainable(trainer)

    summary = trainer.train()

    out = tmp_path / "run"
    # 40 examples / batch 4 = 10 micro-batches = 5 steps of 2 per epoch, 2 epochs
    assert summary["steps"] == trainer.total_steps == 10
    for name in ("config.yaml", "training_metrics.csv", "validation_metrics.csv"):
        assert (out / name).is_file(), name
    # save_every 4 -> steps 4, 8 and the end (10); keep_last 2 keeps numbered copies of the newest two
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == ["best", "last", "step_0000008", "step_0000010"]
    for name in ("last", "best", "step_0000008"):
        files = sorted(p.name for p in (out / "checkpoints" / name).iterdir())
        assert files == ["config.yaml", "model.safetensors", "trainer_state.pt"]
    assert parse_config(yaml.safe_load((out / "config.yaml").read_text())) == trainer.config

    rows = read_csv(out / "training_metrics.csv")
    assert [int(r["step"]) for r in rows] == [2, 4, 6, 8, 10]
    columns = ["loss", "loss_final", "loss_deep_supervision", "loss_orthogonality", "lr", "grad_norm"]
    columns += ["refine_steps", "skipped_fraction", "tokens_per_s", "slot_norm_ctx", "gate_ctx"]
    columns += ["orthogonality", "delta_norm", "chunk_confidence"]
    for column in columns:
        assert rows[-1][column] != "", column
    assert float(rows[-1]["skipped_fraction_masked"]) == 0.0  # threshold 1.5 refines every chunk with a mask
    val = read_csv(out / "validation_metrics.csv")
    assert [int(r["step"]) for r in val] == [3, 6, 9, 10]  # every 3 steps, plus the end of the run
    for column in ("loss", "loss_base", "accuracy", "accuracy_base", "accuracy_step_1", "accuracy_step_2",
                   "chunk_accuracy", "chunk_accuracy_step_1", "refine_steps", "skipped_fraction"):
        assert val[-1][column] != "", column
    assert float(val[-1]["accuracy"]) == pytest.approx(float(val[-1]["accuracy_step_2"]))

    # Phase 1: the backbone is untouched, the refiner moved, and checkpoints hold the refiner only.
    for key, value in trainer.model.backbone.state_dict().items():
        assert torch.equal(value, backbone_before[key]), key
    assert any(not torch.equal(v, head_before[k]) for k, v in trainable(trainer).items())
    saved = load_file(str(out / "checkpoints" / "last" / "model.safetensors"))
    assert set(saved) == set(trainer.plan.trainable_names)
    for name, tensor in trainable(trainer).items():
        assert torch.equal(saved[name], tensor)
    best = load_trainer_state(out / "checkpoints" / "best")["train_state"]
    assert best["step"] == summary["best_step"]
    assert best["best_metric"] == pytest.approx(summary["best_metric"])
    assert summary["best_metric"] == pytest.approx(min(float(r["loss"]) for r in val), rel=1e-5)


def test_resume_continues_exactly(backbone_dir, tmp_path):
    # N steps, stop, resume for N more == 2N uninterrupted (weights, optimizer state, logged losses).
    straight = make_trainer(backbone_dir, tmp_path / "straight")
    straight.train()

    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump(raw_config(backbone_dir, tmp_path / "other")))
    interrupted = trainer_from_cli(config_path, [f"output.dir={tmp_path / 'split'}"], progress=False)
    interrupted.train(max_new_steps=3)  # stops mid-epoch and mid-way through the warmup-cosine schedule
    assert load_trainer_state(tmp_path / "split" / "checkpoints" / "last")["train_state"]["step"] == 3

    split = [f"output.dir={tmp_path / 'split'}"]
    resumed = trainer_from_cli(config_path, split, resume=tmp_path / "split", progress=False)
    assert resumed.state.step == 3 and resumed.state.batches_in_epoch == 6
    resumed.train()

    assert resumed.state.step == straight.state.step == 10
    a, b = trainable(straight), trainable(resumed)
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6, rtol=0), name
    state_a, state_b = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    for index in state_a:
        assert torch.allclose(state_a[index]["exp_avg"], state_b[index]["exp_avg"], atol=1e-6, rtol=0)
    assert straight.scheduler.get_last_lr() == pytest.approx(resumed.scheduler.get_last_lr())
    losses_a = [r["loss"] for r in read_csv(tmp_path / "straight" / "training_metrics.csv")]
    losses_b = [r["loss"] for r in read_csv(tmp_path / "split" / "training_metrics.csv")]
    assert losses_a == losses_b  # rows from before the interruption are kept, none are duplicated


def test_phase2_trains_the_last_block_at_its_own_lr(backbone_dir, tmp_path):
    make_trainer(backbone_dir, tmp_path / "p1", max_steps=1).train()
    trainer = make_trainer(
        backbone_dir, tmp_path / "p2", phase=2, unfreeze_last_n_layers=1, backbone_lr=1e-4, max_steps=2,
        eval_every=0,
    )
    assert {g.name for g in trainer.plan.groups} == {"head", "backbone"}
    blocks = trainer.model.backbone.blocks
    first, last = [b.ff_out.weight.detach().clone() for b in (blocks[0], blocks[1])]
    trainer.train()
    assert torch.equal(blocks[0].ff_out.weight, first)  # frozen block
    assert not torch.equal(blocks[1].ff_out.weight, last)  # unfrozen block
    row = read_csv(tmp_path / "p2" / "training_metrics.csv")[-1]
    assert float(row["lr_backbone"]) == pytest.approx(float(row["lr"]) / 30)  # 1e-4 vs 3e-3, same schedule
    saved = load_file(str(tmp_path / "p2" / "checkpoints" / "last" / "model.safetensors"))
    assert any(n.startswith("backbone.model.transformer.blocks.1.") for n in saved)
    with pytest.raises(CheckpointError, match="same training.phase"):
        trainer.resume(tmp_path / "p1")  # a phase-1 checkpoint does not resume a phase-2 run


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(backbone_dir, tmp_path, monkeypatch):
    trainer = make_trainer(backbone_dir, tmp_path / "run", save_every=2, eval_every=0)
    real = objective.masked_diffusion_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        # K = 2: two loss evaluations per micro-batch, two micro-batches per step; step 3 starts at call 9.
        return loss * float("nan") if calls["n"] > 8 else loss

    monkeypatch.setattr(objective, "masked_diffusion_loss", poisoned)
    with pytest.raises(NonFiniteLossError) as info:
        trainer.train()
    message = str(info.value)
    assert message.startswith("step 3: the loss is not finite")
    assert "loss_final=nan" in message and "loss_deep_supervision=nan" in message
    assert "checkpoints/last" in message and "training.lr" in message

    last = tmp_path / "run" / "checkpoints" / "last"
    assert load_trainer_state(last)["train_state"]["step"] == 2
    fresh = make_trainer(backbone_dir, tmp_path / "fresh")
    fresh.resume(last)  # the kept checkpoint is complete and loads
    assert fresh.state.step == 2


def test_plain_sft_without_refiner(backbone_dir, tmp_path):
    raw = raw_config(backbone_dir, tmp_path / "sft", phase=3, max_steps=2, eval_every=0)
    raw["model"]["refiner"] = "none"
    raw["training_params"] = {"trainable_modules": ["backbone"]}
    trainer = Trainer(parse_config(raw), progress=False)
    assert not trainer.plan.backbone_frozen and trainer.plan.trainable_params == trainer.plan.total_params
    trainer.train()
    row = read_csv(tmp_path / "sft" / "training_metrics.csv")[-1]
    assert float(row["loss"]) == pytest.approx(float(row["loss_final"]))
    assert float(row["loss_deep_supervision"]) == 0.0


def test_batch_that_refines_no_chunk_still_steps(backbone_dir, tmp_path):
    """Threshold 0: every chunk counts as confident, the loss is the frozen backbone's and has no graph."""
    raw = raw_config(backbone_dir, tmp_path / "confident", max_steps=2, eval_every=0)
    raw["model"].update(refiner="mlp", confidence_threshold=0.0)  # mlp: no orthogonality term either
    trainer = Trainer(parse_config(raw), progress=False)
    before = {n: p.detach().clone() for n, p in trainer.model.refinement_head.named_parameters()}
    summary = trainer.train()
    assert summary["steps"] == 2
    row = read_csv(tmp_path / "confident" / "training_metrics.csv")[-1]
    assert float(row["loss"]) > 0
    for name, p in trainer.model.refinement_head.named_parameters():  # no signal: only weight decay
        assert torch.allclose(p, before[name], atol=1e-4), name


def test_configuration_errors(backbone_dir, tmp_path):
    expected = r"trainable_modules: pattern 'refiner' matches no module; .*backbone, refinement_head"
    with pytest.raises(ConfigError, match=expected):
        raw = {**raw_config(backbone_dir, tmp_path), "training_params": {"trainable_modules": ["refiner"]}}
        Trainer(parse_config(raw))
    with pytest.raises(ConfigError, match="model.backbone: .* config.json"):
        Trainer(parse_config(raw_config(tmp_path / "nowhere", tmp_path)))
    with pytest.raises(ConfigError, match="output.save_best: 'acc' is not a validation metric"):
        Trainer(parse_config({**raw_config(backbone_dir, tmp_path), "output": {"save_best": "acc"}}))


def test_run_train_entry_point(backbone_dir, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw_config(backbone_dir, tmp_path / "cli", max_steps=1, eval_every=0)))
    summary = run_train(path, ["training.lr=5e-4", "data.n_eval=0"], progress=False)
    assert summary["steps"] == 1 and summary["val"] == {}
    assert (tmp_path / "cli" / "checkpoints" / "last" / "model.safetensors").is_file()
    assert yaml.safe_load((tmp_path / "cli" / "config.yaml").read_text())["training"]["lr"] == 5e-4


def test_tiny_refiner_config_on_the_embedded_backbone(tmp_path):
    assets = pytest.importorskip("llada_trm.assets", reason="the embedded backbone is not packaged yet")
    locate = getattr(assets, "embedded_backbone_dir", None)
    if locate is None or not (Path(locate()) / "config.json").is_file():
        pytest.skip("the embedded backbone checkpoint is not built yet")
    config_path = REPO / "configs" / "tiny_refiner.yaml"
    overrides = [f"output.dir={tmp_path}", "training.max_steps=2", "training.batch_size=2"]
    overrides += ["training.eval_every=0", "data.n_train=16"]
    overrides += ["data.n_eval=4"]
    summary = run_train(config_path, overrides, progress=False)
    assert summary["steps"] == 2 and (tmp_path / "checkpoints" / "last" / "model.safetensors").is_file()


@pytest.mark.parametrize("masks", ["answer_structure", "backbone_errors"])
def test_targeted_masks_resume_bit_exactly(backbone_dir, tmp_path, masks):
    # The targeted masks are part of the run's state: a split run equals a straight one, bit for bit, in the
    # trained weights and the logged losses.
    options = {"masks": masks, "max_steps": 6, "eval_every": 0, "save_every": 0}
    straight = make_trainer(backbone_dir, tmp_path / "straight", **options)
    straight.train()
    report = json.loads((tmp_path / "straight" / "reachability.json").read_text())  # a run records it
    assert report["masks"] == masks and 0.0 <= report["reachable"] <= 1.0
    split = make_trainer(backbone_dir, tmp_path / "split", **options)
    split.train(max_new_steps=3)
    resumed = Trainer(parse_config(raw_config(backbone_dir, tmp_path / "split", **options)), progress=False)
    resumed.resume(tmp_path / "split").train()
    for name, value in trainable(straight).items():
        assert torch.equal(value, trainable(resumed)[name]), name
    logs = [read_csv(tmp_path / d / "training_metrics.csv") for d in ("straight", "split")]
    assert [r["loss"] for r in logs[0]] == [r["loss"] for r in logs[1]]


def test_targeted_masks_change_what_is_trained_on(backbone_dir, tmp_path):
    # The same seed with answer-structure masks draws other noise than the forward process.
    forward = make_trainer(backbone_dir, tmp_path / "f", max_steps=1)
    structure = make_trainer(backbone_dir, tmp_path / "s", max_steps=1, masks="answer_structure")
    batch = next(iter(forward.train_loader))
    a, b = forward._draw_noise(batch), structure._draw_noise(batch)
    assert not torch.equal(a[1], b[1])
    assert torch.equal(b[2], torch.ones_like(b[2]))
