"""Sampler-state training data: records are the sampler's own states, the store is manifest-checked and
resumable, the mix ratio holds per epoch, and a state batch's loss covers exactly its masked positions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from llada_trm.build import build_datasets, build_model
from llada_trm.config import AdvancedConfig, TrainingConfig, retired_settings
from llada_trm.config import parse_config as parse_run_config
from llada_trm.diffusion.denoiser import Denoiser
from llada_trm.diffusion.forward_process import masked_diffusion_loss
from llada_trm.diffusion.sampler import sample
from llada_trm.errors import ConfigError
from llada_trm.training.feature_cache import StaleFeatureCacheError
from llada_trm.training.loop import Trainer
from llada_trm.training.objective import LossWeights, diffusion_objective
from llada_trm.training.sampler_states import (
    StateMix,
    StateRecorder,
    _ShardSampler,
    build_sampler_states,
    prepare_sampler_states,
    state_noise,
    write_sampler_states,
)

SAMPLING = {"batch_size": 4, "gen_length": 32, "block_length": 16, "steps": 32, "threshold": 0.9}


def run_config(out: Path, *, cache: str | None = "prefix", **training) -> dict:
    """A phase-1 slot run on the embedded backbone with 8 training problems."""
    return {
        "model": {"backbone": "embedded", "max_recursive_steps": 2, "chunk_size": 8,
                  "slot": {"n_heads": 4, "n_blocks": 1}},
        "data": {"max_length": 160,
                 "synthetic": {"n_train": 8, "n_eval": 0, "max_steps": 1, "max_number": 10}},
        "training": {"batch_size": 2, "num_epochs": 1, "device": "cpu", "seed": 0, "log_every": 1,
                     "eval_every": 0, "save_every": 0, "warmup_steps": 1, **training},
        "advanced": {"sampler_states_per_problem": 3},
        "sampling": {**SAMPLING, "cache": cache},
        "output": {"dir": str(out)},
    }


# The lever's settings are retired (issue 25: no gain, docs/settings.md); its code is reached through the
# class constants they became, set here per config as the files of that time set them.
LEVER = ("training.sampler_state_ratio", "advanced.sampler_states_dir", "advanced.sampler_states_per_problem",
         "advanced.sampler_states_problems", "advanced.sampler_states_seed")  # fmt: skip
FIXED = retired_settings()  # the constants' own values, read before any test sets them
_patch: pytest.MonkeyPatch | None = None


@pytest.fixture(autouse=True)
def _lever_constants(monkeypatch):
    global _patch
    _patch = monkeypatch
    yield
    _patch = None


def lever_free(raw: dict) -> dict:
    """`raw` without the lever's keys, whose values (or the fixed ones) become the constants for now."""
    raw = json.loads(json.dumps(raw))
    for key in LEVER:
        section, name = key.split(".")
        value = raw.get(section, {}).pop(name, FIXED[key])
        if _patch is not None:
            _patch.setattr(TrainingConfig if section == "training" else AdvancedConfig, name, value)
    return raw


def parse_config(raw: dict):
    return parse_run_config(lever_free(raw))


@pytest.fixture(scope="module")
def run():
    """The embedded model, tokenizer and training set of `run_config` (built once)."""
    config = parse_config(run_config(Path("unused")))
    built = build_model(config, device=torch.device("cpu"), dtype=None)
    train_set, _ = build_datasets(config.data, built.tokenizer)
    return built, train_set


def prepare(config_dict: dict, run, **kwargs):
    built, train_set = run
    return prepare_sampler_states(
        parse_config(config_dict), built.model, train_set.examples, tokenizer=built.tokenizer,
        backbone_dir=built.backbone_dir, pad_id=train_set.pad_id, device=torch.device("cpu"), progress=False,
        **kwargs,
    )


def direct_states(run, store, indices) -> list[torch.Tensor]:
    """The sequence the sampler itself held at each model call, for one batch of training prompts, read
    inside the sampler (`Denoiser.run`) rather than through the recorder; the recorder must see the same
    at every call (cached windows included)."""
    built, train_set = run
    prompts = [train_set.examples[i]["input_ids"][: train_set.examples[i]["prompt_length"]] for i in indices]
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), train_set.pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt) :] = torch.as_tensor(prompt)
        attention[row, longest - len(prompt) :] = 1
    seen: list[torch.Tensor] = []
    original = Denoiser.run

    def spy(self, x, **kwargs):
        seen.append(x.clone())
        return original(self, x, **kwargs)

    from llada_trm.diffusion.options import SamplingOptions

    options = SamplingOptions(**store.manifest["sampling"])
    Denoiser.run = spy
    try:
        generator = torch.Generator().manual_seed(0)  # temperature 0: the generator is never drawn
        sample(built.model.backbone, ids, attention, options, generator=generator)
    finally:
        Denoiser.run = original
    recorder = StateRecorder(built.model.backbone)  # the same batch through the recorder
    sample(recorder, ids, attention, options, generator=generator)
    assert len(recorder.states) == len(seen)
    assert all(torch.equal(mine, theirs) for mine, theirs in zip(recorder.states, seen, strict=True))
    return [torch.stack([s[row, longest - len(prompts[row]) :] for s in seen]) for row in range(len(prompts))]


@pytest.mark.parametrize("cache", [None, "prefix", "dual"])
def test_records_are_the_samplers_own_states(run, tmp_path, cache):
    store = prepare(run_config(tmp_path, cache=cache), run)
    _, train_set = run
    t = store.tensors
    assert len(store) > 8  # several states per problem
    per_example = torch.bincount(t["example"], minlength=8)
    assert per_example.max() <= 3 and per_example.min() >= 1
    for first in (0, 4):  # the two sampler batches of 4 prompts
        direct = direct_states(run, store, range(first, first + 4))
        for row, states in enumerate(direct):
            mine = (t["example"] == first + row).nonzero().flatten()
            assert len(mine) == min(3, len(mine))
            for k in mine.tolist():
                step, length = int(t["step"][k]), int(t["prompt_lengths"][k]) + 32
                assert torch.equal(t["states"][k, :length].long(), states[step]), (first + row, step)
                assert (t["states"][k, :length] == store.mask_id).any()  # a state still has masks
    # targets: the reference answer, EOS-padded to gen_length
    example = train_set.examples[0]
    k = int((t["example"] == 0).nonzero()[0])
    answer = example["input_ids"][example["prompt_length"] :]
    target = t["targets"][k, example["prompt_length"] : example["prompt_length"] + 32].tolist()
    assert target == answer + [train_set.pad_id] * (32 - len(answer))


def test_the_same_seed_gives_the_same_records_and_another_seed_other_steps(run, tmp_path):
    a = prepare(run_config(tmp_path / "a"), run).tensors
    b = prepare(run_config(tmp_path / "b"), run).tensors
    assert all(torch.equal(a[key], b[key]) for key in a)
    other_training_seed = prepare(run_config(tmp_path / "e", seed=5), run).tensors
    assert all(torch.equal(a[key], other_training_seed[key]) for key in a)  # one store serves every seed
    other = run_config(tmp_path / "c")
    other["advanced"]["sampler_states_seed"] = 5
    c = prepare(other, run).tensors
    assert not torch.equal(a["step"], c["step"])  # the chosen steps follow advanced.sampler_states_seed
    first = run_config(tmp_path / "d")
    first["advanced"]["sampler_states_problems"] = 4
    d = prepare(first, run)
    assert d.manifest["data"]["examples"] == 4 and set(d.tensors["example"].tolist()) == {0, 1, 2, 3}
    assert torch.equal(d.tensors["states"], a["states"][a["example"] < 4])  # the same batches of 4


def test_stale_store_is_refused(run, tmp_path):
    prepare(run_config(tmp_path), run)
    changes = {
        "other sampling settings": lambda c: c["sampling"].update(threshold=0.8),
        "other state draws": lambda c: c["advanced"].update(sampler_states_seed=3),
    }
    for meaning, change in changes.items():
        config = run_config(tmp_path)
        change(config)
        with pytest.raises(StaleFeatureCacheError, match=f"stale sampler-state store, built from {meaning}"):
            prepare(config, run)
    per_problem = run_config(tmp_path)
    per_problem["advanced"]["sampler_states_per_problem"] = 2
    with pytest.raises(StaleFeatureCacheError, match="--sampler-states"):
        prepare(per_problem, run)


def test_interrupted_build_resumes_after_the_last_shard(run, tmp_path, monkeypatch):
    built, train_set = run
    whole = prepare(run_config(tmp_path / "whole"), run)
    manifest = {key: value for key, value in whole.manifest.items() if key not in ("layout", "complete")}
    manifest["complete"] = False
    written: list[int] = []
    real = _ShardSampler.write

    def crash_after_first(self, shard, path, bar):
        if written:
            raise KeyboardInterrupt
        written.append(shard)
        real(self, shard, path, bar)

    monkeypatch.setattr(_ShardSampler, "write", crash_after_first)
    directory = tmp_path / "resumed"
    args = (built.model.backbone, train_set.examples, directory, manifest)
    with pytest.raises(KeyboardInterrupt):
        write_sampler_states(*args, examples_per_shard=4, progress=False)
    assert json.loads((directory / "manifest.json").read_text())["complete"] is False
    monkeypatch.setattr(_ShardSampler, "write", lambda self, shard, path, bar: written.append(shard)
                        or real(self, shard, path, bar))
    resumed = write_sampler_states(*args, examples_per_shard=4, progress=False)
    assert written == [0, 1]  # shard 0 was kept, only shard 1 was sampled again
    assert all(torch.equal(resumed.tensors[key], whole.tensors[key]) for key in whole.tensors)
    assert load_file(str(directory / "shard_00001.safetensors"))["example"].min() == 4


@pytest.mark.parametrize(("ratio", "micro"), [(0.25, 8), (0.5, 7), (1.0, 3), (0.1, 4)])
def test_the_mix_ratio_is_honoured_per_epoch(run, tmp_path, ratio, micro):
    store = prepare(run_config(tmp_path), run)
    mix = StateMix(store, ratio, seed=0, batch_size=2)
    for epoch in range(3):
        replaced = [j for j in range(micro) if mix.batch_for(epoch, j, micro) is not None]
        assert len(replaced) == round(ratio * micro)
    if ratio < 1:  # the chosen batches vary from epoch to epoch
        assert mix.plan(0, 40) != mix.plan(1, 40)
    ranks = [StateMix(store, ratio, seed=0, batch_size=2, rank=r, world_size=2) for r in (0, 1)]
    index = min(ranks[0].plan(0, 40))
    a, b = (m.batch_for(0, index, 40) for m in ranks)  # two ranks: two halves of one global batch
    both = torch.cat([a["state_p_mask"][:, 0], b["state_p_mask"][:, 0]])
    single = StateMix(store, ratio, seed=0, batch_size=4).batch_for(0, index, 40)["state_p_mask"][:, 0]
    assert torch.equal(both.sort().values, single.sort().values)


def test_a_state_batch_trains_on_its_masked_positions_only(run, tmp_path, monkeypatch):
    built, _ = run
    store = prepare(run_config(tmp_path), run)
    batch = store.batch([0, 1, 5, 9])
    noisy, masked, p_mask = state_noise(batch)
    assert torch.equal(masked, noisy == store.mask_id) and masked.any()
    for row in range(4):  # the prompt is never masked; p_mask is the masked fraction of the answer
        assert not masked[row, : batch["prompt_lengths"][row]].any()
        assert p_mask[row, 0] == masked[row].sum() / 32
    model = built.model.train()
    # Refine every chunk: the embedded backbone is confident enough on these states that the run's 0.9
    # threshold may refine none of them (then the loss is the backbone's, with no graph to check).
    monkeypatch.setattr(model.config, "confidence_threshold", 2.0)
    weights = LossWeights(deep_supervision=0.0, orthogonality=0.0)
    result = diffusion_objective(model, batch, mask_id=store.mask_id, weights=weights, backbone_frozen=True,
                                 noise=(noisy, masked, p_mask))
    expected = masked_diffusion_loss(result.output.logits, batch["input_ids"], masked, p_mask, 32)
    assert torch.allclose(result.loss, expected)
    garbled = dict(batch, input_ids=torch.where(masked, batch["input_ids"], 7))  # unmasked targets changed
    again = diffusion_objective(model, garbled, mask_id=store.mask_id, weights=weights, backbone_frozen=True,
                                noise=(noisy, masked, p_mask))
    assert torch.equal(again.loss, result.loss)
    result.loss.backward()
    grads = [p.grad for p in model.refinement_head.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)
    model.zero_grad(set_to_none=True)


def test_trainer_mixes_sampler_states(tmp_path, monkeypatch):
    config = parse_config(run_config(tmp_path / "run", sampler_state_ratio=0.5, num_epochs=2))
    trainer = Trainer(config, progress=False)
    assert trainer.state_mix is not None and trainer.micro_per_epoch == 4
    seen: list[tuple[int, bool]] = []
    real = Trainer._micro_step

    def spy(self, batch, scale, sync=True):
        seen.append((self.state.epoch, state_noise(batch) is not None))
        return real(self, batch, scale, sync)

    monkeypatch.setattr(Trainer, "_micro_step", spy)
    summary = trainer.train()
    assert summary["steps"] == 8 and torch.isfinite(torch.tensor(summary["train_loss"]))
    for epoch in (0, 1):
        assert sum(states for e, states in seen if e == epoch) == 2  # round(0.5 * 4) per epoch
    assert (tmp_path / "run" / "sampler_states" / "manifest.json").is_file()

    off = Trainer(parse_config(run_config(tmp_path / "off")), progress=False)
    assert off.state_mix is None and not (tmp_path / "off" / "sampler_states").exists()  # off by default
    phase2 = run_config(tmp_path / "p2", sampler_state_ratio=0.5, phase=2)
    with pytest.raises(ConfigError, match="training.sampler_state_ratio: .* trains backbone parameters"):
        Trainer(parse_config(phase2), progress=False)
    with pytest.raises(ConfigError, match="training.sampler_state_ratio: a retired setting"):
        parse_run_config(run_config(tmp_path / "bad", sampler_state_ratio=0.5))


def test_cache_command_builds_sampler_states(tmp_path, capsys):
    from llada_trm import cli

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(lever_free(run_config(tmp_path / "run"))))
    assert cli.main(["cache", "--sampler-states", "--config", str(path), "--no-progress"]) == 0
    assert "sampler states ready" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "run" / "sampler_states" / "manifest.json").read_text())
    assert manifest["complete"] is True and manifest["sampling"]["threshold"] == 0.9
    assert not (tmp_path / "run" / "feature_cache").exists()
    other = ["cache", "--sampler-states", "--config", str(path), "--set", "sampling.cache=dual",
             "--no-progress"]
    assert cli.main(other) == 2
    error = capsys.readouterr().err
    assert "stale sampler-state store" in error and "--rebuild" in error and error.count("\n") == 1
    assert cli.main([*other, "--rebuild"]) == 0
    assert build_sampler_states(parse_config(run_config(tmp_path / "run", cache="dual")), progress=False)
