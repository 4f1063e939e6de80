"""Train the embedded default: a tiny LLaDA-architecture backbone on the generated GSM8K-style task.

The project cannot download LLaDA-8B, so it ships a backbone of the same architecture, small enough to train
on a CPU. It is trained with LLaDA's SFT objective (prompt kept, every answer token maskable, 1/p_mask
weighting; `training.object_weight` up-weights the answer's object nouns), from scratch or continuing a
backbone (`model.init_from`), and saved in LLaDA-8B's Hugging Face
layout (config.json, model.safetensors, tokenizer files), so it loads through the same `from_pretrained`.

The run checkpoints itself (`run_dir`) and resumes exactly; every `eval_every` steps it samples answers to
validation problems and measures the targets (`targets`), stopping early once `training.stop_at` is met.
The model card's figures come from the test split at the end.

    llada-trm pretrain --config configs/tiny_backbone.yaml [--resume [DIR]] [--out DIR] [--force]
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llada_trm.data import SFTDataset, collate_batch, special_token_ids
from llada_trm.data.arithmetic import generate_task_records
from llada_trm.diffusion.forward_process import forward_process, masked_diffusion_loss
from llada_trm.progress import progress_bar
from llada_trm.training.loop import warmup_cosine

from . import run_dir
from .config import PretrainConfig
from .export import export_backbone
from .metrics_csv import METRICS_FILE, write_metrics
from .model_setup import build_backbone
from .targets import TARGET_COLUMNS, masked_accuracy, sample_predictions, target_metrics, targets_met

__all__ = ["PretrainResult", "pretrain"]

Echo = Callable[[str], None]


@dataclass
class PretrainResult:
    output_dir: Path
    parameters: int
    steps: int
    final_loss: float
    masked_accuracy: float
    accuracy: float
    elapsed_s: float
    interrupted: bool = False
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
    """Train (or continue) the backbone, evaluate it on the way, save it with a model card.

    `resume` continues the checkpoint in `config.run_dir()`; `force` archives an existing `output.dir`
    (a backbone) and an unfinished run before starting over. `command` is the command line the model card
    records. The run directory is locked while the run writes there.
    """
    say = echo or (lambda _line: None)
    run_dir.check_output(config, force=force)
    checkpoint, lock = run_dir.prepare_run_dir(config, resume=resume, force=force, say=say)
    try:
        return _pretrain(config, checkpoint, progress=progress, force=force, command=command, say=say)
    finally:
        lock.release()


def _pretrain(
    config: PretrainConfig, checkpoint: Path | None, *, progress: bool, force: bool, command: str | None,
    say: Echo,
) -> PretrainResult:
    """The run itself, under the run directory's lock (`pretrain`)."""
    session_start = time.perf_counter()
    opt = config.training
    if opt.threads:
        torch.set_num_threads(opt.threads)
    torch.manual_seed(opt.seed)
    task = config.data.task()
    train_records = generate_task_records(task, config.data.n_train, split="train")
    n_validation = max(config.data.n_eval, config.evaluation.n_problems)
    val_records = generate_task_records(task, n_validation, "validation")
    model, tokenizer = build_backbone(config, train_records)
    ids = special_token_ids(tokenizer)
    object_ids = object_token_ids(tokenizer, getattr(task, "items", ()))  # the arithmetic task has none
    train_set = SFTDataset(tokenizer, train_records, config.data.max_length)
    val_set = SFTDataset(tokenizer, val_records[: config.data.n_eval], config.data.max_length)
    optimizer, scheduler = _optimizer(model, config)
    generator = torch.Generator().manual_seed(opt.seed)
    state = run_dir.PretrainState()
    if checkpoint is not None:
        state, changed = run_dir.restore(checkpoint, config, model, optimizer, scheduler, generator)
        changes = f"; changed: {'; '.join(changed)}" if changed else ""
        say(f"resumed {checkpoint} at step {state.step}{changes}")
    metrics_path = config.run_dir() / METRICS_FILE

    def elapsed() -> float:
        return state.elapsed_before + time.perf_counter() - session_start

    def checkpoint_now() -> None:
        nonlocal session_start  # the saved elapsed time counts this session up to here: restart its clock
        state.elapsed_before, session_start = elapsed(), time.perf_counter()
        run_dir.save(config, model, optimizer, scheduler, generator, state)
        write_metrics(metrics_path, state.rows)

    def evaluate(row: dict[str, Any]) -> dict[str, Any]:
        model.eval()
        row["eval_masked_accuracy"] = masked_accuracy(model, val_set, ids.mask, opt.seed)
        problems = val_records[: config.evaluation.n_problems]
        found = target_metrics(sample_predictions(model, tokenizer, problems, config.evaluation))
        row.update({f"eval_{name}": found[name] for name in TARGET_COLUMNS})
        model.train()
        say(_eval_line(state.step + 1, found))
        return found

    model.train()
    loss_value = float(state.rows[-1]["loss"]) if state.rows else float("nan")
    bar = progress_bar(  # a bar on a terminal; in a log, one plain line every log_every steps
        opt.steps, desc="pretrain", unit="step", initial=state.step, every=opt.log_every, enabled=progress
    )
    with _signals() as caught, bar:
        while state.step < opt.steps and not state.stopped_at_target:
            batch = _random_batch(train_set, opt.batch_size, generator, config.data.random_padding)
            loss_value, grad_norm = _train_step(
                model, optimizer, scheduler, batch, ids.mask, generator, opt, object_ids
            )
            bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            bar.update(1)
            step = state.step + 1
            is_eval = bool(opt.eval_every) and (step % opt.eval_every == 0 or step == opt.steps)
            if step % opt.log_every == 0 or is_eval:
                lr = scheduler.get_last_lr()[0]
                row = {"step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm}
                if is_eval:
                    state.stopped_at_target = targets_met(opt.stop_at, evaluate(row))
                row["elapsed_s"] = elapsed()
                state.rows.append(row)
                write_metrics(metrics_path, state.rows)
            state.step = step
            if caught or (opt.save_every and step % opt.save_every == 0):
                checkpoint_now()
            if caught:
                where = config.run_dir()
                say(f"signal {caught[0]} at step {step}: checkpoint in {where}; continue with --resume")
                return PretrainResult(config.run_dir(), _parameters(model), step, loss_value, float("nan"),
                                      float("nan"), elapsed(), interrupted=True)  # fmt: skip
    if state.stopped_at_target:
        say(f"every training.stop_at target met at step {state.step}: stopping early")
    checkpoint_now()  # a crash in the final evaluation or the export resumes here, not from scratch
    model.eval()
    summary = export_backbone(
        config,
        model,
        tokenizer,
        state,
        {"train": train_records, "validation": val_records},
        elapsed(),
        command=command,
        echo=say,
        force=force,
    )
    test = summary["test"]
    return PretrainResult(Path(config.output.dir), summary["parameters"], state.step, loss_value,
                          summary["eval_masked_accuracy_t0.5"], test["strict"], summary["elapsed_s"],
                          stopped_at_target=state.stopped_at_target, test=test)  # fmt: skip


def _optimizer(model: torch.nn.Module, config: PretrainConfig):
    opt = config.training
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": opt.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=opt.lr,
        betas=(0.9, 0.95),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: warmup_cosine(
            s, warmup_steps=opt.warmup_steps, total_steps=opt.steps, min_ratio=opt.min_lr_ratio
        ),
    )
    return optimizer, scheduler


def _random_batch(
    train_set: SFTDataset, batch_size: int, generator: torch.Generator, random_padding: bool = False
) -> dict[str, Any]:
    """`batch_size` examples drawn with replacement, EOS-padded to the longest one or, with
    `random_padding`, to a length drawn uniformly from [longest, max_length] (one more draw per batch)."""
    indices = torch.randint(len(train_set), (batch_size,), generator=generator).tolist()
    examples = [train_set[i] for i in indices]
    if not random_padding:
        return train_set.collate(examples)
    longest = max(len(example["input_ids"]) for example in examples)
    length = int(torch.randint(longest, max(longest, train_set.max_length) + 1, (1,), generator=generator))
    return collate_batch(examples, train_set.pad_id, pad_to=length)


def object_token_ids(tokenizer: Any, items: tuple[str, ...]) -> torch.Tensor:
    """The token ids of the task's object nouns as answers write them (" eggs", after a number)."""
    pieces = {t for item in items for t in tokenizer.encode(" " + item, add_special_tokens=False)}
    return torch.tensor(sorted(pieces), dtype=torch.long)


def object_weights(ids: torch.Tensor, object_ids: torch.Tensor, weight: float) -> torch.Tensor | None:
    """[B, L] loss weights: `weight` on object-noun tokens, 1 elsewhere (None when `weight` is 1)."""
    if weight == 1.0:
        return None
    return torch.where(torch.isin(ids, object_ids), weight, 1.0)


def _train_step(  # noqa: PLR0913 - the loop's state, passed rather than kept
    model, optimizer, scheduler, batch, mask_id, generator, opt, object_ids
) -> tuple[float, float]:
    """One step of LLaDA's SFT objective on `batch` (object nouns weighted by `opt.object_weight`); the
    noise is drawn from `generator`."""
    ids, prompt_lengths = batch["input_ids"], batch["prompt_lengths"]
    noisy, masked, p_mask = forward_process(ids, prompt_lengths, mask_id, generator=generator)
    logits = model(noisy).logits
    loss = masked_diffusion_loss(
        logits, ids, masked, p_mask, batch["answer_lengths"],
        token_weights=object_weights(ids, object_ids, opt.object_weight),
    )  # fmt: skip
    if not torch.isfinite(loss):
        raise FloatingPointError(f"pretrain: loss is {loss.item()}; lower training.lr")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), opt.max_grad_norm))
    optimizer.step()
    scheduler.step()
    return loss.item(), grad_norm


def _parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _eval_line(step: int, found: dict[str, Any]) -> str:
    def show(value: Any) -> str:
        return "-" if value is None else f"{value:.3f}"

    ops = " ".join(f"{name.removeprefix('arithmetic_')} {show(found[name])}" for name in TARGET_COLUMNS
                   if name.startswith("arithmetic_"))  # fmt: skip
    entity, lines = show(found["entity_copy"]), show(found["line_arithmetic"])
    strict = show(found["strict"])
    return f"step {step}: validation strict {strict}, entity copy {entity}, line arithmetic {lines} ({ops})"


@contextlib.contextmanager
def _signals() -> Iterator[list[int]]:
    """While training, SIGINT / SIGTERM only note themselves (the loop checkpoints and returns after the
    step); a second one acts at once. Outside the main thread signals are left alone."""
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def note(signum: int, _frame: Any) -> None:
        caught.append(signum)
        signal.signal(signum, previous[signum])

    for sig in previous:
        signal.signal(sig, note)
    try:
        yield caught
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
