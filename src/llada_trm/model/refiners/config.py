"""The refiners' configs, each knob declared and validated once: `SlotSettings` / `MLPSettings` are what a
run sets (`slot:` / `mlp:`); `SlotConfig` / `MLPRefinerConfig` are what a refiner is built from: those knobs,
the fields the hybrid derives (`DERIVED_FIELDS`) and the architecture's constants, which the Python API may
vary (the float64 slot-step test does) but a run config may not (`RETIRED_REFINER_SETTINGS`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, ConfigDict, Field, model_validator

from llada_trm.errors import ConfigError
from llada_trm.schema import NonNegInt, PosFloat, PosInt, Section, to_float

DEFAULT_MAX_INNER = 512
# The MLP refiner is min(2 d_model, 1024) wide (about 8M parameters at LLaDA-8B's d_model, 0.1%) unless
# `param_budget` sizes it. Every shipped config that built an MLP set `hidden_mult: 2.0` (the same width on
# their backbones, d_model <= 512) or `param_budget: slot`; issue 25 retired `hidden_mult` / `hidden_dim`
# from the run schema.
DEFAULT_MAX_HIDDEN = 1024
# The update scale's default (`HybridConfig.delta_scale`, shared by both refiners since issue 25).
DELTA_SCALE = 0.1
# The architecture's constants (SlotConfig's / MLPRefinerConfig's defaults): no shipped config changed them.
DELTA_CLAMP = 0.5
SLOT_MLP_RATIO = 4.0
USE_GATES = True
DROPOUT = 0.0
# Set by the hybrid model itself (from the backbone and `max_recursive_steps`), never by the user.
DERIVED_FIELDS = ("d_model", "num_steps", "context_dim")
# Old run-config keys (below `model.`) that issue 25 retired -> the value the hybrid builds with now (null:
# derived). `llada-trm convert` drops them at that value and refuses another one (docs/settings.md).
RETIRED_REFINER_SETTINGS: dict[str, object] = {
    "slot.mlp_ratio": SLOT_MLP_RATIO,
    "slot.delta_clamp": DELTA_CLAMP,
    "slot.use_gates": USE_GATES,
    "slot.dropout": DROPOUT,
    "slot.d_ctx": None,
    "slot.d_reason": None,
    "slot.d_refine": None,
    "slot.d_conf": None,
    "mlp.hidden_dim": None,
    "mlp.hidden_mult": None,
    "mlp.delta_clamp": DELTA_CLAMP,
    "mlp.dropout": DROPOUT,
}
# Slot name -> its default width as a fraction of d_inner (in SlotOutput's order).
_SLOT_DIVISORS = {"ctx": 2, "reason": 4, "refine": 4, "conf": 8}

Dropout = Annotated[float, BeforeValidator(to_float), Field(ge=0.0, lt=1.0)]


class _Settings(Section):
    """A refiner's user-settable knobs: naming a derived field is an error that says who sets it."""

    @model_validator(mode="before")
    @classmethod
    def _no_derived(cls, data: Any) -> Any:
        if isinstance(data, dict):
            derived = sorted(name for name in DERIVED_FIELDS if name in data and name not in cls.model_fields)
            if derived:
                raise ValueError(
                    f"may not set {derived}: the hybrid model derives them from the backbone "
                    "(d_model, context_dim) and max_recursive_steps (num_steps)"
                )
        return data


class _Derived(Section):
    """The fields the hybrid model fills in; assignments are not re-validated (the widths resolve once)."""

    model_config = ConfigDict(validate_assignment=False)

    d_model: PosInt
    num_steps: NonNegInt = 4
    context_dim: PosInt | None = None


class SlotSettings(_Settings):
    """The slot refiner's knobs a run sets. d_inner: width of the refiner's own blocks and of the slots'
    inputs (null: min(d_model, 512)); n_heads must divide it (checked by `SlotConfig`, once d_model is known).
    """

    n_heads: PosInt = 8
    n_blocks: NonNegInt = 2
    d_inner: PosInt | None = None


class SlotConfig(SlotSettings, _Derived):
    """What `SlotTRMRefiner` is built from: `SlotSettings`, the derived fields and the constants, null widths
    resolved. context_dim: width of the backbone's attention contexts, projected to d_inner when it differs
    (None: they must be d_inner wide). d_ctx / d_reason / d_refine / d_conf: slot widths (null: d_inner/2,
    /4, /4, /8). mlp_ratio, dropout: the blocks'; delta_clamp: the bound of each update coordinate;
    use_gates: a learnable sigmoid gate per slot.
    """

    delta_scale: PosFloat = DELTA_SCALE
    mlp_ratio: PosFloat = SLOT_MLP_RATIO
    delta_clamp: PosFloat = DELTA_CLAMP
    use_gates: bool = USE_GATES
    dropout: Dropout = DROPOUT
    d_ctx: PosInt | None = None
    d_reason: PosInt | None = None
    d_refine: PosInt | None = None
    d_conf: PosInt | None = None

    @model_validator(mode="after")
    def _resolve_widths(self) -> SlotConfig:
        if self.d_inner is None:
            self.d_inner = min(self.d_model, DEFAULT_MAX_INNER)
        for name, divisor in _SLOT_DIVISORS.items():
            field = f"d_{name}"
            if getattr(self, field) is None:
                if self.d_inner // divisor < 1:
                    raise ValueError(
                        f"d_inner={self.d_inner} is too small for the default {field} = d_inner/{divisor}; "
                        f"set {field}"
                    )
                setattr(self, field, self.d_inner // divisor)
        if self.d_inner % self.n_heads:
            raise ValueError(
                f"n_heads={self.n_heads} does not divide d_inner={self.d_inner}; "
                f"choose n_heads among the divisors of {self.d_inner}"
            )
        return self

    @property
    def slot_dims(self) -> dict[str, int]:
        return {name: getattr(self, f"d_{name}") for name in _SLOT_DIVISORS}

    @property
    def slot_total(self) -> int:
        return sum(self.slot_dims.values())


class MLPSettings(_Settings):
    """The baseline refiner's knobs a run sets. Width: min(2 d_model, 1024), or `param_budget`: a parameter
    count (`mlp_hidden_for_params`), or 'slot': the slot refiner's count (the equal-size control, resolved by
    the hybrid model)."""

    param_budget: PosInt | Literal["slot"] | None = None


class MLPRefinerConfig(MLPSettings, _Derived):
    """What `RecursiveRefinementHead` is built from: `MLPSettings`, the derived fields and the constants.
    Width: one of `hidden_dim`, `hidden_mult` x d_model or `param_budget`, resolved into `hidden_dim` (all
    null: min(2 d_model, 1024)). context_dim: width of external contexts (None: no context input).
    """

    delta_scale: PosFloat = DELTA_SCALE
    hidden_dim: PosInt | None = None
    hidden_mult: PosFloat | None = None
    delta_clamp: PosFloat = DELTA_CLAMP
    dropout: Dropout = DROPOUT

    @model_validator(mode="after")
    def _one_width(self) -> MLPRefinerConfig:
        names = ("hidden_mult", "hidden_dim", "param_budget")
        widths = [name for name in names if getattr(self, name) is not None]
        if len(widths) > 1:
            raise ValueError(f"mlp sets both {widths[0]} and {widths[1]}; keep one")
        return self

    @model_validator(mode="after")
    def _resolve_width(self) -> MLPRefinerConfig:
        if self.param_budget == "slot":
            raise ValueError("param_budget='slot' is resolved by the hybrid model; give a count here")
        if self.hidden_mult is not None:
            self.hidden_dim, self.hidden_mult = max(1, round(self.hidden_mult * self.d_model)), None
        elif self.param_budget is not None:
            budget, width = self.param_budget, self.context_dim
            self.hidden_dim = mlp_hidden_for_params(self.d_model, budget, context_dim=width)
            self.param_budget = None
        elif self.hidden_dim is None:
            self.hidden_dim = min(2 * self.d_model, DEFAULT_MAX_HIDDEN)
        return self


def mlp_parameter_count(d_model: int, hidden_dim: int, *, context_dim: int | None = None) -> int:
    """Parameters of `RecursiveRefinementHead`: LN (2d) + MLP (2dH + H + d) + confidence head (d + 1),
    plus the context projection (Dc d) when built."""
    d = d_model
    count = 2 * d + (2 * d + 1) * hidden_dim + d + d + 1
    if context_dim is not None:
        count += context_dim * d
    return count


def mlp_hidden_for_params(d_model: int, n_params: int, *, context_dim: int | None = None) -> int:
    """The MLP hidden width whose parameter count (`mlp_parameter_count`) is nearest to `n_params`.

    The count grows by 2 d_model + 1 per hidden unit, so the nearest width is within half of that of the
    target: within 1% for any budget above 50 x (2 d_model + 1).
    """
    fixed = mlp_parameter_count(d_model, 0, context_dim=context_dim)
    per_unit = 2 * d_model + 1
    hidden = round((n_params - fixed) / per_unit)
    if hidden < 1:
        raise ConfigError(
            f"mlp.param_budget={n_params} is below the smallest MLP refiner at d_model={d_model} "
            f"({fixed + per_unit} parameters); raise it or set hidden_dim"
        )
    return hidden
