"""The learned halting head: does a chunk's current argmax already match the targets? (TRM's Q-head.)

    q_i = w · LN(h_i) + b                    per refined position i, on h detached
    q_j = mean_{i in chunk j, masked} q_i     = w · mean_i LN(h_i) + b   (linear: commutes with the mean)
    halt chunk j  <=>  sigmoid(q_j) > halting_threshold

It reads the refined hidden states (the refiner's output at that step) through a detach, so its loss (BCE
against "every masked position of the chunk is predicted right", `training.objective`) trains the head and
nothing else, and since the halting decision is discrete, the language-modelling loss never reaches it. It
replaces the LM-head probe of the confidence rule: at LLaDA-8B's vocabulary one probe costs about 40 times a
refiner step per position, this head a dot product.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["HaltingHead"]


class HaltingHead(nn.Module):
    """Per-position halting logits `q_i` [...] from hidden states [..., d_model] (pooled per chunk by the
    hybrid).

    Zero-initialised: an untrained head says sigmoid(0) = 0.5 everywhere, which does not exceed the default
    threshold, so a fresh model halts nothing until the halting loss has taught it (as the confidence rule
    with an unconfident backbone).
    """

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.proj = nn.Linear(d_model, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, h: Tensor) -> Tensor:
        """`q_i` in float32; `h` is detached here, so the head's loss stops at the head."""
        return self.proj(self.norm(h.detach().to(self.proj.weight.dtype))).squeeze(-1).float()
