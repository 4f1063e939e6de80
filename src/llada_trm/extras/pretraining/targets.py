"""What a pre-training evaluation measures: masked-token accuracy, and the issue's targets on sampled answers.

The targets are those of the comparison's error analysis (`evaluate.errors.error_report`): strict `#### n`
accuracy, the answer lines that copy the question's person and object, and the lines computed right given
the right operands, overall and per operator. In training they are measured on the validation split; the
final figures of the model card on the test split, which training never sees.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch

from llada_trm.data.arithmetic import parse_arithmetic
from llada_trm.data.collate import SFTDataset, prompt_batch
from llada_trm.data.gsm8k import DataError, GSM8KRecord
from llada_trm.data.synthetic import OPERATIONS
from llada_trm.data.tokenizer import decode_generated, digit_token_ids, special_token_ids
from llada_trm.diffusion.forward_process import forward_process, masked_token_accuracy
from llada_trm.diffusion.sampler import sample
from llada_trm.evaluate.errors import error_report, parse_answer_lines
from llada_trm.evaluate.extraction import is_correct
from llada_trm.evaluate.statistics import proportion
from llada_trm.model.llada import LLaDAModel

from .config import EvaluationConfig, StopAt

OPERATOR_NAMES = {"+": "add", "-": "sub", "*": "mul", "/": "div"}
TARGET_COLUMNS = (
    "strict",
    "entity_copy",
    "person_copy",
    "object_copy",
    "line_arithmetic",
    *(f"arithmetic_{OPERATOR_NAMES[op]}" for op in OPERATIONS),
)
"""The metrics `target_metrics` returns (each a rate in [0, 1], or None when nothing was counted)."""


@torch.no_grad()
def masked_accuracy(
    model: LLaDAModel, dataset: SFTDataset, mask_id: int, seed: int, batch_size: int = 64
) -> float:
    """Masked-token accuracy at t = 0.5 on held-out examples, with fixed noise so evaluations compare."""
    generator = torch.Generator().manual_seed(seed)
    correct, total = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        batch = dataset.collate([dataset[i] for i in range(start, min(len(dataset), start + batch_size))])
        ids = batch["input_ids"]
        t = torch.full((ids.shape[0],), 0.5)
        noisy, masked, _ = forward_process(ids, batch["prompt_lengths"], mask_id, generator=generator, t=t)
        logits = model(noisy.to(model.device)).logits.cpu()
        n = int(masked.sum())
        correct += float(masked_token_accuracy(logits, ids, masked)) * n
        total += n
    return correct / max(1, total)


@torch.no_grad()
def sample_predictions(
    model: LLaDAModel, tokenizer: Any, records: Sequence[GSM8KRecord], evaluation: EvaluationConfig
) -> list[dict[str, Any]]:
    """Sample answers to `records` with the evaluation's sampler; one prediction record per problem
    (question, reference, completion, correct_strict), as `evaluate` writes them."""
    ids = special_token_ids(tokenizer)
    options = replace(evaluation.options(), mask_id=ids.mask, eos_id=ids.eos, eot_id=ids.eot,
                      digit_ids=digit_token_ids(tokenizer))  # fmt: skip
    generator = torch.Generator().manual_seed(options.seed)
    predictions: list[dict[str, Any]] = []
    for start in range(0, len(records), options.batch_size):
        chunk = records[start : start + options.batch_size]
        prompt, attention_mask = prompt_batch(tokenizer, [r.question for r in chunk])
        prompt, attention_mask = prompt.to(model.device), attention_mask.to(model.device)
        result = sample(model, prompt, attention_mask, options, generator=generator)
        for record, text in zip(
            chunk, decode_generated(tokenizer, result.tokens, prompt.shape[1]), strict=True
        ):
            predictions.append(
                {
                    "question": record.question,
                    "reference": record.answer,
                    "completion": text,
                    "correct_strict": is_correct(text, record.answer),
                }
            )
    return predictions


def _is_arithmetic(predictions: Sequence[Mapping[str, Any]]) -> bool:
    """Whether the references are the arithmetic task's (`data.arithmetic`): its answers name nobody."""
    try:
        parse_arithmetic(predictions[0]["reference"])
    except (IndexError, KeyError, DataError):
        return False
    return True


def arithmetic_report(predictions: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """`error_report`'s shape for the arithmetic task: line arithmetic (a completion line with the
    reference line's operands and operator, at the same position, computed right) overall and by operator;
    no entities to copy and no deviation categories."""
    counts = {op: [0, 0] for op in ("all", *OPERATIONS)}
    for prediction in predictions:
        reference = parse_arithmetic(prediction["reference"])
        for line, step in zip(parse_answer_lines(prediction["completion"]), reference, strict=False):
            if line is None or line.op != step.op or (line.a, line.b) != (step.a, step.b):
                continue
            for key in ("all", step.op):
                counts[key][0] += int(line.c == step.c)
                counts[key][1] += 1
    none = {"k": 0, "n": 0, "p": None, "low": None, "high": None}
    rates = {key: proportion(k, n) if n else none for key, (k, n) in counts.items()}
    entities = {"entity_copied": none, "person_copied": none, "object_copied": none}
    return {"entities": entities, "arithmetic": rates, "categories": {}}


def target_metrics(predictions: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The targets' rates (`TARGET_COLUMNS`) and the full error report they come from (key "report"); for
    the arithmetic task `arithmetic_report` (its entity rates are None: nothing to copy)."""
    report = arithmetic_report(predictions) if _is_arithmetic(predictions) else error_report(predictions)
    entities, arithmetic = report["entities"], report["arithmetic"]
    correct = sum(bool(p["correct_strict"]) for p in predictions)
    metrics: dict[str, Any] = {
        "strict": correct / len(predictions) if predictions else None,
        "entity_copy": entities["entity_copied"]["p"],
        "person_copy": entities["person_copied"]["p"],
        "object_copy": entities["object_copied"]["p"],
        "line_arithmetic": arithmetic["all"]["p"],
    }
    for op in OPERATIONS:
        metrics[f"arithmetic_{OPERATOR_NAMES[op]}"] = arithmetic[op]["p"]
    return {**metrics, "correct": correct, "problems": len(predictions), "report": report}


def targets_met(stop_at: StopAt | None, metrics: Mapping[str, Any]) -> bool:
    """Whether every target that `stop_at` sets is met (False when it sets none: nothing to stop at)."""
    if stop_at is None:
        return False
    wanted = {"entity_copy": stop_at.entity_copy, "line_arithmetic": stop_at.line_arithmetic,
              "strict": stop_at.strict_min}  # fmt: skip
    wanted = {key: value for key, value in wanted.items() if value is not None}
    return bool(wanted) and all(
        metrics.get(key) is not None and metrics[key] >= value for key, value in wanted.items()
    )
