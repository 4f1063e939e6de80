"""Sectioned configs from YAML files and `--set a.b=c` overrides, and back to YAML.

Schema-agnostic: `llada_trm.config` binds it to `RunConfig`; the pretrain and compare schemas use
`load_schema` directly. Validation errors are one line naming the file and the key's dotted path
(`schema.describe`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from llada_trm.errors import ConfigError
from llada_trm.schema import describe, parse_yaml, read_yaml

__all__ = ["apply_overrides", "dump_yaml", "load_schema", "parse_override", "parse_schema"]

SchemaT = TypeVar("SchemaT", bound=BaseModel)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`"training.lr=3e-4"` -> (["training", "lr"], 3e-4).

    The value is read as YAML (`[1, 2]`, `true`, `null`); numeric strings are coerced by the schema.
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE with a dotted key, e.g. training.lr=3e-4")
    parts = key.split(".")
    if any(not p for p in parts):
        raise ConfigError(f"--set {text!r}: {key!r} is not a dotted key (e.g. training.lr)")
    # read as strictly as a config file: an alias bomb or a duplicate key in a value fails here, naming --set
    value = parse_yaml(raw, source=f"--set {key}") if raw.strip() else ""
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Set each `a.b=c` override into a copy of the raw config dict (validation happens afterwards)."""
    result = plain(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = result
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                path = ".".join(parts[: depth + 1])
                raise ConfigError(f"--set {text!r}: {path} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return result


def parse_schema(
    schema: type[SchemaT],
    data: Mapping[str, Any] | None,
    source: str = "<config>",
    overrides: Sequence[str] = (),
) -> SchemaT:
    """Validate a raw dict (as read from YAML) into `schema`; errors name `source` and the dotted key."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        kind = type(data).__name__
        raise ConfigError(f"{source}: expected a mapping of sections at the top level, got {kind}")
    raw = apply_overrides(dict(data), overrides)
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        override_keys = {".".join(parse_override(o)[0]) for o in overrides}
        raise ConfigError(describe(exc, source, schema, override_keys)) from None


def load_schema(
    schema: type[SchemaT], path: str | Path | None, overrides: Sequence[str] | None = None
) -> SchemaT:
    """Any sectioned config (run, pretrain, ...) from YAML; `path=None` validates the defaults + overrides."""
    if path is None:
        return parse_schema(schema, {}, source="<defaults>", overrides=list(overrides or ()))
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    data = read_yaml(path)  # duplicate keys, alias bombs and non-UTF-8 bytes fail here, naming file:line
    return parse_schema(schema, data, source=str(path), overrides=list(overrides or ()))


def dump_yaml(data: Any) -> str:
    """Plain safe YAML (tuples as lists); lists of plain values on one line."""
    return yaml.dump(plain(data), Dumper=_Dumper, sort_keys=False, width=110)


class _Dumper(yaml.SafeDumper):
    """Safe YAML with flow-style (one-line) lists of scalars: `context_layers: [-1]`."""


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    flow = all(not isinstance(item, list | dict) for item in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)


def plain(value: Any) -> Any:
    """A copy of nested mappings and sequences as plain dicts and lists (what YAML writes and reads);
    shared (aliased) nodes become separate copies, so that editing one leaves the other."""
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value
