"""Packaging: lower bounds in pyproject, exact versions in constraints.txt, a make variable for torch's index,
and the entry points other tools discover."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")  # Python 3.11+


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def _requirements() -> list[Requirement]:
    project = _project()
    extras = [req for group in project["optional-dependencies"].values() for req in group]
    return [Requirement(text) for text in [*project["dependencies"], *extras]]


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


def test_pyproject_takes_lower_bounds_not_pins():
    """`pip install llada-trm` into a GPU environment must not replace its torch or transformers."""
    for req in _requirements():
        operators = {spec.operator for spec in req.specifier}
        assert operators == {">="}, f"{req}: pyproject states a lower bound (>=), constraints.txt the pin"


def test_constraints_pin_every_dependency_within_its_bound():
    pins = _constraints()
    for req in _requirements():
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"constraints.txt has no exact version of {req.name}"
        assert req.specifier.contains(pins[name]), f"constraints.txt pins {name}=={pins[name]} outside {req}"


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.parametrize(
    ("variables", "index"),
    [
        ([], None),  # pip's own index (PyPI)
        (["TORCH_INDEX=cpu"], "https://download.pytorch.org/whl/cpu"),
        (["TORCH_INDEX=cu126"], "https://download.pytorch.org/whl/cu126"),
        (["TORCH_INDEX_URL=https://mirror.example/whl"], "https://mirror.example/whl"),
    ],
)
def test_make_setup_installs_with_the_constraints_and_the_chosen_torch_index(tmp_path, variables, index):
    argv = ["make", "-n", "setup", f"VENV={tmp_path / 'venv'}", *variables]
    plan = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    installs = [line for line in plan.splitlines() if "pip install" in line and "--upgrade pip" not in line]
    torch_line, package_line = installs
    assert f"torch=={_constraints()['torch']}" in torch_line
    assert (f"--index-url {index}" in torch_line) if index else "--index-url" not in torch_line
    assert "-c constraints.txt" in package_line and "-e '.[" in package_line
