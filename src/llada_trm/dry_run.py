"""`--dry-run` of `train`, `eval` and `compare`: the plan of a command, sized before any weight is read.

The model is built on the meta device from the backbone's config.json, or from LLaDA-8B's constants before
the download, so that a GPU run is planned on a laptop. Activation figures are estimates good to about a
factor of two (docs/llada8b.md); weights, gradients, optimizer states and the feature cache are exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llada_trm.config import RunConfig, check_backbone_fit
from llada_trm.errors import CheckpointError, ConfigError
from llada_trm.io import DTYPES
from llada_trm.model.llada_config import LLaDAConfig
from llada_trm.model.llada_weights import read_config, stored_weights

Echo = Callable[[str], None]
GB = 1e9
ADAMW_STATES = 2  # exp_avg and exp_avg_sq, fp32 like the trainable parameters


@dataclass
class BackboneSource:
    """Where the planned backbone's architecture came from, and what is on disk."""

    config: LLaDAConfig
    origin: str
    directory: Path | None
    stored: torch.dtype | None  # the weights' dtype on disk; None: no weights (yet)
    weights_note: str = ""
    has_tokenizer: bool = False


def backbone_source(backbone: str | Path) -> BackboneSource:
    """The architecture of `backbone` ('embedded' or a folder): its config.json when present, else LLaDA-8B's
    constants (LLaDA-8B stores bf16 weights)."""
    if str(backbone) == "embedded":
        from llada_trm.assets import embedded_backbone_dir

        path = Path(embedded_backbone_dir())
    else:
        path = Path(backbone).expanduser()
    if not (path / "config.json").is_file():
        return BackboneSource(
            LLaDAConfig.llada_8b(),
            f"LLaDA-8B's architecture constants ({path}/config.json not found: nothing downloaded yet?)",
            None,
            None,
            weights_note=f"no weights at {path}: `hf download GSAI-ML/LLaDA-8B-Instruct --local-dir {path}` "
            "(docs/llada8b.md); planned with LLaDA-8B's bf16",
        )
    try:
        stored = stored_weights(path)[0]
        note = "" if stored is not None else f"no weight files in {path} (config.json only)"
    except CheckpointError as exc:  # a partial download: an index naming absent shards
        stored, note = None, str(exc)
    has_tokenizer = any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
    return BackboneSource(read_config(path), f"{path}/config.json", path, stored, note, has_tokenizer)


def _meta_model(run: RunConfig, bb: LLaDAConfig) -> Any:
    """The run's hybrid model (and LoRA adapters) on the meta device: shapes and names, no memory."""
    from llada_trm.model.hybrid import LLaDATRMHybrid
    from llada_trm.model.llada import LLaDAModel
    from llada_trm.model.lora import attach_run_lora

    with torch.device("meta"):
        model = LLaDATRMHybrid(LLaDAModel(bb), run.model.hybrid())
        attach_run_lora(model, run)
    return model


# ------------------------------------------------------------------------------------------------- memory


@dataclass
class MemoryEstimate:
    """Bytes by kind; `notes` say what each estimate assumed."""

    parts: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def lines(self) -> list[str]:
        out = ["memory:"] + [f"  {name:<34} {value / GB:9.2f} GB" for name, value in self.parts.items()]
        out.append(f"  {'total (device memory, estimate)':<34} {self.total / GB:9.2f} GB")
        return out + [f"  ({note})" for note in self.notes]


def _backbone_numel(model: Any) -> tuple[int, int]:
    """(backbone base weights, everything else: refiners and adapters)."""
    base = sum(p.numel() for n, p in model.backbone.named_parameters() if "lora_" not in n)
    return base, sum(p.numel() for p in model.parameters()) - base


def _train_memory(run: RunConfig, model: Any, plan: Any, dtype: torch.dtype, act: int) -> MemoryEstimate:
    bb = model.backbone.config
    est = MemoryEstimate()
    base, rest = _backbone_numel(model)
    trained_base = sum(
        p.numel() for n, p in model.named_parameters()
        if n in set(plan.trainable_names) and n.startswith("backbone.") and "lora_" not in n
    )
    est.parts["weights: backbone"] = base * dtype.itemsize
    est.parts["weights: refiners / adapters (fp32)"] = rest * 4
    trainable = plan.trainable_params
    est.parts["gradients (fp32)"] = trainable * 4
    est.parts["optimizer: AdamW m, v (fp32)"] = trainable * 4 * ADAMW_STATES
    if trained_base and dtype != torch.float32:
        est.notes.append("a trained backbone in half precision: AdamW updates round at bf16")
    t, B, L = run.training, run.training.batch_size, run.data.max_length
    d, F, V, layers = bb.d_model, bb.mlp_hidden_size or bb.mlp_ratio * bb.d_model, bb.vocab_size, bb.n_layers
    K = run.model.max_recursive_steps
    bb_act = min(act, dtype.itemsize)  # a bf16 backbone computes in bf16 even without autocast
    frozen_pass = B * L * (3 * d + 2 * F) * bb_act + len(run.model.context_layers) * B * L * d * bb_act
    logits = B * L * V * 4
    if run.training.phase == 1 and not run.lora.enabled:
        kept_layers = 0
    elif run.training.phase == 2 or run.lora.enabled:
        kept_layers = min(t.unfreeze_last_n_layers, layers) if run.training.phase == 2 else layers
    else:
        kept_layers = layers
    per_layer = B * L * (d if run.advanced.gradient_checkpointing else 10 * d + 3 * F) * bb_act
    refiner = K * B * L * 12 * d * 4 if run.model.refiner != "none" else 0
    supervision = K * B * (L // 2) * V * 4 * 2 if run.model.refiner != "none" else 0
    backward = kept_layers * per_layer + refiner + supervision
    est.parts["activations (estimate)"] = frozen_pass + logits + backward
    est.notes.append(
        f"activations of one micro-batch of {B} x {L} tokens: the backbone's pass, fp32 logits, "
        f"{kept_layers} backbone layer(s) kept for backward, K={K} refiner steps and their deep-supervision "
        "logits at the masked half; about +/- 2x, docs/llada8b.md"
    )
    return est


def _cache_bytes(run: RunConfig, bb: LLaDAConfig, examples: int | None) -> str:
    """The feature cache's size on disk (exact per example and draw at data.max_length, an upper bound: the
    cache pads to the longest example)."""
    from llada_trm.training.feature_cache import CACHE_DTYPE  # a training plan's line only

    a = run.advanced
    context = bb.n_heads * bb.head_dim if run.model.context_layers and run.model.refiner == "slot" else 0
    per = run.data.max_length * (bb.d_model + context) * CACHE_DTYPE.itemsize * a.cache_noise_draws
    state = "on" if a.feature_cache else "off (advanced.feature_cache: true turns it on)"
    total = f", {examples * per / GB:.1f} GB for {examples} examples" if examples is not None else ""
    return (
        f"feature cache: {state}; at most {per / 1e6:.2f} MB per example ({a.cache_noise_draws} draw(s), "
        f"{str(CACHE_DTYPE).removeprefix('torch.')}, hidden {bb.d_model} + context {context} wide, "
        f"{run.data.max_length} positions)"
        f"{total}, on disk"
    )


# --------------------------------------------------------------------------------------------- the parts


def _device_line(name: str, setting: str, blockers: list[str]) -> str:
    have, gpu = torch.cuda.is_available(), str(name).startswith("cuda")
    if gpu and not have:
        blockers.append(f"{setting}: {name}, and this machine has no CUDA device (the plan is for a GPU)")
    where = "cuda" if gpu or (name == "auto" and have) else "cpu"
    return f"device: {setting} = {name} -> {where}" + ("" if have or where == "cpu" else " (not here)")


def _compute_dtype(run: RunConfig) -> torch.dtype | None:
    """The autocast dtype the run would get on its device (`build.resolve_precision`, without a device)."""
    mp, device = run.training.mixed_precision, run.training.device
    gpu = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if mp == "fp32" or (mp == "auto" and not gpu):
        return None
    return torch.bfloat16


def _backbone_dtype(
    run: RunConfig, source: BackboneSource, numel: int, frozen: bool, bf16: bool
) -> torch.dtype:
    from llada_trm.build import choose_backbone_dtype

    if run.model.dtype != "auto":
        return DTYPES[run.model.dtype]
    stored = source.stored if source.directory is not None else torch.bfloat16  # LLaDA-8B ships bf16
    return choose_backbone_dtype(stored, numel, frozen=frozen, bf16_compute=bf16)


def _data_lines(run: RunConfig, blockers: list[str]) -> tuple[list[str], int | None]:
    from llada_trm.build import build_records, overlap_warning

    d, t = run.data, run.training
    try:
        train, validation = build_records(d)
    except ConfigError as exc:
        blockers.append(str(exc))
        return [f"data: cannot count ({exc})"], None
    micro = math.ceil(len(train) / t.batch_size)
    per_epoch = math.ceil(micro / t.gradient_accumulation_steps)
    total = t.max_steps or per_epoch
    gsm8k = d.dataset == "gsm8k"
    source = f"{d.path}" if gsm8k else "generated task"
    splits = (d.train_split, d.eval_split) if gsm8k else ("train", "validation")
    lines = [
        f"data: {d.dataset} ({source}): {len(train)} training problems ({splits[0]}), {len(validation)} "
        f"validation ({splits[1]}); max_length {d.max_length}",
        f"steps: batch {t.batch_size} x accumulation {t.gradient_accumulation_steps} = "
        f"{t.batch_size * t.gradient_accumulation_steps} per optimizer step; {per_epoch} steps per epoch"
        + (f"; max_steps {t.max_steps}" if t.max_steps else " (max_steps null: one epoch)")
        + f" = {total} optimizer steps (examples longer than max_length are skipped when tokenised)",
    ]
    warning = overlap_warning(run)
    if warning:
        lines.append(f"warning: {warning}")
    return lines, len(train)


def _sampler_line(options: Any) -> str:
    o = options
    fast = f"threshold {o.threshold}, cache {o.cache}" if (o.threshold or o.cache) else "exact (1 token/step)"
    return (
        f"sampler: gen_length {o.gen_length}, steps {o.steps}, block_length {o.block_length}, remasking "
        f"{o.remasking}, temperature {o.temperature}, {fast}, batch {o.batch_size}, cfg_scale {o.cfg_scale}"
    )


def _echo_blockers(source: BackboneSource, blockers: list[str], echo: Echo) -> None:
    items = ([source.weights_note] if source.weights_note else []) + blockers
    echo("the real run would stop here at:" if items else "ready: nothing missing on this machine")
    for item in items:
        echo(f"  - {item}")


def _sizes(model: Any, plan: Any | None = None) -> str:
    total = sum(p.numel() for p in model.parameters())
    if plan is None:
        return f"parameters: {total / 1e6:,.1f}M total (sampling: nothing trains)"
    trainable = plan.trainable_params
    share = trainable / total if total else 0.0
    return f"parameters: {total / 1e6:,.1f}M total, {trainable / 1e6:,.3f}M trainable ({share:.2%})"


# ------------------------------------------------------------------------------------------------ train


def plan_train(run: RunConfig, echo: Echo = print, *, title: str = "train") -> dict[str, Any]:
    """Print the plan of `llada-trm train` for `run`; returns its figures (for compare and the tests)."""
    from llada_trm.training.freezing import freeze_for_run

    source = backbone_source(run.model.backbone)
    check_backbone_fit(run, source.config, source.origin)
    model = _meta_model(run, source.config)
    plan = freeze_for_run(model, run)
    bf16 = _compute_dtype(run) == torch.bfloat16
    numel = _backbone_numel(model)[0]
    dtype = _backbone_dtype(run, source, numel, plan.backbone_frozen or run.lora.enabled, bf16)
    blockers: list[str] = []
    echo(f"{title} --dry-run: the plan; no weights read, nothing written")
    echo(f"backbone: {run.model.backbone}: built on the meta device from {source.origin}")
    echo(_device_line(run.training.device, "--device", blockers))
    compute = "bf16 autocast" if bf16 else "fp32"
    echo(f"precision: backbone {str(dtype).removeprefix('torch.')} (derived), compute "
         f"{compute} (training.mixed_precision {run.training.mixed_precision}); refiners fp32")
    echo(plan.report())
    echo(_sizes(model, plan))
    if run.training.init_from:
        echo(f"init_from: {run.training.init_from} (read by the real run)")
    data, n_train = _data_lines(run, blockers)
    for line in data:
        echo(line)
    memory = _train_memory(run, model, plan, dtype, 2 if bf16 else 4)
    for line in memory.lines():
        echo(line)
    echo(_cache_bytes(run, source.config, n_train))
    echo(_sampler_line(run.sampling.options()))
    echo(f"output: {run.output.dir} (best by {run.output.save_best})")
    _echo_blockers(source, blockers, echo)
    return {
        "origin": source.origin,
        "total_params": plan.total_params,
        "trainable_params": plan.trainable_params,
        "memory": dict(memory.parts),
        "blockers": blockers,
    }


# ------------------------------------------------------------------------------------------------- eval


def _eval_memory(model: Any, dtype: torch.dtype, options: Any, prompt: int) -> MemoryEstimate:
    bb = model.backbone.config
    est = MemoryEstimate()
    base, rest = _backbone_numel(model)
    act = dtype.itemsize
    B, T = options.batch_size, prompt + options.gen_length
    d, F, V = bb.d_model, bb.mlp_hidden_size or bb.mlp_ratio * bb.d_model, bb.vocab_size
    est.parts["weights: backbone"] = base * act
    est.parts["weights: refiners (fp32)"] = rest * 4
    if options.cache:
        est.parts[f"KV cache ({options.cache})"] = 2 * bb.n_layers * B * T * d * act
    est.parts["activations (estimate)"] = B * T * (3 * d + 2 * F) * act + B * T * V * 4
    est.notes.append(f"sampling a batch of {B} x {T} positions ({prompt}-token prompts + gen_length "
                     f"{options.gen_length}): one block's pass and the fp32 logits; about +/- 2x")
    return est


def plan_eval(args: Any, options: Any, echo: Echo = print) -> dict[str, Any]:
    """Print the plan of `llada-trm eval --checkpoint ...` (args as parsed) under sampler `options`."""
    run, kind, backbone = _eval_target(args.checkpoint)
    source = backbone_source(backbone)
    hybrid = run if run is not None else RunConfig.model_validate({"model": {"refiner": "none"}})
    model = _meta_model(hybrid, source.config)
    blockers: list[str] = []
    echo("eval --dry-run: the plan; no weights read, nothing written")
    echo(f"checkpoint: {args.checkpoint} ({kind}); backbone built on the meta device from {source.origin}")
    echo(_device_line(args.device, "--device", blockers))
    bf16 = str(args.device).startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    numel = _backbone_numel(model)[0]
    dtype = DTYPES.get(args.dtype) or _backbone_dtype(hybrid, source, numel, True, bf16)  # "auto": derived
    echo(f"precision: backbone {str(dtype).removeprefix('torch.')} (--dtype {args.dtype}); refiners fp32")
    echo(_sizes(model) + (f"; refiner {run.model.refiner}" if run is not None else "; no refiner"))
    records, prompt = _eval_records(args, run, source, options, blockers, echo)
    memory = _eval_memory(model, dtype, options, prompt)
    for line in memory.lines():
        echo(line)
    echo(_sampler_line(options))
    _echo_blockers(source, blockers, echo)
    return {"origin": source.origin, "records": records, "memory": dict(memory.parts), "blockers": blockers}


def _eval_target(checkpoint: str) -> tuple[RunConfig | None, str, str]:
    """(the run config or None, what kind of checkpoint, the backbone folder) of `--checkpoint`, read from
    its config files only."""
    from llada_trm.evaluate.loading import export_run_config, read_export_section
    from llada_trm.run_checkpoint import read_run_config, resolve_checkpoint_dir

    path = Path(checkpoint).expanduser()
    if checkpoint == "embedded":
        return None, "the embedded backbone", "embedded"
    if not path.exists():
        return None, "not found: planned as a LLaDA-8B backbone", str(path)
    section = read_export_section(path) if path.is_dir() else None
    if section is not None:
        return export_run_config(path, section), "an export", str(path)
    if (path / "config.json").is_file():
        return None, "a backbone folder", str(path)
    run = read_run_config(resolve_checkpoint_dir(path))
    return run, "a training run", run.model.backbone


def _eval_records(
    args: Any, run: RunConfig | None, source: BackboneSource, options: Any, blockers: list[str], echo: Echo
) -> tuple[int | None, int]:
    """Count the evaluated problems (and, with a tokenizer, the prompts that fit); the longest prompt's
    tokens for the memory estimate (256 when unknown)."""
    from llada_trm.evaluate.evaluator import load_eval_records, synthetic_settings

    data_path = args.data_path or (run.data.path if run is not None else None)
    try:
        records = load_eval_records(
            args.dataset, args.split, data_path=data_path,
            synthetic=synthetic_settings(run.data if run is not None else None, None), limit=args.limit,
        )
    except (ValueError, FileNotFoundError) as exc:
        blockers.append(str(exc))
        echo(f"data: cannot count ({exc})")
        return None, 256
    line = f"data: {len(records)} {args.dataset} problems ({args.split})"
    prompt = 256
    if source.has_tokenizer and source.directory is not None:
        from llada_trm.data.collate import encode_prompt
        from llada_trm.data.tokenizer import load_tokenizer
        from llada_trm.evaluate.evaluator import fit_prompts

        tokenizer = load_tokenizer(source.directory)
        lengths = [len(encode_prompt(tokenizer, r.question)) for r in records]
        prompt = max(lengths)
        try:
            fit = fit_prompts(lengths, options.gen_length, source.config.max_sequence_length)
            line += f"; {fit.line(options.gen_length)}"
        except ValueError as exc:
            blockers.append(str(exc))
    echo(line)
    if run is not None and args.dataset == run.data.dataset:
        from llada_trm.build import overlap_warning

        warning = overlap_warning(run, records)
        if warning:
            echo(f"warning: {warning}")
    return len(records), prompt


# ---------------------------------------------------------------------------------------------- compare


def plan_compare(config: Any, echo: Echo = print) -> dict[str, Any]:
    """Print the plan of `llada-trm compare`: every model's training plan in brief, the test problems and
    their disjointness, the sampler."""
    from llada_trm.build import check_test_split
    from llada_trm.evaluate.evaluator import load_eval_records, synthetic_settings

    seeds, ev, data = config.seed_list(), config.evaluation, config.run.data
    echo(f"compare --dry-run: the plan; no weights read, nothing written (output {config.output.dir})")
    echo(f"models: {', '.join(config.refiners)}" + (" and the backbone alone" if config.baseline else "")
         + f"; training seeds {', '.join(map(str, seeds))}: {len(seeds) * len(config.refiners)} trainings")
    plans: dict[str, Any] = {}
    for name in config.refiners:
        run = config.run_for(name, seeds[0], Path(config.output.dir) / f"seed{seeds[0]}" / name)
        echo(f"\n== {name} ==")
        plans[name] = plan_train(run, echo, title=f"{name}: train")
    echo("\n== test problems ==")
    try:
        records = load_eval_records(
            data.dataset, ev.split, data_path=data.path, synthetic=synthetic_settings(data),
            limit=ev.n_problems,
        )
        check = check_test_split(config.run, records)
        echo(f"evaluation: {len(records)} {data.dataset} problems ({ev.split}, checkpoint {ev.checkpoint}), "
             f"disjoint from training and validation ({check['method']})")
    except (ValueError, FileNotFoundError) as exc:
        records = None
        echo(f"evaluation: the real compare would refuse: {exc}")
    echo(_sampler_line(config.run.sampling.options()))
    return {"models": plans, "test_problems": None if records is None else len(records)}
