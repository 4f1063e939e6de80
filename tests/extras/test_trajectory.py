"""`llada-trm generate --show-steps` / `--html`: the denoising trajectory as text and as a page."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from tiny_assets import tiny_run

from llada_trm.cli import main
from llada_trm.diffusion.sampler import StepEvent
from llada_trm.extras.trajectory import END_GLYPH, MASK_GLYPH, Trajectory, render_html, render_text

QUESTION = "Tom has 3 apples. He buys 4 more. How many apples does he have?"
TINY = ["--gen-length=16", "--block-length=8", "--steps=4"]  # 2 blocks of 2 steps


class Pieces:
    """A stand-in tokenizer: token t decodes to "t<t>"; 0 and 1 are special (end of text)."""

    all_special_ids = [0, 1]

    def decode(self, ids: list[int]) -> str:
        return f"t{ids[0]}"


def _event(
    step: int, committed: list[int], tokens: list[int], refined: list[int], halted: list[int]
) -> StepEvent:
    mask = torch.zeros(1, len(tokens), dtype=torch.bool)
    mask[0, committed] = True
    confidence = torch.full((1, len(tokens)), float("nan"))
    confidence[0, committed] = 0.5
    chunks = torch.zeros(1, 3, dtype=torch.bool)
    chunks[0, refined] = True
    stopped = torch.zeros(1, 3, dtype=torch.bool)
    stopped[0, halted] = True
    return StepEvent(
        block=0, step=step, committed=mask, tokens=torch.tensor([tokens]), confidence=confidence, mask_id=9,
        prompt_length=2, chunk_size=2, chunks_refined=chunks, chunks_halted=stopped,
    )


def _trajectory() -> Trajectory:
    """Answer of 4 positions after a prompt of 2 (chunks of 2: chunk 1 = answer 0-1, chunk 2 = answer 2-3)."""
    trajectory = Trajectory()
    trajectory(_event(0, [1], [9, 5, 9, 9], refined=[1, 2], halted=[2]))
    trajectory(_event(1, [0, 2, 3], [7, 5, 6, 0], refined=[], halted=[]))
    return trajectory


def test_text_shows_each_steps_answer_commits_and_chunks():
    text = render_text(_trajectory(), Pieces())
    lines = text.splitlines()
    assert lines[0] == "step 1 (block 0, step 0): +1; refined chunks at 0-1, 2-3 (halted early: 2-3)"
    assert lines[1] == f"  {MASK_GLYPH}t5{MASK_GLYPH}{MASK_GLYPH}"
    assert lines[2] == "  committed 1:'t5'(0.50)"
    assert lines[3] == "step 2 (block 0, step 1): +3; no chunk refined"
    assert lines[4] == f"  t7t5t6{END_GLYPH}"


def test_long_placeholder_runs_are_counted():
    trajectory = Trajectory()
    trajectory(_event(0, [0], [5] + [9] * 5, refined=[], halted=[]))
    assert render_text(trajectory, Pieces()).splitlines()[1] == f"  t5{MASK_GLYPH}×5"


def test_html_colours_tokens_by_step_and_marks_chunks():
    page = render_html(_trajectory(), Pieces(), title="<q & a>", settings="steps 2")
    assert "&lt;q &amp; a&gt;" in page and "<q & a>" not in page  # the question is escaped
    assert "<script" not in page and "http" not in page  # self-contained
    rows = re.findall(r"<tr>.*?</tr>", page, flags=re.S)
    assert len(rows) == 1 + 2  # the header and one row per step
    first = re.findall(r'<td class="([^"]*)"', rows[1])
    assert first == ["masked refined", "new refined", "masked halted", "masked halted"]
    second = re.findall(r'<td class="([^"]*)"', rows[2])
    assert second == ["new", "known", "new", "new"]
    answer = re.search(r'<p class="answer">(.*?)</p>', page).group(1)
    colours = re.findall(r"background:(hsl\([^)]*\))", answer)
    assert colours == ["hsl(0, 75%, 82%)", "hsl(240, 75%, 82%)", "hsl(0, 75%, 82%)", "hsl(0, 75%, 82%)"]


def test_generate_show_steps_prints_every_step_then_the_answer(capsys):
    assert main(["generate", "--checkpoint", "embedded", QUESTION, *TINY, "--show-steps"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    legend, out = out[0], out[1:]  # first, how to read the steps
    assert legend.startswith("legend: step N (block b, step s): +k = k tokens committed")
    assert f"{MASK_GLYPH} a still-masked position" in legend and "refined chunks" not in legend
    headers = [line for line in out if line.startswith("step ")]
    assert [h.split(":")[0] for h in headers] == [
        "step 1 (block 0, step 0)", "step 2 (block 0, step 1)", "step 3 (block 1, step 0)",
        "step 4 (block 1, step 1)",
    ]
    assert MASK_GLYPH in out[1] and MASK_GLYPH not in out[len(headers) * 3 - 2]  # masks fill in
    assert main(["generate", "--checkpoint", "embedded", QUESTION, *TINY]) == 0
    plain = capsys.readouterr().out.strip().splitlines()
    assert out[-len(plain) :] == plain  # the same answer as without --show-steps


def test_generate_html_writes_one_page_atomically(tmp_path: Path, capsys):
    page = tmp_path / "steps" / "trajectory.html"
    assert main(["generate", "--checkpoint", "embedded", QUESTION, *TINY, "--html", str(page)]) == 0
    assert f"wrote {page}" in capsys.readouterr().out
    text = page.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and text.count("<tr>") == 1 + 4
    assert [p.name for p in page.parent.iterdir()] == ["trajectory.html"]  # no temporary file left


def test_a_refining_run_shows_its_chunks(tmp_path_factory, capsys):
    run = tiny_run(tmp_path_factory)
    capsys.readouterr()  # the fixture's training output
    assert main(["generate", "--checkpoint", str(run), QUESTION, *TINY, "--show-steps"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("legend: ") and "refined chunks at a-b" in out[0]
    headers = [line for line in out if line.startswith("step ")]
    assert len(headers) == 4
    assert all("refined chunks at" in h or "no chunk refined" in h for h in headers)
    assert any("refined chunks at" in h for h in headers)  # the slot refiner is reported


def test_show_steps_traces_one_question(tmp_path: Path, capsys):
    questions = tmp_path / "q.txt"
    questions.write_text(f"{QUESTION}\n{QUESTION}\n")
    line = _error(capsys, ["generate", "--checkpoint", "embedded", "--file", str(questions), "--show-steps"])
    assert "one quoted question" in line


def _error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err.strip()
