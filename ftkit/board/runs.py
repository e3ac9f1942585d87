"""What the board knows about runs, read from the files the runs already write: no database, no second truth.

- **Finding runs**: every folder under the root (at most ``MAX_DEPTH`` deep) that holds ``ftkit_config.yaml``,
  ``ftkit_status.json`` or ``trainer_log.jsonl``. Hidden folders are skipped, and so is a symlink whose
  target lies outside the root. A run's id is its path below the root, with ``/``.
- **Only under the root**: ``run_dir`` turns an id from a request into a folder and refuses anything that
  resolves outside the root (``..``, an absolute path, a symlink pointing out) or is not a run.
- **Status** comes from ``ftkit_status.json`` (``ftkit.run_files``); "running" whose process is gone on
  this host is reported as interrupted (a SIGKILL leaves no chance to write anything else).
- **The log** is read from a cursor (the file's inode and a byte offset): only complete lines, a line that
  does not parse (a run killed mid-write) skipped. A log replaced by a resume or a new run has a new inode and
  is read again from the start. Each run's curves are cached with their cursor, so a page update reads only
  the lines written since; the runs table reads only each log's last lines.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ftkit.errors import FtkitError
from ftkit.run_files import (
    ADAPTER_CONFIG_FILE,
    CHECKPOINT_MANIFEST,
    RUN_CONFIG_FILE,
    RUN_RESULTS_FILE,
    RUN_STATUS_FILE,
    TRAINER_LOG_FILE,
    read_run_status,
)

MAX_DEPTH = 4
RUN_MARKERS = (RUN_CONFIG_FILE, RUN_STATUS_FILE, TRAINER_LOG_FILE)
TRAIN_COLUMNS = ("step", "epoch", "loss", "learning_rate", "grad_norm", "tokens_per_second", "elapsed_seconds")
EVAL_COLUMNS = ("step", "eval_loss")
EVALUATION_RESULTS = "results.json"  # what ``ftkit evaluate`` writes
_TAIL_BYTES = 16384
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
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
            if entry.name.startswith(".") or _CHECKPOINT.match(entry.name):
                continue
            try:
                if not entry.is_dir():
                    continue
            except OSError:
                continue
            child = Path(entry.path)
            if entry.is_symlink() and not _inside(child.resolve(), root):
                continue  # a link pointing out of the root
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
    resolved = folder.resolve()
    if not _inside(resolved, root) or resolved == root:
        raise BoardError(404, f"Run {given!r} is not under the board's root; ask for an id /api/runs lists.")
    if not resolved.is_dir() or not any((resolved / marker).exists() for marker in RUN_MARKERS):
        raise BoardError(404, f"There is no run {given!r} under the board's root (it may have been deleted).")
    return root / relative


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


# -- one run's files ----------------------------------------------------------------------------------------

def read_config(folder: Path) -> dict[str, Any]:
    """The run's resolved config as a mapping; empty when it is missing or unreadable."""
    try:
        config = yaml.load((folder / RUN_CONFIG_FILE).read_text(encoding="utf-8"), Loader=_SafeLoader)
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return {}
    return config if isinstance(config, dict) else {}


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def process_is_running(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    """A finished child its parent has not waited for yet (Linux); it still answers signal 0."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def run_state(folder: Path) -> tuple[str, str]:
    """(state, detail): running / finished / failed / interrupted from the status file, or "unknown"."""
    status = read_run_status(folder)
    if status is None:
        if (folder / RUN_RESULTS_FILE).is_file():
            return "finished", ""
        return "unknown", f"no {RUN_STATUS_FILE} (written by ftkit since the board exists)"
    state = status["status"]
    if state != "running":
        return state, status.get("message") or ""
    heartbeat = status.get("heartbeat")
    age = time.time() - heartbeat if isinstance(heartbeat, (int, float)) else None
    if status.get("host") == socket.gethostname():
        if not process_is_running(status.get("pid")):
            return "interrupted", f"process {status.get('pid')} ended without saying so (killed)"
        return "running", (f"no heartbeat for {age:.0f} s" if age is not None and age > 60 else "")
    return "running", f"on host {status.get('host')}" + (f", last heartbeat {age:.0f} s ago" if age else "")


def checkpoints(folder: Path) -> list[dict[str, Any]]:
    """The run's checkpoint-N folders, oldest first; complete ones have their manifest (written last)."""
    found = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            match = _CHECKPOINT.match(entry.name)
            if match and entry.is_dir(follow_symlinks=False):
                found.append({"name": entry.name, "step": int(match.group(1)),
                              "complete": os.path.exists(os.path.join(entry.path, CHECKPOINT_MANIFEST))})
    return sorted(found, key=lambda c: c["step"])


def evaluations(folder: Path) -> list[dict[str, Any]]:
    """``ftkit evaluate`` results in the run's folder or a subfolder (two levels), by path below the run."""
    found = []
    for path in [folder / EVALUATION_RESULTS, *folder.glob(f"*/{EVALUATION_RESULTS}"),
                 *folder.glob(f"*/*/{EVALUATION_RESULTS}")]:
        if path.is_symlink() or not path.is_file():
            continue
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
        if isinstance(record.get("loss"), (int, float)) and isinstance(record.get("step"), (int, float)):
            for name in TRAIN_COLUMNS:
                value = record.get(name)
                self.train[name].append(value if isinstance(value, (int, float)) else None)
        elif isinstance(record.get("eval_loss"), (int, float)) and isinstance(record.get("step"), (int, float)):
            self.eval["step"].append(record["step"])
            self.eval["eval_loss"].append(record["eval_loss"])

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
    """The complete log lines written after ``cursor`` ("inode:offset"); from the start when the file changed."""
    path = folder / TRAINER_LOG_FILE
    inode, offset = _parse_cursor(cursor)
    try:
        with open(path, "rb") as log:
            stat = os.fstat(log.fileno())
            reset = inode != stat.st_ino or offset > stat.st_size
            if reset:
                offset = 0
            log.seek(offset)
            data = log.read()
    except OSError:
        return LogChunk(cursor="0:0", reset=cursor is not None and cursor != "0:0")
    complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits for the next read
    chunk = LogChunk(cursor=f"{stat.st_ino}:{offset + len(complete)}", reset=reset and cursor is not None)
    for line in complete.splitlines():
        record = _parse_line(line)
        if record is not None:
            chunk.add(record)
    return chunk


def _parse_cursor(cursor: str | None) -> tuple[int, int]:
    try:
        inode, offset = (cursor or "").split(":")
        return int(inode), max(int(offset), 0)
    except ValueError:
        return -1, 0


def _parse_line(line: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def last_records(folder: Path) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The last training record and the last eval record among the log's last lines (the runs table)."""
    try:
        with open(folder / TRAINER_LOG_FILE, "rb") as log:
            size = log.seek(0, os.SEEK_END)
            log.seek(max(size - _TAIL_BYTES, 0))
            data = log.read()
    except OSError:
        return None, None
    train = evaluation = None
    for line in reversed(data.splitlines()):
        record = _parse_line(line)
        if record is None:
            continue
        if train is None and isinstance(record.get("loss"), (int, float)):
            train = record
        elif evaluation is None and isinstance(record.get("eval_loss"), (int, float)):
            evaluation = record
        if train is not None and evaluation is not None:
            break
    return train, evaluation


class Curves:
    """Each run's whole log as columns, kept with its cursor: a read costs only the lines written since."""

    def __init__(self) -> None:
        self._cache: dict[Path, LogChunk] = {}

    def full(self, folder: Path) -> LogChunk:
        cached = self._cache.get(folder)
        new = read_log_since(folder, cached.cursor if cached else None)
        if cached is None or new.reset:
            cached = LogChunk(cursor=new.cursor, reset=False)
            self._cache[folder] = cached
        cached.extend(new)
        return cached

    def forget(self, folder: Path) -> None:
        self._cache.pop(folder, None)


# -- what the pages show --------------------------------------------------------------------------------------

def summary(root: Path, folder: Path) -> dict[str, Any]:
    """One row of the runs table."""
    config = read_config(folder)
    state, detail = run_state(folder)
    status = read_run_status(folder) or {}
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
        "model": config.get("model_name_or_path"),
        "method": method_of(config) if config else None,
        "dataset": ", ".join(datasets) if isinstance(datasets, list) else str(datasets),
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
    config_text = ""
    with contextlib.suppress(OSError, UnicodeDecodeError):
        config_text = (folder / RUN_CONFIG_FILE).read_text(encoding="utf-8")
    relative = os.path.relpath(folder, Path.cwd())
    has_weights = any((folder / name).is_file() for name in (ADAPTER_CONFIG_FILE, "config.json"))
    return {
        **summary(root, folder),
        "status_file": read_run_status(folder),
        "config_text": config_text,
        "results": read_json(folder / RUN_RESULTS_FILE),
        "checkpoints": checkpoints(folder),
        "evaluations": evaluations(folder),
        "adapter": (folder / ADAPTER_CONFIG_FILE).is_file(),
        "can_chat": has_weights and (folder / RUN_RESULTS_FILE).is_file(),
        "command": f"ftkit train {relative}/{RUN_CONFIG_FILE} output_dir={relative}-again",
    }


def config_diff(configs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every key of the given configs, each with its value per run and whether they differ."""
    keys: list[str] = []
    for config in configs:
        keys += [key for key in config if key not in keys]
    rows = []
    for key in keys:
        values = [json.dumps(config.get(key), ensure_ascii=False) if key in config else None for config in configs]
        rows.append({"key": key, "values": values, "differs": len(set(values)) > 1})
    return rows
