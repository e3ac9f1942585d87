"""The dataset registry: LLaMA-Factory's ``dataset_info.json`` schema, plus plain file paths.

``dataset: identity,alpaca_en_demo`` names entries of ``<dataset_dir>/dataset_info.json``; when the
directory has no registry, ftkit's shipped one (``ftkit/resources/data``) answers. ``dataset:
path/to/file.jsonl`` skips the registry: the format is detected from the first record's keys.
An entry whose name no ``dataset:`` list can select (a comma, surrounding spaces, empty) is refused when
the registry is read, rather than offered later as a did-you-mean the user cannot type.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ftkit.errors import FtkitError
from ftkit.paths import package_resource

REGISTRY_FILE = "dataset_info.json"
FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".parquet", ".arrow", ".txt")

_SHAREGPT_TAGS = {
    "role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
    "system_tag": "system", "observation_tag": "observation", "function_tag": "function_call",
}
_OPENAI_TAGS = {
    "role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
    "system_tag": "system", "observation_tag": "tool", "function_tag": "function_call",
}
_ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output"}
_KNOWN_ENTRY_KEYS = {
    "file_name", "hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name", "formatting", "ranking",
    "subset", "split", "folder", "num_samples", "columns", "tags",
}
_KNOWN_COLUMNS = {
    "prompt", "query", "response", "history", "messages", "system", "tools", "images", "videos", "audios",
    "chosen", "rejected", "kto_tag",
}


@dataclass
class DatasetSpec:
    """One dataset as the registry describes it, with LLaMA-Factory's defaults filled in."""

    name: str
    source: Literal["file", "hf_hub", "ms_hub"]
    location: str  # a file/folder path, or a hub id
    formatting: Literal["alpaca", "sharegpt", "openai"] = "alpaca"
    ranking: bool = False
    subset: str | None = None
    split: str = "train"
    folder: str | None = None
    num_samples: int | None = None
    columns: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    given_as_path: bool = False  # `dataset: path/to/file`: the format is detected from the first record
    detected: str | None = None  # what detection found, reported to the user

    def column(self, role: str) -> str | None:
        """The record key holding ``role`` (prompt, query, response, history, messages, system, ...)."""
        return self.columns.get(role)

    def fingerprint(self) -> dict[str, Any]:
        """Everything about the spec that changes what the data turns into (for the cache key)."""
        return {k: v for k, v in self.__dict__.items() if k not in ("name", "detected", "given_as_path")}


def registry_path(dataset_dir: str | Path) -> Path:
    """The ``dataset_info.json`` that answers for ``dataset_dir`` (the shipped one as a fallback)."""
    candidate = Path(dataset_dir) / REGISTRY_FILE
    if candidate.is_file():
        return candidate
    if Path(dataset_dir).resolve() == Path("data").resolve():
        return package_resource("data", REGISTRY_FILE)
    raise FtkitError(f"dataset_dir {dataset_dir} has no {REGISTRY_FILE}; create one or point dataset_dir at the "
                     "folder that holds it.")


def load_registry(dataset_dir: str | Path) -> tuple[Path, dict[str, dict[str, Any]]]:
    """Read a registry file; raise FtkitError naming the file and line when it is not valid JSON."""
    path = registry_path(dataset_dir)
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise FtkitError(f"{path}:{err.lineno}:{err.colno}: invalid JSON: {err.msg}.") from None
    except UnicodeDecodeError as err:
        raise FtkitError(f"{path} is not UTF-8 text (byte {err.start}); save it as UTF-8.") from None
    if not isinstance(entries, dict):
        raise FtkitError(f"{path} must map dataset names to their descriptions (a JSON object).")
    for name in entries:
        if "," in name or name != name.strip() or not name:
            problem = "contains a comma" if "," in name else "is empty" if not name else "starts or ends with a space"
            selectable = name.strip().replace(",", "_")
            rename = f" (for example to {json.dumps(selectable)})" if selectable else ""
            raise FtkitError(f"{path}: dataset name {json.dumps(name)} {problem}, so no `dataset:` list (split at "
                             f"commas, each name stripped) can select it; rename the entry{rename}.")
    return path, entries


def looks_like_path(name: str) -> bool:
    return name.endswith(FILE_SUFFIXES) or "/" in name and Path(name).exists() or Path(name).is_file()


def resolve_dataset(name: str, dataset_dir: str | Path) -> DatasetSpec:
    """Turn a ``dataset:`` entry (a registry name or a file path) into a DatasetSpec."""
    if looks_like_path(name):
        path = Path(name).expanduser()
        if not path.exists():
            raise FtkitError(f"Dataset file {name} does not exist; check the path (relative paths start at the "
                             "current directory).")
        return DatasetSpec(name=name, source="file", location=str(path), given_as_path=True)
    registry_file, entries = load_registry(dataset_dir)
    if name not in entries:
        close = difflib.get_close_matches(name, list(entries), n=1, cutoff=0.5)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise FtkitError(f"Dataset '{name}' is not registered in {registry_file}; {hint}registered: "
                         f"{', '.join(sorted(entries))}. Register it there or give a file path.")
    return spec_from_entry(name, entries[name], registry_file)


def spec_from_entry(name: str, entry: Any, registry_file: Path) -> DatasetSpec:
    """Validate one registry entry and fill in LLaMA-Factory's defaults."""
    where = f"{registry_file}: dataset '{name}'"
    if not isinstance(entry, dict):
        raise FtkitError(f"{where} must be a JSON object with file_name, hf_hub_url or ms_hub_url.")
    unknown = sorted(set(entry) - _KNOWN_ENTRY_KEYS)
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(_KNOWN_ENTRY_KEYS), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise FtkitError(f"{where} has unknown key(s) {', '.join(unknown)}; {hint}valid keys: "
                         f"{', '.join(sorted(_KNOWN_ENTRY_KEYS))}.")
    for key in ("columns", "tags"):
        if not isinstance(entry.get(key) or {}, dict) or not all(
            isinstance(v, str) for v in (entry.get(key) or {}).values()
        ):
            raise FtkitError(f"{where}: {key} must be a JSON object mapping names to strings, not "
                             f"{json.dumps(entry[key])}.")
    if "file_name" in entry:
        source, location = "file", str(registry_file.parent / entry["file_name"])
    elif "hf_hub_url" in entry:
        source, location = "hf_hub", entry["hf_hub_url"]
    elif "ms_hub_url" in entry:
        source, location = "ms_hub", entry["ms_hub_url"]
    else:
        raise FtkitError(f"{where} needs one of file_name, hf_hub_url or ms_hub_url.")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt", "openai"):
        raise FtkitError(f"{where}: formatting '{formatting}' is not one of alpaca, sharegpt, openai.")
    columns = entry.get("columns") or {}
    bad_columns = set(columns) - _KNOWN_COLUMNS
    if bad_columns:
        raise FtkitError(f"{where}: unknown column role(s) {', '.join(sorted(bad_columns))}; valid: "
                         f"{', '.join(sorted(_KNOWN_COLUMNS))}.")
    num_samples = entry.get("num_samples")
    if num_samples is not None and (not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1):
        raise FtkitError(f"{where}: num_samples must be a positive whole number, not {json.dumps(num_samples)}.")
    bad_tags = set(entry.get("tags") or {}) - set(_SHAREGPT_TAGS)
    if bad_tags:
        raise FtkitError(f"{where}: unknown tag(s) {', '.join(sorted(bad_tags))}; valid: "
                         f"{', '.join(sorted(_SHAREGPT_TAGS))}.")
    spec = DatasetSpec(
        name=name, source=source, location=location, formatting=formatting, ranking=bool(entry.get("ranking")),
        subset=entry.get("subset"), split=entry.get("split", "train"), folder=entry.get("folder"),
        num_samples=entry.get("num_samples"), columns=dict(columns), tags=dict(entry.get("tags") or {}),
    )
    return with_default_columns(spec)


def with_default_columns(spec: DatasetSpec) -> DatasetSpec:
    """Fill LLaMA-Factory's default column and tag names for the spec's format."""
    if spec.formatting == "alpaca":
        if not spec.ranking or "response" in spec.columns:
            spec.columns = {**_ALPACA_COLUMNS, **spec.columns}
        else:
            spec.columns = {**{k: v for k, v in _ALPACA_COLUMNS.items() if k != "response"}, **spec.columns}
    else:
        spec.columns = {"messages": "conversations" if spec.formatting == "sharegpt" else "messages", **spec.columns}
        defaults = _SHAREGPT_TAGS if spec.formatting == "sharegpt" else _OPENAI_TAGS
        spec.tags = {**defaults, **spec.tags}
    return spec


def detect_format(spec: DatasetSpec, first_record: dict[str, Any]) -> DatasetSpec:
    """For a dataset given as a path: choose the format from the keys of its first record."""
    keys = set(first_record)
    if "messages" in keys and _first_turn_has(first_record["messages"], "role"):
        spec.formatting, spec.detected = "openai", "openai (messages with role/content)"
    elif "conversations" in keys:
        spec.formatting, spec.detected = "sharegpt", "sharegpt (conversations with from/value)"
        turn_keys = _first_turn_keys(first_record["conversations"])
        if "role" in turn_keys:
            spec.tags = dict(_OPENAI_TAGS)
            spec.detected = "sharegpt (conversations with role/content)"
    elif {"instruction", "output"} <= keys:
        spec.detected = "alpaca (instruction/input/output)"
        if "history" in keys:
            spec.columns["history"] = "history"
            spec.detected = "alpaca (instruction/input/output/history)"
    elif {"prompt", "completion"} <= keys:
        spec.columns, spec.detected = {"prompt": "prompt", "response": "completion"}, "prompt/completion"
    elif {"question", "answer"} <= keys:
        spec.columns, spec.detected = {"prompt": "question", "response": "answer"}, "question/answer"
    elif "text" in keys:
        spec.columns, spec.detected = {"prompt": "text"}, "raw text (text)"
    else:
        raise FtkitError(f"Cannot tell the format of {spec.location}: its first record has keys "
                         f"{', '.join(sorted(keys)) or '(none)'}; expected messages, conversations, "
                         "instruction/output, prompt/completion, question/answer or text, or register it in "
                         "dataset_info.json with its columns.")
    if "system" in keys:
        spec.columns.setdefault("system", "system")
    return with_default_columns(spec)


def _first_turn_keys(turns: Any) -> set[str]:
    if isinstance(turns, list) and turns and isinstance(turns[0], dict):
        return set(turns[0])
    return set()


def _first_turn_has(turns: Any, key: str) -> bool:
    return key in _first_turn_keys(turns)


def dataset_problems(config: Any) -> list[tuple[str, str]]:
    """``dataset``, ``eval_dataset`` and a dataset ``replay_source`` resolved in the registry (no data is read)."""
    from ftkit.config.sections import problem_from_sentence

    names = [("dataset", name) for name in config.dataset] + [("eval_dataset", n) for n in config.eval_dataset or []]
    if config.stage == "sft" and config.replay_ratio != 0 and config.replay_source != "self":
        names.append(("replay_source", config.replay_source))
    found: list[tuple[str, str]] = []
    for key, name in names:
        try:
            resolve_dataset(name, config.dataset_dir)
        except FtkitError as error:
            sentence = str(error)
            sentence = sentence[0].lower() + sentence[1:]
            if key == "replay_source":
                sentence = f"replay_source {name!r} is neither self nor a usable dataset: {sentence}"
            elif not sentence.startswith("dataset_dir"):
                sentence = f"{key}: {sentence}"
            problem = problem_from_sentence(sentence, type(config).model_fields, key)
            if problem not in found:  # a registry problem (no dataset_info.json) once, not once per name
                found.append(problem)
    return found
