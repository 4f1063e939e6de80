"""`HybridConfig`: which refiner(s) sit before the LM head, and how chunks are selected and halted.

The one definition of these knobs: the run config's `model:` section is this class plus the backbone to load
(`llada_trm.config.ModelConfig`), so a field added here is a YAML key too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BeforeValidator, Field, model_validator

from llada_trm.errors import ConfigError
from llada_trm.model.refiners.config import DELTA_SCALE, RETIRED_REFINER_SETTINGS, MLPSettings, SlotSettings
from llada_trm.schema import Int, NonNegFloat, PosFloat, PosInt, Section, to_int

if TYPE_CHECKING:
    from llada_trm.model.llada_config import LLaDAConfig

# K's ceiling. The refiners are trained and run with K in 1..16; each step is a refiner pass plus an LM-head
# pass over the refined chunks, kept for deep supervision, so a K in the thousands only exhausts memory.
MAX_RECURSIVE_STEPS = 64

RefinerKind = Literal["none", "mlp", "slot"]
Integration = Literal["replace", "hybrid", "cascade"]
ActiveKind = Literal["mlp", "slot"]
Halting = Literal["confidence", "none"]
REFINER_CHOICES: tuple[str, ...] = RefinerKind.__args__
INTEGRATION_CHOICES: tuple[str, ...] = Integration.__args__
ACTIVE_CHOICES: tuple[str, ...] = ActiveKind.__args__
HALTING_CHOICES: tuple[str, ...] = Halting.__args__

# Old `model.*` keys that issue 25 took out of the run schema -> the value the model runs with now (null:
# derived, or the lever is gone). `llada-trm convert` drops each at that value and refuses another one with
# one line (docs/settings.md); the levers that left the tree are in docs/levers.md with the commit that has
# them.
RETIRED_MODEL_SETTINGS: dict[str, object] = {
    "active_refiner": "slot",  # 'hybrid' runs its slot refiner unless `--refiner mlp` / `active_refiner=`
    "cascade_mlp_steps": None,  # a cascade's first K // 2 steps are the MLP's (`refiner_schedule`)
    "halting_threshold": 0.5,  # learned halting left the tree
    "return_step_logits": None,  # derived: while training (deep supervision), not in eval
    "denoising_carry": False,  # the carry across denoising steps left the tree
    **RETIRED_REFINER_SETTINGS,
}


class HybridConfig(Section):
    """How `LLaDATRMHybrid` refines the backbone's hidden states; each field is described in
    docs/architecture.md (`llada_trm.model.hybrid`), the integrations in docs/integration.md.
    `confidence_threshold` 0.5 is the original system's `min_confidence` (no clear favourite);
    `chunk_selection: all` exists because the backbone commits most errors confidently (68% of first errors at
    p >= 0.9 on the embedded default), where the confidence rule never lets a refiner look."""

    refiner: RefinerKind = "slot"
    integration: Integration = "replace"
    max_recursive_steps: Annotated[int, BeforeValidator(to_int), Field(ge=0, le=MAX_RECURSIVE_STEPS)] = 4
    delta_scale: PosFloat = DELTA_SCALE
    chunk_size: PosInt = 16
    confidence_threshold: NonNegFloat = 0.5
    chunk_selection: Literal["confidence", "all"] = "confidence"
    halting: Halting = "confidence"
    context_layers: list[Int] | None = Field(default_factory=lambda: [-1])
    slot: SlotSettings = Field(default_factory=SlotSettings)
    mlp: MLPSettings = Field(default_factory=MLPSettings)

    @model_validator(mode="after")
    def _consistent(self) -> HybridConfig:
        if self.refiner == "none" and self.integration != "replace":
            raise ValueError(
                f"refiner='none' builds no refiner, but integration={self.integration!r} needs both; "
                "use integration='replace' for the plain backbone, or refiner='mlp'/'slot'"
            )
        layers = self.context_layers or []
        if len(set(layers)) != len(layers):
            raise ValueError(f"context_layers lists a layer twice: {layers}")
        return self

    def check_backbone(self, backbone: LLaDAConfig) -> None:
        """Sizes this config can only be judged against the backbone's: checked before weights load."""
        limit = backbone.max_sequence_length
        if self.chunk_size > limit:
            raise ConfigError(
                f"chunk_size={self.chunk_size} exceeds the backbone's max_sequence_length={limit}; "
                f"set chunk_size to 1..{limit}"
            )

    @property
    def refiner_kinds(self) -> tuple[str, ...]:
        """The refiners this configuration builds, in the order they run in a cascade."""
        if self.integration == "replace":
            return () if self.refiner == "none" else (self.refiner,)
        return ("mlp", "slot")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HybridConfig:
        unknown = sorted(set(data) - set(cls.model_fields))
        if unknown:
            valid = sorted(cls.model_fields)
            raise ConfigError(f"unknown {cls.__name__} field(s) {unknown}; valid fields: {valid}")
        return cls(**data)
