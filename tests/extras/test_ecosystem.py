"""Hooks into the tools researchers use: transformers' Auto classes, lm-eval's plugin group and result
folders, tokens per forward (TPF)."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_assets import REPO, tiny_run

from llada_trm.assets import embedded_backbone_dir

tomllib = pytest.importorskip("tomllib")  # Python 3.11+


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    from llada_trm.extras.export import export_run

    out = tmp_path_factory.mktemp("hf") / "export"
    export_run(tiny_run(tmp_path_factory), out)
    return out


def test_automodel_loads_an_export_with_no_remote_code(exported):
    """In a fresh interpreter: `import llada_trm`, then transformers' own AutoConfig / AutoModel read an
    export (model type `llada`) and give the backbone's logits, with no trust_remote_code."""
    probe = f"""
import llada_trm, torch
from transformers import AutoConfig, AutoModel
from llada_trm.model.llada import LLaDAModel
config = AutoConfig.from_pretrained({str(exported)!r})
model, info = AutoModel.from_pretrained({str(exported)!r}, output_loading_info=True)
assert not any(info.values()), info
reference = LLaDAModel.from_pretrained({str(exported)!r}).to(next(model.parameters()).dtype)
ids = torch.randint(0, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
assert torch.equal(model(ids).logits, reference(ids).logits)
print(type(config).__name__, type(model).__name__, model.training)
"""
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["LLaDAHFConfig", "LLaDAModelLM", "False"]


def test_automodel_loads_the_embedded_backbone_in_process():
    from transformers import AutoModel

    import llada_trm  # noqa: F401  (transformers already imported here: registration is immediate)

    model = AutoModel.from_pretrained(str(embedded_backbone_dir()), dtype=torch.float32)
    ids = torch.tensor([[1, 2, 3, 4]])
    assert model(ids).logits.shape[:2] == (1, 4)


def test_import_llada_trm_alone_still_imports_no_torch():
    probe = "import sys, llada_trm; print('torch' in sys.modules, 'transformers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]


def test_lm_eval_entry_point_names_the_registered_backend():
    pytest.importorskip("lm_eval")
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    target = project["entry-points"]["lm_eval.models"]["llada_trm"]
    module, _, name = target.partition(":")
    backend = getattr(importlib.import_module(module), name)
    from lm_eval.api.registry import get_model

    assert get_model("llada_trm") is backend


@pytest.mark.parametrize(
    ("model_args", "folder"),
    [
        ("checkpoint=runs/slot/checkpoints/best,steps=4", "runs__slot__checkpoints__best"),
        ({"checkpoint": "exports/tiny", "steps": 4}, "exports__tiny"),
        ("steps=4", "embedded"),
    ],
)
def test_lm_eval_results_are_named_after_the_checkpoint(model_args, folder):
    pytest.importorskip("lm_eval")
    from lm_eval.loggers.evaluation_tracker import GeneralConfigTracker

    import llada_trm.extras.harness.model  # noqa: F401  (as llada-trm-lm-eval and entry-point discovery do)

    tracker = GeneralConfigTracker()
    tracker.log_experiment_args(model_source="llada_trm", model_args=model_args, system_instruction=None,
                                chat_template=None, fewshot_as_multiturn=False)  # fmt: skip
    assert tracker.model_name_sanitized == folder
    other = GeneralConfigTracker()  # another backend keeps lm-eval's own rule
    other.log_experiment_args(model_source="hf", model_args="pretrained=org/name", system_instruction=None,
                              chat_template=None, fewshot_as_multiturn=False)  # fmt: skip
    assert other.model_name_sanitized == "org__name"
