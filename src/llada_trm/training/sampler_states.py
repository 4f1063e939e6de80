"""Sampler-state training data: the frozen backbone's own partially un-masked sequences, recorded once.

The refiner is trained on the forward process's random masks but used on the sampler's states (confident
tokens committed first, threshold decoding, a KV-cache window). This module runs the project's sampler
(`diffusion.sample` with the run's `sampling:` options) with the frozen backbone on the training prompts and
keeps, for each problem, a few of the states it passed to the model:

    x^(i,k) = the sequence the sampler fed the model at its k-th call on problem i's batch
    steps k_1 < ... < k_n: drawn (generator seeded by (seed, i)) among the calls whose state differs from
    the previous call's and still has a masked answer position; n = min(per_problem, candidates)

Each record holds the state (prompt + `gen_length` answer positions, [MASK] where still masked) and its
targets (prompt + the reference answer, EOS-padded or cut to `gen_length`). The targets are the reference,
not the sampler's committed tokens: the loss covers only the still-masked positions, as in the forward
process (below), so a committed token, right or wrong, is context and never a target.

The states are recorded by `StateRecorder`, a wrapper around the model the sampler calls: it sees every
call's input ids, and the sampler itself is run unchanged. The states come from the backbone alone (the
refiner is what is being trained), so they are a fixed function of the backbone, the data, the sampling
options and the seed, checked by the store's manifest like the feature cache's. Layout of a store:

    manifest.json            backbone, data, sampling, states sections (must match), layout, complete
    shard_00000.safetensors  examples [k*E, (k+1)*E): states, targets [n, W] i32, example [n] i64,
                             step [n] i32, prompt_lengths [n] i64   (n states; W = longest prompt + gen)

Shards hold whole sampler batches (E is a multiple of `sampling.batch_size`, so a resumed build forms the
same batches), are written atomically and skipped when present, so an interrupted build resumes.

Reading the store and mixing it into the trainer's epochs (`SamplerStates`, `StateMix`). A sampler-state
batch trains with the forward-process batches' objective (`diffusion_objective`, LLaDA's
`masked_diffusion_loss`), its noise taken from the store instead of drawn:

    noisy   = the recorded state (prompt, committed answer tokens, [MASK] at still-masked positions)
    masked  = noisy == [MASK]            (answer positions only: the prompt is never masked)
    p_mask  = masked.sum() / gen_length  (the state's masked fraction of its answer region, per row)
    targets = the reference answer; answer_lengths = gen_length

so the loss covers exactly the still-masked positions, each weighted 1/p_mask / answer_length as a forward-
process draw with that masked fraction would be. Rows are right-padded with EOS past prompt + gen_length
(unmasked: attended, never a target), as SFT batches are.

The mix: with ratio r, micro-batch j of epoch e (of M) reads sampler states iff j is among the first
round(r * M) entries of a permutation of 0..M-1 seeded by (seed, e); the forward-process batch the loader
gave at j is skipped, so an epoch keeps its length and the schedule its steps. The c-th state batch of the
epoch takes states c*W*B .. (c+1)*W*B - 1 (modulo their number) of a permutation of all states seeded by
(seed, e), rank r every W-th of them. Both depend on (seed, epoch, index) only, so a resume is exact.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from llada_trm.build import apply_backbone_options, backbone_dtype, build_datasets, build_model, start_run
from llada_trm.config import RunConfig
from llada_trm.data import EncodedExample, special_token_ids
from llada_trm.diffusion.options import SamplingOptions
from llada_trm.diffusion.sampler import sample
from llada_trm.dist_utils import is_distributed, is_main_process
from llada_trm.errors import ConfigError
from llada_trm.io import atomic_path
from llada_trm.progress import Bar, progress_bar
from llada_trm.run_checkpoint import init_from_config
from llada_trm.training.feature_cache import (
    MANIFEST_FILE,
    StaleFeatureCacheError,
    backbone_fingerprint,
    check_manifest,
    data_fingerprint,
    read_manifest,
    remove_store,
    require_frozen_backbone,
    shard_name,
    store_directory,
    sweep_temporaries,
    write_manifest,
)
from llada_trm.training.freezing import freeze_for_run

__all__ = [
    "SAMPLER_STATES_CHECKED",
    "SAMPLER_STATES_FORMAT",
    "STATE_KEYS",
    "SamplerStates",
    "StateMix",
    "StateRecorder",
    "build_sampler_states",
    "choose_steps",
    "open_sampler_states",
    "prepare_sampler_states",
    "sampler_states_directory",
    "sampler_states_manifest",
    "state_noise",
    "write_sampler_states",
]


# ------------------------------------------------------------------------------ recording the store

SAMPLER_STATES_FORMAT = 1
BATCHES_PER_SHARD = 32  # a shard is redone after a crash: 32 sampler batches is a few minutes on LLaDA-8B
_RECORD_KEYS = ("states", "targets", "example", "step", "prompt_lengths")
REBUILD = "llada-trm cache --sampler-states --config <config> --rebuild"


class StateRecorder:
    """The model the sampler calls, recording the whole sequence each call saw.

    A full call (no cache) sees the whole sequence; a KV-cache call sees the window `cache_position..+S`,
    and the rest of the sequence is what the last call saw: the sampler only commits tokens inside the
    current block, which every window covers. `states[k]` is the [B, L] sequence of call k, on the CPU.
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self.config = model.config  # the sampler reads the [MASK] id and vocabulary from it
        self.states: list[Tensor] = []

    def __call__(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> Any:
        if kwargs.get("past_key_values") is None:
            seen = input_ids.detach().cpu().clone()
        else:
            start = kwargs.get("cache_position")
            if start is None or not self.states:
                raise ValueError("StateRecorder: a cached call needs cache_position and a full call first")
            seen = self.states[-1].clone()
            seen[:, int(start) : int(start) + input_ids.shape[1]] = input_ids.detach().cpu()
        self.states.append(seen)
        return self.model(input_ids, attention_mask=attention_mask, **kwargs)


def _state_seed(seed: int, what: str, index: int) -> int:
    """A generator seed for (seed, what, index): a hash, so nearby seeds give unrelated streams."""
    text = f"llada-trm/sampler-states/{what}/{seed}/{index}"
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def choose_steps(states: Sequence[Tensor], answer: slice, mask_id: int, count: int, seed: int) -> list[int]:
    """The recorded calls of one row: `count` of its distinct states with a masked answer position, drawn
    by a generator seeded with `seed`, in call order (fewer when the row has fewer)."""
    candidates: list[int] = []
    for k, state in enumerate(states):
        if k and torch.equal(state, states[k - 1]):
            continue  # a row whose block is done waits for the batch's other rows: the same state again
        if bool((state[answer] == mask_id).any()):
            candidates.append(k)
    order = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed))
    return sorted(candidates[int(j)] for j in order[:count])


# ---------------------------------------------------------------------------------------------- manifest


def sampler_states_manifest(
    *,
    backbone: str,
    examples: Sequence[EncodedExample],
    pad_id: int,
    options: SamplingOptions,
    seed: int,
    per_problem: int,
    compute: str,
    backbone_path: str = "",
) -> dict[str, Any]:
    """What a store for this run must have been built from (`SAMPLER_STATES_CHECKED` must match)."""
    if per_problem < 1:
        raise ValueError(f"per_problem must be >= 1, got {per_problem}")
    if not examples:
        raise ValueError("sampler states need at least one training example")
    seq_len = max(len(example["input_ids"]) for example in examples)
    width = max(int(example["prompt_length"]) for example in examples) + options.gen_length
    return {
        "format_version": SAMPLER_STATES_FORMAT,
        "complete": False,
        "backbone": {"fingerprint": backbone, "path": backbone_path},
        "data": {
            "fingerprint": data_fingerprint(examples, seq_len, pad_id),
            "examples": len(examples),
            "width": width,
            "pad_id": pad_id,
        },
        "sampling": {**options.to_dict(), "mask_id": options.mask_id, "eos_id": options.eos_id,
                     "eot_id": options.eot_id},
        "states": {"seed": seed, "per_problem": per_problem, "compute": compute},
    }


def _layout(manifest: Mapping[str, Any], examples_per_shard: int | None) -> dict[str, int]:
    batch = int(manifest["sampling"]["batch_size"])
    per_shard = batch * BATCHES_PER_SHARD if examples_per_shard is None else examples_per_shard
    if per_shard < 1 or per_shard % batch:
        raise ValueError(f"examples_per_shard ({per_shard}) must be a positive multiple of {batch}")
    n = int(manifest["data"]["examples"])
    return {"examples_per_shard": per_shard, "shards": math.ceil(n / per_shard)}


# ------------------------------------------------------------------------------------------------ build


def _shard_done(path: Path, first: int, count: int) -> bool:
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
    except (SafetensorError, OSError):
        return False
    return meta.get("first_example") == str(first) and meta.get("count") == str(count)


class _ShardSampler:
    """Samples one shard's examples batch by batch, as `evaluate_model` batches prompts (left-padded)."""

    def __init__(self, backbone: Any, examples: Sequence[EncodedExample], manifest: Mapping[str, Any],
                 device: torch.device) -> None:
        self.backbone, self.examples, self.device = backbone, examples, device
        sampling = manifest["sampling"]
        self.options = SamplingOptions(**sampling)
        self.pad_id, self.width = int(manifest["data"]["pad_id"]), int(manifest["data"]["width"])
        self.seed, self.per_problem = int(manifest["states"]["seed"]), int(manifest["states"]["per_problem"])
        self.per_shard = int(manifest["layout"]["examples_per_shard"])

    def span(self, shard: int) -> tuple[int, int]:
        first = shard * self.per_shard
        return first, min(self.per_shard, len(self.examples) - first)

    def write(self, shard: int, path: Path, bar: Bar) -> None:
        first, count = self.span(shard)
        rows: dict[str, list[Any]] = {key: [] for key in _RECORD_KEYS}
        batch = self.options.batch_size
        for start in range(first, first + count, batch):
            for key, values in self._batch(range(start, min(start + batch, first + count))).items():
                rows[key].extend(values)
            bar.update(min(batch, first + count - start))
        out = {
            "states": torch.stack(rows["states"]).to(torch.int32),
            "targets": torch.stack(rows["targets"]).to(torch.int32),
            "example": torch.tensor(rows["example"], dtype=torch.int64),
            "step": torch.tensor(rows["step"], dtype=torch.int32),
            "prompt_lengths": torch.tensor(rows["prompt_lengths"], dtype=torch.int64),
        }
        with atomic_path(path) as tmp:
            meta = {"first_example": str(first), "count": str(count), "states": str(len(rows["step"]))}
            save_file(out, str(tmp), metadata=meta)

    def _batch(self, indices: range) -> dict[str, list[Any]]:
        """Sample one batch of prompts; the chosen states of each row, unpadded then right-padded to W."""
        prompts = [self.examples[i]["input_ids"][: self.examples[i]["prompt_length"]] for i in indices]
        longest = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), longest), self.pad_id, dtype=torch.long)
        attention = torch.zeros_like(ids)
        for row, prompt in enumerate(prompts):
            ids[row, longest - len(prompt) :] = torch.as_tensor(prompt)
            attention[row, longest - len(prompt) :] = 1
        recorder = StateRecorder(self.backbone)
        seed = _state_seed(self.seed, "batch", indices.start)  # the Gumbel noise at temperature > 0
        generator = torch.Generator(device=self.device).manual_seed(seed)
        sample(recorder, ids.to(self.device), attention.to(self.device), self.options, generator=generator)
        gen, mask_id = self.options.gen_length, self.options.mask_id
        out: dict[str, list[Any]] = {key: [] for key in _RECORD_KEYS}
        for row, (index, prompt) in enumerate(zip(indices, prompts, strict=True)):
            cut = longest - len(prompt)
            seen = [state[row, cut:] for state in recorder.states]
            answer = slice(len(prompt), len(prompt) + gen)
            target = self._target(self.examples[index], gen)
            steps_seed = _state_seed(self.seed, "steps", index)
            for step in choose_steps(seen, answer, mask_id, self.per_problem, steps_seed):
                out["states"].append(self._pad(seen[step]))
                out["targets"].append(target)
                out["example"].append(index)
                out["step"].append(step)
                out["prompt_lengths"].append(len(prompt))
        return out

    def _target(self, example: EncodedExample, gen: int) -> Tensor:
        prompt_length = int(example["prompt_length"])
        answer = list(example["input_ids"][prompt_length:])[:gen]
        ids = list(example["input_ids"][:prompt_length]) + answer + [self.pad_id] * (gen - len(answer))
        return self._pad(torch.as_tensor(ids))

    def _pad(self, row: Tensor) -> Tensor:
        padded = torch.full((self.width,), self.pad_id, dtype=torch.long)
        padded[: row.shape[0]] = row
        return padded


@torch.no_grad()
def write_sampler_states(
    backbone: Any,
    examples: Sequence[EncodedExample],
    directory: str | Path,
    manifest: Mapping[str, Any],
    *,
    device: torch.device | str = "cpu",
    examples_per_shard: int | None = None,
    progress: bool = True,
) -> SamplerStates:
    """Build (or resume building) the store described by `manifest` with `backbone`; return it opened.

    An existing manifest must match (else `StaleFeatureCacheError`); shards already on disk are kept.
    """
    directory = Path(directory)
    stored = read_manifest(directory)
    if stored is not None:
        check_manifest(stored, manifest, directory, sections=SAMPLER_STATES_CHECKED, rebuild=REBUILD)
        if stored.get("complete"):
            return SamplerStates(directory, stored)
        manifest = stored
        sweep_temporaries(directory)  # shards a killed build was writing
    elif directory.is_dir() and any(directory.iterdir()):
        raise ConfigError(
            f"{directory}: not empty and not a sampler-state store (no manifest.json); set "
            "advanced.sampler_states_dir to an empty or new directory"
        )
    else:
        manifest = {**manifest, "layout": _layout(manifest, examples_per_shard)}
        directory.mkdir(parents=True, exist_ok=True)
        write_manifest(directory, manifest)
    was_training = backbone.training
    backbone.eval()
    writer = _ShardSampler(backbone, examples, manifest, torch.device(device))
    todo = [k for k in range(int(manifest["layout"]["shards"]))
            if not _shard_done(directory / shard_name(k), *writer.span(k))]
    try:
        total = sum(writer.span(k)[1] for k in todo)
        with progress_bar(total, desc="sampler states", unit="problem", every=max(1, total // 20),
                          enabled=progress) as bar:
            for k in todo:
                writer.write(k, directory / shard_name(k), bar)
    finally:
        backbone.train(was_training)
    manifest = {**manifest, "complete": True}
    write_manifest(directory, manifest)
    return SamplerStates(directory, manifest)


# ----------------------------------------------------------------------------------------- run configs


def sampler_states_directory(config: RunConfig) -> Path:
    """`advanced.sampler_states_dir`, or `<output.dir>/sampler_states` when unset."""
    return store_directory(config.advanced.sampler_states_dir, config.output.dir, "sampler_states")


def prepare_sampler_states(
    config: RunConfig,
    model: Any,
    examples: Sequence[EncodedExample],
    *,
    tokenizer: Any,
    backbone_dir: str | Path,
    pad_id: int,
    device: torch.device,
    progress: bool = True,
) -> SamplerStates:
    """The run's store, opened; built first if absent, resumed if unfinished, refused if stale.

    The sampler runs the hybrid's backbone (`model.backbone`) with the run's `sampling:` options and the
    model's [MASK] and the tokenizer's EOS / EoT ids, as evaluation does, in the backbone's own dtype (no
    autocast: evaluation samples without one), on the first `advanced.sampler_states_problems` examples.
    Under torch.distributed rank 0 builds, the others wait.
    """
    examples = examples[: config.advanced.sampler_states_problems]  # None: every training problem
    ids = special_token_ids(tokenizer)
    options = replace(config.sampling.options(), mask_id=model.mask_token_id, eos_id=ids.eos, eot_id=ids.eot)
    limit = model.backbone.config.max_sequence_length
    longest = max(int(example["prompt_length"]) for example in examples) + options.gen_length
    if longest > limit:
        raise ConfigError(
            f"sampling.gen_length: the longest training prompt plus {options.gen_length} answer tokens is "
            f"{longest} positions, over the backbone's {limit}; lower sampling.gen_length or data.max_length"
        )
    manifest = sampler_states_manifest(
        backbone=backbone_fingerprint(backbone_dir),
        backbone_path=str(backbone_dir),
        examples=examples,
        pad_id=pad_id,
        options=options,
        seed=config.advanced.sampler_states_seed,
        per_problem=config.advanced.sampler_states_per_problem,
        compute=str(model.backbone.dtype).removeprefix("torch."),
    )
    directory = sampler_states_directory(config)
    if is_main_process():
        states = write_sampler_states(model.backbone, examples, directory, manifest, device=device,
                                      progress=progress)
    if is_distributed():
        torch.distributed.barrier()
    if not is_main_process():
        states = open_sampler_states(directory, manifest)
    return states


def build_sampler_states(config: RunConfig, *, progress: bool = True, rebuild: bool = False) -> Path:
    """`llada-trm cache --sampler-states --config FILE`: build (or resume, or confirm) the run's store.

    The run is assembled in the trainer's order (device and seed, backbone, `training.init_from`, freezing
    plan, data), so the store is the one training accepts. `rebuild=True` deletes an existing store first:
    only a sampler-state store (`remove_store`).
    """
    if rebuild:
        remove_store(sampler_states_directory(config), sections=SAMPLER_STATES_CHECKED)
    device, amp_dtype = start_run(config)
    built = build_model(config, device=device, dtype=backbone_dtype(config, amp_dtype))
    init_from_config(built.model, config, backbone_dir=built.backbone_dir)
    apply_backbone_options(built.model, config)
    require_frozen_backbone(freeze_for_run(built.model, config), "training.sampler_state_ratio")
    train_set, _ = build_datasets(config.data, built.tokenizer)
    states = prepare_sampler_states(
        config,
        built.model,
        train_set.examples,
        tokenizer=built.tokenizer,
        backbone_dir=built.backbone_dir,
        pad_id=train_set.pad_id,
        device=device,
        progress=progress and is_main_process(),
    )
    return states.directory


# ----------------------------------------------------------------------- reading the store, the mix

SAMPLER_STATES_CHECKED = {  # manifest section -> what a mismatch means to the user
    "format_version": "another store format version",
    "backbone": "other backbone weights or config (model.backbone)",
    "data": "other training data (data.* settings, data.max_length or the tokenizer)",
    "sampling": "other sampling settings (the run's sampling: section)",
    "states": "other state draws (training.seed, advanced.sampler_states_per_problem or backbone precision)",
}
STATE_KEYS = ("state_ids", "state_masked", "state_p_mask")  # a batch holding these trains on its own noise


class SamplerStates:
    """A complete store in memory (token ids only: a few hundred bytes a state) with its batch builder."""

    def __init__(self, directory: str | Path, manifest: Mapping[str, Any]) -> None:
        self.directory = Path(directory)
        self.manifest = dict(manifest)
        sampling = manifest["sampling"]
        self.gen_length, self.mask_id = int(sampling["gen_length"]), int(sampling["mask_id"])
        parts: dict[str, list[Tensor]] = {}
        for shard in range(int(manifest["layout"]["shards"])):
            path = self.directory / shard_name(shard)
            try:
                tensors = load_file(str(path))
            except (SafetensorError, OSError) as exc:
                raise StaleFeatureCacheError(
                    f"{path}: unreadable sampler-state shard ({' '.join(str(exc).split())[:200]}); rebuild "
                    "the store with `llada-trm cache --sampler-states --config <config> --rebuild`"
                ) from None
            for key, value in tensors.items():
                parts.setdefault(key, []).append(value)
        self.tensors = {key: torch.cat(values) for key, values in parts.items()}

    def __len__(self) -> int:
        return int(self.tensors["step"].shape[0])

    def batch(self, indices: Tensor | list[int]) -> dict[str, Tensor]:
        """States `indices` as a training batch: the SFT keys (`input_ids` = targets) plus `STATE_KEYS`."""
        rows = torch.as_tensor(indices, dtype=torch.long)
        prompt_lengths = self.tensors["prompt_lengths"][rows]
        width = int(prompt_lengths.max()) + self.gen_length  # trimmed to the batch's longest row
        states = self.tensors["states"][rows, :width].long()
        targets = self.tensors["targets"][rows, :width].long()
        masked = states == self.mask_id
        p_mask = masked.sum(dim=1, keepdim=True).float() / self.gen_length
        return {
            "input_ids": targets,
            "prompt_lengths": prompt_lengths,
            "answer_lengths": torch.full_like(prompt_lengths, self.gen_length),
            "state_ids": states,
            "state_masked": masked,
            "state_p_mask": p_mask.expand(-1, width).contiguous(),
        }


def state_noise(batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, Tensor] | None:
    """`(noisy, masked, p_mask)` of a sampler-state batch, None for a forward-process batch."""
    if STATE_KEYS[0] not in batch:
        return None
    return batch["state_ids"], batch["state_masked"], batch["state_p_mask"]


def _seed(seed: int, what: str, epoch: int) -> int:
    digest = hashlib.blake2b(f"llada-trm/state-mix/{what}/{seed}/{epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class StateMix:
    """Which micro-batches of an epoch read sampler states, and which states they read (module docstring)."""

    def __init__(
        self, states: SamplerStates, ratio: float, *, seed: int, batch_size: int, rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"training.sampler_state_ratio must be in (0, 1] for a mix, got {ratio}")
        if len(states) == 0:
            raise ConfigError(f"{states.directory}: the sampler-state store holds no state; rebuild it")
        self.states, self.ratio, self.seed = states, ratio, seed
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self._plans: dict[tuple[int, int], dict[int, int]] = {}
        self._orders: dict[int, Tensor] = {}

    def plan(self, epoch: int, micro_per_epoch: int) -> dict[int, int]:
        """{micro-batch index: its rank among the epoch's state batches}, for round(r * M) of the M."""
        key = (epoch, micro_per_epoch)
        if key not in self._plans:
            count = round(self.ratio * micro_per_epoch)
            generator = torch.Generator().manual_seed(_seed(self.seed, "batches", epoch))
            chosen = sorted(torch.randperm(micro_per_epoch, generator=generator)[:count].tolist())
            self._plans = {key: {index: c for c, index in enumerate(chosen)}}  # one epoch at a time
        return self._plans[key]

    def batch_for(self, epoch: int, index: int, micro_per_epoch: int) -> dict[str, Tensor] | None:
        """The state batch that replaces micro-batch `index` of `epoch`, or None when it stays as it is."""
        c = self.plan(epoch, micro_per_epoch).get(index)
        if c is None:
            return None
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(_seed(self.seed, "states", epoch))
            self._orders = {epoch: torch.randperm(len(self.states), generator=generator)}
        span = self.batch_size * self.world_size
        positions = torch.arange(c * span + self.rank, (c + 1) * span, self.world_size) % len(self.states)
        return self.states.batch(self._orders[epoch][positions])


def open_sampler_states(directory: str | Path, expected: Mapping[str, Any]) -> SamplerStates:
    """Open a complete store, refusing a stale or unfinished one."""
    directory = Path(directory)
    stored = read_manifest(directory)
    rebuild = "llada-trm cache --sampler-states --config <config>"
    checked = SAMPLER_STATES_CHECKED
    if stored is None:
        raise ConfigError(f"{directory}: no sampler-state store (no {MANIFEST_FILE}); build it: `{rebuild}`")
    check_manifest(stored, expected, directory, sections=checked, rebuild=f"{rebuild} --rebuild")
    if not stored.get("complete"):
        raise ConfigError(f"{directory}: the sampler-state store is unfinished; `{rebuild}` resumes it")
    return SamplerStates(directory, stored)
