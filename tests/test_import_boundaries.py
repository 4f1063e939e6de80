"""Package boundaries: evaluation never imports training, and no two subpackages import each other.

Static checks read every `import` in the source, lazy ones inside functions included (only `if TYPE_CHECKING:`
blocks are left out: they never run); the runtime check runs `generate` and `eval` on a trained run in a fresh
interpreter and lists what was imported.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_assets import TINY_SAMPLING, tiny_run

import llada_trm

PACKAGE = Path(llada_trm.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The `llada_trm` modules a source file imports anywhere but under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    type_only = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for node in ast.walk(block)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *([node.module] if node.module else [])])
            found |= {base, *(f"{base}.{alias.name}" for alias in node.names)}
    return {target for target in found if target.split(".")[0] == "llada_trm"}


def _unit(module: str) -> str | None:
    """The subpackage (or top-level module) a module belongs to; None for the package root itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _unit_graph() -> dict[str, dict[str, list[str]]]:
    """unit -> unit -> the 'module -> import' lines that make the edge."""
    graph: dict[str, dict[str, list[str]]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        source = _module_name(path)
        for target in _imports(path):
            a, b = _unit(source), _unit(target)
            if a and b and a != b:
                graph.setdefault(a, {}).setdefault(b, []).append(f"{source} -> {target}")
    return graph


def _cycle(graph: dict[str, dict[str, list[str]]]) -> list[str] | None:
    """One cycle of units, as the path that closes it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(unit: str) -> list[str] | None:
        state[unit] = 1
        path.append(unit)
        for nxt in sorted(graph.get(unit, {})):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[unit] = 2
        return None

    for unit in sorted(graph):
        if unit not in state and (found := visit(unit)):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b": ["x"]}, "b": {"c": ["y"]}, "c": {"a": ["z"]}, "d": {"a": ["w"]}}
    assert _cycle(graph) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b": ["x"]}, "b": {}}) is None


def test_no_import_cycle_between_subpackages():
    graph = _unit_graph()
    cycle = _cycle(graph)
    if cycle:
        edges = [line for a, b in zip(cycle, cycle[1:], strict=False) for line in graph[a][b][:2]]
        pytest.fail(f"import cycle {' -> '.join(cycle)}: " + "; ".join(edges))


def test_evaluate_never_imports_training():
    offending = [
        f"{_module_name(path)} -> {target}"
        for path in sorted((PACKAGE / "evaluate").rglob("*.py"))
        for target in _imports(path)
        if _unit(target) == "training"
    ]
    assert not offending, offending


_PROBE = """
import json, sys
from llada_trm.cli import main
loaded = {}
for name, argv in json.loads(sys.argv[1]).items():
    assert main(argv) == 0, name
    prefix = "llada_trm.training"
    loaded[name] = sorted(m for m in sys.modules if m == prefix or m.startswith(prefix + "."))
print("LOADED" + json.dumps(loaded))
"""


def test_generate_and_eval_import_nothing_from_training(tmp_path_factory, tmp_path):
    run = tiny_run(tmp_path_factory)
    sampling = [f"--{key.replace('_', '-')}={value}" for key, value in TINY_SAMPLING.items()]
    commands = {
        "generate": ["generate", "--checkpoint", str(run), "--device", "cpu", *sampling, "What is 2 + 3?"],
        "eval": ["eval", "--checkpoint", str(run), "--device", "cpu", "--limit", "2", "--no-diagnostics",
                 "--out", str(tmp_path / "eval"), "--no-progress", *sampling],  # fmt: skip
    }
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(commands)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = json.loads(done.stdout.rpartition("LOADED")[2])
    assert loaded == {"generate": [], "eval": []}


def test_the_public_api_names_each_name_where_it_is_defined():
    """`llada_trm.X` is loaded lazily from the module that defines X (not through another facade)."""
    for name, module in llada_trm._EXPORTS.items():
        value = getattr(llada_trm, name)
        assert getattr(value, "__module__", module) == module, (name, module, value.__module__)


def test_evaluate_package_re_exports_nothing():
    import llada_trm.evaluate as evaluate

    assert not hasattr(evaluate, "__getattr__") and not hasattr(evaluate, "__all__")
    assert not (PACKAGE / "pretrain.py").exists() and not (PACKAGE / "evaluate" / "io.py").exists()


def test_nothing_but_the_entry_point_imports_the_cli():
    importers = [
        _module_name(path)
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "__main__.py" and path != PACKAGE / "cli.py" and "llada_trm.cli" in _imports(path)
    ]
    assert not importers, importers


def _bound_names(tree: ast.Module) -> tuple[set[str], set[str]]:
    """(names a module defines, names it only imports), at module level, branches of `if`/`try` included."""
    defined: set[str] = set()
    imported: set[str] = set()
    statements = list(tree.body)
    while statements:
        node = statements.pop()
        if isinstance(node, (ast.If, ast.Try)):
            statements += [*node.body, *node.orelse, *getattr(node, "finalbody", [])]
            statements += [stmt for handler in getattr(node, "handlers", []) for stmt in handler.body]
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = [name for target in targets for name in ast.walk(target)]
            defined |= {name.id for name in names if isinstance(name, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            imported |= {alias.asname or alias.name.split(".")[0] for alias in node.names}
    return defined, imported - defined


def _re_exported_imports(roots: list[Path]) -> list[str]:
    """`from llada_trm.X import name` lines whose `name` X only imports from elsewhere (a re-export)."""
    bound: dict[str, tuple[set[str], set[str]]] = {}
    found = []
    for path in sorted(p for root in roots for p in root.rglob("*.py") if "__pycache__" not in p.parts):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module):
                continue
            if not node.module.startswith("llada_trm."):
                continue  # the package root is the public API, loaded lazily from the defining modules
            parts = node.module.split(".")[1:]
            file = PACKAGE.joinpath(*parts, "__init__.py")
            file = file if file.exists() else PACKAGE.joinpath(*parts).with_suffix(".py")
            if not file.exists():
                continue
            if node.module not in bound:
                bound[node.module] = _bound_names(ast.parse(file.read_text(encoding="utf-8")))
            _, imported = bound[node.module]
            for alias in node.names:
                submodule = PACKAGE.joinpath(*parts, alias.name)
                is_submodule = submodule.exists() or submodule.with_suffix(".py").exists()
                if alias.name in imported and not is_submodule:
                    found.append(f"{path}:{node.lineno}: {node.module}.{alias.name}")
    return found


def test_every_import_names_the_module_that_defines_it():
    """One definition per concept, imported from where it is defined: no module passes another's names on."""
    roots = [PACKAGE.parents[1] / folder for folder in ("src", "tests", "bench", "scripts", "examples")]
    offending = _re_exported_imports([root for root in roots if root.is_dir()])
    assert not offending, offending


def test_the_re_export_finder_finds_a_re_export(tmp_path):
    module = ast.parse("from a import x\nfrom b import y as z\ny = 1\ndef f(): ...\n")
    defined, imported = _bound_names(module)
    assert defined == {"y", "f"} and imported == {"x", "z"}
    user = tmp_path / "user.py"  # config defines load_config; ConfigError it imports from errors
    user.write_text("from llada_trm.config import load_config\nfrom llada_trm.config import ConfigError\n")
    assert _re_exported_imports([tmp_path]) == [f"{user}:2: llada_trm.config.ConfigError"]
