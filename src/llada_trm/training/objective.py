"""The refiner's objective, L = L_K + w_ds * mean(L_1 .. L_{K-1}) + w_ortho * ortho (docs/training.md, "The
objective"), as a module DDP / FSDP can wrap. Under `training.masks`' targeted masks p_mask is 1: 1/t
belongs to the forward process only. `training_masks_for_run` gives the trainer and the feature cache the
same masks, so a cached step sees exactly what a live step would have drawn.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from llada_trm.config import RunConfig, TrainingParamsConfig
from llada_trm.diffusion.forward_process import (
    MaskDistribution,
    TokenText,
    TrainingMasks,
    forward_process,
    masked_diffusion_loss,
    probe_margins,
)
from llada_trm.model.hybrid import (
    BackboneFeatures,
    HybridOutput,
    LLaDATRMHybrid,
)


@dataclass
class ObjectiveResult:
    """The total loss (with graph), every term (detached), the noised batch and the model's output."""

    loss: Tensor
    terms: dict[str, Tensor]
    output: HybridOutput
    masked: Tensor
    tokens: int


def diffusion_objective(  # noqa: PLR0913 - the trainer's keywords, each optional
    model: nn.Module,
    batch: Mapping[str, Tensor],
    *,
    mask_id: int,
    deep_supervision: float = TrainingParamsConfig.deep_supervision_weight,
    orthogonality: float = TrainingParamsConfig.orthogonality_weight,
    backbone_frozen: bool = False,
    noise: tuple[Tensor, Tensor, Tensor] | None = None,
    features: BackboneFeatures | None = None,
) -> ObjectiveResult:
    """Noise `batch` (LLaDA's forward process unless `noise` = `(noisy_ids, masked, p_mask)` is given), run
    the hybrid `model` and compute every term of L. With `backbone_frozen` the backbone runs under no_grad
    (phase 1 builds no graph through the 8B part); cached `features` replace the backbone pass. The padding
    is attended and trained on, as in LLaDA's SFT, so no attention mask is passed.
    """
    input_ids, answer_lengths = batch["input_ids"], batch["answer_lengths"]
    if noise is None:
        noise = forward_process(input_ids, batch["prompt_lengths"], mask_id)
    noisy, masked, p_mask = noise
    if features is None and not backbone_frozen:
        output = model(noisy, masked=masked)
    else:
        if features is None:
            with torch.no_grad():
                features = model.features(noisy)
        output = model.refine(features, masked)

    token_weights = batch.get("token_weights")  # e.g. pretraining's object nouns; None: LLaDA's loss

    def sft_loss(logits: Tensor) -> Tensor:
        return masked_diffusion_loss(
            logits, input_ids, masked, p_mask, answer_lengths, token_weights=token_weights
        )

    loss_final = sft_loss(output.logits)
    zero = loss_final.new_zeros(())
    intermediate = output.step_logits[:-1]
    loss_ds = torch.stack([sft_loss(logits) for logits in intermediate]).mean() if intermediate else zero
    has_refiner = bool(output.step_logits) or bool(getattr(model, "refinement_head", None))
    loss_ortho = model.orthogonality_loss().float() if has_refiner and orthogonality > 0 else zero

    loss = (
        loss_final
        + deep_supervision * loss_ds
        + orthogonality * loss_ortho
    )
    terms = {"loss": loss, "loss_final": loss_final, "loss_deep_supervision": loss_ds,
             "loss_orthogonality": loss_ortho}  # fmt: skip
    return ObjectiveResult(
        loss=loss,
        terms={name: value.detach() for name, value in terms.items()},
        output=output,
        masked=masked,
        tokens=int(input_ids.numel()),
    )


# ------------------------------------------------------------------------ the run's masks

def training_masks_for_run(
    config: RunConfig, model: LLaDATRMHybrid, tokenizer: PreTrainedTokenizerBase, device: torch.device,
    forward_mix: float | None = None,
) -> TrainingMasks:
    """The run's phase-1 masks (`training.masks`); `backbone_errors` probes the frozen backbone with two
    teacher-forced passes per example (`targeted_masks.probe_margins`), once per example. `forward_mix`
    (None: the run schema's fixed 0) mixes forward-process rows in, which a pretraining with targeted masks
    needs to keep learning the whole answer."""
    t = config.training
    mask_id = model.mask_token_id

    @torch.no_grad()
    def probe(input_ids: torch.Tensor, prompt_lengths: torch.Tensor) -> torch.Tensor:
        ids, prompts = input_ids.to(device), prompt_lengths.to(device)
        return probe_margins(lambda noisy: model.features(noisy).base_logits, ids, prompts, mask_id)

    return TrainingMasks(
        MaskDistribution(t.masks, t.forward_mix if forward_mix is None else forward_mix),
        mask_id,
        t.seed,
        token_text=TokenText(tokenizer.decode) if t.masks == "answer_structure" else None,
        probe=probe if t.masks == "backbone_errors" else None,
    )


class TrainStep(nn.Module):
    """The training objective as a module: what DDP / FSDP wrap, so that every parameter use is in forward.

    `forward(batch, noise=None, features=None)` is `diffusion_objective(model, batch, noise=..., features=...,
    **objective_kwargs)` (an `ObjectiveResult`). With `touch_all` every trainable refiner parameter enters
    the loss (times zero), which FSDP needs: all ranks must reduce gradients for the same parameters, even
    when a rank's batch left every chunk unrefined. Without it, such a batch is touched all the same.
    """

    def __init__(self, model: nn.Module, **objective_kwargs: Any) -> None:
        super().__init__()
        self.model = model
        self.objective_kwargs = objective_kwargs
        self.touch_all = False

    def forward(self, batch: Mapping[str, Tensor], noise: Any = None, features: Any = None) -> Any:
        kwargs = self.objective_kwargs
        result = diffusion_objective(self.model, batch, noise=noise, features=features, **kwargs)
        # A batch whose chunks are all confident refines nothing: its loss is the frozen backbone's and has
        # no graph. Touching the refiner keeps backward valid (zero gradients) instead of failing.
        detached = torch.is_grad_enabled() and not result.loss.requires_grad
        if self.touch_all or detached:
            head = getattr(self.model, "refinement_head", None)
            params = head.parameters() if head is not None else ()
            touched = [p.sum().float() for p in params if p.requires_grad]
            if touched:
                result.loss = result.loss + 0.0 * torch.stack(touched).sum()
        return result
