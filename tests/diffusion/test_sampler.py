"""The sampler against LLaDA's reference outputs, and its schedule, ordering and options on hand-built models.

``tests/fixtures/llada_generate_reference.json`` holds token outputs of ML-GSAI/LLaDA's ``generate.py``
(commit b7e6c35) run on the ``ToyDenoiser`` below with the same prompts, options and ``torch.manual_seed``;
under ``threshold_cases``, the tokens and NFE of NVlabs/Fast-dLLM's threshold decoding (``llada/generate.py``,
commit 24cc59e). They were produced outside the repository by importing ``ToyDenoiser`` from this file and
calling the reference functions for every case; the reference code itself is not part of the project.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
import torch
from tiny_assets import FIXTURES
from torch import Tensor, nn

from llada_trm.data.tokenizer import decode_generated
from llada_trm.diffusion.options import SamplingOptions
from llada_trm.diffusion.sampler import (
    GenerationResult,
    generate,
    generate_with_stats,
    get_num_transfer_tokens,
    sample,
)

FIXTURE = FIXTURES / "llada_generate_reference.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class ToyOutput:
    logits: Tensor
    stats: dict = field(default_factory=dict)


class ToyDenoiser(nn.Module):
    """A deterministic mask predictor: seeded token and position embeddings, one bidirectional attention.

    Every logit depends on all unpadded tokens (masks included) and on the position, so the order in which
    tokens are revealed changes later predictions, as in a real model. ``bias`` adds a constant to chosen
    vocabulary columns (to make EOS/EoT likely predictions).
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int = 16,
        max_len: int = 64,
        seed: int = 0,
        logits_dtype: str = "float32",
        bias: dict[str, float] | None = None,
    ) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("tok", torch.randn(vocab_size, dim, generator=generator))
        self.register_buffer("pos", torch.randn(max_len, dim, generator=generator))
        self.register_buffer("out", torch.randn(dim, vocab_size, generator=generator))
        self.register_buffer("w_query", torch.randn(dim, dim, generator=generator))
        self.register_buffer("w_key", torch.randn(dim, dim, generator=generator))
        column_bias = torch.zeros(vocab_size)
        for token, value in (bias or {}).items():
            column_bias[int(token)] = value
        self.register_buffer("column_bias", column_bias)
        self.logits_dtype = DTYPES[logits_dtype]
        self.calls = 0

    @property
    def device(self) -> torch.device:  # the reference reads model.device
        return self.tok.device

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> ToyOutput:
        self.calls += 1
        h = self.tok[input_ids] + self.pos[: input_ids.shape[1]]
        scores = (h @ self.w_query) @ (h @ self.w_key).transpose(1, 2) / h.shape[-1]
        if attention_mask is not None:
            scores = scores.masked_fill(~attention_mask.bool()[:, None, :], -torch.inf)
        h = h + torch.softmax(scores, dim=-1) @ h
        logits = 3.0 * torch.tanh(h) @ self.out + self.column_bias
        return ToyOutput(logits=logits.to(self.logits_dtype), stats={"refine_steps": 2, "chunks_total": 4})


def _load_cases(key: str = "cases") -> list[dict]:
    return json.loads(FIXTURE.read_text())[key]


@pytest.mark.parametrize("case", _load_cases(), ids=lambda case: case["name"])
def test_matches_llada_reference(case: dict) -> None:
    model = ToyDenoiser(**case["model"])
    prompt = torch.tensor(case["prompt"])
    attention_mask = None if case["attention_mask"] is None else torch.tensor(case["attention_mask"])
    torch.manual_seed(case["seed"])
    tokens = generate(model, prompt, attention_mask, **case["kwargs"])
    assert tokens.tolist() == case["output"]
    steps = case["kwargs"]["steps"]
    assert model.calls == steps  # one (CFG-batched) forward per step, even when a block fills early


@pytest.mark.parametrize("case", _load_cases("threshold_cases"), ids=lambda case: case["name"])
def test_threshold_decoding_matches_fast_dllm(case: dict) -> None:
    torch.manual_seed(case["seed"])
    result = generate_with_stats(ToyDenoiser(**case["model"]), torch.tensor(case["prompt"]), **case["kwargs"])
    assert result.tokens.tolist() == case["output"]
    assert result.nfe == case["nfe"]


def test_fixture_exercises_the_options() -> None:
    """Guard against a fixture that silently stops covering the paths the reference check is for."""
    cases = _load_cases()
    kwargs = [case["kwargs"] for case in cases]
    assert any(k["temperature"] > 0 for k in kwargs)
    assert any(k["remasking"] == "random" for k in kwargs)
    assert any(k["cfg_scale"] > 0 for k in kwargs)
    assert any(k["gen_length"] > k["block_length"] for k in kwargs)
    assert any(k.get("logits_eos_inf") for k in kwargs)
    assert any(k.get("confidence_eos_eot_inf") for k in kwargs)
    assert any(case["attention_mask"] is not None and 0 in sum(case["attention_mask"], []) for case in cases)
    assert any(case["model"]["logits_dtype"] == "bfloat16" for case in cases)
    steps_per_block = [k["steps"] // (k["gen_length"] // k["block_length"]) for k in kwargs]
    assert any(k["block_length"] % steps for k, steps in zip(kwargs, steps_per_block, strict=True))


# ---------------------------------------------------------------------------------------------------------
# Hand-built models with known confidences.

MASK = 99
VOCAB = 100


class RankedModel(nn.Module):
    """Predicts token ``10 + position`` everywhere, with a per-position confidence given by ``strength``.

    Records the sequence it was called with, so a test can replay when each position was revealed.
    """

    def __init__(self, strength: list[float], prompt_length: int) -> None:
        super().__init__()
        self.strength = torch.tensor([0.0] * prompt_length + strength)
        self.seen: list[Tensor] = []

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        self.seen.append(input_ids.clone())
        batch, length = input_ids.shape
        logits = torch.zeros(batch, length, VOCAB)
        targets = 10 + torch.arange(length)
        logits[:, torch.arange(length), targets] = self.strength[:length]
        return logits


def _reveal_order(seen: list[Tensor], final: Tensor) -> list[list[int]]:
    """Positions revealed at each step (row 0), from the inputs of consecutive model calls."""
    states = [*seen, final]
    return [
        torch.nonzero((before[0] == MASK) & (after[0] != MASK)).flatten().tolist()
        for before, after in zip(states[:-1], states[1:], strict=True)
    ]


def test_num_transfer_tokens_spreads_the_remainder_over_the_first_steps() -> None:
    mask_index = torch.zeros(3, 12, dtype=torch.bool)
    mask_index[0, :10] = True
    mask_index[1, :7] = True
    mask_index[2, :2] = True
    schedule = get_num_transfer_tokens(mask_index, 4)
    assert schedule.tolist() == [[3, 3, 2, 2], [2, 2, 2, 1], [1, 1, 0, 0]]
    assert schedule.dtype == torch.int64


def test_most_confident_position_is_unmasked_first_within_each_block() -> None:
    prompt_length = 2
    strength = [1.0, 5.0, 3.0, 4.0, 9.0, 2.0, 8.0, 7.0]  # two blocks of four
    model = RankedModel(strength, prompt_length)
    prompt = torch.tensor([[1, 2]])
    out = generate(model, prompt, steps=8, gen_length=8, block_length=4, mask_id=MASK)

    order = _reveal_order(model.seen, out)
    # Block 1 (positions 2..5) by decreasing strength, then block 2 (6..9), though 6 is the strongest overall.
    assert order == [[3], [5], [4], [2], [6], [8], [9], [7]]
    assert out[0, prompt_length:].tolist() == [10 + p for p in range(2, 10)]


def test_no_token_past_the_current_block_is_revealed() -> None:
    torch.manual_seed(0)
    model = RankedModel([float(s) for s in torch.rand(12)], prompt_length=3)
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    out = generate(model, prompt, steps=6, gen_length=12, block_length=4, remasking="random", mask_id=MASK)
    for step, x in enumerate(model.seen):
        block = step // 2  # two steps per block
        assert (x[:, 3 + 4 * (block + 1) :] == MASK).all()  # later blocks untouched
        assert (x[:, 3 : 3 + 4 * block] != MASK).all()  # earlier blocks complete
    assert (out != MASK).all()


def test_each_step_reveals_the_scheduled_number_of_tokens() -> None:
    model = RankedModel([float(i) for i in range(10)], prompt_length=1)
    out = generate(model, torch.tensor([[1]]), steps=8, gen_length=10, block_length=5, mask_id=MASK)
    counts = [len(revealed) for revealed in _reveal_order(model.seen, out)]
    assert counts == [2, 1, 1, 1, 2, 1, 1, 1]  # 5 tokens over 4 steps per block: remainder first


def test_extra_steps_still_call_the_model_and_reveal_nothing() -> None:
    model = RankedModel([1.0, 2.0], prompt_length=1)
    result = generate_with_stats(
        model, torch.tensor([[1]]),
        steps=4, gen_length=2, block_length=2, mask_id=MASK
    )
    assert result.nfe == 4
    assert [len(r) for r in _reveal_order(model.seen, result.tokens)] == [1, 1, 0, 0]


class SharpModel(nn.Module):
    """Token ``10 + position``: probability near 1 at positions in ``sure`` and near-uniform elsewhere."""

    def __init__(self, sure: set[int]) -> None:
        super().__init__()
        self.sure = sure
        self.calls = 0

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> dict:
        self.calls += 1
        batch, length = input_ids.shape
        logits = torch.zeros(batch, length, VOCAB)
        for position in range(length):
            logits[:, position, 10 + position] = 20.0 if position in self.sure else 0.1 * position
        stats = {"refine_steps": torch.tensor(3), "chunks_skipped": 1, "note": "not a number"}
        return {"logits": logits, "stats": stats}


def test_threshold_decoding_reveals_all_confident_tokens_at_once() -> None:
    model = SharpModel(sure={2, 3, 5, 7})
    prompt = torch.tensor([[1, 2]])
    result = generate_with_stats(
        model, prompt, steps=8, gen_length=8, block_length=4, mask_id=MASK, threshold=0.9
    )
    # Block 1 (2..5): 2, 3, 5 in one step, then 4 alone. Block 2 (6..9): 7, then 9, 8, 6 one per step.
    assert result.nfe == model.calls == 6
    assert result.generated[0].tolist() == [10 + p for p in range(2, 10)]


def test_threshold_decoding_stops_when_the_model_only_predicts_masks() -> None:
    def predicts_mask(input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        logits = torch.zeros(*input_ids.shape, VOCAB)
        logits[..., MASK] = 5.0
        return logits

    result = generate_with_stats(
        predicts_mask, torch.tensor([[1]]), steps=2, gen_length=6, block_length=3, mask_id=MASK, threshold=0.9
    )
    assert result.nfe == 6  # at most block_length steps per block
    assert (result.generated == MASK).all()


def test_threshold_none_keeps_the_fixed_schedule() -> None:
    model = SharpModel(sure={2, 3, 5, 7})
    prompt = torch.tensor([[1, 2]])
    result = generate_with_stats(model, prompt, steps=8, gen_length=8, block_length=4, mask_id=MASK)
    assert result.nfe == 8


def test_generation_result_reports_nfe_speed_and_model_stats() -> None:
    model = SharpModel(sure=set())
    result = generate_with_stats(
        model, torch.tensor([[1, 2], [3, 4]]), steps=4, gen_length=4, block_length=4, mask_id=MASK,
        cfg_scale=1.0,
    )
    assert isinstance(result, GenerationResult)
    assert result.nfe == 4 == model.calls  # CFG batches both copies into one call
    assert result.tokens.shape == (2, 6) and result.generated.shape == (2, 4)
    assert result.elapsed_s > 0 and result.tokens_per_second == pytest.approx(8 / result.elapsed_s)
    assert result.model_stats_total == {"refine_steps": 12.0, "chunks_skipped": 4.0}
    assert result.model_stats == {"refine_steps": 3.0, "chunks_skipped": 1.0}


class RefiningModel(RankedModel):
    """A RankedModel that declares the sampler's refining protocol, as the hybrid does; records what it was
    given."""

    refines_masked_positions = True

    def __init__(self, strength: list[float], prompt_length: int) -> None:
        super().__init__(strength, prompt_length)
        self.masked: list[Tensor] = []
        self.windows: list[tuple[int, Tensor]] = []

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, masked: Tensor | None = None, **cache
    ) -> Tensor:
        self.masked.append(masked)
        self.windows.append((cache.get("cache_position", 0), input_ids.clone()))
        return super().forward(input_ids, attention_mask)


@pytest.mark.parametrize(
    "options",
    [{}, {"cfg_scale": 1.0}, {"threshold": 0.9}],
    ids=["exact", "cfg", "threshold"],
)
def test_a_refining_model_is_asked_to_refine_only_the_current_blocks_masked_tokens(options) -> None:
    prompt_length, gen_length, block_length = 2, 8, 4
    model = RefiningModel([float(i) for i in range(gen_length)], prompt_length)
    prompt = torch.tensor([[1, 2], [3, 4]])
    plain = RankedModel([float(i) for i in range(gen_length)], prompt_length)
    kwargs = dict(steps=4, gen_length=gen_length, block_length=block_length, mask_id=MASK, **options)
    tokens = generate(model, prompt, **kwargs)
    # the hint changes nothing else, and a model without the keyword is called without it
    assert torch.equal(tokens, generate(plain, prompt, **kwargs))
    seen_blocks = set()
    for masked, (offset, window) in zip(model.masked, model.windows, strict=True):
        assert masked is not None and masked.shape == window.shape
        positions = offset + torch.arange(window.shape[1])
        refined = positions[masked.any(dim=0)]
        block = int((refined.min() - prompt_length) // block_length)
        seen_blocks.add(block)
        start = prompt_length + block * block_length
        assert ((refined >= start) & (refined < start + block_length)).all()
        in_block = (positions >= start) & (positions < start + block_length)
        assert torch.equal(masked, (window == MASK) & in_block)
    assert seen_blocks == {0, 1}


def test_only_a_declared_refiner_is_given_masked_positions() -> None:
    """The protocol is the declaration, not the signature; a `.module` wrapper (DDP) is looked through."""

    class Undeclared(RefiningModel):
        refines_masked_positions = False

    class Wrapper(nn.Module):
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs) -> Tensor:
            return self.module(*args, **kwargs)

    kwargs = dict(steps=2, gen_length=4, block_length=4, mask_id=MASK)
    undeclared = Undeclared([1.0] * 4, 1)
    generate(undeclared, torch.tensor([[1]]), **kwargs)
    assert undeclared.masked == [None, None]
    declared = RefiningModel([1.0] * 4, 1)
    generate(Wrapper(declared), torch.tensor([[1]]), **kwargs)
    assert all(masked is not None for masked in declared.masked)


def test_sample_with_options_equals_generate_with_stats() -> None:
    model = ToyDenoiser(vocab_size=40, seed=3, bias={"3": 30.0, "4": 25.0})  # EOS 3 and EoT 4 are likely
    prompt = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    settings = dict(
        steps=4, gen_length=8, block_length=4, cfg_scale=0.5, mask_id=39, logits_eos_inf=True,
        confidence_eos_eot_inf=True,
    )
    ids = dict(eos_id=3, eot_id=4, threshold=0.5)
    options = SamplingOptions(**settings, **ids)
    result = sample(model, prompt, None, options, generator=torch.Generator().manual_seed(5))
    reference = generate_with_stats(model, prompt, None, **settings, **ids)
    assert torch.equal(result.tokens, reference.tokens) and result.nfe == reference.nfe
    assert result.model_stats_total == reference.model_stats_total


def test_options_record_every_setting_but_the_tokenizers_ids() -> None:
    options = SamplingOptions(steps=8, gen_length=16, block_length=8, cache="dual", mask_id=7, eos_id=8)
    recorded = options.to_dict()
    assert not {"mask_id", "eos_id", "eot_id"} & set(recorded)
    assert recorded["cache"] == "dual" and recorded["steps"] == 8 and recorded["logits_eos_inf"] is False
    assert SamplingOptions(**recorded, mask_id=7, eos_id=8) == options


def test_cfg_without_attention_mask_equals_an_all_ones_mask() -> None:
    model = ToyDenoiser(vocab_size=40, seed=3)
    prompt = torch.tensor([[5, 6, 7, 8]])
    kwargs = dict(steps=4, gen_length=8, block_length=4, cfg_scale=1.5, mask_id=39)
    assert torch.equal(
        generate(model, prompt, **kwargs), generate(model, prompt, torch.ones_like(prompt), **kwargs)
    )


def test_generator_makes_sampling_reproducible_without_touching_the_global_rng() -> None:
    model = ToyDenoiser(vocab_size=40, seed=3)
    prompt = torch.tensor([[5, 6, 7, 8]])
    kwargs = dict(steps=4, gen_length=8, block_length=4, temperature=1.0, remasking="random", mask_id=39)
    state = torch.get_rng_state()
    first = generate(model, prompt, generator=torch.Generator().manual_seed(7), **kwargs)
    second = generate(model, prompt, generator=torch.Generator().manual_seed(7), **kwargs)
    assert torch.equal(first, second)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(gen_length=10, block_length=4), "multiple of block_length"),
        (dict(gen_length=8, block_length=4, steps=3), "multiple of the number of blocks"),
        (dict(remasking="top_k"), "remasking must be one of"),
        (dict(temperature=-1.0), "temperature"),
        (dict(threshold=1.5), "threshold"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs: dict, message: str) -> None:
    options = dict(steps=4, gen_length=8, block_length=8, mask_id=MASK) | kwargs
    with pytest.raises(ValueError, match=message):
        generate(RankedModel([1.0] * 10, 1), torch.tensor([[1]]), **options)


class FakeTokenizer:
    eos_token_id = 2
    unk_token_id = 0

    def convert_tokens_to_ids(self, token: str) -> int:
        return 3 if token == "<|eot_id|>" else self.unk_token_id

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return " ".join(f"t{i}" for i in ids if not (skip_special_tokens and i in (2, 3)))


def test_decode_generated_cuts_at_the_first_eos_or_eot() -> None:
    tokens = torch.tensor([[7, 7, 10, 11, 2, 12, 2], [7, 7, 13, 3, 14, 2, 2], [7, 7, 15, 16, 17, 18, 19]])
    expected = ["t10 t11", "t13", "t15 t16 t17 t18 t19"]
    assert decode_generated(FakeTokenizer(), tokens, prompt_length=2) == expected
    assert decode_generated(FakeTokenizer(), tokens, prompt_length=2, stop_ids=[11]) == [
        "t10",
        "t13 t14",
        "t15 t16 t17 t18 t19",
    ]
