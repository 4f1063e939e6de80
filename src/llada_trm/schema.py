"""What every config type shares: YAML-friendly number types, the strict `Section` base, one-line errors.

A config type is a pydantic model declared once and used both ways: built in Python (`SlotConfig(d_model=64)`,
`HybridConfig(refiner="mlp")`), where a bad value raises a one-line `ConfigError` naming the class and field,
and embedded in a sectioned YAML schema (the run config), where the same validation reports the key's
dotted path in the file (`run.yaml: model.slot.n_heads: ...`).

Numbers: PyYAML follows YAML 1.1, where `5e-4` (no dot) is a *string*; float fields therefore accept numeric
strings, so `lr: 5e-4` means what it says. Torch-free on purpose: importing a schema stays cheap.

YAML is read strictly (`read_yaml`): a key written twice in one mapping (a duplicated section too) is an
error naming file:line, where PyYAML would silently keep the last one; anchors/aliases may expand to at most
`MAX_YAML_NODES` nodes, so a "billion laughs" document fails at once instead of exhausting memory.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from llada_trm.errors import ConfigError
from llada_trm.text import read_utf8

__all__ = [
    "Float",
    "Fraction",
    "Int",
    "NonNegFloat",
    "NonNegInt",
    "PosFloat",
    "PosInt",
    "Section",
    "describe",
    "parse_yaml",
    "read_yaml",
    "register_retired",
    "to_float",
    "to_int",
]


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
    """One line for a validation failure: `source: dotted.key: what is wrong` (+ how many more).

    A class name as `source` (a config built in Python) reads `SlotConfig.n_heads: ...`; a key set by a
    `--set` override is named as `--set key`.
    """
    messages = []
    for err in exc.errors(include_url=False):
        loc = [str(p) for p in err["loc"]]
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
            messages.append(f"--set {blamed}: {dotted or blamed}: {explanation}")
        elif source == schema.__name__:
            messages.append(f"{source}{'.' + dotted if dotted else ''}: {explanation}")
        else:
            messages.append(f"{source}: {dotted + ': ' if dotted else ''}{explanation}")
    extra = f" (and {len(messages) - 1} more)" if len(messages) > 1 else ""
    return messages[0] + extra


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


def _explain(err: Mapping[str, Any], loc: list[str], schema: type[BaseModel]) -> str:
    kind = err["type"]
    value = err.get("input")
    if kind == "extra_forbidden":
        known = _section_fields(loc[:-1], schema)
        suggestion = _suggest(loc[-1], known)
        hint = f"did you mean {suggestion!r}?" if suggestion else f"known keys: {', '.join(known)}"
        return f"unknown key; {hint}"
    if kind == "missing":
        return "required key is missing"
    if kind == "finite_number":
        return f"expected a finite number, got {value!r}"
    if kind in {"float_parsing", "float_type"}:
        return f"expected a number, got {value!r}"
    if kind in {"int_parsing", "int_type", "int_from_float"}:
        return f"expected an integer, got {value!r}"
    if kind in {"bool_parsing", "bool_type"}:
        return f"expected true or false, got {value!r}"
    if kind in {"string_type"}:
        return f"expected a string, got {value!r}"
    if kind in {"list_type", "tuple_type"}:
        return f"expected a list, got {value!r}"
    if kind in {"model_type", "dict_type", "model_attributes_type"}:
        return f"expected a section (a mapping of keys), got {value!r}"
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        return f"expected one of {expected}, got {value!r}"
    if kind == "value_error":
        return str(err.get("ctx", {}).get("error", err["msg"]))
    msg = str(err["msg"])
    return f"{msg[:1].lower()}{msg[1:]}, got {value!r}"


# Names other tools (and the original SonarRecursiveModel configs) use for our keys, so that a typo of a
# familiar spelling still finds the right field: `learnig_rate` -> `learning_rate` -> `lr`.
_ALIASES: dict[str, str] = {
    "learning_rate": "lr",
    "adam_lr": "lr",
    "grad_clip": "max_grad_norm",
    "clip_grad_norm": "max_grad_norm",
    "adam_epsilon": "adam_eps",
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
