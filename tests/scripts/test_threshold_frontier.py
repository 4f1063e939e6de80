"""scripts/threshold_frontier.py's table building, on tiny fake results (no sampling)."""

from __future__ import annotations

import importlib.util
import math
import sys

import pytest
from tiny_assets import REPO

SCRIPT = REPO / "scripts" / "threshold_frontier.py"


@pytest.fixture(scope="module")
def frontier():
    spec = importlib.util.spec_from_file_location("threshold_frontier", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["threshold_frontier"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def test_settings_are_exact_then_each_threshold_without_and_with_each_cache(frontier):
    names = [s.name for s in frontier.frontier_settings([0.9, 0.99])]
    assert names == [
        "exact",
        "threshold 0.9", "threshold 0.9 + prefix cache", "threshold 0.9 + dual cache",
        "threshold 0.99", "threshold 0.99 + prefix cache", "threshold 0.99 + dual cache",
    ]
    exact, *rest = frontier.frontier_settings([0.8])
    assert (exact.threshold, exact.cache) == (None, None)
    assert [(s.threshold, s.cache) for s in rest] == [(0.8, None), (0.8, "prefix"), (0.8, "dual")]


def test_refiner_settings_pair_each_backbone_setting_with_the_refiner(frontier):
    settings = frontier.frontier_settings([0.5], ["prefix", "dual"], refiner=True)
    assert [(s.name, s.refine) for s in settings] == [
        ("exact", False),
        ("threshold 0.5 + prefix cache", False), ("threshold 0.5 + prefix cache + refiner", True),
        ("threshold 0.5 + dual cache", False), ("threshold 0.5 + dual cache + refiner", True),
    ]
    args = frontier.parse_args(["--caches", "none,dual", "--thresholds", "0.3"])
    assert args.caches == [None, "dual"] and args.refiner is None
    with pytest.raises(SystemExit):
        frontier.parse_args(["--caches", "triple"])


def test_rows_pair_each_setting_with_exact(frontier):
    tally = frontier.Tally
    exact = [True] * 6 + [False] * 4  # 6/10
    fast = [True] * 5 + [False] * 4 + [True]  # lost problem 5, gained problem 9: 6/10
    worse = [False] * 6 + [False] * 4  # lost all six
    tallies = {
        "exact": tally(exact, seconds=10.0, nfe=100),
        "fast": tally(fast, seconds=2.5, nfe=20),
        "worse": tally(worse, seconds=5.0, nfe=50),
    }
    rows = {r["setting"]: r for r in frontier.frontier_rows(tallies, n_boot=2000)}
    assert list(rows) == ["exact", "fast", "worse"]
    base = rows["exact"]
    assert base["diff"] == 0 and base["speedup"] == 1.0 and base["p_mcnemar"] == 1.0
    fast_row = rows["fast"]
    assert (fast_row["gained"], fast_row["lost"], fast_row["diff"]) == (1, 1, 0.0)
    assert fast_row["speedup"] == pytest.approx(4.0) and fast_row["nfe"] == 20
    assert fast_row["accuracy"]["k"] == 6 and fast_row["accuracy"]["low"] < 0.6 < fast_row["accuracy"]["high"]
    worse_row = rows["worse"]
    assert (worse_row["gained"], worse_row["lost"]) == (0, 6)
    assert worse_row["diff"] == pytest.approx(-0.6)
    assert worse_row["p_mcnemar"] == pytest.approx(2 * 0.5**6)  # exact McNemar on 6 discordant pairs
    assert worse_row["ci_high"] < 0 and not worse_row["within_margin"]
    assert not fast_row["within_margin"]  # 10 problems: the interval is far wider than a point
    assert base["within_margin"]  # identical results: the interval is [0, 0]


def test_rows_refuse_settings_that_saw_other_problems(frontier):
    tallies = {"exact": frontier.Tally([True, False], 1.0), "short": frontier.Tally([True], 1.0)}
    with pytest.raises(ValueError, match="short: 1 problems, the baseline 2"):
        frontier.frontier_rows(tallies)


def test_markdown_table_and_estimate(frontier):
    tallies = {
        "exact": frontier.Tally([True, True, False, False], seconds=8.0, nfe=64),
        "threshold 0.9 + dual cache": frontier.Tally([True, False, False, False], seconds=1.0, nfe=8),
    }
    table = frontier.markdown_table(frontier.frontier_rows(tallies, n_boot=500))
    lines = table.strip().splitlines()
    assert len(lines) == 4 and lines[0].startswith("| setting |") and "within 1 pt" in lines[0]
    assert lines[2].startswith("| exact | 50.0 [")
    assert lines[2].endswith("| +0/-0 | 1.000 | yes | 64 | 8.0 | 1.00x |")
    assert lines[3].startswith("| threshold 0.9 + dual cache | 25.0 [")
    assert "| -25.0 [" in lines[3] and "| +0/-1 |" in lines[3] and lines[3].endswith("| 8 | 1.0 | 8.00x |")
    # 2 s + 0.25 s per problem over the two settings, scaled to 512 problems
    assert math.isclose(frontier.estimate_seconds(tallies, 512), (2.0 + 0.25) * 512)


def test_sampling_interleaves_settings_and_reports_each_unfinished_batch(frontier, monkeypatch):
    import llada_trm.evaluate.evaluator as evaluate

    calls: list[tuple[int, float | None]] = []

    class Result:
        def __init__(self, batch, threshold):
            self.predictions = [{"correct_strict": threshold is None} for _ in batch]
            self.summary = {"speed": {"generation_s": 1.0, "nfe": 4}}

    def fake_evaluate(model, tokenizer, batch, options, **kwargs):
        assert kwargs["num_steps"] == 0  # the backbone settings switch refinement off
        calls.append((len(batch), options.threshold))
        return Result(batch, options.threshold)

    from llada_trm.diffusion.options import SamplingOptions

    monkeypatch.setattr(evaluate, "evaluate_model", fake_evaluate)
    seen: list[int] = []
    settings = frontier.frontier_settings([0.9])[:2]
    tallies = frontier.sample_interleaved(None, None, list(range(5)), SamplingOptions(), settings, 2,
                                          after_batch=lambda t: seen.append(len(t["exact"].correct)))
    assert calls == [(2, None), (2, 0.9), (2, None), (2, 0.9), (1, None), (1, 0.9)]  # batch by batch
    assert seen == [2, 4]  # the partial write after each unfinished batch; the caller writes the last
    assert tallies["exact"].correct == [True] * 5 and tallies["threshold 0.9"].correct == [False] * 5
    assert tallies["exact"].nfe == 12 and tallies["exact"].seconds == 3.0
