"""LoRA adapters on the LLaDA backbone through `peft`: attach them (`add_lora`, `attach_run_lora` for a run's
`lora:` section), name them, merge them away (`merge_lora`); docs/architecture.md has the API.

Adapters are injected in place (`inject_adapter_in_model`, no `PeftModel` wrapper), so `model(...)`, the KV
cache and the hybrid's calls stay as they are; peft is imported only when adapters are attached or merged.
`attach_run_lora` lives with the model, not the trainer, because evaluation attaches the same adapters
before a run's tensors load (evaluation never imports training).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from torch import nn

from llada_trm.errors import ConfigError
from llada_trm.model.llada import LLaDAModel

if TYPE_CHECKING:
    from llada_trm.config import RunConfig


# The linear layers of a LLaDA block, by LLaDA's own names (model.llada.LLaDABlock).
LORA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out")
ADAPTER_NAME = "default"  # peft's adapter name; one adapter per layer
PEFT_INSTALL = "pip install 'llada-trm[lora]'"


def require_peft() -> Any:
    """The `peft` module, or a one-line ConfigError naming the install command."""
    try:
        import peft
    except ImportError:
        raise ConfigError(f"lora.rank > 0: the peft package is not installed; {PEFT_INSTALL}") from None
    return peft


def is_adapter_name(name: str) -> bool:
    """Whether a parameter name (of the backbone or the hybrid) is a LoRA adapter's."""
    return ".lora_A." in name or ".lora_B." in name


def adapter_names(model: nn.Module) -> list[str]:
    """The adapter parameters' names in `model.named_parameters()`."""
    return [name for name, _ in model.named_parameters() if is_adapter_name(name)]


def has_lora(model: nn.Module) -> bool:
    return bool(adapter_names(model))


def add_lora(
    backbone: LLaDAModel,
    layers: Iterable[int],
    *,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    targets: Sequence[str] = LORA_TARGETS,
) -> list[str]:
    """Wrap `targets` of the blocks `layers` (indices into `backbone.blocks`) with LoRA adapters, in place.

    The adapters are float32 whatever the base weights' dtype (a bf16 base stays bf16 and frozen; AdamW
    updates fp32 adapters). Returns the adapter parameter names, relative to `backbone`.
    """
    unknown = [name for name in targets if name not in LORA_TARGETS]
    if unknown or not targets:
        raise ConfigError(
            f"lora.target_modules: {unknown or 'empty'}; choose from {', '.join(LORA_TARGETS)} "
            "(a LLaDA block's linear layers)"
        )
    if has_lora(backbone):
        raise ConfigError("lora: this backbone already carries LoRA adapters; attach them once")
    blocks = list(backbone.blocks)
    chosen = sorted(set(layers))
    if not chosen or chosen[0] < 0 or chosen[-1] >= len(blocks):
        raise ConfigError(f"lora: layers {chosen} outside 0..{len(blocks) - 1} of this backbone")
    block_names = {id(module): name for name, module in backbone.named_modules()}
    modules = [f"{block_names[id(blocks[i])]}.{target}" for i in chosen for target in targets]
    widths = {target: min(blocks[chosen[0]].get_submodule(target).weight.shape) for target in targets}
    narrow = {target: width for target, width in widths.items() if rank > width}
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1 or narrow:
        # a rank past a layer's width adds no expressiveness, only parameters: almost surely a typo
        limit = min(widths.values())
        raise ConfigError(
            f"lora.rank={rank!r} must be an integer in 1..{limit} (the narrowest targeted layer, "
            f"{min(widths, key=widths.__getitem__)}, is {limit} wide)"
        )
    peft = require_peft()
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=modules)
    peft.inject_adapter_in_model(config, backbone, adapter_name=ADAPTER_NAME)
    names = adapter_names(backbone)
    params = dict(backbone.named_parameters())
    for name in names:
        params[name].data = params[name].data.float()
    return names


def merge_lora(model: nn.Module) -> LLaDAModel:
    """A plain `LLaDAModel` computing what `model`'s adapted backbone computes; `model` is left unchanged.

    `model` is a backbone or a hybrid (its `.backbone`). Each adapted layer becomes a plain `nn.Linear` whose
    weight is `W + (alpha / r) * B @ A`, computed in float32 and stored in W's dtype; every other tensor is
    shared with `model`, not copied (an 8B backbone is not duplicated), so treat the two as read-only or
    clone before changing either in place. A backbone without adapters comes back as an equal plain copy.
    """
    backbone = getattr(model, "backbone", model)
    if not isinstance(backbone, LLaDAModel):
        raise TypeError(f"merge_lora expects a LLaDAModel or a model with a .backbone one, got {type(model)}")
    shared = {id(t): t for t in backbone.parameters()} | {id(t): t for t in backbone.buffers()}
    merged = copy.deepcopy(backbone, memo=shared)
    wrapped = [(name, module) for name, module in merged.named_modules() if _is_lora_layer(module)]
    for name, module in wrapped:
        parent_name, _, child = name.rpartition(".")
        parent = merged.get_submodule(parent_name)
        setattr(parent, child, _merged_linear(module))
    return merged


def last_block_indices(n_blocks: int, n: int) -> list[int]:
    """The indices of the last `n` of `n_blocks` blocks (phase 2's, and its LoRA adapters')."""
    if n < 1 or n > n_blocks:
        raise ConfigError(
            f"training.unfreeze_last_n_layers: expected 1..{n_blocks} for this backbone "
            f"({n_blocks} blocks), got {n}"
        )
    return list(range(n_blocks - n, n_blocks))


def lora_layers(config: RunConfig, n_blocks: int) -> list[int]:
    """The block indices a run adapts: the phase-2 blocks (the last `unfreeze_last_n_layers`) or all."""
    if config.training.phase == 3:
        return list(range(n_blocks))
    return last_block_indices(n_blocks, config.training.unfreeze_last_n_layers)


def attach_run_lora(model: nn.Module, config: RunConfig) -> list[str]:
    """Attach the run's adapters to `model.backbone` (a hybrid's) when `lora.enabled`; their names in
    `model` (or [])."""
    settings = config.lora
    if not settings.enabled:
        return []
    names = add_lora(
        model.backbone,
        lora_layers(config, len(model.backbone.blocks)),
        rank=settings.rank,
        alpha=settings.alpha,
        dropout=settings.dropout,
        targets=settings.target_modules,
    )
    return [f"backbone.{name}" for name in names]


# ---------------------------------------------------------------------------------------------- helpers


def _is_lora_layer(module: nn.Module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "get_base_layer")


def _merged_linear(layer: Any) -> nn.Linear:
    """A new `nn.Linear` with the adapter folded in; the shared base layer is not written to."""
    base = layer.get_base_layer()
    if getattr(layer, "merged", False):
        raise ValueError("merge_lora: the adapters are already merged into the base weights (peft merge())")
    weight = base.weight.detach().float()
    for adapter in layer.active_adapters:
        if adapter in layer.lora_A:
            a, b = layer.lora_A[adapter].weight.detach(), layer.lora_B[adapter].weight.detach()
            weight = weight + (b.float() @ a.float()) * layer.scaling[adapter]
    linear = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.to(base.weight.dtype), requires_grad=base.weight.requires_grad)
    if base.bias is not None:
        linear.bias = base.bias  # shared, unchanged
    linear.train(base.training)
    return linear

