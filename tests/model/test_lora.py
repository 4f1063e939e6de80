"""LoRA adapters on the backbone (phases 2 and 3): what trains, checkpoints, resume, merging, loading."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_assets import make_tiny_backbone, model_section

from llada_trm.config import fixed_settings, parse_config
from llada_trm.errors import ConfigError
from llada_trm.evaluate.loading import load_checkpoint
from llada_trm.model.llada import LLaDAModel
from llada_trm.model.lora import LORA_TARGETS, add_lora, is_adapter_name, merge_lora
from llada_trm.training.loop import Trainer


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory) -> Path:
    return make_tiny_backbone(tmp_path_factory.mktemp("lora_backbone"), vocab_size=512)


def raw_config(backbone_dir: Path, out: Path, lora: dict | None = None, **training) -> dict:
    training = {
        "phase": 2, "unfreeze_last_n_layers": 1, "lr": 3e-3, "backbone_lr": 1e-2, "batch_size": 4,
        "max_steps": 4, "warmup_steps": 1, "eval_every": 0, "save_every": 2, "seed": 0, **training,
    }
    return {
        "model": model_section(backbone_dir),
        "data": {
            "max_length": 128,
            "n_train": 24,
            "n_eval": 4,
        },
        "training": training,
        "lora": {"rank": 4, **(lora or {})},
        "output": {"dir": str(out)},
    }


def make_trainer(backbone_dir: Path, out: Path, **kwargs) -> Trainer:
    return Trainer(parse_config(raw_config(backbone_dir, out, **kwargs)), progress=False)


def fixed_input(model) -> torch.Tensor:
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(1))
    ids[:, 12:20] = model.mask_token_id
    return ids


def test_phase2_trains_adapters_and_the_refiner_only(backbone_dir, tmp_path):
    trainer = make_trainer(backbone_dir, tmp_path / "run")
    names = trainer.plan.trainable_names
    backbone_names = [n for n in names if n.startswith("backbone.")]
    # rank-4 adapters on the 7 linear layers of the last block, nowhere else; the refiner as in phase 1
    assert len(backbone_names) == 2 * len(LORA_TARGETS)
    assert all(is_adapter_name(n) and ".blocks.1." in n for n in backbone_names)
    assert any(n.startswith("refinement_head.") for n in names)
    frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    assert not any(is_adapter_name(n) for n in frozen)
    adapters = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if is_adapter_name(n)}
    trainer.train()
    params = dict(trainer.model.named_parameters())
    for name, before in frozen.items():  # every base weight, embeddings and LM head included
        assert torch.equal(params[name], before), name
    moved = [n for n in adapters if not torch.equal(params[n], adapters[n])]
    assert any(".lora_B." in n for n in moved)  # B starts at zero; its first step moves it
    saved = load_file(str(tmp_path / "run" / "checkpoints" / "last" / "model.safetensors"))
    assert set(saved) == set(names)  # the adapters and the refiner: no base weight
    for name in backbone_names:
        assert torch.equal(saved[name], params[name])


def test_phase3_adapts_every_block_with_the_chosen_targets(backbone_dir, tmp_path):
    with fixed_settings({"lora.target_modules": ("q_proj", "v_proj")}):  # retired (issue 25): the hook
        trainer = make_trainer(backbone_dir, tmp_path / "p3", phase=3, max_steps=1)
    backbone_names = [n for n in trainer.plan.trainable_names if n.startswith("backbone.")]
    layers = {n.split(".blocks.")[1].split(".")[0] for n in backbone_names}
    assert layers == {"0", "1"} and len(backbone_names) == 2 * 2 * 2
    assert {n.split(".")[-4] for n in backbone_names} == {"q_proj", "v_proj"}
    assert any(g.name == "backbone" and g.lr == 1e-2 for g in trainer.plan.groups)


def test_resume_continues_exactly(backbone_dir, tmp_path):
    straight = make_trainer(backbone_dir, tmp_path / "straight")
    straight.train()
    make_trainer(backbone_dir, tmp_path / "split").train(max_new_steps=2)
    resumed = make_trainer(backbone_dir, tmp_path / "split").resume(tmp_path / "split")
    assert resumed.state.step == 2
    resumed.train()
    a, b = dict(straight.model.named_parameters()), dict(resumed.model.named_parameters())
    for name in straight.plan.trainable_names:
        assert torch.equal(a[name], b[name]), name


def test_merged_backbone_computes_the_adapted_logits(backbone_dir, tmp_path):
    trainer = make_trainer(backbone_dir, tmp_path / "merge", max_steps=2, save_every=0)
    trainer.train()
    model = trainer.model.eval()
    ids = fixed_input(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merged = merge_lora(model)
    assert isinstance(merged, LLaDAModel) and not any(is_adapter_name(n) for n in merged.state_dict())
    assert sorted(merged.state_dict()) == sorted(LLaDAModel(merged.config).state_dict())  # LLaDA's names
    with torch.no_grad():
        adapted, plain = model.backbone(ids).logits, merged(ids).logits
        base = LLaDAModel.from_pretrained(backbone_dir)(ids).logits
    assert torch.allclose(plain, adapted, atol=1e-5, rtol=0)
    assert (adapted - base).abs().max() > 1e-4  # the adapters changed the model, so the check has teeth
    after = model.state_dict()  # merge_lora left its argument untouched
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)

    # A run's checkpoint loads for evaluation with its adapters, merged: the trained model's logits.
    loaded = load_checkpoint(tmp_path / "merge", device="cpu", dtype="float32")
    assert not any(is_adapter_name(n) for n in loaded.model.state_dict())
    with torch.no_grad():
        assert torch.allclose(loaded.model(ids).logits, model(ids).logits, atol=1e-5, rtol=0)


def test_add_lora_checks_its_arguments(backbone_dir):
    backbone = LLaDAModel.from_pretrained(backbone_dir, dtype=torch.bfloat16)
    with pytest.raises(ConfigError, match="choose from q_proj"):
        add_lora(backbone, [0], rank=2, alpha=2, targets=["qkv"])
    with pytest.raises(ConfigError, match="outside 0..1"):
        add_lora(backbone, [2], rank=2, alpha=2)
    add_lora(backbone, [0], rank=2, alpha=2)
    with pytest.raises(ConfigError, match="already carries"):
        add_lora(backbone, [1], rank=2, alpha=2)
    # fp32 adapters on a bf16 base (what AdamW should update), the base left as it was
    dtypes = {is_adapter_name(n): p.dtype for n, p in backbone.named_parameters()}
    assert dtypes == {True: torch.float32, False: torch.bfloat16}


def test_config_errors(backbone_dir, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="lora.rank: LoRA adapters train the backbone in phases 2 and 3"):
        parse_config(raw_config(backbone_dir, tmp_path / "x", phase=1))
    with pytest.raises(ConfigError, match="lora.target_modules: a retired setting"):
        parse_config(raw_config(backbone_dir, tmp_path / "x", lora={"target_modules": ["q_proj"]}))
    with pytest.raises(ConfigError, match="unfreeze_last_n_layers: expected 1..2"):
        make_trainer(backbone_dir, tmp_path / "x", unfreeze_last_n_layers=3)
    monkeypatch.setitem(sys.modules, "peft", None)  # as if the extra were not installed
    with pytest.raises(ConfigError, match=r"pip install 'llada-trm\[lora\]'"):
        make_trainer(backbone_dir, tmp_path / "x")


def test_export_merges_the_adapters_into_the_backbone(backbone_dir, tmp_path):
    from llada_trm.evaluate.loading import load_checkpoint
    from llada_trm.extras.export import export_run

    make_trainer(backbone_dir, tmp_path / "run").train()
    export_run(tmp_path / "run", tmp_path / "export")
    run, export = load_checkpoint(tmp_path / "run", device="cpu"), load_checkpoint(tmp_path / "export")
    names = export.model.backbone.state_dict()
    assert not any("lora" in name for name in names)  # plain LLaDA names: the adapters are folded in
    ids = fixed_input(run.model)
    with torch.no_grad():
        torch.testing.assert_close(export.model(ids).logits, run.model(ids).logits)
    base = LLaDAModel.from_pretrained(backbone_dir).state_dict()
    q = "model.transformer.blocks.1.q_proj.weight"  # the adapted block: its merged weight moved
    assert not torch.equal(names[q], base[q])
