"""Confident-error diagnostics: can the refiner see, and touch, the errors the sampler commits?

`CommitRecorder` (the sampler's ``on_step`` hook) records every commit; `commit_diagnostics` summarises a
model's predictions. The definitions (answer span, first error, confident, changed / fixed / broke,
reliability) are in docs/comparison.md.
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from llada_trm.data.gsm8k import DataError
from llada_trm.data.synthetic import parse_solution
from llada_trm.diffusion.sampler import StepEvent
from llada_trm.evaluate.errors import CATEGORIES, first_deviation, markdown_table
from llada_trm.evaluate.statistics import proportion

CONFIDENT = 0.9
RELIABILITY_EDGES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


class CommitRecorder:
    """The sampler's ``on_step`` hook for one batch: per row and answer position, the step that committed
    it, its confidence, the backbone's argmax and whether its chunk was refined (kept as [B, G] tensors,
    so a step costs a few elementwise ops and no Python loop over tokens)."""

    def __init__(self, batch: int, gen_length: int) -> None:
        self.step = torch.full((batch, gen_length), -1, dtype=torch.long)
        self.confidence = torch.full((batch, gen_length), float("nan"))
        self.backbone = torch.full((batch, gen_length), -1, dtype=torch.long)
        self.refined = torch.zeros(batch, gen_length, dtype=torch.bool)
        self.has_backbone = False
        self.has_chunks = False
        self.steps = 0

    def __call__(self, event: StepEvent) -> None:
        committed = event.committed
        self.step[committed] = self.steps
        self.confidence[committed] = event.confidence[committed].float()
        if event.base_tokens is not None:
            self.has_backbone = True
            self.backbone[committed] = event.base_tokens[committed]
        if event.chunks_refined is not None and event.chunk_size is not None:
            self.has_chunks = True
            length = committed.shape[1]
            chunk = (torch.arange(length) + event.prompt_length) // event.chunk_size
            self.refined[committed] = event.chunks_refined[:, chunk][committed]
        self.steps += 1


def reference_tokens(tokenizer: Any, answer: str, gen_length: int, pad_id: int) -> tuple[list[int], int]:
    """The reference answer as training targets it (``encode_answer``: answer, EoT, EOS), padded with
    ``pad_id`` (EOS) or cut to ``gen_length``; and its length before padding (capped at gen_length)."""
    from llada_trm.data.collate import encode_answer

    ids = encode_answer(tokenizer, answer)[:gen_length]
    return ids + [pad_id] * (gen_length - len(ids)), len(ids)


def answer_span(tokens: Sequence[int], reference_length: int, stop_ids: Sequence[int]) -> int:
    """Positions that can reach the text or the reference: up to the later of the reference's end and the
    completion's (one past its first stop token; decoding cuts it there)."""
    stops = set(stop_ids)
    end = next((i + 1 for i, token in enumerate(tokens) if token in stops), len(tokens))
    return max(reference_length, end)


def commit_fields(
    recorder: CommitRecorder,
    row: int,
    tokens: Sequence[int],
    reference: Sequence[int],
    span: int,
    *,
    confidence_is_probability: bool = True,
    refining: bool = True,
) -> dict[str, Any]:
    """A prediction's ``commits`` entry: per answer position ``step`` (-1: never committed), ``token``,
    ``confidence`` (None when not a probability), ``backbone`` and ``refined`` (None when not recorded, or
    when the model refines nothing), the position-aligned ``reference`` tokens and the answer ``span``."""
    confidence = backbone = refined = None
    if confidence_is_probability:
        values = recorder.confidence[row].tolist()
        confidence = [None if math.isnan(value) else round(value, 6) for value in values]
    if recorder.has_backbone and refining:
        backbone = recorder.backbone[row].tolist()
    if recorder.has_chunks and refining:
        refined = [int(flag) for flag in recorder.refined[row].tolist()]
    return {
        "step": recorder.step[row].tolist(),
        "token": [int(token) for token in tokens],
        "confidence": confidence,
        "backbone": backbone,
        "refined": refined,
        "reference": [int(token) for token in reference],
        "span": int(span),
    }


def _category(prediction: Mapping[str, Any]) -> str | None:
    """errors.first_deviation's category of a wrong answer to a generated problem (None otherwise)."""
    try:
        steps = parse_solution(prediction.get("reference", ""))
    except DataError:
        return None
    category = first_deviation(prediction.get("completion", ""), steps).category
    return "other" if category == "none" else category


def _rate(k: int, n: int) -> dict[str, Any] | None:
    return proportion(k, n) if n else None


def _error_at(prediction: Mapping[str, Any], position: int) -> dict[str, Any]:
    commits = prediction["commits"]
    confidence, backbone, refined = commits["confidence"], commits["backbone"], commits["refined"]
    return {
        "index": prediction.get("index"),
        "position": position,
        "step": commits["step"][position],
        "token": commits["token"][position],
        "reference": commits["reference"][position],
        "confidence": None if confidence is None else confidence[position],
        "backbone": None if backbone is None else backbone[position],
        "refined": None if refined is None else bool(refined[position]),
    }


def _first_errors(predictions: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The first error of every wrong answer in reading order (with its category), and the first in the
    order the sampler committed (the earliest step's wrong token; the leftmost of that step's)."""
    firsts: list[dict[str, Any]] = []
    committed_first: list[dict[str, Any]] = []
    no_difference = 0
    for prediction in predictions:
        if prediction.get("correct_strict"):
            continue
        commits = prediction["commits"]
        token, reference, step = commits["token"], commits["reference"], commits["step"]
        wrong = [p for p in range(commits["span"]) if token[p] != reference[p]]
        if not wrong:
            no_difference += 1
            continue
        firsts.append({**_error_at(prediction, wrong[0]), "category": _category(prediction)})
        earliest = min(wrong, key=lambda p: (step[p] if step[p] >= 0 else len(step), p))
        committed_first.append(_error_at(prediction, earliest))
    return {"no_token_differs": no_difference, "list": firsts, "committed_first": committed_first}


def _first_error_summary(firsts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    scored = [f["confidence"] for f in firsts if f["confidence"] is not None]
    flagged = [f for f in firsts if f["refined"] is not None]
    refined = [f for f in flagged if f["refined"]]
    changed = sum(f["token"] != f["backbone"] for f in refined if f["backbone"] is not None)
    return {
        "n": len(firsts),
        "confident": _rate(sum(c >= CONFIDENT for c in scored), len(scored)),
        "median_confidence": statistics.median(scored) if scored else None,
        "skipped": _rate(len(flagged) - len(refined), len(flagged)),
        "changed_by_refiner": _rate(changed, len(refined)) if refined and refined[0]["backbone"] is not None
        else None,
    }


def _reliability(bins: Sequence[list[float]]) -> dict[str, Any] | None:
    total = sum(count for count, _, _ in bins)
    if not total:
        return None
    rows = []
    ece = 0.0
    for i, (count, correct, confidence) in enumerate(bins):
        accuracy = correct / count if count else None
        mean = confidence / count if count else None
        if count:
            ece += count / total * abs(accuracy - mean)
        rows.append({"low": RELIABILITY_EDGES[i], "high": RELIABILITY_EDGES[i + 1], "n": int(count),
                     "correct": int(correct), "accuracy": accuracy, "mean_confidence": mean})  # fmt: skip
    return {"commits": int(total), "ece": ece, "bins": rows}


def commit_diagnostics(predictions: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The diagnostics of one model's predictions (pooled when they come from several runs); None when no
    prediction carries ``commits`` (an evaluation from before they were recorded)."""
    recorded = [p for p in predictions if p.get("commits")]
    if not recorded:
        return None
    bins = [[0, 0, 0.0] for _ in RELIABILITY_EDGES[:-1]]
    commits = refined = changed = fixed = broke = 0
    has_backbone = has_refined = has_confidence = False
    for prediction in recorded:
        c = prediction["commits"]
        confidence, backbone, flags = c["confidence"], c["backbone"], c["refined"]
        has_confidence |= confidence is not None
        has_backbone |= backbone is not None and flags is not None
        has_refined |= flags is not None
        for p in range(c["span"]):
            if c["step"][p] < 0:
                continue
            commits += 1
            right = c["token"][p] == c["reference"][p]
            if confidence is not None and confidence[p] is not None:
                index = min(bisect.bisect_right(RELIABILITY_EDGES, confidence[p]) - 1, len(bins) - 1)
                bins[index][0] += 1
                bins[index][1] += right
                bins[index][2] += confidence[p]
            if flags is None or not flags[p]:
                continue
            refined += 1
            if backbone is None or backbone[p] == c["token"][p]:
                continue
            changed += 1
            fixed += right and backbone[p] != c["reference"][p]
            broke += backbone[p] == c["reference"][p] and not right
    first = _first_errors(recorded)
    by_category = {}
    for name in CATEGORIES:
        group = [f for f in first["list"] if f["category"] == name]
        if group:
            by_category[name] = _first_error_summary(group)
    return {
        "problems": len(predictions),
        "recorded": len(recorded),
        "wrong": sum(not p.get("correct_strict") for p in recorded),
        "first_errors": {**_first_error_summary(first["list"]), "no_token_differs": first["no_token_differs"],
                         "by_category": by_category},  # fmt: skip
        "first_committed_errors": _first_error_summary(first["committed_first"]),
        "commits": {
            "n": commits,
            "refined": refined if has_refined else None,
            "changed": changed if has_backbone else None,
            "fixed": fixed if has_backbone else None,
            "broke": broke if has_backbone else None,
            "neither": changed - fixed - broke if has_backbone else None,
        },
        "reliability": _reliability(bins) if has_confidence else None,
        "first_error_list": first["list"],
    }


# ------------------------------------------------------------------------------------------------ markdown


def _share(rate: Mapping[str, Any] | None) -> str:
    return "-" if rate is None else f"{rate['p']:.0%} ({rate['k']}/{rate['n']})"


_LABELS = (
    "wrong answers (with a first wrong token)",
    f"first error committed at p >= {CONFIDENT}",
    "median confidence of first errors",
    "first error in a chunk not refined",
    "first error changed by the refiner",
    f"first committed error at p >= {CONFIDENT} / not refined",
    "answer-span commits (in refined chunks)",
    "tokens the refiner changed at commit",
    "of them fixed / broke / neither",
    "calibration error (ECE)",
)


_OUTCOMES = ("fixed", "broke", "neither")


def _column(r: Mapping[str, Any]) -> list[str]:
    """One model's cells of the first table, in `_LABELS`' order."""
    first, commits, reliability = r["first_errors"], r["commits"], r["reliability"]
    median, changed = first["median_confidence"], commits["changed"]
    if changed is not None and commits["refined"]:
        changed = f"{changed} ({changed / commits['refined']:.1%} of refined)"
    return [
        f"{r['wrong']} ({first['n']})",
        _share(first["confident"]),
        "-" if median is None else f"{median:.3f}",
        _share(first["skipped"]),
        _share(first["changed_by_refiner"]),
        _category_cell(r.get("first_committed_errors")),
        f"{commits['n']} ({'-' if commits['refined'] is None else commits['refined']})",
        "-" if changed is None else str(changed),
        "-" if commits["fixed"] is None else " / ".join(str(commits[k]) for k in _OUTCOMES),
        "-" if reliability is None else f"{reliability['ece']:.3f}",
    ]


def _category_cell(summary: Mapping[str, Any] | None) -> str:
    if summary is None:
        return "-"
    return f"{_share(summary['confident'])} / {_share(summary['skipped'])}"


def _bin_cell(report: Mapping[str, Any], i: int) -> str:
    if report["reliability"] is None:
        return "-"
    b = report["reliability"]["bins"][i]
    return "-" if not b["n"] else f"{b['accuracy']:.1%} ({b['n']})"


def diagnostics_markdown(reports: Mapping[str, Mapping[str, Any] | None]) -> str:
    """Two markdown tables, one column per model (``{"none": report, "slot": report}``): where the first
    errors were committed and what the refiner changed, then the reliability of the commit confidence
    (``-``: not recorded for that model)."""
    if not reports:
        raise ValueError("diagnostics_markdown needs at least one model's report")
    header = ["", *reports]

    def row(label: str, cell: Callable[[Mapping[str, Any]], str]) -> list[str]:
        return [label, *(cell(r) if r else "-" for r in reports.values())]

    columns = [_column(r) if r else ["-"] * len(_LABELS) for r in reports.values()]
    rows = [[label, *cells] for label, *cells in zip(_LABELS, *columns, strict=True)]
    for name in CATEGORIES:  # the generated task's error categories (errors.first_deviation)
        if any(r and name in r["first_errors"]["by_category"] for r in reports.values()):
            label = f"{name}: first error at p >= {CONFIDENT} / not refined"
            rows.append(row(label, lambda r, n=name: _category_cell(r["first_errors"]["by_category"].get(n))))
    text = (
        "**Where the first errors were committed, and what the refiner changed** (a wrong answer's first "
        "token that differs from the reference, aligned by position; fixed / broke: the committed token "
        f"right / wrong where the backbone's argmax was wrong / right)\n\n{markdown_table(header, rows)}\n"
    )
    curves = [r["reliability"]["bins"] for r in reports.values() if r and r["reliability"]]
    if curves:
        bins = curves[0]
        labels = [f"[{b['low']:.2f}, {b['high']:.2f}{']' if b is bins[-1] else ')'}" for b in bins]
        rows = [row(label, lambda r, i=i: _bin_cell(r, i)) for i, label in enumerate(labels)]
        text += (
            "\n**Reliability of the commit confidence** (answer-span commits per confidence bin: the share "
            f"equal to the reference token, and the count)\n\n{markdown_table(header, rows)}\n"
        )
    return text
