"""bench/floors.py: the FLOP formulas against a hand count and against FlopCounterMode on the real modules."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from tiny_assets import REPO
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(REPO / "bench"))

import floors  # noqa: E402

from llada_trm.model.llada import LLaDAModel
from llada_trm.model.llada_config import LLaDAConfig  # noqa: E402
from llada_trm.model.refiners.config import MLPRefinerConfig, SlotConfig  # noqa: E402
from llada_trm.model.refiners.mlp import RecursiveRefinementHead
from llada_trm.model.refiners.slot import SlotTRMRefiner

BACKBONE = LLaDAConfig(d_model=16, n_heads=2, n_layers=2, vocab_size=40, mlp_hidden_size=24)
SLOT = SlotConfig(d_model=16, d_inner=8, n_heads=2, n_blocks=1, mlp_ratio=2.0, context_dim=16)


def counted(fn) -> int:
    """FlopCounterMode's count, attention through the math kernel (whose products it sees on every device;
    CPU's fused kernel is not registered with it)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_hand_count_on_a_tiny_config() -> None:
    # Backbone, per layer with S = 5 keys: q,k,v,o 4*2*16*16 = 2048; scores + attn@V 4*5*16 = 320;
    # SwiGLU 3*2*16*24 = 2304 -> 4672 per layer, 2 layers 9344, LM head 2*16*40 = 1280.
    assert floors.backbone_token_flops(BACKBONE, keys=5, with_lm_head=False) == 9344
    assert floors.backbone_token_flops(BACKBONE, keys=5) == 9344 + 1280
    assert floors.lm_head_row_flops(BACKBONE) == 1280
    # Slot refiner (D 16, di 8, slots 4/2/2/1, block MLP 16, context 16), S = 5 keys:
    # in_proj 256 + context_proj 256 + block (4*128 + 4*5*8 + 256 + 256 = 1184)
    # + slots (64 + 16 + 16 + 32 [W_refine]) + delta_net (2*9*8 + 2*8*16 = 400) + confidence head (0 + 0)
    # confidence head: c_conf 1 -> hidden max(1, 0) = 1 -> 1: 2*1*1 + 2*1*1 = 4
    assert SLOT.slot_dims == {"ctx": 4, "reason": 2, "refine": 2, "conf": 1}
    later = 256 + 256 + 1184 + (64 + 16 + 16 + 32) + 400 + 4
    assert floors.slot_row_flops(SLOT, keys=5) == later
    assert floors.slot_row_flops(SLOT, keys=5, first_step=True) == later - 32
    assert floors.slot_row_flops(SLOT, keys=5, with_context=False) == later - 256
    mlp = MLPRefinerConfig(d_model=16, hidden_dim=24)
    assert floors.mlp_row_flops(mlp) == 2 * 16 * 24 * 2 + 2 * 16


def test_backbone_formula_matches_flop_counter() -> None:
    torch.manual_seed(0)
    model = LLaDAModel(BACKBONE).eval()
    ids = torch.randint(0, BACKBONE.vocab_size, (3, 7))
    expected = 3 * 7 * floors.backbone_token_flops(BACKBONE, keys=7)
    assert counted(lambda: model(ids)) == expected
    no_head = 3 * 7 * floors.backbone_token_flops(BACKBONE, keys=7, with_lm_head=False)
    assert counted(lambda: model(ids, output_logits=False)) == no_head


@pytest.mark.parametrize("n_blocks", [1, 2])
def test_slot_formula_matches_flop_counter(n_blocks: int) -> None:
    torch.manual_seed(0)
    config = SLOT.model_copy(update={"n_blocks": n_blocks})
    refiner = SlotTRMRefiner(config).eval()
    h = torch.randn(2, 6, 16)
    context = torch.randn(2, 6, 16)
    with torch.no_grad():
        state = refiner.init_state(h)
        first = counted(lambda: refiner.step(h, state, context=context))
        h1, state1, _ = refiner.step(h, state, context=context)
        later = counted(lambda: refiner.step(h1, state1, context=context))
    rows = 2 * 6  # every row refined: the floor is the whole computation
    assert first == rows * floors.slot_row_flops(config, keys=6, first_step=True)
    assert later == rows * floors.slot_row_flops(config, keys=6)


def test_mlp_formula_matches_flop_counter() -> None:
    refiner = RecursiveRefinementHead(MLPRefinerConfig(d_model=16, hidden_dim=24)).eval()
    h = torch.randn(2, 5, 16)
    with torch.no_grad():
        flops = counted(lambda: refiner.step(h, refiner.init_state(h)))
    assert flops == 2 * 5 * floors.mlp_row_flops(refiner.config)


def test_ratio_and_extrapolation() -> None:
    assert floors.Floor(flops=30.0, reference_flops=120.0).fraction == 0.25
    assert math.isnan(floors.Floor(flops=1.0, reference_flops=0.0).fraction)
    assert floors.measured_over_floor(0.3, 0.25) == pytest.approx(1.2)
    assert math.isnan(floors.measured_over_floor(0.3, 0.0))
    # 2 layers cost 20 together (10 each) plus a fixed 5: 32 layers cost 5 + 320.
    extrapolated = floors.extrapolate_layers(fixed=5.0, per_layer_total=20.0, measured_layers=2)
    assert extrapolated.value == 325.0
    assert extrapolated.label == "extrapolated from 2 to 32 layers"
    with pytest.raises(ValueError, match="positive"):
        floors.extrapolate_layers(1.0, 1.0, measured_layers=0)


def test_attended_keys_of_cached_windows() -> None:
    from flop_meter import attended_keys

    class Cache:
        length = 40

    assert attended_keys(12, None, None) == 12  # no cache: its own keys
    assert attended_keys(8, Cache(), None) == 48  # prefix cache: the cached keys, then its own
    assert attended_keys(8, Cache(), 16) == 40  # dual cache: a window inside the cached sequence


def test_weight_read_floor_counts_the_bytes_each_call_reads() -> None:
    model = LLaDAModel(BACKBONE).to(torch.bfloat16)
    matrices = sum(p.numel() for name, p in model.named_parameters() if p.dim() == 2 and "wte" not in name
                   and "embed" not in name)  # fmt: skip
    assert floors.backbone_weight_bytes(BACKBONE, 2) == 2 * matrices  # projections + LM head, bf16
    assert floors.lm_head_weight_bytes(BACKBONE, 2) == 2 * 16 * BACKBONE.effective_embedding_size
    assert floors.weight_bytes(model) == 2 * sum(p.numel() for p in model.parameters())
    eight_b = LLaDAConfig.llada_8b()
    assert floors.lm_head_weight_bytes(eight_b, 2) / 1e9 == pytest.approx(1.036, abs=1e-3)  # 4096 x 126464


def test_flop_meter_counts_calls_and_the_bytes_each_refiner_step_reads() -> None:
    from flop_meter import FlopMeter

    from llada_trm.model.hybrid import LLaDATRMHybrid
    from llada_trm.model.hybrid_config import HybridConfig

    torch.manual_seed(0)
    config = LLaDAConfig(d_model=16, n_heads=2, n_layers=2, vocab_size=40, mlp_hidden_size=24,
                         mask_token_id=39)
    model = LLaDATRMHybrid(LLaDAModel(config), HybridConfig(
        refiner="slot", max_recursive_steps=2, chunk_size=4, confidence_threshold=2.0, halting="none",
        slot={"n_heads": 2, "n_blocks": 1})).eval()  # fmt: skip
    meter = FlopMeter(model)
    ids = torch.randint(0, 38, (1, 8))
    ids[:, 4:] = 39  # the second chunk is masked and refined (threshold 2.0: always)
    with torch.no_grad():
        model(ids)
    count = meter.reset()
    assert (count.backbone_calls, count.refiner_calls, count.lm_head_calls) == (1, 2, 1)
    assert count.lm_head_rows == 4  # confidence selection: the refined chunk's masked rows, read again
    assert count.refiner_read_bytes == 2 * floors.weight_bytes(model.refinement_head["slot"]) > 0
    assert count.backbone == 8 * floors.backbone_token_flops(config, keys=8)  # its logits pass included

    model.config.chunk_selection = "all"  # the recipe: the output pass is the call's only LM-head read
    with torch.no_grad():
        model(ids)
    count = meter.reset()
    calls = (count.backbone_calls, count.refiner_calls, count.lm_head_calls, count.lm_head_rows)
    assert calls == (1, 2, 0, 0)
    assert count.backbone == 8 * floors.backbone_token_flops(config, keys=8)
