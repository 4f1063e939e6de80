"""Progress in a log file: plain lines every log_every steps and at each validation, never bar redraws."""

from __future__ import annotations

import io
import re

import yaml
from tiny_assets import TINY_SAMPLING, run_config, tiny_run

from llada_trm import progress
from llada_trm.cli import main

SAMPLING = [f"--{key.replace('_', '-')}={value}" for key, value in TINY_SAMPLING.items()]
TRAIN_LINE = re.compile(
    r"^train: step (\d+)/4 \(\d+%\), loss \d+\.\d{4}, lr \d\.\d\de[-+]\d\d, .*(ETA|done in)"
)


def test_train_piped_prints_plain_lines_every_log_every_steps(backbone_dir, tmp_path, capfd):
    """stderr captured (not a terminal), no flag: one line per --log-every steps, one per validation, no
    \\r (the flag reaches the loop: tests/conftest.py's default is every step)."""
    config = tmp_path / "run.yaml"
    raw = run_config(backbone_dir, tmp_path / "out", refiner="mlp", max_steps=4, eval_every=2)
    config.write_text(yaml.safe_dump(raw))
    assert main(["train", "--config", str(config), "--log-every", "2"]) == 0
    err = capfd.readouterr().err
    assert "\r" not in err, "a progress bar redraw reached a log"
    lines = err.splitlines()
    steps = [int(m.group(1)) for line in lines if (m := TRAIN_LINE.match(line))]
    assert steps == [2, 4], err
    assert "s/step" in err or "step/s" in err
    validations = [line for line in lines if line.startswith("validation at step ")]
    assert [line.split()[3] for line in validations] == ["2/4:", "4/4:"], err
    assert "val loss" in validations[0] and "masked accuracy" in validations[0]


def test_no_progress_prints_the_plain_lines_on_a_terminal_too(backbone_dir, tmp_path, capfd, monkeypatch):
    """--no-progress: no bar even where stderr is a terminal, but the same plain lines (not silence)."""
    monkeypatch.setattr(progress, "use_bars", lambda stream=None: not progress._force_plain)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(run_config(backbone_dir, tmp_path / "out", refiner="mlp")))
    assert main(["train", "--config", str(config), "--no-progress"]) == 0
    err = capfd.readouterr().err
    assert "\r" not in err
    assert [line for line in err.splitlines() if TRAIN_LINE.match(line.replace("/2 ", "/4 "))], err


def test_eval_piped_prints_a_line_per_batch(tmp_path_factory, tmp_path, capfd):
    run = tiny_run(tmp_path_factory)
    argv = ["eval", "--checkpoint", str(run), "--limit", "4", "--batch-size", "2", "--out", str(tmp_path)]
    assert main([*argv, *SAMPLING]) == 0
    err = capfd.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("eval slot: problem ")]
    assert [line.split()[3] for line in lines] == ["2/4", "4/4"], err
    assert "acc " in lines[0] and "ETA" in lines[0] and "done in" in lines[1]


def test_plain_progress_counts_every_and_closes_on_the_last():
    stream = io.StringIO()
    bar = progress.Progress(5, desc="x", unit="step", every=2, stream=stream)
    for _ in range(5):
        bar.set_postfix(loss="1.0")
        bar.update(1)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert [line.split()[2] for line in lines] == ["2/5", "4/5", "5/5"]
    assert lines[0].startswith("x: step 2/5 (40%), loss 1.0, ") and "ETA" in lines[0]
    assert progress.format_duration(3725) == "1h02m" and progress.format_duration(95) == "1m35s"


def test_large_weights_report_loading_and_writing(backbone_dir, tmp_path, capfd, monkeypatch):
    """Weights above LARGE_WEIGHTS_BYTES report each shard read and written (an 8B load takes minutes)."""
    from llada_trm.model.llada import LLaDAModel
    from llada_trm.model.llada_weights import load_weights, read_config, save_state_dict

    config = read_config(backbone_dir)
    model = LLaDAModel(config)
    load_weights(model, backbone_dir)
    assert "loading weights" not in capfd.readouterr().err  # small: silent
    monkeypatch.setattr(progress, "LARGE_WEIGHTS_BYTES", 0)
    save_state_dict(model.state_dict(), config, tmp_path / "sharded", max_shard_size="100KB")
    load_weights(model, tmp_path / "sharded")
    err = capfd.readouterr().err
    written = [line for line in err.splitlines() if line.startswith("writing weights sharded: shard")]
    read = [line for line in err.splitlines() if line.startswith("loading weights sharded: shard")]
    assert len(written) == len(read) > 1, err
    assert read[-1].split()[4].split("/")[0] == read[-1].split()[4].split("/")[1]


def test_a_combined_log_keeps_messages_and_progress_in_order(monkeypatch):
    """`llada-trm compare ... > log 2>&1`: stdout is block-buffered in a pipe (compare's headers, the
    tables); each progress line flushes it first, so a header precedes the steps it announces."""
    log: list[str] = []

    class Stream(io.StringIO):
        def __init__(self, name: str):
            super().__init__()
            self.name = name

        def write(self, text: str) -> int:
            log.append(f"{self.name}:{text}") if text.strip() else None
            return len(text)

        def flush(self) -> None:
            log.append(f"{self.name}:flush")

    monkeypatch.setattr("sys.stdout", Stream("out"))
    monkeypatch.setattr("sys.stderr", Stream("err"))
    print("== training slot ==")  # buffered: nothing is written before a flush
    bar = progress.Progress(2, desc="train", unit="step")
    bar.update(1)
    progress.note("validation at step 1/2: val loss 1.0")
    first_err = next(i for i, entry in enumerate(log) if entry.startswith("err:train: step 1/2"))
    assert "out:flush" in log[:first_err]
    assert log.index("err:validation at step 1/2: val loss 1.0") > first_err


def test_pretrain_piped_prints_plain_lines(tmp_path, capfd):
    from tiny_assets import TINY_PRETRAIN

    sets = [w for o in [*TINY_PRETRAIN, "training.steps=4", "training.log_every=2"] for w in ("--set", o)]
    assert main(["pretrain", *sets, "--out", str(tmp_path / "backbone")]) == 0
    err = capfd.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("train: step ")]  # the one loop's
    assert [line.split()[2] for line in lines] == ["2/4", "4/4"], err
    assert ", loss " in lines[0] and ", lr " in lines[0] and "ETA" in lines[0]


def test_a_validation_line_without_a_refiner_shows_no_backbone_beside_itself_and_its_targets():
    validation_line = progress.validation_line
    row = {"step": 500, "loss": 0.1752, "loss_base": 0.1752, "accuracy": 0.923, "accuracy_base": 0.923,
           "strict": 0.0156, "line_arithmetic": 0.031, "entity_copy": None}  # fmt: skip
    assert validation_line(row, 3000) == (
        "validation at step 500/3000: val loss 0.1752 (backbone 0.1752), "
        "masked accuracy 0.923 (backbone 0.923)"
    )
    plain = validation_line(row, 3000, refiner=False, extra=("strict", "line_arithmetic", "entity_copy"))
    assert plain == (
        "validation at step 500/3000: val loss 0.1752, masked accuracy 0.923, strict 0.016, "
        "line arithmetic 0.031"
    )
