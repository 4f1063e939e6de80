"""Answer a list of questions with a loaded model: the Python API behind `LoadedModel.generate`.

The prompts go through the tokenizer's chat template, left-padded in batches of `batch_size`; the [MASK],
EOS and EoT ids come from the model and its tokenizer (`evaluator.sampling_setup`), so a caller names none
of them. The statistics are the sampler's per-call means over every call, NaN-free (`evaluator.call_stats`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from llada_trm.data import GSM8KRecord, prompt_batch
from llada_trm.data.tokenizer import decode_generated
from llada_trm.diffusion import SamplingOptions, sample
from llada_trm.diffusion.steps import StepCallback
from llada_trm.evaluate.evaluator import _device_of, check_lengths, sampling_setup

__all__ = ["Answers", "answer_questions"]


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
    sampler's per-step hook (`diffusion.steps.StepEvent`, rows of each batch in order)."""
    listed = _questions(questions)
    check_lengths(model, tokenizer, [GSM8KRecord(question=q, answer="") for q in listed], options)
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
