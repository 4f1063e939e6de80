"""Evaluation: answer extraction, scoring with a scripted model, refinement statistics, checkpoint loading,
evaluation records and result files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_assets import FIXTURES, TINY_SAMPLING

from llada_trm import assets
from llada_trm.build import resolve_backbone_dir
from llada_trm.data.collate import encode_answer, encode_prompt
from llada_trm.data.gsm8k import DataError, GSM8KRecord
from llada_trm.data.tokenizer import load_tokenizer, pad_token_id
from llada_trm.diffusion.options import SamplingOptions
from llada_trm.errors import CheckpointError
from llada_trm.evaluate.evaluator import evaluate_model, load_eval_records, synthetic_settings
from llada_trm.evaluate.extraction import extract_flexible, extract_strict, is_correct
from llada_trm.evaluate.loading import load_checkpoint
from llada_trm.io import write_json
from llada_trm.model.hybrid import LLaDATRMHybrid
from llada_trm.model.hybrid_config import HybridConfig

GSM8K_TEST = Path("/work/shared/data/gsm8k/test.jsonl")
FIXTURE_GSM8K = FIXTURES / "gsm8k_small.jsonl"


@pytest.fixture(scope="module")
def tokenizer(backbone_dir):
    return load_tokenizer(backbone_dir)


# ------------------------------------------------------------------------------------------ extraction


@pytest.mark.parametrize(
    ("text", "strict", "flexible"),
    [
        ("He has 3*4=<<3*4=12>>12 apples.\n#### 12", "12", "12"),
        ("#### 1,000", "1000", "1000"),
        ("The change is $8.\n#### $8", None, "8"),  # `#### $8` is not GSM8K's strict format
        ("It costs $1,750.", None, "1750"),
        ("She is left with -5 apples", None, "-5"),
        ("#### -3", "-3", "-3"),
        # lm-eval's gsm8k normalisation: only `,`, `$` and one trailing `.` go, so 12.0 is not 12
        ("#### 5.50", "5.50", "5.50"),
        ("#### 12.0", "12.0", "12.0"),
        ("#### 12..", "12.", "12."),
        ("first 5, then ...", None, ".."),  # the harness takes the last match, digits or not
        ("no number at all", None, None),
        ("", None, None),
        ("first 12, then 7.", None, "7"),
    ],
)
def test_strict_and_flexible_extraction(text, strict, flexible):
    assert extract_strict(text) == strict
    assert extract_flexible(text) == flexible


def test_is_correct_compares_normalised_numbers():
    reference = "Half of 3,000 is 3000/2=<<3000/2=1500>>1500.\n#### 1,500"
    assert is_correct("... #### 1500", reference)
    assert not is_correct("The answer is 1500.", reference)
    assert is_correct("The answer is $1,500.", reference, flexible=True)
    assert not is_correct("#### 1501", reference, flexible=True)
    assert not is_correct("#### 5", "no reference number")
    assert not is_correct("#### 12.0", "#### 12")  # as lm-eval's gsm8k exact_match scores it


# -------------------------------------------------------------------------------------- scripted model


class ScriptedModel:
    """Writes a fixed answer for each question: the logits make its tokens the only sensible prediction.

    Rows are recognised by their (left-padded) prompt, so any batch size or order works.
    """

    def __init__(self, tokenizer, answers: dict[str, str], gen_length: int):
        self.gen_length = gen_length
        self.vocab = len(tokenizer)
        self.pad = pad_token_id(tokenizer)
        self.calls = 0
        self.script = {}
        for question, answer in answers.items():
            ids = encode_answer(tokenizer, answer)
            assert len(ids) <= gen_length, "answer too long for the test's gen_length"
            padded = ids + [self.pad] * (gen_length - len(ids))
            self.script[tuple(encode_prompt(tokenizer, question))] = padded

    def __call__(self, input_ids, attention_mask=None):
        self.calls += 1
        batch, length = input_ids.shape
        start = length - self.gen_length
        logits = torch.zeros(batch, length, self.vocab)
        for row in range(batch):
            prompt = input_ids[row, :start].tolist()
            first = next(i for i, token in enumerate(prompt) if token != self.pad)
            target = torch.tensor(self.script[tuple(prompt[first:])])
            logits[row, start + torch.arange(self.gen_length), target] = 10.0
        return logits


def test_scores_strict_and_flexible_answers_and_writes_both_files(tokenizer, tmp_path):
    records = load_eval_records("synthetic", "test", synthetic=synthetic_settings(), limit=3)
    refs = [extract_strict(r.answer) for r in records]
    answers = {
        records[0].question: f"So the total is {refs[0]}.\n#### {refs[0]}",  # strict and flexible
        records[1].question: f"The answer is {refs[1]}.",  # right number, no #### line
        records[2].question: f"#### {int(refs[2]) + 1}",  # wrong
    }
    model = ScriptedModel(tokenizer, answers, gen_length=32)
    options = SamplingOptions(gen_length=32, block_length=16, steps=8, batch_size=2)
    result = evaluate_model(model, tokenizer, records, options, out_dir=tmp_path / "out", progress=False)

    s = result.summary
    assert (s["n"], s["correct_strict"], s["correct_flexible"]) == (3, 1, 2)
    assert s["accuracy_strict"] == pytest.approx(1 / 3) and s["accuracy_flexible"] == pytest.approx(2 / 3)
    assert s["formatted_fraction"] == pytest.approx(2 / 3)
    assert s["refinement"] is None  # a plain callable reports no refinement statistics
    assert s["speed"]["nfe"] == model.calls == 2 * 8  # two batches, 8 steps each
    assert s["speed"]["generated_tokens"] == 3 * 32 and s["speed"]["tokens_per_s"] > 0
    # TPF: 32 tokens per sequence over its 8 model calls (batches of 2 and 1 rows: 96 tokens, 24 row-calls)
    assert s["speed"]["tokens_per_forward"] == pytest.approx(32 / 8)

    lines = (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert [r["correct_strict"] for r in rows] == [True, False, False]
    assert [r["correct_flexible"] for r in rows] == [True, True, False]
    assert rows[1]["prediction_strict"] is None and rows[1]["prediction_flexible"] == refs[1]
    assert rows[0]["completion"] == answers[records[0].question]
    assert rows[2]["question"] == records[2].question and rows[2]["reference"] == records[2].answer
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == json.loads(json.dumps(s))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["predictions.jsonl", "summary.json"]


def test_refinement_statistics_of_the_hybrid(backbone_dir, tokenizer):
    torch.manual_seed(0)
    config = HybridConfig(refiner="mlp", max_recursive_steps=2, chunk_size=8, confidence_threshold=1.5)
    model = LLaDATRMHybrid.from_pretrained(backbone_dir, config, dtype=torch.float32).eval()
    records = load_eval_records("synthetic", "test", synthetic=synthetic_settings(), limit=2)
    options = SamplingOptions(**TINY_SAMPLING)

    refined = evaluate_model(model, tokenizer, records, options, progress=False).summary["refinement"]
    assert refined["chunks_candidate"] > 0
    assert refined["chunks_refined"] == refined["chunks_candidate"]  # threshold > 1: every such chunk
    assert refined["skipped_fraction"] == 0.0
    assert refined["mean_refine_steps"] == 2.0  # never confident enough to halt early

    for cache in ("prefix", "dual"):  # windows start mid-chunk: counts must follow the hybrid's anchoring
        cached = SamplingOptions(**TINY_SAMPLING, cache=cache)
        stats = evaluate_model(model, tokenizer, records, cached, progress=False).summary["refinement"]
        assert stats["chunks_candidate"] > 0, cache
        assert stats["chunks_refined"] == stats["chunks_candidate"], cache

    off = evaluate_model(model, tokenizer, records, options, num_steps=0, progress=False)
    off = off.summary["refinement"]
    assert off["chunks_candidate"] > 0 and off["chunks_refined"] == 0
    assert off["skipped_fraction"] == 1.0 and off["mean_refine_steps"] == 0.0


def test_sampling_options_reject_bad_values():
    with pytest.raises(ValueError, match="multiple of block_length"):
        SamplingOptions(gen_length=100, block_length=32)
    with pytest.raises(ValueError, match="multiple of the number of blocks"):
        SamplingOptions(gen_length=128, block_length=32, steps=6)
    with pytest.raises(ValueError, match="threshold"):
        SamplingOptions(threshold=1.5)
    with pytest.raises(ValueError, match="batch_size"):
        SamplingOptions(batch_size=0)


# ----------------------------------------------------------------------------------------- checkpoints


def test_load_run_checkpoint_restores_the_trained_refiner(run_dir):
    loaded = load_checkpoint(run_dir / "checkpoints" / "last", device="cpu")
    assert (loaded.kind, loaded.refiner, loaded.num_steps) == ("run", "slot", None)
    assert loaded.run_dir == run_dir and loaded.run_config.model.refiner == "slot"
    stored = load_file(str(run_dir / "checkpoints" / "last" / "model.safetensors"))
    params = dict(loaded.model.named_parameters())
    assert stored and all(torch.equal(params[name], tensor) for name, tensor in stored.items())
    assert not loaded.model.training

    from_run_dir = load_checkpoint(run_dir, refiner="none", device="cpu")
    assert from_run_dir.checkpoint_dir == run_dir / "checkpoints" / "last"
    assert (from_run_dir.refiner, from_run_dir.num_steps) == ("none", 0)


def test_load_checkpoint_errors_name_the_fix(run_dir, backbone_dir, tmp_path):
    with pytest.raises(CheckpointError, match="trained the 'slot' refiner only"):
        load_checkpoint(run_dir, refiner="mlp", device="cpu")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing", device="cpu")
    with pytest.raises(CheckpointError, match="no trained refiner"):
        load_checkpoint(backbone_dir, refiner="slot", device="cpu")
    with pytest.raises(CheckpointError, match="not a llada-trm checkpoint"):
        load_checkpoint(tmp_path, device="cpu")
    with pytest.raises(ValueError, match="--refiner"):
        load_checkpoint(backbone_dir, refiner="big", device="cpu")


def test_plain_backbone_and_embedded(backbone_dir, tmp_path, monkeypatch):
    loaded = load_checkpoint(backbone_dir, device="cpu")
    assert (loaded.kind, loaded.refiner, loaded.num_steps) == ("backbone", "none", 0)
    assert loaded.model.backbone.dtype == torch.float32 and loaded.run_dir is None

    monkeypatch.setattr(assets, "_BACKBONE_DIR", tmp_path / "absent")
    with pytest.raises(CheckpointError, match="llada-trm pretrain --config configs/tiny_backbone_v4.yaml"):
        assets.embedded_backbone_dir()
    monkeypatch.setattr(assets, "_BACKBONE_DIR", backbone_dir)
    assert assets.embedded_backbone_dir() == backbone_dir
    assert resolve_backbone_dir("embedded") == backbone_dir  # a run config's `backbone: embedded`
    embedded = load_checkpoint("embedded", device="cpu")
    assert embedded.kind == "backbone" and embedded.backbone_dir == backbone_dir


# --------------------------------------------------------------------------------------------- records


def test_synthetic_records_are_held_out_deterministic_and_prefix_stable():
    settings = synthetic_settings()
    five = load_eval_records("synthetic", "test", synthetic=settings, limit=5)
    assert len(five) == 5 and five[:3] == load_eval_records("synthetic", "test", synthetic=settings, limit=3)
    train = load_eval_records("synthetic", "train", synthetic=settings, limit=50)
    assert not {r.question for r in five} & {r.question for r in train}
    sliced = load_eval_records("synthetic", "test[1:3]", synthetic=settings)
    assert sliced == five[1:3]


def test_synthetic_settings_follow_the_run_then_the_backbone():
    from llada_trm.config import RunConfig

    run = RunConfig.model_validate({"data": {"n_eval": 7}})
    task = synthetic_settings(run.data)  # the run's task: fixed at the embedded backbone's since issue 25
    assert (task.max_steps, task.max_number, task.max_result, task.n_eval) == (2, 12, 100, 7)
    backbone = {"data": {"max_number": 20, "max_steps": 3, "vocab_size": 1024, "n_eval": 40}}
    settings = synthetic_settings(None, backbone)  # a backbone pretrained on another task: its own
    assert (settings.max_number, settings.max_steps, settings.max_result, settings.n_eval) == (20, 3, 100, 40)
    assert synthetic_settings().max_number == RunConfig().data.synthetic.max_number


def test_record_errors():
    with pytest.raises(DataError, match="needs --data-path"):
        load_eval_records("gsm8k", "test")
    with pytest.raises(DataError, match="train, validation, test"):
        load_eval_records("synthetic", "dev")
    with pytest.raises(DataError, match="--dataset"):
        load_eval_records("math", "test")
    with pytest.raises(DataError, match="--limit"):
        load_eval_records("synthetic", "test", limit=0)


def test_gsm8k_file_records():
    records = load_eval_records("gsm8k", "test", data_path=FIXTURE_GSM8K, limit=2)
    assert len(records) == 2 and all(isinstance(r, GSM8KRecord) for r in records)
    assert extract_strict(records[0].answer) == "3"


@pytest.mark.skipif(not GSM8K_TEST.is_file(), reason="GSM8K test file not present")
def test_real_gsm8k_test_split_end_to_end(backbone_dir, tokenizer, tmp_path):
    records = load_eval_records("gsm8k", "test", data_path=GSM8K_TEST, limit=2)
    model = load_checkpoint(backbone_dir, device="cpu").model
    result = evaluate_model(model, tokenizer, records, SamplingOptions(**TINY_SAMPLING), out_dir=tmp_path)
    assert result.summary["n"] == 2
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [r["reference_answer"] for r in rows] == [extract_strict(r.answer) for r in records]
    assert all(r["reference_answer"] is not None for r in rows)


# ---------------------------------------------------------------------------------------------- files


def test_result_files_are_strict_json_and_leave_no_temporary_files(tmp_path):
    path = write_json(tmp_path / "summary.json", {"a": math.nan, "b": [math.inf, 1.0], "c": tmp_path})
    assert json.loads(path.read_text()) == {"a": None, "b": [None, 1.0], "c": str(tmp_path)}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]
