"""Which parameters train, and at which learning rate: `training_params.trainable_modules` patterns (a
module name, a glob, or `re:<regex>`) and the three phases (1: the patterns only; 2: also the last
`unfreeze_last_n_layers` backbone blocks at `backbone_lr`; 3: everything). With LoRA adapters on the backbone,
phases 2 and 3 train the adapters instead of the base weights. docs/training.md ("Phases") has the details.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch.nn as nn

from llada_trm.errors import ConfigError
from llada_trm.model.lora import is_adapter_name, last_block_indices

if TYPE_CHECKING:
    from llada_trm.config import RunConfig

BACKBONE_ATTR = "backbone"  # the hybrid's backbone submodule: phase 2 unfreezes its last blocks


@dataclass
class ParamGroupSpec:
    """One optimizer parameter group before weight-decay splitting: a name, its parameters and its LR."""

    name: str
    lr: float
    params: dict[str, nn.Parameter] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params.values())


@dataclass
class FreezePlan:
    """The outcome of freezing: parameter groups, counts, and whether the backbone is wholly frozen."""

    phase: int
    groups: list[ParamGroupSpec]
    total_params: int
    backbone_frozen: bool

    @property
    def trainable_names(self) -> list[str]:
        return [name for group in self.groups for name in group.params]

    @property
    def trainable_params(self) -> int:
        return sum(group.numel for group in self.groups)

    def report(self) -> str:
        """Total / trainable / frozen parameter counts in millions and percent, one line per group."""
        total = max(self.total_params, 1)
        trainable = self.trainable_params
        frozen = self.total_params - trainable
        backbone = "frozen" if self.backbone_frozen else "trainable" if frozen == 0 else "partly trainable"
        lines = [
            f"phase {self.phase}: backbone {backbone}",
            f"  total params:     {self.total_params / 1e6:10.3f}M",
            f"  trainable params: {trainable / 1e6:10.3f}M ({100 * trainable / total:6.2f}%)",
            f"  frozen params:    {frozen / 1e6:10.3f}M ({100 * frozen / total:6.2f}%)",
        ]
        for group in self.groups:
            lines.append(
                f"  group {group.name!r}: {group.numel / 1e6:.3f}M params in {len(group.params)} tensors, "
                f"lr {group.lr:g}"
            )
        return "\n".join(lines)


def match_pattern(pattern: str, name: str) -> bool:
    """Whether a freezing pattern selects the module/parameter called `name` (see the module docstring)."""
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    if any(ch in pattern for ch in "*?["):
        return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, pattern + ".*")
    return name == pattern or name.startswith(pattern + ".")


def matching_parameters(model: nn.Module, patterns: Sequence[str], *, key: str) -> dict[str, nn.Parameter]:
    """The parameters selected by `patterns`; a pattern that selects nothing is a `ConfigError` at once.

    A pattern may name a module (all its parameters) or a single parameter. The error lists the top-level
    modules that do exist, so `trainable_modules: [refiner]` fails here, not as an empty optimizer later.
    """
    params = dict(model.named_parameters())
    modules = [name for name, _ in model.named_modules() if name]
    selected: dict[str, nn.Parameter] = {}
    for pattern in patterns:
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as exc:
                raise ConfigError(f"{key}: {pattern!r} is not a valid regular expression ({exc})") from None
        hits = {name: p for name, p in params.items() if match_pattern(pattern, name)}
        if not hits:
            matched_module = any(match_pattern(pattern, name) for name in modules)
            top = sorted({name.split(".")[0] for name in modules})
            reason = "matches a module without parameters" if matched_module else "matches no module"
            raise ConfigError(
                f"{key}: pattern {pattern!r} {reason}; top-level modules are: {', '.join(top) or '(none)'}"
            )
        selected.update(hits)
    return selected


def apply_freezing(
    model: nn.Module,
    *,
    phase: int,
    trainable_modules: Sequence[str],
    lr: float,
    backbone_lr: float,
    unfreeze_last_n_layers: int = 0,
) -> FreezePlan:
    """Set `requires_grad` on every parameter for `phase` and return the parameter groups to optimise."""
    for p in model.parameters():
        p.requires_grad_(False)

    head = matching_parameters(model, trainable_modules, key="training_params.trainable_modules")
    groups = [ParamGroupSpec("head", lr, head)]

    adapters = any(is_adapter_name(name) for name, _ in model.named_parameters())
    if phase == 2:
        blocks = _last_backbone_blocks(model, unfreeze_last_n_layers)
        extra = {name: p for name, p in model.named_parameters()
                 if name not in head and any(name.startswith(block + ".") for block in blocks)}  # fmt: skip
        groups.append(ParamGroupSpec("backbone", backbone_lr, extra))
    elif phase == 3:
        rest = {name: p for name, p in model.named_parameters() if name not in head}
        groups.append(ParamGroupSpec("backbone", backbone_lr, rest))
    if adapters:  # LoRA: the base weights stay frozen, the adapters train
        groups[1:] = [
            ParamGroupSpec(g.name, g.lr, {n: p for n, p in g.params.items() if is_adapter_name(n)})
            for g in groups[1:]
        ]

    groups = [g for g in groups if g.params]
    if not groups:
        raise ConfigError("training_params.trainable_modules: selects no parameter; nothing would train")
    for group in groups:
        for p in group.params.values():
            p.requires_grad_(True)

    backbone = getattr(model, BACKBONE_ATTR, None)
    backbone_frozen = backbone is None or not any(p.requires_grad for p in backbone.parameters())
    return FreezePlan(
        phase=phase,
        groups=groups,
        total_params=sum(p.numel() for p in model.parameters()),
        backbone_frozen=backbone_frozen,
    )


def freeze_for_run(model: nn.Module, config: RunConfig) -> FreezePlan:
    """`apply_freezing` with a run's `training` and `training_params` settings."""
    t, p = config.training, config.training_params
    return apply_freezing(
        model,
        phase=t.phase,
        trainable_modules=p.trainable_modules,
        lr=t.lr,
        backbone_lr=t.backbone_lr,
        unfreeze_last_n_layers=t.unfreeze_last_n_layers,
    )


def set_train_mode(model: nn.Module, training: bool = True) -> nn.Module:
    """`model.train(training)`, then wholly frozen submodules back to eval mode (no dropout in frozen parts).

    Call it instead of `model.train()`: a plain `model.train()` would switch the frozen backbone's dropout on.
    """
    model.train(training)
    if training:
        _eval_frozen(model)
    return model


# ---------------------------------------------------------------------------------------------- helpers


def _eval_frozen(module: nn.Module) -> bool:
    """Put wholly frozen subtrees in eval mode; returns whether nothing below `module` is trainable.

    A parameterless child (dropout) inside a partly trainable module keeps its training behaviour.
    """
    children_frozen = [_eval_frozen(child) for child in module.children()]
    frozen = all(children_frozen) and not any(p.requires_grad for p in module.parameters(recurse=False))
    if frozen and any(True for _ in module.parameters()):
        module.eval()
    return frozen


def _last_backbone_blocks(model: nn.Module, n: int) -> list[str]:
    """Module names of the backbone's last `n` transformer blocks (for phase 2)."""
    backbone = getattr(model, BACKBONE_ATTR, None)
    blocks = getattr(backbone, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise ConfigError(f"training.phase 2 needs a model with '{BACKBONE_ATTR}.blocks' (an nn.ModuleList)")
    wanted = {id(blocks[i]) for i in last_block_indices(len(blocks), n)}
    return [name for name, module in model.named_modules() if id(module) in wanted]
