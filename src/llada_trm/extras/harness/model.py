"""`llada_trm`: the project's model as an lm-evaluation-harness backend (registered on import).

`generate_until` runs the project's sampler (a request's `gen_kwargs` may override any sampler option; the
task's `until` strings cut the decoded answer), `loglikelihood` LLaDA's Monte-Carlo bound (`likelihood.py`),
`loglikelihood_rolling` the same over lm-eval's rolling windows. Model args and behaviour: docs/lm_eval.md.
One process only: data-parallel lm-eval runs are not supported.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, simple_parse_args_string
from tqdm.auto import tqdm

from llada_trm.data.tokenizer import decode_generated, pad_token_id, special_token_ids
from llada_trm.diffusion.options import SamplingOptions
from llada_trm.diffusion.sampler import sample
from llada_trm.errors import ConfigError
from llada_trm.evaluate.evaluator import POLICY, fit_prompts, sampling_setup
from llada_trm.evaluate.loading import OFF, load_checkpoint, resolve_sampling

from .likelihood import greedy_matches, mc_log_likelihood

MODEL_NAME = "llada_trm"
DEFAULT_CHECKPOINT = "embedded"
OWN_REFINER = "checkpoint"
_SAMPLER_KEYS = tuple(
    f.name for f in dataclasses.fields(SamplingOptions) if f.name not in ("batch_size", "seed")
)
_IGNORED_GEN_KWARGS = ("until", "do_sample", "max_gen_toks")
_TOKEN_IDS = ("mask_id", "eos_id", "eot_id")  # accepted, but the model's own ids are used (`_sample`)

logger = logging.getLogger(__name__)


def apply_stop_strings(text: str, stops: Sequence[str]) -> str:
    """`text` cut at the earliest occurrence of any stop string (unchanged when none occurs)."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=len(text))
    return text[:cut]


# Ceilings of the backend's own sizes: past them a typo only exhausts memory (mc_num draws are one tensor).
_MAX_MC = 1_000_000
_MAX_BATCH = 4096


def _positive_int(name: str, value: Any, ceiling: int | None = None) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"llada_trm: {name}={value!r}: give a positive integer") from None
    if number < 1 or str(number) != str(value).strip():
        raise ConfigError(f"llada_trm: {name}={value!r}: give a positive integer")
    if ceiling is not None and number > ceiling:
        raise ConfigError(f"llada_trm: {name}={value!r}: give at most {ceiling}")
    return number


def _model_arg_sampling(checkpoint: str, batch_size: int, sampling: dict[str, Any]) -> SamplingOptions:
    """A trained run's `sampling:` section (LLaDA's defaults for a backbone) with the model args in place of
    its values, as `llada-trm eval` does; lm-eval reads `threshold=none` as None, which here switches the
    setting off (None would keep the run's value)."""
    given = {key: OFF if value is None else value for key, value in sampling.items() if key not in _TOKEN_IDS}
    options = resolve_sampling(checkpoint, {**given, "batch_size": batch_size})
    return dataclasses.replace(options, **{key: sampling[key] for key in _TOKEN_IDS if key in sampling})


@register_model(MODEL_NAME)
class LLaDATRMLM(TemplateLM):
    """lm-eval backend for llada-trm checkpoints (see the module docstring for the model args)."""

    # lm-eval passes `--model_args k=v,...` as these keywords: the signature is the backend's interface
    def __init__(  # noqa: PLR0913
        self,
        checkpoint: str = "embedded",
        refiner: str | None = OWN_REFINER,
        dtype: str = "auto",
        device: str | None = "auto",
        batch_size: int | str | None = 16,
        max_batch_size: int | None = None,
        mc_num: int = 128,
        mc_batch_size: int = 32,
        max_length: int | None = None,
        **sampling: Any,
    ) -> None:
        super().__init__()
        unknown = sorted(set(sampling) - {*_SAMPLER_KEYS, "seed"})
        if unknown:
            raise ConfigError(
                f"llada_trm: unknown model arg(s) {', '.join(unknown)}; known: checkpoint, refiner, dtype, "
                f"mc_num, mc_batch_size, max_length, seed, {', '.join(_SAMPLER_KEYS)}"
            )
        # lm-eval's arg parser turns `none` into None: here that means the backbone alone.
        choice = "none" if refiner is None else None if refiner == OWN_REFINER else str(refiner)
        self.loaded = load_checkpoint(checkpoint, refiner=choice, device=device or "auto", dtype=dtype)
        self.tokenizer = self.loaded.tokenizer
        self.ids = special_token_ids(self.tokenizer)
        self._device = next(self.loaded.model.parameters()).device
        self.batch_size = _positive_int("batch_size", 16 if batch_size is None else batch_size, _MAX_BATCH)
        try:
            self.options = _model_arg_sampling(checkpoint, self.batch_size, sampling)
        except ValueError as exc:
            raise ConfigError(f"llada_trm: model args: {' '.join(str(exc).split())}") from None
        self.mc_num = _positive_int("mc_num", mc_num, _MAX_MC)
        self.mc_batch_size = _positive_int("mc_batch_size", mc_batch_size, _MAX_BATCH)
        positions = self.loaded.model.backbone.config.max_sequence_length
        self.max_length = _positive_int("max_length", positions if max_length is None else max_length)
        if self.max_length > positions:
            # past its positions the backbone's rotary tables end: answers would be sampled on garbage
            raise ConfigError(
                f"llada_trm: max_length={self.max_length} exceeds the backbone's {positions} positions "
                f"(max_sequence_length); give max_length <= {positions} or leave it out"
            )
        # the model with the checkpoint's refinement budget, as `llada-trm eval` samples it
        self.net, _ = sampling_setup(self.loaded.model, self.tokenizer, self.options, self.loaded.num_steps)
        self._generator = torch.Generator(device=self._device).manual_seed(self.options.seed)
        self._mc_generator = torch.Generator().manual_seed(self.options.seed)
        self._warned: set[str] = set()
        self.skipped_prompts = 0  # prompts too long for max_length (`fit_prompts`), so far
        self.prompts_seen = 0

    # ----------------------------------------------------------------------------------- tokenisation

    @property
    def eot_token_id(self) -> int:
        return self.ids.eos

    @property
    def prefix_token_id(self) -> int:
        """An empty context is the sequence start, as every training sequence begins."""
        bos = self.tokenizer.bos_token_id
        return self.ids.eos if bos is None else bos

    @property
    def tokenizer_name(self) -> str:
        return str(self.loaded.backbone_dir).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Token ids, BOS-prefixed unless `add_special_tokens=False` or the text (a chat) starts with it."""
        ids = list(self.tokenizer(string, add_special_tokens=False)["input_ids"])
        bos = self.tokenizer.bos_token_id
        if add_special_tokens is not False and bos is not None and (not ids or ids[0] != bos):
            ids.insert(0, bos)
        return ids

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """lm-eval's `--apply_chat_template`: the tokenizer's (LLaDA's) template, rendered as text (a
        folder's unknown template under limits, `data.chat_template`)."""
        from llada_trm.data.chat_template import render_chat

        return render_chat(self.tokenizer, chat_history, add_generation_prompt)

    def get_model_info(self) -> dict[str, Any]:
        """Recorded in lm-eval's results under `config`."""
        return {
            **self.loaded.describe(),
            "sampling": self.options.to_dict(),
            "mc_num": self.mc_num,
            "max_length": self.max_length,
            "prompts": {"policy": POLICY, "n": self.prompts_seen, "skipped": self.skipped_prompts},
        }

    # ----------------------------------------------------------------------------------- generation

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            logger.warning(message)

    def _request_options(self, gen_kwargs: dict[str, Any]) -> tuple[SamplingOptions, list[str]]:
        """The sampler options of one request (model args, overridden by gen_kwargs) and its stop strings."""
        kwargs = dict(gen_kwargs)
        until = kwargs.pop("until", None) or []
        stops = [until] if isinstance(until, str) else list(until)
        overrides = {key: kwargs.pop(key) for key in _SAMPLER_KEYS if key in kwargs}
        for key in [k for k in kwargs if k not in _IGNORED_GEN_KWARGS]:
            self._warn_once(
                f"llada_trm: gen_kwargs {key}={kwargs[key]!r} has no meaning for diffusion; ignored"
            )
        for key, value in overrides.items():
            if value != getattr(self.options, key):
                self._warn_once(f"llada_trm: the task's gen_kwargs set {key}={value!r} (model arg ignored)")
        try:
            return dataclasses.replace(self.options, **overrides), stops
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"llada_trm: gen_kwargs: {' '.join(str(exc).split())}") from None

    def _left_pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), width), pad_token_id(self.tokenizer), dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, width - len(row) :] = 1
        return input_ids.to(self._device), attention_mask.to(self._device)

    def _sample(self, prompts: list[list[int]], options: SamplingOptions) -> list[str]:
        input_ids, attention_mask = self._left_pad(prompts)
        # every option reaches the sampler; the token ids are this model's and its tokenizer's
        _, options = sampling_setup(self.loaded.model, self.tokenizer, options, self.loaded.num_steps)
        result = sample(self.net, input_ids, attention_mask, options, generator=self._generator)
        return decode_generated(self.tokenizer, result.tokens, result.prompt_length)

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Sample every request; requests sharing sampler options are batched, longest prompts first.

        A prompt that does not fit max_length with its gen_length is skipped, answered with an empty string
        (scored as wrong) and counted: the policy `llada-trm eval` follows too (`fit_prompts`).
        """
        requested = []
        for request in requests:
            context, gen_kwargs = request.args
            options, stops = self._request_options(gen_kwargs)
            requested.append((options, self.tok_encode(context), stops))
        fit = fit_prompts(
            [len(ids) for _, ids, _ in requested], [o.gen_length for o, _, _ in requested], self.max_length
        )
        self.skipped_prompts += len(fit.skipped)
        self.prompts_seen += fit.n
        if fit.skipped:
            self._warn_once(f"llada_trm: {POLICY}")
            logger.warning(
                "llada_trm: %d of %d prompts skipped (tokens + gen_length > max_length %d), answered with an "
                "empty string and scored as wrong",
                len(fit.skipped),
                fit.n,
                self.max_length,
            )
        prepared = [(*requested[i], i) for i in fit.kept]
        prepared.sort(key=lambda item: (repr(item[0]), -len(item[1]), item[3]))
        answers = [""] * len(requests)
        bar = tqdm(total=len(prepared), desc="llada_trm generate", disable=disable_tqdm or self.rank != 0)
        for options, group in itertools.groupby(prepared, key=lambda item: item[0]):
            same = list(group)  # requests of one sampler setting, in batches
            for batch in (same[i : i + self.batch_size] for i in range(0, len(same), self.batch_size)):
                texts = self._sample([b[1] for b in batch], options)
                for (_, _, stops, index), text in zip(batch, texts, strict=True):
                    answers[index] = apply_stop_strings(text, stops)
                    self.cache_hook.add_partial("generate_until", requests[index].args, answers[index])
                bar.update(len(batch))
        bar.close()
        return answers

    # ----------------------------------------------------------------------------------- likelihood

    def _fit(self, context: list[int], continuation: list[int]) -> list[int]:
        """The context cut from the left so that context + continuation fit in max_length."""
        if len(continuation) >= self.max_length:
            raise ConfigError(
                f"a continuation of {len(continuation)} tokens does not fit max_length {self.max_length}"
            )
        return context[max(0, len(context) + len(continuation) - self.max_length) :]

    def _logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.net(input_ids).logits

    def _score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        context = self._fit(context, continuation)
        mask_id = self.loaded.model.mask_token_id
        logp = mc_log_likelihood(
            self._logits,
            context,
            continuation,
            mask_id=mask_id,
            mc_num=self.mc_num,
            mc_batch_size=self.mc_batch_size,
            device=self._device,
            generator=self._mc_generator,
        )
        greedy = greedy_matches(self._logits, context, continuation, mask_id=mask_id, device=self._device)
        return logp, greedy

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str], list[int], list[int]]],
        disable_tqdm: bool = False,
        **_: Any,
    ) -> list[tuple[float, bool]]:
        results = []
        for key, context, continuation in tqdm(
            requests, desc="llada_trm loglikelihood", disable=disable_tqdm
        ):
            result = self._score(context, continuation)
            self.cache_hook.add_partial("loglikelihood", key, result)
            results.append(result)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Sum of the MC estimates over lm-eval's disjoint rolling windows (each window given its context)."""
        results = []
        for request in tqdm(requests, desc="llada_trm loglikelihood_rolling", disable=disable_tqdm):
            (text,) = request.args
            windows = get_rolling_token_windows(
                token_list=self.tok_encode(text, add_special_tokens=False),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            total = sum(self._score(*make_disjoint_window(window))[0] for window in windows)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            results.append(total)
        return results


# ---------------------------------------------------------------------------- lm-eval's result folders
# lm-eval names a result folder after a `pretrained=` / `model=` / `path=` model arg, which `llada_trm` has
# not: without this every run landed in a fresh random folder (docs/lm_eval.md).


def checkpoint_name(model_args: str | Mapping[str, Any] | None) -> str:
    """The `checkpoint` model arg (`k=v,k=v` text, read as lm-eval reads it, or a mapping); `embedded` when
    it is not given."""
    args = model_args if isinstance(model_args, Mapping) else simple_parse_args_string(model_args or "")
    value = args.get("checkpoint")
    return str(value) if value else DEFAULT_CHECKPOINT


def name_results_after_checkpoint(model_name: str) -> None:
    """Wrap lm-eval's `GeneralConfigTracker.log_experiment_args` (once): for model `model_name` with no
    name lm-eval recognises, the checkpoint names the result folder."""
    from lm_eval.loggers.evaluation_tracker import GeneralConfigTracker
    from lm_eval.utils import sanitize_model_name

    original = GeneralConfigTracker.log_experiment_args
    if getattr(original, "_llada_trm", False):
        return

    def log_experiment_args(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        source = kwargs.get("model_source", args[0] if args else None)
        model_args = kwargs.get("model_args", args[1] if len(args) > 1 else None)
        if source == model_name and GeneralConfigTracker._get_model_name(model_args) is None:
            self.model_name = checkpoint_name(model_args)
            self.model_name_sanitized = sanitize_model_name(self.model_name)

    log_experiment_args._llada_trm = True  # type: ignore[attr-defined]
    GeneralConfigTracker.log_experiment_args = log_experiment_args


name_results_after_checkpoint(MODEL_NAME)  # lm-eval's result folder: the checkpoint's name, not a random id
