"""The small tokenizer: HF layout, AutoTokenizer loading, LLaDA's special tokens and chat template."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from tiny_assets import FIXTURES
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from llada_trm.data.collate import encode_answer
from llada_trm.data.gsm8k import extract_final_answer, load_gsm8k
from llada_trm.data.synthetic import SyntheticTaskConfig, generate_problems
from llada_trm.data.tokenizer import (
    BOS_TOKEN,
    CHAT_TEMPLATE,
    EOS_TOKEN,
    EOT_TOKEN,
    MASK_TOKEN,
    SPECIAL_TOKENS,
    build_tokenizer,
    load_tokenizer,
    mask_token_id,
    pad_token_id,
    special_token_ids,
)

FIXTURE = FIXTURES / "gsm8k_small.jsonl"
REAL_GSM8K = Path("/work/shared/data/gsm8k/test.jsonl")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    problems = generate_problems(SyntheticTaskConfig(seed=5), 400)
    texts = [text for r in problems for text in (r.question, r.answer)]
    out = tmp_path_factory.mktemp("tokenizer")
    return build_tokenizer(texts, vocab_size=1024, out_dir=out), out


def test_saved_in_hf_layout(saved):
    _, out = saved
    files = {path.name for path in out.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= files
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHAT_TEMPLATE
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    special = json.loads((out / "special_tokens_map.json").read_text())
    assert special["bos_token"] == BOS_TOKEN and special["eos_token"] == special["pad_token"] == EOS_TOKEN
    assert special["mask_token"] == MASK_TOKEN and EOT_TOKEN in special["additional_special_tokens"]


def test_auto_tokenizer_loads_it(saved):
    tokenizer, out = saved
    auto = AutoTokenizer.from_pretrained(str(out))
    assert len(auto) == len(tokenizer)
    assert 256 + len(SPECIAL_TOKENS) < len(auto) <= 1024
    text = "Tom has 12 apples.\n#### 12"
    assert auto(text)["input_ids"] == tokenizer(text)["input_ids"]
    ids = special_token_ids(auto)
    assert ids.pad == ids.eos == auto.convert_tokens_to_ids(EOS_TOKEN)
    assert ids.mask == mask_token_id(auto) == auto.mask_token_id
    assert len({ids.bos, ids.eos, ids.mask, ids.eot}) == 4
    for token in SPECIAL_TOKENS:  # each special token is one id, never split
        assert auto(token, add_special_tokens=False)["input_ids"] == [auto.convert_tokens_to_ids(token)]


def test_no_automatic_bos_or_eos(saved):
    tokenizer, _ = saved
    assert tokenizer.decode(tokenizer("Tom")["input_ids"]) == "Tom"


@pytest.mark.parametrize("number", ["0", "7", "12345", "1000000", "3.25"])
def test_digits_are_split_and_round_trip(saved, number):
    tokenizer, _ = saved
    ids = tokenizer(number, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(number)
    assert tokenizer.convert_ids_to_tokens(ids) == list(number)
    assert tokenizer.decode(ids) == number


def test_chat_template_matches_llada_instruct(saved):
    tokenizer, _ = saved
    messages = [{"role": "user", "content": "  What is 2+3?\n"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+3?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    conversation = [*messages, {"role": "assistant", "content": "5"}]
    full = tokenizer.apply_chat_template(conversation, tokenize=False)
    assert full.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n5<|eot_id|>")
    assert full.count(BOS_TOKEN) == 1
    # the template's role names were trained in as whole tokens
    prompt_tokens = tokenizer.convert_ids_to_tokens(tokenizer(text)["input_ids"])
    assert "user" in prompt_tokens and "assistant" in prompt_tokens


def test_arbitrary_text_encodes_and_round_trips(saved):
    tokenizer, _ = saved
    text = "Janet’s café earns €1,234.50 — naïve 日本 🙂\ttabs\n\n  spaces"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids or tokenizer.unk_token_id is None
    assert tokenizer.decode(ids) == text


def test_gsm8k_answers_round_trip(saved):
    tokenizer, _ = saved
    records = load_gsm8k(REAL_GSM8K, "test[:100]") if REAL_GSM8K.is_file() else load_gsm8k(FIXTURE)
    for record in records:
        ids = encode_answer(tokenizer, record.answer)
        decoded = tokenizer.decode(ids, skip_special_tokens=True)
        assert decoded == record.answer.strip()
        assert extract_final_answer(decoded) == record.final_answer


def test_in_memory_tokenizer_matches_saved(saved):
    tokenizer, _ = saved
    problems = generate_problems(SyntheticTaskConfig(seed=5), 400)
    fresh = build_tokenizer([t for r in problems for t in (r.question, r.answer)], vocab_size=1024)
    assert fresh.get_vocab() == tokenizer.get_vocab()  # training is deterministic
    assert fresh.chat_template == CHAT_TEMPLATE


def test_errors(tmp_path, saved):
    with pytest.raises(ValueError, match="vocab_size"):
        build_tokenizer(["a b c"], vocab_size=100)
    with pytest.raises(FileNotFoundError, match="not a tokenizer folder"):
        load_tokenizer(tmp_path)
    backend = Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    plain = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    with pytest.raises(ValueError, match="no <|mdm_mask|> token"):
        mask_token_id(plain)


def test_pad_falls_back_to_eos(saved):
    tokenizer, out = saved
    reloaded = load_tokenizer(out)
    reloaded.pad_token = None
    assert pad_token_id(reloaded) == reloaded.convert_tokens_to_ids(EOS_TOKEN)


@pytest.fixture
def transformers_warnings():
    """Records transformers logs (its own handler writes to the original stderr, out of caplog's reach)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def test_backbone_directory_loads_without_model_type_warning(saved, tmp_path, transformers_warnings):
    _, out = saved
    for item in out.iterdir():  # a backbone directory: tokenizer files beside a `llada` config.json
        shutil.copy(item, tmp_path / item.name)
    config = {"model_type": "llada", "architectures": ["LLaDAModelLM"], "d_model": 32}
    (tmp_path / "config.json").write_text(json.dumps(config), encoding="utf-8")

    tokenizer = load_tokenizer(tmp_path)
    assert mask_token_id(tokenizer) == load_tokenizer(out).convert_tokens_to_ids(MASK_TOKEN)
    messages = [record.getMessage() for record in transformers_warnings]
    assert not [m for m in messages if "to instantiate a model of type" in m], messages

    # the plain call on a model type transformers does not know does warn: the capture works (`llada` itself
    # is known once llada_trm is imported, `hf_auto`)
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "unregistered_type"}))
    AutoTokenizer.from_pretrained(str(tmp_path))
    assert any("to instantiate a model of type" in r.getMessage() for r in transformers_warnings)
