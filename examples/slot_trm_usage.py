"""Seven short examples of the slot TRM refiner, on a CPU in seconds.

    python examples/slot_trm_usage.py

1 basic forward pass, 2 statistics, 3 chunk masking, 4 a custom slot configuration, 5 training only the
refiner on top of a frozen (tiny) LLaDA backbone, 6 gate inspection, 7 the orthogonality regulariser.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    import llada_trm  # noqa: F401
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from llada_trm.model.llada import LLaDAModel
from llada_trm.model.llada_config import LLaDAConfig
from llada_trm.model.refiners import build_refiner
from llada_trm.model.refiners.config import SlotConfig
from llada_trm.model.refiners.slot import SlotTRMRefiner, create_slot_trm_refiner

D_MODEL, BATCH, LENGTH = 64, 2, 16


def banner(title: str) -> None:
    print(f"\n{'=' * 72}\n{title}\n{'=' * 72}")


def example_1_basic_forward() -> None:
    banner("1. Basic forward pass")
    refiner = create_slot_trm_refiner(D_MODEL, size="base", num_steps=4)
    x = torch.randn(BATCH, LENGTH, D_MODEL)
    refined = refiner(x)
    print(f"input {tuple(x.shape)} -> refined {tuple(refined.shape)}; {refiner.num_parameters():,} params")
    print(f"untrained refiner is near the identity: max |refined - x| = {(refined - x).abs().max():.2e}")
    baseline = build_refiner("mlp", D_MODEL, num_steps=4)
    print(f"MLP baseline, same interface: {tuple(baseline(x).shape)}, {baseline.num_parameters():,} params")


def example_2_statistics() -> None:
    banner("2. Statistics tracking")
    refiner = SlotTRMRefiner(d_model=D_MODEL, num_steps=6)
    refined, stats = refiner(torch.randn(BATCH, LENGTH, D_MODEL), return_stats=True)
    print(f"steps run:            {stats['steps']}")
    print(f"mean confidence:      {stats['confidence']:.4f}")
    print(f"delta norm per step:  {[round(v, 6) for v in stats['delta_norms']]}")
    final = stats["final_confidence"]
    print(f"final confidence:     shape {tuple(final.shape)}, range [{final.min():.3f}, {final.max():.3f}]")
    print(f"slot norms:           { {k: round(v, 3) for k, v in stats['slot_norms'].items()} }")
    print(f"gates:                {stats['gates']}")


def example_3_chunk_masking() -> None:
    banner("3. Selective refinement with a chunk mask")
    refiner = SlotTRMRefiner(d_model=D_MODEL, num_steps=4)
    x = torch.randn(BATCH, LENGTH, D_MODEL)
    chunk_mask = torch.zeros(BATCH, LENGTH, dtype=torch.bool)
    chunk_mask[:, LENGTH // 2 :] = True  # refine only the second half (e.g. the low-confidence chunks)
    refined = refiner(x, chunk_mask=chunk_mask)
    print(f"positions refined: {int(chunk_mask.sum())} of {chunk_mask.numel()}")
    print(f"first half bit-identical to the input: {torch.equal(refined[~chunk_mask], x[~chunk_mask])}")
    print(f"second half max change: {(refined[chunk_mask] - x[chunk_mask]).abs().max():.2e}")


def example_4_custom_config() -> None:
    banner("4. Custom slot configuration")
    config = SlotConfig(
        d_model=D_MODEL, d_ctx=24, d_reason=16, d_refine=16, d_conf=8, n_heads=8, n_blocks=3, num_steps=5,
        delta_scale=0.15, context_dim=96,
    )
    refiner = SlotTRMRefiner(config)
    print(f"slot widths: {config.slot_dims} (sum {config.slot_total}), d_inner {config.d_inner}")
    print(f"{config.n_blocks} refiner blocks, K={config.num_steps}, {refiner.num_parameters():,} parameters")
    x, backbone_context = torch.randn(1, LENGTH, D_MODEL), torch.randn(1, LENGTH, 96)
    refined = refiner(x, context=backbone_context)
    print(f"with a 96-wide backbone context (learned projection to {config.d_inner}): {tuple(refined.shape)}")


def example_5_frozen_backbone() -> SlotTRMRefiner:
    banner("5. Frozen backbone, training only the refiner")
    vocab, mask_id = 100, 99
    # An untrained tiny LLaDA stands in for a pretrained one; init_std=0.2 gives its LM head logits on a
    # trained model's scale, and delta_scale=0.5 lets the refiner move h far enough to matter in 30 steps.
    config = LLaDAConfig(
        d_model=D_MODEL, n_heads=4, n_layers=2, vocab_size=vocab, max_sequence_length=LENGTH,
        mask_token_id=mask_id, init_std=0.2,
    )
    backbone = LLaDAModel(config)
    backbone.requires_grad_(False).eval()
    refiner = SlotTRMRefiner(d_model=D_MODEL, num_steps=3, context_dim=D_MODEL, delta_scale=0.5)
    frozen = {k: v.clone() for k, v in backbone.state_dict().items()}
    total = sum(p.numel() for p in backbone.parameters()) + refiner.num_parameters()
    print(f"trainable {refiner.num_parameters(trainable_only=True):,} of {total:,} parameters "
          f"({100 * refiner.num_parameters(trainable_only=True) / total:.1f}%)")

    tokens = torch.randint(0, mask_id, (4, LENGTH))
    masked = torch.rand(tokens.shape) < 0.3
    noisy = torch.where(masked, torch.full_like(tokens, mask_id), tokens)
    with torch.no_grad():  # the frozen backbone's features are fixed: compute them once
        out = backbone(noisy, context_layers=(-1,))
    h, context = out.hidden_states, out.attention_contexts[-1]

    optimizer = torch.optim.AdamW(refiner.parameters(), lr=3e-3)
    for step in range(30):
        refined = refiner(h, context=context)
        logits = backbone.lm_head(refined)
        loss = F.cross_entropy(logits[masked], tokens[masked]) + 0.01 * refiner.orthogonality_loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 0 or step == 29:
            print(f"  step {step:2d}: masked-token loss {loss.item():.4f}")
    unchanged = all(torch.equal(v, frozen[k]) for k, v in backbone.state_dict().items())
    print(f"backbone weights unchanged: {unchanged}; backbone grads: "
          f"{set(p.grad for p in backbone.parameters())}")
    return refiner


def example_6_gates(trained: SlotTRMRefiner) -> None:
    banner("6. Gate inspection")
    print("gates start half open (sigmoid(0) = 0.5); after example 5's training:")
    for name, value in trained.gate_values().items():
        raw = trained.slot_proj.gates[name].item()
        print(f"  gate_{name:7s} raw {raw:+.4f} -> sigmoid {value:.4f}")
    print(f"flat statistics for logging: { {k: round(v, 4) for k, v in trained.slot_statistics().items()} }")


def example_7_orthogonality() -> None:
    banner("7. Slot projection orthogonality")
    refiner = SlotTRMRefiner(d_model=D_MODEL)
    weights = refiner.slot_proj.projection_weights()
    print("projection weights:", {k: tuple(w.shape) for k, w in weights.items()})
    print(f"overlap at init (0 = orthogonal reads, 1 = identical): {refiner.orthogonality_loss().item():.4f}")
    optimizer = torch.optim.Adam(refiner.slot_proj.parameters(), lr=1e-2)
    for _ in range(50):
        loss = refiner.orthogonality_loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"after 50 steps on the regulariser alone:              {refiner.orthogonality_loss().item():.4f}")


def main() -> None:
    torch.set_num_threads(1)  # tensors this small run faster on one thread than on contended cores
    torch.manual_seed(42)
    example_1_basic_forward()
    example_2_statistics()
    example_3_chunk_masking()
    example_4_custom_config()
    trained = example_5_frozen_backbone()
    example_6_gates(trained)
    example_7_orthogonality()
    print("\nAll seven examples ran.")


if __name__ == "__main__":
    main()
