"""Reading and writing LLaDA checkpoints in the Hugging Face layout (`config.json` and `model.safetensors`,
or shards listed by `model.safetensors.index.json`).

Loading is streamed onto a meta-device model, so peak memory is one copy of the weights (LLaDA-8B: 16 GB in
bf16); every name and shape is checked before a tensor is read. Saving writes under temporary names and
renames, the entry point (`model.safetensors` / the index) last: a crash leaves the old checkpoint, the new
one, or a directory that fails to load with a clear error, never a mix.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from llada_trm.errors import CheckpointError
from llada_trm.io import dtype_named, fsync_file
from llada_trm.model.llada_config import LLaDAConfig
from llada_trm.progress import weights_progress
from llada_trm.text import read_utf8

if TYPE_CHECKING:
    from torch import nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_SHARD_PATTERN = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_MAX_LISTED = 20  # offending keys listed per category in a mismatch error

DTypeLike = torch.dtype | str | None

def resolve_dtype(dtype: DTypeLike) -> torch.dtype | None:
    """Floating dtype from a dtype or a name ("bfloat16", "bf16", "torch.float16"); None/"auto": keep."""
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, str):
        return dtype_named(dtype)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch dtype, got {dtype!r}")
    return dtype


def parse_size(size: int | str | None) -> int | None:
    """Bytes from an int or an HF-style size string ("5GB" = 5e9, "2GiB" = 2**31, "500MB", "100KB")."""
    if size is None:
        return None
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    elif isinstance(size, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", size, flags=re.IGNORECASE)
        if match is None:
            raise ValueError(f"cannot parse shard size {size!r}; use bytes or a string like '2GB' or '500MB'")
        unit = (match.group(2) or "B").upper()
        base = 1024 if "I" in unit else 1000
        power = "BKMGT".index(unit[0])
        value = int(float(match.group(1)) * base**power)
    else:
        raise ValueError(f"max_shard_size must be an int or a size string, got {size!r}")
    if value <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return value


# ---------------------------------------------------------------------------------------------------- reading
def read_config(path: str | Path) -> LLaDAConfig:
    """The `LLaDAConfig` of a checkpoint directory."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {path}")
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise CheckpointError(f"{config_file} not found: a LLaDA checkpoint directory needs its config.json")
    return LLaDAConfig.from_json_file(config_file)


# safetensors' dtype names of the floating types; anything else (I64, BOOL, ...) cannot be a weight.
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def stored_weights(path: str | Path) -> tuple[torch.dtype | None, int]:
    """(the floating dtype that holds most of a checkpoint's weights, their element count), read from the
    safetensors headers alone; (None, 0) when the directory has no weight files (a config.json only)."""
    path = Path(path)
    try:
        weight_map = _weight_map(path)
    except CheckpointError:
        if not (path / INDEX_NAME).is_file() and not (path / WEIGHTS_NAME).is_file():
            return None, 0
        raise
    elements: dict[str, int] = {}
    for file in sorted(set(weight_map.values())):
        for shape, name in _read_header(file).values():
            if name in _TORCH_DTYPES:
                elements[name] = elements.get(name, 0) + math.prod(shape)
    if not elements:
        return None, 0
    return _TORCH_DTYPES[max(elements, key=elements.__getitem__)], sum(elements.values())


def stored_dtype(path: str | Path) -> torch.dtype | None:
    """The dtype a checkpoint stores its weights in (LLaDA-8B: bfloat16); None without weight files."""
    return stored_weights(path)[0]


def _read_header(file: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tensor names, shapes and dtype names of one safetensors file, without reading the data."""
    try:
        with safe_open(str(file), framework="pt") as f:
            slices = {key: f.get_slice(key) for key in f.keys()}
            return {key: (tuple(s.get_shape()), s.get_dtype()) for key, s in slices.items()}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"cannot read safetensors file {file}: {err} (corrupt or truncated?)") from None


def _plain_name(name: object) -> bool:
    plain = isinstance(name, str) and name not in ("", ".", "..") and "\\" not in name
    return plain and Path(str(name)).name == name


def _weight_map(path: Path) -> dict[str, Path]:
    """Which file holds each tensor, from the index if there is one, else from model.safetensors."""
    index_file, single_file = path / INDEX_NAME, path / WEIGHTS_NAME
    if index_file.is_file():
        try:
            weight_map = json.loads(read_utf8(index_file, CheckpointError))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, RecursionError) as err:
            raise CheckpointError(f"{index_file} is not a valid safetensors index ({err!r})") from None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_file}: 'weight_map' must map tensor names to shard files")
        bad = sorted(str(n) for n in set(weight_map.values()) if not _plain_name(n))
        if bad:  # an index naming `../x` or an absolute path would read weights from outside the folder
            raise CheckpointError(
                f"{index_file}: shard names must be plain file names inside {path}, got {', '.join(bad[:3])}"
            )
        shards = {name: path / name for name in set(weight_map.values())}
        absent = sorted(name for name, file in shards.items() if not file.is_file())
        if absent:
            raise CheckpointError(f"{index_file} lists shard(s) missing from {path}: {', '.join(absent)}")
        return {key: shards[name] for key, name in weight_map.items()}
    if single_file.is_file():
        return dict.fromkeys(_read_header(single_file), single_file)
    raise CheckpointError(f"no {WEIGHTS_NAME} or {INDEX_NAME} in {path}")


_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def check_layout(config: LLaDAConfig, path: str | Path) -> None:
    """Refuse a config.json whose layer count the weights contradict, reading only the safetensors headers:
    a damaged `n_layers` fails here, before a single block is built (every other size is bounded by
    `MAX_SIZES` and checked tensor by tensor against the headers, on the meta device, by `load_weights`)."""
    path = Path(path)
    weight_map = _weight_map(path)
    blocks = {int(m.group(1)) for key in weight_map if (m := _BLOCK.search(key))}
    if blocks and len(blocks) != config.n_layers:
        raise CheckpointError(
            f"{path / CONFIG_NAME}: n_layers={config.n_layers}, but the weights hold {len(blocks)} blocks; "
            "restore the config.json that came with these weights"
        )


def _listing(items: list[str]) -> str:
    shown = items[:_MAX_LISTED]
    more = f"\n    ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
    return "".join(f"\n    {item}" for item in shown) + more


def _check_against_model(
    model: nn.Module,
    weight_map: dict[str, Path],
    headers: dict[Path, dict[str, tuple[tuple[int, ...], str]]],
    path: Path,
) -> None:
    """Raise one CheckpointError listing every missing, unexpected, mis-shaped and non-floating tensor."""
    expected = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    problems = []
    missing = sorted(set(expected) - set(weight_map))
    if missing:
        problems.append(f"  missing from the checkpoint ({len(missing)}):" + _listing(missing))
    unexpected = sorted(set(weight_map) - set(expected))
    if unexpected:
        lines = [f"{key} (in {weight_map[key].name})" for key in unexpected]
        problems.append(f"  unexpected in the checkpoint ({len(unexpected)}):" + _listing(lines))
    mismatched, not_in_shard, not_float = [], [], []
    floating = {key for key, t in model.state_dict().items() if t.is_floating_point()}
    for key in sorted(set(expected) & set(weight_map)):
        file = weight_map[key]
        found = headers[file].get(key)
        if found is None:
            not_in_shard.append(f"{key} (index points to {file.name})")
        elif found[0] != expected[key]:
            mismatched.append(f"{key}: model expects {expected[key]}, {file.name} has {found[0]}")
        elif key in floating and found[1] not in _FLOAT_DTYPES:
            not_float.append(f"{key}: {found[1]} in {file.name}")
    if mismatched:
        problems.append(f"  wrong shape ({len(mismatched)}):" + _listing(mismatched))
    if not_float:
        problems.append(f"  not floating-point, cannot be weights ({len(not_float)}):" + _listing(not_float))
    if not_in_shard:
        header = f"  listed in {INDEX_NAME} but absent from the shard ({len(not_in_shard)}):"
        problems.append(header + _listing(not_in_shard))
    if problems:
        summary = f"checkpoint {path} does not match the model built from its {CONFIG_NAME}:\n"
        raise CheckpointError(summary + "\n".join(problems))


def _set_tensor(model: nn.Module, key: str, value: torch.Tensor) -> None:
    """Replace a (meta) parameter or buffer by `value`, keeping its requires_grad."""
    module_name, _, attr = key.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        old = module._parameters[attr]
        module._parameters[attr] = torch.nn.Parameter(value, requires_grad=old.requires_grad)
    else:
        module._buffers[attr] = value


# Elements per finiteness check. A whole-tensor `torch.isfinite(t).all()` makes temporaries of up to twice
# the tensor's bytes (2.2 GB on LLaDA-8B's 1 GB embedding) and glibc keeps much of that heap once freed;
# 64K-element slices (a few hundred KB of temporaries, reused block by block) read the memory-mapped tensor
# once, in place, at the same speed (issue 29: a sharded bf16 checkpoint peaks at 1.00x its bytes, not
# 1.7-2.2x).
_FINITE_SLICE = 1 << 16


def _all_finite(tensor: torch.Tensor, step: int = _FINITE_SLICE) -> bool:
    """Whether every element of a floating tensor is finite, checked slice by slice without a second copy."""
    flat = tensor.reshape(-1)  # a view for the contiguous tensors safetensors returns
    return all(bool(torch.isfinite(flat[i : i + step]).all()) for i in range(0, flat.numel(), step))


def load_weights(
    model: nn.Module, path: str | Path, dtype: DTypeLike = None, device: str | torch.device | None = None
) -> None:
    """Stream a checkpoint's tensors into `model` (typically built on the meta device), shard by shard."""
    path = Path(path)
    target_dtype = resolve_dtype(dtype)
    target_device = torch.device(device) if device is not None else torch.device("cpu")
    weight_map = _weight_map(path)
    files = sorted(set(weight_map.values()))
    headers = {file: _read_header(file) for file in files}
    _check_against_model(model, weight_map, headers, path)

    non_finite: list[str] = []
    size = sum(file.stat().st_size for file in files)
    bar = weights_progress(len(files), size, f"loading weights {path.name}")
    for file in files:
        keys = [key for key, f in weight_map.items() if f == file]
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for key in keys:
                    tensor = f.get_tensor(key)
                    if tensor.is_floating_point() and not _all_finite(tensor):
                        non_finite.append(f"{key} (in {file.name})")
                        continue
                    if target_dtype is not None and tensor.is_floating_point():
                        tensor = tensor.to(target_dtype)
                    _set_tensor(model, key, tensor.to(target_device))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"cannot read tensors from {file}: {err} (corrupt or truncated?)") from None
        bar.update(1)
    bar.close()
    if non_finite:
        # A NaN weight makes every loss NaN; named here it is not mistaken for a learning-rate problem.
        shown = ", ".join(non_finite[:_MAX_LISTED]) + (", ..." if len(non_finite) > _MAX_LISTED else "")
        raise CheckpointError(
            f"checkpoint {path} holds NaN/inf weights in {len(non_finite)} tensor(s): {shown}; the backbone "
            "is broken, re-download or re-train it"
        )

    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"checkpoint {path} left tensors uninitialised: {', '.join(left)}")


# ---------------------------------------------------------------------------------------------------- writing
def _plan_shards(state: dict[str, torch.Tensor], limit: int | None) -> list[list[str]]:
    """Greedy split in state-dict order; a tensor larger than `limit` gets a shard of its own."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if limit is not None and shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def save_state_dict(
    state: dict[str, torch.Tensor],
    config: LLaDAConfig,
    path: str | Path,
    max_shard_size: int | str | None = None,
) -> None:
    """Write config.json plus model.safetensors, or HF-style shards and an index above `max_shard_size`, for
    a backbone state dict (LLaDA's key names)."""
    path = Path(path)
    limit = parse_size(max_shard_size)
    path.mkdir(parents=True, exist_ok=True)
    if any(t.is_meta for t in state.values()):
        raise CheckpointError("cannot save a model whose weights are still on the meta device")
    shards = _plan_shards(state, limit)
    n = len(shards)
    names = [WEIGHTS_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    tag = f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staged: list[tuple[Path, Path]] = []  # (temporary, final) in rename order: config, shards, entry point

    try:
        config_tmp = path / (CONFIG_NAME + tag)
        staged.append((config_tmp, path / CONFIG_NAME))
        config_tmp.write_text(json.dumps(config.to_llada_json_dict(), indent=2, sort_keys=True) + "\n")
        fsync_file(config_tmp)
        total = sum(t.numel() * t.element_size() for t in state.values())
        bar = weights_progress(n, total, f"writing weights {path.name}")
        for name, keys in zip(names, shards, strict=True):
            tmp = path / (name + tag)
            staged.append((tmp, path / name))
            tensors = {k: state[k].detach().to("cpu").contiguous() for k in keys}
            save_file(tensors, str(tmp), metadata={"format": "pt"})
            del tensors
            os.chmod(tmp, stat.S_IMODE(config_tmp.stat().st_mode))  # open()'s mode, not safetensors' 0600
            fsync_file(tmp)
            bar.update(1)
        bar.close()
        if n > 1:  # the index is the entry point of a sharded checkpoint, so it is renamed last
            index = {
                "metadata": {"total_size": total},
                "weight_map": {key: name for name, keys in zip(names, shards, strict=True) for key in keys},
            }
            index_tmp = path / (INDEX_NAME + tag)
            staged.append((index_tmp, path / INDEX_NAME))
            index_tmp.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            fsync_file(index_tmp)
        old_shards = [p for p in path.iterdir() if _SHARD_PATTERN.fullmatch(p.name)]
        for old_entry in (INDEX_NAME, WEIGHTS_NAME):
            (path / old_entry).unlink(missing_ok=True)
        for tmp, final in staged:
            os.replace(tmp, final)
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    keep = {path / name for name in names}
    for old in old_shards:
        if old not in keep:
            old.unlink(missing_ok=True)
