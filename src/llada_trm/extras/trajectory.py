"""A denoising trajectory, readable: `llada-trm generate --show-steps` (text) and `--html FILE` (one
self-contained page: the answer coloured by the step that committed each token, and a grid of steps x
positions). `Trajectory` is the sampler's `on_step` callback for one answer.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any

from llada_trm.diffusion.sampler import StepEvent

MASK_GLYPH = "░"
END_GLYPH = "·"
_RUN = 4  # placeholder runs at least this long are written once with a count


@dataclass
class Step:
    """One step of one answer: (position, token, confidence) commits, the answer after it, chunk spans."""

    block: int
    step: int
    commits: list[tuple[int, int, float]]
    tokens: list[int]
    refined: list[tuple[int, int]]
    halted: list[tuple[int, int]]


@dataclass
class Trajectory:
    """The steps of answer ``row`` of a batch, recorded as the sampler reports them (pass as ``on_step``)."""

    row: int = 0
    steps: list[Step] = field(default_factory=list)
    mask_id: int | None = None

    def __call__(self, event: StepEvent) -> None:
        self.mask_id = event.mask_id
        self.steps.append(
            Step(
                block=event.block,
                step=event.step,
                commits=event.commits(self.row),
                tokens=event.tokens[self.row].tolist(),
                refined=event.chunk_spans("refined", self.row),
                halted=event.chunk_spans("halted", self.row),
            )
        )

    @property
    def refining(self) -> bool:
        """Whether the model reported chunks at all (a refiner is present)."""
        return any(step.refined for step in self.steps)

    def committed_at(self) -> dict[int, int]:
        """Answer position -> index of the step that committed its final token (mask "commits" skipped)."""
        when: dict[int, int] = {}
        for index, step in enumerate(self.steps):
            for position, token, _ in step.commits:
                if token != self.mask_id:
                    when[position] = index
        return when


class _Pieces:
    """Token id -> display text: the tokenizer's piece, the mask and end-of-text tokens as glyphs."""

    def __init__(self, tokenizer: Any, mask_id: int | None) -> None:
        self.tokenizer = tokenizer
        self.mask_id = mask_id
        self.special = set(getattr(tokenizer, "all_special_ids", ()) or ())
        self.cache: dict[int, str] = {}

    def __call__(self, token: int) -> str:
        if token == self.mask_id:
            return MASK_GLYPH
        if token in self.special:
            return END_GLYPH
        if token not in self.cache:
            self.cache[token] = self.tokenizer.decode([token]).replace("\n", "⏎")
        return self.cache[token]


def _spans(spans: list[tuple[int, int]]) -> str:
    return ", ".join(f"{start}-{end - 1}" for start, end in spans)


def _answer_line(tokens: list[int], piece: _Pieces) -> str:
    """The answer so far, with runs of masks or end tokens written as ``░×N``."""
    parts: list[str] = []
    index = 0
    while index < len(tokens):
        text = piece(tokens[index])
        run = 1
        if text in (MASK_GLYPH, END_GLYPH):
            while index + run < len(tokens) and piece(tokens[index + run]) == text:
                run += 1
        parts.append(f"{text}×{run}" if run >= _RUN else text * run)
        index += run
    return "".join(parts)


def text_legend(trajectory: Trajectory) -> str:
    """How to read `render_text`: what a header, the answer line and a commit stand for."""
    refiner = (
        "; refined chunks at a-b: answer positions a..b the refiner reworked this step (halted early: "
        "stopped before its K steps)"
        if trajectory.refining
        else ""
    )
    return (
        f"legend: step N (block b, step s): +k = k tokens committed at that step{refiner}; answer line: "
        f"{MASK_GLYPH} a still-masked position, {END_GLYPH} an end-of-text token, {MASK_GLYPH}×n a run of n; "
        "committed pos:'token'(confidence)"
    )


def render_text(trajectory: Trajectory, tokenizer: Any, *, legend: bool = False) -> str:
    """Every step: its header (block, step, tokens committed, refined / halted chunks as answer positions),
    the answer after it, and each committed token with its position and confidence; `legend`: first, a line
    saying how to read them (`generate --show-steps` prints it)."""
    piece = _Pieces(tokenizer, trajectory.mask_id)
    lines = [text_legend(trajectory)] if legend else []
    for index, step in enumerate(trajectory.steps):
        header = f"step {index + 1} (block {step.block}, step {step.step}): +{len(step.commits)}"
        if step.refined:
            header += f"; refined chunks at {_spans(step.refined)}"
            if step.halted:
                header += f" (halted early: {_spans(step.halted)})"
        elif trajectory.refining:
            header += "; no chunk refined"
        commits = " ".join(f"{p}:{piece(t)!r}({c:.2f})" for p, t, c in step.commits)
        lines += [header, f"  {_answer_line(step.tokens, piece)}", f"  committed {commits}"]
    return "\n".join(lines)


_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
.answer span { padding: 0 1px; border-radius: 3px; white-space: pre; }
table { border-collapse: collapse; font-family: ui-monospace, monospace; font-size: 12px; }
th, td { border: 1px solid #ddd; padding: 1px 3px; text-align: center; white-space: pre; }
th { background: #f4f4f4; position: sticky; top: 0; }
td.masked { color: #bbb; }
td.known { color: #999; }
td.new { font-weight: bold; }
td.refined { box-shadow: inset 0 -3px 0 #2a7; }
td.halted { box-shadow: inset 0 -3px 0 #e90; }
.legend span { display: inline-block; padding: 0 6px; margin-right: 6px; }
"""


def _colour(index: int, count: int) -> str:
    """Blue for the first step to red for the last."""
    hue = 240 * (1 - index / max(count - 1, 1))
    return f"hsl({hue:.0f}, 75%, 82%)"


def _in(position: int, spans: list[tuple[int, int]]) -> bool:
    return any(start <= position < end for start, end in spans)


def _grid_row(index: int, step: Step, count: int, piece: _Pieces, mask_id: int | None) -> str:
    new = {position: confidence for position, _, confidence in step.commits}
    cells = [f"<th>{index + 1}<br><small>b{step.block}.{step.step}</small></th>"]
    for position, token in enumerate(step.tokens):
        classes = []
        style = ""
        title = f"position {position}"
        if position in new:
            classes.append("new")
            style = f' style="background:{_colour(index, count)}"'
            title += f", committed with confidence {new[position]:.3f}"
        elif token == mask_id:
            classes.append("masked")
        else:
            classes.append("known")
        if _in(position, step.halted):
            classes.append("halted")
        elif _in(position, step.refined):
            classes.append("refined")
        text = html.escape(piece(token))
        cells.append(f'<td class="{" ".join(classes)}"{style} title="{html.escape(title)}">{text}</td>')
    return "<tr>" + "".join(cells) + "</tr>"


def render_html(trajectory: Trajectory, tokenizer: Any, *, title: str, settings: str = "") -> str:
    """A self-contained page (inline CSS, no script): the final answer with each token coloured by the step
    that committed it, then one grid row per step (bold: committed at that step; underlined green: inside a
    chunk the refiner refined, orange: one it halted early)."""
    piece = _Pieces(tokenizer, trajectory.mask_id)
    count = len(trajectory.steps)
    final = trajectory.steps[-1].tokens if trajectory.steps else []
    when = trajectory.committed_at()
    answer = []
    for position, token in enumerate(final):
        step = when.get(position)
        colour = "#eee" if step is None else _colour(step, count)
        label = "never committed" if step is None else f"step {step + 1}"
        answer.append(
            f'<span style="background:{colour}" title="position {position}, {label}">'
            f"{html.escape(piece(token))}</span>"
        )
    header = "".join(f"<th>{position}</th>" for position in range(len(final)))
    rows = [_grid_row(i, step, count, piece, trajectory.mask_id) for i, step in enumerate(trajectory.steps)]
    legend = (
        f'<span style="background:{_colour(0, count)}">first step</span>'
        f'<span style="background:{_colour(count - 1, count)}">last step</span>'
        '<span style="box-shadow: inset 0 -3px 0 #2a7">refined chunk</span>'
        '<span style="box-shadow: inset 0 -3px 0 #e90">halted early</span>'
        f"<span>{MASK_GLYPH} mask</span><span>{END_GLYPH} end of text</span>"
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>\n"
        f"<h1>Denoising trajectory</h1>\n<p><b>{html.escape(title)}</b></p>\n"
        f"<p>{html.escape(settings)}</p>\n"
        f'<p class="legend">{legend}</p>\n<p class="answer">{"".join(answer)}</p>\n'
        f"<p>{count} steps</p>\n"
        f'<table><tr><th>step</th>{header}</tr>\n{chr(10).join(rows)}\n</table>\n</body></html>\n'
    )
