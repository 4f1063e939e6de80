"""The statistics of a comparison (`llada-trm compare`): what comparison.json states and comparison.md
says (docs/comparison.md reads it section by section). Functions here take numbers and predictions, not
models; `compare` runs the models.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from statistics import NormalDist
from typing import Any

import numpy as np

from llada_trm.evaluate.diagnostics import commit_diagnostics, diagnostics_markdown
from llada_trm.evaluate.errors import error_report, errors_markdown, markdown_table, paired_line_comparison
from llada_trm.evaluate.paired import paired_comparison, verdict
from llada_trm.evaluate.statistics import (
    detectable_difference,
    mean_std,
    pooled_mcnemar,
    problems_needed,
    proportion,
    stratified_sign_test,
)

PAIRS = (("mlp", "none"), ("slot", "none"), ("slot", "mlp"))  # (candidate, baseline)
VALIDATION_METHOD = (
    "per-example paired: every model on the same noised validation examples (fixed data.validation_seed); "
    "95% normal interval of the mean per-example difference"
)

Predictions = Sequence[Mapping[str, Any]]


def _correct(predictions: Predictions) -> list[bool]:
    return [bool(p["correct_strict"]) for p in predictions]


def _pair_name(candidate: str, baseline: str) -> str:
    return f"{candidate}_vs_{baseline}"


def comparison_pairs(kinds: Sequence[str], reference: str | None = None) -> list[tuple[str, str]]:
    """(candidate, baseline) pairs among `kinds`: every model vs the backbone alone, slot vs mlp, and every
    other model vs `reference` (a lever study's current refiner), each pair once."""
    pairs = [(b, a) for b, a in PAIRS if a in kinds and b in kinds]
    pairs += [(kind, "none") for kind in kinds if kind not in ("none", "mlp", "slot") and "none" in kinds]
    if reference is not None:
        pairs += [(kind, reference) for kind in kinds if kind not in ("none", reference)]
    return list(dict.fromkeys(pairs))


def statistics_sections(
    by_seed: Mapping[int, Mapping[str, Predictions]], reference: str | None = None
) -> dict[str, Any]:
    """{per_seed: {seed: {accuracy, paired}}, pooled: {accuracy, paired}} from each seed's predictions.

    `by_seed[s][kind]` are the predictions of model `kind` under training seed s, all on the same problems
    (the deterministic backbone's are the same list under every seed); pairs as `comparison_pairs`.
    """
    seeds = list(by_seed)
    kinds = list(by_seed[seeds[0]])
    per_seed: dict[str, Any] = {}
    for seed, models in by_seed.items():
        accuracy = {}
        for kind, predictions in models.items():
            n = len(predictions)
            flexible = sum(bool(p["correct_flexible"]) for p in predictions)
            accuracy[kind] = {"strict": proportion(sum(_correct(predictions)), n),
                              "flexible": proportion(flexible, n)}  # fmt: skip
        paired = {
            _pair_name(b, a): paired_comparison(models[a], models[b], seed=seed)["strict"]
            for b, a in comparison_pairs(kinds, reference)
        }
        per_seed[str(seed)] = {"accuracy": accuracy, "paired": paired}
    pooled_accuracy = {}
    for kind in kinds:
        runs = [_correct(by_seed[s][kind]) for s in seeds]
        pairs = sum(len(run) for run in runs)
        pooled_accuracy[kind] = {
            "mean_std": mean_std([sum(run) / len(run) for run in runs]),
            "all_pairs": proportion(sum(sum(run) for run in runs), pairs),
        }
    pooled_paired = {}
    for b, a in comparison_pairs(kinds, reference):
        a_runs = [_correct(by_seed[s][a]) for s in seeds]
        b_runs = [_correct(by_seed[s][b]) for s in seeds]
        stratified = stratified_sign_test(a_runs, b_runs)
        diffs = [per_seed[str(s)]["paired"][_pair_name(b, a)]["diff"] for s in seeds]
        pooled_paired[_pair_name(b, a)] = {
            "diff": mean_std(diffs),
            "pooled_mcnemar": pooled_mcnemar(a_runs, b_runs),
            "stratified_sign_test": stratified,
            "verdict": verdict(stratified["p"]),
        }
    return {"per_seed": per_seed, "pooled": {"seeds": seeds, "accuracy": pooled_accuracy,
                                             "paired": pooled_paired}}  # fmt: skip


# ------------------------------------------------------------------------------------------ validation


def paired_mean_difference(
    numerator: Sequence[float], denominator: Sequence[float] | None = None, confidence: float = 0.95
) -> dict[str, Any]:
    """{diff, low, high, n}: sum(numerator) / sum(denominator) (a mean when denominator is None) with a
    normal interval from the linearised (delta-method) standard error over the examples.

    For a ratio of sums, e_i = numerator_i - diff * denominator_i and se = sqrt(n/(n-1) sum e_i^2) / sum d;
    with unit denominators that is the usual std / sqrt(n) of the mean.
    """
    num = np.asarray(numerator, dtype=float)
    den = np.ones_like(num) if denominator is None else np.asarray(denominator, dtype=float)
    n = num.size
    if not n or den.sum() <= 0:
        return {"n": int(n), "diff": None, "low": None, "high": None}
    diff = float(num.sum() / den.sum())
    if n < 2:
        return {"n": 1, "diff": diff, "low": None, "high": None}
    residual = num - diff * den
    se = math.sqrt(n / (n - 1) * float((residual**2).sum())) / float(den.sum())
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    return {"n": int(n), "diff": diff, "low": diff - z * se, "high": diff + z * se}


def validation_difference(
    candidate: Mapping[str, Sequence[float]], baseline: Mapping[str, Sequence[float]] | None = None
) -> dict[str, Any]:
    """Validation loss and masked accuracy of `candidate` minus `baseline`'s, paired per example.

    Both are `training.validation.per_example_validation` columns; without `baseline` the candidate's own
    backbone columns (`loss_base`, `correct_base`: the frozen backbone in the same forward pass) are it.
    """
    def columns(source: Mapping[str, Sequence[float]], base: bool) -> tuple[np.ndarray, np.ndarray]:
        suffix = "_base" if base else ""
        return np.asarray(source[f"loss{suffix}"]), np.asarray(source[f"correct{suffix}"])

    loss_b, correct_b = columns(candidate, False)
    loss_a, correct_a = columns(baseline if baseline is not None else candidate, baseline is None)
    masked = np.asarray(candidate["masked"])
    if baseline is not None and not np.array_equal(masked, np.asarray(baseline["masked"])):
        raise ValueError("validation columns were not drawn on the same masks; check data.validation_seed")
    return {
        "loss": float(loss_b.mean()),
        "loss_baseline": float(loss_a.mean()),
        "loss_diff": paired_mean_difference(loss_b - loss_a),
        "masked_accuracy": float(correct_b.sum() / masked.sum()),
        "masked_accuracy_baseline": float(correct_a.sum() / masked.sum()),
        "masked_accuracy_diff": paired_mean_difference(correct_b - correct_a, masked),
    }


def backbone_columns(columns: Mapping[str, Sequence[float]]) -> dict[str, Sequence[float]]:
    """The frozen backbone's own validation columns, read from a phase-1 model's (`loss_base`, ...)."""
    return {"loss": columns["loss_base"], "correct": columns["correct_base"], "masked": columns["masked"]}


def validation_sections(
    by_seed: Mapping[int, Mapping[str, Mapping[str, Sequence[float]]]],
    reference: str | None = None,
    trained_backbone: Sequence[str] = (),
) -> dict[str, Any]:
    """{method, per_seed: {seed: {pair: difference}}, pooled: {pair: {loss_diff, masked_accuracy_diff}}}:
    each refiner vs the backbone on the same masks, and the pairs of `comparison_pairs` between refiners;
    pooled as mean +- std across seeds. A phase-1 model's columns carry the frozen backbone's; the models
    in `trained_backbone` (phase 2/3 arms) changed theirs, so they are compared with a phase-1 model's."""
    per_seed: dict[str, Any] = {}
    for seed, runs in by_seed.items():
        frozen = next((c for kind, c in runs.items() if kind not in trained_backbone), None)
        section = {
            _pair_name(kind, "none"): validation_difference(
                columns, backbone_columns(frozen) if kind in trained_backbone else None
            )
            for kind, columns in runs.items()
            if kind not in trained_backbone or frozen is not None
        }
        for b, a in comparison_pairs(list(runs), reference):
            if a != "none":
                section[_pair_name(b, a)] = validation_difference(runs[b], runs[a])
        per_seed[str(seed)] = section
    pooled: dict[str, Any] = {}
    for name in next(iter(per_seed.values()), {}):
        pooled[name] = {
            key: mean_std([per_seed[s][name][key]["diff"] for s in per_seed])
            for key in ("loss_diff", "masked_accuracy_diff")
        }
    return {"method": VALIDATION_METHOD, "per_seed": per_seed, "pooled": pooled}


# ------------------------------------------------------------------------------------------ error analysis


def _per_seed_and_pooled(
    by_seed: Mapping[int, Mapping[str, Predictions]], analyse: Callable[[Predictions], Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """`analyse` of each model's predictions per seed, and pooled over seeds (the (seed, problem) pairs)."""
    per_seed = {str(s): {kind: analyse(p) for kind, p in models.items()} for s, models in by_seed.items()}
    kinds = list(next(iter(by_seed.values())))
    return per_seed, {kind: analyse([p for runs in by_seed.values() for p in runs[kind]]) for kind in kinds}


def error_sections(by_seed: Mapping[int, Mapping[str, Predictions]]) -> dict[str, Any]:
    """errors.json: each model's `error_report` per seed and pooled over seeds, and the paired line-level
    arithmetic test of each refiner vs the backbone alone, per seed."""
    per_seed, pooled = _per_seed_and_pooled(by_seed, error_report)
    line_level: dict[str, Any] = {}
    for seed, models in by_seed.items():
        if "none" in models:
            line_level[str(seed)] = {
                _pair_name(kind, "none"): paired_line_comparison(models["none"], predictions)
                for kind, predictions in models.items() if kind != "none"
            }  # fmt: skip
    return {"per_seed": per_seed, "pooled": pooled, "line_level": line_level}


# ------------------------------------------------------------------------------------- confident errors


def diagnostics_sections(by_seed: Mapping[int, Mapping[str, Predictions]]) -> dict[str, Any] | None:
    """diagnostics.json: each model's `commit_diagnostics` per seed and pooled over seeds (the (seed,
    problem) pairs, as `error_sections` pools); None when no evaluation recorded its commits."""
    per_seed, pooled = _per_seed_and_pooled(by_seed, commit_diagnostics)
    if all(report is None for report in pooled.values()):
        return None
    return {"per_seed": per_seed, "pooled": pooled}


def diagnostics_summary(diagnostics: Mapping[str, Any]) -> dict[str, Any]:
    """The pooled diagnostics without the per-problem list of first errors (what comparison.json keeps)."""
    return {
        kind: None if report is None else {k: v for k, v in report.items() if k != "first_error_list"}
        for kind, report in diagnostics["pooled"].items()
    }


def diagnostics_section_markdown(diagnostics: Mapping[str, Any], seeds: Sequence[int]) -> str:
    """The confident-error tables of the pooled diagnostics, under their heading."""
    scope = "" if len(seeds) == 1 else " (all seeds' (seed, problem) pairs; the backbone's once per seed)"
    heading = f"## Confident-error diagnostics{scope}\n\n"
    plot = "\nThe reliability plot is reliability.png.\n"
    return heading + diagnostics_markdown(diagnostics["pooled"]) + plot


# ------------------------------------------------------------------------------------------------- power


def power_section(
    problems: int, difference: float, discordant: float, observed: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    """The power calculation behind the evaluation set's size (two-sided alpha 0.05, power 0.8): the
    planned effect, and the effect this run's own discordant rates (gained + lost over n) can detect."""
    section: dict[str, Any] = {
        "alpha": 0.05,
        "power": 0.8,
        "planned": {
            "difference": difference,
            "discordant": discordant,
            "problems_needed": problems_needed(difference, discordant),
            "detectable_difference": detectable_difference(problems, discordant),
        },
        "observed": {},
    }
    for name, paired in observed.items():
        rate = (paired["gained"] + paired["lost"]) / paired["n"]
        section["observed"][name] = {
            "discordant": rate,
            "detectable_difference": detectable_difference(problems, rate) if rate > 0 else None,
        }
    return section


# ------------------------------------------------------------------------------------------------- markdown


def _detectable(difference: float | None) -> str:
    if difference is None or not math.isfinite(difference):
        return "none (too few problems, or no discordant pairs)"
    return f"{100 * difference:.1f} points"


def _points(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.1f}"


def _interval(low: float | None, high: float | None) -> str:
    return "-" if low is None or high is None else f"[{_points(low)}, {_points(high)}]"


def _accuracy(rate: Mapping[str, Any]) -> str:
    return f"{rate['p']:.3f} [{rate['low']:.3f}, {rate['high']:.3f}]"


def _mean_std(stats: Mapping[str, Any], scale: float = 1.0, digits: int = 3) -> str:
    std = "" if stats["std"] is None else f" ± {scale * stats['std']:.{digits}f}"
    return f"{scale * stats['mean']:.{digits}f}{std}"


def statistics_markdown(stats: Mapping[str, Any], validation: Mapping[str, Any] | None) -> str:
    """The paired tests per seed, the pooled section (more than one seed) and the validation differences."""
    rows = []
    for seed, section in stats["per_seed"].items():
        for name, s in section["paired"].items():
            rows.append([seed, name.replace("_", " "), f"+{s['gained']} / -{s['lost']}", _points(s["diff"]),
                         _interval(s["ci_low"], s["ci_high"]), f"{s['p']:.3g}", s["verdict"]])  # fmt: skip
    header = ["seed", "comparison", "gained / lost", "diff (points)", "95% CI (bootstrap)", "McNemar p", ""]
    text = "**Paired comparisons (strict accuracy, same problems)**\n\n" + markdown_table(header, rows) + "\n"
    pooled = stats["pooled"]
    if len(pooled["seeds"]) > 1:
        acc_rows = [[kind, _mean_std(a["mean_std"]), _accuracy(a["all_pairs"])]
                    for kind, a in pooled["accuracy"].items()]  # fmt: skip
        header = ["model", "accuracy mean ± std", "all (seed, problem) pairs [95% Wilson]"]
        seeds = ", ".join(map(str, pooled["seeds"]))
        text += f"\n**Across seeds {seeds}**\n\n" + markdown_table(header, acc_rows) + "\n\n"
        rows = []
        for name, s in pooled["paired"].items():
            mc, st = s["pooled_mcnemar"], s["stratified_sign_test"]
            rows.append([name.replace("_", " "), _mean_std(s["diff"], 100, 1),
                         f"+{mc['gained']} / -{mc['lost']}", f"{mc['p']:.3g}",
                         f"+{st['positive']} / -{st['negative']} ({st['ties']} ties)", f"{st['p']:.3g}",
                         s["verdict"]])  # fmt: skip
        header = ["comparison", "diff mean ± std (points)", "pooled gained / lost", "pooled McNemar p",
                  "problems better / worse", "stratified sign p", ""]  # fmt: skip
        text += markdown_table(header, rows) + (
            "\n\nThe pooled McNemar test treats every (seed, problem) pair as independent, which overstates "
            "the evidence; the stratified sign test (one observation per problem) is the one the verdict "
            "uses.\n"
        )
    if validation:
        rows = []
        for seed, section in validation["per_seed"].items():
            for name, v in section.items():
                loss, acc = v["loss_diff"], v["masked_accuracy_diff"]
                rows.append([seed, name.replace("_", " "), f"{loss['diff']:+.4f}",
                             f"[{loss['low']:+.4f}, {loss['high']:+.4f}]" if loss["low"] is not None else "-",
                             _points(acc["diff"]), _interval(acc["low"], acc["high"])])  # fmt: skip
        header = ["seed", "comparison", "val loss diff", "95% CI", "masked acc diff (points)", "95% CI"]
        table = markdown_table(header, rows)
        text += f"\n**Validation differences** ({validation['method']})\n\n{table}\n"
    return text


def errors_section_markdown(errors: Mapping[str, Any], seeds: Sequence[int]) -> str:
    """errors_markdown of the pooled reports, then the paired line-level test of each refiner per seed."""
    scope = "" if len(seeds) == 1 else " (all seeds' (seed, problem) pairs; the backbone's once per seed)"
    text = f"## Error analysis{scope}\n\n" + errors_markdown(errors["pooled"]) + "\n"
    rows = []
    for seed, section in errors["line_level"].items():
        for name, s in section.items():
            rows.append([seed, name.replace("_", " "), str(s["lines"]), f"+{s['gained']} / -{s['lost']}",
                         f"{s['p']:.3g}", verdict(s["p"])])  # fmt: skip
    header = ["seed", "comparison", "lines (same operands)", "gained / lost", "McNemar p", ""]
    table = markdown_table(header, rows)
    return f"{text}\n**Line arithmetic given correct operands, paired**\n\n{table}\n"


def _training_phrase(config: Any) -> str:
    """How the models were trained: phase 1 for the shared run, plus what each arm changes."""
    text = f"refiners trained in phase {config.run.training.phase}"
    text += " (backbone frozen)" if config.run.training.phase == 1 else ""
    if config.arms:
        changes = "; ".join(f"{name}: {arm.refiner} refiner, {_flat(arm.run) or 'the shared run'}"
                            for name, arm in config.arms.items())  # fmt: skip
        text += f" (arms: {changes})"
    return text


def _flat(changes: Mapping[str, Any], prefix: str = "") -> str:
    """{model: {carry: true}} -> 'model.carry=True' (an arm's run changes, for the report)."""
    parts = []
    for key, value in changes.items():
        if isinstance(value, Mapping):
            parts.append(_flat(value, f"{prefix}{key}."))
        else:
            parts.append(f"{prefix}{key}={value}")
    return ", ".join(part for part in parts if part)


def comparison_markdown(
    config: Any,
    report: Mapping[str, Any],
    table: str,
    statistics: str,
    errors: Mapping[str, Any] | None,
    diagnostics: Mapping[str, Any] | None = None,
) -> str:
    """comparison.md: the setting (a `compare.CompareConfig`), the table, the statistics, the power statement,
    the error tables and the confident-error diagnostics."""
    ev, data, sampling = config.evaluation, config.run.data, config.run.sampling
    rows, check, power = report["rows"], report["split_check"], report["power"]
    extras = "" if sampling.threshold is None else f", threshold {sampling.threshold}"
    extras += "" if sampling.cache is None else f", {sampling.cache} KV cache"
    steps = ", ".join(sorted({f"{r['refiner']} {r['train_steps']}" for r in rows if r["train_steps"]}))
    planned = power["planned"]
    observed = "; ".join(
        f"{name.replace('_', ' ')}: discordant rate {o['discordant']:.3f}, smallest detectable difference "
        + _detectable(o["detectable_difference"])
        for name, o in power["observed"].items()
    )
    text = (
        f"# Refiner comparison\n\n{report['problems']} test {data.dataset} problems ({ev.split}), disjoint "
        "from "
        f"the {check['problems']['train']} training and {check['problems']['validation']} validation "
        f"problems ({check['method']}: 0 shared). Training seeds {', '.join(map(str, report['seeds']))}; "
        f"{_training_phrase(config)} for {steps} optimizer steps, evaluated from "
        f"checkpoints/{ev.checkpoint}{_fallback_note(report)}. Sampler: gen_length {sampling.gen_length}, "
        "block_length "
        f"{sampling.block_length}, steps {sampling.steps}, temperature {sampling.temperature}{extras}. "
        f"The backbone alone is {report['backbone_runs']}.\n\n{table}\n\n"
        "Accuracy intervals are 95% Wilson intervals; \"not significant\" means the exact McNemar (or, "
        "across seeds, the stratified sign) test gives p >= 0.05.\n\n"
        f"{statistics}\n**Power.** A two-sided McNemar test at alpha 0.05 with 80% power needs "
        f"{planned['problems_needed']} problems to detect a {100 * planned['difference']:.1f}-point "
        f"difference at a discordant rate of {planned['discordant']:.3f}; with these {report['problems']} "
        f"problems the smallest detectable difference at that rate is "
        f"{_detectable(planned['detectable_difference'])}. Observed (seed "
        f"{report['seeds'][0]}): {observed}.\n"
    )
    if errors is not None:
        text += "\n" + errors_section_markdown(errors, report["seeds"])
    if diagnostics is not None:
        text += "\n" + diagnostics_section_markdown(diagnostics, report["seeds"])
    return text + f"\nTotal time {report['elapsed_s'] / 60:.1f} min.\n"


def _fallback_note(report: Mapping[str, Any]) -> str:
    """Said where `best` was asked for and a run had none (no validation set): its `last` was sampled."""
    fallbacks = (report.get("checkpoint") or {}).get("fallbacks") or []
    if not fallbacks:
        return ""
    runs = ", ".join(f"{f['refiner']} seed {f['seed']}" for f in fallbacks)
    return f" (no 'best' checkpoint without a validation set, so checkpoints/last for {runs})"
