"""The run config: YAML 1.1 numbers, one-line errors with dotted paths, typo suggestions, overrides."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml
from tiny_assets import FIXTURES

from llada_trm.build import build_records
from llada_trm.config import RunConfig, fixed_settings, load_config, parse_config, save_config
from llada_trm.convert import convert_path
from llada_trm.data.synthetic import SyntheticTaskConfig
from llada_trm.errors import ConfigError
from llada_trm.model.hybrid_config import HybridConfig
from llada_trm.model.refiners.config import MLPSettings, SlotSettings
from llada_trm.schema import parse_override

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# Configs of the other commands, each validated by its own schema's loader; everything else is a run config.
PRETRAIN = "llada_trm.extras.pretraining.config:load_pretrain_config"
COMPARE = "llada_trm.study.config:load_compare_config"


def schema_loader(path: Path) -> str | None:
    """A backbone's config (`*backbone*.yaml`) is a pretrain config, one with a shared `run:` a comparison's;
    None: a run config."""
    if "backbone" in path.name:
        return PRETRAIN
    return COMPARE if "run" in (yaml.safe_load(path.read_text()) or {}) else None


ALL_CONFIGS = sorted(CONFIGS.rglob("*.yaml"))  # every shipped config, in subfolders too


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_yaml11_exponent_without_dot_loads_as_float(tmp_path):
    # Regression: PyYAML reads `5e-4` as the string '5e-4' (YAML 1.1 needs a dot); the schema must coerce it.
    assert isinstance(yaml.safe_load("lr: 5e-4")["lr"], str)
    text = "training:\n  lr: 5e-4\n  backbone_lr: 1e-5\nmodel:\n  delta_scale: 1e-1\n"
    config = load_config(write(tmp_path, text))
    assert isinstance(config.training.lr, float) and config.training.lr == pytest.approx(5e-4)
    assert config.model.delta_scale == pytest.approx(0.1)
    assert config.training.backbone_lr == pytest.approx(1e-5)


def test_override_exponent_is_a_float_too(tmp_path):
    overrides = ["training.lr=3e-4", "model.context_layers=[1, -1]"]
    config = load_config(write(tmp_path, "{}\n"), overrides=overrides)
    assert config.training.lr == pytest.approx(3e-4)
    assert config.model.context_layers == [1, -1]


def test_wrong_type_names_file_and_dotted_path(tmp_path):
    path = write(tmp_path, "training:\n  lr: fast\n", name="x.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message == f"{path}: training.lr: expected a number, got 'fast'"
    assert "\n" not in message and "pydantic" not in message


def test_unknown_key_suggests_the_right_one(tmp_path):
    path = write(tmp_path, "training:\n  learnig_rate: 0.001\n")
    with pytest.raises(ConfigError, match=r"training\.learnig_rate: unknown key; did you mean 'lr'\?"):
        load_config(path)


def test_unknown_nested_key_and_section(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.slot\.n_head: unknown key; did you mean 'n_heads'\?"):
        load_config(write(tmp_path, "model:\n  slot:\n    n_head: 2\n"))
    with pytest.raises(ConfigError, match=r"trainin: unknown key; did you mean 'training'\?"):
        load_config(write(tmp_path, "trainin:\n  lr: 1.0e-3\n"))


def test_other_type_errors_are_one_line(tmp_path):
    cases = {
        "model:\n  refiner: big\n": "model.refiner: expected one of 'none', 'mlp' or 'slot', got 'big'",
        "training:\n  batch_size: two\n": "training.batch_size: expected an integer, got 'two'",
        "training:\n  batch_size: 2.5\n": "training.batch_size: expected an integer, got 2.5",
        "training:\n  phase: 4\n": "training.phase: expected one of 1, 2 or 3",
        "training:\n  lr: true\n": "training.lr: expected a number, got True",
        "model:\n  slot: 3\n": "model.slot: expected a section",
        "model:\n  mlp:\n    param_budget: big\n": "model.mlp.param_budget: expected an integer, got 'big'",
    }
    for text, expected in cases.items():
        with pytest.raises(ConfigError) as info:
            load_config(write(tmp_path, text))
        assert expected in str(info.value)
        assert "\n" not in str(info.value)


def test_override_errors_name_the_override(tmp_path):
    path = write(tmp_path, "{}\n")
    expected = r"^--set training\.lr: training\.lr: expected a number, got 'fast'$"
    with pytest.raises(ConfigError, match=expected):
        load_config(path, overrides=["training.lr=fast"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(path, overrides=["training.lr"])
    with pytest.raises(ConfigError, match="training.lr is a value, not a section"):
        load_config(path, overrides=["training.lr=1.0", "training.lr.x=1"])


def test_parse_override_reads_yaml_values():
    assert parse_override("training.max_steps=null") == (["training", "max_steps"], None)
    assert parse_override("advanced.compile=true") == (["advanced", "compile"], True)
    assert parse_override("output.dir=runs/a=b") == (["output", "dir"], "runs/a=b")


def test_integer_fields_accept_integral_floats_and_exponents():
    config = parse_config({"training": {"max_steps": "1e3", "batch_size": 8.0}})
    assert config.training.max_steps == 1000 and config.training.batch_size == 8


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "training: [\n"))
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="needs data.path"):
        parse_config({"data": {"dataset": "gsm8k"}})
    with pytest.raises(ConfigError, match=r"min_digits \(4\) must not exceed max_digits \(2\)"):
        parse_config({"data": {"arithmetic": {"min_digits": 4, "max_digits": 2}}})


def test_round_trip_through_yaml(tmp_path):
    config = parse_config(
        {"training": {"lr": "5e-4"}, "model": {"context_layers": [2, -1], "delta_scale": "1e-1"}}
    )
    path = save_config(config, tmp_path / "out" / "config.yaml")
    again = load_config(path)
    assert again == config
    assert again.model_dump() == config.model_dump()


def test_defaults_are_a_valid_run():
    config = RunConfig()
    assert config.training_params.trainable_modules == ["refinement_head"]
    assert config.training_params.deep_supervision_weight == pytest.approx(0.3)
    assert config.output.best_is_lower  # 'loss' is minimised


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_every_shipped_config_validates(path):
    other = schema_loader(path)
    if other is not None:
        module, _, loader = other.partition(":")
        config = getattr(importlib.import_module(module), loader)(path)
        assert config is not None
    else:
        assert isinstance(load_config(path), RunConfig)


def test_shipped_configs_exist():
    names = {p.name for p in CONFIGS.glob("*.yaml")}
    seeds = {"slot_trm_projection_warmup.yaml", "slot_trm_projection_warmup_cpu.yaml", "tiny_refiner.yaml"}
    assert seeds <= names


def test_seed_configs_keep_the_original_settings():
    gpu = load_config(CONFIGS / "slot_trm_projection_warmup.yaml")
    assert (gpu.training.batch_size, gpu.training.gradient_accumulation_steps) == (4, 4)
    assert gpu.training.lr == pytest.approx(5e-4) and gpu.training.max_steps == 5 * 455  # 5 epochs
    assert (gpu.model.max_recursive_steps, gpu.model.chunk_size) == (4, 16)
    assert gpu.training.mixed_precision == "bf16"
    cpu = load_config(CONFIGS / "slot_trm_projection_warmup_cpu.yaml")
    assert cpu.data.train_split == "train[:1000]" and cpu.data.max_length == 256
    assert (gpu.data.train_split, gpu.data.eval_split) == ("train[:7273]", "train[-200:]")  # = train[:-200]
    assert (cpu.training.batch_size, cpu.training.gradient_accumulation_steps) == (1, 16)
    assert cpu.model.max_recursive_steps == 2 and cpu.training.max_steps == 2 * 63  # 2 epochs
    for recipe in (gpu, cpu):  # issue 24's recipe: the masks, every chunk, all K steps, the larger budget
        assert recipe.training.masks == "answer_structure" and recipe.model.chunk_selection == "all"
        assert recipe.model.halting == "none" and recipe.model.delta_scale == 0.5


# ------------------------------------------------------------------ the model-side types, embedded once


def test_the_run_schema_embeds_the_model_side_types():
    config = RunConfig()
    assert isinstance(config.model, HybridConfig)
    assert type(config.model.slot) is SlotSettings and type(config.model.mlp) is MLPSettings
    assert isinstance(config.data.synthetic, SyntheticTaskConfig)
    # one default for the context layers, whichever way the config is built
    assert config.model.context_layers == HybridConfig().context_layers == [-1]
    hybrid = config.model.hybrid()
    assert type(hybrid) is HybridConfig and HybridConfig.from_dict(hybrid.to_dict()) == hybrid


def test_model_side_validation_names_the_yaml_key(tmp_path):
    cases = {
        "model:\n  delta_scale: 0\n": "model.delta_scale: input should be greater than 0",
        "model:\n  slot:\n    num_steps: 2\n": "model.slot: may not set ['num_steps']: the hybrid model",
        "model:\n  mlp:\n    hidden_dim: 8\n": "model.mlp.hidden_dim: a retired setting, fixed now",
        "model:\n  context_layers: [1, 1]\n": "model: context_layers lists a layer twice",
        "data:\n  arithmetic:\n    max_digits: 0\n": "data.arithmetic.max_digits: input should be greater",
    }
    for text, expected in cases.items():
        with pytest.raises(ConfigError) as info:
            load_config(write(tmp_path, text, name="m.yaml"))
        assert str(info.value).startswith(f"{tmp_path / 'm.yaml'}: {expected}"), str(info.value)
    # built in Python, the same check names the class and field instead
    with pytest.raises(ConfigError, match=r"^HybridConfig\.delta_scale: input should be greater than 0"):
        HybridConfig(delta_scale=0)


def test_the_generated_task_is_the_embedded_backbones_and_reaches_the_generator():
    config = parse_config({"data": {"n_train": 20, "n_eval": 0}})
    task = config.data.synthetic
    assert (task.min_steps, task.max_steps, task.max_number, task.max_result) == (1, 2, 12, 100)
    with fixed_settings({"data.synthetic.max_steps": 1}):  # the hook a study of the task would use
        train, evaluation = build_records(config.data)
    assert len(train) == 20 and evaluation == []
    assert all(r.answer.count("<<") == 1 for r in train)  # one calculator line: one step
    arithmetic = parse_config({"data": {"dataset": "arithmetic", "arithmetic": {"max_chain": 2}}})
    assert arithmetic.data.generated().max_chain == 2  # the arithmetic task's knobs stay settings


def test_a_config_yaml_written_before_the_embedding_still_loads(tmp_path):
    fixture = FIXTURES / "run_config_before_issue13.yaml"
    with pytest.raises(ConfigError, match="(retired|replaced|removed).*llada-trm convert"):
        load_config(fixture)  # it names settings retired since (issue 25): converted first
    old = load_config(convert_path(fixture, tmp_path / "converted.yaml", echo=lambda _: None))
    # The fixture is tiny_refiner.yaml's resolved config of that time, when its threshold was 0.5.
    then = ["model.confidence_threshold=0.5", "output.dir=outputs/tiny_refiner"]  # runs/ came later
    now = load_config(CONFIGS / "tiny_refiner.yaml", then)
    assert old == now.model_copy(update={"sampling": old.sampling})  # its sampling: section came later too
    assert "context_layers: [-1]" in old.to_yaml()  # lists of scalars are written on one line


@pytest.mark.parametrize(
    ("command", "text", "belongs_to"),
    [
        ("train", "run:\n  training:\n    max_steps: 2\nrefiners: [slot]\n", "compare"),
        ("compare", "model:\n  refiner: slot\ntraining_params:\n  deep_supervision: true\n", "train"),
        ("train", "model:\n  d_model: 32\nevaluation:\n  every: 10\n", "pretrain"),
        ("pretrain", "model:\n  refiner: slot\nsampling:\n  steps: 8\n", "train"),
    ],
)
def test_a_config_given_to_another_command_is_named_for_its_own(tmp_path, capsys, command, text, belongs_to):
    from llada_trm.cli import main

    path = tmp_path / "config.yaml"
    path.write_text(text)
    assert main([command, "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"a `llada-trm {belongs_to}` config" in err, err
    assert f"give it to llada-trm {belongs_to} --config {path}" in err


def test_a_config_that_fits_its_command_gets_no_other_command_named(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("model:\n  refiner: slot\noutput:\n  dir: runs/x\n")  # sections pretrain has too
    assert load_config(path).model.refiner == "slot"
    path.write_text("model:\n  refiner: slot\nrefiners: [slot]\n")  # fits no command: the unknown section
    with pytest.raises(ConfigError, match="refiners: unknown key"):
        load_config(path)
