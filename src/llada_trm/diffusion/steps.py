"""The sampler's per-step hook: ``sample(..., on_step=callback)`` calls ``callback(StepEvent)`` once per
denoising step (one model call and one commit), in every sampler variant; without a callback nothing here
runs. Chunks are the hybrid's, anchored at absolute positions of prompt + answer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class StepEvent:
    """One denoising step of a batch [B] with answers of G = gen_length tokens.

    ``committed`` [B, G] bool: the positions un-masked by this step; ``tokens`` [B, G]: the answers after it
    (``mask_id`` where still masked); ``confidence`` [B, G]: the score each committed token won its place with
    (its probability; a random number under ``remasking="random"``), NaN elsewhere. ``chunks_refined`` /
    ``chunks_halted`` [B, C] bool over every chunk of the sequence: the chunks the step's model call refined,
    and those of them that stopped before the last recursive step; None for a model without a refiner.
    ``base_tokens`` [B, G]: the backbone's own choice at each position of the block being denoised, the
    argmax of the ``base_logits`` a refining model returns beside its refined logits (under classifier-free
    guidance the guided backbone logits; with ``logits_eos_inf`` EOS excluded, as the sampler excludes it),
    -1 elsewhere; None for a model that reports no ``base_logits``. Where a chunk was not refined it equals
    the greedy commit; where one was, a differing commit is the refiner's doing.
    """

    block: int
    step: int
    committed: Tensor
    tokens: Tensor
    confidence: Tensor
    mask_id: int
    prompt_length: int
    chunk_size: int | None = None
    chunks_refined: Tensor | None = None
    chunks_halted: Tensor | None = None
    base_tokens: Tensor | None = None

    def commits(self, row: int = 0) -> list[tuple[int, int, float]]:
        """(answer position, token id, confidence) of each token row ``row`` committed at this step."""
        positions = self.committed[row].nonzero().flatten().tolist()
        tokens, confidence = self.tokens[row].tolist(), self.confidence[row].tolist()
        return [(p, tokens[p], confidence[p]) for p in positions]

    def chunk_spans(self, which: str = "refined", row: int = 0) -> list[tuple[int, int]]:
        """The answer positions [start, end) of each chunk of row ``row`` that was ``refined`` or ``halted``
        (a chunk straddling the prompt is clipped to the answer)."""
        chunks = self.chunks_refined if which == "refined" else self.chunks_halted
        if chunks is None or self.chunk_size is None:
            return []
        length = self.tokens.shape[1]
        spans = []
        for chunk in chunks[row].nonzero().flatten().tolist():
            start = max(chunk * self.chunk_size - self.prompt_length, 0)
            end = min((chunk + 1) * self.chunk_size - self.prompt_length, length)
            if start < end:
                spans.append((start, end))
        return spans


StepCallback = Callable[[StepEvent], None]


def model_chunk_size(model: Any) -> int | None:
    """The hybrid's ``config.chunk_size`` (through a DDP-style ``.module``), or a wrapper's own
    ``chunk_size`` (the evaluator's counting model); None for any other model."""
    model = getattr(model, "module", model)
    size = getattr(model, "chunk_size", None)
    if size is None:
        size = getattr(getattr(model, "config", None), "chunk_size", None)
    return size if isinstance(size, int) and not isinstance(size, bool) else None


class StepObserver:
    """Turns the sampler's commits into :class:`StepEvent` calls: ``model_output`` keeps the chunk statistics
    and the backbone's argmax of the latest model call, ``committed`` reports the commit that follows."""

    def __init__(
        self, callback: StepCallback, prompt_length: int, mask_id: int, chunk_size: int | None
    ) -> None:
        self.callback = callback
        self.prompt_length = prompt_length
        self.mask_id = mask_id
        self.chunk_size = chunk_size
        self.block = 0
        self.step = 0
        self._chunks: tuple[Tensor, Tensor] | None = None
        self._base: tuple[int, Tensor] | None = None

    def start_block(self, block: int) -> None:
        self.block, self.step = block, 0

    def model_output(
        self,
        stats: Mapping[str, Any] | None,
        start: int,
        batch: int,
        length: int,
        base_tokens: Tensor | None = None,
    ) -> None:
        """Record which chunks a call on the window at ``start`` refined and halted, for the conditional
        rows (the first ``batch``: under CFG the unconditional copies follow), and the backbone's argmax
        ``base_tokens`` [batch, W] of the window (None: the model reported no base logits)."""
        self._base = None if base_tokens is None else (start, base_tokens)
        steps = (stats or {}).get("steps_per_chunk")
        halted = (stats or {}).get("halted_per_chunk")
        if self.chunk_size is None or not isinstance(steps, Tensor):
            self._chunks = None
            return
        total = -(-length // self.chunk_size)
        first = start // self.chunk_size
        refined_all = torch.zeros(batch, total, dtype=torch.bool)
        halted_all = torch.zeros(batch, total, dtype=torch.bool)
        columns = slice(first, first + steps.shape[1])
        refined_all[:, columns] = steps[:batch].cpu() > 0
        if isinstance(halted, Tensor):
            halted_all[:, columns] = halted[:batch].cpu().bool()
        self._chunks = (refined_all, halted_all)

    def committed(self, x: Tensor, start: int, transfer: Tensor, confidence: Tensor) -> None:
        """Report that ``transfer`` [B, W] (scores ``confidence``) of the window ``x[:, start:start+W]``
        were just un-masked."""
        batch, length = x.shape
        width = transfer.shape[1]
        full = torch.zeros(batch, length, dtype=torch.bool, device=x.device)
        full[:, start : start + width] = transfer
        scores = torch.full((batch, length), float("nan"), device=x.device)
        scores[:, start : start + width] = torch.where(transfer, confidence.float(), float("nan"))
        chunks = self._chunks
        base = None
        if self._base is not None:
            base_start, window = self._base
            base = torch.full((batch, length), -1, dtype=torch.long, device=window.device)
            base[:, base_start : base_start + window.shape[1]] = window
            base = base[:, self.prompt_length :].cpu()
        self.callback(
            StepEvent(
                block=self.block,
                step=self.step,
                committed=full[:, self.prompt_length :].cpu(),
                tokens=x[:, self.prompt_length :].detach().cpu().clone(),
                confidence=scores[:, self.prompt_length :].cpu(),
                mask_id=self.mask_id,
                prompt_length=self.prompt_length,
                chunk_size=self.chunk_size if chunks is not None else None,
                chunks_refined=None if chunks is None else chunks[0],
                chunks_halted=None if chunks is None else chunks[1],
                base_tokens=base,
            )
        )
        self.step += 1
        self._chunks = None
        self._base = None


def report_commit(
    observer: StepObserver | None, x: Tensor, start: int, committed: tuple[Tensor, Tensor]
) -> None:
    """The block decoders' one line after each commit: nothing at all when the sampler is not observed."""
    if observer is not None:
        observer.committed(x, start, *committed)
