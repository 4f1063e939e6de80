"""`llada-trm pretrain`: train (or continue) a LLaDA-architecture backbone as a run of the one training loop.

The project cannot download LLaDA-8B, so it ships a small backbone of the same architecture. Pretraining it
is a `Trainer` run (`PretrainConfig.run_config`: no refiner, the whole backbone trained); what only
pretraining has comes in through `RunParts`: its starting backbone (`model.init_from`, or random weights
and a new tokenizer written once to `<run dir>/initial_backbone`), its datasets, object-noun token weights,
random EOS padding, validation targets and `training.stop_at`. At the end the backbone is measured on the
test split and saved in LLaDA-8B's Hugging Face layout with its model card (`export`).

    llada-trm pretrain --config configs/tiny_backbone.yaml [--resume [DIR]] [--out DIR] [--force]
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from llada_trm.config import fixed_settings
from llada_trm.data.arithmetic import generate_task_records
from llada_trm.data.collate import SFTDataset
from llada_trm.data.gsm8k import GSM8KRecord
from llada_trm.data.tokenizer import build_tokenizer, load_tokenizer, save_tokenizer, special_token_ids
from llada_trm.errors import CheckpointError, ConfigError
from llada_trm.io import atomic_directory, remove_directory, write_text_atomic
from llada_trm.model.llada import LLaDAModel
from llada_trm.model.llada_config import LLaDAConfig
from llada_trm.training.loop import RunParts, Trainer
from llada_trm.training.resume_config import flatten_settings, refuse_changes
from llada_trm.training.run_dir import (
    LOCK_FILE,
    RunDirError,
    RunLock,
    archive_run_dir,
    claim_run_dir,
    has_run,
)

from .config import ArchitectureConfig, PretrainConfig
from .export import check_output, export_backbone
from .targets import TARGET_COLUMNS, sample_predictions, target_metrics, targets_met

Echo = Callable[[str], None]
OLD_LAYOUT = (".pretrain-run", "checkpoint")  # a run of pretraining's own loop, before issue 25
INITIAL = "initial_backbone"  # a from-scratch run's random weights and new tokenizer, in the run directory
SETTINGS = "pretrain.yaml"  # the pretrain config a resume is checked against
SHAPE_FIELDS = ("d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size", "max_sequence_length",
                "rope_theta")  # fmt: skip
# pretrain builds its backbone in memory in float32 with AdamW (16 bytes a parameter): past this a typo in
# d_model or n_layers would exhaust the machine's memory rather than fail.
MAX_PRETRAIN_PARAMETERS = 2_000_000_000
RESUMABLE: tuple[str, ...] = (
    "training.steps", "training.lr", "training.min_lr_ratio", "training.warmup_steps", "training.eval_every",
    "training.log_every", "training.save_every", "training.checkpoint_dir", "training.threads",
    "training.stop_at", "training.stop_at.", "evaluation.batch_size", "evaluation.n_test", "output.",
)  # fmt: skip
"""Pretrain settings a resume may change (each maps onto a resumable run setting, or is read only at the
end); the shape, the data, the seeds, the weighting and the in-training evaluation would make another run."""


@dataclass
class PretrainResult:
    output_dir: Path
    parameters: int
    steps: int
    final_loss: float
    masked_accuracy: float
    accuracy: float
    elapsed_s: float
    stopped_at_target: bool = False
    test: dict[str, Any] = field(default_factory=dict)


def pretrain(
    config: PretrainConfig,
    *,
    progress: bool = True,
    resume: bool = False,
    force: bool = False,
    command: str | None = None,
    echo: Echo | None = None,
) -> PretrainResult:
    """Train (or continue) the backbone through the one loop, evaluate it on the way, save it with a card.

    `resume` continues the run in `config.run_dir()`; `force` archives an existing `output.dir` (a backbone)
    and an unfinished run before starting over. `command` is the command line the model card records.
    """
    say = echo or (lambda _line: None)
    started = time.perf_counter()
    check_output(config, force=force)
    run_dir = _claim_run_dir(config, resume=resume, force=force, say=say)
    if config.training.threads:
        torch.set_num_threads(config.training.threads)
    task = config.data.task()
    train_records = generate_task_records(task, config.data.n_train, split="train")
    n_validation = max(config.data.n_eval, config.evaluation.n_problems)
    val_records = generate_task_records(task, n_validation, "validation")
    backbone_dir = _starting_backbone(config, run_dir, train_records)
    parts = _run_parts(config, load_tokenizer(backbone_dir), train_records, val_records)
    with fixed_settings(config.run_constants()):  # its schedule's floor and logging interval
        trainer = Trainer(config.run_config(backbone_dir), progress=progress, parts=parts)
        if resume and has_run(run_dir):
            trainer.resume(run_dir)
        summary = trainer.train()
    stopped = bool(trainer.state.extra.get("stopped_early"))
    if stopped:
        say(f"every training.stop_at target met at step {trainer.state.step}: stopping early")
    backbone = trainer.model.backbone.eval()
    exported = export_backbone(
        config, backbone, trainer.tokenizer, run_dir,
        {"steps": trainer.state.step, "stopped_at_target": stopped,
         "final_train_loss": trainer.last_train_row.get("loss", summary["train_loss"])},
        {"train": train_records, "validation": val_records},
        time.perf_counter() - started, init_chain=init_chain(config), command=command, echo=say, force=force,
    )  # fmt: skip
    test = exported["test"]
    loss = float("nan") if summary["train_loss"] is None else float(summary["train_loss"])
    return PretrainResult(Path(config.output.dir), exported["parameters"], trainer.state.step, loss,
                          exported["eval_masked_accuracy_t0.5"], test["strict"], exported["elapsed_s"],
                          stopped_at_target=stopped, test=test)  # fmt: skip


# ------------------------------------------------------------------------------------ directories

def _claim_run_dir(config: PretrainConfig, *, resume: bool, force: bool, say: Echo) -> Path:
    """The run directory, checked: apart from `output.dir`, not another process's, a run's (or empty: the
    run removes it at the end, so it must hold nothing else), and for `resume` holding this run with the
    same settings; a new run archives an old one only with `force`."""
    run_dir, out = config.run_dir(), Path(config.output.dir)
    if run_dir.resolve() == out.resolve() or out.resolve() in run_dir.resolve().parents or (
        run_dir.resolve() in out.resolve().parents
    ):
        raise ConfigError(
            f"training.checkpoint_dir {run_dir} and output.dir {out} overlap; the run directory is removed "
            "when the backbone is written: set training.checkpoint_dir to a separate directory"
        )
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"training.checkpoint_dir {run_dir} is a file; set it to a directory")
    holder = RunLock(run_dir).holder() if run_dir.is_dir() else None
    if holder is not None:
        raise RunDirError(f"{run_dir}: {holder}; wait for it to finish, or set training.checkpoint_dir")
    old = run_dir.is_dir() and any((run_dir / name).exists() for name in OLD_LAYOUT)
    if old and not force:
        raise CheckpointError(
            f"{run_dir} holds a run of pretraining's own loop (before issue 25), which the one training loop "
            "cannot continue: finish it with llada-trm from before that change, or start over with --force "
            f"(archives it as {run_dir.name}.old-<timestamp>)"
        )
    ours = {LOCK_FILE, INITIAL, SETTINGS, *OLD_LAYOUT}
    foreign = run_dir.is_dir() and not has_run(run_dir) and any(p.name not in ours for p in run_dir.iterdir())
    if foreign:
        raise ConfigError(
            f"training.checkpoint_dir {run_dir} is not empty and holds no run; pretrain removes its run "
            "directory at the end: set training.checkpoint_dir to a new or empty directory"
        )
    settings = run_dir / SETTINGS
    if resume:
        if not settings.is_file():
            raise CheckpointError(f"--resume: no checkpoint in {run_dir}; drop --resume to start the run")
        saved = flatten_settings(yaml.safe_load(settings.read_text(encoding="utf-8")) or {})
        changed = refuse_changes(run_dir, saved, flatten_settings(config.plain()), RESUMABLE,
                                 "start a new run from its backbone with model.init_from")  # fmt: skip
        if changed:
            say(f"resuming {run_dir} with changed settings: {'; '.join(changed)}")
        write_text_atomic(settings, yaml.safe_dump(config.plain(), sort_keys=False))
        return run_dir
    if has_run(run_dir) and not force:
        raise CheckpointError(
            f"{run_dir} holds an unfinished run; pass --resume to continue it, or --force to archive it "
            f"(renamed to {run_dir.name}.old-<timestamp>) and start over"
        )
    if has_run(run_dir) or old:
        say(f"{run_dir} held an unfinished run: archived it as {archive_run_dir(run_dir)} (--force)")
    else:  # a run killed before its loop started: its start is built again, from this config
        remove_directory(run_dir / INITIAL)
    claim_run_dir(run_dir)  # nothing left to claim: refuses only if another run appeared meanwhile
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(settings, yaml.safe_dump(config.plain(), sort_keys=False))
    return run_dir


# ---------------------------------------------------------------------------------- the backbone

def _starting_backbone(config: PretrainConfig, run_dir: Path, train_records: list[GSM8KRecord]) -> Path:
    """The directory the run's `model.backbone` reads: `model.init_from` (its shape checked against
    `model.*`), or the run's own new backbone, built once (random weights, a tokenizer from the training
    problems) so that a resume continues from the same start."""
    arch = config.model
    if arch.init_from:
        return _check_init_from(Path(arch.init_from), arch)
    initial = run_dir / INITIAL
    if (initial / "config.json").is_file():
        return initial
    texts = [text for r in train_records for text in (r.question, r.answer)]
    tokenizer = build_tokenizer(texts, vocab_size=config.data.vocab_size)
    ids = special_token_ids(tokenizer)
    backbone_config = LLaDAConfig(
        **{name: getattr(arch, name) for name in SHAPE_FIELDS},
        vocab_size=len(tokenizer), embedding_size=len(tokenizer),
        mask_token_id=ids.mask, eos_token_id=ids.eos, pad_token_id=ids.pad,
    )  # fmt: skip
    if backbone_config.num_parameters() > MAX_PRETRAIN_PARAMETERS:  # before a byte of it is allocated
        raise ConfigError(
            f"model: d_model {arch.d_model} x n_layers {arch.n_layers} (mlp_hidden_size "
            f"{arch.mlp_hidden_size}) is {backbone_config.num_parameters() / 1e9:.1f}B parameters; pretrain "
            f"builds small backbones from scratch (at most {MAX_PRETRAIN_PARAMETERS / 1e9:.0f}B)"
        )
    torch.manual_seed(config.training.seed)
    with atomic_directory(initial) as staging:
        LLaDAModel(backbone_config).save_pretrained(staging)
        save_tokenizer(tokenizer, staging)
    return initial


def _check_init_from(directory: Path, arch: ArchitectureConfig) -> Path:
    """`model.init_from`, refused (one line) unless it is a backbone of the configured shape whose tokenizer
    fits its vocabulary: the config always tells the truth about the model it trains."""
    if not (directory / "config.json").is_file():
        raise ConfigError(f"model.init_from: {directory} is not a backbone directory (no config.json)")
    stored = LLaDAConfig.from_json_file(directory / "config.json")
    shape = {name: stored.n_heads if name == "n_kv_heads" and stored.n_kv_heads is None else
             getattr(stored, name) for name in SHAPE_FIELDS}  # fmt: skip
    wanted = {name: getattr(arch, name) for name in SHAPE_FIELDS}
    wanted["n_kv_heads"] = wanted["n_kv_heads"] or wanted["n_heads"]
    differ = [f"{k} {wanted[k]} vs {shape[k]}" for k in SHAPE_FIELDS if float(wanted[k]) != float(shape[k])]
    if differ:
        raise ConfigError(
            f"model.init_from: {directory} has another shape ({', '.join(differ)} stored); set model.* to "
            "the stored shape or drop init_from"
        )
    if stored.vocab_size != len(load_tokenizer(directory)):
        raise CheckpointError(
            f"model.init_from: {directory}: its tokenizer does not fit its model's {stored.vocab_size} "
            "tokens; point init_from at a backbone saved by llada-trm pretrain"
        )
    return directory


def init_chain(config: PretrainConfig) -> list[dict[str, Any]]:
    """The backbones this run continues, nearest first: each one's directory, command, seed and steps, as
    its pretrain_summary.json records them (its own chain included); [] for a run from scratch."""
    directory = config.model.init_from
    if not directory:
        return []
    try:
        summary = json.loads((Path(directory) / "pretrain_summary.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return [{"dir": str(directory)}]  # a backbone without a summary: its history is unknown
    training = (summary.get("config") or {}).get("training") or {}
    nearest = {"dir": str(directory), "command": summary.get("command"), "seed": training.get("seed"),
               "steps": summary.get("steps")}  # fmt: skip
    return [nearest, *(summary.get("init_chain") or [])]


# ------------------------------------------------------------------------------ what the loop gets

def _run_parts(
    config: PretrainConfig, tokenizer: Any, train_records: list[GSM8KRecord], val_records: list[GSM8KRecord]
) -> RunParts:
    """The datasets, batch rewriting, validation targets and stop rule of this pretraining."""
    data, opt = config.data, config.training
    object_ids = object_token_ids(tokenizer, getattr(config.data.task(), "items", ()))  # arithmetic: none
    pad_id = special_token_ids(tokenizer).eos

    def datasets(tok: Any) -> tuple[SFTDataset, SFTDataset | None]:
        val = SFTDataset(tok, val_records[: data.n_eval], data.max_length)
        return SFTDataset(tok, train_records, data.max_length), (val if len(val) else None)

    def batch(rows: dict[str, torch.Tensor], epoch: int, index: int) -> dict[str, torch.Tensor]:
        if data.random_padding:
            key = hashlib.sha256(f"{opt.seed}/{epoch}/{index}".encode()).digest()[:8]
            generator = torch.Generator().manual_seed(int.from_bytes(key, "little") >> 1)
            rows = pad_randomly(rows, data.max_length, pad_id, generator)
        weights = object_weights(rows["input_ids"], object_ids, opt.object_weight)
        return rows if weights is None else {**rows, "token_weights": weights}

    def validation(model: torch.nn.Module, tok: Any) -> dict[str, Any]:
        problems = val_records[: config.evaluation.n_problems]
        found = target_metrics(sample_predictions(model.backbone, tok, problems, config.evaluation))
        return {name: found[name] for name in TARGET_COLUMNS}

    def stop(row: Any) -> bool:
        return targets_met(opt.stop_at, row)

    return RunParts(datasets=datasets, batch=batch, validation=validation, validation_columns=TARGET_COLUMNS,
                    stop=stop if opt.stop_at else None, forward_mix=opt.forward_mix)  # fmt: skip


def pad_randomly(
    batch: dict[str, torch.Tensor], max_length: int, pad_id: int, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """`batch` EOS-padded on to a length drawn uniformly from [its length, max_length] (one draw): a backbone
    learns to end an answer in an EOS tail only as long as those it was trained on."""
    ids = batch["input_ids"]
    longest = ids.shape[1]
    extra = int(torch.randint(longest, max(longest, max_length) + 1, (1,), generator=generator)) - longest
    if not extra:
        return batch
    rows = ids.shape[0]
    return {
        **batch,
        "input_ids": torch.cat([ids, ids.new_full((rows, extra), pad_id)], dim=1),
        "attention_mask": torch.cat([batch["attention_mask"], ids.new_zeros((rows, extra))], dim=1),
        "answer_lengths": batch["answer_lengths"] + extra,
    }


def object_token_ids(tokenizer: Any, items: tuple[str, ...]) -> torch.Tensor:
    """The token ids of the task's object nouns as answers write them (" eggs", after a number)."""
    pieces = {t for item in items for t in tokenizer.encode(" " + item, add_special_tokens=False)}
    return torch.tensor(sorted(pieces), dtype=torch.long)


def object_weights(ids: torch.Tensor, object_ids: torch.Tensor, weight: float) -> torch.Tensor | None:
    """[B, L] loss weights: `weight` on object-noun tokens, 1 elsewhere (None when `weight` is 1)."""
    if weight == 1.0:
        return None
    return torch.where(torch.isin(ids, object_ids.to(ids.device)), weight, 1.0)
