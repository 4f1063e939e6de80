"""The backbone's model card: only what the run measured (size, data, command and seed, test figures with
their intervals, wall time, what the metrics CSV shows), and limitations written from those numbers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from llada_trm.data.synthetic import OPERATIONS

from .config import PretrainConfig


def _task_line(data: Any) -> str:
    """The card's task row: the GSM8K-style task's knobs, or the arithmetic task's."""
    if data.dataset == "arithmetic":
        a = data.arithmetic
        carries = f"{a.min_carries}" + ("+" if a.max_carries is None else f"-{a.max_carries}")
        return (f"generated arithmetic (data.arithmetic): chains of {a.min_chain}-{a.max_chain} lines "
                f"{' '.join(a.operations)}, operands of {a.min_digits}-{a.max_digits} digits, carries "
                f"{carries}; {data.n_train} training problems, data seed {a.seed}")  # fmt: skip
    return (f"generated problems of {data.min_steps}-{data.max_steps} arithmetic steps, numbers up to "
            f"{data.max_number}, results up to {data.max_result}; {data.n_train} training problems, data "
            f"seed {data.seed}")  # fmt: skip


def _rate(rate: Mapping[str, Any]) -> str:
    return "- (no such line)" if not rate["n"] else f"{rate['p']:.3f} ({rate['k']}/{rate['n']})"


def _span(rows: Sequence[Mapping[str, Any]], key: str) -> str:
    values = [row[key] for row in rows if row.get(key) is not None]
    return "-" if not values else f"{values[0]:.3f} -> {values[-1]:.3f} (best {max(values):.3f})"


def _origin(summary: Mapping[str, Any]) -> str:
    chain = summary["init_chain"]
    if not chain:
        return "trained from scratch (random weights, a tokenizer built from the training problems)"
    steps = [f"`{link['dir']}`" + (f" ({link['steps']} steps, `{link['command']}`, seed {link['seed']})"
             if link.get("command") else "") for link in chain]  # fmt: skip
    return "continued from " + ", which continued ".join(steps) + " (its weights and tokenizer)"


def _limitations(test: Mapping[str, Any], masked: float) -> str:
    entities, arithmetic = test["entities"], test["arithmetic"]
    parts = []
    copied = entities["entity_copied"]
    if copied["n"]:
        parts.append(
            f"{1 - copied['p']:.0%} of its answer lines name another person or object than the question's "
            f"(the person alone: {1 - entities['person_copied']['p']:.0%} wrong, a person not in the "
            f"question at all: {entities['person_not_in_question']['p']:.0%})"
        )
    measured = [(op, arithmetic[op]) for op in OPERATIONS if arithmetic[op]["n"]]
    if measured:
        worst, best = min(measured, key=lambda m: m[1]["p"]), max(measured, key=lambda m: m[1]["p"])
        parts.append(
            f"given the right operands it computes {arithmetic['all']['p']:.0%} of lines right, from "
            f"{worst[1]['p']:.0%} ({worst[0]}) to {best[1]['p']:.0%} ({best[0]})"
        )
    strict = test["strict_interval"]
    parts.append(
        f"a problem counts as solved only when every intermediate number is right, which {strict['p']:.0%} "
        "are"
    )
    return (
        "Limitations, measured on the test problems: "
        + "; ".join(parts)
        + ". "
        + (
            f"The masked-token accuracy ({masked:.3f}) also counts the task's template tokens (names, units, "
            "`<<`, `>>`), so it does not measure solving. It is not a general language model; it knows only "
            "this task. Read the sample completions in `pretrain_summary.json` and `test_predictions.jsonl` "
            "for examples."
        )
    )


def model_card(
    config: PretrainConfig, summary: Mapping[str, Any], vocab: int, evaluated: Sequence[Mapping]
) -> str:
    """The card; `evaluated`: the run's validation rows (their target columns, `targets.TARGET_COLUMNS`)."""
    arch, opt, ev, data = config.model, config.training, config.evaluation, config.data
    weighting = f", loss weight {opt.object_weight:g} on the answer's object nouns"
    weighting = "" if opt.object_weight == 1.0 else weighting
    test = summary["test"]
    strict = test["strict_interval"]
    ops = "; ".join(f"{op} {_rate(test['arithmetic'][op])}" for op in OPERATIONS)
    command = summary["command"] or "`pretrain()` called from Python (the config is in pretrain_summary.json)"
    stop = f"{summary['steps']} steps"
    if summary["stopped_at_target"]:
        stop = (
            f"stopped at step {summary['steps']} of {summary['planned_steps']}: every `training.stop_at` "
            "target met on the validation problems"
        )
    curve = (
        f"`training_metrics.csv` logs the training loss every {opt.log_every} steps, "
        f"`validation_metrics.csv` {len(evaluated)} evaluations on {ev.n_problems} validation problems "
        f"(every {opt.eval_every} steps and at the end): strict {_span(evaluated, 'strict')}, entity copy "
        f"{_span(evaluated, 'entity_copy')}, line arithmetic {_span(evaluated, 'line_arithmetic')}."
        if evaluated else f"`training_metrics.csv` logs the training loss every {opt.log_every} steps; no "
        "in-training evaluation ran (training.eval_every: 0)."
    )  # fmt: skip
    return f"""# llada-trm embedded default: tiny LLaDA backbone

A LLaDA-architecture masked-diffusion model (llama blocks, RMSNorm, RoPE, SwiGLU, bidirectional attention)
trained by this project on its generated GSM8K-style word problems, so that the whole refiner workflow runs on
a CPU; {_origin(summary)}.

| | |
|---|---|
| parameters | {summary["parameters"] / 1e6:.2f} M |
| shape | d_model {arch.d_model}, {arch.n_layers} layers, {arch.n_heads} heads, \
SwiGLU {arch.mlp_hidden_size} |
| vocabulary | {vocab} tokens (byte-level BPE, digits split, LLaDA's special tokens and chat template) |
| task | {_task_line(data)} |
| training | {stop}, batch {opt.batch_size}, lr {opt.lr:g}, seed {opt.seed}{weighting} |
| test problems | the first {summary["eval_problems"]} of the generated test split (no question shared with \
the training or validation problems: {summary["split_check"]["method"]}) |
| strict accuracy (`#### n`) | {strict["p"]:.3f} ({strict["k"]}/{strict["n"]}), 95% Wilson interval \
[{strict["low"]:.3f}, {strict["high"]:.3f}] |
| answer lines naming the question's person and object | {_rate(test["entities"]["entity_copied"])} |
| ... its person / its object | {_rate(test["entities"]["person_copied"])} / \
{_rate(test["entities"]["object_copied"])} |
| line arithmetic given the right operands | {_rate(test["arithmetic"]["all"])} |
| ... by operator | {ops} |
| masked-token accuracy (t = 0.5, {min(data.n_eval, summary["eval_problems"])} test problems) | \
{summary["eval_masked_accuracy_t0.5"]:.3f} |
| sampler for these figures | threshold {ev.threshold}, cache {ev.cache}, gen_length {ev.gen_length}, \
block {ev.block_length}, {ev.steps} steps, temperature {ev.temperature:g} |
| wall time | {summary["elapsed_s"] / 60:.1f} min on {summary["torch_threads"]} CPU threads \
(evaluations included) |

Trained by (deterministic for the seed, up to floating-point differences between machines):

    {command}

{curve} Weights are stored in {config.output.dtype}; `pretrain_summary.json` has the full config, the
error analysis and a few sample completions; `test_predictions.jsonl` every test answer.

{_limitations(test, summary["eval_masked_accuracy_t0.5"])}
"""
