"""Read a stage config: YAML with line numbers, ``key=value`` overrides, every mistake reported at once.

Nothing the user wrote is ignored: a key is either a schema field, a LLaMA-Factory or transformers key
that ftkit honours or explains in a one-line note (``ftkit.config.foreign_keys``), or an error with a
did-you-mean. Validation needs only pydantic and PyYAML, so it runs before any heavy import.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import ValidationError

from ftkit.config.foreign_keys import FOREIGN_KEYS, KEY_ALIASES, TRAINING_ARGUMENT_TYPES
from ftkit.config.sections import Section
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
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise FtkitError(f"{path} is not UTF-8 text (byte {err.start}); save the config as UTF-8.") from None
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
    lines = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, _ in node.value:
            lines[str(key_node.value)] = key_node.start_mark.line + 1
    return {str(k): v for k, v in values.items()}, lines


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``key=value`` command-line arguments into a mapping; values are read as YAML scalars."""
    parsed: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise FtkitError(f"Override '{item}' is not key=value (for example learning_rate=1e-4).")
        try:
            parsed[key.strip()] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            parsed[key.strip()] = value
    return parsed


def _did_you_mean(key: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else "; see `ftkit validate --keys` for the valid keys."


def _describe_error(error: dict[str, Any]) -> str:
    message = error["msg"]
    message = message[0].lower() + message[1:] if message else message
    if error["type"] == "missing":
        return "is required"
    return f"{message} (got {error.get('input')!r})"


def _classify_keys(
    raw: _RawConfig, schema: type[Section], problems: list[str], notes: list[str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split user keys into schema fields and transformers pass-through; explain or refuse the rest."""
    fields = set(schema.model_fields)
    known = sorted(fields | set(FOREIGN_KEYS) | set(KEY_ALIASES) | set(TRAINING_ARGUMENT_TYPES))
    values: dict[str, Any] = {}
    passthrough: dict[str, Any] = {}
    for key, value in raw.values.items():
        where = raw.origin[key]
        if key in fields:
            values[key] = value
        elif key in KEY_ALIASES and KEY_ALIASES[key] in fields:
            target = KEY_ALIASES[key]
            notes.append(f"{where}: {key} is read as ftkit's {target}.")
            values.setdefault(target, value)
        elif key in FOREIGN_KEYS:
            foreign = FOREIGN_KEYS[key]
            if foreign.refuse_other_values and value != foreign.default:
                problems.append(f"{where}: {key}: {value!r} is not supported: {foreign.note}")
            else:
                notes.append(f"{where}: {key}: {foreign.note}")
        elif key in TRAINING_ARGUMENT_TYPES and "output_dir" in fields:
            expected = TRAINING_ARGUMENT_TYPES[key]
            if value is not None and not _matches_type(value, expected):
                problems.append(f"{where}: {key}: expected {expected}, got {value!r}.")
            else:
                passthrough[key] = value
                notes.append(f"{where}: {key} is passed to transformers.TrainingArguments as is.")
        else:
            problems.append(f"{where}: {key}: unknown key{_did_you_mean(key, known)}")
    return values, passthrough


def _matches_type(value: Any, expected: str) -> bool:
    checks = {
        "bool": lambda v: isinstance(v, bool),
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "str": lambda v: isinstance(v, str),
        "list": lambda v: isinstance(v, (list, str)),
        "dict": lambda v: isinstance(v, (dict, str)),
    }
    return any(checks.get(part, lambda v: True)(value) for part in expected.split("|"))


def _validate_fields(schema: type[ConfigT], values: dict[str, Any]) -> tuple[ConfigT | None, list[tuple[str, str]]]:
    try:
        return schema.model_validate(values), []
    except ValidationError as err:
        errors = []
        for error in err.errors():
            key = str(error["loc"][0]) if error["loc"] else "config"
            errors.append((key, _describe_error(error)))
        return None, errors


def load_stage_config(
    schema: type[ConfigT], path: str | Path | None, overrides: list[str] | dict[str, Any] | None = None
) -> LoadedConfig:
    """Load, merge and validate a stage config; raise one FtkitError listing every problem found."""
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    if path is not None:
        path = Path(path)
        values, lines = read_yaml_mapping(path)
        origin = {key: f"{path}:{lines.get(key, '?')}" for key in values}
    override_values = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides or {})
    for key, value in override_values.items():
        values[key] = value
        origin[key] = "command line"
    raw = _RawConfig(values, origin)

    problems: list[str] = []
    notes: list[str] = []
    known_values, passthrough = _classify_keys(raw, schema, problems, notes)
    if passthrough:
        known_values["extra_training_args"] = {**known_values.get("extra_training_args", {}), **passthrough}

    default_origin = str(path) if path is not None else "command line"
    config, field_errors = _validate_fields(schema, known_values)
    for key, message in field_errors:
        problems.append(f"{origin.get(key, default_origin)}: {key}: {message}")
    if config is None and field_errors:
        # Check the cross-field rules too, on the keys that did validate, so one run reports everything.
        bad_keys = {key for key, _ in field_errors}
        config, _ = _validate_fields(schema, {k: v for k, v in known_values.items() if k not in bad_keys})
        cross = [(k, m) for k, m in config.problems() if k not in bad_keys] if config is not None else []
        config = None
    else:
        cross = config.problems()
    for key, message in cross:
        problems.append(f"{origin.get(key, default_origin)}: {message}")
    if problems:
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
