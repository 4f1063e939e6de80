"""The training objective of the refiner, as one function a DDP wrapper can call.

    L = L_K + w_ds * mean(L_1 .. L_{K-1}) + w_ortho * ortho(slot projections) [+ w_cal * calibration]

L_k is LLaDA's masked-diffusion SFT loss on the logits after refinement step k (L_K on the final logits):
sum over masked tokens of CE / p_mask / answer_length, averaged over rows. Under the forward process p_mask is
the row's masking probability t (LLaDA's ELBO weight). Under the targeted masks of `training.masks`
(`diffusion.forward_process`: answer_structure, backbone_errors) p_mask is 1: a row's term is the plain
cross-entropy of its masked tokens summed and divided by its answer length (padding included), because
those masks are not the forward process and 1/t would weight them by a probability they were not drawn with;
deep supervision asks every intermediate step to be a usable answer, so the recursion can halt early.
`calibration` is the binary cross-entropy between the refiner's final per-token confidence and whether the
final prediction is right, over the masked positions of refined chunks: it teaches the confidence head what
the halting and the confidence-weighted update rely on. Without a refiner,
L is the plain SFT loss. With a `DenoisingUnroll` (below), L is averaged over a few consecutive
denoising steps of a trajectory.

The denoising unroll (`DenoisingUnroll`, TRM's N_sup):
Deep supervision over denoising steps (TRM's N_sup): a short simulated trajectory per training example.

    x_1, masked_1, p_1 = the forward process's draw (the one-step objective's)
    out_s       = model(x_s, masked_s)                                      s = 1 .. n_sup
    commit_s    = in each row, the floor(fraction * |masked_s|) masked positions where out_s is most confident
    x_{s+1}     = x_s with the targets written at commit_s;   masked_{s+1} = masked_s minus commit_s
    p_{s+1}     = p_s * |masked_{s+1}| / |masked_s|                          the realised mask ratio
    L           = mean_s L(out_s)                                            each step's whole objective

The positions are committed as the sampler commits them (the model's own most confident predictions,
detached), but what is written there is the target, so that every state is a partly un-masked copy of its
own answer and each step's loss has its targets. The steps are independent refinements of successive
states (the carry of refiner latents across them left the tree, docs/levers.md). A training-loop feature,
off unless `training_params.denoising_unroll_steps` > 1.

`training_masks_for_run`: the run's phase-1 masks (`training.masks`); the trainer and the feature cache both
draw through it, so a cached step sees exactly the masks a live step would have drawn.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

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
from llada_trm.errors import ConfigError
from llada_trm.hybrid.model import (
    BackboneFeatures,
    HybridOutput,
    LLaDATRMHybrid,
    expand_chunks,
    max_probability,
)

__all__ = [
    "DenoisingUnroll",
    "LossWeights",
    "ObjectiveResult",
    "diffusion_objective",
    "next_state",
    "training_masks_for_run",
    "unrolled_states",
]

LOSS_TERMS = (
    "loss",
    "loss_final",
    "loss_deep_supervision",
    "loss_orthogonality",
    "loss_calibration",
)


@dataclass(frozen=True)
class LossWeights:
    deep_supervision: float = 0.3
    orthogonality: float = 0.01
    calibration: float = 0.0

    @classmethod
    def from_params(cls, params: TrainingParamsConfig) -> LossWeights:
        """The weights a run's `training_params` section sets."""
        return cls(
            deep_supervision=params.deep_supervision_weight,
            orthogonality=params.orthogonality_weight,
            calibration=params.confidence_calibration_weight,
        )


@dataclass
class ObjectiveResult:
    """The total loss (with graph), every term (detached), the noised batch and the model's output."""

    loss: Tensor
    terms: dict[str, Tensor]
    output: HybridOutput
    masked: Tensor
    p_mask: Tensor
    tokens: int


def diffusion_objective(  # noqa: PLR0913 - the trainer's keywords, each optional
    model: nn.Module,
    batch: Mapping[str, Tensor],
    *,
    mask_id: int,
    weights: LossWeights,
    backbone_frozen: bool = False,
    chunk_size: int | None = None,
    noise: tuple[Tensor, Tensor, Tensor] | None = None,
    features: BackboneFeatures | None = None,
    unroll: DenoisingUnroll | None = None,
) -> ObjectiveResult:
    """Noise `batch` with LLaDA's forward process, run the hybrid model, and compute every loss term.

    `model` is an `LLaDATRMHybrid` (or a wrapper exposing `features` / `refine`). With `backbone_frozen` the
    backbone runs under `torch.no_grad()`: phase 1 never builds a graph through the 8B part. The padding
    is attended and trained on, as in LLaDA's SFT, so no attention mask is passed.

    `noise` = `(noisy_ids, masked, p_mask)` replaces the forward-process draw (e.g. the per-example draws of
    `feature_cache.draw_noise`); `features` (the frozen backbone's outputs for that noise, from the feature
    cache) replace the backbone pass, so only the refiner and the LM head run. `unroll`: the objective
    averaged over a short denoising trajectory starting at that noise (`DenoisingUnroll`); the result's
    `output`, `masked` and `p_mask` are its last step's.
    """
    input_ids = batch["input_ids"]
    if noise is None:
        noise = forward_process(input_ids, batch["prompt_lengths"], mask_id)
    core = getattr(model, "module", model)

    def forward(noisy: Tensor, masked: Tensor) -> HybridOutput:
        return _forward(model, noisy, masked, backbone_frozen=backbone_frozen, features=features)

    if unroll is None:
        states = iter([(forward(noise[0], noise[1]), noise[1], noise[2])])
    else:
        if features is not None:
            raise ConfigError(
                "the denoising unroll runs the backbone at each step: it cannot use cached features"
            )
        states = unrolled_states(forward, input_ids, noise, unroll)
    per_step = []
    for output, masked, p_mask in states:
        per_step.append(_loss_terms(core, output, batch, masked, p_mask, weights, chunk_size))
    terms = per_step[0]
    if len(per_step) > 1:  # TRM's deep supervision over denoising steps: each step counts the same
        terms = {name: torch.stack([step[name] for step in per_step]).mean() for name in LOSS_TERMS}
    loss = terms["loss"]
    return ObjectiveResult(
        loss=loss,
        terms={name: value.detach() for name, value in terms.items()},
        output=output,
        masked=masked,
        p_mask=p_mask,
        tokens=int(input_ids.numel()),
    )


def _forward(
    model: nn.Module,
    noisy: Tensor,
    masked: Tensor,
    *,
    backbone_frozen: bool,
    features: BackboneFeatures | None,
) -> HybridOutput:
    """The model's output on `noisy` (from `features` when given)."""
    if features is not None:
        return getattr(model, "module", model).refine(features, masked)
    if backbone_frozen and hasattr(model, "features"):
        with torch.no_grad():
            features = model.features(noisy)
        return model.refine(features, masked)
    # a DDP/FSDP wrapper exposes only forward (the hybrid skips the backbone graph when it is frozen)
    return model(noisy, masked=masked)


def _loss_terms(
    core: nn.Module,
    output: HybridOutput,
    batch: Mapping[str, Tensor],
    masked: Tensor,
    p_mask: Tensor,
    weights: LossWeights,
    chunk_size: int | None,
) -> dict[str, Tensor]:
    """Every term of L (the module docstring) for one output, with graph."""
    input_ids, answer_lengths = batch["input_ids"], batch["answer_lengths"]

    token_weights = batch.get("token_weights")  # e.g. pretraining's object nouns; None: LLaDA's loss

    def sft_loss(logits: Tensor) -> Tensor:
        return masked_diffusion_loss(
            logits, input_ids, masked, p_mask, answer_lengths, token_weights=token_weights
        )

    loss_final = sft_loss(output.logits)
    zero = loss_final.new_zeros(())
    intermediate = output.step_logits[:-1]
    loss_ds = torch.stack([sft_loss(logits) for logits in intermediate]).mean() if intermediate else zero
    has_refiner = bool(output.step_logits) or bool(getattr(core, "refinement_head", None))
    loss_ortho = core.orthogonality_loss().float() if has_refiner and weights.orthogonality > 0 else zero
    loss_cal = zero
    if weights.calibration > 0 and output.step_confidence:
        loss_cal = _calibration_loss(output, input_ids, masked, chunk_size)

    loss = (
        loss_final
        + weights.deep_supervision * loss_ds
        + weights.orthogonality * loss_ortho
        + weights.calibration * loss_cal
    )
    return {
        "loss": loss,
        "loss_final": loss_final,
        "loss_deep_supervision": loss_ds,
        "loss_orthogonality": loss_ortho,
        "loss_calibration": loss_cal,
    }


def _calibration_loss(
    output: HybridOutput, targets: Tensor, masked: Tensor, chunk_size: int | None
) -> Tensor:
    """BCE(final refiner confidence, final prediction correct) over masked positions of refined chunks."""
    confidence = output.step_confidence[-1].float()
    where = masked
    steps = output.stats.get("steps_per_chunk")
    if chunk_size is not None and isinstance(steps, Tensor):
        where = where & expand_chunks(steps > 0, masked.shape[1], chunk_size)
    if not bool(where.any()):
        return confidence.new_zeros(())
    correct = (output.logits.detach().argmax(dim=-1) == targets)[where].float()
    # Written out rather than F.binary_cross_entropy, which refuses to run under CUDA autocast.
    p = confidence[where].clamp(1e-6, 1 - 1e-6)
    return -(correct * p.log() + (1 - correct) * (1 - p).log()).mean()


# ----------------------------------------------------------------- the denoising unroll

Forward = Callable[[Tensor, Tensor], HybridOutput]
Noise = tuple[Tensor, Tensor, Tensor]


@dataclass(frozen=True)
class DenoisingUnroll:
    """`steps` (n_sup >= 2) supervised denoising steps; each commits `fraction` of the masked positions."""

    steps: int
    fraction: float

    @classmethod
    def for_run(cls, config: RunConfig) -> DenoisingUnroll | None:
        """The run's unroll, or None when `training_params.denoising_unroll_steps` <= 1 (off)."""
        params = config.training_params
        if params.denoising_unroll_steps <= 1:
            return None
        if config.advanced.feature_cache:
            raise ConfigError(
                "training_params.denoising_unroll_steps > 1 runs the backbone on each step's new state, but "
                "advanced.feature_cache stores one state per draw; set one of them off"
            )
        return cls(params.denoising_unroll_steps, params.denoising_unroll_fraction)


def next_state(logits: Tensor, targets: Tensor, noise: Noise, fraction: float) -> Noise:
    """The trajectory's next `(noisy, masked, p_mask)`: commit the most confident `fraction` of each row's
    masked positions (ties by position, as a stable sort orders them) to their targets."""
    noisy, masked, p_mask = noise
    confidence = max_probability(logits.detach()).masked_fill(~masked, -torch.inf)
    count = masked.sum(dim=1)
    commit_count = torch.floor(count.float() * fraction).long()
    order = torch.argsort(confidence, dim=1, descending=True, stable=True)
    places = torch.arange(order.shape[1], device=order.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, places)  # each position's place in the order
    commit = masked & (rank < commit_count[:, None])
    remaining = masked & ~commit
    ratio = remaining.sum(dim=1).float() / count.clamp(min=1).float()
    ratio = ratio if p_mask.dim() == 1 else ratio[:, None]
    return torch.where(commit, targets, noisy), remaining, p_mask * ratio


def unrolled_states(
    forward: Forward, targets: Tensor, noise: Noise, unroll: DenoisingUnroll
) -> Iterator[tuple[HybridOutput, Tensor, Tensor]]:
    """`(output, masked, p_mask)` of each of the `unroll.steps` denoising steps, in order; the next state is
    drawn from each output only after the caller has taken it (so each step's loss is built in turn)."""
    for step in range(unroll.steps):
        output = forward(noise[0], noise[1])
        yield output, noise[1], noise[2]
        if step + 1 < unroll.steps:
            noise = next_state(output.logits, targets, noise, unroll.fraction)


# ------------------------------------------------------------------------ the run's masks

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
