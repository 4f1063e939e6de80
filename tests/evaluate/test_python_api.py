"""The Python API: `load_checkpoint(...).generate([...])`, and the sampler's model-derived [MASK] default."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tiny_assets import REPO, TINY_SAMPLING, run_config

import llada_trm
from llada_trm import SamplingOptions, generate, load_checkpoint
from llada_trm.cli import main
from llada_trm.evaluate.evaluator import call_stats


@pytest.fixture(scope="module")
def sampled_run(tmp_path_factory, backbone_dir) -> Path:
    """A 2-step slot run whose config records small sampler settings (as the main job's does)."""
    from llada_trm.config import parse_config
    from llada_trm.training.loop import Trainer

    out = tmp_path_factory.mktemp("api_run") / "run"
    raw = run_config(backbone_dir, out)
    raw["sampling"] = {**TINY_SAMPLING, "threshold": 0.9}  # sampled in the training batch (8)
    Trainer(parse_config(raw), progress=False).train()
    return out


def test_load_checkpoint_is_exported_and_generate_answers_with_stats(sampled_run):
    assert llada_trm.load_checkpoint is load_checkpoint
    model = load_checkpoint(sampled_run, device="cpu")
    questions = ["Ann has 3 pens. She buys 2 more. How many pens?", "Bo has 4 cups. He breaks 1.", "x"]
    result = model.generate(questions)
    assert len(result.answers) == 3 and all(isinstance(a, str) for a in result.answers)
    # The run's own sampling section, not LLaDA's exact sampler at gen_length 128.
    assert result.options["gen_length"] == 16 and result.options["threshold"] == 0.9
    assert result.nfe > 0
    assert result.stats and all(math.isfinite(v) for v in result.stats.values())
    for kept in ("chunks_refined", "delta_norm", "slot_norm_ctx", "gate_ctx"):
        assert kept in result.stats, kept
    # Batches of 2 then 1 give the same answers as one batch of 3 under the greedy sampler.
    alone = model.generate(questions[2], batch_size=1)
    assert alone.answers == [result.answers[2]]
    assert model.generate(questions, steps=2, threshold=None).options["steps"] == 2


def test_generate_rejects_unknown_settings_and_empty_questions(sampled_run):
    model = load_checkpoint(sampled_run, device="cpu")
    with pytest.raises(ValueError, match="unknown sampling setting.*mask_id"):
        model.generate(["q"], mask_id=3)
    with pytest.raises(ValueError, match="empty question"):
        model.generate(["  "])
    # every question is answered, so one past the backbone's positions is refused, naming it
    with pytest.raises(ValueError, match=r"^question 2: a \d+-token prompt \+ gen_length 16 .* exceed the"):
        model.generate(["q", "one two three " * 100])
    with pytest.raises(ValueError, match="non-empty list"):
        model.generate([])


def test_bare_backbone_keeps_llada_defaults(backbone_dir):
    model = load_checkpoint(backbone_dir, device="cpu")
    assert model.sampling == llada_trm.SamplingOptions()
    assert model.sampling_with(gen_length=16, block_length=8, steps=None).gen_length == 16


def test_low_level_generate_defaults_mask_id_to_the_models_own(backbone_dir):
    model = load_checkpoint(backbone_dir, device="cpu").model
    own = model.backbone.config.mask_token_id
    assert own < model.backbone.config.vocab_size < 126336
    prompt = torch.tensor([[5, 6, 7]])
    tokens = generate(model, prompt, steps=4, gen_length=8, block_length=8)
    assert tokens.shape == (1, 11)
    assert torch.equal(tokens, generate(model, prompt, steps=4, gen_length=8, block_length=8, mask_id=own))
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        generate(model, prompt, steps=4, gen_length=8, block_length=8, mask_id=126336)


def test_call_stats_drop_nan_and_keep_norms_and_gates():
    stats = call_stats(
        {
            "confidence": float("nan"),
            "refine_steps": 0.0,
            "chunk": torch.tensor(float("nan")),
            "delta_norms": [1.0, 3.0],
            "slot_norms": {"ctx": 2.0},
            "gates": {"conf": 0.5},
        }
    )
    assert "confidence" not in stats and "chunk" not in stats
    assert stats["refine_steps"] == 0.0 and stats["delta_norm"] == 2.0
    assert stats["slot_norm_ctx"] == 2.0 and stats["gate_conf"] == 0.5


# ------------------------------------------------------- eval / generate inherit the run's sampling


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def test_eval_inherits_the_runs_sampling_unless_a_flag_overrides_it(sampled_run, tmp_path, capsys):
    base = ["eval", "--checkpoint", str(sampled_run), "--limit", "2", "--no-progress", "--device", "cpu"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    summary = _summary(tmp_path / "a")
    assert summary["sampling"]["gen_length"] == 16 and summary["sampling"]["threshold"] == 0.9
    assert summary["sampling_from"] == {"base": "run config", "flags": []}
    assert "(run config)" in capsys.readouterr().out
    flags = ["--gen-length", "8", "--block-length", "8", "--steps", "2", "--threshold", "off"]
    assert main([*base, "--out", str(tmp_path / "b"), *flags]) == 0
    summary = _summary(tmp_path / "b")
    assert summary["sampling"]["gen_length"] == 8 and summary["sampling"]["threshold"] is None
    assert summary["sampling"]["batch_size"] == 8  # unset: still the run's (its training batch)
    assert summary["sampling_from"]["flags"] == ["block_length", "gen_length", "steps", "threshold"]


def test_unset_flags_mean_the_checkpoints_value(sampled_run, backbone_dir):
    from llada_trm.cli import build_parser, sampling_options

    def options(*argv: str) -> SamplingOptions:
        return sampling_options(build_parser().parse_args(["eval", *argv]))

    assert options("--checkpoint", str(backbone_dir)) == SamplingOptions()
    assert options("--checkpoint", "embedded", "--seed", "3").seed == 3
    run = options("--checkpoint", str(sampled_run / "checkpoints" / "last"))
    assert run == load_checkpoint(sampled_run, device="cpu").sampling
    assert run.threshold == 0.9 and run.gen_length == 16


def test_eval_warns_when_most_completions_are_empty(capsys):
    from llada_trm.cli import _print_eval_summary, build_parser

    args = build_parser().parse_args(["eval", "--checkpoint", "embedded"])
    summary = {
        "n": 4, "correct_strict": 0, "correct_flexible": 0, "accuracy_strict": 0.0,
        "accuracy_flexible": 0.0,
        "empty_completions": 3, "sampling": SamplingOptions().to_dict(),
        "speed": {"tokens_per_s": 1.0, "nfe": 1, "total_s": 1.0},
    }
    _print_eval_summary(args, "none", summary, Path("out"))
    assert "warning: 3 of 4 completions are empty" in capsys.readouterr().out
    _print_eval_summary(args, "none", {**summary, "empty_completions": 2}, Path("out"))
    assert "warning" not in capsys.readouterr().out


def test_generate_file_writes_answers_atomically(sampled_run, tmp_path, capsys):
    questions = tmp_path / "questions.txt"
    questions.write_text("Ann has 3 pens. She buys 2 more. How many pens?\n\nBo has 4 cups.\n")
    out = tmp_path / "answers.jsonl"
    argv = ["generate", "--checkpoint", str(sampled_run), "--device", "cpu", "--file", str(questions)]
    assert main([*argv, "--out", str(out)]) == 0
    assert "wrote 2 answers" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    first = "Ann has 3 pens. She buys 2 more. How many pens?"
    assert [r["question"] for r in rows] == [first, "Bo has 4 cups."]
    assert all(r["sampling"]["gen_length"] == 16 for r in rows)
    assert not [p for p in tmp_path.iterdir() if p.name not in ("questions.txt", "answers.jsonl")]
    assert main(argv) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert main(["generate", "--checkpoint", str(sampled_run), "q", "--file", str(questions)]) == 2
    assert "either one quoted question or --file" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(sampled_run), "q", "--out", str(out)]) == 2
    assert "--out writes the answers of a --file batch" in capsys.readouterr().err


# ------------------------------------------------------------------------------- the README's snippet


def _readme_snippet() -> str:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Python API\n") :]
    return section[section.index("```python\n") + len("```python\n") : section.index("```\n", 12)]


def test_readme_snippet_loads_the_main_job_run_and_prints_three_answers(sampled_run, capsys):
    code = _readme_snippet()
    assert 'load_checkpoint("runs/compare/seed0/slot")' in code  # the main job's run, not a fallback
    exec(compile(code.replace("runs/compare/seed0/slot", str(sampled_run)), "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert out.count("  -> ") == 3
    stats = out.strip().splitlines()[-1]
    assert "chunks_refined" in stats and "nan" not in stats
