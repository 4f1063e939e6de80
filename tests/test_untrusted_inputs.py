"""Issue 14: inputs are read, never executed, and bad ones fail with one line naming the file.

A crafted backbone folder whose tokenizer config names custom code must not run it (whatever stdin says);
duplicate YAML keys, alias bombs and non-UTF-8 bytes are refused with file:line; GSM8K answers without
`#### n` are reported.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llada_trm.assets import embedded_backbone_dir
from llada_trm.config import load_config
from llada_trm.data.gsm8k import DataError, load_gsm8k
from llada_trm.data.tokenizer import load_tokenizer
from llada_trm.errors import ConfigError

SRC = Path(__file__).resolve().parents[1] / "src"


def _custom_code_folder(root: Path) -> tuple[Path, Path]:
    """The embedded tokenizer, plus an `auto_map` naming a class in a Python file that leaves a marker."""
    folder = root / "evil"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json"):
        shutil.copy(embedded_backbone_dir() / name, folder / name)
    marker = root / "code_ran"
    (folder / "evil_tokenizer.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import PreTrainedTokenizerFast\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "EvilTokenizer"
    config["auto_map"] = {"AutoTokenizer": [None, "evil_tokenizer.EvilTokenizer"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder, marker


def test_a_tokenizer_folder_never_runs_its_code_even_when_stdin_says_yes(tmp_path: Path) -> None:
    folder, marker = _custom_code_folder(tmp_path)
    script = (
        "import sys\nfrom llada_trm.data.tokenizer import load_tokenizer\n"
        f"try:\n    load_tokenizer({str(folder)!r})\n"
        "except ValueError as exc:\n    print('ERROR', exc, file=sys.stderr)\n    sys.exit(2)\n"
    )
    env = {"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", script], input="y\ny\n", capture_output=True, text=True, timeout=120, env=env
    )
    assert not marker.exists(), "the folder's Python file was imported"
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ERROR ") and "auto_map" in last and "never runs code" in last
    assert "Traceback" not in done.stderr


def test_a_tokenizer_load_refuses_trust_remote_code(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="never runs code"):
        load_tokenizer(embedded_backbone_dir(), trust_remote_code=True)


# ------------------------------------------------------------------------------------------------ YAML


def _write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def test_a_duplicated_key_is_refused_with_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "run.yaml", "training:\n  lr: 1e-3\n  batch_size: 2\n  lr: 2e-3\n")
    with pytest.raises(ConfigError, match=r"run\.yaml:4: key 'lr' appears twice \(first at line 2\)"):
        load_config(path)


def test_a_duplicated_section_is_refused(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "run.yaml", "training:\n  lr: 1e-3\ndata:\n  max_length: 64\ntraining:\n  seed: 1\n"
    )
    with pytest.raises(ConfigError, match=r"run\.yaml:5: key 'training' appears twice"):
        load_config(path)


def test_a_merge_key_may_still_override(tmp_path: Path) -> None:
    path = _write(tmp_path / "run.yaml", "training:\n  <<: {lr: 1e-3, seed: 3}\n  lr: 2e-3\n")
    assert load_config(path).training.lr == 2e-3 and load_config(path).training.seed == 3


def test_an_alias_bomb_fails_fast(tmp_path: Path) -> None:
    lines = ["a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]")
    path = _write(tmp_path / "bomb.yaml", "\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=r"bomb\.yaml: its anchors/aliases expand to more than"):
        load_config(path)


def test_a_recursive_alias_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"loop\.yaml:1: an alias refers to the node that contains it"):
        load_config(_write(tmp_path / "loop.yaml", "training: &t {seed: *t}\n"))


def test_a_small_alias_still_works(tmp_path: Path) -> None:
    path = _write(tmp_path / "run.yaml", "x: &seed 7\ntraining:\n  seed: *seed\n")
    with pytest.raises(ConfigError, match="unknown key"):  # `x` is not a section, but the alias resolved
        load_config(path)


def test_non_utf8_config_names_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "run.yaml", b"training:\n  lr: 1e-3\n  # caf\xe9\n")
    with pytest.raises(ConfigError, match=r"run\.yaml:3: not UTF-8 text \(byte 0xe9 at column 8\)"):
        load_config(path)


# ------------------------------------------------------------------------------------------------ GSM8K


def test_non_utf8_jsonl_names_file_and_line(tmp_path: Path) -> None:
    good = json.dumps({"question": "q", "answer": "a\n#### 1"}).encode()
    path = _write(tmp_path / "test.jsonl", good + b"\n" + good[:-3] + b'\xff"}\n')
    with pytest.raises(DataError, match=r"test\.jsonl:2: not UTF-8 text"):
        load_gsm8k(path, "test")


def test_answers_without_the_marker_are_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = [{"question": f"q{i}", "answer": f"{i}\n#### {i}" if i % 2 else f"just {i}"} for i in range(5)]
    path = _write(tmp_path / "test.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    with caplog.at_level(logging.WARNING, logger="llada_trm"):
        records = load_gsm8k(path, "test")
    assert len(records) == 5
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "3 of 5 answers have no '#### <number>' line" in message
    assert f"{path}:1" in message
