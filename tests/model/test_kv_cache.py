"""Block-wise KV caches: the backbone's cached forward, the sampler's cache modes, the hybrid with a cache.

``tests/fixtures/fast_dllm_cache_reference.json`` holds tokens and NFE of NVlabs/Fast-dLLM's
``generate_with_prefix_cache`` / ``generate_with_dual_cache`` (with its own modeling code) on the
``llada_ref`` checkpoints; see ``tests/fixtures/make_cache_reference.py`` for how they were made.

A one-layer backbone makes the cache exact: its keys and values depend only on each token and its position,
so cached sampling must give the uncached tokens there. With more layers the cache is an approximation.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from tiny_assets import FIXTURES
from torch import Tensor, nn

from llada_trm.diffusion.sampler import generate, generate_with_stats
from llada_trm.model.hybrid import LLaDATRMHybrid
from llada_trm.model.hybrid_config import HybridConfig
from llada_trm.model.llada import KVCache, LLaDAModel, rotary_tables
from llada_trm.model.llada_config import LLaDAConfig

REFERENCE = FIXTURES / "fast_dllm_cache_reference.json"
VOCAB, MASK, PAD = 50, 49, 48


def backbone(seed: int = 0, n_layers: int = 2, n_kv_heads: int | None = None) -> LLaDAModel:
    torch.manual_seed(seed)
    config = LLaDAConfig(
        d_model=32, n_heads=4, n_kv_heads=n_kv_heads, n_layers=n_layers, vocab_size=VOCAB, mlp_hidden_size=64,
        max_sequence_length=64, mask_token_id=MASK, eos_token_id=PAD, pad_token_id=PAD,
    )
    return LLaDAModel(config).eval()


def left_padded_batch(length: int = 20, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Two rows: row 1 has three padding tokens in front; masks from position 12 on."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, PAD, (2, length), generator=g)
    ids[:, 12:] = MASK
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :3] = 0
    ids[attention_mask == 0] = PAD
    return ids, attention_mask


# ---------------------------------------------------------------------------------------------- backbone


def test_rotary_tables_of_a_window_equal_the_full_tables_rows():
    sin, cos = rotary_tables(24, 8, 500000.0, torch.device("cpu"))
    sin_w, cos_w = rotary_tables(10, 8, 500000.0, torch.device("cpu"), offset=9)
    assert torch.equal(sin_w, sin[9:19]) and torch.equal(cos_w, cos[9:19])


@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_prefix_cache_forward_equals_full_forward_on_the_suffix(n_kv_heads):
    model = backbone(n_kv_heads=n_kv_heads)
    ids, attention_mask = left_padded_batch()
    with torch.no_grad():
        full = model(ids, attention_mask=attention_mask, context_layers=[0, -1], use_cache=True)
        prefix = 7
        cache = full.past_key_values.truncate(prefix)
        assert cache.length == prefix and cache.num_layers == 2
        part = model(
            ids[:, prefix:], attention_mask=attention_mask[:, prefix:], context_layers=[0, -1],
            past_key_values=cache, use_cache=True,
        )
    torch.testing.assert_close(part.logits, full.logits[:, prefix:], atol=1e-5, rtol=0)
    torch.testing.assert_close(part.hidden_states, full.hidden_states[:, prefix:], atol=1e-5, rtol=0)
    for layer in (0, -1):
        expected = full.attention_contexts[layer][:, prefix:]
        torch.testing.assert_close(part.attention_contexts[layer], expected, atol=1e-5, rtol=0)
    # The returned cache covers every attended position and matches the full forward's.
    assert part.past_key_values.length == ids.shape[1]
    torch.testing.assert_close(part.past_key_values.keys[1], full.past_key_values.keys[1], atol=1e-5, rtol=0)
    assert torch.equal(part.past_key_values.attention_mask, attention_mask)


def test_dual_cache_window_equals_full_forward_on_the_window():
    model = backbone()
    ids, attention_mask = left_padded_batch()
    with torch.no_grad():
        full = model(ids, attention_mask=attention_mask, use_cache=True)
        window = model(
            ids[:, 8:12], attention_mask=attention_mask[:, 8:12], past_key_values=full.past_key_values,
            cache_position=8,
        )
    torch.testing.assert_close(window.logits, full.logits[:, 8:12], atol=1e-5, rtol=0)
    assert window.past_key_values is None  # not asked for


def test_cached_padding_is_never_attended():
    """Garbage written into the cached keys/values of padded positions must not reach any output."""
    model = backbone()
    ids, attention_mask = left_padded_batch()
    with torch.no_grad():
        full = model(ids, attention_mask=attention_mask, use_cache=True)
        cache = full.past_key_values.truncate(10)
        keys = [k.clone() for k in cache.keys]
        values = [v.clone() for v in cache.values]
        for k, v in zip(keys, values, strict=True):
            k[1, :, :3] = 1e4
            v[1, :, :3] = -1e4
        corrupted = KVCache(keys, values, cache.attention_mask)
        part = model(ids[:, 10:], past_key_values=corrupted)  # the suffix mask may be omitted: all real
    torch.testing.assert_close(part.logits, full.logits[:, 10:], atol=1e-5, rtol=0)


def test_one_layer_cache_is_exact_for_a_changed_suffix():
    """The premise of the exactness tests below: with one layer a prefix cache never goes stale."""
    model = backbone(n_layers=1)
    ids, attention_mask = left_padded_batch()
    changed = ids.clone()
    changed[:, 12:16] = torch.tensor([3, 4, 5, 6])
    with torch.no_grad():
        cache = model(ids, attention_mask=attention_mask, use_cache=True).past_key_values.truncate(12)
        cached = model(changed[:, 12:], past_key_values=cache)
        full = model(changed, attention_mask=attention_mask)
    torch.testing.assert_close(cached.logits, full.logits[:, 12:], atol=1e-5, rtol=0)


def test_bad_cache_arguments_are_clear_errors():
    model = backbone()
    ids, _ = left_padded_batch()
    cache = model(ids, use_cache=True).past_key_values.truncate(10)
    with pytest.raises(ValueError, match="cache_position only applies"):
        model(ids, cache_position=3)
    with pytest.raises(ValueError, match="cache_position 11 must lie in 0..10"):
        model(ids[:, 11:], past_key_values=cache, cache_position=11)
    with pytest.raises(ValueError, match="batch of 2"):
        model(ids[:1, 10:], past_key_values=cache)
    with pytest.raises(ValueError, match="1 layers but the model has 2"):
        model(ids[:, 10:], past_key_values=KVCache(cache.keys[:1], cache.values[:1]))
    with pytest.raises(ValueError, match="must be a KVCache"):
        model(ids[:, 10:], past_key_values=[(cache.keys[0], cache.values[0])] * 2)
    with pytest.raises(ValueError, match="cannot truncate"):
        cache.truncate(11)


# ---------------------------------------------------------------------------------------------- sampler


def _reference_cases() -> list[dict]:
    return json.loads(REFERENCE.read_text())["cases"]


@pytest.mark.parametrize("case", _reference_cases(), ids=lambda case: case["name"])
def test_cached_sampling_matches_fast_dllm(case: dict):
    model = LLaDAModel.from_pretrained(FIXTURES / "llada_ref" / case["model"])
    torch.manual_seed(case["seed"])
    result = generate_with_stats(model, torch.tensor(case["prompt"]), cache=case["cache"], **case["kwargs"])
    assert result.tokens.tolist() == case["output"]
    assert result.nfe == case["nfe"]


def test_reference_fixture_exercises_the_options():
    cases = _reference_cases()
    assert {case["cache"] for case in cases} == {"prefix", "dual"}
    for cache in ("prefix", "dual"):
        kwargs = [case["kwargs"] for case in cases if case["cache"] == cache]
        assert any(k.get("threshold") is None for k in kwargs)
        assert any(k.get("threshold") is not None for k in kwargs)
        assert any(k["gen_length"] > k["block_length"] for k in kwargs)
    assert any(case["kwargs"].get("temperature", 0) > 0 for case in cases)
    assert any(case["kwargs"].get("remasking") == "random" for case in cases)


EXACT_OPTIONS = [
    dict(steps=8, gen_length=16, block_length=4),
    dict(steps=4, gen_length=16, block_length=8, threshold=0.9),
    dict(steps=4, gen_length=16, block_length=8, threshold=0.05),  # whole blocks at once
    dict(steps=6, gen_length=12, block_length=4, cfg_scale=1.0),
]


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("options", EXACT_OPTIONS, ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()))
def test_cache_on_an_exact_model_gives_the_uncached_tokens(cache: str, options: dict):
    model = backbone(seed=3, n_layers=1)
    prompt, prompt_mask = left_padded_batch(length=8, seed=1)
    kwargs = dict(options, mask_id=MASK)
    plain = generate_with_stats(model, prompt, prompt_mask, **kwargs)
    cached = generate_with_stats(model, prompt, prompt_mask, cache=cache, **kwargs)
    assert (plain.generated != MASK).all()  # the model never predicts the mask token here
    assert torch.equal(cached.tokens, plain.tokens)


# A hand-built model with known confidences, so that reveal order and NFE can be worked out by hand.
SMALL_VOCAB, SMALL_MASK = 100, 99


class ShiftCache:
    """Stands in for a KVCache: the sampler only truncates it and passes it back."""

    def __init__(self, length: int) -> None:
        self.length = length

    def truncate(self, length: int) -> ShiftCache:
        return ShiftCache(length)


class SharpCachedModel(nn.Module):
    """Predicts token ``10 + position``: near-certain at positions in ``sure``, weaker further left elsewhere.

    Logits depend only on absolute positions, so any cache is exact. Records every call's window.
    """

    def __init__(self, sure: set[int]) -> None:
        super().__init__()
        self.sure = sure
        self.calls: list[tuple[int, int, bool]] = []  # (start, length, built a cache)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        use_cache: bool = False,
        past_key_values: ShiftCache | None = None,
        cache_position: int | None = None,
    ) -> dict[str, Any]:
        start = 0 if past_key_values is None else cache_position
        batch, length = input_ids.shape
        self.calls.append((start, length, use_cache))
        logits = torch.zeros(batch, length, SMALL_VOCAB)
        for i in range(length):
            position = start + i
            logits[:, i, 10 + position] = 20.0 if position in self.sure else 0.1 * position
        cache = ShiftCache(start + length) if use_cache else None
        return {"logits": logits, "past_key_values": cache}


def test_prefix_cache_windows_and_nfe_by_hand():
    model = SharpCachedModel(sure={2, 3, 5, 7})
    prompt = torch.tensor([[1, 2]])
    result = generate_with_stats(
        model, prompt, steps=8, gen_length=8, block_length=4, mask_id=SMALL_MASK, threshold=0.9,
        cache="prefix",
    )
    assert result.generated[0].tolist() == [10 + p for p in range(2, 10)]
    # Block 1 (2..5): full call reveals 2, 3, 5; one cached call on 2..9 reveals 4.
    # Block 2 (6..9): full call reveals 7; cached calls on 6..9 reveal 9, 8, 6.
    assert model.calls == [
        (0, 10, True), (2, 8, False),
        (0, 10, True), (6, 4, False), (6, 4, False), (6, 4, False),
    ]
    assert result.nfe == 6


def test_dual_cache_runs_only_the_block_and_counts_the_call_after_a_full_first_step():
    model = SharpCachedModel(sure={2, 3, 4, 5})
    prompt = torch.tensor([[1, 2]])
    result = generate_with_stats(
        model, prompt, steps=8, gen_length=8, block_length=4, mask_id=SMALL_MASK, threshold=0.9, cache="dual"
    )
    assert result.generated[0].tolist() == [10 + p for p in range(2, 10)]
    # Block 1 is complete after its full call; Fast-dLLM still makes (and counts) one cached call.
    assert model.calls[:2] == [(0, 10, True), (2, 4, False)]
    assert model.calls[2:] == [(0, 10, True)] + [(6, 4, False)] * 3
    assert result.nfe == 6


def test_fixed_schedule_with_cache_stops_when_the_block_is_complete():
    model = SharpCachedModel(sure=set())
    prompt = torch.tensor([[1, 2]])
    # 4 tokens per block over 8 steps: the schedule is [1, 1, 1, 1, 0, 0, 0, 0].
    kwargs = dict(steps=16, gen_length=8, block_length=4, mask_id=SMALL_MASK)
    plain = generate_with_stats(model, prompt, **kwargs)
    cached = generate_with_stats(model, prompt, cache="prefix", **kwargs)
    assert torch.equal(cached.tokens, plain.tokens)
    assert plain.nfe == 16 and cached.nfe == 8


def test_fixed_schedule_with_one_step_per_block_makes_no_cached_call():
    model = SharpCachedModel(sure=set())
    result = generate_with_stats(
        model, torch.tensor([[1, 2]]), steps=2, gen_length=8, block_length=4, mask_id=SMALL_MASK, cache="dual"
    )
    assert (result.generated != SMALL_MASK).all()
    assert result.nfe == 2 and all(built for _, _, built in model.calls)


def test_cache_needs_a_model_that_returns_one():
    def no_cache(input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
        return torch.zeros(*input_ids.shape, SMALL_VOCAB)

    with pytest.raises(ValueError, match="returns past_key_values"):
        generate(no_cache, torch.tensor([[1]]), steps=2, gen_length=4, block_length=4, mask_id=SMALL_MASK,
                 cache="prefix")
    with pytest.raises(ValueError, match="cache must be None, 'prefix' or 'dual'"):
        generate(no_cache, torch.tensor([[1]]), steps=2, gen_length=4, block_length=4, mask_id=SMALL_MASK,
                 cache="full")


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_threshold_and_cache_on_a_deeper_backbone(cache: str):
    """With two layers the cache is approximate; the sampler must still fill every block."""
    model = backbone(seed=5, n_layers=2)
    prompt, prompt_mask = left_padded_batch(length=8, seed=2)
    result = generate_with_stats(
        model, prompt, prompt_mask, steps=4, gen_length=16, block_length=8, mask_id=MASK, threshold=0.9,
        cache=cache,
    )
    assert (result.generated != MASK).all()
    assert 2 * 2 <= result.nfe <= 2 * 9  # per block: a full call plus 1..8 cached calls


# ---------------------------------------------------------------------------------------------- hybrid


def hybrid(refiner: str, n_layers: int = 2, **kwargs: Any) -> LLaDATRMHybrid:
    config = HybridConfig(refiner=refiner, chunk_size=4, slot={"n_heads": 2, "n_blocks": 1}, **kwargs)
    model = LLaDATRMHybrid(backbone(seed=7, n_layers=n_layers), config).eval()
    torch.manual_seed(8)
    with torch.no_grad():  # make the (near-identity at init) refiner move the states visibly
        for p in model.refinement_head.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return model


def chunky_ids() -> Tensor:
    """20 positions, prefix of 6; masks at 9, 10 (absolute chunk 2) and 17 (chunk 4) only."""
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, PAD, (2, 20), generator=g)
    ids[:, [9, 10, 17]] = MASK
    return ids


def test_hybrid_cache_refines_absolute_chunks_and_leaves_the_others_untouched():
    model = hybrid("slot", confidence_threshold=2.0)  # refine every chunk that holds a masked position
    ids = chunky_ids()
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values.truncate(6)
        out = model(ids[:, 6:], past_key_values=cache)
        base = model.backbone(ids[:, 6:], past_key_values=cache)
    # Absolute chunks touched by positions 6..19: [4..7] (partial), [8..11], [12..15], [16..19].
    assert out.stats["steps_per_chunk"].shape == (2, 4)
    assert out.stats["chunks_refined"] == 4  # chunks 2 and 4 in both rows
    refined = torch.zeros(20, dtype=torch.bool)
    refined[8:12] = refined[16:20] = True
    refined = refined[6:]
    assert torch.equal(out.logits[:, ~refined], base.logits[:, ~refined])
    assert torch.equal(out.hidden_states[:, ~refined], base.hidden_states[:, ~refined])
    assert torch.equal(out.base_logits, base.logits)
    changed = (out.hidden_states - base.hidden_states).abs().amax(dim=-1) > 0
    assert changed[:, refined].all()


def test_hybrid_cached_forward_equals_full_forward_with_a_per_token_refiner():
    """The MLP refiner has no attention: with unchanged tokens only the chunking could differ, and may not."""
    model = hybrid("mlp", confidence_threshold=0.9, halting="confidence", max_recursive_steps=3)
    ids = chunky_ids()
    with torch.no_grad():
        full = model(ids, use_cache=True)
        cached = model(ids[:, 6:], past_key_values=full.past_key_values.truncate(6))
    torch.testing.assert_close(cached.logits, full.logits[:, 6:], atol=1e-5, rtol=0)
    assert torch.equal(cached.stats["steps_per_chunk"], full.stats["steps_per_chunk"][:, 1:])


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("threshold", [None, 0.9])
def test_sampling_through_the_hybrid_with_a_cache(cache: str, threshold: float | None):
    """One layer and a per-token refiner refining every masked chunk: cached sampling is exact here."""
    model = hybrid("mlp", n_layers=1, confidence_threshold=2.0, halting="none")
    prompt, prompt_mask = left_padded_batch(length=7, seed=3)
    kwargs = dict(steps=8, gen_length=16, block_length=8, mask_id=MASK, threshold=threshold)
    plain = generate_with_stats(model, prompt, prompt_mask, **kwargs)
    cached = generate_with_stats(model, prompt, prompt_mask, cache=cache, **kwargs)
    assert (plain.generated != MASK).all()
    assert torch.equal(cached.tokens, plain.tokens)
    assert cached.model_stats["chunks_refined"] > 0  # the refiner ran inside the cached steps


def test_sampling_through_the_slot_hybrid_with_a_cache_fills_the_answer():
    model = hybrid("slot", confidence_threshold=0.5, context_layers=[-1])  # contexts of the window only
    prompt, prompt_mask = left_padded_batch(length=7, seed=3)
    result = generate_with_stats(
        model, prompt, prompt_mask, steps=8, gen_length=16, block_length=8, mask_id=MASK, threshold=0.9,
        cache="prefix",
    )
    assert (result.generated != MASK).all()
    assert result.model_stats_total["chunks_total"] > 0
