"""Issue 14: sizes are bounded before anything is allocated, and broken weights or caches fail in one line.

Each size names the key to change and the allowed range: K, batch sizes and dataset sizes against fixed
ceilings; chunk_size, data.max_length and prompt + gen_length against the backbone's max_sequence_length.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llada_trm.build import build_datasets, build_model
from llada_trm.config import parse_config
from llada_trm.data.gsm8k import GSM8KRecord
from llada_trm.data.tokenizer import load_tokenizer
from llada_trm.diffusion.options import SamplingOptions
from llada_trm.errors import CheckpointError, ConfigError
from llada_trm.evaluate.evaluator import evaluate_model
from llada_trm.model.hybrid import LLaDATRMHybrid
from llada_trm.model.hybrid_config import HybridConfig
from llada_trm.model.llada import LLaDAModel
from tests.tiny_assets import make_tiny_backbone, run_config


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "model.max_recursive_steps=1000",
            "model.max_recursive_steps: input should be less than or equal to 64",
        ),
        ("training.batch_size=100000", "training.batch_size: input should be less than or equal to 4096"),
        ("data.n_train=1e9", "data.n_train: input should be less than or equal to 1000000"),
        ("data.n_eval=2e6", "data.n_eval: input should be less than or equal to 1000000"),
    ],
)
def test_absurd_sizes_are_refused_by_the_schema(override: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        parse_config({}, overrides=[override])


def test_chunk_size_and_max_length_are_bounded_by_the_backbone(backbone_dir: Path, tmp_path: Path) -> None:
    raw = run_config(backbone_dir, tmp_path / "run")
    raw["model"]["chunk_size"] = 10**9
    with pytest.raises(ConfigError, match=r"model.chunk_size=1000000000 exceeds the backbone's .*1\.\.256"):
        build_model(parse_config(raw), device=torch.device("cpu"), dtype=torch.float32)
    raw = run_config(backbone_dir, tmp_path / "run")
    raw["data"]["max_length"] = 4096
    with pytest.raises(
        ConfigError, match=r"data.max_length=4096 exceeds the max_sequence_length=256 .*1\.\.256"
    ):
        build_model(parse_config(raw), device=torch.device("cpu"), dtype=torch.float32)
    with pytest.raises(ConfigError, match="chunk_size=300 exceeds"):  # the library path checks it too
        LLaDATRMHybrid.from_pretrained(backbone_dir, HybridConfig(chunk_size=300, context_layers=[]))


def test_prompt_plus_gen_length_is_bounded_by_the_backbone(backbone_dir: Path) -> None:
    model = LLaDATRMHybrid.from_pretrained(backbone_dir, HybridConfig(refiner="none", context_layers=[]))
    tokenizer = load_tokenizer(backbone_dir)
    long = GSM8KRecord(question="one two three " * 100, answer="#### 1", origin="q.jsonl:7")
    short = GSM8KRecord(question="What is 1 plus 1?", answer="#### 2")
    options = SamplingOptions(gen_length=16, block_length=8, steps=4)
    # a prompt past the positions is skipped, scored wrong and counted (fit_prompts), never sampled
    result = evaluate_model(model, tokenizer, [short, long], options, progress=False)
    assert result.summary["prompts"]["skipped_indices"] == [1] and result.summary["n"] == 2
    assert result.predictions[1]["skipped"] and not result.predictions[1]["correct_strict"]
    none_fits = r"q\.jsonl:7, \d+ tokens\) .* 256 \(max_sequence_length\); the prompt"
    with pytest.raises(ValueError, match=none_fits):
        evaluate_model(model, tokenizer, [long], options, progress=False)  # none fits: nothing to do
    wide = SamplingOptions(gen_length=512, block_length=32, steps=16)
    with pytest.raises(ValueError, match=r"lower gen_length \(--gen-length\) to at most \d+"):
        evaluate_model(model, tokenizer, [short], wide, progress=False)


def test_sampling_sizes_have_ceilings() -> None:
    with pytest.raises(ValueError, match=r"gen_length must be in 1\.\.32768"):
        SamplingOptions(gen_length=100_000, block_length=100_000, steps=100_000)
    with pytest.raises(ValueError, match=r"steps must be in 1\.\.32768"):
        SamplingOptions(gen_length=32, block_length=32, steps=100_000)
    with pytest.raises(ValueError, match=r"batch_size must be in 1\.\.4096"):
        SamplingOptions(batch_size=10**6)


def test_dropped_eval_examples_are_reported(backbone_dir, tmp_path, caplog) -> None:
    raw = run_config(backbone_dir, tmp_path / "run")
    raw["data"]["max_length"] = 64
    config = parse_config(raw)
    with caplog.at_level(logging.WARNING, logger="llada_trm"):
        build_datasets(config.data, load_tokenizer(backbone_dir))
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "evaluation examples" in messages and "raise data.max_length" in messages


# ------------------------------------------------------------------------------------- broken weights


def _broken_backbone(root: Path, source: Path, damage) -> Path:
    directory = make_tiny_backbone(root, vocab_size=512)
    tensors = load_file(str(directory / "model.safetensors"))
    damage(tensors)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def test_an_integer_weight_is_a_one_line_error(tmp_path: Path, backbone_dir: Path) -> None:
    def to_int(tensors):
        key = next(k for k in tensors if k.endswith("attn_norm.weight"))
        tensors[key] = tensors[key].to(torch.int64)

    directory = _broken_backbone(tmp_path / "int", backbone_dir, to_int)
    with pytest.raises(
        CheckpointError, match=r"(?s)not floating-point.*attn_norm\.weight: I64 in model\.safetensors"
    ):
        LLaDAModel.from_pretrained(directory)


def test_a_nan_weight_names_the_file_and_tensor(tmp_path: Path, backbone_dir: Path) -> None:
    def poison(tensors):
        key = next(k for k in tensors if k.endswith("ff_out.weight"))
        tensors[key][0, 0] = float("nan")

    directory = _broken_backbone(tmp_path / "nan", backbone_dir, poison)
    with pytest.raises(
        CheckpointError, match=r"NaN/inf weights in 1 tensor.*ff_out\.weight \(in model\.safetensors\)"
    ):
        LLaDAModel.from_pretrained(directory)


def test_a_corrupt_cache_shard_names_the_shard_and_the_rebuild_command(tmp_path: Path) -> None:
    from llada_trm.training.feature_cache import FeatureCache, StaleFeatureCacheError, shard_name

    manifest = {
        "data": {"examples": 4, "seq_len": 8},
        "noise": {"draws": 1},
        "layout": {"examples_per_shard": 4},
        "features": {"context_layers": []},
    }
    (tmp_path / shard_name(0)).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    cache = FeatureCache(tmp_path, manifest)
    with pytest.raises(
        StaleFeatureCacheError, match=r"shard_00000\.safetensors: corrupt feature-cache shard .*--rebuild"
    ):
        cache[0, 0]
