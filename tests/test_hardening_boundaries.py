"""Issue 28, part B: one error boundary for every command, bounds before allocation, non-finite settings
refused wherever they enter, export paths kept inside the export, `compare --resume` keyed by checkpoint."""

from __future__ import annotations

import errno
import json
import math
import time
from pathlib import Path

import pytest
import yaml
from tiny_assets import compare_yaml

from llada_trm.cli import main
from llada_trm.errors import CheckpointError, ConfigError
from llada_trm.schema import parse_override


@pytest.fixture(scope="module")
def tokenizer():
    from llada_trm.assets import embedded_backbone_dir
    from llada_trm.data.tokenizer import load_tokenizer

    return load_tokenizer(embedded_backbone_dir())


# ------------------------------------------------------------------------------------- the CLI boundary


@pytest.mark.parametrize(
    ("exc", "words"),
    [
        (OSError(errno.ENOSPC, "No space left on device", "/data/x.safetensors"), ["/data/x", "full"]),
        (OSError(errno.EROFS, "Read-only file system", "/ro/out"), ["/ro/out", "writable folder"]),
        (FileExistsError(errno.EEXIST, "File exists", "/etc/passwd"), ["/etc/passwd", "choose another path"]),
        (OSError(errno.EPERM, "Operation not permitted", "/x/.run.json.ab12cd.tmp"), ["/x/run.json"]),
        (
            RuntimeError(
                "[enforce fail at inline_container.cc:595] . PytorchStreamWriter failed writing file "
                "data/0: file write failed"
            ),
            ["writing a file failed", "unchanged"],
        ),  # fmt: skip
        (RecursionError("maximum recursion depth exceeded"), ["nested too deeply"]),
        (MemoryError(), ["out of memory"]),
    ],
)
def test_failures_the_user_can_act_on_are_one_line(exc, words, monkeypatch, capsys):
    def fail(*_args, **_kw):
        raise exc

    monkeypatch.setattr("llada_trm.study.plots.plot_run", fail)
    assert main(["plot", "somewhere"]) in (1, 2)
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("llada-trm: error: "), err
    assert "Traceback" not in err and all(w in err for w in words), err


def test_safetensors_and_template_errors_are_described_and_bugs_are_not():
    from jinja2.sandbox import SecurityError
    from safetensors import SafetensorError

    from llada_trm.boundary import describe_failure

    assert "safetensors" in describe_failure(SafetensorError("Error while serializing: IoError"))[0]
    assert "chat template" in describe_failure(SecurityError("access to attribute '__class__'"))[0]
    assert describe_failure(RuntimeError("shape mismatch in a matmul")) is None  # a bug keeps its traceback
    assert describe_failure(KeyError("x")) is None


def test_lm_eval_cli_turns_backend_errors_into_one_line(monkeypatch, capsys):
    pytest.importorskip("lm_eval")
    from llada_trm.extras.harness import cli

    def fail() -> None:
        raise ConfigError("llada_trm: max_length=99999 exceeds the backbone's 1024 positions")

    monkeypatch.setattr("lm_eval.__main__.cli_evaluate", fail)
    with pytest.raises(SystemExit) as info:
        cli.main(["--model", "llada_trm"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    expected = "llada_trm: max_length=99999 exceeds the backbone's 1024 positions"
    assert err == f"llada-trm-lm-eval: error: {expected}"


def test_lm_eval_cli_refuses_an_output_path_it_cannot_write(tmp_path, monkeypatch, capsys):
    pytest.importorskip("lm_eval")
    from llada_trm.extras.harness import cli

    monkeypatch.setattr("lm_eval.__main__.cli_evaluate", lambda: None)  # never reached
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(SystemExit) as info:
        cli.main(["--model", "llada_trm", "--output_path", str(blocker / "results")])
    assert info.value.code == 2 and f"{blocker} is a file" in capsys.readouterr().err


def test_lm_eval_cli_names_a_model_arg_given_twice(monkeypatch, capsys):
    pytest.importorskip("lm_eval")
    from llada_trm.extras.harness import cli

    def fail() -> None:
        raise TypeError(
            "llada_trm.extras.harness.model.LLaDATRMLM() got multiple values for keyword argument "
            "'batch_size'"
        )

    monkeypatch.setattr("lm_eval.__main__.cli_evaluate", fail)
    with pytest.raises(SystemExit) as info:
        cli.main(["--model", "llada_trm"])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and "Traceback" not in err and "--batch_size" in err, err


def test_a_write_that_names_no_file_is_named_by_the_atomic_writers(tmp_path):
    from safetensors import SafetensorError

    from llada_trm.io import atomic_directory, atomic_path, write_text_atomic

    target = tmp_path / "out.json"
    write_text_atomic(target, "old\n")
    for failure in (
        OSError(errno.EFBIG, "File too large"),
        SafetensorError("Error while serializing: I/O error: File too large (os error 27)"),
        RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"),
    ):
        with pytest.raises(OSError) as info, atomic_path(target):
            raise failure
        assert info.value.filename == str(target) and target.read_text() == "old\n"
        with pytest.raises(OSError) as info, atomic_directory(tmp_path / "folder"):
            raise failure
        assert info.value.filename == str(tmp_path / "folder")
    with pytest.raises(KeyError), atomic_path(target):  # not a write failure: left as it is
        raise KeyError("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


# ------------------------------------------------------------------------------------ sampler settings


@pytest.mark.parametrize(
    "setting",
    [
        {"temperature": math.nan},
        {"cfg_scale": math.inf},
        {"temperature": -math.inf},
        {"threshold": math.nan},
        {"temperature": "hot"},
    ],  # fmt: skip
)
def test_non_finite_sampler_settings_are_refused(setting):
    from llada_trm.diffusion.options import SamplingOptions

    with pytest.raises(ValueError, match=next(iter(setting))):
        SamplingOptions(**setting)


def test_a_non_finite_config_value_is_blamed_on_its_set(tmp_path):
    from llada_trm.config import load_config, parse_config

    for override, key in (("sampling.threshold=.nan", "sampling.threshold"),
                          ("sampling.cfg_scale=.inf", "sampling.cfg_scale"),
                          ("lora.alpha=.inf", "lora.alpha")):  # fmt: skip
        with pytest.raises(ConfigError) as info:
            parse_config({}, source=str(tmp_path / "run.yaml"), overrides=[override])
        assert str(info.value).startswith(f"--set {key}"), info.value
    # the field a section's check is about is blamed, not another --set it mentions
    with pytest.raises(ConfigError, match=r"^--set sampling.steps: "):
        parse_config({}, overrides=["sampling.gen_length=16", "sampling.block_length=8", "sampling.steps=7"])
    # a section's check naming a field the file set (not the --set) still blames the file
    path = tmp_path / "run.yaml"
    path.write_text("sampling:\n  steps: 7\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, ["sampling.threshold=0.5"])
    assert str(info.value).startswith(f"{path}: sampling: steps (7)"), info.value


def test_lm_eval_model_args_are_bounded_and_finite():
    pytest.importorskip("lm_eval")
    from llada_trm.extras.harness.model import LLaDATRMLM

    with pytest.raises(ConfigError, match="positions"):
        LLaDATRMLM(checkpoint="embedded", device="cpu", max_length=10**6)
    with pytest.raises(ConfigError, match="temperature must be a finite number"):
        LLaDATRMLM(checkpoint="embedded", device="cpu", temperature=math.nan)
    lm = LLaDATRMLM(checkpoint="embedded", device="cpu", steps=8, gen_length=16, block_length=8)
    with pytest.raises(ConfigError, match="cfg_scale must be a finite number"):
        lm._request_options({"cfg_scale": math.inf})


# --------------------------------------------------------------------------------------- Python API


def test_generate_refuses_an_empty_question_a_mapping_and_undecodable_text():
    from llada_trm.evaluate.loading import load_checkpoint

    model = load_checkpoint("embedded", device="cpu")
    for bad in ("", "   ", {"question": "2+2?"}, {"a", "b"}, b"bytes", 7):
        with pytest.raises(ValueError, match="generate"):
            model.generate(bad, steps=4, gen_length=8, block_length=8)
    with pytest.raises(ValueError, match="not valid Unicode"):
        model.generate("what is \udcff?", steps=4, gen_length=8, block_length=8)


def test_lora_rank_past_the_layer_width_is_refused():
    pytest.importorskip("peft")
    from llada_trm.model.llada import LLaDAModel
    from llada_trm.model.llada_config import LLaDAConfig
    from llada_trm.model.lora import add_lora

    backbone = LLaDAModel(LLaDAConfig(d_model=32, n_heads=4, n_layers=2, vocab_size=64))
    with pytest.raises(ConfigError, match=r"lora.rank=33 .* 1..32"):
        add_lora(backbone, [0], rank=33, alpha=1.0)
    assert add_lora(backbone, [0], rank=32, alpha=1.0)


# ---------------------------------------------------------------------------------- YAML and --set


def _bomb(levels: int) -> str:
    parts = ["&a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    for level in range(1, levels):
        parts.append(f"&a{level} [{', '.join([f'*a{level - 1}'] * 9)}]")
    return "[" + ", ".join(parts) + "]"


def test_a_set_value_is_read_as_strictly_as_a_file():
    with pytest.raises(ConfigError, match=r"^--set model.context_layers: .*aliases expand"):
        parse_override(f"model.context_layers={_bomb(7)}")
    with pytest.raises(ConfigError, match=r"^--set training.lr: nested too deeply"):
        parse_override("training.lr=" + "[" * 5000 + "]" * 5000)
    with pytest.raises(ConfigError, match=r"^--set training:1: key 'lr' appears twice"):
        parse_override("training={lr: 1, lr: 2}")


def test_non_utf8_inputs_are_named(backbone_dir, tmp_path, capsys):
    import shutil

    from llada_trm.model.llada_config import LLaDAConfig

    copy = tmp_path / "bb"
    shutil.copytree(backbone_dir, copy)
    (copy / "config.json").write_bytes(b'{"d_model": 32, "caf\xe9": 1}')
    with pytest.raises(ConfigError, match=r"config.json:1: not UTF-8 text \(byte 0xe9"):
        LLaDAConfig.from_json_file(copy / "config.json")
    questions = tmp_path / "questions.txt"
    questions.write_bytes(b"What is caf\xe9 plus 2?\n")
    assert main(["generate", "--checkpoint", "embedded", "--file", str(questions)]) == 2
    assert f"{questions}:1: not UTF-8 text" in capsys.readouterr().err


def test_cache_sizes_are_bounded():
    from llada_trm.config import parse_config

    for override in ("training.batch_size=1e9", "data.n_train=1e9"):
        with pytest.raises(ConfigError, match=f"--set {override.split('=')[0]}"):
            parse_config({}, overrides=[override])


def test_a_deeply_nested_config_file_is_named(tmp_path):
    from llada_trm.config import load_config

    path = tmp_path / "deep.yaml"
    path.write_text("training: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match="deep.yaml: nested too deeply"):
        load_config(path)


# ----------------------------------------------------------------------------- model folder bounds


def _edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_config_json_sizes_are_bounded_before_any_block_is_built(backbone_dir, tmp_path):
    import shutil

    from llada_trm.model.llada import LLaDAModel
    from llada_trm.model.llada_config import LLaDAConfig

    with pytest.raises(ConfigError, match="n_layers=100000 is past"):
        LLaDAConfig(d_model=32, n_heads=4, n_layers=100_000, vocab_size=64)
    for field, value in (("d_model", 2**20), ("vocab_size", 2**30), ("max_sequence_length", 2**40),
                         ("mlp_hidden_size", 2**30), ("mask_token_id", -1)):  # fmt: skip
        sizes = {"d_model": 32, "n_heads": 4, "n_layers": 2, "vocab_size": 64, field: value}
        with pytest.raises(ConfigError, match=field):
            LLaDAConfig(**sizes)
    copy = tmp_path / "bb"
    shutil.copytree(backbone_dir, copy)
    _edit_config(copy, n_layers=1000)
    started = time.perf_counter()
    with pytest.raises(CheckpointError, match=r"n_layers=1000, but the weights hold \d+ blocks"):
        LLaDAModel.from_pretrained(copy)
    assert time.perf_counter() - started < 5  # refused from the headers, not after building 1000 blocks


def test_a_shard_index_may_not_name_files_outside_the_folder(backbone_dir, tmp_path):
    import shutil

    from llada_trm.model.llada import LLaDAModel

    copy = tmp_path / "bb"
    shutil.copytree(backbone_dir, copy)
    (copy / "model.safetensors").rename(tmp_path / "outside.safetensors")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "outside.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    index = {"metadata": {}, "weight_map": dict.fromkeys(keys, "../outside.safetensors")}
    (copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="plain file names"):
        LLaDAModel.from_pretrained(copy)


# ------------------------------------------------------------------------------------- chat templates


@pytest.mark.parametrize(
    ("template", "words"),
    [
        ("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}", "took more than"),
        (
            "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}"
            "{{ ns.s }}",
            "MiB|took more than",  # memory or time, whichever a loaded machine reaches first
        ),  # fmt: skip
        ("{{ 'a' * 10000000000 }}", "repetition"),
        ("{{ ''.__class__.__mro__ }}", "SecurityError"),
        ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "recurses"),
    ],
)
def test_an_unknown_chat_template_runs_under_limits(tokenizer, template, words, monkeypatch):
    from llada_trm.data.collate import encode_prompt

    monkeypatch.setattr(tokenizer, "chat_template", template)
    started = time.perf_counter()
    with pytest.raises(ValueError, match=words):
        encode_prompt(tokenizer, "What is 2 plus 3?")
    assert time.perf_counter() - started < 10


def test_an_unknown_but_benign_template_renders_what_the_tokenizer_would(tokenizer, monkeypatch):
    from llada_trm.data.chat_template import KNOWN_TEMPLATES
    from llada_trm.data.collate import encode_prompt

    assert tokenizer.chat_template in KNOWN_TEMPLATES
    expected = encode_prompt(tokenizer, "Tom has 3 pens. How many?")
    monkeypatch.setattr(tokenizer, "chat_template", tokenizer.chat_template + "{# a comment #}")
    assert encode_prompt(tokenizer, "Tom has 3 pens. How many?") == expected
    with pytest.raises(ValueError, match="not valid Unicode"):
        encode_prompt(tokenizer, "a\udcff")


# ------------------------------------------------------------------------------------------ compare


def test_compare_bounds_its_problems_and_seeds(backbone_dir, tmp_path):
    from llada_trm.study.config import load_compare_config, parse_seeds

    with pytest.raises(ConfigError, match="--set evaluation.n_problems"):
        load_compare_config(None, ["evaluation.n_problems=1e9"])
    with pytest.raises(ValueError, match="at most 64"):
        load_compare_config(None, [], parse_seeds(",".join(map(str, range(65)))))


def test_compare_resume_with_force_is_refused_in_one_line(backbone_dir, tmp_path, capsys):
    path = tmp_path / "cmp.yaml"
    path.write_text(yaml.safe_dump(compare_yaml(backbone_dir, tmp_path / "cmp")))
    assert main(["compare", "--config", str(path), "--no-progress", "--resume", "--force"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--resume" in err and "--force" in err and "\n" not in err
    assert not (tmp_path / "cmp").exists()


def test_compare_resume_keys_evaluations_by_checkpoint(backbone_dir, tmp_path, capsys):
    config = compare_yaml(backbone_dir, tmp_path / "cmp")
    config["refiners"], config["baseline"] = ["slot"], False
    path = tmp_path / "cmp.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["compare", "--config", str(path), "--no-progress", "--seeds", "0"]) == 0
    capsys.readouterr()
    config["evaluation"]["checkpoint"] = "best"  # the same trained run, another checkpoint of it
    path.write_text(yaml.safe_dump(config))
    assert main(["compare", "--config", str(path), "--no-progress", "--seeds", "0", "--resume"]) == 0
    out = capsys.readouterr().out
    evals = tmp_path / "cmp" / "seed0" / "slot" / "eval"
    assert "reusing the trained slot, seed 0" in out and f"reusing {evals}" not in out
    summaries = {p.parent.name: json.loads(p.read_text()) for p in evals.glob("*/summary.json")}
    assert sorted(s["checkpoint_identity"]["checkpoint"] for s in summaries.values()) == ["best", "last"]
    report = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert [row["checkpoint"] for row in report["rows"]] == ["best"]
    assert report["checkpoint"] == {"asked": "best", "fallbacks": []}


def test_compare_falls_back_from_best_to_last_saying_so(backbone_dir, tmp_path, capsys):
    config = compare_yaml(backbone_dir, tmp_path / "cmp")
    config["refiners"], config["baseline"] = ["slot"], False
    config["run"]["data"]["n_eval"] = 0  # no validation set: the trainer keeps no 'best'
    config["run"]["training"]["eval_every"] = 0
    config["evaluation"]["checkpoint"] = "best"
    path = tmp_path / "cmp.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["compare", "--config", str(path), "--no-progress", "--seeds", "0"]) == 0
    assert "no 'best' checkpoint" in capsys.readouterr().out
    report = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert report["checkpoint"]["fallbacks"] == [
        {
            "seed": 0,
            "refiner": "slot",
            "asked": "best",
            "used": "last",
            "reason": "the run kept no 'best' checkpoint (no validation set)",
        }  # fmt: skip
    ]
    assert [row["checkpoint"] for row in report["rows"]] == ["last"]
    assert "checkpoints/last for slot seed 0" in (tmp_path / "cmp" / "comparison.md").read_text()
