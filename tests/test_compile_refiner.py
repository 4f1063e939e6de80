"""`advanced.compile_refiner`: the config field, its wiring into the run's model, the fallback where
torch.compile cannot run, and that a compiled refiner computes what the eager one does."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from llada_trm.build import apply_backbone_options
from llada_trm.config import RunConfig, fixed_settings, parse_config
from llada_trm.errors import ConfigError
from llada_trm.refiners.base import ATTRIBUTE, compile_refiner_steps, compiled_step, torch_compile_problem
from llada_trm.refiners.slot import SlotTRMRefiner
from llada_trm.training.resume_config import resumable


def small_refiner() -> SlotTRMRefiner:
    torch.manual_seed(0)
    return SlotTRMRefiner(d_model=32, n_heads=4, n_blocks=1, num_steps=2, context_dim=24, delta_scale=0.1)


class FakeHybrid:
    """What `apply_backbone_options` touches: a backbone (device, compile) and the refiners."""

    def __init__(self) -> None:
        self.backbone = torch.nn.Linear(2, 2)
        self.backbone.device = torch.device("cpu")
        self.refinement_head = torch.nn.ModuleDict({"slot": small_refiner()})


def test_compile_refiner_is_a_retired_setting_off():
    # issue 25: no config set it and bench/bench_compile.py found no gain; the code is reached by the hook
    assert RunConfig().advanced.compile_refiner is False
    with pytest.raises(ConfigError, match="advanced.compile_refiner: a retired setting"):
        parse_config({}, overrides=["advanced.compile_refiner=true"])
    assert resumable("advanced.compile_refiner")  # a speed switch: same results, may change on resume


def test_the_run_option_compiles_every_refiner_step(monkeypatch):
    calls = []

    def fake_compile(fn, **kwargs):
        calls.append(kwargs)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    off, on = FakeHybrid(), FakeHybrid()
    apply_backbone_options(off, RunConfig())
    assert not compiled_step(off.refinement_head["slot"]) and not calls
    with fixed_settings({"advanced.compile_refiner": True}):
        apply_backbone_options(on, RunConfig())
    assert compiled_step(on.refinement_head["slot"])
    assert {"dynamic": True, "backend": "inductor"} in calls  # the step, dynamic row counts (+ the probe)
    assert compile_refiner_steps(on.refinement_head.values()) is True and len(calls) == 3  # no double wrap


def test_no_usable_compiler_warns_and_stays_eager(monkeypatch):
    def broken_compile(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    refiner = small_refiner()
    with pytest.warns(RuntimeWarning, match="compile_refiner: torch.compile cannot run on cpu.*C\\+\\+"):
        assert compile_refiner_steps([refiner]) is False
    assert not compiled_step(refiner)
    h = torch.randn(1, 4, 32)
    assert refiner(h).shape == h.shape  # still runs, eagerly


@pytest.mark.skipif(
    os.environ.get("LLADA_TRM_COMPILE_TESTS") != "1",
    reason="inductor compiles the step's forward and backward for 1-3 CPU-minutes; "
    "set LLADA_TRM_COMPILE_TESTS=1 to run it (LLADA_TRM_TEST_DEVICE=cuda to run it on a GPU)",
)
def test_compiled_refiner_matches_eager_outputs_and_gradients():
    device = torch.device(os.environ.get("LLADA_TRM_TEST_DEVICE", "cpu"))  # bench/gpu_check.sh: cuda
    problem = torch_compile_problem(device)
    if problem is not None:
        pytest.skip(f"torch.compile cannot run on this {device.type}: {problem}")
    eager = small_refiner().train().to(device)
    compiled = copy.deepcopy(eager)
    assert compile_refiner_steps([compiled], device) is True and compiled_step(compiled)
    generator = torch.Generator().manual_seed(1)
    h = torch.randn(2, 12, 32, generator=generator).to(device)
    context = torch.randn(2, 12, 24, generator=generator).to(device)
    active = (torch.rand(2, 12, generator=generator) < 0.5).to(device)
    active[:, 0] = True
    outputs, grads = [], []
    for refiner in (eager, compiled):
        out = refiner(h, chunk_mask=active, context=context)
        out.square().sum().backward()
        outputs.append(out)
        grads.append({n: p.grad for n, p in refiner.named_parameters() if p.grad is not None})
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-4, atol=1e-5)
    assert torch.equal(outputs[1][~active], h[~active])  # carried rows stay bit-identical when compiled
    assert grads[0].keys() == grads[1].keys() and grads[0]
    flat = [torch.cat([g[n].flatten() for n in grads[0]]) for g in grads]
    assert float((flat[1] - flat[0]).norm() / flat[0].norm()) < 1e-4
    for name, grad in grads[0].items():  # to rounding, relative to the tensor's largest entry
        # The refinement slot layer-norms the small change u - u_prev between two steps, which amplifies
        # rounding (measured: up to 8e-3 of the largest entry for its gate, 2e-5 elsewhere in the blocks).
        tolerance = 2e-2 if "refine" in name else 1e-3
        scale = float(grad.abs().max())
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-3, atol=tolerance * scale, msg=name)
    assert ATTRIBUTE in compiled.__dict__
