"""Prompting and collation in LLaDA's SFT layout.

A training sequence is ``chat_template(question) + answer + <|eot_id|> + <|endoftext|>``, right-padded
with ``<|endoftext|>`` to the batch length. As in LLaDA's SFT, the padding EOS tokens are part of the answer:
they are masked and predicted like any answer token (that is how the model learns where to stop) and
``answer_lengths`` counts them. Only the prompt is never masked. Prompts for generation are left-padded
instead, so every prompt ends where the generated block begins, as in LLaDA's batched ``generate``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypedDict

import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from .gsm8k import GSM8KRecord
from .tokenizer import eos_token_id, eot_token_id, pad_token_id

OVERFLOW_MODES = ("skip", "truncate")


class EncodedExample(TypedDict):
    """Token ids of prompt + answer (unpadded) and where the answer starts."""

    input_ids: list[int]
    prompt_length: int


def _as_ids(encoded: Any) -> list[int]:
    """``apply_chat_template(tokenize=True)`` returns a list in transformers 4 and a BatchEncoding in 5."""
    if isinstance(encoded, Mapping):
        encoded = encoded["input_ids"]
    if isinstance(encoded, torch.Tensor):
        encoded = encoded.tolist()
    if encoded and isinstance(encoded[0], list):
        (encoded,) = encoded
    return [int(token) for token in encoded]


def encode_prompt(tokenizer: PreTrainedTokenizerBase, question: str) -> list[int]:
    """The question as one user turn plus the assistant header, through the tokenizer's chat template."""
    from .chat_template import encode_chat  # a folder's unknown template renders under limits

    messages = [{"role": "user", "content": question}]
    return _as_ids(encode_chat(tokenizer, messages, add_generation_prompt=True))


def encode_answer(tokenizer: PreTrainedTokenizerBase, answer: str, *, end_with_eot: bool = True) -> list[int]:
    """Answer tokens closed the way LLaDA-Instruct closes a turn: ``<|eot_id|>`` then one ``<|endoftext|>``.

    The chat template would write the same ``<|eot_id|>`` after an assistant message; the explicit EOS makes
    even the longest sequence of a batch end in EOS. ``end_with_eot=False`` gives the bare ``answer<EOS>``
    layout of LLaDA's guidelines.
    """
    ids = _as_ids(tokenizer(answer.strip(), add_special_tokens=False)["input_ids"])
    if end_with_eot:
        ids.append(eot_token_id(tokenizer))
    ids.append(eos_token_id(tokenizer))
    return ids


def _fit(prompt: list[int], answer: list[int], max_length: int, overflow: str) -> EncodedExample | None:
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if overflow not in OVERFLOW_MODES:
        raise ValueError(f"overflow must be one of {OVERFLOW_MODES}, got {overflow!r}")
    if len(prompt) + len(answer) > max_length:
        if overflow == "skip" or len(prompt) >= max_length:
            return None
        answer = answer[: max_length - len(prompt)]
    return EncodedExample(input_ids=prompt + answer, prompt_length=len(prompt))


def encode_example(
    tokenizer: PreTrainedTokenizerBase,
    record: GSM8KRecord,
    max_length: int,
    *,
    overflow: str = "skip",
    end_with_eot: bool = True,
) -> EncodedExample | None:
    """Encode one record for SFT; None when it does not fit in ``max_length`` tokens.

    ``overflow="skip"`` drops an over-long example; ``"truncate"`` cuts its answer at ``max_length`` (the cut
    answer then has no closing EOS). An example whose prompt alone fills ``max_length`` is always dropped.
    """
    prompt = encode_prompt(tokenizer, record.question)
    answer = encode_answer(tokenizer, record.answer, end_with_eot=end_with_eot)
    return _fit(prompt, answer, max_length, overflow)


def collate_batch(
    examples: Sequence[Mapping[str, Any]], pad_id: int, *, pad_to: int | None = None
) -> dict[str, torch.Tensor]:
    """Stack encoded examples into LLaDA's SFT batch, right-padded with ``pad_id`` (EOS).

    Returns ``input_ids [B, L]``, ``prompt_lengths [B]``, ``answer_lengths [B] = L - prompt_length`` (padding
    included, as LLaDA's loss normalises by it) and ``attention_mask [B, L]`` (1 on the example's own tokens,
    0 on padding). LLaDA's SFT attends to and trains on the padding, so the mask is informational there.
    ``pad_to`` fixes ``L`` (e.g. for a feature cache with constant shapes).
    """
    if not examples:
        raise ValueError("collate_batch needs at least one example")
    lengths = [len(example["input_ids"]) for example in examples]
    length = max(lengths) if pad_to is None else pad_to
    if length < max(lengths):
        raise ValueError(f"pad_to={pad_to} is shorter than the longest example ({max(lengths)} tokens)")
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    prompt_lengths = torch.empty(len(examples), dtype=torch.long)
    for row, (example, n) in enumerate(zip(examples, lengths, strict=True)):
        prompt_length = int(example["prompt_length"])
        if not 0 <= prompt_length <= n:
            raise ValueError(f"example {row}: prompt_length {prompt_length} outside its {n} tokens")
        input_ids[row, :n] = torch.as_tensor(example["input_ids"], dtype=torch.long)
        attention_mask[row, :n] = 1
        prompt_lengths[row] = prompt_length
    return {
        "input_ids": input_ids,
        "prompt_lengths": prompt_lengths,
        "answer_lengths": length - prompt_lengths,
        "attention_mask": attention_mask,
    }


def prompt_batch(
    tokenizer: PreTrainedTokenizerBase, questions: Sequence[str], *, pad_id: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chat-formatted prompts LEFT-padded for batched generation: ``(input_ids, attention_mask)``, [B, P]."""
    if isinstance(questions, str) or not questions:
        raise ValueError("prompt_batch expects a non-empty list of question strings")
    pad = pad_token_id(tokenizer) if pad_id is None else pad_id
    prompts = [torch.tensor(encode_prompt(tokenizer, question), dtype=torch.long) for question in questions]
    input_ids = pad_sequence(prompts, batch_first=True, padding_value=pad, padding_side="left")
    ones = [torch.ones_like(prompt) for prompt in prompts]
    return input_ids, pad_sequence(ones, batch_first=True, padding_side="left")


class SFTDataset(Dataset):
    """Records encoded once for SFT; over-long ones are skipped or truncated and counted.

    Use ``DataLoader(dataset, batch_size=..., collate_fn=dataset.collate)``.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        records: Sequence[GSM8KRecord],
        max_length: int,
        *,
        overflow: str = "skip",
        end_with_eot: bool = True,
        pad_to: int | None = None,
    ) -> None:
        if pad_to is not None and pad_to < max_length:
            raise ValueError(f"pad_to ({pad_to}) must be >= max_length ({max_length})")
        self.max_length = max_length
        self.pad_id = pad_token_id(tokenizer)
        self.pad_to = pad_to
        self.examples: list[EncodedExample] = []
        self.num_skipped = 0
        self.num_truncated = 0
        for record in records:
            prompt = encode_prompt(tokenizer, record.question)
            answer = encode_answer(tokenizer, record.answer, end_with_eot=end_with_eot)
            example = _fit(prompt, answer, max_length, overflow)
            if example is None:
                self.num_skipped += 1
                continue
            self.num_truncated += len(example["input_ids"]) < len(prompt) + len(answer)
            self.examples.append(example)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> EncodedExample:
        return self.examples[index]

    def collate(self, batch: Sequence[EncodedExample]) -> dict[str, torch.Tensor]:
        return collate_batch(batch, self.pad_id, pad_to=self.pad_to)
