"""A small byte-level BPE tokenizer in Hugging Face format, with LLaDA's special tokens and chat template.

The embedded default model needs a tokenizer that loads through ``AutoTokenizer.from_pretrained`` exactly like
LLaDA-8B's, so the rest of the package handles both the same way. Choices, and why:

- byte-level BPE: every string (real GSM8K questions with curly quotes, euro signs...) encodes, nothing is
  <unk>, and decoding is lossless;
- digits are split one by one before BPE, so numbers are spelled digit by digit (arithmetic stays learnable
  with a tiny vocabulary) and ``decode(encode("12345")) == "12345"``;
- no automatic BOS/EOS: the chat template writes ``<|startoftext|>`` itself, as LLaDA-Instruct's does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from torch import Tensor
from transformers import AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from llada_trm.text import read_utf8

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MASK_TOKEN = "<|mdm_mask|>"
START_HEADER_TOKEN = "<|start_header_id|>"
END_HEADER_TOKEN = "<|end_header_id|>"
EOT_TOKEN = "<|eot_id|>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, MASK_TOKEN, START_HEADER_TOKEN, END_HEADER_TOKEN, EOT_TOKEN)

# Renders exactly what LLaDA-8B-Instruct's template renders: BOS once, then per message
# "<|start_header_id|>{role}<|end_header_id|>\n\n{content stripped}<|eot_id|>", then the assistant header.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{ message['content'] | trim }}{{ '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

_MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # the byte alphabet plus the special tokens
# Words the chat template writes around every prompt; trained in so they are single tokens.
_TEMPLATE_WORDS = ("user", "assistant", "system")


def _training_texts(texts: Iterable[str], min_frequency: int) -> Iterator[str]:
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"build_tokenizer expects strings, got {type(text).__name__}")
        yield text
    for _ in range(max(min_frequency, 1)):
        yield from _TEMPLATE_WORDS


def build_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 1024,
    out_dir: str | os.PathLike[str] | None = None,
    *,
    min_frequency: int = 2,
    model_max_length: int = 4096,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (digits split, at most ``vocab_size`` entries) on ``texts``.

    The vocabulary can come out smaller than ``vocab_size`` when the corpus has fewer merges to offer (the
    generated task uses ~100 distinct words). With ``out_dir`` the tokenizer is saved there in HF layout and
    the returned object is the one ``load_tokenizer(out_dir)`` gives.
    """
    if vocab_size < _MIN_VOCAB:
        raise ValueError(f"vocab_size must be >= {_MIN_VOCAB} (256 bytes + {len(SPECIAL_TOKENS)} specials)")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_training_texts(texts, min_frequency), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,  # LLaDA pads with EOS and trains on the padding
        mask_token=MASK_TOKEN,
        additional_special_tokens=[START_HEADER_TOKEN, END_HEADER_TOKEN, EOT_TOKEN],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,  # keeps decode(encode(text)) == text
        model_max_length=model_max_length,
    )
    if out_dir is None:
        return tokenizer
    save_tokenizer(tokenizer, out_dir)
    return load_tokenizer(out_dir)


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, out_dir: str | os.PathLike[str]) -> Path:
    """Save in the layout LLaDA's checkpoints use: ``tokenizer.json``, ``tokenizer_config.json`` (with
    ``chat_template``) and ``special_tokens_map.json``, readable by transformers 4 and 5 alike."""
    out = Path(out_dir)
    tokenizer.save_pretrained(str(out))
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    # transformers 5 writes a separate chat_template.jinja and a list-valued extra_special_tokens that
    # transformers 4 cannot read; keep one self-contained config instead.
    jinja = out / "chat_template.jinja"
    if jinja.exists():
        jinja.unlink()
    config["chat_template"] = tokenizer.chat_template
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = config.pop("extra_special_tokens", None)
    if isinstance(extra, list):
        config["additional_special_tokens"] = extra
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    special_map = {
        key: config[key] for key in ("bos_token", "eos_token", "pad_token", "mask_token") if config.get(key)
    }
    special_map["additional_special_tokens"] = config.get("additional_special_tokens", [])
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n", encoding="utf-8")
    return out


def load_tokenizer(path: str | os.PathLike[str], **kwargs: object) -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained(path)`` for our tokenizer or LLaDA-8B's; checks the mask token.

    Loading never runs code from the folder: a config naming custom code (``auto_map``) is refused and
    ``trust_remote_code=False`` is passed anyway. Every failure is a one-line ``ValueError`` naming the
    folder. The empty ``config`` keeps transformers from reading a backbone folder's ``llada`` config.json as
    a generic model config (and warning about it); our tokenizer folders name their class themselves.
    """
    directory = Path(path)
    if not any((directory / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise FileNotFoundError(f"{directory}: not a tokenizer folder (no tokenizer.json)")
    _refuse_custom_code(directory)
    if kwargs.get("trust_remote_code"):
        raise ValueError("load_tokenizer never runs code from a model folder; drop trust_remote_code")
    kwargs["trust_remote_code"] = False
    kwargs.setdefault("config", PretrainedConfig())
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), **kwargs)
    except (OSError, ValueError, TypeError, KeyError, AttributeError, ImportError) as exc:
        # transformers' own messages run over several lines; one line naming the folder is enough here.
        text = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise ValueError(f"{directory}: cannot load the tokenizer ({text})") from None
    mask_token_id(tokenizer)
    return tokenizer


def _refuse_custom_code(directory: Path) -> None:
    """A tokenizer config naming its own Python classes (``auto_map``) would need that code run: refuse."""
    config_file = directory / "tokenizer_config.json"
    if not config_file.is_file():
        return
    try:
        config = json.loads(read_utf8(config_file, ValueError))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_file}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_file}: expected a JSON object, got {type(config).__name__}")
    if config.get("auto_map"):
        raise ValueError(
            f"{config_file}: names custom tokenizer code (auto_map {json.dumps(config['auto_map'])}); "
            "llada-trm never runs code from a model folder, use a tokenizer.json with tokenizer_class "
            "PreTrainedTokenizerFast"
        )


@dataclass(frozen=True)
class SpecialTokenIds:
    """The ids the diffusion code needs, looked up by token text so LLaDA-8B's tokenizer works too."""

    bos: int
    eos: int
    pad: int
    mask: int
    eot: int


def _token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id or not isinstance(token_id, int):
        raise ValueError(f"tokenizer has no {token} token; build it with llada_trm.build_tokenizer")
    return token_id


def mask_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """Id of ``<|mdm_mask|>`` (LLaDA's own tokenizer does not set ``mask_token``, so look it up by text)."""
    return _token_id(tokenizer, MASK_TOKEN)


def eos_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    return _token_id(tokenizer, EOS_TOKEN)


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """Padding id: the tokenizer's pad token, else EOS (LLaDA pads with EOS)."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return eos_token_id(tokenizer)


def eot_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    return _token_id(tokenizer, EOT_TOKEN)


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> SpecialTokenIds:
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else _token_id(tokenizer, BOS_TOKEN)
    return SpecialTokenIds(
        bos=int(bos),
        eos=eos_token_id(tokenizer),
        pad=pad_token_id(tokenizer),
        mask=mask_token_id(tokenizer),
        eot=eot_token_id(tokenizer),
    )


def digit_token_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    """The ids of "0".."9" when the tokenizer writes each digit as one token (this package's tokenizer
    and LLaDA-8B's do), else () (the sampler's `digit_order: lsd_first` then refuses to run)."""
    encoded = [tokenizer.encode(str(digit), add_special_tokens=False) for digit in range(10)]
    if any(len(ids) != 1 for ids in encoded):
        return ()
    return tuple(int(ids[0]) for ids in encoded)


def _stop_ids(tokenizer: Any) -> list[int]:
    """EOS and, when the vocabulary has it, ``<|eot_id|>``: the tokens that end an answer."""
    ids = []
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        ids.append(int(eos))
    convert = getattr(tokenizer, "convert_tokens_to_ids", None)
    if convert is not None:
        eot = convert(EOT_TOKEN)
        if isinstance(eot, int) and eot != getattr(tokenizer, "unk_token_id", None):
            ids.append(eot)
    return ids


def decode_generated(
    tokenizer: Any,
    tokens: Tensor | Sequence[Sequence[int]],
    prompt_length: int,
    stop_ids: Iterable[int] | None = None,
) -> list[str]:
    """Decode each row's answer (tokens after ``prompt_length``), cut at its first EOS / ``<|eot_id|>``.

    ``stop_ids`` defaults to the tokenizer's EOS id and its ``<|eot_id|>`` id, when it has one.
    """
    stops = set(_stop_ids(tokenizer) if stop_ids is None else stop_ids)
    rows = tokens.tolist() if isinstance(tokens, Tensor) else [list(row) for row in tokens]
    texts = []
    for row in rows:
        answer = row[prompt_length:]
        cut = next((i for i, token in enumerate(answer) if token in stops), len(answer))
        texts.append(tokenizer.decode(answer[:cut], skip_special_tokens=True))
    return texts
