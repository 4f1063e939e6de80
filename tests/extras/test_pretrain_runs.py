"""`llada-trm pretrain` as a resumable run: exact resume, the output guard, init_from, target evaluations on
the validation split, stop_at. Tiny shapes, so each run takes a second or two."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_assets import TINY_PRETRAIN as TINY
from tiny_assets import tiny_pretrain as tiny

from llada_trm.data.synthetic import SyntheticTaskConfig, generate_problems, parse_solution
from llada_trm.errors import CheckpointError, ConfigError
from llada_trm.extras.pretraining import export, run
from llada_trm.extras.pretraining.run import pretrain
from llada_trm.extras.pretraining.targets import TARGET_COLUMNS, target_metrics
from llada_trm.training.loop import Trainer


def rows(directory: Path, name: str = "training") -> list[dict[str, str]]:
    lines = (directory / f"{name}_metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    return [dict(zip(header, line.split(","), strict=True)) for line in lines[1:]]


def without_time(table: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{k: v for k, v in row.items() if k not in ("tokens_per_s", "elapsed_s")} for row in table]


def test_an_interrupted_run_resumes_to_the_uninterrupted_run(tmp_path, monkeypatch):
    straight = pretrain(tiny(tmp_path / "a", "data.random_padding=true", "training.object_weight=5"),
                        progress=False)  # fmt: skip
    assert straight.steps == 8

    step = Trainer.train_step
    calls = []

    def killed_in_step_six(self, batches):
        calls.append(1)
        if len(calls) == 6:  # after the save at 3 and the evaluation at 4, before the save at 6
            raise KeyboardInterrupt
        return step(self, batches)

    monkeypatch.setattr(Trainer, "train_step", killed_in_step_six)
    with pytest.raises(KeyboardInterrupt):
        pretrain(tiny(tmp_path / "b", "data.random_padding=true", "training.object_weight=5"), progress=False)
    assert (tmp_path / "b.partial" / "checkpoints" / "last" / "trainer_state.pt").is_file()
    assert not (tmp_path / "b").exists()
    monkeypatch.setattr(Trainer, "train_step", step)

    b = ("data.random_padding=true", "training.object_weight=5")
    with pytest.raises(CheckpointError, match=r"--resume to continue it, or --force"):
        pretrain(tiny(tmp_path / "b", *b), progress=False)
    with pytest.raises(CheckpointError, match=r"cannot change on resume: training\.seed \(0 -> 1\)"):
        pretrain(tiny(tmp_path / "b", *b, "training.seed=1"), progress=False, resume=True)
    with pytest.raises(CheckpointError, match=r"cannot change on resume: training\.object_weight"):
        pretrain(tiny(tmp_path / "b", "data.random_padding=true"), progress=False, resume=True)
    resumed = pretrain(tiny(tmp_path / "b", *b), progress=False, resume=True)
    assert resumed.steps == 8 and not (tmp_path / "b.partial").exists()

    for name in ("training", "validation"):
        assert without_time(rows(tmp_path / "b", name)) == without_time(rows(tmp_path / "a", name))
    assert [row["step"] for row in rows(tmp_path / "b")] == [str(i) for i in range(1, 9)]
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        pretrain(tiny(tmp_path / "c"), progress=False, resume=True)


def test_pretrain_never_overwrites_a_backbone_without_force(tmp_path):
    out = tmp_path / "backbone"
    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"already exists .*--out DIR .*--force"):
        pretrain(tiny(out), progress=False)
    assert (out / "config.json").read_text() == "{}" and not (tmp_path / "backbone.partial").exists()
    pretrain(tiny(out, "training.steps=2"), progress=False, force=True)
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()


def test_cli_output_overrides_output_dir_and_refuses_an_existing_one(tmp_path, capsys):
    from llada_trm.cli import main

    out = tmp_path / "elsewhere"
    argv = ["pretrain", "--no-progress", *[w for o in [*TINY, "training.steps=2"] for w in ("--set", o)]]
    assert main([*argv, "--out", str(out)]) == 0
    card = (out / "README.md").read_text()
    assert f"--out {out}" in card and "--set training.steps=2" in card
    capsys.readouterr()
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--force" in err[0]


def test_init_from_keeps_the_backbones_tokenizer_and_weights(tmp_path):
    first = tmp_path / "first"
    pretrain(tiny(first, "training.steps=2"), progress=False)
    # lr 0: the continued backbone must come out exactly as it went in; another vocab_size would build
    # another tokenizer if init_from rebuilt it
    config = tiny(tmp_path / "second", f"model.init_from={first}", "training.lr=0", "data.vocab_size=300",
                  "training.steps=2")  # fmt: skip
    pretrain(config, progress=False)
    assert (tmp_path / "second" / "tokenizer.json").read_bytes() == (first / "tokenizer.json").read_bytes()
    a, b = load_file(first / "model.safetensors"), load_file(tmp_path / "second" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    card = (tmp_path / "second" / "README.md").read_text()
    assert f"continued from `{first}`" in card
    with pytest.raises(ConfigError, match=r"model\.init_from: .*another shape \(d_model 64 vs 32"):
        pretrain(tiny(tmp_path / "third", f"model.init_from={first}", "model.d_model=64"), progress=False)


def test_evaluations_sample_the_validation_split_and_the_card_the_test_split(tmp_path, monkeypatch):
    seen: dict[str, list[list[str]]] = {"loop": [], "export": []}
    for module, name in ((run, "loop"), (export, "export")):
        original = module.sample_predictions

        def spy(model, tokenizer, records, evaluation, _original=original, _name=name):
            seen[_name].append([r.question for r in records])
            return _original(model, tokenizer, records, evaluation)

        monkeypatch.setattr(module, "sample_predictions", spy)
    pretrain(tiny(tmp_path / "out"), progress=False)

    task = SyntheticTaskConfig(min_steps=1, max_steps=2, max_number=20, max_result=1000, seed=0)
    validation = [r.question for r in generate_problems(task, 3, split="validation")]
    test = [r.question for r in generate_problems(task, 3, split="test")]
    assert seen["loop"] == [validation, validation]  # steps 4 and 8
    assert seen["export"] == [test]
    table = rows(tmp_path / "out", "validation")
    assert set(TARGET_COLUMNS) <= set(table[0])
    for name in ("strict", "accuracy"):
        assert [row["step"] for row in table if row[name] != ""] == ["4", "8"]
        assert all(0.0 <= float(row[name]) <= 1.0 for row in table if row[name] != "")


def test_target_metrics_count_strict_entity_copy_and_line_arithmetic():
    records = generate_problems(SyntheticTaskConfig(min_steps=2, max_steps=2), 4, split="validation")
    right = [{"question": r.question, "reference": r.answer, "completion": r.answer, "correct_strict": True}
             for r in records]  # fmt: skip
    found = target_metrics(right)
    assert found["strict"] == 1.0 and found["entity_copy"] == 1.0 and found["line_arithmetic"] == 1.0
    renamed = [{**p, "completion": "Zzyzx" + p["completion"].split(" ", 1)[1], "correct_strict": False}
               for p in right]  # fmt: skip
    found = target_metrics(renamed)
    assert found["strict"] == 0.0 and found["entity_copy"] == pytest.approx(0.5)
    assert found["line_arithmetic"] == 1.0

    def other_object(prediction: dict) -> dict:
        first, rest = prediction["completion"].split("\n", 1)
        noun = parse_solution(prediction["reference"])[0].noun
        head, tail = first.split(">>", 1)
        return {**prediction, "completion": head + ">>" + tail.replace(noun, "pebbles") + "\n" + rest}

    found = target_metrics([other_object(p) for p in right])  # the right person, another object
    assert found["person_copy"] == 1.0 and found["entity_copy"] == pytest.approx(0.5)


def test_stop_at_ends_training_at_the_first_evaluation_meeting_every_target(tmp_path):
    met = pretrain(tiny(tmp_path / "met", "training.stop_at.strict_min=0.0"), progress=False)
    assert met.stopped_at_target and met.steps == 4
    assert [row["step"] for row in rows(tmp_path / "met")][-1] == "4"
    unmet = pretrain(tiny(tmp_path / "unmet", "training.stop_at.strict_min=1.0"), progress=False)
    assert not unmet.stopped_at_target and unmet.steps == 8


def _spy_mask_draws(monkeypatch) -> list[tuple[object, torch.Tensor]]:
    """Every `TrainingMasks.draw` of the run, as (its mask distribution, the p_mask it returned)."""
    from llada_trm.diffusion.forward_process import TrainingMasks

    drawn: list[tuple[object, torch.Tensor]] = []
    original = TrainingMasks.draw

    def spy(self, batch, examples, draws):
        noise = original(self, batch, examples, draws)
        drawn.append((self.distribution, noise[2]))
        return noise

    monkeypatch.setattr(TrainingMasks, "draw", spy)
    return drawn


def test_a_pretraining_trains_on_the_runs_training_masks(tmp_path, monkeypatch):
    """`training.masks` reaches the one loop: a backbone fine-tuned on answer-structure masks draws them
    (p_mask 1, the targeted masks' weight) for every training row, not LLaDA's forward process."""
    drawn = _spy_mask_draws(monkeypatch)
    pretrain(tiny(tmp_path / "a", "training.steps=2", "training.masks=answer_structure"), progress=False)
    assert len(drawn) >= 2 and {masks.kind for masks, _ in drawn} == {"answer_structure"}
    assert all(bool((p_mask == 1).all()) for _, p_mask in drawn)


def test_a_run_of_the_old_pretraining_loop_is_refused_by_name_and_archived_with_force(tmp_path):
    partial = tmp_path / "out.partial"
    (partial / "checkpoint").mkdir(parents=True)
    (partial / "checkpoint" / "config.yaml").write_text("model: {}\n")
    (partial / ".pretrain-run").write_text("{}")
    for resume in (False, True):
        with pytest.raises(CheckpointError, match=r"pretraining's own loop .*--force"):
            pretrain(tiny(tmp_path / "out"), progress=False, resume=resume)
    assert (partial / "checkpoint" / "config.yaml").is_file()
    pretrain(tiny(tmp_path / "out", "training.steps=1", "training.eval_every=0"), progress=False, force=True)
    archived = list(tmp_path.glob("out.partial.old-*"))
    assert len(archived) == 1 and (archived[0] / "checkpoint" / "config.yaml").is_file()


def test_the_loops_loss_weights_object_nouns_and_trains_on_random_padding(tmp_path, monkeypatch):
    """What `RunParts.batch` adds reaches the one loop's objective: the object-noun weights, and batches
    EOS-padded past their longest example (every row's last position is padding)."""
    from llada_trm.training import objective

    seen: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    original = objective.masked_diffusion_loss

    def spy(logits, target_ids, *args, token_weights=None, **kwargs):
        seen.append((target_ids, token_weights))
        return original(logits, target_ids, *args, token_weights=token_weights, **kwargs)

    monkeypatch.setattr(objective, "masked_diffusion_loss", spy)
    pretrain(tiny(tmp_path / "a", "training.steps=3", "training.eval_every=0", "training.object_weight=5",
                  "data.random_padding=true"), progress=False)  # fmt: skip
    assert len(seen) == 3
    tails = []
    for ids, weights in seen:
        assert weights is not None and set(weights.unique().tolist()) <= {1.0, 5.0}
        assert bool((weights == 5.0).any())  # every batch names some object
        eos = (ids == ids[0, -1]).all(dim=0).flip(0)  # columns that are EOS in every row, from the end
        tails.append(int(eos.cumprod(0).sum()))
    assert max(tails) > 2  # padded past the longest row (its own EOS ends it), by a drawn length


def test_a_pretraining_mixes_forward_process_rows_into_targeted_masks(tmp_path, monkeypatch):
    """`training.forward_mix` reaches the masks: with 1.0 every row keeps LLaDA's forward process (its
    p_mask is t, below 1 somewhere), with the default 0 none does (the test above)."""
    drawn = _spy_mask_draws(monkeypatch)
    pretrain(tiny(tmp_path / "a", "training.steps=2", "training.masks=answer_structure",
                  "training.forward_mix=1.0"), progress=False)  # fmt: skip
    assert drawn and {masks.forward_mix for masks, _ in drawn} == {1.0}
    assert all(bool((p_mask < 1).any()) for _, p_mask in drawn)
