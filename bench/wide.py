"""A randomly initialised backbone of LLaDA-8B's width, for the benchmarks (no weights to download).

d_model 4096, 32 heads, SwiGLU 12288 and rope_theta as LLaDA-8B, only `layers` layers; the vocabulary is
LLaDA-8B's (126464) or, with `small`, that model's tokenizer ids and vocabulary (so its tokenizer applies).
Costs that grow with depth are extrapolated to 32 layers with `floors.extrapolate_layers`, labelled so.
"""

from __future__ import annotations

import torch

from llada_trm.model.llada import LLaDAModel
from llada_trm.model.llada_config import LLaDAConfig


def llada_8b_width(layers: int, small: LLaDAConfig | None = None) -> LLaDAConfig:
    """LLaDA-8B's config with `layers` layers; with `small`, that model's vocabulary and special ids."""
    reference = LLaDAConfig.llada_8b()
    base = reference.to_dict() if small is None else small.to_dict()
    width = {k: getattr(reference, k) for k in ("d_model", "n_heads", "n_kv_heads", "mlp_hidden_size",
                                                "rope_theta")}
    return LLaDAConfig.from_dict({**base, **width, "n_layers": layers})


def random_backbone(config: LLaDAConfig, dtype: torch.dtype = torch.float32, seed: int = 0) -> LLaDAModel:
    """The backbone with LLaDA's initialisation, in eval mode, built directly in `dtype`."""
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # no fp32 copy of 1.5 B parameters on the way to bf16
    try:
        model = LLaDAModel(config)
        model.reset_parameters()
    finally:
        torch.set_default_dtype(previous)
    return model.eval()
