"""Statistics for comparing refiners on the same problems: intervals, paired tests, seeds, and power.

Every comparison is paired (the evidence is in the problems where two runs disagree). Pure functions of
numbers; the exact binomial tails are summed in log space so they stay accurate for tens of thousands of
pairs. ``a`` is the baseline and ``b`` the candidate; ``gained`` counts problems only ``b`` gets right.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist
from typing import Any

import numpy as np

_BOOTSTRAP_CELLS = 4_000_000  # resampled indices held at once (32 MB of int64)


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def _as_bools(values: Sequence[bool], name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1 or (array.size and not np.isin(array, (0, 1)).all()):
        raise ValueError(f"{name} must be a flat sequence of booleans (one per problem)")
    return array.astype(bool)


def _pair(a: Sequence[bool], b: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    a_arr, b_arr = _as_bools(a, "a"), _as_bools(b, "b")
    if a_arr.shape != b_arr.shape:
        raise ValueError(f"paired runs must answer the same problems, got {a_arr.size} and {b_arr.size}")
    if not a_arr.size:
        raise ValueError("a paired comparison needs at least one problem")
    return a_arr, b_arr


# ----------------------------------------------------------------------------------------------------
# one run: a proportion and its interval
# ----------------------------------------------------------------------------------------------------


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion.

    Why Wilson: the textbook Wald interval p +- z*sqrt(p(1-p)/n) undercovers badly for small n or p near 0
    or 1 (it collapses to a point at 0/n), whereas Wilson's, the set of p the score test does not reject,
    keeps close to nominal coverage there and never leaves [0, 1]. With z the normal quantile,
    centre = (k + z^2/2) / (n + z^2) and half-width = z sqrt(k(n-k)/n + z^2/4) / (n + z^2).
    """
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n >= 1, got successes={successes}, n={n}")
    z = _z(confidence)
    denominator = n + z * z
    centre = (successes + z * z / 2) / denominator
    half = z * math.sqrt(successes * (n - successes) / n + z * z / 4) / denominator
    low = 0.0 if successes == 0 else max(0.0, centre - half)  # the exact ends, free of rounding
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def proportion(successes: int, n: int, confidence: float = 0.95) -> dict[str, Any]:
    """``successes``/``n`` with its Wilson interval: {k, n, p, low, high}."""
    low, high = wilson_interval(successes, n, confidence)
    return {"k": int(successes), "n": int(n), "p": successes / n, "low": low, "high": high}


# ----------------------------------------------------------------------------------------------------
# two runs on the same problems
# ----------------------------------------------------------------------------------------------------


def _log_pmf(k: np.ndarray, n: int, p: float) -> np.ndarray:
    log_choose = math.lgamma(n + 1) - np.array([math.lgamma(i + 1) + math.lgamma(n - i + 1) for i in k])
    return log_choose + k * math.log(p) + (n - k) * math.log1p(-p)


def binomial_cdf(k: int, n: int, p: float = 0.5) -> float:
    """P[X <= k] for X ~ Bin(n, p), summed exactly term by term in log space (log-sum-exp)."""
    if n < 0 or not 0.0 < p < 1.0:
        raise ValueError(f"need n >= 0 and 0 < p < 1, got n={n}, p={p}")
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    logs = _log_pmf(np.arange(k + 1), n, p)
    top = logs.max()
    return float(min(1.0, math.exp(top) * np.exp(logs - top).sum()))


def mcnemar_exact(gained: int, lost: int) -> float:
    """Exact McNemar p-value: the two-sided sign test on the discordant pairs.

    Under "no difference" each discordant pair is equally likely to favour either run, so with
    n = gained + lost, p = min(1, 2 P[X <= min(gained, lost)]) for X ~ Bin(n, 1/2); p = 1 when n = 0.
    The concordant pairs carry no information about the difference and do not enter.
    """
    if gained < 0 or lost < 0:
        raise ValueError(f"discordant counts must be >= 0, got gained={gained}, lost={lost}")
    total = gained + lost
    if total == 0:
        return 1.0
    return min(1.0, 2.0 * binomial_cdf(min(gained, lost), total, 0.5))


def paired_bootstrap_ci(
    a: Sequence[bool],
    b: Sequence[bool],
    *,
    n_boot: int = 10_000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of accuracy(b) - accuracy(a), resampling problems (pairs kept whole).

    Resampling whole problems keeps each problem's shared difficulty in both runs, which is what makes the
    interval much narrower than two independent intervals would suggest.
    """
    a_arr, b_arr = _pair(a, b)
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    alpha = 1.0 - confidence
    _z(confidence)  # validates confidence
    delta = b_arr.astype(np.int8) - a_arr.astype(np.int8)
    n = delta.size
    rng = np.random.Generator(np.random.PCG64(seed))
    means = np.empty(n_boot)
    rows = max(1, _BOOTSTRAP_CELLS // n)
    for start in range(0, n_boot, rows):
        stop = min(n_boot, start + rows)
        means[start:stop] = delta[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def paired_summary(
    a: Sequence[bool],
    b: Sequence[bool],
    seed: int = 0,
    *,
    n_boot: int = 10_000,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Everything comparison.json states about baseline ``a`` vs candidate ``b`` on the same problems.

    {n, accuracy_a, accuracy_b (Wilson dicts), gained, lost, diff, ci_low, ci_high (paired bootstrap),
    p (exact McNemar)}.
    """
    a_arr, b_arr = _pair(a, b)
    gained = int((b_arr & ~a_arr).sum())
    lost = int((a_arr & ~b_arr).sum())
    low, high = paired_bootstrap_ci(a_arr, b_arr, n_boot=n_boot, seed=seed, confidence=confidence)
    n = a_arr.size
    return {
        "n": int(n),
        "accuracy_a": proportion(int(a_arr.sum()), n, confidence),
        "accuracy_b": proportion(int(b_arr.sum()), n, confidence),
        "gained": gained,
        "lost": lost,
        "diff": (gained - lost) / n,
        "ci_low": low,
        "ci_high": high,
        "p": mcnemar_exact(gained, lost),
    }


# ----------------------------------------------------------------------------------------------------
# several seeds
# ----------------------------------------------------------------------------------------------------


def mean_std(values: Sequence[float]) -> dict[str, Any]:
    """{n, mean, std} across seeds; std is the sample std (ddof=1), None with fewer than two values."""
    array = np.asarray(values, dtype=float)
    if array.ndim != 1 or not array.size:
        raise ValueError("mean_std needs a non-empty flat sequence of numbers (one per seed)")
    std = float(array.std(ddof=1)) if array.size > 1 else None
    return {"n": int(array.size), "mean": float(array.mean()), "std": std}


def _seed_matrix(runs: Sequence[Sequence[bool]], name: str) -> np.ndarray:
    rows = [_as_bools(run, name) for run in runs]
    if not rows or len({row.size for row in rows}) != 1 or not rows[0].size:
        raise ValueError(f"{name} must hold one non-empty run per seed, all over the same problems")
    return np.stack(rows)


def _seed_pair(a_runs: Sequence[Sequence[bool]], b_runs: Sequence[Sequence[bool]]):
    a_mat, b_mat = _seed_matrix(a_runs, "a_runs"), _seed_matrix(b_runs, "b_runs")
    if a_mat.shape != b_mat.shape:
        raise ValueError(f"a_runs and b_runs must be seeds x problems of one shape, got {a_mat.shape} "
                         f"and {b_mat.shape}")  # fmt: skip
    return a_mat, b_mat


def pooled_mcnemar(a_runs: Sequence[Sequence[bool]], b_runs: Sequence[Sequence[bool]]) -> dict[str, Any]:
    """Exact McNemar on the (seed, problem) pairs of all seeds pooled: {pairs, gained, lost, p}.

    ``a_runs[s][i]`` is the baseline's correctness on problem i under seed s (same problems every seed).
    Caveat: the pooled pairs are not independent: the same problem recurs under every seed and its
    difficulty is shared, so pooling overstates the evidence (p is too small) when the seeds' outcomes on a
    problem move together. Prefer ``stratified_sign_test``, which makes each problem one observation.
    """
    a_mat, b_mat = _seed_pair(a_runs, b_runs)
    gained = int((b_mat & ~a_mat).sum())
    lost = int((a_mat & ~b_mat).sum())
    return {"pairs": int(a_mat.size), "gained": gained, "lost": lost, "p": mcnemar_exact(gained, lost)}


def stratified_sign_test(
    a_runs: Sequence[Sequence[bool]], b_runs: Sequence[Sequence[bool]]
) -> dict[str, Any]:
    """Sign test with one observation per problem: {problems, positive, negative, ties, p}.

    For each problem, d_i = mean over seeds of b's correctness - mean over seeds of a's; problems with
    d_i > 0 count as positive, d_i < 0 as negative, d_i = 0 drop out, and p is the exact two-sided binomial
    test of positive vs negative (``mcnemar_exact``). Problems are independent draws, so the test is valid
    however strongly a problem's outcomes correlate across seeds.
    """
    a_mat, b_mat = _seed_pair(a_runs, b_runs)
    d = b_mat.mean(axis=0) - a_mat.mean(axis=0)
    positive, negative = int((d > 0).sum()), int((d < 0).sum())
    return {
        "problems": int(d.size),
        "positive": positive,
        "negative": negative,
        "ties": int(d.size - positive - negative),
        "p": mcnemar_exact(positive, negative),
    }


# ----------------------------------------------------------------------------------------------------
# sizing the evaluation set
# ----------------------------------------------------------------------------------------------------


def _check_power_inputs(discordant: float, alpha: float, power: float) -> None:
    if not 0.0 < discordant <= 1.0:
        raise ValueError(f"discordant rate must be in (0, 1], got {discordant}")
    if not 0.0 < alpha < 1.0 or not 0.0 < power < 1.0:
        raise ValueError(f"alpha and power must be in (0, 1), got alpha={alpha}, power={power}")


def problems_needed(difference: float, discordant: float, alpha: float = 0.05, power: float = 0.8) -> int:
    """Problems needed for a two-sided McNemar test to detect an accuracy ``difference`` (normal approx).

    With psi = the discordant rate (the fraction of problems where the runs disagree, so
    psi = P[gained] + P[lost] and difference = P[gained] - P[lost], |difference| <= psi), Connor's (1987)
    formula is  n = (z_{1-alpha/2} sqrt(psi) + z_{power} sqrt(psi - difference^2))^2 / difference^2,
    rounded up. Read psi off a pilot comparison (gained + lost over n).
    """
    _check_power_inputs(discordant, alpha, power)
    if not 0.0 < abs(difference) <= discordant:
        raise ValueError(
            f"need 0 < |difference| <= discordant rate, got difference={difference}, discordant={discordant}"
        )
    z_alpha, z_power = NormalDist().inv_cdf(1 - alpha / 2), NormalDist().inv_cdf(power)
    d2 = difference * difference
    root = z_alpha * math.sqrt(discordant) + z_power * math.sqrt(discordant - d2)
    return math.ceil(root * root / d2 - 1e-9)


def detectable_difference(n: int, discordant: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest accuracy difference ``n`` problems detect at this discordant rate (inverts
    ``problems_needed`` by bisection); ``math.inf`` when even difference = discordant needs more than n."""
    _check_power_inputs(discordant, alpha, power)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if problems_needed(discordant, discordant, alpha, power) > n:
        return math.inf
    low, high = 0.0, discordant  # problems_needed falls as the difference grows
    for _ in range(60):
        mid = (low + high) / 2
        if mid > 0 and problems_needed(mid, discordant, alpha, power) <= n:
            high = mid
        else:
            low = mid
    return high
