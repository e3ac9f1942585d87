"""What the board knows about runs, read from the files the runs already write: no database, no second truth.

- **Finding runs**: every folder under the root (at most ``MAX_DEPTH`` deep) that holds ``ftkit_config.yaml``,
  ``ftkit_status.json`` or ``trainer_log.jsonl``. Hidden folders are skipped, and so is a symlink whose
  target lies outside the root. A run's id is its path below the root, with ``/``.
- **Only under the root**: ``run_dir`` turns an id from a request into a folder and refuses anything that
  resolves outside the root (``..``, an absolute path, a symlink pointing out) or is not a run. Files inside
  a run are opened without following a symlink (``O_NOFOLLOW``), and subfolders that are links are skipped,
  so a link planted in a run folder cannot serve a file from elsewhere.
- **Status** comes from ``ftkit_status.json`` (``ftkit.run_files``); "running" whose process is gone on
  this host, or whose heartbeat stopped (its process id now belongs to another program), is reported as
  interrupted (a SIGKILL leaves no chance to write anything else).
- **The log** is read from a cursor (the file's inode, a checksum of its first bytes and a byte offset):
  only complete lines, a line that does not parse (a run killed mid-write) skipped. A log replaced by a
  resume or a new run is read again from the start. Each run's curves are cached with their cursor, so a page update reads only
  the lines written since; the runs table reads only each log's last lines.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import socket
import threading
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ftkit.errors import FtkitError
from ftkit.run_files import (
    ADAPTER_CONFIG_FILE,
    CHECKPOINT_MANIFEST,
    CHECKPOINT_PATTERN,
    EVALUATION_RESULTS_FILE,
    HEARTBEAT_S,
    RUN_CONFIG_FILE,
    RUN_RESULTS_FILE,
    RUN_STATUS_FILE,
    TRAINER_LOG_FILE,
    parse_log_lines,
    process_is_running,
    run_status_from_text,
)

MAX_DEPTH = 4
RUN_MARKERS = (RUN_CONFIG_FILE, RUN_STATUS_FILE, TRAINER_LOG_FILE)
TRAIN_COLUMNS = ("step", "epoch", "loss", "learning_rate", "grad_norm", "tokens_per_second", "elapsed_seconds")
EVAL_COLUMNS = ("step", "eval_loss")
STALE_AFTER_S = 12 * HEARTBEAT_S  # a live process id with a heartbeat this old is not the run's process
_TAIL_BYTES = 16384
_CURSOR_CHECK_BYTES = 64
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class BoardError(FtkitError):
    """A request the board refuses: an HTTP status and one sentence (and, for a config, its problems)."""

    def __init__(self, status: int, message: str, *, problems: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.config_problems = problems or []


# -- where runs are -----------------------------------------------------------------------------------------

def find_runs(root: Path) -> list[Path]:
    """Run folders under ``root`` (resolved), sorted by id; a run's own subfolders are not searched."""
    found: list[Path] = []

    def walk(folder: Path, depth: int) -> None:
        try:
            children = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError:
            return
        names = {entry.name for entry in children}
        if folder != root and any(marker in names for marker in RUN_MARKERS):
            found.append(folder)
            return
        if depth >= MAX_DEPTH:
            return
        for entry in children:
            if entry.name.startswith(".") or CHECKPOINT_PATTERN.match(entry.name):
                continue
            try:
                if not entry.is_dir():
                    continue
            except OSError:
                continue
            child = Path(entry.path)
            if entry.is_symlink() and not _inside(resolved_path(child), root):
                continue  # a link pointing out of the root (or in a loop)
            walk(child, depth + 1)

    walk(root, 0)
    return found


def run_id(root: Path, folder: Path) -> str:
    return folder.relative_to(root).as_posix()


def run_dir(root: Path, given: str | None) -> Path:
    """The run folder an id names; a 404 for anything outside the root, or that is not a run."""
    if not given or "\x00" in given:
        raise BoardError(404, "No run id was given; ask for one of the ids /api/runs lists.")
    relative = Path(given)
    if relative.is_absolute() or ".." in relative.parts or given.startswith(("/", "\\")):
        raise BoardError(404, f"Run {given!r} is not under the board's root; ask for an id /api/runs lists.")
    folder = (root / relative)
    resolved = resolved_path(folder)
    if resolved is None:
        raise BoardError(404, f"There is no run {given!r} under the board's root.")
    if not _inside(resolved, root) or resolved == root:
        raise BoardError(404, f"Run {given!r} is not under the board's root; ask for an id /api/runs lists.")
    if not resolved.is_dir() or not any((resolved / marker).exists() for marker in RUN_MARKERS):
        raise BoardError(404, f"There is no run {given!r} under the board's root (it may have been deleted).")
    return root / relative


def _inside(path: Path | None, root: Path) -> bool:
    return path is not None and (path == root or root in path.parents)


def resolved_path(path: Path) -> Path | None:
    """``path`` with every link followed; None for a link loop or a name the file system cannot hold."""
    try:
        return path.resolve()
    except (OSError, RuntimeError, ValueError, UnicodeError):  # RuntimeError: a symlink loop (Python < 3.13)
        return None


# -- one run's files ----------------------------------------------------------------------------------------

def read_bytes(path: Path, *, tail: int | None = None) -> bytes | None:
    """A file's bytes (its last ``tail`` bytes), never through a symlink; None when it cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except (OSError, ValueError):
        return None
    with os.fdopen(fd, "rb") as file:
        try:
            if tail is not None:
                file.seek(max(os.fstat(fd).st_size - tail, 0))
            return file.read()
        except OSError:
            return None


def read_config(folder: Path) -> dict[str, Any]:
    """The run's resolved config as a mapping; empty when it is missing or unreadable."""
    data = read_bytes(folder / RUN_CONFIG_FILE)
    try:
        config = yaml.load(data.decode("utf-8"), Loader=_SafeLoader) if data else None
    except (yaml.YAMLError, UnicodeDecodeError):
        return {}
    return config if isinstance(config, dict) else {}


def read_config_text(folder: Path) -> str:
    data = read_bytes(folder / RUN_CONFIG_FILE)
    return data.decode("utf-8", errors="replace") if data else ""


def read_json(path: Path) -> dict[str, Any] | None:
    data = read_bytes(path)
    try:
        value = json.loads(data) if data else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def read_status(folder: Path) -> dict[str, Any] | None:
    data = read_bytes(folder / RUN_STATUS_FILE)
    return run_status_from_text(data.decode("utf-8", errors="replace")) if data else None


def run_state(folder: Path) -> tuple[str, str]:
    """(state, detail): running / finished / failed / interrupted from the status file, or "unknown"."""
    status = read_status(folder)
    if status is None:
        if (folder / RUN_RESULTS_FILE).is_file():
            return "finished", ""
        return "unknown", f"no {RUN_STATUS_FILE} (ftkit writes it since version 0.1 of the board)"
    state = status["status"]
    if state != "running":
        return state, str(status.get("message") or "")
    heartbeat = status.get("heartbeat")
    age = time.time() - heartbeat if isinstance(heartbeat, (int, float)) else None
    if status.get("host") == socket.gethostname():
        if not process_is_running(status.get("pid")):
            return "interrupted", f"process {status.get('pid')} ended without saying so (killed)"
        if age is not None and age > STALE_AFTER_S:
            return "interrupted", (f"no heartbeat for {age:.0f} s: process {status.get('pid')} is not this run any "
                                   "more (or is stopped)")
        return "running", ""
    return "running", f"on host {status.get('host')}" + (f", last heartbeat {age:.0f} s ago" if age else "")


def checkpoints(folder: Path) -> list[dict[str, Any]]:
    """The run's checkpoint-N folders, oldest first; complete ones have their manifest (written last)."""
    found = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            match = CHECKPOINT_PATTERN.match(entry.name)
            if match and entry.is_dir(follow_symlinks=False):
                found.append({"name": entry.name, "step": int(match.group(1)),
                              "complete": os.path.exists(os.path.join(entry.path, CHECKPOINT_MANIFEST))})
    return sorted(found, key=lambda c: c["step"])


def evaluations(folder: Path) -> list[dict[str, Any]]:
    """``ftkit evaluate`` results in the run's folder or a subfolder (two levels; linked folders skipped)."""
    found = []
    candidates = [folder / EVALUATION_RESULTS_FILE]
    with contextlib.suppress(OSError):
        for first in sorted(p for p in folder.iterdir() if p.is_dir() and not p.is_symlink()):
            candidates.append(first / EVALUATION_RESULTS_FILE)
            candidates += [second / EVALUATION_RESULTS_FILE for second in sorted(first.iterdir())
                           if second.is_dir() and not second.is_symlink()]
    for path in candidates:
        results = read_json(path)
        if results is not None:
            found.append({"path": path.relative_to(folder).as_posix(), "results": results})
    return found


def method_of(config: dict[str, Any]) -> str:
    method = str(config.get("finetuning_type", "?"))
    if method == "lora" and config.get("quantization_bit"):
        method = f"qlora ({config['quantization_bit']}-bit)"
    stage = config.get("stage")
    return f"{stage} {method}" if stage else method


# -- the log --------------------------------------------------------------------------------------------------

@dataclass
class LogChunk:
    """Log records since a cursor, as columns (what the charts draw)."""

    cursor: str
    reset: bool
    train: dict[str, list[Any]] = field(default_factory=lambda: {name: [] for name in TRAIN_COLUMNS})
    eval: dict[str, list[Any]] = field(default_factory=lambda: {name: [] for name in EVAL_COLUMNS})

    def add(self, record: dict[str, Any]) -> None:
        """One log record into the columns; a value that is not a finite number (NaN, a string) becomes None."""
        if not isinstance(record.get("step"), (int, float)) or isinstance(record.get("step"), bool):
            return
        if "loss" in record:
            for name in TRAIN_COLUMNS:
                self.train[name].append(finite(record.get(name)))
        elif "eval_loss" in record:
            self.eval["step"].append(record["step"])
            self.eval["eval_loss"].append(finite(record["eval_loss"]))

    def extend(self, other: LogChunk) -> None:
        for mine, theirs in ((self.train, other.train), (self.eval, other.eval)):
            for name, values in theirs.items():
                mine[name].extend(values)
        self.cursor = other.cursor

    @property
    def records(self) -> int:
        return len(self.train["step"]) + len(self.eval["step"])

    def as_json(self) -> dict[str, Any]:
        return {"cursor": self.cursor, "reset": self.reset, "train": self.train, "eval": self.eval}


def read_log_since(folder: Path, cursor: str | None) -> LogChunk:
    """The complete log lines written after ``cursor``; from the start when the file was replaced."""
    inode, check, offset = _parse_cursor(cursor)
    try:
        fd = os.open(folder / TRAINER_LOG_FILE, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except (OSError, ValueError):
        return LogChunk(cursor="0:0:0", reset=cursor is not None and offset > 0)
    with os.fdopen(fd, "rb") as log:
        stat = os.fstat(fd)
        head = log.read(min(offset, _CURSOR_CHECK_BYTES)) if offset else b""
        reset = offset > 0 and (inode != stat.st_ino or offset > stat.st_size or zlib.crc32(head) != check)
        if reset:
            offset = 0
        log.seek(offset)
        data = log.read()
    complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits for the next read
    end = offset + len(complete)
    if offset == 0:
        head = complete[:_CURSOR_CHECK_BYTES]
    chunk = LogChunk(cursor=f"{stat.st_ino}:{zlib.crc32(head[:min(end, _CURSOR_CHECK_BYTES)])}:{end}",
                     reset=reset and cursor is not None)
    for record in parse_log_lines(complete):
        chunk.add(record)
    return chunk


def _parse_cursor(cursor: str | None) -> tuple[int, int, int]:
    """(inode, checksum of the first bytes read, offset); (-1, 0, 0) for no or a malformed cursor."""
    try:
        inode, check, offset = (cursor or "").split(":")
        return int(inode), int(check), max(int(offset), 0)
    except ValueError:
        return -1, 0, 0


def last_records(folder: Path) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The last training record and the last eval record among the log's last lines (the runs table)."""
    data = read_bytes(folder / TRAINER_LOG_FILE, tail=_TAIL_BYTES)
    if not data:
        return None, None
    train = evaluation = None
    for record in reversed(list(parse_log_lines(data))):
        if train is None and "loss" in record:
            train = record
        elif evaluation is None and "eval_loss" in record:
            evaluation = record
        if train is not None and evaluation is not None:
            break
    return train, evaluation


def finite(value: Any) -> Any:
    """``value`` with every float that is NaN or infinite replaced by None (JSON has no such numbers)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    return value


class Curves:
    """Each run's whole log as columns, kept with its cursor: a read costs only the lines written since.

    The ``KEPT_RUNS`` runs looked at last are kept (10,000 log lines are about 2 MB of Python numbers)."""

    KEPT_RUNS = 16

    def __init__(self) -> None:
        self._cache: OrderedDict[Path, LogChunk] = OrderedDict()
        self._lock = threading.Lock()  # requests run in worker threads: one extends a run's cache at a time

    def full(self, folder: Path) -> dict[str, Any]:
        """The run's whole log as columns (JSON-ready)."""
        with self._lock:
            cached = self._cache.get(folder)
            new = read_log_since(folder, cached.cursor if cached else None)
            if cached is None or new.reset:
                cached = LogChunk(cursor=new.cursor, reset=False)
                self._cache[folder] = cached
            self._cache.move_to_end(folder)
            while len(self._cache) > self.KEPT_RUNS:
                self._cache.popitem(last=False)
            cached.extend(new)
            return {"cursor": cached.cursor, "train": {k: list(v) for k, v in cached.train.items()},
                    "eval": {k: list(v) for k, v in cached.eval.items()}}

    def forget(self, folder: Path) -> None:
        with self._lock:
            self._cache.pop(folder, None)


# -- what the pages show --------------------------------------------------------------------------------------

def summary(root: Path, folder: Path) -> dict[str, Any]:
    """One row of the runs table."""
    config = read_config(folder)
    state, detail = run_state(folder)
    status = read_status(folder) or {}
    results = read_json(folder / RUN_RESULTS_FILE) or {}
    train, evaluation = last_records(folder)
    started = status.get("started")
    ended = time.time() if state == "running" else status.get("ended") or status.get("heartbeat")
    wall = results.get("total_seconds")
    if wall is None and isinstance(started, (int, float)) and isinstance(ended, (int, float)):
        wall = ended - started
    datasets = config.get("dataset") or []
    return {
        "id": run_id(root, folder),
        "status": state,
        "detail": detail,
        "model": str(config["model_name_or_path"]) if config.get("model_name_or_path") else None,
        "method": method_of(config) if config else None,
        "dataset": ", ".join(map(str, datasets)) if isinstance(datasets, list) else str(datasets),
        "step": results.get("global_step") or max(_number((train or {}).get("step")), _number(status.get("step"))),
        "max_steps": status.get("max_steps") or results.get("global_step"),
        "loss": (train or {}).get("loss"),
        "eval_loss": (evaluation or {}).get("eval_loss", results.get("eval_loss")),
        "tokens_per_second": results.get("tokens_per_second", (train or {}).get("tokens_per_second")),
        "wall_seconds": round(wall, 1) if isinstance(wall, (int, float)) else None,
        "general_kept": _fraction(results, "general_answers_kept", "general_answers_base_right"),
        "learned": _fraction(results, "learned_answers", "learned_checked"),
        "started": started,
        "updated": _mtime(folder),
    }


def _number(value: Any) -> int | float:
    return value if isinstance(value, (int, float)) else 0


def _fraction(results: dict[str, Any], part: str, whole: str) -> str | None:
    if isinstance(results.get(part), int) and isinstance(results.get(whole), int) and results[whole]:
        return f"{results[part]}/{results[whole]}"
    return None


def _mtime(folder: Path) -> float | None:
    times = []
    for name in (TRAINER_LOG_FILE, RUN_STATUS_FILE, RUN_RESULTS_FILE, RUN_CONFIG_FILE):
        with contextlib.suppress(OSError):
            times.append((folder / name).stat().st_mtime)
    return max(times) if times else None


def details(root: Path, folder: Path) -> dict[str, Any]:
    """Everything the run page shows besides the curves."""
    relative = os.path.relpath(folder, Path.cwd())
    has_weights = any((folder / name).is_file() for name in (ADAPTER_CONFIG_FILE, "config.json"))
    rerun = f"output_dir={relative}-again"
    return {
        **summary(root, folder),
        "status_file": read_status(folder),
        "config_text": read_config_text(folder),
        "results": read_json(folder / RUN_RESULTS_FILE),
        "checkpoints": checkpoints(folder),
        "evaluations": evaluations(folder),
        "adapter": (folder / ADAPTER_CONFIG_FILE).is_file(),
        "can_chat": has_weights and (folder / RUN_RESULTS_FILE).is_file(),
        "command": f"ftkit train {shlex.quote(f'{relative}/{RUN_CONFIG_FILE}')} {shlex.quote(rerun)}",
    }


def config_diff(configs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every key of the given configs, each with its value per run and whether they differ."""
    keys: list[str] = []
    for config in configs:
        keys += [key for key in config if key not in keys]
    rows = []
    for key in keys:
        values = [json.dumps(finite(config.get(key)), ensure_ascii=False, default=str) if key in config else None
                  for config in configs]
        rows.append({"key": key, "values": values, "differs": len(set(values)) > 1})
    return rows
