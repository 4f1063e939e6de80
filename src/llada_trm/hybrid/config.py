"""`HybridConfig`: which refiner(s) sit before the LM head, and how chunks are selected and halted."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from llada_trm.errors import ConfigError
from llada_trm.refiners import MLPRefinerConfig, SlotConfig

REFINER_CHOICES = ("none", "mlp", "slot")
INTEGRATION_CHOICES = ("replace", "hybrid", "cascade")
ACTIVE_CHOICES = ("mlp", "slot")
# Set by the hybrid model itself (from the backbone and from `max_recursive_steps`), never by the user.
_DERIVED_SETTINGS = ("d_model", "num_steps", "context_dim")


@dataclass
class HybridConfig:
    """How `LLaDATRMHybrid` refines the backbone's hidden states.

    refiner: 'none' (the plain backbone), 'mlp' (the baseline) or 'slot' (the slot TRM refiner); the kind
        built by `integration='replace'`.
    integration: 'replace' builds the one refiner named by `refiner`; 'hybrid' builds both and runs
        `active_refiner` (A/B comparison from one checkpoint, switchable at run time); 'cascade' builds both
        and runs the MLP for coarse corrections, then the slot refiner.
    active_refiner: the refiner 'hybrid' runs; ignored by the other integrations.
    max_recursive_steps: K, the step budget. In 'cascade' the budget is split, not doubled: the first
        `cascade_mlp_steps` steps (default K // 2) are the MLP's and the rest the slot refiner's, so
        `step_logits` always has K entries and cascade costs about what 'replace' does.
    chunk_size: positions per chunk along the sequence (the last chunk may be shorter).
    confidence_threshold: a chunk whose confidence (mean max-softmax probability of the backbone over its
        masked positions) is below this is refined. Default 0.5, the original system's `min_confidence`: on
        masked positions a max probability under one half means the backbone has no clear favourite. 0 refines
        nothing; any value above 1 refines every chunk that has a masked position.
    halt_on_confidence: after each step, a chunk whose recomputed confidence reached the threshold stops
        (its states and logits are frozen from then on).
    context_layers: backbone layers whose attention contexts (attn@V), averaged, are given to the slot
        refiner as external context (averaged again with its own blocks' contexts); None or [] uses only the
        refiner's own. Ignored, and not computed, when no slot refiner is built.
    return_step_logits: compute the full logits of every step (deep supervision needs them); None means
        "while training": in eval mode only the final logits are computed, which is all the sampler reads and
        saves K-1 LM-head passes over a 126k vocabulary.
    slot / mlp: the refiners' own settings, `SlotConfig` / `MLPRefinerConfig` field names (for example
        `slot={"n_heads": 4, "n_blocks": 1, "delta_scale": 0.05, "d_ctx": 128, "use_gates": True}`); `mlp`
        also takes `hidden_mult` (hidden_dim = round(hidden_mult * d_model)).
    """

    refiner: str = "slot"
    integration: str = "replace"
    active_refiner: str = "slot"
    max_recursive_steps: int = 4
    cascade_mlp_steps: int | None = None
    chunk_size: int = 16
    confidence_threshold: float = 0.5
    halt_on_confidence: bool = True
    context_layers: list[int] | None = None
    return_step_logits: bool | None = None
    slot: dict[str, Any] = field(default_factory=dict)
    mlp: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _choice("refiner", self.refiner, REFINER_CHOICES)
        _choice("integration", self.integration, INTEGRATION_CHOICES)
        _choice("active_refiner", self.active_refiner, ACTIVE_CHOICES)
        if self.refiner == "none" and self.integration != "replace":
            raise ConfigError(
                f"refiner='none' builds no refiner, but integration={self.integration!r} needs both; "
                "use integration='replace' for the plain backbone, or refiner='mlp'/'slot'"
            )
        _int("max_recursive_steps", self.max_recursive_steps, 0)
        _int("chunk_size", self.chunk_size, 1)
        if self.cascade_mlp_steps is not None:
            _int("cascade_mlp_steps", self.cascade_mlp_steps, 0)
            if self.cascade_mlp_steps > self.max_recursive_steps:
                raise ConfigError(
                    f"cascade_mlp_steps={self.cascade_mlp_steps} exceeds max_recursive_steps="
                    f"{self.max_recursive_steps}; it is the MLP's share of the K steps"
                )
        threshold = self.confidence_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or threshold < 0:
            raise ConfigError(f"confidence_threshold must be a number >= 0, got {threshold!r}")
        for name in ("halt_on_confidence",):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.return_step_logits is not None and not isinstance(self.return_step_logits, bool):
            value = self.return_step_logits
            raise ConfigError(f"return_step_logits must be true, false or null, got {value!r}")
        if self.context_layers is not None:
            layers = list(self.context_layers)
            if any(isinstance(i, bool) or not isinstance(i, int) for i in layers):
                raise ConfigError(f"context_layers must be a list of layer indices (ints), got {layers!r}")
            if len(set(layers)) != len(layers):
                raise ConfigError(f"context_layers lists a layer twice: {layers!r}")
            self.context_layers = layers
        _settings("slot", self.slot, SlotConfig)
        mlp = dict(self.mlp)
        mlp.pop("hidden_mult", None)
        _settings("mlp", mlp, MLPRefinerConfig)
        mult = self.mlp.get("hidden_mult")
        if mult is not None and (isinstance(mult, bool) or not isinstance(mult, (int, float)) or mult <= 0):
            raise ConfigError(f"mlp.hidden_mult must be a positive number, got {mult!r}")
        if mult is not None and self.mlp.get("hidden_dim") is not None:
            raise ConfigError("mlp sets both hidden_mult and hidden_dim; keep one")

    @property
    def refiner_kinds(self) -> tuple[str, ...]:
        """The refiners this configuration builds, in the order they run in a cascade."""
        if self.integration == "replace":
            return () if self.refiner == "none" else (self.refiner,)
        return ("mlp", "slot")

    def schedule(self, num_steps: int | None = None, active_refiner: str | None = None) -> list[str]:
        """The refiner that runs at each of the K steps."""
        k = self.max_recursive_steps if num_steps is None else num_steps
        _int("num_steps", k, 0)
        if self.integration == "replace":
            return [self.refiner] * k if self.refiner != "none" else []
        if self.integration == "hybrid":
            return [active_refiner or self.active_refiner] * k
        k_mlp = min(k // 2 if self.cascade_mlp_steps is None else self.cascade_mlp_steps, k)
        return ["mlp"] * k_mlp + ["slot"] * (k - k_mlp)

    def mlp_kwargs(self, d_model: int) -> dict[str, Any]:
        """`MLPRefinerConfig` keywords (`hidden_mult` resolved against `d_model`)."""
        kwargs = dict(self.mlp)
        mult = kwargs.pop("hidden_mult", None)
        if mult is not None:
            kwargs["hidden_dim"] = max(1, round(mult * d_model))
        return kwargs

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HybridConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown HybridConfig field(s) {unknown}; valid fields: {sorted(known)}")
        return cls(**data)


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {name} {value!r}; choose one of {list(choices)}")


def _int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an int >= {minimum}, got {value!r}")


def _settings(name: str, settings: Any, config_cls: type) -> None:
    if not isinstance(settings, dict):
        raise ConfigError(f"{name} settings must be a dict of {config_cls.__name__} fields, got {settings!r}")
    allowed = {f.name for f in dataclasses.fields(config_cls)} - set(_DERIVED_SETTINGS)
    derived = sorted(set(settings) & set(_DERIVED_SETTINGS))
    if derived:
        raise ConfigError(
            f"{name} settings may not set {derived}: the hybrid model derives them from the backbone "
            "(d_model, context_dim) and from max_recursive_steps (num_steps)"
        )
    unknown = sorted(set(settings) - allowed)
    if unknown:
        raise ConfigError(f"unknown {name} setting(s) {unknown}; valid: {sorted(allowed)}")
