"""The run schema's size, its retired settings, and `llada-trm convert` for files written before issue 25."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from tiny_assets import FIXTURES

from llada_trm.cli import main
from llada_trm.config import (
    RETIRED_MODEL,
    ModelConfig,
    RunConfig,
    load_config,
    parse_config,
    retired_settings,
    settings_count,
    settings_keys,
)
from llada_trm.convert import convert_config, convert_path, health_thresholds
from llada_trm.errors import ConfigError, UserError
from llada_trm.study.config import CompareConfig, load_compare_config

FIXTURE = FIXTURES / "run_before_issue25"  # `llada-trm train` of commit 04476e5

# The run schema's settings (leaf fields of RunConfig). Before issue 25: 150, 33 of them `model.*`; 50 now.
# `model.*` is the hybrid's and the refiners' own schema (model/hybrid_config.py, model/refiners/config.py).
MAX_RUN_SETTINGS = 36  # every section but model.* (117 before issue 25, 60 after its first cut, then 44)
MAX_MODEL_SETTINGS = 14  # 33 before, then 16


def test_the_run_schema_has_about_fifty_settings_besides_the_model():
    model = settings_count(ModelConfig)
    assert model <= MAX_MODEL_SETTINGS
    assert settings_count(RunConfig) - model <= MAX_RUN_SETTINGS
    assert settings_count(RunConfig) <= 50
    keys = settings_keys()
    assert "training.lr" in keys and "sampling.threshold" in keys and "model.slot.n_heads" in keys
    assert "advanced.health" not in {k.rsplit(".", 1)[0] for k in keys}  # no section of thresholds
    assert "output.best_mode" not in keys and "training.adam_eps" not in keys


def test_every_retired_setting_reads_its_fixed_value():
    """The consumers still read `config.training.adam_eps`: a class constant, equal to the table's value."""
    config = RunConfig()
    for key, value in retired_settings().items():
        if key == "output.best_mode" or key in RETIRED_MODEL:  # derived, or the model's (tested below)
            continue
        node = config
        for part in key.split("."):
            node = getattr(node, part)
        assert node == value, key
        assert key not in settings_keys()
    dumped = yaml.safe_load(config.to_yaml())
    assert "adam_eps" not in dumped["training"] and "health" not in dumped["advanced"]
    assert health_thresholds()["advanced.health.window"] == 20


def test_a_retired_key_fails_in_one_line_naming_the_converter(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("training:\n  adam_eps: 1e-6\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message == (
        f"{path}: training.adam_eps: a retired setting, fixed now (docs/settings.md); convert the file: "
        f"llada-trm convert {path} --out NEW"
    )
    with pytest.raises(ConfigError, match=r"--set advanced.health.window: .*retired setting"):
        parse_config({}, overrides=["advanced.health.window=3"])
    with pytest.raises(ConfigError, match=r"run\.training\.forward_mix: a retired setting"):
        parse_config({"run": {"training": {"forward_mix": 0.5}}}, schema=CompareConfig)


def test_suggestions_and_overrides_still_work():
    with pytest.raises(ConfigError, match=r"training.learnig_rate: unknown key; did you mean 'lr'\?"):
        parse_config({"training": {"learnig_rate": 1e-3}})
    assert parse_config({}, overrides=["training.lr=3e-4", "sampling.threshold=0.9"]).training.lr == 3e-4


def test_converting_a_run_config_of_the_old_schema(tmp_path):
    lines: list[str] = []
    out = convert_path(FIXTURE / "config.yaml", tmp_path / "new.yaml", echo=lines.append)
    warnings = [line for line in lines if line.startswith("warning: ")]
    assert any("training.adam_eps=1e-06 dropped: fixed at 1e-08" in line for line in warnings)
    assert any("sampling.batch_size=16 dropped" in line for line in warnings)  # the run samples in batch 8
    assert any("retired settings dropped at their fixed values" in line for line in lines)
    new = load_config(out)
    old = yaml.safe_load((FIXTURE / "config.yaml").read_text())
    assert new.model.slot.d_inner == 8 and new.training.max_steps == 2 and new.data.n_train == 8
    assert new.model.delta_scale == 0.1  # the slot refiner's, now the one scale
    assert any("training.device: cpu -> the command's flag --device cpu" in line for line in lines)
    assert any("training.log_every: 8 -> the command's flag --log-every 8" in line for line in lines)
    fields = type(new.training).model_fields
    kept = {k: v for k, v in old["training"].items() if k in fields}
    assert new.training.model_dump() == {**kept, "max_steps": 2}


def test_converting_an_old_run_directory_and_checkpoint(tmp_path):
    from llada_trm.run_checkpoint import read_run_config, resolve_checkpoint_dir

    before = {p: p.read_bytes() for p in FIXTURE.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match="llada-trm convert"):
        read_run_config(FIXTURE / "checkpoints" / "last")  # unconverted: one line naming the converter
    run = convert_path(FIXTURE, tmp_path / "run", echo=lambda _: None)
    checkpoint = convert_path(FIXTURE / "checkpoints" / "last", tmp_path / "ckpt", echo=lambda _: None)
    assert {p: p.read_bytes() for p in FIXTURE.rglob("*") if p.is_file()} == before  # the input untouched
    for directory in (resolve_checkpoint_dir(run), resolve_checkpoint_dir(checkpoint)):
        config = read_run_config(directory)
        assert config.model.slot.n_heads == 2
        for name in ("model.safetensors", "trainer_state.pt"):  # copied as they are
            assert (directory / name).read_bytes() == (FIXTURE / "checkpoints" / "last" / name).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "run"]  # no staging copy left behind


def test_the_converted_checkpoint_loads_for_evaluation(tmp_path):
    from llada_trm.evaluate.loading import load_checkpoint

    checkpoint = convert_path(FIXTURE, tmp_path / "run", echo=lambda _: None)
    from safetensors.torch import load_file

    loaded = load_checkpoint(checkpoint, device="cpu")
    assert loaded.run_config is not None and loaded.run_config.model.slot.d_inner == 8
    saved = load_file(str(checkpoint / "checkpoints" / "last" / "model.safetensors"))
    state = loaded.model.state_dict()
    assert saved and all(torch.equal(state[name], tensor) for name, tensor in saved.items())


def test_convert_never_overwrites_and_leaves_nothing_on_failure(tmp_path):
    taken = tmp_path / "taken.yaml"
    taken.write_text("keep: me\n")
    with pytest.raises(UserError, match="already exists; convert never overwrites"):
        convert_path(FIXTURE / "config.yaml", taken)
    assert taken.read_text() == "keep: me\n"
    with pytest.raises(UserError, match="must lie outside"):
        convert_path(FIXTURE, FIXTURE / "converted")
    broken = tmp_path / "broken"
    shutil.copytree(FIXTURE, broken)
    (broken / "checkpoints" / "last" / "config.yaml").write_text("training:\n  lerning_rate: 1\n")
    with pytest.raises(ConfigError, match="lerning_rate: unknown key"):
        convert_path(broken, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "taken.yaml"]


def test_compare_configs_and_legacy_keys_convert(tmp_path):
    old = {
        "run": {"model": {"halt_on_confidence": False}, "data": {"validation_seed": 0},
                "advanced": {"health": {"window": 20}}},
        "refiners": ["slot", "mix"],
        "arms": {"mix": {"refiner": "slot", "run": {"training": {"forward_mix": 0.5}}}},
    }  # fmt: skip
    conversion = convert_config(old)
    assert conversion.data["run"] == {"model": {"halting": "none"}}
    assert conversion.dropped == ["run.advanced.health.window", "run.data.validation_seed"]
    assert conversion.warnings == [
        "arms.mix.run.training.forward_mix=0.5 dropped: fixed at 0.0 (docs/settings.md); "
        "the converted run uses it"
    ]
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(old))
    assert main(["convert", str(path), "--out", str(tmp_path / "new.yaml")]) == 0
    assert load_compare_config(tmp_path / "new.yaml").run.model.halting == "none"
    assert main(["convert", str(path), "--out", str(tmp_path / "new.yaml")]) == 2  # exists: refused


def test_best_mode_is_derived_from_the_column():
    assert RunConfig().output.best_is_lower
    assert not parse_config({"output": {"save_best": "sampled_accuracy"}}).output.best_is_lower
    kept = convert_config({"output": {"save_best": "loss", "best_mode": "min"}})
    assert kept.dropped == ["output.best_mode"] and not kept.warnings
    odd = convert_config({"output": {"save_best": "loss", "best_mode": "max"}})
    assert odd.warnings and "derived now: min" in odd.warnings[0]


def test_resuming_checks_an_old_checkpoint_against_the_converted_config(tmp_path):
    from llada_trm.errors import CheckpointError
    from llada_trm.training.resume_config import check_config_changes

    old = FIXTURE / "checkpoints" / "last"
    converted = convert_path(FIXTURE, tmp_path / "run", echo=lambda _: None)
    config = load_config(converted / "config.yaml")
    with pytest.raises(CheckpointError, match="a retired setting.*llada-trm convert"):
        check_config_changes(old, config)  # unconverted: told to convert, not a list of "changed" settings
    assert check_config_changes(converted / "checkpoints" / "last", config) == []  # the same run


# ------------------------------------------------------------- the model section (issue 25, model levers)


def test_the_model_section_keeps_what_studies_varied():
    keys = {k.removeprefix("model.") for k in settings_keys() if k.startswith("model.")}
    assert keys == {
        "refiner", "integration", "max_recursive_steps", "chunk_size", "confidence_threshold",
        "chunk_selection", "halting", "context_layers", "backbone", "delta_scale", "slot.n_heads",
        "slot.n_blocks", "slot.d_inner", "mlp.param_budget",
    }  # fmt: skip
    assert not keys & {k.removeprefix("model.") for k in RETIRED_MODEL}


def test_a_retired_model_key_fails_in_one_line_naming_the_converter(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("model:\n  slot:\n    use_gates: true\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"{path}: model.slot.use_gates: a retired setting, fixed now (docs/settings.md); convert the file: "
        f"llada-trm convert {path} --out NEW"
    )


def test_retired_model_keys_convert_at_their_value_or_when_unused():
    old = {"model": {
        "active_refiner": "mlp", "cascade_mlp_steps": None, "halting_threshold": 0.7,
        "return_step_logits": None, "denoising_carry": False, "refiner": "slot",
        "slot": {"n_heads": 2, "mlp_ratio": 4.0, "delta_clamp": 0.5, "use_gates": True, "dropout": 0.0,
                 "d_ctx": None, "d_reason": None, "d_refine": None, "d_conf": None},
        "mlp": {"hidden_dim": 64, "hidden_mult": 3.0, "delta_clamp": 0.2, "dropout": 0.1},  # no MLP is built
    }}  # fmt: skip
    conversion = convert_config(old)
    assert conversion.data == {"model": {"refiner": "slot", "slot": {"n_heads": 2}}}  # emptied mlp: pruned
    assert not conversion.warnings and len(conversion.dropped) == 17
    cascade = {"model": {"integration": "cascade", "max_recursive_steps": 6, "cascade_mlp_steps": 3}}
    assert convert_config(cascade).dropped == ["model.cascade_mlp_steps"]  # K // 2: what a cascade does now
    shipped = convert_config({"model": {"refiner": "mlp", "mlp": {"hidden_mult": 2.0, "delta_scale": 0.5}}})
    assert shipped.data == {"model": {"refiner": "mlp", "delta_scale": 0.5}}
    assert "min(2 d_model, 1024)" in shipped.warnings[0]  # the same width below d_model 512


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ({"slot": {"d_ctx": 8}}, r"model\.slot\.d_ctx=8: no longer supported .*set slot\.d_inner"),
        ({"slot": {"use_gates": False}}, r"model\.slot\.use_gates=false: .*always has its gates"),
        ({"refiner": "mlp", "mlp": {"hidden_dim": 64}}, r"model\.mlp\.hidden_dim=64: .*mlp\.param_budget"),
        ({"halting": "learned"}, r"model\.halting=learned: learned halting left the tree"),
        ({"denoising_carry": True}, r"model\.denoising_carry=true: .*left the tree"),
        ({"integration": "hybrid", "active_refiner": "mlp"}, r"model\.active_refiner=mlp: .*--refiner mlp"),
        ({"integration": "cascade", "cascade_mlp_steps": 1}, r"model\.cascade_mlp_steps=1: .*K // 2"),
        ({"return_step_logits": True}, r"model\.return_step_logits=true: .*while training"),
    ],
)
def test_a_retired_model_value_the_model_no_longer_has_is_refused(model, expected, tmp_path):
    with pytest.raises(ConfigError, match=f"^old.yaml: {expected}") as info:
        convert_config({"model": model}, "old.yaml")
    assert "\n" not in str(info.value)
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump({"model": model}))
    with pytest.raises(ConfigError):
        convert_path(path, tmp_path / "new.yaml", echo=lambda _: None)
    assert not (tmp_path / "new.yaml").exists()


def test_a_comparison_arm_converts_by_the_refiner_it_builds():
    old = {
        "run": {"model": {"slot": {"d_inner": 8, "delta_clamp": 0.5}, "mlp": {"hidden_mult": 2.0}}},
        "refiners": ["slot", "mlp_matched"],
        "arms": {"mlp_matched": {"refiner": "mlp", "run": {"model": {
            "mlp": {"hidden_mult": None, "param_budget": "slot"}, "slot": {"d_ctx": 4}}}}},
    }  # fmt: skip
    conversion = convert_config(old)
    assert conversion.data["arms"]["mlp_matched"]["run"] == {"model": {"mlp": {"param_budget": "slot"}}}
    assert conversion.data["run"] == {"model": {"slot": {"d_inner": 8}}}
    with pytest.raises(ConfigError, match=r"run\.model\.slot\.d_ctx=4"):  # the shared run builds both
        convert_config({"run": {"model": {"slot": {"d_ctx": 4}}}, "refiners": ["slot"]})


# ------------------------------------------- issue 25, training side: removed levers and moved settings


def test_removed_levers_are_refused_in_one_line_and_convert_only_when_off(tmp_path):
    from llada_trm.config import REMOVED_LEVERS

    assert "training.sampler_state_ratio" in REMOVED_LEVERS and "advanced.compile" in REMOVED_LEVERS
    path = tmp_path / "old.yaml"
    path.write_text("training:\n  sampler_state_ratio: 0.0\n")
    removed = r"sampler_state_ratio: a lever removed with its code \(docs/levers.md\); convert the file"
    with pytest.raises(ConfigError, match=removed):
        load_config(path)
    params = {"denoising_unroll_steps": 1, "confidence_calibration_weight": 0}
    off = convert_config({"training": {"sampler_state_ratio": 0.0}, "training_params": params})
    assert off.data == {} and len(off.dropped) == 3 and not off.warnings
    for key, value in (("training.sampler_state_ratio", 0.25), ("advanced.compile_refiner", True),
                       ("training_params.denoising_unroll_steps", 3)):  # fmt: skip
        section, name = key.split(".")
        with pytest.raises(ConfigError) as info:
            convert_config({section: {name: value}}, "old.yaml")
        message = str(info.value)
        assert message.startswith(f"old.yaml: {key}=") and "left the tree in issue 25" in message
        assert "docs/levers.md" in message and "\n" not in message


def test_the_generated_tasks_counts_move_to_data():
    old = {"data": {"dataset": "arithmetic", "arithmetic": {"n_train": 50, "n_eval": 5, "max_digits": 2},
                    "synthetic": {"n_train": 7, "n_eval": 3}}}  # fmt: skip
    conversion = convert_config(old)
    assert conversion.data["data"] == {"dataset": "arithmetic", "arithmetic": {"max_digits": 2},
                                       "n_train": 50, "n_eval": 5}  # fmt: skip
    assert "data.synthetic.n_train" in conversion.dropped  # the unselected task's counts were unused
    config = parse_config(conversion.data)
    assert (config.data.n_train, config.data.n_eval) == (50, 5)
    with pytest.raises(ConfigError, match=r"synthetic.n_train: replaced by data.n_train .*drop the --set"):
        parse_config({}, overrides=["data.synthetic.n_train=5"])


def test_gsm8k_slices_become_counts():
    def gsm8k(**data):
        return {"data": {"dataset": "gsm8k", "path": "data/gsm8k", **data}}

    recipe = convert_config(gsm8k(train_split="train[:-200]", eval_split="train[-200:]"))
    config = parse_config(recipe.data)
    assert (config.data.n_train, config.data.n_eval) == (7273, 200)  # GSM8K's train split holds 7473
    assert (config.data.train_split, config.data.eval_split) == ("train[:7273]", "train[-200:]")
    head = parse_config(convert_config(gsm8k(train_split="train[:1000]", eval_split=None)).data)
    assert (head.data.n_train, head.data.n_eval, head.data.eval_split) == (1000, 0, None)
    with pytest.raises(ConfigError, match=r"data.eval_split='test\[:100\]': validation now reads the last "):
        convert_config(gsm8k(train_split="train[:1000]"))  # the old default validated on test
    with pytest.raises(ConfigError, match=r"data.train_split='train\[100:\]': training now reads the first"):
        convert_config(gsm8k(train_split="train[100:]", eval_split="train[-10:]"))
    unused = convert_config({"data": {"train_split": "train[:5]", "eval_split": "test[:3]"}})
    assert unused.data == {} and unused.dropped == ["data.train_split", "data.eval_split"]


def test_epochs_become_steps_and_validation_batches_become_problems():
    def training(**settings):
        return {"data": {"synthetic": {"n_train": 40, "n_eval": 8}},
                "training": {"batch_size": 4, "gradient_accumulation_steps": 2, **settings}}  # fmt: skip

    # 40 problems / batch 4 = 10 micro-batches = 5 steps per epoch
    assert convert_config(training(num_epochs=3)).data["training"]["max_steps"] == 15
    assert convert_config(training(num_epochs=3, max_steps=7)).data["training"]["max_steps"] == 7
    capped = convert_config(training(num_epochs=1, max_steps=9))  # the epoch ended the run first
    assert capped.data["training"]["max_steps"] == 5
    one = convert_config(training(num_epochs=1))
    assert "max_steps" not in one.data["training"] and "training.num_epochs" in one.dropped
    assert parse_config(one.data).training.max_steps is None  # null: one epoch
    assert convert_config(training(eval_max_batches=1)).data["data"]["n_eval"] == 4  # the first 4 problems
    whole = convert_config(training(eval_max_batches=2))  # 2 batches of 4 read all 8
    assert whole.data["data"]["n_eval"] == 8 and "training.eval_max_batches" in whole.dropped


def test_sampling_batch_is_the_training_batch_and_lora_rank_zero_is_off():
    config = parse_config({"training": {"batch_size": 8}})
    assert config.sampling.options().batch_size == 8
    assert config.model_copy(deep=True).sampling.options().batch_size == 8
    same = convert_config({"training": {"batch_size": 8}, "sampling": {"batch_size": 8}})
    assert same.dropped == ["sampling.batch_size"] and not same.warnings
    assert not config.lora.enabled and "lora.enabled" not in settings_keys()
    on = parse_config(convert_config({"training": {"phase": 2}, "lora": {"enabled": True}}).data)
    assert on.lora.enabled and on.lora.rank == 8  # the old default rank
    off = convert_config({"lora": {"enabled": False, "rank": 16}})
    assert off.data == {} and not parse_config(off.data).lora.enabled
    with pytest.raises(ConfigError, match="lora.rank: LoRA adapters train the backbone in phases 2 and 3"):
        parse_config({"lora": {"rank": 4}})


def test_the_train_command_plans_max_steps_not_epochs(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"data": {"n_train": 20, "n_eval": 4}, "training": {"batch_size": 4},
                                    "output": {"dir": str(tmp_path / "run")}}))  # fmt: skip
    assert main(["train", "--config", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "5 steps per epoch (max_steps null: one epoch) = 5 optimizer steps" in out


def test_an_export_written_before_the_cut_loads_with_its_counts_and_batch(tmp_path):
    from llada_trm.evaluate.loading import export_run_config

    section = {
        "data": {"dataset": "synthetic", "train_split": "train[:1000]", "eval_split": "test[:100]",
                 "synthetic": {"n_train": 50, "n_eval": 5, "max_steps": 2}},
        "sampling": {"gen_length": 64, "block_length": 32, "steps": 64, "temperature": 0.0, "batch_size": 16},
    }  # fmt: skip
    config = export_run_config(tmp_path, section)
    assert (config.data.n_train, config.data.n_eval, config.data.synthetic.max_steps) == (50, 5, 2)
    assert config.sampling.options().batch_size == 16 and config.sampling.options().gen_length == 64


def test_gsm8k_counts_slice_train_head_and_tail_and_never_overlap(tmp_path):
    from llada_trm.build import build_records
    from llada_trm.data.gsm8k import write_jsonl
    from llada_trm.data.synthetic import SyntheticTaskConfig, generate_problems

    problems = generate_problems(SyntheticTaskConfig(max_steps=2), 10, "train")
    write_jsonl(problems, tmp_path / "train.jsonl")
    data = {"dataset": "gsm8k", "path": str(tmp_path), "n_train": 6, "n_eval": 3}
    train, validation = build_records(parse_config({"data": data}).data)
    assert train == problems[:6] and validation == problems[-3:]
    with pytest.raises(ConfigError, match=r"data.n_train \+ data.n_eval = 8 \+ 3 exceed the 10 problems"):
        build_records(parse_config({"data": {**data, "n_train": 8}}).data)


# ----------------------------------------- issue 25, the cut to 50: one update scale, flags, derived, fixed


def test_flags_are_not_settings_and_an_old_file_is_told_so(tmp_path):
    from argparse import Namespace

    from llada_trm.cli import _run_flags

    path = tmp_path / "old.yaml"
    path.write_text("training:\n  device: cuda\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"{path}: training.device: a flag of the command now, not a setting: --device (docs/settings.md); "
        f"convert the file: llada-trm convert {path} --out NEW"
    )
    with pytest.raises(ConfigError, match=r"^--set training.log_every: .*--log-every .*; drop the --set$"):
        parse_config({}, overrides=["training.log_every=3"])
    assert "device" not in settings_keys(RunConfig.model_fields["training"].annotation)
    with _run_flags(Namespace(device="cuda", log_every=3, tensorboard=True)):  # what train/compare set
        t, out = RunConfig().training, RunConfig().output
        assert (t.device, t.log_every, out.tensorboard) == ("cuda", 3, True)
    assert (RunConfig().training.device, RunConfig().training.log_every) == ("cpu", 1)  # tests/conftest.py


def test_the_device_flag_reaches_the_plan(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    raw = {"data": {"n_train": 8, "n_eval": 0}, "output": {"dir": str(tmp_path / "r")}}
    path.write_text(yaml.safe_dump(raw))
    assert main(["train", "--config", str(path), "--dry-run", "--device", "cuda"]) == 0
    assert "device: --device = cuda -> cuda" in capsys.readouterr().out
    assert main(["train", "--config", str(path), "--dry-run"]) == 0
    assert "device: --device = cpu -> cpu" in capsys.readouterr().out


def test_one_delta_scale_converts_from_the_two_refiners():
    slot_run = convert_config({"model": {"refiner": "slot", "slot": {"delta_scale": 0.5, "n_heads": 4},
                                         "mlp": {"delta_scale": 0.3}}})  # fmt: skip
    assert slot_run.data == {"model": {"refiner": "slot", "slot": {"n_heads": 4}, "delta_scale": 0.5}}
    assert slot_run.dropped == ["model.mlp.delta_scale"]  # the MLP is not built: its scale was unused
    both = {"slot": {"delta_scale": 0.5}, "mlp": {"delta_scale": 0.5}}
    hybrid = {"model": {"integration": "hybrid", **both}}
    assert parse_config(convert_config(hybrid).data).model.delta_scale == 0.5
    refused = r"^old.yaml: model.mlp.delta_scale=0.1 and model.slot.delta_scale=0.5: both refiners"
    with pytest.raises(ConfigError, match=refused):
        convert_config({"model": {"integration": "cascade", "slot": {"delta_scale": 0.5}}}, "old.yaml")
    study = {  # the recipe study's shape: a shared scale, and an arm with its own
        "run": {"model": {"slot": {"delta_scale": 0.5}, "mlp": {"delta_scale": 0.5}}},
        "refiners": ["recipe", "mlp_recipe", "old"],
        "arms": {"recipe": {"refiner": "slot"}, "mlp_recipe": {"refiner": "mlp"},
                 "old": {"refiner": "slot", "run": {"model": {"slot": {"delta_scale": 0.1}}}}},
    }  # fmt: skip
    converted = CompareConfig.model_validate(convert_config(study).data)
    arms = ("recipe", "mlp_recipe", "old")
    assert [converted.run_for(name, 0, ".").model.delta_scale for name in arms] == [0.5, 0.5, 0.1]
    with pytest.raises(ConfigError, match=r"run.model.mlp.delta_scale=0.1 and run.model.slot.delta_scale"):
        convert_config({"run": {"model": {"slot": {"delta_scale": 0.5}}}, "refiners": ["mlp", "slot"]})
    only_slot = convert_config({"run": {"model": {"slot": {"delta_scale": 0.5}}}, "refiners": ["slot"]})
    assert only_slot.data["run"] == {"model": {"delta_scale": 0.5}}


def test_the_backbone_dtype_is_derived_and_converts(tmp_path):
    assert "model.dtype" not in settings_keys() and RunConfig().model.dtype == "auto"
    assert convert_config({"model": {"dtype": "auto"}}).dropped == ["model.dtype"]
    trains = convert_config({"model": {"dtype": "float32", "refiner": "none"}, "training": {"phase": 3}})
    assert trains.dropped == ["model.dtype"] and not trains.warnings  # what 'auto' gives a trained backbone
    frozen = convert_config({"model": {"dtype": "bfloat16"}})
    assert frozen.warnings == [
        "model.dtype=bfloat16 dropped: derived now (fp32 when the backbone trains, bf16 under bf16 compute, "
        "else as its checkpoint stores it or fp32; docs/settings.md); the converted run uses it"
    ]
    path = tmp_path / "old.yaml"
    path.write_text("model:\n  dtype: float32\n")
    with pytest.raises(ConfigError, match=r"model.dtype: a retired setting, fixed now .*llada-trm convert"):
        load_config(path)


def test_the_synthetic_task_is_fixed_and_converts():
    task = RunConfig().data.synthetic
    assert (task.min_steps, task.max_steps, task.max_number, task.max_result) == (1, 2, 12, 100)
    assert not [key for key in settings_keys() if key.startswith("data.synthetic.")]
    same = convert_config({"data": {"synthetic": {"min_steps": 1, "max_steps": 2, "max_number": 12,
                                                  "max_result": 100}}})  # fmt: skip
    assert same.data == {} and len(same.dropped) == 4
    unused = convert_config({"data": {"dataset": "arithmetic", "synthetic": {"max_steps": 4}}})
    assert unused.data == {"data": {"dataset": "arithmetic"}}  # another task's knobs were read by nothing
    with pytest.raises(ConfigError) as info:
        convert_config({"data": {"synthetic": {"max_steps": 4}}}, "old.yaml")
    assert str(info.value) == (
        "old.yaml: data.synthetic.max_steps=4: the GSM8K-style task is fixed now at the embedded backbone's "
        "(1-2 steps, numbers up to 12, results up to 100; issue 25, docs/settings.md); a study that varies "
        "the task uses data.dataset: arithmetic"
    )


def test_the_lr_floor_is_a_constant_pretraining_reaches_and_the_ema_left_the_tree():
    from llada_trm.config import fixed_settings
    from llada_trm.extras.pretraining.config import PretrainConfig

    assert "training.min_lr_ratio" not in settings_keys() and "training.ema_decay" not in settings_keys()
    assert RunConfig().training.min_lr_ratio == 0.0 and not hasattr(RunConfig().training, "ema_decay")
    old = convert_config({"training": {"min_lr_ratio": 0.0, "ema_decay": 0.0}})  # the EMA left the tree
    assert sorted(old.dropped) == ["training.ema_decay", "training.min_lr_ratio"] and not old.warnings
    with pytest.raises(ConfigError, match=r"training\.ema_decay=0\.999: this lever left the tree"):
        convert_config({"training": {"ema_decay": 0.999}})
    pretrain = PretrainConfig()
    assert pretrain.run_constants() == {"training.min_lr_ratio": 0.1, "training.log_every": 25}
    run = pretrain.run_config(Path("backbone"))
    with fixed_settings(pretrain.run_constants()):  # how `pretrain` trains it
        assert (run.training.min_lr_ratio, run.training.log_every) == (0.1, 25)
    assert run.model.dtype == "auto"  # a trained backbone: float32, as pretraining set it before
