"""GSM8K-style accuracy of a model under LLaDA's sampler, with the refiner running inside every step.

Besides `evaluate_model` (accuracy, refinement efficiency, speed, and with ``diagnostics`` the
confident-error records), the rest of an evaluation: the problems (`load_eval_records`), the one policy for
prompts that do not fit (`fit_prompts`, shared with the lm-eval backend: skipped, scored as wrong, counted;
cutting would change the question), and the Python API behind `LoadedModel.generate` (`answer_questions`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from llada_trm.config import ArithmeticDataConfig, ProblemCount, SyntheticDataConfig
from llada_trm.data.arithmetic import generate_task_records
from llada_trm.data.collate import encode_prompt, prompt_batch
from llada_trm.data.gsm8k import DataError, GSM8KRecord, apply_split, load_gsm8k, parse_split
from llada_trm.data.synthetic import SPLITS, SyntheticTaskConfig
from llada_trm.data.tokenizer import decode_generated, digit_token_ids, special_token_ids
from llada_trm.diffusion.options import SamplingOptions
from llada_trm.diffusion.sampler import StepCallback, add_stats, refines_masked_positions, sample
from llada_trm.dist_utils import gather_objects, is_main_process, shard_indices
from llada_trm.evaluate import diagnostics as diag
from llada_trm.evaluate.extraction import extract_flexible, extract_strict
from llada_trm.io import write_json, write_jsonl
from llada_trm.model.hybrid import chunk_sum
from llada_trm.progress import progress_bar

PREDICTIONS_FILE = "predictions.jsonl"
SUMMARY_FILE = "summary.json"


@dataclass
class EvalResult:
    """The summary (accuracy, refinement efficiency, speed), every prediction, and the files written."""

    summary: dict[str, Any]
    predictions: list[dict[str, Any]]
    out_dir: Path | None = None
    files: list[Path] = field(default_factory=list)

    @property
    def accuracy_strict(self) -> float:
        return self.summary["accuracy_strict"]

    @property
    def accuracy_flexible(self) -> float:
        return self.summary["accuracy_flexible"]


class _CountingModel:
    """Runs the model with a fixed refinement budget and adds the per-call counts the sampler sums.

    The hybrid reports `chunks_refined` and a per-chunk step tensor; the efficiency figures need the step
    total and the number of chunks that held a masked position, as scalars, so the sampler can add them up.
    With a KV cache the call covers a window starting at `cache_position`; chunks stay anchored at absolute
    positions, as the hybrid anchors them, so the window's first chunk may be partial.
    """

    def __init__(self, model: Any, num_steps: int | None, mask_id: int, chunk_size: int | None) -> None:
        self.model = model
        self.num_steps = num_steps
        self.mask_id = mask_id
        self.chunk_size = chunk_size
        # The wrapper refines exactly when the model does, so the sampler sees the model's declaration.
        self.refines_masked_positions = refines_masked_positions(model)

    def __call__(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        masked: Tensor | None = None,
        **cache_kwargs: Any,
    ) -> Any:
        if self.num_steps is not None:
            cache_kwargs["num_steps"] = self.num_steps
        if masked is not None and self.refines_masked_positions:
            cache_kwargs["masked"] = masked
        output = self.model(input_ids, attention_mask=attention_mask, **cache_kwargs)
        stats = getattr(output, "stats", None)
        if not isinstance(stats, Mapping):
            return output
        output.stats = stats = call_stats(stats)
        if self.chunk_size is None or "steps_per_chunk" not in stats:
            return output
        masked = (input_ids == self.mask_id if masked is None else masked).float()
        past = cache_kwargs.get("past_key_values")
        offset = cache_kwargs.get("cache_position")
        if offset is None:
            offset = 0 if past is None else past.length
        lead = offset % self.chunk_size
        if lead:
            masked = torch.cat((masked.new_zeros(masked.shape[0], lead), masked), dim=1)
        output.stats = {
            **stats,
            "chunks_candidate": int((chunk_sum(masked, self.chunk_size) > 0).sum()),
            "chunk_steps": int(stats["steps_per_chunk"].sum()),
        }
        return output


def call_stats(stats: Mapping[str, Any]) -> dict[str, Any]:
    """One call's statistics as the sampler should average them: a NaN (e.g. the mean confidence of a call
    that refined nothing) is left out, so that the per-call mean runs over the calls that measured it; the
    refiner's per-step delta norms and its named slot norms and gates become scalars (`delta_norm`,
    `slot_norm_<name>`, `gate_<name>`) instead of being dropped as non-scalar."""
    out: dict[str, Any] = {}
    for key, value in stats.items():
        number = value.item() if isinstance(value, Tensor) and value.numel() == 1 else value
        if isinstance(number, float) and not math.isfinite(number):
            continue
        out[key] = value
    norms = [float(v) for v in stats.get("delta_norms") or () if math.isfinite(float(v))]
    if norms:
        out["delta_norm"] = sum(norms) / len(norms)
    for prefix, group in (("slot_norm", stats.get("slot_norms")), ("gate", stats.get("gates"))):
        for name, value in (group or {}).items() if isinstance(group, Mapping) else ():
            if isinstance(value, Tensor) and value.numel() == 1:  # the hybrid reports 0-d tensors (no sync)
                value = value.item()
            if isinstance(value, int | float) and math.isfinite(value):
                out[f"{prefix}_{name}"] = float(value)
    return out


def _device_of(model: Any) -> torch.device:
    parameter = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return parameter.device if parameter is not None else torch.device("cpu")


def _score(record: GSM8KRecord, completion: str, index: int) -> dict[str, Any]:
    reference = extract_strict(record.answer)
    strict, flexible = extract_strict(completion), extract_flexible(completion)
    return {
        "index": index,
        "question": record.question,
        "reference": record.answer,
        "reference_answer": reference,
        "completion": completion,
        "prediction_strict": strict,
        "prediction_flexible": flexible,
        "correct_strict": reference is not None and strict == reference,
        "correct_flexible": reference is not None and flexible == reference,
    }


def _max_positions(model: Any) -> int | None:
    """The backbone's max_sequence_length (a hybrid's, or a plain LLaDAModel's); None when unknown."""
    backbone = getattr(model, "backbone", model)
    return getattr(getattr(backbone, "config", None), "max_sequence_length", None)


def sampling_setup(
    model: Any, tokenizer: PreTrainedTokenizerBase, options: SamplingOptions, num_steps: int | None
) -> tuple[_CountingModel, SamplingOptions]:
    """The model wrapped for the sampler (refinement budget, per-call counts) and `options` with the [MASK],
    EOS and EoT ids of this model and tokenizer (the model's own [MASK] first: the one it was trained on)."""
    ids = special_token_ids(tokenizer)
    mask_id = getattr(model, "mask_token_id", ids.mask)
    sampling = replace(options, mask_id=mask_id, eos_id=ids.eos, eot_id=ids.eot)
    if options.digit_order != "confidence":
        digits = digit_token_ids(tokenizer)
        if not digits:
            raise ValueError(
                f"digit_order {options.digit_order!r} needs a tokenizer that writes each digit as one token; "
                "this one does not: use digit_order 'confidence'"
            )
        sampling = replace(sampling, digit_ids=digits)
    chunk_size = getattr(getattr(model, "config", None), "chunk_size", None)
    return _CountingModel(model, num_steps, mask_id, chunk_size), sampling


@torch.no_grad()
def evaluate_model(  # noqa: PLR0913 - cli.py and compare.py pass every keyword
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[GSM8KRecord],
    options: SamplingOptions | None = None,
    *,
    num_steps: int | None = None,
    out_dir: str | Path | None = None,
    metadata: Mapping[str, Any] | None = None,
    progress: bool = True,
    desc: str = "eval",
    diagnostics: bool = False,
) -> EvalResult:
    """Sample an answer for every record and score it; write predictions.jsonl + summary.json to `out_dir`.

    model: an `LLaDATRMHybrid` (its stats feed the efficiency figures) or any callable the sampler accepts.
    num_steps: refinement steps per model call (None = the model's K; 0 switches refinement off).
    metadata: extra JSON-friendly entries for the summary (which checkpoint, which dataset).
    diagnostics: record every commit (``evaluate.diagnostics``) and summarise them (``eval`` and ``compare``
        turn it on; off, the sampler runs unobserved, as in training's sampled validation).
    """
    if not records:
        raise ValueError("evaluate_model needs at least one record")
    options = options or SamplingOptions()
    fit = fit_prompts(
        [len(encode_prompt(tokenizer, record.question)) for record in records],
        options.gen_length,
        _max_positions(model),
        where=[record.origin or "" for record in records],
    )
    counting, sampling = sampling_setup(model, tokenizer, options, num_steps)
    device = _device_of(model)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    generator = torch.Generator(device=device).manual_seed(options.seed)

    started = time.perf_counter()
    predictions: list[dict[str, Any]] = []
    totals: dict[str, float] = {}
    nfe, generation_s = 0, 0.0
    # Prompts that do not fit are skipped (`fit_prompts`): the batches are formed from the others. Under
    # torchrun each rank samples every world-th batch, each batch formed as one process forms it.
    kept = fit.kept
    starts = range(0, len(kept), options.batch_size)
    starts = [starts[i] for i in shard_indices(len(starts))]
    share = sum(len(kept[start : start + options.batch_size]) for start in starts)
    main = is_main_process()
    bar = progress_bar(share, desc=desc, unit="problem", every=options.batch_size, enabled=progress and main)
    try:
        for start in starts:
            indices = kept[start : start + options.batch_size]
            batch = [records[i] for i in indices]
            prompt, attention_mask = prompt_batch(tokenizer, [r.question for r in batch])
            prompt, attention_mask = prompt.to(device), attention_mask.to(device)
            recorder = diag.CommitRecorder(len(batch), sampling.gen_length) if diagnostics else None
            result = sample(counting, prompt, attention_mask, sampling, generator=generator, on_step=recorder)
            nfe += result.nfe
            generation_s += result.elapsed_s
            add_stats(totals, result.model_stats_total)
            # every sequence of the batch is in each of its model calls: TPF counts calls per sequence
            add_stats(totals, {SEQUENCE_CALLS: len(batch) * result.nfe})
            completions = decode_generated(tokenizer, result.tokens, result.prompt_length)
            rows = zip(indices, batch, completions, strict=True)
            for offset, (index, record, completion) in enumerate(rows):
                predictions.append(_score(record, completion, index))
                if recorder is not None:
                    predictions[-1]["commits"] = _commits(
                        recorder, offset, result, record, tokenizer, sampling, _refines(model, num_steps)
                    )
            correct = sum(p["correct_strict"] for p in predictions)
            bar.set_postfix(acc=f"{correct / len(predictions):.3f}")
            bar.update(len(batch))
    finally:
        bar.close()
        if was_training and hasattr(model, "train"):
            model.train()

    predictions, totals, nfe, generation_s = _merge_ranks(predictions, totals, nfe, generation_s)
    if fit.skipped:  # every rank adds them after the merge: scored as wrong, in their place
        predictions += [{**_score(records[i], "", i), "skipped": "prompt too long"} for i in fit.skipped]
        predictions.sort(key=lambda p: p["index"])
    summary = _summary(predictions, totals, nfe, generation_s, time.perf_counter() - started, options)
    summary["prompts"] = fit.record()
    if diagnostics:
        summary["diagnostics"] = diag.commit_diagnostics(predictions)
    summary.update(dict(metadata or {}))
    files: list[Path] = []
    out = Path(out_dir) if out_dir is not None else None
    if out is not None and is_main_process():
        files.append(write_jsonl(out / PREDICTIONS_FILE, predictions))
        files.append(write_json(out / SUMMARY_FILE, summary))
    return EvalResult(summary=summary, predictions=predictions, out_dir=out, files=files)


def _refines(model: Any, num_steps: int | None) -> bool:
    """Whether the model refines at all: a hybrid with a refiner and K != 0 (not the backbone alone)."""
    head = getattr(getattr(model, "module", model), "refinement_head", None)
    return bool(head is not None and len(head)) and num_steps != 0


def _commits(  # noqa: PLR0913 - one prediction's record needs the batch's sampling state
    recorder: diag.CommitRecorder,
    row: int,
    result: Any,
    record: GSM8KRecord,
    tokenizer: PreTrainedTokenizerBase,
    sampling: SamplingOptions,
    refining: bool,
) -> dict[str, Any]:
    """Row ``row``'s commit records with its reference tokens aligned by position (``diagnostics``)."""
    tokens = result.generated[row].tolist()
    reference, length = diag.reference_tokens(tokenizer, record.answer, sampling.gen_length, sampling.eos_id)
    span = diag.answer_span(tokens, length, (sampling.eos_id, sampling.eot_id))
    return diag.commit_fields(
        recorder, row, tokens, reference, span,
        confidence_is_probability=sampling.remasking == "low_confidence", refining=refining,
    )  # fmt: skip


def _merge_ranks(
    predictions: list[dict[str, Any]], totals: dict[str, float], nfe: int, generation_s: float
) -> tuple[list[dict[str, Any]], dict[str, float], int, float]:
    """Every rank's share of the evaluation, on every rank: predictions in record order, counts summed, the
    generation time of the slowest rank (the ranks sample side by side). One process: unchanged."""
    parts = gather_objects((predictions, totals, nfe, generation_s))
    if len(parts) == 1:
        return predictions, totals, nfe, generation_s
    merged = sorted((p for part in parts for p in part[0]), key=lambda p: p["index"])
    summed: dict[str, float] = {}
    for part in parts:
        add_stats(summed, part[1])
    return merged, summed, sum(part[2] for part in parts), max(part[3] for part in parts)


def _summary(
    predictions: list[dict[str, Any]],
    totals: Mapping[str, float],
    nfe: int,
    generation_s: float,
    total_s: float,
    options: SamplingOptions,
) -> dict[str, Any]:
    n = len(predictions)
    strict = sum(p["correct_strict"] for p in predictions)
    flexible = sum(p["correct_flexible"] for p in predictions)
    tokens = sum(1 for p in predictions if "skipped" not in p) * options.gen_length
    sequence_calls = totals.get(SEQUENCE_CALLS, 0.0)
    return {
        "n": n,
        "correct_strict": strict,
        "correct_flexible": flexible,
        "accuracy_strict": strict / n,
        "accuracy_flexible": flexible / n,
        "formatted_fraction": sum(p["prediction_strict"] is not None for p in predictions) / n,
        "empty_completions": sum(not p["completion"].strip() for p in predictions if "skipped" not in p),
        "refinement": _refinement(totals),
        "speed": {
            "tokens_per_s": tokens / generation_s if generation_s > 0 else None,
            # tokens per forward: tokens committed per model call of one sequence (the community's TPF:
            # gen_length / NFE for one sequence; 1.0 for one token a step, higher with parallel decoding)
            "tokens_per_forward": tokens / sequence_calls if sequence_calls else None,
            "generated_tokens": tokens,
            "nfe": nfe,
            "generation_s": generation_s,
            "total_s": total_s,
        },
        "sampling": options.to_dict(),
    }


SEQUENCE_CALLS = "sequence_calls"  # sum over batches of rows x model calls, beside the model's own stats


def _refinement(totals: Mapping[str, float]) -> dict[str, Any] | None:
    """Efficiency from the summed per-call counts; None when the model reports no refinement stats."""
    if "chunks_candidate" not in totals:
        return None
    refined = totals.get("chunks_refined", 0.0)
    candidates = totals["chunks_candidate"]
    return {
        "mean_refine_steps": totals.get("chunk_steps", 0.0) / refined if refined else 0.0,
        "skipped_fraction": 1.0 - refined / candidates if candidates else 1.0,
        "chunks_refined": int(refined),
        "chunks_candidate": int(candidates),
        "chunks_halted": int(totals.get("chunks_halted", 0.0)),
    }


# --------------------------------------------------------------------------------------------- problems

DATASETS = ("gsm8k", "synthetic", "arithmetic")
_TASK_FIELDS = ("min_steps", "max_steps", "max_number", "max_result", "seed")


class EvalSynthetic(SyntheticTaskConfig):
    """The generated task to evaluate on (a run's is fixed, `config.SyntheticDataConfig`; a backbone's is
    the one it was pretrained on), and how many problems an unsliced split gives by default (the run's or
    the backbone's `n_eval`: since issue 25 the run's count lives in `data.n_eval`)."""

    n_eval: ProblemCount = 100


class EvalArithmetic(ArithmeticDataConfig):
    """`EvalSynthetic` for the arithmetic task."""

    n_eval: ProblemCount = 100


def synthetic_settings(
    run_data: Any | None = None, backbone_config: Mapping[str, Any] | None = None
) -> EvalSynthetic | EvalArithmetic:
    """The generated task to evaluate on: the run's (its `data.arithmetic` section when the run trains on
    the arithmetic task), else the backbone's pretraining task, else a run's (fixed) GSM8K-style task."""
    run_task = {name: getattr(SyntheticDataConfig, name) for name in _TASK_FIELDS}
    if run_data is not None:
        count = {"n_eval": run_data.n_eval}
        if run_data.dataset == "arithmetic":
            return EvalArithmetic.model_validate({**run_data.arithmetic.model_dump(), **count})
        return EvalSynthetic.model_validate({**run_task, **count})
    task = (backbone_config or {}).get("data") or {}
    known = {**run_task, **{key: task[key] for key in _TASK_FIELDS if key in task}}
    if "n_eval" in task:
        known["n_eval"] = task["n_eval"]
    return EvalSynthetic.model_validate(known)


def load_eval_records(
    dataset: str,
    split: str = "test",
    *,
    data_path: str | os.PathLike[str] | None = None,
    synthetic: SyntheticTaskConfig | ArithmeticDataConfig | None = None,
    limit: int | None = None,
) -> list[GSM8KRecord]:
    """Records of `split` (HF slicing syntax, e.g. `test[:200]`), at most `limit` of them.

    gsm8k: read from `data_path` (a JSONL/parquet file, a folder with `test.jsonl`, or a cached HF name).
    synthetic, arithmetic: `split` is `train`, `validation` or `test` of that generated task (report on
    `test`: the trainer validates and picks `best` on `validation`); without a slice, `limit` problems
    (default: the run's or the backbone's `n_eval`, else 100) are generated, and the first ones never depend
    on how many are asked for.
    """
    if dataset not in DATASETS:
        raise DataError(f"--dataset {dataset!r}: choose one of {', '.join(DATASETS)}")
    if limit is not None and limit < 1:
        raise DataError(f"--limit {limit}: must be a positive number of problems")
    if dataset == "gsm8k":
        if not data_path:
            raise DataError(
                "--dataset gsm8k needs --data-path: a GSM8K JSONL/parquet file or a folder holding "
                "test.jsonl (e.g. --data-path data/gsm8k)"
            )
        records = load_gsm8k(data_path, split)
    elif dataset == "arithmetic":
        settings = synthetic if isinstance(synthetic, ArithmeticDataConfig) else ArithmeticDataConfig()
        records = _synthetic_records(split, settings, limit)
    else:
        settings = synthetic if isinstance(synthetic, SyntheticTaskConfig) else synthetic_settings()
        records = _synthetic_records(split, settings, limit)
    return records[:limit] if limit is not None else records


def _synthetic_records(
    split: str, settings: SyntheticTaskConfig | ArithmeticDataConfig, limit: int | None
) -> list[GSM8KRecord]:
    name, selection = parse_split(split)
    if name not in SPLITS:
        raise DataError(f"split {split!r}: the generated task has the splits {', '.join(SPLITS)}")
    sliced = selection.start is not None or selection.stop is not None
    count = limit if (limit is not None and not sliced) else (getattr(settings, "n_eval", 0) or 100)
    if sliced and isinstance(selection.stop, int) and selection.stop > 0:
        count = max(count, selection.stop)
    records = generate_task_records(settings, count, split=name)
    if sliced:
        records = apply_split(records, selection)
        if not records:
            raise DataError(f"split {split!r} selects no problems out of {count}")
    return records


# ------------------------------------------------------------------------------ prompts that do not fit

POLICY = (
    "prompts whose tokens + gen_length exceed the model's positions are skipped: not sampled, scored as "
    "wrong, counted"
)


@dataclass(frozen=True)
class PromptFit:
    """Which prompts fit (`kept`, in order) and which are skipped, against `limit` positions."""

    limit: int | None
    kept: list[int]
    skipped: list[int]

    @property
    def n(self) -> int:
        return len(self.kept) + len(self.skipped)

    def record(self) -> dict[str, object]:
        """The summary's entry: the policy, the limit, how many were skipped and which."""
        return {
            "policy": POLICY,
            "max_positions": self.limit,
            "n": self.n,
            "skipped": len(self.skipped),
            "skipped_indices": list(self.skipped),
        }

    def line(self, gen_length: int) -> str:
        return prompts_line(self.record(), gen_length)


def prompts_line(record: Mapping[str, Any], gen_length: int) -> str:
    """One line for a command's output (from a summary's `prompts` entry), stating the policy whatever the
    count."""
    skipped, n = int(record["skipped"]), record.get("n")
    if not skipped:
        return f"prompts: none skipped (policy: {POLICY})"
    return (
        f"prompts: {skipped}{'' if n is None else f' of {n}'} skipped, prompt + gen_length {gen_length} > "
        f"{record['max_positions']} positions, scored as wrong (policy: {POLICY}; lower gen_length to keep "
        "them)"
    )


def fit_prompts(
    lengths: Sequence[int],
    gen_length: int | Sequence[int],
    limit: int | None,
    *,
    where: Sequence[str] = (),
    every: bool = False,
) -> PromptFit:
    """Split prompts of `lengths` tokens into those that fit `limit` positions with their `gen_length` (one
    for all, or one per prompt) and those skipped; None `limit` (unknown) keeps every prompt. Raises
    ValueError (one line) when none fits, or with `every` (the Python API answers every question it is
    given) when any does not: past the positions the answers come out empty or garbage. `where` names the
    prompts (a file:line) for that message."""
    gens = [gen_length] * len(lengths) if isinstance(gen_length, int) else list(gen_length)
    if limit is None:
        return PromptFit(limit, list(range(len(lengths))), [])
    kept = [i for i, (n, g) in enumerate(zip(lengths, gens, strict=True)) if n + g <= limit]
    fitting = set(kept)
    skipped = [i for i in range(len(lengths)) if i not in fitting]
    if skipped and (every or not kept):
        i = max(skipped, key=lengths.__getitem__) if every else min(skipped, key=lengths.__getitem__)
        name = where[i] if i < len(where) and where[i] else f"prompt {i}"
        room = limit - lengths[i]
        fix = (
            f"lower gen_length (--gen-length) to at most {room} (a multiple of block_length)"
            if room >= 1
            else "the prompt alone fills the model's positions; shorten the questions"
        )
        what = (
            f"{name}: a {lengths[i]}-token prompt"
            if every
            else f"none of the {len(lengths)} prompts fits: the shortest ({name}, {lengths[i]} tokens)"
        )
        raise ValueError(
            f"{what} + gen_length {gens[i]} = {lengths[i] + gens[i]} positions exceed the model's {limit} "
            f"(max_sequence_length); {fix}"
        )
    return PromptFit(limit, kept, skipped)


# ------------------------------------------------------------------------------------- the Python API


@dataclass
class Answers:
    """Decoded answers, one per question in order, and what producing them took.

    `stats`: per model call, the mean of each number the model reported (refine steps, chunks refined,
    confidence, delta norm, slot norms, gates, ...) over the calls that reported it (across batches, each
    batch's mean weighted by its model calls); `options`: the effective
    sampling settings; `nfe`: model calls; `elapsed_s`: sampling wall time.
    """

    answers: list[str]
    stats: dict[str, float] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    nfe: int = 0
    elapsed_s: float = 0.0

    def __len__(self) -> int:
        return len(self.answers)

    def __iter__(self):
        return iter(self.answers)


def _questions(questions: Sequence[str] | str) -> list[str]:
    """The questions as a list, each a non-empty string of valid Unicode; anything else one ValueError."""
    if isinstance(questions, str):
        listed = [questions]
    elif isinstance(questions, Sequence) and not isinstance(questions, bytes | bytearray):
        listed = list(questions)  # a dict or a set would pass as its keys: refused, not guessed at
    else:
        raise ValueError(
            f"generate expects a question string or a non-empty list of question strings, got "
            f"{type(questions).__name__}"
        )
    if not listed or not all(isinstance(q, str) for q in listed):
        raise ValueError("generate expects a question string or a non-empty list of question strings")
    for number, question in enumerate(listed, start=1):
        if not question.strip():
            raise ValueError("generate was given an empty question; every question needs some text")
        try:
            question.encode("utf-8")
        except UnicodeEncodeError as exc:  # surrogates: bytes that were not UTF-8 (argv, a latin-1 file)
            raise ValueError(
                f"question {number} holds characters that are not valid Unicode (position {exc.start}: "
                f"{question[exc.start]!r}, an undecodable byte); pass the text as UTF-8"
            ) from None
    return listed


@torch.no_grad()
def answer_questions(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[str] | str,
    options: SamplingOptions,
    *,
    num_steps: int | None = None,
    on_step: StepCallback | None = None,
) -> Answers:
    """Sample an answer to every question (a bare string counts as one) under `options`; `on_step` is the
    sampler's per-step hook (`diffusion.sampler.StepEvent`, rows of each batch in order)."""
    listed = _questions(questions)
    lengths = [len(encode_prompt(tokenizer, question)) for question in listed]
    names = [f"question {number}" for number in range(1, len(listed) + 1)]
    fit_prompts(lengths, options.gen_length, _max_positions(model), where=names, every=True)
    counting, sampling = sampling_setup(model, tokenizer, options, num_steps)
    device = _device_of(model)
    generator = torch.Generator(device=device).manual_seed(options.seed)
    answers: list[str] = []
    weighted: dict[str, float] = {}
    calls: dict[str, int] = {}
    nfe, elapsed = 0, 0.0
    for start in range(0, len(listed), options.batch_size):
        prompt, attention_mask = prompt_batch(tokenizer, listed[start : start + options.batch_size])
        prompt, attention_mask = prompt.to(device), attention_mask.to(device)
        result = sample(counting, prompt, attention_mask, sampling, generator=generator, on_step=on_step)
        texts = decode_generated(tokenizer, result.tokens, result.prompt_length)
        answers.extend(text.strip() for text in texts)
        nfe += result.nfe
        elapsed += result.elapsed_s
        for key, mean in result.model_stats.items():  # batch means, weighted by the batch's calls
            weighted[key] = weighted.get(key, 0.0) + mean * result.nfe
            calls[key] = calls.get(key, 0) + result.nfe
    stats = {key: total / calls[key] for key, total in weighted.items() if calls[key]}
    return Answers(answers=answers, stats=stats, options=options.to_dict(), nfe=nfe, elapsed_s=elapsed)
