"""Per-chunk halting inside the hybrid's refinement loop: which refined chunks stop after a step.

Two rules (`HybridConfig.halting`):

* 'confidence': run the LM head on the chunk's masked positions and stop once their mean max probability
  reached `confidence_threshold` (`confident_chunks`). Costs an LM-head pass per probed position per step.
* 'learned': the step's refiner's `HaltingHead` reads the refined states; the chunk stops when
  sigmoid(mean per-position logit over its masked positions) > `halting_threshold` (`learned_halting`).
  No LM-head pass.

`HaltTrace` records, for one refine call, the learned head's chunk logits at each step (what the halting
loss trains) and how many rows the hybrid sent through the LM head, so that a caller (and a test) can see
that learned halting runs the LM head only once, after the loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from llada_trm.hybrid.chunking import WindowChunks, max_probability
from llada_trm.hybrid.config import HybridConfig
from llada_trm.refiners.halting import HaltingHead

__all__ = ["ChunkHalting", "HaltTrace", "confident_chunks", "learned_halting"]


@dataclass
class HaltTrace:
    """One refine call's halting record.

    logits[k] [B, C]: the learned head's chunk logits after step k+1 (graph to the head only; zero where
    undefined), chunks[k] [B, C] bool: the chunks they are defined for (active at that step, with a masked
    position). Filled with learned halting whenever step logits are computed (training), so that the
    halting loss has a target at every step, the last included. lm_head_rows: rows the hybrid evaluated
    with the LM head (step logits, confidence probes, the final pass), the backbone's own logits excluded.
    """

    logits: list[Tensor] = field(default_factory=list)
    chunks: list[Tensor] = field(default_factory=list)
    lm_head_rows: int = 0


@torch.no_grad()
def confident_chunks(
    lm_head: Callable[[Tensor], Tensor],
    h: Tensor,
    logits: Tensor | None,
    probe: Tensor,
    chunks: WindowChunks,
    threshold: float,
) -> tuple[Tensor, int]:
    """[B, C] chunks whose mean max probability over the `probe` positions reached `threshold`, and the
    number of rows this ran through the LM head (0 when the step's `logits` were given)."""
    rows = probe.nonzero(as_tuple=True)
    evaluated = 0
    if logits is not None:
        row_logits = logits[rows]
    else:
        row_logits = lm_head(h[rows].detach())
        evaluated = int(rows[0].numel())
    token_conf = torch.zeros(probe.shape, device=h.device)
    token_conf[rows] = max_probability(row_logits)
    confidence, n_probed = chunks.confidence(token_conf, probe)
    return (n_probed > 0) & (confidence >= threshold), evaluated


def learned_halting(
    head: HaltingHead, h: Tensor, probe: Tensor, chunks: WindowChunks
) -> tuple[Tensor, Tensor]:
    """The head's chunk logits [B, C] (mean of its per-position logits over the `probe` positions; zero
    elsewhere) and where they are defined [B, C] (chunks with a probed position). Only probed rows run."""
    rows = probe.nonzero(as_tuple=True)
    token_q = torch.zeros(probe.shape, device=h.device)
    token_q = token_q.index_put(rows, head(h[rows]))
    q, n_probed = chunks.confidence(token_q, probe)  # the masked mean; 1.0 where nothing was probed
    defined = n_probed > 0
    return torch.where(defined, q, torch.zeros_like(q)), defined


@dataclass
class ChunkHalting:
    """The halting rule of one refine call: the config's rule over `chunks`, recording into `trace`."""

    config: HybridConfig
    lm_head: Callable[[Tensor], Tensor]
    chunks: WindowChunks
    trace: HaltTrace = field(default_factory=HaltTrace)

    @property
    def can_halt(self) -> bool:
        """Whether a chunk may stop before K ('none': never, so the loop needs no check of what is left)."""
        return self.config.halting != "none"

    def after_step(
        self, refiner: nn.Module, h: Tensor, logits: Tensor | None, active: Tensor, probe: Tensor, last: bool
    ) -> Tensor:
        """The chunks [B, C] still active after a step of `refiner` whose output is `h`.

        `active` the chunks that ran the step, `probe` their masked positions [B, L], `logits` the step's
        logits when computed (training; the confidence rule then reads them instead of running the LM head).
        The last step halts nothing, but with learned halting and step logits its head logits are still
        recorded for the loss.
        """
        config, trace = self.config, self.trace
        if config.halting == "confidence" and not last:
            threshold = config.confidence_threshold
            confident, evaluated = confident_chunks(self.lm_head, h, logits, probe, self.chunks, threshold)
            trace.lm_head_rows += evaluated
            return active & ~confident
        if config.halting == "learned" and (logits is not None or not last):
            head = getattr(refiner, "halting_head", None)
            if head is None:
                raise ValueError(
                    f"halting='learned' but the {type(refiner).__name__} has no halting head; build the "
                    "refiners through LLaDATRMHybrid with this config"
                )
            q, defined = learned_halting(head, h, probe, self.chunks)
            if logits is not None:
                trace.logits.append(q)
                trace.chunks.append(defined)
            if not last:
                return active & ~(defined & (torch.sigmoid(q.detach()) > config.halting_threshold))
        return active
