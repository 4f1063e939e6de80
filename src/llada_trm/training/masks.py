"""A run's phase-1 masks (`training.masks`), built from its config and its frozen backbone.

The trainer and the feature cache both draw through the `TrainingMasks` this returns, so a cached step sees
exactly the masks a live step would have drawn.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from llada_trm.config import RunConfig
from llada_trm.diffusion.targeted_masks import MaskDistribution, TokenText, TrainingMasks, probe_margins
from llada_trm.hybrid import LLaDATRMHybrid

__all__ = ["training_masks_for_run"]


def training_masks_for_run(
    config: RunConfig, model: LLaDATRMHybrid, tokenizer: PreTrainedTokenizerBase, device: torch.device
) -> TrainingMasks:
    """The run's phase-1 masks (`training.masks`); `backbone_errors` probes the frozen backbone with two
    teacher-forced passes per example (`targeted_masks.probe_margins`), once per example."""
    t = config.training
    mask_id = model.mask_token_id

    @torch.no_grad()
    def probe(input_ids: torch.Tensor, prompt_lengths: torch.Tensor) -> torch.Tensor:
        def logits_of(noisy: torch.Tensor) -> torch.Tensor:
            return model.features(noisy).base_logits

        return probe_margins(logits_of, input_ids.to(device), prompt_lengths.to(device), mask_id)

    return TrainingMasks(
        MaskDistribution(t.masks, t.forward_mix),
        mask_id,
        t.seed,
        token_text=TokenText(tokenizer.decode) if t.masks == "answer_structure" else None,
        probe=probe if t.masks == "backbone_errors" else None,
    )
