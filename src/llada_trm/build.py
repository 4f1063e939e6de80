"""One path from a config to a run's parts: device, precision, backbone, tokenizer, hybrid model, datasets.

Every command builds what it runs here, in the trainer's order (the trainer seeds before `build_model`, whose
refiner draws from the global RNG, then `build_datasets`), so a run draws the same numbers whatever builds it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from llada_trm.config import DataConfig, RunConfig, check_backbone_fit
from llada_trm.data.arithmetic import generate_task_records
from llada_trm.data.collate import SFTDataset
from llada_trm.data.disjoint import check_disjoint
from llada_trm.data.gsm8k import DataError, GSM8KRecord, load_gsm8k
from llada_trm.data.tokenizer import load_tokenizer, mask_token_id
from llada_trm.errors import ConfigError
from llada_trm.io import DTYPES, dtype_named
from llada_trm.model.hybrid import LLaDATRMHybrid
from llada_trm.model.hybrid_config import HybridConfig
from llada_trm.model.llada_weights import read_config, stored_weights

logger = logging.getLogger("llada_trm")


# ------------------------------------------------------------------------------------------ environment


def resolve_precision(mixed_precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32. 'auto' = bf16 on a bf16-capable GPU, fp32 on a CPU."""
    bf16_gpu = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if mixed_precision == "fp32":
        return None
    if mixed_precision == "auto":
        return torch.bfloat16 if bf16_gpu else None
    if device.type == "cuda" and not bf16_gpu:
        raise ConfigError("training.mixed_precision: this GPU has no bf16 support; use fp32 (or auto)")
    return torch.bfloat16


# --------------------------------------------------------------------------------------------- the model


def resolve_backbone_dir(backbone: str) -> Path:
    """`model.backbone` as a directory: 'embedded' (the package's tiny backbone) or a local path."""
    if backbone == "embedded":
        try:
            from llada_trm.assets import embedded_backbone_dir
        except ImportError:
            raise ConfigError(
                "model.backbone: 'embedded' needs the packaged tiny backbone (llada_trm.assets), which this "
                "installation lacks; give the path of an HF-layout checkpoint directory instead"
            ) from None
        return Path(embedded_backbone_dir())  # a one-line error naming the re-training command if absent
    path = Path(backbone).expanduser()
    download = (
        f"`hf download GSAI-ML/LLaDA-8B-Instruct --local-dir {path}` (docs/llada8b.md), or use 'embedded'"
    )
    if not path.exists():
        raise ConfigError(
            f"model.backbone: no such folder {str(path)!r} (a local folder with config.json and safetensors; "
            f"nothing is fetched from the Hub); download it: {download}"
        )
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"model.backbone: {backbone!r} is a folder without config.json (an interrupted download?); "
            f"complete it: {download}"
        )
    return path


def hybrid_config(config: RunConfig) -> HybridConfig:
    """The `model` section as the hybrid model's own config."""
    return config.model.hybrid()


# Below this many bytes of fp32 weights a half-precision checkpoint is widened to fp32 where compute is fp32
# (a CPU): it costs little memory and keeps the small backbones' results as they were measured (the
# embedded 1.4M backbone, stored in bf16, is 6 MB in fp32). LLaDA-8B (32 GB in fp32) stays bf16.
WIDEN_LIMIT_BYTES = 2**30


def choose_backbone_dtype(
    stored: torch.dtype | None, numel: int, *, frozen: bool, bf16_compute: bool
) -> torch.dtype:
    """What `auto` means for a backbone, in one place, from the dtype and size its checkpoint stores.

    A backbone that trains runs fp32 (its optimizer needs full-precision weights); a frozen one bf16 under
    bf16 compute, else the half precision its checkpoint stores (LLaDA-8B: 16 GB where fp32 would take 32 GB
    and round back to the same values) unless its fp32 copy is under WIDEN_LIMIT_BYTES; fp32 otherwise.
    """
    if not frozen:
        return torch.float32
    if bf16_compute:
        return torch.bfloat16
    if stored in (torch.bfloat16, torch.float16) and numel * 4 >= WIDEN_LIMIT_BYTES:
        return stored
    return torch.float32


def backbone_dtype(config: RunConfig, amp_dtype: torch.dtype | None) -> torch.dtype:
    """`model.dtype` of a training run; 'auto' by `choose_backbone_dtype` (the backbone is frozen in phase 1
    and under LoRA, whose adapters are fp32 whatever the base's dtype)."""
    name = config.model.dtype
    if name != "auto":
        return DTYPES[name]
    frozen = config.training.phase == 1 or config.lora.enabled
    stored, numel = stored_weights(resolve_backbone_dir(config.model.backbone))
    return choose_backbone_dtype(stored, numel, frozen=frozen, bf16_compute=amp_dtype == torch.bfloat16)


def inference_dtype(name: str, device: torch.device, backbone_dir: Path) -> torch.dtype:
    """`--dtype` of a command that only runs the model (eval, generate, lm-eval): an explicit name, or 'auto'
    by `choose_backbone_dtype` with the backbone frozen and bf16 compute on a bf16-capable GPU."""
    if name != "auto":
        return dtype_named(name)
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    stored, numel = stored_weights(backbone_dir)
    return choose_backbone_dtype(stored, numel, frozen=True, bf16_compute=bf16)


def load_hybrid(
    backbone_dir: Path,
    config: HybridConfig,
    *,
    dtype: torch.dtype,
    device: torch.device,
    where: str,
    error: type[ValueError] = ConfigError,
    section: str | None = None,
) -> tuple[LLaDATRMHybrid, PreTrainedTokenizerBase]:
    """The tokenizer beside a backbone (read first: a directory without one fails before gigabytes of weights
    load), the hybrid model on it, and the check that they agree on the mask id. Errors are `error` naming
    `where`; a refiner setting the backbone cannot take is a ConfigError prefixed by `section`, if given."""
    try:
        tokenizer = load_tokenizer(backbone_dir)
    except (FileNotFoundError, ValueError) as exc:
        raise error(f"{where}: cannot load the backbone's tokenizer ({exc})") from None
    try:
        model = LLaDATRMHybrid.from_pretrained(backbone_dir, config, dtype=dtype, device=device)
    except ConfigError as exc:
        if section is None:
            raise
        raise ConfigError(f"{section}: {exc}") from None
    if mask_token_id(tokenizer) != model.mask_token_id:
        raise error(
            f"{where}: the tokenizer's mask token id {mask_token_id(tokenizer)} differs from the backbone's "
            f"mask_token_id {model.mask_token_id}; they must come from the same checkpoint"
        )
    return model, tokenizer


@dataclass
class BuiltModel:
    """A run's hybrid model, its tokenizer and the backbone directory both came from."""

    model: LLaDATRMHybrid
    tokenizer: PreTrainedTokenizerBase
    backbone_dir: Path


def build_model(
    config: RunConfig,
    *,
    device: torch.device,
    dtype: torch.dtype,
    error: type[ValueError] = ConfigError,
    where: str = "model.backbone",
) -> BuiltModel:
    """The run's hybrid model and tokenizer (`error` and `where` as in `load_hybrid`)."""
    backbone_dir = resolve_backbone_dir(config.model.backbone)
    check_backbone_fit(config, read_config(backbone_dir), str(backbone_dir))  # before any weight loads
    model, tokenizer = load_hybrid(
        backbone_dir,
        hybrid_config(config),
        dtype=dtype,
        device=device,
        where=where,
        error=error,
        section="model",
    )
    return BuiltModel(model=model, tokenizer=tokenizer, backbone_dir=backbone_dir)


# ------------------------------------------------------------------------------------------------- data


def build_records(data: DataConfig) -> tuple[list[GSM8KRecord], list[GSM8KRecord]]:
    """Training and validation records: a GSM8K source sliced by the splits, or the generated task (its
    `validation` split: never the `test` split a comparison reports on)."""
    try:
        task = data.generated()  # a generated task's knobs; None for gsm8k
        if task is not None:
            train = generate_task_records(task, data.n_train, "train")
            evaluation = generate_task_records(task, data.n_eval, "validation") if data.n_eval else []
        else:  # the head of train, and its tail for validation (`DataConfig.train_split` / `eval_split`)
            records = load_gsm8k(data.path, "train")
            if data.n_train + data.n_eval > len(records):
                raise ConfigError(
                    f"data.n_train + data.n_eval = {data.n_train} + {data.n_eval} exceed the {len(records)} "
                    f"problems of {data.path}'s train split: training and validation would share problems; "
                    "lower one of them"
                )
            train = records[: data.n_train]
            evaluation = records[len(records) - data.n_eval :] if data.n_eval else []
    except (ValueError, FileNotFoundError) as exc:
        raise ConfigError(f"data: {exc}") from None
    return train, evaluation


def sampled_validation_records(data: DataConfig, n: int) -> list[GSM8KRecord]:
    """The first `n` validation problems, for the trainer's sampled-accuracy validation."""
    try:
        task = data.generated()
        if task is not None:
            return generate_task_records(task, n, "validation")
        records = load_gsm8k(data.path, data.eval_split) if data.eval_split else []
    except (ValueError, FileNotFoundError) as exc:
        raise ConfigError(f"data: {exc}") from None
    if not records:
        raise ConfigError("training.val_sampled_problems needs validation problems; set data.n_eval")
    return records[:n]


def check_test_split(config: RunConfig, test: list[GSM8KRecord]) -> dict[str, object]:
    """Refuse (DataError, one line) `test` problems that the run trains or validates on (the validation
    loss's and the sampled validation's problems both pick `best`); else the check's record
    (`data.disjoint.check_disjoint`)."""
    train, validation = build_records(config.data)
    sampled = config.training.val_sampled_problems
    if sampled > len(validation):
        validation = sampled_validation_records(config.data, sampled)
    return check_disjoint({"train": train, "validation": validation, "test": test})


def overlap_warning(config: RunConfig, evaluated: list[GSM8KRecord] | None = None) -> str | None:
    """A warning when a GSM8K run's training or validation problems share problems with the evaluated ones
    (default: `data.path`'s test split, when it has one), by the check that makes `compare` refuse; None
    when disjoint. Generated data is disjoint by construction."""
    if config.data.dataset != "gsm8k":
        return None
    if evaluated is None:
        try:
            evaluated = load_gsm8k(config.data.path, "test")
        except (ValueError, FileNotFoundError):
            return None  # no test split beside the data (a single file): nothing to compare with
    try:
        check_test_split(config, evaluated)
    except DataError as exc:
        return (
            f"{exc} — evaluating this run on that split reports problems it trained or chose 'best' on; "
            "`compare` refuses it (the 8B recipes validate on train[-200:])"
        )
    except ConfigError:
        return None  # the run's own data fails to load: the run reports that itself
    return None


def build_datasets(
    data: DataConfig, tokenizer: PreTrainedTokenizerBase
) -> tuple[SFTDataset, SFTDataset | None]:
    """Tokenised SFT datasets; examples longer than `data.max_length` are skipped (and counted)."""
    train_records, eval_records = build_records(data)
    train = SFTDataset(tokenizer, train_records, data.max_length)
    if len(train) == 0:
        raise ConfigError(
            f"data.max_length: none of the {len(train_records)} training examples fits in {data.max_length} "
            "tokens; raise data.max_length"
        )
    if train.num_skipped:
        logger.warning(
            "skipped %d of %d training examples longer than data.max_length=%d",
            train.num_skipped,
            len(train_records),
            data.max_length,
        )
    evaluation = SFTDataset(tokenizer, eval_records, data.max_length) if eval_records else None
    if evaluation is not None and evaluation.num_skipped and len(evaluation):
        logger.warning(
            "skipped %d of %d evaluation examples longer than data.max_length=%d; raise data.max_length to "
            "validate on them",
            evaluation.num_skipped,
            len(eval_records),
            data.max_length,
        )
    if evaluation is not None and len(evaluation) == 0:
        logger.warning(
            "none of the %d evaluation examples fits data.max_length=%d; validation is off (raise "
            "data.max_length)",
            len(eval_records),
            data.max_length,
        )
        evaluation = None
    return train, evaluation
