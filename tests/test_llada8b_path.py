"""The LLaDA-8B user's path (issue 27): bf16 checkpoints stay bf16, the 8B recipes, `--dry-run`, one policy
for prompts that do not fit, and the docs' commands."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from tiny_assets import run_config, tiny_backbone

from llada_trm.build import backbone_dtype
from llada_trm.config import fixed_settings, parse_config
from llada_trm.evaluate.loading import load_checkpoint
from llada_trm.model.llada import LLaDAModel
from llada_trm.model.llada_weights import stored_dtype

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_backbone(tmp_path_factory)


@pytest.fixture(scope="module")
def bf16_sharded(backbone: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny backbone as LLaDA-8B ships: bf16 weights in several shards with an index, and a tokenizer."""
    out = tmp_path_factory.mktemp("bf16_sharded")
    LLaDAModel.from_pretrained(backbone, dtype=torch.bfloat16).save_pretrained(out, max_shard_size="40KB")
    for file in backbone.iterdir():
        if file.is_file() and not (file.name.endswith(".safetensors") or file.name == "config.json"):
            shutil.copy(file, out / file.name)
    return out


# ------------------------------------------------------------------------------- bf16 loads as bf16


@pytest.fixture
def large(monkeypatch: pytest.MonkeyPatch) -> None:
    """Treat the tiny checkpoint as LLaDA-8B-sized: above the size under which 'auto' widens it to fp32."""
    monkeypatch.setattr("llada_trm.build.WIDEN_LIMIT_BYTES", 1)


def test_auto_dtype_rule() -> None:
    """bf16 on disk stays bf16 (LLaDA-8B: 16 GB, not 32); only a small backbone is widened on a CPU."""
    from llada_trm.build import choose_backbone_dtype

    eight_b = 8_015_581_184
    assert choose_backbone_dtype(torch.bfloat16, eight_b, frozen=True, bf16_compute=False) == torch.bfloat16
    assert choose_backbone_dtype(torch.float16, eight_b, frozen=True, bf16_compute=False) == torch.float16
    assert choose_backbone_dtype(torch.float32, eight_b, frozen=True, bf16_compute=True) == torch.bfloat16
    assert choose_backbone_dtype(torch.bfloat16, eight_b, frozen=False, bf16_compute=True) == torch.float32
    assert choose_backbone_dtype(torch.bfloat16, 1_434_112, frozen=True, bf16_compute=False) == torch.float32
    assert choose_backbone_dtype(torch.float32, eight_b, frozen=True, bf16_compute=False) == torch.float32


def test_bf16_sharded_checkpoint_loads_as_bf16(bf16_sharded: Path, large: None) -> None:
    assert len(list(bf16_sharded.glob("model-*.safetensors"))) > 1  # sharded, with an index
    assert stored_dtype(bf16_sharded) == torch.bfloat16
    loaded = load_checkpoint(str(bf16_sharded), device="cpu")
    assert {p.dtype for p in loaded.model.backbone.parameters()} == {torch.bfloat16}
    # no widened copy: the loaded backbone's bytes are the bytes on disk
    on_disk = sum(f.stat().st_size for f in bf16_sharded.glob("model-*.safetensors"))
    in_memory = sum(p.numel() * p.element_size() for p in loaded.model.backbone.parameters())
    assert in_memory <= on_disk
    answer = loaded.generate("Tom has 3 apples. How many apples does Tom have?", gen_length=16, steps=4,
                             block_length=8)
    assert len(answer.answers) == 1


def test_explicit_dtype_still_wins(bf16_sharded: Path, large: None) -> None:
    loaded = load_checkpoint(str(bf16_sharded), device="cpu", dtype="float32")
    assert {p.dtype for p in loaded.model.backbone.parameters()} == {torch.float32}


def test_the_embedded_backbone_keeps_running_fp32_on_a_cpu() -> None:
    """Its shipped results were measured in fp32; it is stored in bf16 but 6 MB wide in fp32."""
    from llada_trm.assets import embedded_backbone_dir

    assert stored_dtype(Path(embedded_backbone_dir())) == torch.bfloat16
    loaded = load_checkpoint("embedded", device="cpu")
    assert {p.dtype for p in loaded.model.backbone.parameters()} == {torch.float32}


def test_training_auto_dtype_reads_the_checkpoint(
    bf16_sharded: Path, backbone: Path, tmp_path: Path, large: None
) -> None:
    frozen = parse_config(run_config(bf16_sharded, tmp_path / "run"))
    assert frozen.model.dtype == "auto"
    assert backbone_dtype(frozen, None) == torch.bfloat16  # phase 1 on a CPU, fp32 compute
    trained = parse_config(run_config(bf16_sharded, tmp_path / "run", phase=2))
    assert backbone_dtype(trained, None) == torch.float32  # a backbone that trains keeps fp32 weights
    raw = run_config(bf16_sharded, tmp_path / "run")
    with fixed_settings({"model.dtype": "float32"}):  # derived since issue 25; the hook still reaches it
        assert backbone_dtype(parse_config(raw), None) == torch.float32
    fp32 = parse_config(run_config(backbone, tmp_path / "run"))
    assert backbone_dtype(fp32, None) == torch.float32  # an fp32 checkpoint on a CPU: unchanged
    assert backbone_dtype(fp32, torch.bfloat16) == torch.bfloat16  # under bf16 autocast: as before


# ----------------------------------------------------------------------------- prompts that do not fit


def test_eval_skips_and_counts_prompts_that_do_not_fit(tmp_path: Path, capsys) -> None:
    """`eval` on GSM8K-length questions with the embedded default used to stop at the first long one."""
    from llada_trm.cli import main
    from llada_trm.data.gsm8k import GSM8KRecord, write_jsonl

    long = "Natalia sold clips to 48 of her friends in April, and then she sold half as many in May. " * 12
    records = [GSM8KRecord("Tom has 3 apples. He buys 2 more. How many apples does he have?", "#### 5"),
               GSM8KRecord(long + "How many?", "#### 72")]
    data = write_jsonl(records, tmp_path / "test.jsonl")
    code = main(["eval", "--checkpoint", "embedded", "--dataset", "gsm8k", "--data-path", str(data),
                 "--gen-length", "32", "--block-length", "32", "--steps", "8", "--no-progress",
                 "--out", str(tmp_path / "eval")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "(2 problems" in out and "prompts: 1 of 2 skipped" in out and "scored as wrong" in out
    import json

    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["prompts"]["skipped_indices"] == [1] and summary["n"] == 2


# ------------------------------------------------------------------------------------- the 8B recipes

RECIPES = ["configs/slot_trm_projection_warmup.yaml", "configs/slot_trm_projection_warmup_cpu.yaml"]
FAST_DLLM = ["sampling.threshold=0.9", "sampling.cache=dual"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipes_carry_lladas_gsm8k_sampling_and_validate_on_train(recipe: str) -> None:
    from llada_trm.config import load_config
    from llada_trm.data.gsm8k import parse_split

    config = load_config(REPO / recipe)
    options = config.sampling.options()
    assert (options.gen_length, options.steps, options.block_length) == (256, 256, 32)
    assert (options.remasking, options.temperature, options.threshold, options.cache) == (
        "low_confidence", 0.0, None, None)
    assert parse_split(config.data.eval_split)[0] == "train"  # validation (and `best`) never sees test
    fast = load_config(REPO / recipe, FAST_DLLM).sampling.options()  # the documented Fast-dLLM variant
    assert (fast.threshold, fast.cache, fast.gen_length) == (0.9, "dual", 256)
    assert config.model.dtype == "auto"
    assert all(line in (REPO / recipe).read_text() for line in ("--set sampling.threshold=0.9",))


def _gsm8k_folder(root: Path) -> Path:
    """A GSM8K-layout folder (train.jsonl, test.jsonl) of generated problems, disjoint splits."""
    from llada_trm.data.gsm8k import write_jsonl
    from llada_trm.data.synthetic import SyntheticTaskConfig, generate_problems

    task = SyntheticTaskConfig(max_steps=2, max_number=10)
    root.mkdir(parents=True, exist_ok=True)
    write_jsonl(generate_problems(task, 40, "train"), root / "train.jsonl")
    write_jsonl(generate_problems(task, 12, "test"), root / "test.jsonl")
    return root


def test_recipe_splits_are_disjoint_from_test(tmp_path: Path) -> None:
    from llada_trm.build import build_records, overlap_warning
    from llada_trm.config import load_config

    data = _gsm8k_folder(tmp_path / "gsm8k")
    for recipe in RECIPES:
        config = load_config(REPO / recipe, [f"data.path={data}", "data.n_train=32", "data.n_eval=8"])
        assert overlap_warning(config) is None
        train, validation = build_records(config.data)
        assert len(train) == 32 and len(validation) == 8
    evaluated = build_records(config.data)[1][:5]  # evaluating on the run's own validation problems
    assert "validation and test splits share 5 problem(s)" in overlap_warning(config, evaluated)


def test_train_and_eval_warn_when_validation_overlaps_the_evaluated_split(
    backbone: Path, tmp_path: Path, caplog, capsys
) -> None:
    import logging

    import yaml

    from llada_trm.cli import main
    from llada_trm.training.loop import run_train

    data = _gsm8k_folder(tmp_path / "gsm8k")
    raw = run_config(backbone, tmp_path / "run", max_steps=1, eval_every=1)
    # validation: the last 4 of train (issue 25: a run never validates on test, so training does not warn)
    raw["data"] = {"dataset": "gsm8k", "path": str(data), "n_train": 32, "n_eval": 4, "max_length": 128}
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(raw))
    with caplog.at_level(logging.WARNING, logger="llada_trm"):
        run_train(config_file, progress=False)
    assert "share" not in caplog.text
    code = main(["eval", "--checkpoint", str(tmp_path / "run"), "--dataset", "gsm8k",
                 "--data-path", str(data), "--split", "train[-6:]", "--gen-length", "16",
                 "--block-length", "8", "--steps", "4",
                 "--no-progress", "--out", str(tmp_path / "eval")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "warning: " in captured.err and "validation and test splits share 4 problem(s)" in captured.err
    assert "share 4" in (tmp_path / "eval" / "summary.json").read_text()


# ------------------------------------------------------------------------------------------- --dry-run


def _run_cli(argv: list[str], capsys) -> tuple[int, str]:
    from llada_trm.cli import main

    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_train_dry_run_plans_the_8b_recipe_on_a_cpu_without_weights(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no checkpoints/ and no data/ here: nothing downloaded
    argv = ["train", "--config", str(REPO / RECIPES[0]), "--device", "cuda", "--dry-run"]  # plan for its GPU
    code, out = _run_cli(argv, capsys)
    assert code == 0, out
    assert "LLaDA-8B's architecture constants" in out  # says where the architecture came from
    assert "phase 1: backbone frozen" in out and "8,028.7M total, 13.157M trainable" in out
    assert "weights: backbone                      16.03 GB" in out  # 8.015B bf16 parameters
    for part in ("optimizer: AdamW", "activations (estimate)", "feature cache:", "total (device memory"):
        assert part in out
    assert "sampler: gen_length 256, steps 256, block_length 32, remasking low_confidence" in out
    assert "data: cannot count" in out and "data/gsm8k: no such file or folder" in out
    assert "--device: cuda, and this machine has no CUDA device" in out or torch.cuda.is_available()
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_dry_run_reads_a_model_folders_config_and_counts_data(
    bf16_sharded: Path, tmp_path: Path, capsys, large: None
) -> None:
    data = _gsm8k_folder(tmp_path / "gsm8k")
    code, out = _run_cli(["train", "--config", str(REPO / RECIPES[0]), "--dry-run",
                          "--set", f"model.backbone={bf16_sharded}", "--set", f"data.path={data}",
                          "--set", "data.n_train=32", "--set", "data.n_eval=8",
                          "--set", "model.context_layers=[-1]", "--set", "model.slot.n_heads=2",
                          "--set", "model.chunk_size=8", "--set", "data.max_length=128"], capsys)
    assert code == 0, out
    assert f"from {bf16_sharded}/config.json" in out
    assert "precision: backbone bfloat16" in out
    assert "32 training problems (train[:32]), 8 validation (train[-8:])" in out
    assert "max_steps 2275 = 2275 optimizer steps" in out  # the recipe's 5 epochs of GSM8K
    assert "warning:" not in out


def test_eval_and_compare_dry_runs(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    code, out = _run_cli(["eval", "--checkpoint", "embedded", "--dry-run", "--limit", "4"], capsys)
    assert code == 0, out
    assert "eval --dry-run" in out and "data: 4 synthetic problems" in out and "prompts: none skipped" in out
    assert "weights: backbone" in out and "sampler: gen_length 128" in out
    code, out = _run_cli(["eval", "--checkpoint", "checkpoints/LLaDA-8B-Instruct", "--dry-run",
                          "--dataset", "gsm8k", "--data-path", "data/gsm8k", "--device", "cuda"], capsys)
    assert code == 0, out
    assert "LLaDA-8B's architecture constants" in out and "data/gsm8k: no such file or folder" in out
    code, out = _run_cli(["compare", "--config", str(REPO / "configs/compare_tiny.yaml"), "--dry-run",
                          "--set", "run.data.n_train=200"], capsys)
    assert code == 0, out
    assert "== mlp ==" in out and "== slot ==" in out and "2 trainings" in out
    assert "evaluation: 240 synthetic problems (test, checkpoint last), disjoint" in out
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ docs


def _tracked(*patterns: str) -> list[Path]:
    return sorted(p for pattern in patterns for p in REPO.glob(pattern) if p.is_file())


def test_no_doc_or_message_says_huggingface_cli() -> None:
    files = _tracked("README.md", "docs/**/*.md", "configs/*.yaml", "src/**/*.py", "bench/*", "Makefile")
    offenders = [str(f.relative_to(REPO)) for f in files if "huggingface-cli download" in f.read_text()]
    assert offenders == []


def test_every_path_the_docs_name_exists() -> None:
    """Markdown links and the configs/docs paths named in README, docs and configs point at real files."""
    import re

    missing = []
    for doc in _tracked("README.md", "docs/*.md", "configs/*.yaml"):
        text = doc.read_text()
        for target in re.findall(r"\]\(([^)#\s]+)\)", text):
            if not target.startswith(("http://", "https://")) and not (doc.parent / target).exists():
                missing.append(f"{doc.name}: {target}")
        for named in re.findall(r"(?<![\w/.])((?:configs|docs)/[\w/.-]+\.(?:yaml|md))", text):
            if named != "configs/x.yaml" and not (REPO / named).exists():  # x.yaml: errors' example name
                missing.append(f"{doc.name}: {named}")
    assert missing == []


def test_the_8b_guide_is_linked_and_says_what_ran_on_a_gpu() -> None:
    guide = (REPO / "docs" / "llada8b.md").read_text()
    assert "docs/llada8b.md" in (REPO / "README.md").read_text()
    assert "bash bench/gpu_check.sh" in guide and "hf download GSAI-ML/LLaDA-8B-Instruct" in guide
    assert "Nothing in this project has run on a GPU yet" in guide
    assert "to_json" in guide and "openai/gsm8k" in guide  # GSM8K as JSONL
    assert "ESTIMATES until measured" in guide
    assert "arms" in (REPO / "docs" / "comparison.md").read_text()


def test_missing_local_folders_are_reported_as_missing_not_as_hub_failures(tmp_path: Path) -> None:
    from llada_trm.build import resolve_backbone_dir
    from llada_trm.data.gsm8k import load_gsm8k
    from llada_trm.errors import ConfigError

    with pytest.raises(ConfigError, match=r"no such folder .*hf download GSAI-ML/LLaDA-8B-Instruct"):
        resolve_backbone_dir(str(tmp_path / "checkpoints" / "LLaDA-8B-Instruct"))
    (tmp_path / "partial").mkdir()
    with pytest.raises(ConfigError, match="without config.json"):
        resolve_backbone_dir(str(tmp_path / "partial"))
    with pytest.raises(ValueError, match=r"^data/gsm8k: no such file or folder") as raised:
        load_gsm8k("data/gsm8k", "train")
    assert "Hub" not in str(raised.value)


def test_feature_cache_doc_commands_run_beside_the_tutorial_run(tmp_path: Path, monkeypatch, capsys) -> None:
    import re
    import shlex

    block = re.search(r"```bash\n(.*?)```", (REPO / "docs" / "feature_cache.md").read_text(), re.S)
    commands = [shlex.split(line, comments=True) for line in block.group(1).splitlines() if line.strip()]
    assert len(commands) == 2
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    short = ["--set", "data.n_train=16", "--set", "data.n_eval=8", "--set",
             "training.max_steps=1", "--no-progress"]
    tutorial = ["train", "--config", "configs/tiny_refiner.yaml", *short]  # the README's run, first
    for argv in [tutorial, *(words[1:] + short for words in commands)]:
        code, out = _run_cli(argv, capsys)
        assert code == 0, out
    assert (tmp_path / "runs" / "tiny_refiner_cached" / "feature_cache").is_dir()
