"""The LLaDA backbone: config, key names, reference equivalence, padding, contexts, grouped KV heads."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_assets import FIXTURES

from llada_trm.errors import ConfigError
from llada_trm.model.llada import BackboneOutput, LLaDAModel
from llada_trm.model.llada_config import LLaDAConfig

LLADA_REF = FIXTURES / "llada_ref"
LLADA_8B_PARAMETERS = 8_015_581_184  # total_size / 2 in LLaDA-8B-Instruct's bf16 model.safetensors.index.json


def tiny_config(**overrides) -> LLaDAConfig:
    fields = dict(d_model=32, n_heads=4, n_kv_heads=4, n_layers=2, mlp_hidden_size=48, vocab_size=50,
                  embedding_size=64, rope_theta=10000.0, max_sequence_length=64)
    return LLaDAConfig(**{**fields, **overrides})


def tiny_model(seed: int = 0, **overrides) -> LLaDAModel:
    torch.manual_seed(seed)
    model = LLaDAModel(tiny_config(**overrides)).eval()
    with torch.no_grad():  # move norm gains off 1 so that they are exercised
        for name, p in model.named_parameters():
            if "norm" in name or "ln_f" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


# ---------------------------------------------------------------- config
def test_llada_8b_preset():
    c = LLaDAConfig.llada_8b()
    assert (c.d_model, c.n_heads, c.n_kv_heads, c.n_layers, c.mlp_hidden_size) == (4096, 32, 32, 32, 12288)
    assert (c.vocab_size, c.embedding_size, c.rope_theta) == (126464, 126464, 500000.0)
    assert c.max_sequence_length == 4096
    assert (c.rms_norm_eps, c.weight_tying, c.include_bias) == (1e-5, False, False)
    assert (c.mask_token_id, c.eos_token_id, c.pad_token_id) == (126336, 126081, 126081)
    assert c.head_dim == 128


def test_config_dict_and_json_round_trip(tmp_path):
    c = tiny_config(n_kv_heads=2, weight_tying=True)
    assert LLaDAConfig.from_dict(c.to_dict()) == c
    c.save(tmp_path / "config.json")
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["architectures"] == ["LLaDAModelLM"] and data["model_type"] == "llada"
    assert LLaDAConfig.from_json_file(tmp_path / "config.json") == c


def test_config_reads_llada_json_and_ignores_unknown_fields():
    c = LLaDAConfig.from_json_file(LLADA_REF / "mha_untied" / "config.json")  # has init_fn, precision, ...
    assert (c.d_model, c.n_heads, c.n_layers, c.vocab_size, c.embedding_size) == (32, 4, 2, 60, 64)
    assert LLaDAConfig.from_dict({**tiny_config().to_dict(), "some_future_field": 1}) == tiny_config()


def test_config_missing_field_names_field_and_file(tmp_path):
    data = tiny_config().to_dict()
    del data["n_heads"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"config\.json.*n_heads"):
        LLaDAConfig.from_json_file(path)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(block_type="sequential"), "block_type"),
        (dict(activation_type="swiglu"), "activation_type"),
        (dict(layer_norm_type="default"), "layer_norm_type"),
        (dict(alibi=True), "alibi"),
        (dict(d_model=30), "divisible"),
        (dict(n_kv_heads=3), "n_kv_heads"),
        (dict(embedding_size=40), "embedding_size"),
        (dict(n_layers="2"), "n_layers"),
    ],
)
def test_config_rejects_unsupported_values(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(**overrides)


# ---------------------------------------------------------------- structure
def test_state_dict_keys_and_shapes_are_llada_s():
    model = LLaDAModel(tiny_config(n_kv_heads=2))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    d, kv, hidden, rows = 32, 2 * 8, 48, 64
    expected = {"model.transformer.wte.weight": (rows, d), "model.transformer.ln_f.weight": (d,),
                "model.transformer.ff_out.weight": (rows, d)}
    for i in range(2):
        p = f"model.transformer.blocks.{i}."
        expected.update({
            p + "attn_norm.weight": (d,), p + "ff_norm.weight": (d,), p + "q_proj.weight": (d, d),
            p + "k_proj.weight": (kv, d), p + "v_proj.weight": (kv, d), p + "attn_out.weight": (d, d),
            p + "ff_proj.weight": (hidden, d), p + "up_proj.weight": (hidden, d),
            p + "ff_out.weight": (d, hidden),
        })
    assert shapes == expected
    tied = LLaDAModel(tiny_config(weight_tying=True)).state_dict()
    assert "model.transformer.ff_out.weight" not in tied
    assert model.blocks is model.model.transformer.blocks and len(model.blocks) == 2


def test_llada_8b_builds_on_meta_with_8b_parameters():
    with torch.device("meta"):
        model = LLaDAModel(LLaDAConfig.llada_8b())
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 8.0e9) / 8.0e9 < 0.005
    assert n == LLADA_8B_PARAMETERS
    assert all(p.is_meta for p in model.parameters())
    assert len(model.blocks) == 32


# ---------------------------------------------------------------- reference
@pytest.mark.parametrize("case", ["mha_untied", "gqa_tied_bias"])
@pytest.mark.parametrize("tag", ["nomask", "mask"])
def test_matches_reference_llada_outputs(case, tag):
    """Outputs of LLaDA's public modeling code on the same weights (see tests/fixtures/README.md)."""
    model = LLaDAModel.from_pretrained(LLADA_REF / case)
    ref = load_file(str(LLADA_REF / case / "reference_outputs.safetensors"))
    mask = ref["attention_mask"] if tag == "mask" else None
    n = model.config.n_layers
    with torch.no_grad():
        out = model(ref["input_ids"], attention_mask=mask, context_layers=range(n))
    # fp32 kernels differ in summation order between CPUs: 1e-5 absolute plus 1e-4 relative (a wrong
    # formula moves these by 1e-2 or more).
    tol = {"atol": 1e-5, "rtol": 1e-4}
    torch.testing.assert_close(out.logits, ref[f"{tag}.logits"], **tol)
    torch.testing.assert_close(out.hidden_states, ref[f"{tag}.hidden_states"], **tol)
    for i in range(n):
        torch.testing.assert_close(out.attention_contexts[i], ref[f"{tag}.context.{i}"], **tol)


# ---------------------------------------------------------------- forward
def test_output_shapes_and_lm_head():
    model = tiny_model()
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        out = model(ids)
        no_logits = model(ids, output_logits=False)
    assert isinstance(out, BackboneOutput)
    assert out.logits.shape == (2, 7, 64) and out.hidden_states.shape == (2, 7, 32)
    assert out.attention_contexts == {}
    assert no_logits.logits is None
    torch.testing.assert_close(model.lm_head(no_logits.hidden_states), out.logits, atol=0, rtol=0)


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_padded_batch_equals_unpadded_sequences(n_kv_heads):
    model = tiny_model(n_kv_heads=n_kv_heads)
    torch.manual_seed(1)
    a, b = torch.randint(0, 50, (10,)), torch.randint(0, 50, (6,))
    pad = 7
    ids = torch.stack([a, torch.cat([b, torch.full((4,), pad)]), torch.cat([torch.full((4,), pad), b])])
    mask = torch.tensor([[1] * 10, [1] * 6 + [0] * 4, [0] * 4 + [1] * 6])
    with torch.no_grad():
        padded = model(ids, attention_mask=mask, context_layers=(0, -1))
        alone = [model(s[None], context_layers=(0, -1)) for s in (a, b, b)]
    for row, single in enumerate(alone):
        real = mask[row].bool()
        torch.testing.assert_close(padded.logits[row, real], single.logits[0], atol=1e-5, rtol=0)
        hidden = padded.hidden_states[row, real]
        torch.testing.assert_close(hidden, single.hidden_states[0], atol=1e-5, rtol=0)
        for layer in (0, -1):
            ctx = padded.attention_contexts[layer][row, real]
            torch.testing.assert_close(ctx, single.attention_contexts[layer][0], atol=1e-5, rtol=0)


def test_padded_keys_are_never_attended():
    model = tiny_model()
    ids = torch.randint(0, 50, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[:, 6:] = 0
    other = ids.clone()
    other[:, 6:] = (other[:, 6:] + 13) % 50  # different tokens under the padding
    with torch.no_grad():
        x = model(ids, attention_mask=mask).logits[:, :6]
        y = model(other, attention_mask=mask).logits[:, :6]
        z = model(other).logits[:, :6]
    torch.testing.assert_close(x, y, atol=0, rtol=0)
    assert not torch.allclose(x, z)  # without the mask those tokens do matter


def test_all_padding_row_stays_finite():
    model = tiny_model()
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0]])
    with torch.no_grad():
        out = model(torch.randint(0, 50, (2, 4)), attention_mask=mask)
    assert torch.isfinite(out.logits).all()


def test_attention_context_is_the_input_of_attn_out():
    model = tiny_model(n_layers=3)
    seen = {}
    for i, block in enumerate(model.blocks):
        block.attn_out.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[0]))
    with torch.no_grad():
        out = model(torch.randint(0, 50, (2, 5)), context_layers=(0, -1, 1))
    assert set(out.attention_contexts) == {0, -1, 1}
    assert out.attention_contexts[0].shape == (2, 5, model.config.n_heads * model.config.head_dim)
    for asked, layer in ((0, 0), (-1, 2), (1, 1)):
        assert torch.equal(out.attention_contexts[asked], seen[layer])


@pytest.mark.parametrize("bad", [3, -4, 10, 1.0, "0"])
def test_context_layer_out_of_range_is_an_error(bad):
    model = tiny_model(n_layers=3)
    with pytest.raises(ValueError, match="context layer"):
        model(torch.randint(0, 50, (1, 4)), context_layers=(bad,))


def test_bad_input_shapes_are_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.randint(0, 50, (4,)))
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.randint(0, 50, (2, 4)), attention_mask=torch.ones(2, 5))


def test_grouped_kv_heads_equal_mha_with_repeated_kv_weights():
    """Query head h reads KV head h // (n_heads / n_kv_heads), as in LLaDA's repeat_interleave."""
    gqa = tiny_model(n_kv_heads=2)
    mha = LLaDAModel(tiny_config(n_kv_heads=4)).eval()
    state = gqa.state_dict()
    head_dim, group = gqa.config.head_dim, 2
    for key, value in list(state.items()):
        if key.endswith(("k_proj.weight", "v_proj.weight")):
            state[key] = value.view(2, head_dim, -1).repeat_interleave(group, dim=0).reshape(4 * head_dim, -1)
    mha.load_state_dict(state)
    ids = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(gqa(ids).logits, mha(ids).logits, atol=1e-5, rtol=0)


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = torch.randint(0, 50, (2, 6))

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = tiny_model(seed=3).train()
        model.gradient_checkpointing = checkpointing
        out = model(ids, context_layers=(0,))
        (out.logits.square().mean() + out.attention_contexts[0].sum()).backward()
        return {n: p.grad for n, p in model.named_parameters()}

    plain, recomputed = grads(False), grads(True)
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], atol=1e-6, rtol=1e-5)


def test_scale_logits_option():
    base = tiny_model(seed=5)
    scaled = LLaDAModel(tiny_config(scale_logits=True)).eval()
    scaled.load_state_dict(base.state_dict())
    ids = torch.randint(0, 50, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(scaled(ids).logits, base(ids).logits / 32**0.5, atol=1e-6, rtol=1e-5)
