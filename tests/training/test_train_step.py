"""A phase-1 training step runs code in few modules (a tracer counts them); `training` re-exports nothing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import llada_trm
import llada_trm.training as training
from llada_trm.config import parse_config
from llada_trm.training.loop import Trainer

PACKAGE = Path(llada_trm.__file__).resolve().parent
# The model and the diffusion process: what a step must run whatever the loop looks like.
MODEL_PACKAGES = ("model", "diffusion", "data")
# The loop's own modules in a step: the recipe and the objective. Parallel code (dist_utils) runs only in a
# parallel run.
LOOP_MODULES = {"training/loop.py", "training/objective.py"}
# All modules of a step: 26 before the loop was merged, 20 after (17 of them the model's and the diffusion's:
# backbone 2, hybrid 5, refiners 6, diffusion 3, data 1), 9 once the model side was merged too (backbone
# modeling, hybrid model, refiners base + the refiner's own file, diffusion forward_process, data collate),
# 8 once the objective module held `TrainStep` and one process stopped calling dist_utils' collectives.
# (The model's files are under `model/` since the backbone, hybrid and refiners packages were merged.)
STEP_MODULES_BOUND = 8


def _step_modules(trainer: Trainer) -> set[str]:
    """The package's source files whose code runs during one `train_step` (the batch's fetch included)."""
    trainer.sampler.set_epoch(0)
    trainer.optimizer.zero_grad(set_to_none=True)
    batches = iter(trainer.train_loader)
    files: set[str] = set()

    def profile(frame, event, arg) -> None:  # noqa: ANN001 - sys.setprofile's signature
        path = Path(frame.f_code.co_filename)
        if path.is_relative_to(PACKAGE):
            files.add(path.relative_to(PACKAGE).as_posix())

    sys.setprofile(profile)
    try:
        stepped = trainer.train_step(batches)
    finally:
        sys.setprofile(None)
    assert stepped and trainer.state.step == 1
    return files


@pytest.fixture(scope="module")
def trainer(tmp_path_factory) -> Trainer:
    torch.set_num_threads(1)
    raw = {
        "model": {
            "backbone": "embedded", "refiner": "slot", "max_recursive_steps": 2, "chunk_size": 8,
            "chunk_selection": "all", "halting": "none", "slot": {"n_heads": 4, "n_blocks": 1},
        },
        "data": {
            "max_length": 128, "n_train": 16, "n_eval": 4,
        },
        "training": {
            "phase": 1, "batch_size": 4, "gradient_accumulation_steps": 2, "seed": 0,
            "masks": "answer_structure", "max_steps": 2,
        },
        "output": {"dir": str(tmp_path_factory.mktemp("step") / "run")},
    }
    return Trainer(parse_config(raw), progress=False)


@pytest.fixture(scope="module")
def step_modules(trainer) -> set[str]:
    return _step_modules(trainer)


def test_a_phase1_step_runs_the_loop_in_three_modules(step_modules):
    files = step_modules
    loop_side = {f for f in files if f.split("/")[0] not in MODEL_PACKAGES}
    # Before the loop was merged (trainer, log_window, stats, metrics, schedule, data, distributed,
    # sampler_state_batches, objective, dist_utils) this was 10 modules.
    assert loop_side <= LOOP_MODULES, sorted(loop_side - LOOP_MODULES)
    model_side = files - loop_side
    assert model_side and all(f.split("/")[0] in MODEL_PACKAGES for f in model_side)
    assert len(files) <= STEP_MODULES_BOUND, sorted(files)


def test_the_logging_window_reduces_at_the_logging_step(trainer, step_modules):
    """A step leaves its terms and statistics on the device; the logged row reduces them (means over the
    step's two micro-batches)."""
    pending = trainer._window._pending
    assert len(pending) == 2, "both micro-batches' terms wait for the logging step"
    assert all(isinstance(value, torch.Tensor) for terms, _, _ in pending for value in terms.values())
    losses = [float(terms["loss"]) for terms, _, _ in pending]
    row = trainer._window.row(trainer.optimizer)
    assert not trainer._window._pending
    assert row["loss"] == sum(losses) / 2
    assert {"loss", "loss_final", "grad_norm", "lr", "refine_steps", "tokens_per_s"} <= set(row)


def test_the_training_package_reexports_nothing():
    public = {name for name in vars(training) if not name.startswith("_")}
    submodules = {name for name in public if type(getattr(training, name)).__name__ == "module"}
    assert public == submodules, sorted(public - submodules)
