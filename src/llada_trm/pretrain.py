"""Train the embedded default: a tiny LLaDA-architecture backbone on the generated GSM8K-style task.

The project cannot download LLaDA-8B, so it ships a backbone of the same architecture, small enough to train
on a CPU in about an hour. It is trained from scratch with LLaDA's SFT objective (prompt kept, every answer
token maskable, 1/p_mask weighting) and saved in the same Hugging Face layout as LLaDA-8B (config.json,
model.safetensors, tokenizer files), so it loads through the same `from_pretrained` path.

    llada-trm pretrain --config configs/tiny_backbone.yaml
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import BeforeValidator, Field
from tqdm.auto import tqdm

from llada_trm.backbone import LLaDAConfig, LLaDAModel
from llada_trm.config import Float, Fraction, Int, NonNegInt, PosInt, _Section, _to_float, load_schema
from llada_trm.data import (
    GSM8KRecord,
    SFTDataset,
    SyntheticTaskConfig,
    build_tokenizer,
    generate_problems,
    prompt_batch,
    save_tokenizer,
    special_token_ids,
)
from llada_trm.diffusion import (
    decode_generated,
    forward_process,
    generate,
    masked_diffusion_loss,
    masked_token_accuracy,
)
from llada_trm.evaluate.extraction import is_correct
from llada_trm.io import replace_directory
from llada_trm.training.schedule import warmup_cosine

__all__ = ["PretrainConfig", "PretrainResult", "load_pretrain_config", "pretrain"]

PositiveFloat = Annotated[float, BeforeValidator(_to_float), Field(gt=0)]


class ArchitectureConfig(_Section):
    """The backbone's shape (LLaDA's field names); everything else is LLaDA-8B's."""

    d_model: PosInt = 128
    n_layers: PosInt = 6
    n_heads: PosInt = 4
    n_kv_heads: PosInt | None = None
    mlp_hidden_size: PosInt = 384
    max_sequence_length: PosInt = 256
    rope_theta: PositiveFloat = 10000.0


class TaskConfig(_Section):
    """The generated problems the backbone learns (see `llada_trm.data.SyntheticTaskConfig`)."""

    n_train: PosInt = 20000
    n_eval: PosInt = 200
    min_steps: PosInt = 1
    max_steps: PosInt = 4
    max_number: PosInt = 20
    max_result: PosInt = 1000
    seed: Int = 0
    vocab_size: PosInt = 1024
    max_length: PosInt = 192


class OptimConfig(_Section):
    """AdamW with linear warm-up and cosine decay to `min_lr_ratio` x lr."""

    steps: PosInt = 3000
    batch_size: PosInt = 32
    lr: Float = 2e-3
    min_lr_ratio: Fraction = 0.1
    warmup_steps: NonNegInt = 100
    weight_decay: Float = 0.1
    max_grad_norm: Float = 1.0
    seed: Int = 0
    eval_every: NonNegInt = 250
    log_every: PosInt = 25
    threads: PosInt | None = None


class SamplingConfig(_Section):
    """How the final accuracy is measured: LLaDA's sampler on held-out generated problems."""

    n_problems: PosInt = 100
    batch_size: PosInt = 50
    gen_length: PosInt = 128
    block_length: PosInt = 32
    steps: PosInt = 64


class PretrainOutputConfig(_Section):
    dir: str = "runs/tiny_backbone"
    dtype: str = Field(default="bfloat16", pattern="^(float32|bfloat16)$")


class PretrainConfig(_Section):
    """`llada-trm pretrain` config; sections mirror the run config's."""

    model: ArchitectureConfig = Field(default_factory=ArchitectureConfig)
    data: TaskConfig = Field(default_factory=TaskConfig)
    training: OptimConfig = Field(default_factory=OptimConfig)
    evaluation: SamplingConfig = Field(default_factory=SamplingConfig)
    output: PretrainOutputConfig = Field(default_factory=PretrainOutputConfig)


def load_pretrain_config(
    path: str | os.PathLike[str] | None, overrides: list[str] | None = None
) -> PretrainConfig:
    """Read and validate a pretrain YAML (None = the defaults), with `--set a.b=c` overrides."""
    return load_schema(PretrainConfig, path, overrides or [])


@dataclass
class PretrainResult:
    output_dir: Path
    parameters: int
    steps: int
    final_loss: float
    masked_accuracy: float
    accuracy: float
    elapsed_s: float


def _task(config: TaskConfig) -> SyntheticTaskConfig:
    return SyntheticTaskConfig(
        min_steps=config.min_steps,
        max_steps=config.max_steps,
        max_number=config.max_number,
        max_result=config.max_result,
        seed=config.seed,
    )


@torch.no_grad()
def _masked_accuracy(
    model: LLaDAModel, dataset: SFTDataset, mask_id: int, seed: int, batch_size: int
) -> float:
    """Masked-token accuracy at t = 0.5 on held-out examples, with fixed noise so evaluations compare."""
    generator = torch.Generator().manual_seed(seed)
    correct, total = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        batch = dataset.collate([dataset[i] for i in range(start, min(len(dataset), start + batch_size))])
        ids = batch["input_ids"]
        t = torch.full((ids.shape[0],), 0.5)
        noisy, masked, _ = forward_process(ids, batch["prompt_lengths"], mask_id, generator=generator, t=t)
        logits = model(noisy).logits
        n = int(masked.sum())
        correct += float(masked_token_accuracy(logits, ids, masked)) * n
        total += n
    return correct / max(1, total)


@torch.no_grad()
def sample_accuracy(
    model: Any, tokenizer: Any, records: list[GSM8KRecord], sampling: SamplingConfig, mask_id: int
) -> tuple[float, list[str]]:
    """Greedy LLaDA sampling on `records`; returns the strict `#### n` accuracy and the completions."""
    completions: list[str] = []
    for start in range(0, len(records), sampling.batch_size):
        chunk = records[start : start + sampling.batch_size]
        prompt, attention_mask = prompt_batch(tokenizer, [r.question for r in chunk])
        tokens = generate(
            model,
            prompt,
            attention_mask,
            steps=sampling.steps,
            gen_length=sampling.gen_length,
            block_length=sampling.block_length,
            mask_id=mask_id,
        )
        completions.extend(decode_generated(tokenizer, tokens, prompt.shape[1]))
    correct = sum(is_correct(text, record.answer) for text, record in zip(completions, records, strict=True))
    return correct / max(1, len(records)), completions


def pretrain(config: PretrainConfig, *, progress: bool = True) -> PretrainResult:
    """Generate the task, build the tokenizer, train the backbone, measure it, save it with a model card."""
    started = time.perf_counter()
    if config.training.threads:
        torch.set_num_threads(config.training.threads)
    torch.manual_seed(config.training.seed)
    task = _task(config.data)
    train_records = generate_problems(task, config.data.n_train, split="train")
    eval_records = generate_problems(task, config.data.n_eval, split="test")

    tokenizer = build_tokenizer(
        [text for r in train_records for text in (r.question, r.answer)], vocab_size=config.data.vocab_size
    )
    ids = special_token_ids(tokenizer)
    arch = config.model
    backbone_config = LLaDAConfig(
        d_model=arch.d_model,
        n_layers=arch.n_layers,
        n_heads=arch.n_heads,
        n_kv_heads=arch.n_kv_heads,
        mlp_hidden_size=arch.mlp_hidden_size,
        max_sequence_length=arch.max_sequence_length,
        rope_theta=arch.rope_theta,
        vocab_size=len(tokenizer),
        embedding_size=len(tokenizer),
        mask_token_id=ids.mask,
        eos_token_id=ids.eos,
        pad_token_id=ids.pad,
    )
    model = LLaDAModel(backbone_config)
    parameters = sum(p.numel() for p in model.parameters())

    train_set = SFTDataset(tokenizer, train_records, config.data.max_length)
    eval_set = SFTDataset(tokenizer, eval_records, config.data.max_length)
    opt = config.training
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
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
    out_dir = Path(config.output.dir)
    staging = out_dir.with_name(out_dir.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    metrics_path = staging / "pretrain_metrics.csv"
    columns = ["step", "loss", "lr", "grad_norm", "eval_masked_accuracy", "elapsed_s"]
    with metrics_path.open("w", newline="") as handle:
        csv.writer(handle).writerow(columns)

    generator = torch.Generator().manual_seed(opt.seed)
    model.train()
    loss_value = float("nan")
    bar = tqdm(range(opt.steps), desc="pretrain", disable=not progress, dynamic_ncols=True)
    for step in bar:
        indices = torch.randint(len(train_set), (opt.batch_size,), generator=generator).tolist()
        batch = train_set.collate([train_set[i] for i in indices])
        noisy, masked, p_mask = forward_process(
            batch["input_ids"], batch["prompt_lengths"], ids.mask, generator=generator
        )
        logits = model(noisy).logits
        loss = masked_diffusion_loss(logits, batch["input_ids"], masked, p_mask, batch["answer_lengths"])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"pretrain step {step}: loss is {loss.item()}; lower training.lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), opt.max_grad_norm))
        optimizer.step()
        scheduler.step()
        loss_value = loss.item()
        bar.set_postfix(loss=f"{loss_value:.3f}")
        is_eval = opt.eval_every and ((step + 1) % opt.eval_every == 0 or step + 1 == opt.steps)
        if (step + 1) % opt.log_every == 0 or is_eval:
            eval_acc = ""
            if is_eval:
                model.eval()
                eval_acc = f"{_masked_accuracy(model, eval_set, ids.mask, opt.seed, 64):.4f}"
                model.train()
            row = [step + 1, f"{loss_value:.5f}", f"{scheduler.get_last_lr()[0]:.3e}", f"{grad_norm:.4f}"]
            with metrics_path.open("a", newline="") as handle:
                csv.writer(handle).writerow([*row, eval_acc, f"{time.perf_counter() - started:.1f}"])

    model.eval()
    masked_acc = _masked_accuracy(model, eval_set, ids.mask, opt.seed, 64)
    n_problems = min(config.evaluation.n_problems, len(eval_records))
    accuracy, completions = sample_accuracy(
        model, tokenizer, eval_records[:n_problems], config.evaluation, ids.mask
    )
    elapsed = time.perf_counter() - started

    dtype = getattr(torch, config.output.dtype)
    model.to(dtype).save_pretrained(staging)
    save_tokenizer(tokenizer, staging)
    samples = [
        {"question": r.question, "reference": r.answer, "completion": c}
        for r, c in zip(eval_records[:5], completions[:5], strict=False)
    ]
    summary = {
        "parameters": parameters,
        "steps": opt.steps,
        "final_train_loss": loss_value,
        "eval_masked_accuracy_t0.5": masked_acc,
        "eval_accuracy_strict": accuracy,
        "eval_problems": n_problems,
        "elapsed_s": round(elapsed, 1),
        "torch_threads": torch.get_num_threads(),
        "config": config.model_dump(),
        "samples": samples,
    }
    (staging / "pretrain_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (staging / "README.md").write_text(_model_card(config, summary, len(tokenizer)))
    replace_directory(staging, out_dir)
    return PretrainResult(out_dir, parameters, opt.steps, loss_value, masked_acc, accuracy, elapsed)


def _model_card(config: PretrainConfig, summary: dict[str, Any], vocab: int) -> str:
    arch = config.model
    ev = config.evaluation
    return f"""# llada-trm embedded default: tiny LLaDA backbone

A LLaDA-architecture masked-diffusion model (llama blocks, RMSNorm, RoPE, SwiGLU, bidirectional attention)
trained from scratch by this project on its generated GSM8K-style word problems, so that the whole refiner
workflow runs on a CPU. It is not a general language model.

| | |
|---|---|
| parameters | {summary["parameters"] / 1e6:.2f} M |
| shape | d_model {arch.d_model}, {arch.n_layers} layers, {arch.n_heads} heads, \
SwiGLU {arch.mlp_hidden_size} |
| vocabulary | {vocab} tokens (byte-level BPE, digits split, LLaDA's special tokens and chat template) |
| task | generated problems of {config.data.min_steps}-{config.data.max_steps} arithmetic steps, \
numbers up to {config.data.max_number}, results up to {config.data.max_result} |
| training | {config.training.steps} steps x batch {config.training.batch_size}, \
{config.data.n_train} problems, seed {config.training.seed} |
| masked-token accuracy (t = 0.5, held-out) | \
{summary["eval_masked_accuracy_t0.5"]:.3f} |
| GSM8K-style accuracy (strict `#### n`, {summary["eval_problems"]} held-out problems) | \
{summary["eval_accuracy_strict"]:.3f} |
| sampler for that figure | greedy, gen_length {ev.gen_length}, block {ev.block_length}, {ev.steps} steps |
| wall time | {summary["elapsed_s"] / 60:.1f} min on {summary["torch_threads"]} CPU threads |

Re-create it (deterministic for the seed, up to floating-point differences between machines):

    llada-trm pretrain --config configs/tiny_backbone.yaml

Weights are stored in {config.output.dtype}; `pretrain_metrics.csv` has the training curve and
`pretrain_summary.json` the full config and a few sample completions.

Limitations: the masked-token accuracy is high because most answer tokens are the task's template (names,
units, `<<`, `>>`); a problem counts as solved only when every intermediate number is right. Read the sample
completions in `pretrain_summary.json` for what the model gets right (the answer format, the names and
operands it copies from the question) and wrong (the arithmetic results, the number of steps).
"""
