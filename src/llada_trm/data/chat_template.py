"""Rendering a model folder's chat template without letting it hang the process or exhaust its memory.

A folder's `chat_template` is code, and Jinja's sandbox bounds each `range` but not their product (two nested
loops of 100000) nor a string doubled thirty times. So only a template this package knows (`KNOWN_TEMPLATES`:
its own, which renders what LLaDA-8B-Instruct's renders, and LLaDA-8B-Instruct's) goes through the tokenizer;
any other renders here under the limits below (time checked on every line the compiled template runs, address
space, operators that grow a value checked before they run, source and output sizes), and a limit or template
error (the sandbox's `SecurityError` included) is one `ValueError` naming the folder.
"""

from __future__ import annotations

import contextlib
import functools
import json
import resource
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from .tokenizer import CHAT_TEMPLATE

# LLaDA-8B-Instruct's tokenizer_config.json template (Llama-3's layout).
LLADA_INSTRUCT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant"
    "<|end_header_id|>\n\n' }}{% endif %}"
)
KNOWN_TEMPLATES = frozenset({CHAT_TEMPLATE, LLADA_INSTRUCT_TEMPLATE})
TIME_LIMIT_S = 2.0
MEMORY_LIMIT_BYTES = 512 * 2**20
MAX_SOURCE_CHARS = 100_000
MAX_OUTPUT_CHARS = 1_000_000
_FIX = "use a standard (LLaDA) chat template in the folder's tokenizer_config.json"
_TEMPLATE_FILE = "<template>"  # the file name Jinja gives compiled template code


class _Limit(Exception):
    """A template ran past one of the limits (the message says which)."""


def check_text(text: str, what: str) -> None:
    """Refuse text that is not valid Unicode (lone surrogates: undecodable bytes from argv or a file), which
    the tokenizer would reject with a type error naming neither the text nor the fix."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"{what} holds characters that are not valid Unicode (position {exc.start}: "
            f"{text[exc.start]!r}, an undecodable byte); pass the text as UTF-8"
        ) from None


def _size(value: Any) -> int:
    return len(value) if isinstance(value, str | bytes | list | tuple) else 0


@functools.lru_cache(maxsize=8)
def _compile(source: str) -> Any:
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Limited(ImmutableSandboxedEnvironment):
        """The sandbox with the operators that grow a value checked first (and never constant-folded)."""

        intercepted_binops = frozenset({"*", "+", "%", "**"})

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            if operator == "*":
                count = right if isinstance(right, int) else left if isinstance(left, int) else 1
                if max(_size(left), _size(right)) * max(int(count), 0) > MAX_OUTPUT_CHARS:
                    raise _Limit(f"a repetition ('*') past {MAX_OUTPUT_CHARS} characters")
            elif operator == "**" and isinstance(right, int) and abs(right) > 256:
                raise _Limit("a power ('**') past 256")
            elif operator == "+" and _size(left) + _size(right) > MAX_OUTPUT_CHARS:
                raise _Limit(f"a value past {MAX_OUTPUT_CHARS} characters")
            result = super().call_binop(context, operator, left, right)
            if _size(result) > MAX_OUTPUT_CHARS:
                raise _Limit(f"a value past {MAX_OUTPUT_CHARS} characters")
            return result

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = Limited(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


@contextlib.contextmanager
def _limits(deadline: float) -> Iterator[None]:
    """While rendering: a time check on every line of compiled template code, and an address-space cap."""

    def local(frame: Any, event: str, arg: Any) -> Any:
        if time.monotonic() > deadline:
            raise _Limit(f"rendering took more than {TIME_LIMIT_S:g} s (nested loops?)")
        return local

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        return local if frame.f_code.co_filename == _TEMPLATE_FILE else None

    previous_trace = sys.gettrace()
    old_limit = None
    try:
        with open("/proc/self/statm") as f:
            used = int(f.read().split()[0]) * resource.getpagesize()
        old_limit = resource.getrlimit(resource.RLIMIT_AS)
        cap = used + MEMORY_LIMIT_BYTES
        if old_limit[1] == resource.RLIM_INFINITY or cap < old_limit[1]:
            resource.setrlimit(resource.RLIMIT_AS, (cap, old_limit[1]))
        else:
            old_limit = None
    except (OSError, ValueError, AttributeError):  # no /proc or no RLIMIT_AS here: the time limit remains
        old_limit = None
    sys.settrace(tracer)
    try:
        yield
    finally:
        sys.settrace(previous_trace)
        if old_limit is not None:
            resource.setrlimit(resource.RLIMIT_AS, old_limit)


def render_limited(
    source: str, context: Mapping[str, Any], *, where: str = "the chat template"
) -> str:
    """`source` rendered with `context` under the module's limits; one ValueError naming `where` if not."""
    from jinja2 import TemplateError

    if len(source) > MAX_SOURCE_CHARS:
        raise ValueError(f"{where}: the chat template is longer than {MAX_SOURCE_CHARS} characters; refused")
    deadline = time.monotonic() + TIME_LIMIT_S
    try:
        with _limits(deadline):
            template = _compile(source)
            pieces: list[str] = []
            total = 0
            for piece in template.generate(**context):
                total += len(piece)
                if total > MAX_OUTPUT_CHARS:
                    raise _Limit(f"output past {MAX_OUTPUT_CHARS} characters")
                pieces.append(piece)
            return "".join(pieces)
    except _Limit as exc:
        raise ValueError(f"{where}: the chat template was stopped: {exc}; {_FIX}") from None
    except MemoryError:
        raise ValueError(
            f"{where}: the chat template was stopped: it needed more than {MEMORY_LIMIT_BYTES >> 20} MiB; "
            "use a standard chat template"
        ) from None
    except RecursionError:
        raise ValueError(f"{where}: the chat template recurses too deeply; {_FIX}") from None
    except TemplateError as exc:
        text = " ".join(str(exc).split())[:200]
        raise ValueError(
            f"{where}: the chat template failed ({type(exc).__name__}: {text}); use a standard chat template"
        ) from None
    except (TypeError, ValueError, LookupError, AttributeError, ArithmeticError) as exc:
        text = " ".join(str(exc).split())[:200]
        raise ValueError(f"{where}: the chat template failed ({type(exc).__name__}: {text})") from None


def _folder(tokenizer: Any) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or "the tokenizer")


def _limited_source(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> str | None:
    """The template to render under the limits, or None for a known one (or none: the tokenizer then says so),
    which the tokenizer renders itself; of named templates (a dict), the `default` one, as transformers picks
    it. The messages' text is checked first."""
    for message in messages:
        check_text(str(message.get("content", "")), "the question")
    folder = _folder(tokenizer)
    source = tokenizer.chat_template
    if isinstance(source, dict):
        source = source.get("default")
        if not isinstance(source, str):
            raise ValueError(
                f"{folder}: tokenizer_config.json: no 'default' among its named chat templates; {_FIX}"
            )
    if source is not None and not isinstance(source, str):
        raise ValueError(f"{folder}: tokenizer_config.json: chat_template is not text; {_FIX}")
    return None if source is None or source in KNOWN_TEMPLATES else source


def render_chat(tokenizer: Any, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool) -> str:
    """The tokenizer's chat template applied to `messages`, as text: a known template through the tokenizer,
    any other under the limits (module docstring)."""
    source = _limited_source(tokenizer, messages)
    if source is None:
        return tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )
    context = {
        **{k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)},
        "messages": [dict(m) for m in messages],
        "add_generation_prompt": add_generation_prompt,
    }
    return render_limited(source, context, where=f"{_folder(tokenizer)}: tokenizer_config.json")


def encode_chat(tokenizer: Any, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool) -> Any:
    """Token ids of the chat, as `apply_chat_template(tokenize=True)` gives them; an unknown template is
    rendered under the limits and then tokenized without special tokens (what transformers does)."""
    if _limited_source(tokenizer, messages) is None:
        return tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=add_generation_prompt, tokenize=True
        )
    text = render_chat(tokenizer, messages, add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
