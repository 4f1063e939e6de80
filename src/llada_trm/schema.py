"""What every config type shares: number types, the strict `Section` base, one-line errors, YAML in and out.

A config type is a pydantic model, built in Python (`SlotConfig(d_model=64)`: a bad value is a one-line
`ConfigError` naming class and field) or embedded in a sectioned YAML schema (the run config: the error names
the file and the key's dotted path). PyYAML follows YAML 1.1, where `5e-4` is a *string*, so number fields
accept numeric strings. YAML is read strictly: a repeated key is an error naming file:line, and anchors may
expand to at most `MAX_YAML_NODES` nodes (a "billion laughs" fails at once). Torch-free: imports stay cheap.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from llada_trm.errors import ConfigError
from llada_trm.text import read_utf8


def to_float(value: Any) -> Any:
    """Accept YAML 1.1's string spelling of floats (`5e-4`) and reject booleans posing as numbers."""
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            raise ValueError(f"expected a number, got {value!r}") from None
    return value


def to_int(value: Any) -> Any:
    """Accept integral numbers written as `1e3` or `1000.0`; reject booleans and fractions."""
    if isinstance(value, bool):
        raise ValueError(f"expected an integer, got {value!r}")
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            try:
                number = float(text)
            except ValueError:
                raise ValueError(f"expected an integer, got {value!r}") from None
            if not number.is_integer():
                raise ValueError(f"expected an integer, got {value!r}") from None
            return int(number)
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"expected an integer, got {value!r}")
        return int(value)
    return value


# No config number may be NaN or infinite (`.nan` and `.inf` are valid YAML): a NaN passes every comparison
# and would reach the run as a silent wrong setting.
Float = Annotated[float, BeforeValidator(to_float), Field(allow_inf_nan=False)]
Int = Annotated[int, BeforeValidator(to_int)]
PosInt = Annotated[int, BeforeValidator(to_int), Field(ge=1)]
NonNegInt = Annotated[int, BeforeValidator(to_int), Field(ge=0)]
PosFloat = Annotated[float, BeforeValidator(to_float), Field(gt=0.0, allow_inf_nan=False)]
NonNegFloat = Annotated[float, BeforeValidator(to_float), Field(ge=0.0, allow_inf_nan=False)]
Fraction = Annotated[float, BeforeValidator(to_float), Field(ge=0.0, le=1.0, allow_inf_nan=False)]


class Section(BaseModel):
    """A config type: unknown keys are errors (with a suggestion), assignments are validated too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ConfigError(describe(exc, type(self).__name__, type(self))) from None

    # Marked as pydantic's own constructor, so that validating a section *inside* another (the run schema
    # reading YAML) skips this wrapper: there the error keeps its dotted key path and is described once.
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]


def describe(
    exc: ValidationError, source: str, schema: type[BaseModel], override_keys: Collection[str] = ()
) -> str:
    """One line for a validation failure: `source: dotted.key: what is wrong` (+ how many more); a class name
    as `source` reads `SlotConfig.n_heads: ...`, a key set by an override `--set key: ...`."""
    errors = exc.errors(include_url=False)  # the line describes the first; it counts the others
    err, extra = errors[0], f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    loc = [str(p) for p in err["loc"] if "[" not in str(p)]  # less a union member's tag, `literal['slot']`
    dotted = ".".join(loc)
    explanation = _explain(err, loc, schema)
    blamed = _override_for(dotted, explanation, override_keys)
    retired = _retired(loc) if err["type"] == "extra_forbidden" else None
    if retired is not None:
        setters = [key for key in override_keys if key == dotted or key.startswith(dotted + ".")]
        blamed = setters[0] if setters else blamed
        where = "OLD" if source == schema.__name__ or source.startswith("<") else source
        fix = "drop the --set" if setters else f"convert the file: {CONVERT_HINT} {where} --out NEW"
        explanation = f"{_RETIRED[retired]}; {fix}"
    if blamed is not None:
        return f"--set {blamed}: {dotted or blamed}: {explanation}{extra}"
    if source == schema.__name__:
        return f"{source}{'.' + dotted if dotted else ''}: {explanation}{extra}"
    return f"{source}: {dotted + ': ' if dotted else ''}{explanation}{extra}"


# Dotted keys the run schema once had and now fixes (`config.retired_settings`, registered by
# `llada_trm.config`): an old file naming one is told to convert itself, not "unknown key".
_RETIRED: dict[str, str] = {}  # key -> what became of it
CONVERT_HINT = "llada-trm convert"
RETIRED_NOTE = "a retired setting, fixed now (docs/settings.md)"


def register_retired(keys: Collection[str], note: str = RETIRED_NOTE) -> None:
    """Mark dotted keys (and sections, whose keys below count too) as retired settings; `note` says what
    became of them (fixed, replaced by another key, removed with its code)."""
    _RETIRED.update(dict.fromkeys(keys, note))


def _retired(loc: list[str]) -> str | None:
    """The retired key `loc` ends with (a compare config's `run.training.adam_eps` is `training.adam_eps`)."""
    for start in range(len(loc)):
        for end in range(len(loc), start, -1):
            key = ".".join(loc[start:end])
            if key in _RETIRED:
                return key
    return None


def _override_for(dotted: str, explanation: str, override_keys: Collection[str]) -> str | None:
    """The `--set` key an error at `dotted` comes from: the key itself, a section it replaced (the error is
    inside it), or a key inside the failing section (a check of the whole section, e.g. `sampling`, names the
    field it found wrong); None when the value came from the file."""
    if dotted in override_keys:
        return dotted
    above = [key for key in override_keys if dotted.startswith(key + ".")]
    if above:
        return max(above, key=len)
    inside = [key for key in override_keys if not dotted or key.startswith(dotted + ".")]
    found = {key: re.search(rf"\b{re.escape(key.rsplit('.', 1)[-1])}\b", explanation) for key in inside}
    named = sorted((match.start(), key) for key, match in found.items() if match)
    return named[0][1] if named else None  # the field the message is about; none: the file's value


# pydantic's error type -> what was expected, in the words of a YAML file
_EXPECTED = {
    "finite_number": "a finite number",
    **dict.fromkeys(("float_parsing", "float_type"), "a number"),
    **dict.fromkeys(("int_parsing", "int_type", "int_from_float"), "an integer"),
    **dict.fromkeys(("bool_parsing", "bool_type"), "true or false"),
    "string_type": "a string",
    **dict.fromkeys(("list_type", "tuple_type"), "a list"),
    **dict.fromkeys(("model_type", "dict_type", "model_attributes_type"), "a section (a mapping of keys)"),
}


def _explain(err: Mapping[str, Any], loc: list[str], schema: type[BaseModel]) -> str:
    kind, value, context = err["type"], err.get("input"), err.get("ctx", {})
    if kind == "extra_forbidden":
        known = _section_fields(loc[:-1], schema)
        suggestion = _suggest(loc[-1], known)
        hint = f"did you mean {suggestion!r}?" if suggestion else f"known keys: {', '.join(known)}"
        return f"unknown key; {hint}"
    if kind == "missing":
        return "required key is missing"
    if kind == "value_error":
        return str(context.get("error", err["msg"]))
    expected = f"one of {context.get('expected', '')}" if kind == "literal_error" else _EXPECTED.get(kind)
    if expected is not None:
        return f"expected {expected}, got {value!r}"
    msg = str(err["msg"])
    return f"{msg[:1].lower()}{msg[1:]}, got {value!r}"


# Names other tools (and the original SonarRecursiveModel configs) use for our keys, so that a typo of a
# familiar spelling still finds the right field: `learnig_rate` -> `learning_rate` -> `lr`.
_ALIASES: dict[str, str] = {
    "learning_rate": "lr",
    "adam_lr": "lr",
    "epochs": "max_steps",
    "eval_interval": "eval_every",
    "log_interval": "log_every",
    "checkpoint_interval": "save_every",
    "save_interval": "save_every",
    "output_dir": "dir",
    "name": "dataset",
    "val_split": "n_eval",
    "validation_split": "n_eval",
    "llada_model_name": "backbone",
    "model_name_or_path": "backbone",
    "refiner_type": "refiner",
    "use_gating": "use_gates",
    "min_confidence": "confidence_threshold",
    "forward_dtype": "dtype",
    "warmup": "warmup_steps",
    "accumulation_steps": "gradient_accumulation_steps",
    "init_checkpoint": "init_from",
    "pretrained_refiner": "init_from",
}


def _suggest(key: str, known: list[str]) -> str | None:
    """The field a mistyped key most likely meant, via difflib over field names and familiar aliases."""
    candidates = {name: name for name in known}
    candidates.update({alias: field for alias, field in _ALIASES.items() if field in known})
    match = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.6)
    return candidates[match[0]] if match else None


def _section_fields(loc: list[str], schema: type[BaseModel]) -> list[str]:
    """The field names of the section at `loc` (for typo suggestions)."""
    model: type[BaseModel] = schema
    for part in loc:
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


# ------------------------------------------------------------------------------------------ strict YAML

# Nodes a document may hold once its aliases are expanded: a run config has a few hundred; an alias bomb
# (nine levels of nine aliases: 9**9 nodes) is refused before anything walks it.
MAX_YAML_NODES = 100_000


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key repeated within one mapping (merge keys `<<` may still override)."""

    source = "<yaml>"

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, list | dict):
                raise ConfigError(f"{self.source}:{line}: a mapping key must be a plain value")
            if key in seen:
                raise ConfigError(
                    f"{self.source}:{line}: key {key!r} appears twice (first at line {seen[key]}); keep one"
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node: yaml.Node, source: str) -> int:
    """Nodes in the document once every alias is expanded (shared nodes counted once per use)."""
    sizes: dict[int, int] = {}
    in_progress: set[int] = set()

    def size(current: yaml.Node) -> int:
        key = id(current)
        if key in sizes:
            return sizes[key]
        if key in in_progress:
            line = current.start_mark.line + 1
            raise ConfigError(f"{source}:{line}: an alias refers to the node that contains it; remove it")
        in_progress.add(key)
        if isinstance(current, yaml.MappingNode):
            total = 1 + sum(size(k) + size(v) for k, v in current.value)
        elif isinstance(current, yaml.SequenceNode):
            total = 1 + sum(size(item) for item in current.value)
        else:
            total = 1
        in_progress.discard(key)
        sizes[key] = min(total, MAX_YAML_NODES + 1)
        return sizes[key]

    return size(node)


def parse_yaml(text: str, source: str = "<yaml>") -> Any:
    """One YAML document, strictly (see the module docstring); errors are one-line `ConfigError`s."""
    loader = _StrictLoader(text)
    loader.source = source
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, source) > MAX_YAML_NODES:
            raise ConfigError(
                f"{source}: its anchors/aliases expand to more than {MAX_YAML_NODES} nodes; write the "
                "values out instead of nesting aliases"
            )
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML ({' '.join(str(exc).split())})") from None
    except RecursionError:
        raise ConfigError(
            f"{source}: nested too deeply to read (Python's recursion limit); flatten the YAML"
        ) from None
    finally:
        loader.dispose()


def read_yaml(path: str | Path) -> Any:
    """A YAML file, strictly; non-UTF-8 bytes are an error naming file:line."""
    return parse_yaml(read_utf8(path, ConfigError), str(path))


# ------------------------------------------------------------------------------- files and overrides

SchemaT = TypeVar("SchemaT", bound=BaseModel)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`"training.lr=3e-4"` -> (["training", "lr"], 3e-4): the value read as YAML, strictly."""
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
    if isinstance(data, Mapping) and (command := _command_for(schema, set(data))):
        raise ConfigError(
            f"{path}: a `llada-trm {command}` config (its sections: {', '.join(data)}); "
            f"give it to llada-trm {command} --config {path}"
        )
    return parse_schema(schema, data, source=str(path), overrides=list(overrides or ()))


# The command that reads each top-level schema (`command_schema`), so that a config file given to another
# command is named for the one it belongs to, instead of failing on its first unknown section.
COMMAND_SCHEMAS: dict[str, type[BaseModel]] = {}


def command_schema(command: str) -> Callable[[type[SchemaT]], type[SchemaT]]:
    """Class decorator: `schema` is the config file of `llada-trm <command>`."""

    def register(schema: type[SchemaT]) -> type[SchemaT]:
        COMMAND_SCHEMAS[command] = schema
        return schema

    return register


def _command_for(schema: type[BaseModel], sections: set[str]) -> str | None:
    """Another command whose schema has every one of `sections`, when `schema` lacks one of them."""
    if sections <= set(schema.model_fields):
        return None
    for command, other in COMMAND_SCHEMAS.items():
        if other is not schema and sections <= set(other.model_fields):
            return command
    return None


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
