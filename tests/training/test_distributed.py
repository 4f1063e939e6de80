"""torch.distributed on CPU (gloo, 2 processes started here): DDP == one process, FSDP checkpoints, sharding.

One spawn runs every distributed scenario (process start-up and imports dominate the cost on a small CI
machine) and leaves its results on disk; the tests below compare them with single-process runs:

* DDP, 2 ranks x batch 2 == 1 process x batch 4 (same examples per step, same per-example noise), gradient
  accumulation with `no_sync`, validation, and a 2-rank checkpoint resumed by 1 process;
* a DDP batch in which no chunk is refined (every refiner parameter unused) finishes instead of hanging;
* DDP with LoRA adapters (phase 2): the adapters and the refiner are reduced, the frozen base is ignored, and
  the update equals one process's;
* FSDP phase 3: the sharded update equals one process's, and the checkpoint loads without
  torch.distributed to the same logits; resumed in one process or (re-sharded) in two, the next step agrees;
* `shard_indices` / `gather_objects` split work over ranks and gather it back in rank order, and
  `evaluate_model` under torch.distributed writes the same predictions as one process.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from tiny_assets import make_tiny_backbone, model_section

from llada_trm.build import hybrid_config
from llada_trm.config import fixed_settings, parse_config
from llada_trm.data.synthetic import SyntheticTaskConfig, generate_problems
from llada_trm.data.tokenizer import load_tokenizer
from llada_trm.diffusion.options import SamplingOptions
from llada_trm.dist_utils import resolve_strategy, shard_indices
from llada_trm.errors import ConfigError
from llada_trm.evaluate.evaluator import PREDICTIONS_FILE, evaluate_model
from llada_trm.model.hybrid import LLaDATRMHybrid
from llada_trm.model.llada_config import LLaDAConfig
from llada_trm.run_checkpoint import load_trainer_state, load_weights
from llada_trm.training.loop import Trainer

WORLD = 2
PAD_TO = 128  # every batch padded alike, so a row's loss does not depend on which rows share its batch
TIMEOUT_S = 240  # generous for a loaded 2-core machine; a hang fails instead of blocking CI
# 5 problems in batches of 2: rank 0 samples batches 0 and 2, rank 1 batch 1.
EVAL_OPTIONS = SamplingOptions(steps=8, gen_length=16, block_length=8, batch_size=2)


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory) -> Path:
    """A random 2-layer LLaDA backbone and a tokenizer trained on the generated task, in HF layout."""
    # init_std 0.3: a random model whose sampled answers differ from problem to problem
    return make_tiny_backbone(tmp_path_factory.mktemp("dist_backbone"), vocab_size=512, init_std=0.3)


def run_config(backbone_dir: Path, out: Path, *, threshold: float = 1.5, **training) -> dict:
    """16 examples, 2 epochs; 2 accumulated micro-batches per step; validation every 2 steps."""
    training = {
        "lr": 3e-3, "batch_size": 4, "gradient_accumulation_steps": 2, "max_steps": 4, "warmup_steps": 1,
        "eval_every": 2, "save_every": 3, "seed": 0,
        **training,
    }
    return {
        "model": model_section(backbone_dir, confidence_threshold=threshold),  # 0 refines no chunk
        "data": {
            "max_length": PAD_TO,
            "n_train": 16,
            "n_eval": 4,
        },
        "training": training,
        "output": {"dir": str(out)},
    }


def lora_config(backbone_dir: Path, out: Path, **training) -> dict:
    """`run_config` in phase 2 with rank-4 LoRA adapters on the last block; 2 steps."""
    training = {"phase": 2, "unfreeze_last_n_layers": 1, "backbone_lr": 1e-2, "max_steps": 2, **training}
    raw = run_config(backbone_dir, out, save_every=0, **training)
    raw["lora"] = {"rank": 4}
    return raw


def make_trainer(raw: dict) -> Trainer:
    trainer = Trainer(parse_config(raw), progress=False)
    trainer.train_set.pad_to = PAD_TO
    return trainer


def eval_records() -> list:
    return generate_problems(SyntheticTaskConfig(max_steps=2, max_number=10), 5, "test")


def fixed_input(backbone_dir: Path) -> torch.Tensor:
    """Two rows of token ids with masked answer positions, for comparing logits."""
    config = LLaDAConfig.from_json_file(backbone_dir / "config.json")
    ids = torch.randint(0, config.vocab_size - 8, (2, 24), generator=torch.Generator().manual_seed(3))
    ids[:, 12:20] = config.mask_token_id
    return ids


# ------------------------------------------------------------------------------------- the spawned job


def _worker(index: int, port: int, backbone_dir: str, out: str) -> None:
    """One rank of every distributed scenario, keeping snapshots of `last` (the retired `output.keep_last`,
    set through its hook in this spawned process), on the CPU and logging every step (the flags
    `--device cpu --log-every 1`, which tests/conftest.py sets in the parent)."""
    with fixed_settings({"output.keep_last": 2, "training.device": "cpu", "training.log_every": 1}):
        _scenarios(index, port, backbone_dir, out)


def _scenarios(index: int, port: int, backbone_dir: str, out: str) -> None:
    """Every distributed scenario of one rank; rank 0 writes what the tests compare."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(index), LOCAL_RANK=str(index),
        WORLD_SIZE=str(WORLD), OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    from torch.nn.parallel import DistributedDataParallel

    from llada_trm.dist_utils import gather_objects, unsharded

    root, out_dir = Path(backbone_dir), Path(out)
    results: dict = {}

    # DDP, phase 1: batch 2 per rank (global 4), accumulation 2.
    trainer = make_trainer(run_config(root, out_dir / "ddp", batch_size=2))
    assert trainer.strategy == "ddp" and isinstance(trainer.engine, DistributedDataParallel)
    results["ddp_ignored"] = sorted(trainer.engine.parameters_to_ignore)
    frozen = (n for n, p in trainer.engine.module.named_parameters() if not p.requires_grad)
    results["ddp_frozen"] = sorted(frozen)
    summary = trainer.train()
    results["ddp_steps"] = summary["steps"]
    head = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    gathered = gather_objects(head)  # DDP keeps the replicas identical
    results["ddp_replicas_equal"] = all(torch.equal(gathered[0][n], gathered[1][n]) for n in head)

    # DDP with nothing refined: every refiner parameter but the projections is unused on every rank.
    idle = make_trainer(run_config(root, out_dir / "idle", batch_size=2, threshold=0.0, max_steps=2))
    results["idle"] = idle.train()["train_loss"]

    # DDP with LoRA adapters on the last block (phase 2): the base weights are frozen and ignored by DDP.
    lora = make_trainer(lora_config(root, out_dir / "lora", batch_size=2))
    results["lora_strategy"] = lora.strategy
    results["lora_ignored"] = sorted(lora.engine.parameters_to_ignore)
    frozen = (n for n, p in lora.engine.module.named_parameters() if not p.requires_grad)
    results["lora_frozen"] = sorted(frozen)
    lora.train()

    # FSDP, phase 3: everything trains; batch 2 per rank.
    fsdp_run = run_config(root, out_dir / "fsdp", batch_size=2, phase=3, max_steps=3, save_every=0)
    fsdp = make_trainer(fsdp_run)
    assert fsdp.strategy == "fsdp"
    results["fsdp_loss"] = fsdp.train(max_new_steps=2)["train_loss"]  # stops after 2 of 3 steps
    fsdp.model.eval()
    with torch.no_grad(), unsharded(fsdp.engine):
        logits = fsdp.model(fixed_input(root)).logits
    # ... and resumed by FSDP: the checkpoint's full tensors and optimizer state re-sharded, one more step.
    fsdp_run["output"]["dir"] = str(out_dir / "fsdp_resumed")
    make_trainer(fsdp_run).resume(out_dir / "fsdp" / "checkpoints" / "last").train()

    # Evaluation split over the ranks and gathered back.
    results["gathered"] = gather_objects([i * i for i in shard_indices(11)])
    options = {"out_dir": out_dir / "eval", "progress": False}
    evaluated = evaluate_model(trainer.model, trainer.tokenizer, eval_records(), EVAL_OPTIONS, **options)
    results["eval_accuracy"] = evaluated.summary["accuracy_flexible"]

    if index == 0:
        torch.save(logits, out_dir / "fsdp_logits.pt")
        (out_dir / "results.json").write_text(json.dumps(results))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def distributed_runs(backbone_dir, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("distributed")
    args = (_free_port(), str(backbone_dir), str(out))
    context = mp.start_processes(_worker, args=args, nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"the {WORLD}-process job did not finish in {TIMEOUT_S} s (a collective hung?)")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return out, json.loads((out / "results.json").read_text())


def read_column(path: Path, column: str) -> list[float]:
    with open(path, newline="") as handle:
        return [float(row[column]) for row in csv.DictReader(handle)]


# All-reduce sums gradients in another order than one process does; after a few Adam steps (each moving a
# weight by ~1e-3) that leaves gaps of up to ~2e-5 on some CPUs, well below one step's movement.
WEIGHT_ATOL = 5e-5


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = WEIGHT_ATOL) -> None:
    assert a.keys() == b.keys()
    gaps = {name: float((a[name] - b[name]).abs().max()) for name in a}
    worst = max(gaps, key=gaps.get)
    print(f"largest gap {gaps[worst]:.3g} ({worst})")
    assert gaps[worst] <= atol, (worst, gaps[worst])


# ---------------------------------------------------------------------------------------------- tests


def test_ddp_matches_one_process_with_the_global_batch(distributed_runs, backbone_dir, tmp_path):
    out, results = distributed_runs
    assert results["ddp_steps"] == 4 and results["ddp_replicas_equal"]
    # Frozen parameters are left out of DDP entirely (no start-up broadcast, no all-reduce).
    assert results["ddp_ignored"] == results["ddp_frozen"]
    assert results["ddp_frozen"] and all(n.startswith("model.backbone.") for n in results["ddp_frozen"])

    single = make_trainer(run_config(backbone_dir, tmp_path / "single", batch_size=4))
    initial = {n: p.detach().clone() for n, p in single.model.named_parameters() if p.requires_grad}
    single.train()
    trained = {n: p.detach() for n, p in single.model.named_parameters() if p.requires_grad}
    ddp = load_file(str(out / "ddp" / "checkpoints" / "last" / "model.safetensors"))
    assert_close(ddp, trained)
    assert max(float((trained[n] - initial[n]).abs().max()) for n in trained) > 1e-3  # it did train
    # Gradients are averaged (not summed) over the ranks, and logged metrics are means over every rank's
    # micro-batches: the same curves as one process.
    for column in ("loss", "grad_norm", "refine_steps"):
        ddp_curve = read_column(out / "ddp" / "training_metrics.csv", column)
        single_curve = read_column(tmp_path / "single" / "training_metrics.csv", column)
        assert ddp_curve == pytest.approx(single_curve, rel=1e-4), column


def test_ddp_with_lora_adapters_matches_one_process(distributed_runs, backbone_dir, tmp_path):
    out, results = distributed_runs
    assert results["lora_strategy"] == "ddp"
    assert results["lora_ignored"] == results["lora_frozen"]  # the frozen base: no broadcast, no all-reduce
    assert not any(".lora_" in n for n in results["lora_frozen"])
    assert any(n.endswith("q_proj.base_layer.weight") for n in results["lora_frozen"])

    single = make_trainer(lora_config(backbone_dir, tmp_path / "single", batch_size=4))
    single.train()
    trained = {n: p.detach() for n, p in single.model.named_parameters() if p.requires_grad}
    assert any(".lora_B." in n for n in trained)
    ddp = load_file(str(out / "lora" / "checkpoints" / "last" / "model.safetensors"))
    assert_close(ddp, trained)
    assert max(float(trained[n].abs().max()) for n in trained if ".lora_B." in n) > 1e-3  # B moved from 0


def test_checkpoint_of_two_processes_resumes_in_one(distributed_runs, backbone_dir, tmp_path):
    out, _ = distributed_runs
    mid = out / "ddp" / "checkpoints" / "step_0000003"
    saved = load_trainer_state(mid)["train_state"]
    assert saved["step"] == 3 and saved["extra"] == {"world_size": 2, "batch_size": 2, "samples_in_epoch": 8}

    straight = make_trainer(run_config(backbone_dir, tmp_path / "straight", batch_size=4))
    straight.train()
    resumed = make_trainer(run_config(backbone_dir, tmp_path / "resumed", batch_size=4)).resume(mid)
    assert (resumed.state.epoch, resumed.state.batches_in_epoch) == (1, 2)  # 8 of 16 examples, batch 4
    resumed.train()
    assert resumed.state.step == straight.state.step == 4
    params = dict(resumed.model.named_parameters())
    assert_close(
        {n: params[n].detach() for n in resumed.plan.trainable_names},
        {n: p.detach() for n, p in straight.model.named_parameters() if p.requires_grad},
    )


def test_batch_without_refinement_does_not_hang(distributed_runs):
    out, results = distributed_runs
    assert results["idle"] is not None and torch.isfinite(torch.tensor(results["idle"]))
    assert read_column(out / "idle" / "training_metrics.csv", "skipped_fraction") == [1.0, 1.0]  # no refining


def test_fsdp_checkpoint_loads_in_one_process(distributed_runs, backbone_dir, tmp_path):
    out, results = distributed_runs
    assert torch.isfinite(torch.tensor(results["fsdp_loss"]))
    checkpoint = out / "fsdp" / "checkpoints" / "last"
    raw = run_config(backbone_dir, tmp_path / "one", batch_size=4, phase=3, max_steps=3, save_every=0)
    # The single-process layout: every trained tensor under its own name, loadable without torch.distributed.
    model = LLaDATRMHybrid.from_pretrained(backbone_dir, hybrid_config(parse_config(raw))).eval()
    loaded = load_weights(model, checkpoint)
    assert set(loaded) == {name for name, _ in model.named_parameters()}
    with torch.no_grad():
        logits = model(fixed_input(backbone_dir)).logits
    assert torch.allclose(logits, torch.load(out / "fsdp_logits.pt"), atol=1e-5, rtol=0)

    # FSDP's sharded phase-3 update equals one process's with the global batch (backbone included).
    single = make_trainer({**raw, "output": {"dir": str(tmp_path / "single")}})
    single.train(max_new_steps=2)
    trained = {n: p.detach() for n, p in single.model.named_parameters()}
    assert_close(load_file(str(checkpoint / "model.safetensors")), trained)

    # Its (sharded, gathered) optimizer state continues in one process, and in two with FSDP (where it was
    # re-sharded on loading): the third step agrees.
    trainer = make_trainer(raw).resume(checkpoint)
    assert trainer.state.step == 2 and trainer.optimizer.state
    assert torch.isfinite(torch.tensor(trainer.train()["train_loss"]))
    resumed_by_fsdp = load_file(str(out / "fsdp_resumed" / "checkpoints" / "last" / "model.safetensors"))
    assert_close(resumed_by_fsdp, {n: p.detach() for n, p in trainer.model.named_parameters()})
    before = load_file(str(checkpoint / "model.safetensors"))
    assert max(float((resumed_by_fsdp[n] - before[n]).abs().max()) for n in before) > 1e-4  # it did step


def test_shards_gather_back_in_rank_order(distributed_runs):
    _, results = distributed_runs
    assert results["gathered"] == [[i * i for i in range(r, 11, WORLD)] for r in range(WORLD)]


def test_distributed_eval_matches_one_process(distributed_runs, backbone_dir, tmp_path):
    out, results = distributed_runs
    raw = run_config(backbone_dir, tmp_path / "unused")
    model = LLaDATRMHybrid.from_pretrained(backbone_dir, hybrid_config(parse_config(raw)))
    load_weights(model, out / "ddp" / "checkpoints" / "last")  # the model the ranks evaluated
    tokenizer = load_tokenizer(backbone_dir)
    single = evaluate_model(model, tokenizer, eval_records(), EVAL_OPTIONS, out_dir=tmp_path, progress=False)
    assert results["eval_accuracy"] == single.summary["accuracy_flexible"]
    assert (out / "eval" / PREDICTIONS_FILE).read_text() == (tmp_path / PREDICTIONS_FILE).read_text()
    assert len({p["completion"] for p in single.predictions}) > 2  # real, varied answers were compared


# --------------------------------------------------------------------------------- single-process units


def test_sharding_helpers():
    assert [shard_indices(5, r, 2) for r in range(2)] == [[0, 2, 4], [1, 3]]
    assert shard_indices(3) == [0, 1, 2]  # one process handles everything
    with pytest.raises(ValueError, match="rank 2 outside a world of 2"):
        shard_indices(4, 2, 2)


def test_strategy_resolution_and_config():
    assert resolve_strategy("auto", phase=1, world=1) == "none"
    assert resolve_strategy("auto", phase=2, world=4) == "ddp"
    assert resolve_strategy("auto", phase=3, world=4) == "fsdp"
    assert resolve_strategy("fsdp", phase=1, world=2) == "fsdp"
    assert parse_config({}).advanced.distributed == "auto"  # retired (issue 25): always resolved as above
    with pytest.raises(ConfigError, match="advanced.distributed: a retired setting"):
        parse_config({"advanced": {"distributed": "ddp"}})
