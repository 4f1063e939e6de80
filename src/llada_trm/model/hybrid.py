"""`LLaDATRMHybrid`: a LLaDA backbone whose final hidden states are refined, chunk by chunk, before lm_head.

    h_0, ctx = backbone(x_t)                         (frozen in phase 1; what the feature cache stores)
    c_j      = mean_{i in chunk j, masked} max softmax(lm_head(h_0)[i])
    R_1      = {j : chunk j has a masked position [and c_j < threshold]}   selection 'all' ['confidence']
    h_k      = refiner_k.step(h_{k-1}, active = positions of R_k)          k = 1..K (`refiner_schedule`)
    R_k+1    = R_k minus the chunks whose probe reaches the threshold    halting 'confidence' ('none': R_k)
    logits   = lm_head(h_K) on the masked positions of R_1, lm_head(h_0) elsewhere

Chunks are anchored at absolute positions (chunk j covers j*chunk_size .. (j+1)*chunk_size - 1), also for a
KV-cache window; positions outside the refined chunks keep the backbone's states and logits bit for bit.
docs/architecture.md (`llada_trm.model.hybrid`) has the long story.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from llada_trm.errors import CheckpointError, ConfigError
from llada_trm.io import atomic_path
from llada_trm.model.fingerprint import FINGERPRINT_KEY, check_fingerprint, model_fingerprint
from llada_trm.model.hybrid_config import ACTIVE_CHOICES, MAX_RECURSIVE_STEPS, HybridConfig
from llada_trm.model.llada import KVCache, LLaDAModel
from llada_trm.model.llada_weights import read_config
from llada_trm.model.refiners import build_refiner, slot_parameter_count
from llada_trm.model.refiners.base import Refiner, StatsAccumulator


def refiner_schedule(
    cfg: HybridConfig, num_steps: int | None = None, active_refiner: str = "slot"
) -> list[str]:
    """The refiner that runs at each of the K steps: the integration's composition of the built refiners."""
    k = cfg.max_recursive_steps if num_steps is None else num_steps
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_RECURSIVE_STEPS:
        raise ConfigError(f"num_steps must be an int in 0..{MAX_RECURSIVE_STEPS}, got {k!r}")
    if cfg.integration == "replace":
        return [cfg.refiner] * k if cfg.refiner != "none" else []
    if cfg.integration == "hybrid":
        return [active_refiner] * k
    return ["mlp"] * (k // 2) + ["slot"] * (k - k // 2)


class BackboneFeatures:
    """The backbone's part of a forward pass, all that `refine` reads.

    `contexts`: the requested layers' attention contexts, averaged [B, L, n_heads*head_dim] (or None);
    `masked` / `attention_mask` [B, L] may be None (features rebuilt from a cache). With a KV cache the
    tensors cover a window whose first row sits at absolute position `position_offset`. `base_logits` are
    computed by `lm_head` on first read when not given, so that a refining forward runs the LM head once,
    on its output (issue 29).
    """

    def __init__(  # noqa: PLR0913 - the fields of one record
        self,
        hidden_states: Tensor,
        base_logits: Tensor | None = None,
        contexts: Tensor | None = None,
        masked: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_offset: int = 0,
        past_key_values: KVCache | None = None,
        lm_head: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        self.hidden_states = hidden_states
        self._base_logits = base_logits
        self.contexts = contexts
        self.masked = masked
        self.attention_mask = attention_mask
        self.position_offset = position_offset
        self.past_key_values = past_key_values
        self.lm_head = lm_head

    @property
    def base_logits(self) -> Tensor | None:
        """The backbone's logits [B, L, V]: as given, or `lm_head(hidden_states)` computed once when read."""
        if self._base_logits is None and self.lm_head is not None:
            self._base_logits = self.lm_head(self.hidden_states)
        return self._base_logits

    @property
    def base_logits_given(self) -> bool:
        """Whether the base logits exist already (given, or read once): then reading them costs nothing."""
        return self._base_logits is not None


@dataclass
class HybridOutput:
    """Result of `LLaDATRMHybrid.refine` / `forward`.

    `step_logits[k-1]` are the logits after step k (only when asked for; a chunk that halted or was never
    refined keeps its last logits). `stats` (see `refine`) are detached; after a refining call its numbers are
    0-d device tensors, so that the forward makes no host sync for them: `float()` them where they are logged.
    """

    logits: Tensor
    step_logits: list[Tensor]
    features: BackboneFeatures
    hidden_states: Tensor
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def base_logits(self) -> Tensor:
        """The backbone's logits [B, L, V] (one LM-head pass over h_0 when the forward did not run one)."""
        return self.features.base_logits

    @property
    def past_key_values(self) -> KVCache | None:
        """The backbone's KV cache, when the call asked for one (`use_cache`)."""
        return self.features.past_key_values


def num_chunks(seq_len: int, chunk_size: int) -> int:
    """Number of chunks covering `seq_len` positions (ceil division)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return -(-seq_len // chunk_size)


def expand_chunks(chunk_values: torch.Tensor, seq_len: int, chunk_size: int) -> torch.Tensor:
    """[B, C] per-chunk values -> [B, L] per-position values (each position takes its chunk's value)."""
    return chunk_values[:, torch.arange(seq_len, device=chunk_values.device) // chunk_size]


def chunk_sum(values: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """[B, L] -> [B, C]: sum of `values` inside each chunk (the short last chunk is zero-padded)."""
    batch, seq_len = values.shape
    n = num_chunks(seq_len, chunk_size)
    padded = values.new_zeros(batch, n * chunk_size)
    padded[:, :seq_len] = values
    return padded.view(batch, n, chunk_size).sum(dim=-1)


def max_probability(logits: torch.Tensor, rows_per_block: int = 1024) -> torch.Tensor:
    """[..., V] logits -> [...] max softmax probability, in float32: exp(max - logsumexp), in blocks of rows,
    so that the float32 copy stays small even for thousands of positions over a 126k vocabulary."""
    flat = logits.reshape(-1, logits.shape[-1])
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
    for start in range(0, flat.shape[0], rows_per_block):
        block = flat[start : start + rows_per_block].float()
        out[start : start + rows_per_block] = torch.exp(block.amax(dim=-1) - torch.logsumexp(block, dim=-1))
    return out.view(logits.shape[:-1])


def chunk_confidence(
    token_confidence: torch.Tensor, masked: torch.Tensor, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, C] mean of `token_confidence` [B, L] over each chunk's `masked` positions (1.0 where a chunk has
    none: nothing there is uncertain), and [B, C] the number of those positions."""
    if token_confidence.shape != masked.shape:
        raise ValueError(
            f"token_confidence {tuple(token_confidence.shape)} and masked {tuple(masked.shape)} must match"
        )
    # where(), not a product: garbage (nan/inf) at unmasked positions must not leak into the sum.
    total = chunk_sum(torch.where(masked, token_confidence.float(), 0.0), chunk_size)
    n_masked = chunk_sum(masked.to(torch.float32), chunk_size).round().long()
    confidence = torch.where(n_masked > 0, total / n_masked.clamp(min=1), torch.ones_like(total))
    return confidence, n_masked


class WindowChunks:
    """The chunks of a window of `length` positions starting at absolute position `offset`: [B, L] tensors
    are padded in front by `offset % chunk_size` unmasked positions, so that chunks stay anchored at absolute
    multiples of `chunk_size`; the [B, C] tensors list the chunks the window touches."""

    def __init__(self, length: int, chunk_size: int, offset: int = 0) -> None:
        self.length = length
        self.chunk_size = chunk_size
        self.lead = offset % chunk_size
        self.count = num_chunks(self.lead + length, chunk_size)

    def _pad(self, values: Tensor) -> Tensor:
        if not self.lead:
            return values
        return torch.cat((values.new_zeros(values.shape[0], self.lead), values), dim=1)

    def confidence(self, token_confidence: Tensor, masked: Tensor) -> tuple[Tensor, Tensor]:
        """`chunk_confidence` of the window's chunks (the padding is unmasked, so it never counts)."""
        return chunk_confidence(self._pad(token_confidence), self._pad(masked), self.chunk_size)

    def masked_counts(self, masked: Tensor) -> Tensor:
        """[B, C] long: the number of `masked` positions in each of the window's chunks."""
        return chunk_sum(self._pad(masked).to(torch.float32), self.chunk_size).round().long()

    def expand(self, chunk_values: Tensor) -> Tensor:
        """[B, C] per-chunk values -> [B, L] per-position values of the window."""
        return expand_chunks(chunk_values, self.lead + self.length, self.chunk_size)[:, self.lead :]


def chunk_stats(refined: Tensor, steps: Tensor, conf0: Tensor | None, k: int) -> dict:
    """What selective refinement did, as 0-d device tensors (no host sync): [B, C] `refined` chunks, the
    `steps` each ran (of `k`), the backbone's chunk confidence `conf0` (None: not computed, not reported)."""
    total = refined.numel()
    n_refined = refined.sum()
    halted = refined & (steps < k)
    step_sum = torch.where(refined, steps, 0).sum().float()
    stats = {
        "refine_steps": torch.where(n_refined > 0, step_sum / n_refined.clamp_min(1), 0.0),
        "steps_per_chunk": steps.detach(),
        "halted_per_chunk": halted.detach(),
        "chunks_total": total,
        "chunks_refined": n_refined,
        "chunks_halted": halted.sum(),
        "skipped_fraction": 1.0 - n_refined.float() / max(total, 1),
    }
    if conf0 is not None:
        stats["chunk_confidence"] = conf0.detach()
    return stats


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


@dataclass
class ChunkHalting:
    """One refine call's halting rule over `chunks`. `lm_head_rows` counts the rows the call ran through the
    LM head besides its one output pass (step logits, confidence probes, patched rows): what probes cost."""

    config: HybridConfig
    lm_head: Callable[[Tensor], Tensor]
    chunks: WindowChunks
    lm_head_rows: int = 0

    def after_step(
        self, h: Tensor, logits: Tensor | None, active: Tensor, probe: Tensor, last: bool
    ) -> Tensor:
        """The chunks [B, C] still active after a step whose output is `h`: 'confidence' probes the masked
        positions `probe` [B, L] of the `active` chunks (reading the step's `logits` when computed); the last
        step and 'none' halt nothing."""
        if self.config.halting != "confidence" or last:
            return active
        threshold = self.config.confidence_threshold
        confident, evaluated = confident_chunks(self.lm_head, h, logits, probe, self.chunks, threshold)
        self.lm_head_rows += evaluated
        return active & ~confident


PREFIX = "refinement_head."


class LLaDATRMHybrid(nn.Module):
    """Backbone (`backbone`) plus recursive refiners (`refinement_head`, ModuleDict keyed 'mlp'/'slot')."""

    # The sampler's protocol (llada_trm.diffusion.sampler.MaskedRefiner): it passes `masked`, the positions
    # whose predictions it reads, so the refiner works on those only.
    refines_masked_positions = True

    def __init__(self, backbone: LLaDAModel, config: HybridConfig | None = None) -> None:
        super().__init__()
        config = HybridConfig() if config is None else config
        if not isinstance(config, HybridConfig):
            raise TypeError(f"config must be a HybridConfig, got {type(config).__name__}")
        self.backbone = backbone
        self.config = config
        bb = backbone.config
        config.check_backbone(bb)
        self.mask_token_id = bb.mask_token_id
        # Only the slot refiner reads backbone contexts; without it they are not even requested.
        wanted = config.context_layers if "slot" in config.refiner_kinds else None
        self.context_layers = list(backbone.resolve_layers(wanted or []).values())
        if len(set(self.context_layers)) != len(self.context_layers):
            raise ConfigError(f"context_layers {wanted} name the same layer twice")
        context_width = bb.n_heads * bb.head_dim
        self.refinement_head = nn.ModuleDict()
        # derived from the hybrid's config; the update scale is one for both refiners
        derived = {"num_steps": config.max_recursive_steps, "delta_scale": config.delta_scale}
        slot = {**config.slot.model_dump(), "context_dim": context_width if self.context_layers else None}
        for kind in config.refiner_kinds:
            settings = slot if kind == "slot" else config.mlp.model_dump()
            if kind == "mlp" and settings["param_budget"] == "slot":  # the equal-size control
                settings["param_budget"] = slot_parameter_count(bb.d_model, **derived, **slot)
            refiner = build_refiner(kind, bb.d_model, **derived, **settings)
            self.refinement_head[kind] = refiner.to(device=backbone.device)
        self._active_refiner = "slot"  # what 'hybrid' runs; `active_refiner` switches it at run time

    # ------------------------------------------------------------------ construction and handles
    @classmethod
    def from_pretrained(
        cls,
        backbone_dir: str | Path,
        config: HybridConfig | None = None,
        dtype: torch.dtype | str | None = None,
        device: str | torch.device | None = None,
    ) -> LLaDATRMHybrid:
        """Load the backbone from a LLaDA-layout directory (in `dtype`) and build fresh refiners beside it;
        the refiners stay float32 (they cast their inputs), full precision even next to a bf16 backbone."""
        if config is not None:  # sizes the backbone cannot take fail before its weights load
            config.check_backbone(read_config(backbone_dir))
        backbone = LLaDAModel.from_pretrained(backbone_dir, dtype=dtype, device=device)
        return cls(backbone, config)

    @property
    def active_refiner(self) -> str:
        """The refiner that 'hybrid' integration runs; settable between runs ('mlp' or 'slot')."""
        return self._active_refiner

    @active_refiner.setter
    def active_refiner(self, kind: str) -> None:
        if kind not in ACTIVE_CHOICES:
            raise ValueError(f"unknown active_refiner {kind!r}; choose one of {list(ACTIVE_CHOICES)}")
        self._active_refiner = kind

    def orthogonality_loss(self) -> Tensor:
        """Sum of the refiners' slot-orthogonality penalties (a zero scalar without refiners)."""
        losses = [refiner.orthogonality_loss() for refiner in self.refinement_head.values()]
        if not losses:
            return torch.zeros((), device=self.backbone.device)
        return torch.stack([loss.float() for loss in losses]).sum()

    def lm_head(self, h: Tensor) -> Tensor:
        """The backbone's LM head, applied in the backbone's dtype."""
        return self.backbone.lm_head(h.to(self.backbone.dtype))

    # ------------------------------------------------------------------ forward
    def features(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        cache_position: int | None = None,
    ) -> BackboneFeatures:
        """Run the backbone (no graph through it without trainable backbone parameters); the cache arguments
        are `LLaDAModel.forward`'s."""
        # Under no_grad (sampling) there is nothing to decide: skip the walk over the backbone's parameters.
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.backbone.parameters())
        with torch.set_grad_enabled(grad):
            out = self.backbone(
                input_ids,
                attention_mask=attention_mask,
                context_layers=self.context_layers,
                output_logits=False,  # computed on first read (`BackboneFeatures.base_logits`)
                past_key_values=past_key_values,
                use_cache=use_cache,
                cache_position=cache_position,
            )
        offset = 0
        if past_key_values is not None:
            offset = past_key_values.length if cache_position is None else cache_position
        contexts = None
        if self.context_layers:
            layers = [out.attention_contexts[i] for i in self.context_layers]
            contexts = layers[0] if len(layers) == 1 else torch.stack(layers).mean(dim=0)
        return BackboneFeatures(
            hidden_states=out.hidden_states,
            lm_head=self.output_head,
            contexts=contexts,
            masked=input_ids == self.mask_token_id,
            attention_mask=attention_mask,
            position_offset=offset,
            past_key_values=out.past_key_values,
        )

    def forward(  # noqa: PLR0913 - the backbone's cache arguments ride along
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        masked: Tensor | None = None,
        num_steps: int | None = None,
        return_step_logits: bool | None = None,
        *,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        cache_position: int | None = None,
    ) -> HybridOutput:
        """`refine(features(input_ids, attention_mask, ...), masked)`, masked defaulting to the mask tokens;
        with `past_key_values` the backbone and the refiner run on `input_ids` only (a window)."""
        features = self.features(
            input_ids,
            attention_mask,
            past_key_values=past_key_values,
            use_cache=use_cache,
            cache_position=cache_position,
        )
        return self.refine(features, masked, num_steps=num_steps, return_step_logits=return_step_logits)

    def refine(
        self,
        features: BackboneFeatures,
        masked: Tensor | None = None,
        num_steps: int | None = None,
        return_step_logits: bool | None = None,
    ) -> HybridOutput:
        """Selective, chunked, halting refinement of the backbone's hidden states (the module's equations).

        masked: [B, L] bool, the predicted positions (default `features.masked`, else every position).
        num_steps: K for this call (default `max_recursive_steps`). return_step_logits: the logits of every
        step (deep supervision reads them); None: while training. Without them, and with features whose
        backbone logits were not computed yet, the output is ONE LM-head pass over [h_K at the refined
        chunks' masked positions, h_0 elsewhere] (issue 29); with 'all' chunk selection and no halting the
        call makes no host synchronisation.

        stats: `refine_steps` (mean steps per refined chunk), `steps_per_chunk` / `halted_per_chunk` [B, C],
        `chunks_total`, `chunks_refined`, `chunks_halted`, `skipped_fraction`, `chunk_confidence` [B, C] (the
        backbone's; only when its logits were needed anyway), `lm_head_rows` (`ChunkHalting`), and the
        refiner's (`StatsAccumulator.summary`).
        """
        h0 = features.hidden_states
        batch, length = h0.shape[:2]
        masked = self._masked(masked, features, (batch, length))
        cfg = self.config
        schedule = refiner_schedule(cfg, num_steps, self._active_refiner)
        chunks = WindowChunks(length, cfg.chunk_size, features.position_offset)

        if not schedule:  # no refiner, or K = 0: every chunk passes through; no confidence to compute
            return self._pass_through(features, (batch, chunks.count))
        if return_step_logits is None:
            return_step_logits = self.training
        conf0, n_masked = None, chunks.masked_counts(masked)
        if cfg.chunk_selection == "confidence" or return_step_logits or features.base_logits_given:
            conf0, n_masked = self._backbone_confidence(features, masked, chunks)
        refined = n_masked > 0
        if cfg.chunk_selection == "confidence":
            refined &= conf0 < cfg.confidence_threshold

        halting = ChunkHalting(cfg, self.lm_head, chunks)
        # Work in at least float32 so that small updates survive a bf16 backbone; cast back at the end
        # (exact for pass-through positions, since bf16 -> fp32 -> bf16 round-trips).
        h = h0.to(self.refinement_head[schedule[0]].work_dtype(h0))
        steps = torch.zeros_like(refined, dtype=torch.long)
        accumulator, step_logits = StatsAccumulator(), []
        logits = self._base(features) if return_step_logits else None
        active, state, current = refined, None, None
        for k, kind in enumerate(schedule):
            # Nothing (left) to refine: later steps repeat the frozen logits. A host sync, so it runs only
            # where chunks can halt or the rows are packed (training, `Refiner.pack`); else an empty step
            # is a no-op.
            if (cfg.halting != "none" or self.training) and not bool(active.any()):
                if return_step_logits:
                    step_logits.extend([logits] * (len(schedule) - k))
                break
            refiner: Refiner = self.refinement_head[kind]
            if kind != current:  # a cascade hands over: the next refiner starts its own state
                state = refiner.init_state(h)
                current = kind
            positions = chunks.expand(active)
            predicted = positions & masked  # the active rows the sampler and the loss read
            context = features.contexts if kind == "slot" else None
            h, state, step_stats = refiner.step(
                h, state, context=context, active=positions, attention_mask=features.attention_mask
            )
            accumulator.add(step_stats, positions)
            steps += active.long()
            if return_step_logits:
                rows = predicted.nonzero(as_tuple=True)
                logits = logits.index_put(rows, self.lm_head(h[rows]).to(logits.dtype))
                halting.lm_head_rows += int(rows[0].numel())
                step_logits.append(logits)
            active = halting.after_step(h, logits, active, predicted, k + 1 == len(schedule))

        if return_step_logits:
            logits = step_logits[-1]
        else:
            logits = self._output_logits(features, h, chunks.expand(refined) & masked, halting)
        stats = chunk_stats(refined, steps, conf0, len(schedule))
        stats.update(accumulator.summary(self.refinement_head[schedule[-1]], h0, on_device=True))
        stats["lm_head_rows"] = halting.lm_head_rows
        return HybridOutput(
            logits=logits,
            step_logits=step_logits,
            features=features,
            hidden_states=h.to(h0.dtype),
            stats=stats,
        )

    def _backbone_confidence(
        self, features: BackboneFeatures, masked: Tensor, chunks: WindowChunks
    ) -> tuple[Tensor, Tensor]:
        """c_j, the backbone's mean max probability over chunk j's masked positions, and their count."""
        rows = masked.nonzero(as_tuple=True)
        token_conf = torch.zeros(masked.shape, device=masked.device)
        token_conf[rows] = max_probability(self._base(features)[rows].detach())
        return chunks.confidence(token_conf, masked)

    def _base(self, features: BackboneFeatures) -> Tensor:
        """The backbone's logits of `features` (computed by this model's LM head when none came with them)."""
        base = features.base_logits
        return self.lm_head(features.hidden_states) if base is None else base

    def _output_logits(
        self, features: BackboneFeatures, h: Tensor, rows: Tensor, halting: ChunkHalting
    ) -> Tensor:
        """The call's logits: refined at `rows` [B, L], the backbone's elsewhere. Features that came with
        their backbone logits get the refined rows patched in; otherwise one LM-head pass over h_0 with the
        refined rows swapped in (the pass the backbone would run: no extra LM-head read, no host sync)."""
        if features.base_logits_given:
            base = features.base_logits
            index = rows.nonzero(as_tuple=True)
            if not index[0].numel():
                return base
            halting.lm_head_rows += int(index[0].numel())
            return base.index_put(index, self.lm_head(h[index]).to(base.dtype))
        h0 = features.hidden_states
        return self.output_head(torch.where(rows.unsqueeze(-1), h, h0.to(h.dtype)))

    def output_head(self, h: Tensor) -> Tensor:
        """The LM head as the call's one output pass; separate from `lm_head` (extra reads: step logits,
        probes) so that a meter can tell them apart."""
        return self.backbone.lm_head(h.to(self.backbone.dtype))

    def _pass_through(self, features: BackboneFeatures, chunk_shape: tuple[int, int]) -> HybridOutput:
        """The output of a call that refines nothing: the backbone's, with the stats of zero refined chunks
        but no `chunk_confidence` (nothing is selected, so no softmax over the masked rows: issue 29)."""
        h0 = features.hidden_states
        zeros = torch.zeros(chunk_shape, dtype=torch.long, device=h0.device)
        stats: dict[str, Any] = {
            "refine_steps": 0.0,
            "steps_per_chunk": zeros,
            "halted_per_chunk": zeros.bool(),
            "chunks_total": zeros.numel(),
            "chunks_refined": 0,
            "chunks_halted": 0,
            "skipped_fraction": 1.0,
        }
        stats.update(StatsAccumulator().summary(self._reporting_refiner(), h0))
        stats["lm_head_rows"] = 0
        return HybridOutput(
            logits=self._base(features), step_logits=[], features=features, hidden_states=h0, stats=stats
        )

    def _masked(self, masked: Tensor | None, features: BackboneFeatures, shape: tuple[int, int]) -> Tensor:
        if masked is None:
            masked = features.masked
        if masked is None:
            return torch.ones(shape, dtype=torch.bool, device=features.hidden_states.device)
        if tuple(masked.shape) != shape:
            raise ValueError(f"masked must be [B, L] = {list(shape)}, got {list(masked.shape)}")
        return masked.to(device=features.hidden_states.device, dtype=torch.bool)

    def _reporting_refiner(self) -> Refiner | None:
        """The refiner whose gates a call that refined nothing reports: the one that would have run."""
        heads = self.refinement_head
        if not heads:
            return None
        if self.config.integration == "hybrid":
            return heads[self._active_refiner]
        return list(heads.values())[-1]  # replace: the only one; cascade: the slot refiner, built last

    # ------------------------------------------------------------------ refiner weights on disk
    def refiner_state_dict(self) -> dict[str, Tensor]:
        """The refiners' tensors under their full names (`refinement_head.<kind>.…`)."""
        return {PREFIX + name: t for name, t in self.refinement_head.state_dict().items()}

    def save_refiner(self, path: str | Path) -> Path:
        """Write only the `refinement_head.*` tensors to safetensors (atomic: temp file, then rename), with
        the fingerprint of this model's backbone (`model.fingerprint`)."""
        kinds, integration = list(self.refinement_head), self.config.integration
        return write_refiner_weights(
            path, self.refiner_state_dict(), integration=integration, refiners=kinds,
            backbone_fingerprint=model_fingerprint(self.backbone),
        )

    def load_refiner(self, path: str | Path, *, allow_backbone_mismatch: bool = False) -> None:
        """Load weights written by `save_refiner`, refused unless their names and shapes are this model's
        refiners' and the backbone they record is this one (unless `allow_backbone_mismatch`)."""
        path, expected = Path(path), self.refiner_state_dict()
        refiners, actual = ", ".join(self.refinement_head) or "none", model_fingerprint(self.backbone)
        if not path.is_file():
            raise CheckpointError(f"refiner weights {path} not found")
        with safe_open(str(path), framework="pt", device="cpu") as f:
            recorded = (f.metadata() or {}).get(FINGERPRINT_KEY)
            check_fingerprint(
                recorded,
                actual,
                what=f"refiner weights {path}",
                backbone="this model's backbone",
                allow_mismatch=allow_backbone_mismatch,
            )
            stored = {name: f.get_tensor(name) for name in f.keys()}
        missing = sorted(set(expected) - set(stored))
        unexpected = sorted(set(stored) - set(expected))
        if missing or unexpected:
            raise CheckpointError(
                f"refiner weights {path} do not match this model's refiners ({refiners}): missing "
                f"{missing[:5]}{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                f"{' ...' if len(unexpected) > 5 else ''}; build the model with the HybridConfig they were "
                "trained with"
            )
        bad = sorted(
            n for n, t in stored.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())
        )
        if bad:  # as a run checkpoint's are: a NaN refiner would only show up as empty or garbage answers
            raise CheckpointError(
                f"refiner weights {path} hold NaN/inf values in {len(bad)} tensor(s) ({', '.join(bad[:3])}"
                f"{' ...' if len(bad) > 3 else ''}); the file is broken, export or train the run again"
            )
        for name, tensor in stored.items():
            if tensor.shape != expected[name].shape:
                raise CheckpointError(
                    f"refiner weights {path}: {name} has shape {list(tensor.shape)}, the model expects "
                    f"{list(expected[name].shape)}; build the model with the HybridConfig it was trained with"
                )
        self.refinement_head.load_state_dict({name[len(PREFIX) :]: t for name, t in stored.items()})


# The refiners' weights file (`save_refiner` / `load_refiner`, and run exports): only the
# `refinement_head.*` tensors, written atomically with the integration, the refiner kinds and the backbone's
# fingerprint as metadata; read back only onto the same names, shapes and backbone.


def write_refiner_weights(
    path: str | Path,
    state: Mapping[str, Tensor],
    *,
    integration: str,
    refiners: Sequence[str],
    backbone_fingerprint: str,
) -> Path:
    """`state` (the refiners' tensors under their full names) to safetensors at `path`, recording the
    fingerprint of the backbone they were trained on."""
    path = Path(path)
    tensors = {name: t.detach().contiguous().cpu() for name, t in state.items()}
    if not tensors:
        raise ValueError("this model has no refiner (refiner='none'); there is nothing to save")
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "integration": integration,
        "refiners": ",".join(refiners),
        FINGERPRINT_KEY: backbone_fingerprint,
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path
