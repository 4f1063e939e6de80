"""The comparison statistics: exact tails, intervals that cover at their nominal rate, seeds, and power."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import numpy as np
import pytest

from llada_trm.evaluate.statistics import (
    binomial_cdf,
    detectable_difference,
    mcnemar_exact,
    mean_std,
    paired_bootstrap_ci,
    paired_summary,
    pooled_mcnemar,
    problems_needed,
    proportion,
    stratified_sign_test,
    wilson_interval,
)


@pytest.mark.parametrize(
    ("gained", "lost", "expected"),
    [
        (10, 4, 2 * 1471 / 16384),  # 2 * (1 + 14 + 91 + 364 + 1001) / 2^14 = 0.1796
        (4, 10, 0.1796),
        (7, 3, 0.34375),  # 2 * (1 + 10 + 45 + 120) / 2^10
        (0, 5, 0.0625),  # 2 / 2^5
        (0, 0, 1.0),
        (6, 6, 1.0),  # 2 * P[X <= 6] > 1 is capped
        (1, 0, 1.0),
    ],
)
def test_mcnemar_exact_known_values(gained, lost, expected):
    assert mcnemar_exact(gained, lost) == pytest.approx(expected, abs=5e-5)


def test_binomial_cdf_matches_exact_sums_small_and_large():
    for n, k in [(14, 4), (30, 11), (2000, 950), (2000, 1000)]:
        exact = Fraction(sum(math.comb(n, i) for i in range(k + 1)), 2**n)
        assert binomial_cdf(k, n) == pytest.approx(float(exact), rel=1e-9)
    exact = sum(math.comb(40, i) * 0.3**i * 0.7 ** (40 - i) for i in range(9))
    assert binomial_cdf(8, 40, 0.3) == pytest.approx(exact, rel=1e-9)
    assert binomial_cdf(-1, 10) == 0.0 and binomial_cdf(10, 10) == 1.0
    # 10^5 pairs: far tail stays finite and positive, the centre is 1/2 + pmf/2
    assert 0.0 < binomial_cdf(48_000, 100_000) < 1e-30
    centre = math.exp(math.lgamma(100_001) - 2 * math.lgamma(50_001) - 100_000 * math.log(2))
    assert binomial_cdf(50_000, 100_000) == pytest.approx(0.5 + centre / 2, rel=1e-9)


def test_wilson_interval_known_values():
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(50, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert wilson_interval(10, 10)[1] == 1.0 and wilson_interval(0, 10)[0] == 0.0
    assert proportion(3, 12) == pytest.approx(
        {"k": 3, "n": 12, "p": 0.25, "low": wilson_interval(3, 12)[0], "high": wilson_interval(3, 12)[1]}
    )
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(11, 10)


def test_wilson_interval_covers_at_the_nominal_rate():
    rng = np.random.default_rng(0)
    draws = rng.binomial(200, 0.2, size=2000)
    covered = [low <= 0.2 <= high for low, high in (wilson_interval(int(k), 200) for k in draws)]
    assert 0.93 <= np.mean(covered) <= 0.97


def _paired_draw(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Problems that are both right 40%, gained 15%, lost 5%, both wrong 40%: true difference 0.10."""
    kind = rng.choice(4, size=n, p=[0.4, 0.15, 0.05, 0.4])
    a = (kind == 0) | (kind == 2)
    b = (kind == 0) | (kind == 1)
    return a, b


def test_paired_bootstrap_covers_the_true_difference():
    rng = np.random.default_rng(1)
    covered = []
    for rep in range(150):
        a, b = _paired_draw(rng, 150)
        low, high = paired_bootstrap_ci(a, b, n_boot=400, seed=rep)
        covered.append(low <= 0.10 <= high)
    assert 0.88 <= np.mean(covered) <= 0.99


def test_paired_bootstrap_is_seeded_and_centred():
    a, b = _paired_draw(np.random.default_rng(2), 300)
    first = paired_bootstrap_ci(a, b, n_boot=2000, seed=7)
    assert first == paired_bootstrap_ci(a, b, n_boot=2000, seed=7)
    assert first != paired_bootstrap_ci(a, b, n_boot=2000, seed=8)
    diff = b.mean() - a.mean()
    assert first[0] < diff < first[1]
    # pairing: the interval is narrower than the unpaired normal interval of the two accuracies
    unpaired = 1.96 * math.sqrt((a.mean() * (1 - a.mean()) + b.mean() * (1 - b.mean())) / a.size)
    assert first[1] - first[0] < 2 * unpaired


def test_paired_summary_fields():
    a = [True, True, False, False, True, False, False, False]
    b = [True, False, True, True, True, True, False, False]
    summary = paired_summary(a, b, seed=3, n_boot=500)
    assert (summary["gained"], summary["lost"], summary["n"]) == (3, 1, 8)
    assert summary["diff"] == pytest.approx(0.25)
    assert summary["p"] == pytest.approx(mcnemar_exact(3, 1))
    assert summary["accuracy_a"]["k"] == 3 and summary["accuracy_b"]["k"] == 5
    assert summary["ci_low"] <= 0.25 <= summary["ci_high"]
    assert json.loads(json.dumps(summary)) == summary
    with pytest.raises(ValueError, match="same problems"):
        paired_summary(a, b[:-1])
    with pytest.raises(ValueError, match="booleans"):
        paired_summary([0, 2], [1, 1])


def test_mean_std_uses_the_sample_std():
    assert mean_std([0.5, 0.6, 0.7]) == pytest.approx({"n": 3, "mean": 0.6, "std": 0.1})
    assert mean_std([0.4])["std"] is None


def test_pooled_and_stratified_tests_across_seeds():
    # seeds x problems; problem 0 is gained under every seed (one problem, three pooled pairs)
    a = [[False, True, True, False], [False, True, False, False], [False, True, True, True]]
    b = [[True, True, False, False], [True, True, True, True], [True, True, True, True]]
    pooled = pooled_mcnemar(a, b)
    assert pooled == {"pairs": 12, "gained": 5, "lost": 1, "p": pytest.approx(mcnemar_exact(5, 1))}
    # per-problem mean differences: +1, 0, 0, +1/3 -> two positive, no negative, two ties
    strat = stratified_sign_test(a, b)
    assert strat == {"problems": 4, "positive": 2, "negative": 0, "ties": 2, "p": pytest.approx(0.5)}
    with pytest.raises(ValueError, match="one shape"):
        pooled_mcnemar(a, b[:2])


def test_problems_needed_known_value_and_monotone():
    # (1.959964 * sqrt(0.15) + 0.841621 * sqrt(0.1475))^2 / 0.05^2 = 468.56
    assert problems_needed(0.05, 0.15) == 469
    assert problems_needed(-0.05, 0.15) == 469
    sizes = [problems_needed(d, 0.2) for d in (0.02, 0.05, 0.1, 0.2)]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 4
    assert problems_needed(0.05, 0.1) < problems_needed(0.05, 0.2) < problems_needed(0.05, 0.4)
    assert problems_needed(0.05, 0.2, power=0.8) < problems_needed(0.05, 0.2, power=0.9)
    assert problems_needed(0.05, 0.2, alpha=0.05) < problems_needed(0.05, 0.2, alpha=0.01)
    with pytest.raises(ValueError, match="difference"):
        problems_needed(0.3, 0.2)


def test_detectable_difference_inverts_problems_needed():
    d = detectable_difference(469, 0.15)
    assert d == pytest.approx(0.05, abs=2e-4)
    assert problems_needed(d, 0.15) <= 469 < problems_needed(d * 0.99, 0.15)
    assert detectable_difference(2, 0.15) == math.inf
