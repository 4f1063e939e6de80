"""bench/call_timer.py: the per-call split of sampling time adds up and puts each part where it belongs."""

from __future__ import annotations

import sys

import torch
from tiny_assets import REPO

sys.path.insert(0, str(REPO / "bench"))

from call_timer import CallSplit, CallTimer  # noqa: E402

from llada_trm.diffusion.options import SamplingOptions
from llada_trm.model.hybrid import LLaDATRMHybrid
from llada_trm.model.hybrid_config import HybridConfig
from llada_trm.model.llada import LLaDAModel
from llada_trm.model.llada_config import LLaDAConfig

MASK = 49


def test_split_adds_up_and_names_the_backbone_the_wrapper_and_the_sampler():
    torch.manual_seed(0)
    backbone = LLaDAModel(LLaDAConfig(d_model=32, n_heads=2, n_layers=2, vocab_size=50, mlp_hidden_size=64,
                                      max_sequence_length=64, mask_token_id=MASK)).eval()
    config = HybridConfig(refiner="mlp", chunk_size=4, confidence_threshold=2.0)
    hybrid = LLaDATRMHybrid(backbone, config).eval()
    timer = CallTimer(backbone, [hybrid], clock="cpu")
    options = SamplingOptions(gen_length=8, block_length=8, steps=4, mask_id=MASK)
    prompt = torch.randint(0, MASK - 1, (2, 5), generator=torch.Generator().manual_seed(0))

    result, alone = timer.sample(backbone, prompt, None, options)
    assert alone.model_s == 0.0 and alone.refine_s == 0.0 and 0 < alone.backbone_s < alone.elapsed_s
    ms = alone.per_call_ms(result.nfe)
    assert ms["wrapper"] == 0.0 and ms["refiner"] == 0.0
    assert abs(ms["backbone"] + ms["sampler"] - ms["total"]) < 1e-9

    result, refined = timer.sample(hybrid, prompt, None, options)
    assert result.model_stats["chunks_refined"] > 0  # the refiner ran inside the timed calls
    assert 0 < refined.backbone_s < refined.model_s < refined.elapsed_s
    assert 0 < refined.refine_s < refined.model_s
    ms = refined.per_call_ms(result.nfe)
    parts = ms["backbone"] + ms["refiner"] + ms["wrapper"] + ms["sampler"]
    assert abs(parts - ms["total"]) < 1e-9 and ms["total"] == 1e3 * refined.elapsed_s / result.nfe

    total = CallSplit()
    total.add(alone)
    total.add(refined)
    assert total.elapsed_s == alone.elapsed_s + refined.elapsed_s
