"""`transformers`' Auto classes know model type `llada` once `llada_trm` is imported: no remote code.

`AutoModel.from_pretrained(dir)` loads a backbone (an export's, the embedded one, LLaDA-8B's download) as
`LLaDAModelLM`, this package's `LLaDAModel` under LLaDA's parameter names; an export's refiners need
`llada_trm.load_checkpoint`. `import llada_trm` must stay cheap (the CLI's `--help` imports no torch), so
registration waits for transformers' auto modules to load (an import hook on those two modules only).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any

MODEL_TYPE = "llada"
_CONFIG_MODULE = "transformers.models.auto.configuration_auto"
_MODEL_MODULE = "transformers.models.auto.modeling_auto"
_classes: dict[str, Any] = {}


def _config_class() -> Any:
    """The config class, built on first use (it imports transformers' configuration_utils only)."""
    if "config" not in _classes:
        from transformers.configuration_utils import PretrainedConfig

        from llada_trm.model.llada_config import LLaDAConfig

        class LLaDAHFConfig(PretrainedConfig):
            """LLaDA's `config.json` as a transformers config: every field kept as LLaDA spells it."""

            model_type = MODEL_TYPE

            def llada_config(self) -> LLaDAConfig:
                return LLaDAConfig.from_dict(self.to_dict(), source=f"{MODEL_TYPE} config")

        _classes["config"] = LLaDAHFConfig
    return _classes["config"]


def _model_class() -> Any:
    """The model class, built on first use (it imports torch and transformers' modeling_utils)."""
    if "model" in _classes:
        return _classes["model"]
    import torch
    from torch import nn
    from transformers.modeling_utils import PreTrainedModel

    from llada_trm.model.llada import LLaDAModel, init_module

    LLaDAHFConfig = _config_class()

    class LLaDAModelLM(PreTrainedModel):
        """The backbone for `AutoModel`: `forward(input_ids, attention_mask=None, ...)` is `LLaDAModel`'s,
        returning its `BackboneOutput` (`.logits` [B, L, vocab], `.hidden_states`)."""

        config_class = LLaDAHFConfig
        base_model_prefix = "llada"  # no such attribute: the weight files' keys are the model's own
        supports_gradient_checkpointing = False
        _no_split_modules = ["LLaDABlock"]

        def __init__(self, config: LLaDAHFConfig):
            super().__init__(config)
            net = LLaDAModel(config.llada_config())
            self.model = net.model  # `model.transformer.*`: LLaDA's key names, as stored
            self.embedding_dropout = net.embedding_dropout
            object.__setattr__(self, "_net", net)  # runs the forward on those same modules; not a child
            self.post_init()

        def _init_weights(self, module: nn.Module) -> None:
            init_module(module, self.config.init_std if hasattr(self.config, "init_std") else 0.02)

        def train(self, mode: bool = True) -> LLaDAModelLM:
            super().train(mode)
            self._net.training = mode
            return self

        def get_input_embeddings(self) -> nn.Module:
            return self.model.transformer.wte

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any):
            return self._net(input_ids, attention_mask=attention_mask, **kwargs)

    _classes["model"] = LLaDAModelLM
    return LLaDAModelLM


def register_config(module: ModuleType | None = None) -> None:
    """`AutoConfig` reads `model_type: llada` (`module`: transformers' configuration_auto, just loaded)."""
    auto = module if module is not None else importlib.import_module(_CONFIG_MODULE)
    auto.AutoConfig.register(MODEL_TYPE, _config_class(), exist_ok=True)


def register_model(module: ModuleType | None = None) -> None:
    """`AutoModel` builds `LLaDAModelLM` for a `llada` config (`module`: transformers' modeling_auto)."""
    register_config()
    auto = module if module is not None else importlib.import_module(_MODEL_MODULE)
    auto.AutoModel.register(_config_class(), _model_class(), exist_ok=True)


def _safely(hook: Callable[[ModuleType | None], None]) -> Callable[[ModuleType | None], None]:
    """A failed registration (an unforeseen transformers version) warns; it never breaks an import."""

    def run(module: ModuleType | None = None) -> None:
        try:
            hook(module)
        except Exception as exc:  # noqa: BLE001 - any failure here must leave transformers usable
            warnings.warn(f"llada_trm: could not register model type {MODEL_TYPE!r} with transformers: {exc}",
                          stacklevel=2)  # fmt: skip

    return run


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs a hook right after one of the named modules has executed (the first time it is imported)."""

    def __init__(self, hooks: dict[str, Callable[[ModuleType | None], None]]):
        self.hooks = hooks

    def find_spec(
        self, fullname: str, path: Any, target: Any = None
    ) -> importlib.machinery.ModuleSpec | None:
        hook = self.hooks.pop(fullname, None)
        if hook is None:
            return None
        if not self.hooks and self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = None
        for finder in sys.meta_path:
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        execute = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            execute(module)
            hook(module)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def install() -> None:
    """Register with transformers now if its auto modules are loaded, else as soon as they are."""
    pending = {_CONFIG_MODULE: _safely(register_config), _MODEL_MODULE: _safely(register_model)}
    if _MODEL_MODULE in sys.modules:
        pending.pop(_MODEL_MODULE)(None)
        pending.pop(_CONFIG_MODULE)
    elif _CONFIG_MODULE in sys.modules:
        pending.pop(_CONFIG_MODULE)(None)
    if pending and not any(isinstance(finder, _AfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(pending))
