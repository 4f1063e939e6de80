"""The frozen-backbone feature cache: cached step == live step, stale caches refused, builds resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny_assets import make_tiny_backbone, save_tiny_backbone

from llada_trm.config import fixed_settings, parse_config
from llada_trm.data.collate import SFTDataset, collate_batch
from llada_trm.data.synthetic import SyntheticTaskConfig, generate_problems
from llada_trm.data.tokenizer import load_tokenizer
from llada_trm.diffusion.forward_process import draw_noise
from llada_trm.errors import ConfigError
from llada_trm.model.hybrid import LLaDATRMHybrid, chunk_sum
from llada_trm.model.hybrid_config import HybridConfig
from llada_trm.training.feature_cache import (
    FeatureCache,
    StaleFeatureCacheError,
    backbone_fingerprint,
    build_feature_cache,
    cached_features,
    expected_manifest,
    open_feature_cache,
    write_feature_cache,
)
from llada_trm.training.loop import Trainer
from llada_trm.training.objective import diffusion_objective

SEED = 7


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory) -> Path:
    """A random 2-layer LLaDA backbone with a tokenizer trained on the generated task, in HF layout."""
    return make_tiny_backbone(tmp_path_factory.mktemp("fc_backbone"), vocab_size=512)


@pytest.fixture(scope="module")
def dataset(backbone_dir) -> SFTDataset:
    records = generate_problems(SyntheticTaskConfig(max_steps=2, max_number=10), 10, "train")
    return SFTDataset(load_tokenizer(backbone_dir), records, max_length=128)


def make_model(backbone_dir: Path, threshold: float = 1.5) -> LLaDATRMHybrid:
    config = HybridConfig(
        refiner="slot",
        max_recursive_steps=2,
        chunk_size=8,
        confidence_threshold=threshold,
        context_layers=[0, -1],  # two layers: the cache stores their average
        slot={"n_heads": 2, "n_blocks": 1},
    )
    model = LLaDATRMHybrid.from_pretrained(backbone_dir, config)
    model.backbone.requires_grad_(False)
    torch.manual_seed(1)
    for parameter in model.refinement_head.parameters():  # non-trivial refiner weights
        parameter.data.normal_(0.0, 0.2)
    return model.train()


def manifest_for(model, backbone_dir, dataset, *, draws=2, dtype=torch.float32, seed=SEED, examples=None):
    return expected_manifest(
        model,
        backbone=backbone_fingerprint(backbone_dir),
        examples=dataset.examples if examples is None else examples,
        pad_id=dataset.pad_id,
        seed=seed,
        draws=draws,
        cache_dtype=dtype,
        compute="float32",
    )


def build(model, backbone_dir, dataset, directory, **kwargs) -> FeatureCache:
    per_shard = kwargs.pop("examples_per_shard", 4)
    manifest = manifest_for(model, backbone_dir, dataset, **kwargs)
    return write_feature_cache(
        model, dataset.examples, directory, manifest, pad_id=dataset.pad_id, batch_size=3,
        examples_per_shard=per_shard, progress=False,
    )


def step(model, batch, noise, features=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One objective evaluation + backward: (loss, refiner gradients)."""
    model.zero_grad(set_to_none=True)
    result = diffusion_objective(
        model, batch, mask_id=model.mask_token_id, backbone_frozen=True, noise=noise, features=features,
    )
    result.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.refinement_head.named_parameters() if p.grad is not None}
    return result.loss.detach(), grads


def split_threshold(model: LLaDATRMHybrid, features, masked: torch.Tensor) -> float:
    """A confidence threshold inside the widest gap between the batch's chunk confidences (middle half), so
    that some chunks with masked positions are refined and others pass through."""
    stats = model.refine(features, masked).stats
    has_mask = chunk_sum(masked.float(), 8) > 0
    values = stats["chunk_confidence"][has_mask].sort().values
    middle = values[len(values) // 4 : 3 * len(values) // 4 + 1]
    gap = int((middle[1:] - middle[:-1]).argmax())
    return float(middle[gap : gap + 2].mean())


TOLERANCES = [(torch.float32, 1e-6, 0.0), (torch.bfloat16, 1e-4, 1e-2)]  # fp32: exact up to rounding


@pytest.mark.parametrize(("dtype", "atol", "rtol"), TOLERANCES)
def test_cached_step_matches_live_step(backbone_dir, dataset, tmp_path, dtype, atol, rtol):
    model = make_model(backbone_dir)
    cache = build(model, backbone_dir, dataset, tmp_path / "cache", dtype=dtype)
    indices, draw = [6, 1, 4, 9], 1  # across shards, out of order, second draw
    cached_batch = cache.collate([cache[(i, draw)] for i in indices])
    features, noise = cached_features(model, cached_batch)
    model.config.confidence_threshold = split_threshold(model, features, noise[1])

    cached_loss, cached_grads = step(model, cached_batch, noise, features)
    stats = model.refine(features, noise[1]).stats
    assert 0 < stats["chunks_refined"] < int((chunk_sum(noise[1].float(), 8) > 0).sum())  # a real selection

    live_batch = collate_batch([dataset[i] for i in indices], dataset.pad_id, pad_to=cache.seq_len)
    ids, prompts = live_batch["input_ids"], live_batch["prompt_lengths"]
    live_noise = draw_noise(ids, prompts, model.mask_token_id, seed=SEED, examples=indices, draws=draw)
    for cached, live in zip(noise, live_noise, strict=True):  # the cache stored exactly the live draw
        assert torch.equal(cached, live)
    assert torch.equal(cached_batch["answer_lengths"], live_batch["answer_lengths"])
    live_loss, live_grads = step(model, live_batch, live_noise)

    assert live_grads and set(cached_grads) == set(live_grads)
    assert torch.allclose(cached_loss, live_loss, atol=atol, rtol=rtol), (cached_loss, live_loss)
    for name, grad in live_grads.items():
        scale = grad.abs().max().item()
        assert torch.allclose(cached_grads[name], grad, atol=atol + rtol * scale, rtol=rtol), name


def test_noise_depends_only_on_example_and_draw(dataset):
    batch = collate_batch([dataset[i] for i in (0, 1, 2)], dataset.pad_id, pad_to=128)
    args = (batch["input_ids"], batch["prompt_lengths"], 999)
    a = draw_noise(*args, seed=SEED, examples=[0, 1, 2], draws=0)
    b = draw_noise(*[x[[2, 1, 0]] for x in args[:2]], 999, seed=SEED, examples=[2, 1, 0], draws=0)
    assert torch.equal(a[1], b[1][[2, 1, 0]]) and torch.equal(a[2], b[2][[2, 1, 0]])
    other = draw_noise(*args, seed=SEED, examples=[0, 1, 2], draws=1)
    assert not torch.equal(a[1], other[1])
    assert not bool(a[1][torch.arange(128)[None, :] < batch["prompt_lengths"][:, None]].any())  # prompt kept


def test_stale_cache_is_refused(backbone_dir, dataset, tmp_path):
    model = make_model(backbone_dir)
    directory = tmp_path / "cache"
    build(model, backbone_dir, dataset, directory)
    open_feature_cache(directory, manifest_for(model, backbone_dir, dataset))  # the same run opens it

    retrained = tmp_path / "retrained"
    shutil.copytree(backbone_dir, retrained)
    save_tiny_backbone(retrained, load_tokenizer(backbone_dir), seed=1)  # same shapes, other weights
    stale = {
        "other backbone weights": manifest_for(model, retrained, dataset),
        "other training data": manifest_for(model, backbone_dir, dataset, examples=dataset.examples[:-1]),
        "other noise draws": manifest_for(model, backbone_dir, dataset, seed=SEED + 1),
        "other feature settings": manifest_for(model, backbone_dir, dataset, dtype=torch.bfloat16),
    }
    for meaning, manifest in stale.items():
        expected = f"stale feature cache, built from {meaning}"
        with pytest.raises(StaleFeatureCacheError, match=expected) as info:
            open_feature_cache(directory, manifest)
        message = str(info.value)
        assert "\n" not in message and f"rm -r {directory}" in message and "llada-trm cache" in message
        with pytest.raises(StaleFeatureCacheError):  # a build refuses to overwrite it too
            write_feature_cache(
                model, dataset.examples, directory, manifest, pad_id=dataset.pad_id, batch_size=3
            )


def test_interrupted_build_resumes_after_the_last_shard(backbone_dir, dataset, tmp_path, monkeypatch):
    model = make_model(backbone_dir)
    reference = build(model, backbone_dir, dataset, tmp_path / "straight")
    directory = tmp_path / "cache"
    real = model.features
    calls = {"n": 0}

    def crashing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 4:  # shard 0 (4 examples, batch 3) takes 2 calls per draw: die inside shard 1
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "features", crashing)
    with pytest.raises(KeyboardInterrupt):
        build(model, backbone_dir, dataset, directory)
    assert sorted(p.name for p in directory.iterdir()) == ["manifest.json", "shard_00000.safetensors"]
    with pytest.raises(ConfigError, match="unfinished"):
        open_feature_cache(directory, manifest_for(model, backbone_dir, dataset))

    calls["n"] = -100  # no more crashes; count the resumed work
    resumed = build(model, backbone_dir, dataset, directory)
    assert calls["n"] + 100 == 6  # per draw, shard 1 (4 examples) takes 2 batches of 3, shard 2 (2) one
    assert json.loads((directory / "manifest.json").read_text())["complete"] is True
    for name in ("shard_00000.safetensors", "shard_00001.safetensors", "shard_00002.safetensors"):
        got, want = load_file(str(resumed.directory / name)), load_file(str(reference.directory / name))
        assert set(got) == set(want)
        for key in want:
            assert torch.equal(got[key], want[key]), (name, key)


def run_config(backbone_dir: Path, out: Path, **advanced) -> dict:
    return {
        "model": {
            "backbone": str(backbone_dir),
            "max_recursive_steps": 2,
            "chunk_size": 8,
            "context_layers": [-1],
            "slot": {"n_heads": 2, "n_blocks": 1},
        },
        "data": {
            "max_length": 128,
            "n_train": 12,
            "n_eval": 0,
        },
        "training": {
            "batch_size": 4, "max_steps": 6, "seed": 0, "eval_every": 0,
            "save_every": 0, "warmup_steps": 1,
        },  # 2 epochs of 3 steps
        "advanced": {"feature_cache": True, **advanced},
        "output": {"dir": str(out)},
    }


@pytest.fixture
def two_draws():
    """Two noise draws per cached example (the retired `advanced.cache_noise_draws`, through its hook)."""
    with fixed_settings({"advanced.cache_noise_draws": 2}):
        yield


def test_trainer_trains_phase1_from_the_cache(backbone_dir, tmp_path, monkeypatch, two_draws):
    config = parse_config(run_config(backbone_dir, tmp_path / "run"))
    directory = build_feature_cache(config, progress=False)
    assert directory == tmp_path / "run" / "feature_cache"
    built = (directory / "shard_00000.safetensors").stat().st_mtime_ns

    trainer = Trainer(config, progress=False)
    assert trainer.feature_cache is not None and trainer.feature_cache.n_draws == 2
    monkeypatch.setattr(trainer.model.backbone, "forward", None)  # training must not run the backbone
    epochs = []
    real = trainer.feature_cache.__getitem__
    monkeypatch.setattr(FeatureCache, "__getitem__", lambda self, item: epochs.append(item[1]) or real(item))
    summary = trainer.train()
    assert summary["steps"] == 6 and torch.isfinite(torch.tensor(summary["train_loss"]))
    assert epochs == [0] * 12 + [1] * 12  # epoch e trains on draw e % 2
    assert (directory / "shard_00000.safetensors").stat().st_mtime_ns == built  # reused, not rebuilt

    with pytest.raises(StaleFeatureCacheError, match="other noise draws"):
        with fixed_settings({"advanced.cache_noise_draws": 3}):
            Trainer(parse_config(run_config(backbone_dir, tmp_path / "run")), progress=False)
    phase2 = run_config(backbone_dir, tmp_path / "p2")
    phase2["training"]["phase"] = 2
    with pytest.raises(ConfigError, match="advanced.feature_cache: .* trains backbone parameters"):
        Trainer(parse_config(phase2), progress=False)


def test_cache_command(backbone_dir, tmp_path, capsys, two_draws):
    cli = pytest.importorskip("llada_trm.cli")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run_config(backbone_dir, tmp_path / "run")))
    assert cli.main(["cache", "--config", str(path), "--no-progress"]) == 0
    assert "feature cache ready" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "run" / "feature_cache" / "manifest.json").read_text())
    assert manifest["complete"] is True and manifest["noise"]["draws"] == 2

    other_seed = ["cache", "--config", str(path), "--set", "training.seed=1", "--no-progress"]
    assert cli.main(other_seed) == 2
    error = capsys.readouterr().err
    assert "stale feature cache" in error and "--rebuild" in error and error.count("\n") == 1
    assert cli.main([*other_seed, "--rebuild"]) == 0
    manifest = json.loads((tmp_path / "run" / "feature_cache" / "manifest.json").read_text())
    assert manifest["noise"]["seed"] == 1


def test_the_cache_stores_the_runs_targeted_masks(backbone_dir, dataset, tmp_path):
    # With training.masks the cache holds exactly the draws a live step would take, and says which in its
    # manifest (a forward-process cache is refused for such a run, and the other way round).
    from llada_trm.diffusion.forward_process import MaskDistribution, TokenText, TrainingMasks

    model = make_model(backbone_dir)
    tokenizer = load_tokenizer(backbone_dir)
    masks = TrainingMasks(MaskDistribution("answer_structure"), model.mask_token_id, SEED,
                          token_text=TokenText(tokenizer.decode))  # fmt: skip
    manifest = manifest_for(model, backbone_dir, dataset)
    manifest["noise"].update(masks="answer_structure", forward_mix=0.0)
    cache = write_feature_cache(
        model, dataset.examples, tmp_path / "cache", manifest, pad_id=dataset.pad_id, batch_size=3,
        examples_per_shard=4, progress=False, masks=masks,
    )
    indices, draw = [6, 1, 4], 1
    cached = cache.collate([cache[(i, draw)] for i in indices])
    live_batch = collate_batch([dataset[i] for i in indices], dataset.pad_id, pad_to=cache.seq_len)
    _, live_masked, _ = masks.draw(live_batch, indices, draw)
    assert torch.equal(cached["masked"], live_masked)
    assert torch.equal(cached["p_mask"], torch.ones_like(cached["p_mask"]))
    forward = draw_noise(live_batch["input_ids"], live_batch["prompt_lengths"], model.mask_token_id,
                         seed=SEED, examples=indices, draws=draw)  # fmt: skip
    assert not torch.equal(forward[1], live_masked)
    with pytest.raises(StaleFeatureCacheError, match="noise"):
        forward_manifest = manifest_for(model, backbone_dir, dataset)
        write_feature_cache(model, dataset.examples, tmp_path / "cache", forward_manifest,
                            pad_id=dataset.pad_id, batch_size=3, progress=False)  # fmt: skip
