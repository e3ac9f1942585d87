"""Read a stage config: YAML with line numbers, ``key=value`` overrides, every mistake reported at once.

Nothing the user wrote is ignored: a key is either a schema field, a LLaMA-Factory or transformers key
that ftkit honours or explains in a one-line note (``ftkit.config.foreign_keys``), or an error with a
did-you-mean. Validation needs only pydantic and PyYAML, so it runs before any heavy import.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import ValidationError

from ftkit.config.foreign_keys import FOREIGN_KEYS, KEY_ALIASES, TRAINING_ARGUMENT_TYPES
from ftkit.config.sections import Problem, Section, fits_in_64_bits
from ftkit.config.stages import STAGE_SCHEMAS
from ftkit.errors import FtkitError

ConfigT = TypeVar("ConfigT", bound=Section)


@dataclass
class LoadedConfig:
    """A validated stage config plus what the loader has to tell the user about it."""

    config: Any
    path: Path | None
    notes: list[str] = field(default_factory=list)


@dataclass
class _RawConfig:
    values: dict[str, Any]
    origin: dict[str, str]  # key -> "file.yaml:12" or "override"


def read_yaml_mapping(path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    """Load a YAML mapping and the line number of each top-level key; raise FtkitError on bad input."""
    path = Path(path)
    if not path.is_file():
        hint = " (it is a directory)" if path.is_dir() else ""
        raise FtkitError(f"Config file {path} does not exist{hint}; pass the path to a YAML stage config.")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise FtkitError(f"{path}:{line}: not UTF-8 text (byte {err.start}); save the config as UTF-8.") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        values = yaml.safe_load(text)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise FtkitError(f"{where}: invalid YAML: {err.problem or err.context}.") from None
    except yaml.YAMLError as err:
        raise FtkitError(f"{path}: invalid YAML: {err}.") from None
    if values is None:
        return {}, {}
    if not isinstance(values, dict):
        raise FtkitError(f"{path}: a stage config must be a mapping of keys to values, not a {type(values).__name__}.")
    lines = _key_lines(node, path) if isinstance(node, yaml.MappingNode) else {}
    return {str(k): v for k, v in values.items()}, lines


_MERGE_TAG = "tag:yaml.org,2002:merge"


def _key_lines(node: yaml.MappingNode, path: Path) -> dict[str, int]:
    """The line of each top-level key; keys a ``<<:`` merge key brings in get the line of the ``<<:``.

    Keys are named as the loader names them (``str`` of the YAML value), so every key has a line. A null
    key (``null:``, ``~:``) is refused at its line: it names nothing.
    """
    constructor = yaml.SafeLoader("")  # constructs key nodes already composed
    lines: dict[str, int] = {}
    merged: dict[str, int] = {}
    for key_node, value_node in node.value:
        line = key_node.start_mark.line + 1
        if key_node.tag == _MERGE_TAG:
            for key in _merged_keys(value_node, constructor):
                merged.setdefault(key, line)
            continue
        key = constructor.construct_object(key_node, deep=True)
        if key is None:
            raise FtkitError(f"{path}:{line}: the key '{key_node.value}' is YAML's null, not a name; write the "
                             "key's name (quote it, 'null', if you mean the word).")
        if str(key) in lines:
            # PyYAML keeps the last value silently; a key set twice is almost always a forgotten edit.
            raise FtkitError(f"{path}:{line}: {key} is set twice (also on line {lines[str(key)]}); keep one.")
        lines[str(key)] = line
    return {**merged, **lines}  # a key written out overrides a merged one, as in the merge itself


def _merged_keys(node: yaml.Node, constructor: yaml.SafeLoader) -> list[str]:
    """The keys a ``<<:`` value brings in: one mapping or a list of them, merges within merges included."""
    if isinstance(node, yaml.SequenceNode):
        return [key for item in node.value for key in _merged_keys(item, constructor)]
    if not isinstance(node, yaml.MappingNode):
        return []
    keys = []
    for key_node, value_node in node.value:
        if key_node.tag == _MERGE_TAG:
            keys += _merged_keys(value_node, constructor)
        else:
            keys.append(str(constructor.construct_object(key_node, deep=True)))
    return keys


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``key=value`` command-line arguments into a mapping; values are read as YAML scalars."""
    parsed: dict[str, Any] = {}
    given: dict[str, str] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise FtkitError(f"Override '{item}' is not key=value (for example learning_rate=1e-4).")
        if key in given:
            # Hydra refuses a repeated override too: which one was meant is a guess either way.
            raise FtkitError(f"{key} is given twice on the command line ({given[key]} and {item}); keep one.")
        given[key] = item
        try:
            parsed[key] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            parsed[key] = value
    return parsed


def _did_you_mean(key: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{close[0]}'?"
    return "; ftkit, LLaMA-Factory and transformers have no such key (check the spelling)."


def _describe_errors(errors: list[dict[str, Any]]) -> str:
    """One sentence for the errors pydantic reports at one place (a union gives one error per member)."""
    if any(error["type"] == "missing" for error in errors):
        return "required key, not set; add it to the config or pass it as key=value"
    messages = []
    for error in errors:
        message = error["msg"].removeprefix("Value error, ").rstrip(".")
        messages.append(message[0].lower() + message[1:] if message else message)
    prefix = "input should be "
    if len(messages) > 1 and all(m.startswith(prefix) for m in messages):
        # bool | Literal["auto"] -> "input should be a valid boolean or 'auto'"
        alternatives = [m.removeprefix(prefix).split(", unable to")[0] for m in messages]
        messages = [prefix + " or ".join(dict.fromkeys(alternatives))]
    return f"{'; '.join(dict.fromkeys(messages))} (got {errors[0].get('input')!r})"


def _classify_keys(
    raw: _RawConfig, schema: type[Section], problems: list[tuple[str, str]], notes: list[str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split user keys into schema fields and transformers pass-through; explain or refuse the rest.

    ``problems`` receives (key, sentence) pairs.
    """
    fields = set(schema.model_fields)
    stage = next((name for name, other in STAGE_SCHEMAS.items() if other is schema), schema.__name__)
    known = sorted(fields | set(FOREIGN_KEYS) | set(KEY_ALIASES) | set(TRAINING_ARGUMENT_TYPES))
    values: dict[str, Any] = {}
    passthrough: dict[str, Any] = {}
    for key, value in raw.values.items():
        where = raw.origin[key]
        if key in fields:
            values[key] = value
        elif key in KEY_ALIASES and KEY_ALIASES[key] in fields:
            target = KEY_ALIASES[key]
            if target in raw.values and raw.values[target] != value:
                problems.append((key, f"{where}: {key} is another name for {target}, which is also set "
                                 f"({raw.values[target]!r} vs {value!r}); keep one of them."))
            else:
                notes.append(f"{where}: {key} is read as ftkit's {target}.")
                values.setdefault(target, value)
        elif key in FOREIGN_KEYS:
            foreign = FOREIGN_KEYS[key]
            if foreign.refuse_other_values and value != foreign.default:
                problems.append((key, f"{where}: {key}: {value!r} is not supported: {foreign.note}"))
            else:
                notes.append(f"{where}: {key}: {foreign.note}")
        elif key in TRAINING_ARGUMENT_TYPES and "output_dir" in fields:
            expected = TRAINING_ARGUMENT_TYPES[key]
            value = _yaml11_number(value, expected)
            if value is not None and not _matches_type(value, expected):
                number = isinstance(value, (int, float)) and not isinstance(value, bool)
                problems.append((key, f"{where}: {key}: expected {expected}, got {value!r}"
                                 + (" (numbers must be finite and fit in 64 bits)." if number else ".")))
            else:
                passthrough[key] = value
                notes.append(f"{where}: {key} is passed to transformers.TrainingArguments as is.")
        elif other_stages := [name for name, other in STAGE_SCHEMAS.items() if key in other.model_fields]:
            problems.append((key, f"{where}: {key} is a key of the {' and '.join(other_stages)} config, not of "
                             f"the {stage} config; remove it."))
        elif key in TRAINING_ARGUMENT_TYPES:
            problems.append((key, f"{where}: {key} is a training argument, not a key of the {stage} config; "
                             "remove it."))
        else:
            problems.append((key, f"{where}: {key}: unknown key{_did_you_mean(key, known)}"))
    return values, passthrough


_YAML11_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _yaml11_number(value: Any, expected: str) -> Any:
    """PyYAML (YAML 1.1) reads ``1e-4`` as a string; a float-typed pass-through key gets the float back."""
    if isinstance(value, str) and "float" in expected.split("|") and _YAML11_FLOAT.fullmatch(value.strip()):
        return float(value)
    return value


def _matches_type(value: Any, expected: str) -> bool:
    checks = {
        "bool": lambda v: isinstance(v, bool),
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool) and fits_in_64_bits(v),
        "float": lambda v: isinstance(v, float) and math.isfinite(v) or isinstance(v, int) and fits_in_64_bits(v),
        "str": lambda v: isinstance(v, str),
        "list": lambda v: isinstance(v, (list, str)),
        "dict": lambda v: isinstance(v, (dict, str)),
    }
    return any(checks.get(part, lambda v: True)(value) for part in expected.split("|"))


def _validate_fields(schema: type[ConfigT], values: dict[str, Any]) -> tuple[ConfigT | None, list[tuple[str, str]]]:
    try:
        return schema.model_validate(values), []
    except ValidationError as err:
        # Group by key and place (a list item has its index in the loc; a union member has its type name).
        grouped: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
        for error in err.errors():
            loc = error["loc"]
            key = str(loc[0]) if loc else "config"
            grouped.setdefault((key, *(part for part in loc[1:] if isinstance(part, int))), []).append(error)
        return None, [(place[0], _describe_errors(errors)) for place, errors in grouped.items()]


def _cross_field_problems(
    schema: type[ConfigT], values: dict[str, Any], bad_keys: set[str]
) -> list[tuple[str, str]]:
    """The cross-field rules, checked on the keys that did validate, so one run reports everything.

    A required key that is missing gets a placeholder; rules about a key that is itself wrong are dropped.
    """
    usable = {key: value for key, value in values.items() if key not in bad_keys}
    for name, info in schema.model_fields.items():
        if info.is_required() and name not in usable:
            usable[name] = ""  # every required field is a path (output_dir, export_dir)
    config, _ = _validate_fields(schema, usable)
    if config is None:
        return []
    return [(key, message) for key, message in config.problems() if key not in bad_keys]


ConfigCheck = Callable[[Any], list[Problem]]
"""A check that reads more than the config (the dataset registry, the model's config.json): config -> problems."""


def load_stage_config(
    schema: type[ConfigT],
    path: str | Path | None,
    overrides: list[str] | dict[str, Any] | None = None,
    *,
    checks: Sequence[ConfigCheck] = (),
) -> LoadedConfig:
    """Load, merge and validate a stage config; raise one FtkitError listing every problem found.

    Problems are listed in the order of the file's lines, then those from the command line. ``checks``
    (from the layers above, which may read datasets and models) run once the config is otherwise valid, so
    a typo is reported before anything heavy is imported; their problems are reported like the others,
    each at the line of its key.
    """
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    lines: dict[str, int] = {}
    if path is not None:
        path = Path(path)
        values, lines = read_yaml_mapping(path)
        origin = {key: f"{path}:{lines.get(key, '?')}" for key in values}
    override_values = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides or {})
    for key, value in override_values.items():
        values[key] = value
        origin[key] = "command line"
        lines.pop(key, None)
    raw = _RawConfig(values, origin)

    keyed: list[tuple[str, str]] = []  # (key, sentence)
    notes: list[str] = []
    known_values, passthrough = _classify_keys(raw, schema, keyed, notes)
    for alias, target in KEY_ALIASES.items():
        if alias in values and target not in values:  # a problem with the value points at the alias's line
            origin[target] = origin[alias]
            if alias in lines:
                lines[target] = lines[alias]
    if passthrough:
        given = known_values.get("extra_training_args")
        known_values["extra_training_args"] = {**(given if isinstance(given, dict) else {}), **passthrough}

    config, field_errors = _validate_fields(schema, known_values)
    if field_errors:
        cross = _cross_field_problems(schema, known_values, {key for key, _ in field_errors})
    else:
        cross = config.problems()
    default_origin = str(path) if path is not None else "command line"
    keyed += [(key, f"{origin.get(key, default_origin)}: {key}: {message}") for key, message in field_errors]
    keyed += [(key, f"{origin.get(key, default_origin)}: {message}") for key, message in cross]
    if not keyed:
        for check in checks:
            keyed += [(key, f"{origin.get(key, default_origin)}: {message}") for key, message in check(config)]
    if keyed:
        problems = [text for _, text in sorted(keyed, key=lambda item: lines.get(item[0], 1 << 30))]
        source = path if path is not None else "the command line"
        count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
        raise FtkitError(f"{source} has {count}:", problems=problems)
    return LoadedConfig(config=config, path=path, notes=notes)


def dump_resolved_config(config: Section) -> str:
    """The config with every default filled in, as YAML that ``ftkit`` accepts back unchanged."""
    data = config.model_dump(mode="json")
    if not data.get("extra_training_args"):
        data.pop("extra_training_args", None)
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
