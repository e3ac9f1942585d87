"""Launching, stopping and resuming ``ftkit train`` from the page: the CLI as a subprocess, nothing else.

A config from the page is checked exactly as ``ftkit train`` checks it (the same schema, the same dataset and
module checks) and every problem comes back with its line, so the page shows each next to its key; a config
with problems starts nothing. It must train into a folder under the board's root (where the board can show
it), and not into one a live run holds: the board refuses while its own process or the folder's status
says one is running, and ``ftkit train``'s lock refuses any other.

The run is ``python -m ftkit train <config>`` in its own process group, started in the board's working
folder (so relative paths in the config mean what they mean on the command line), its console output in
``<root>/.ftkit-board/launches/``. Stop sends SIGTERM to the group: ftkit turns it into an exit that marks
the run interrupted and releases the folder. Resume runs the run's own resolved config again with
``resume_from_checkpoint: true``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftkit.board.runs import BoardError, checkpoints, read_status, resolved_path, run_id, run_state
from ftkit.errors import FtkitError
from ftkit.run_files import RUN_CONFIG_FILE, process_is_running

BOARD_DIR = ".ftkit-board"  # under the root: the configs the page launched and their console output
_CONSOLE_HEAD_BYTES = 4096  # the run's first lines: model, data, plan
_CONSOLE_TAIL_BYTES = 65536  # and its last (a progress bar writes ~110 bytes a step)
_CONSOLE_LINES = 80


@dataclass
class Launch:
    """A run the board started."""

    output_dir: Path
    process: subprocess.Popen
    config_file: Path
    console_file: Path
    started: float

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def console_tail(self) -> str:
        return console_tail(self.console_file)


def console_tail(path: Path) -> str:
    """A console log as a terminal would show it: a progress bar's carriage returns collapsed, the first and
    last lines kept when it is long."""
    try:
        with open(path, "rb") as console:
            size = console.seek(0, os.SEEK_END)
            console.seek(0)
            if size <= _CONSOLE_HEAD_BYTES + _CONSOLE_TAIL_BYTES:
                return "\n".join(_terminal_lines(console.read())[-_CONSOLE_LINES:])
            head = console.read(_CONSOLE_HEAD_BYTES)
            console.seek(size - _CONSOLE_TAIL_BYTES)
            tail = console.read()
    except OSError:
        return ""
    first = _terminal_lines(head[: head.rfind(b"\n") + 1])[:-1]  # whole lines only
    last = _terminal_lines(tail[tail.find(b"\n") + 1:])
    return "\n".join([*first, "…", *last[-(_CONSOLE_LINES - len(first)):]])


def _terminal_lines(data: bytes) -> list[str]:
    text = data.decode("utf-8", errors="replace")
    return [line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.split("\n")]


class Launcher:
    """The runs this board started, by output folder."""

    def __init__(self, root: Path, workdir: Path) -> None:
        self.root, self.workdir = root, workdir
        self.folder = root / BOARD_DIR
        self.launches: dict[Path, Launch] = {}
        self._lock = threading.Lock()

    # -- checking a config ------------------------------------------------------------------------------
    def check(self, text: str) -> tuple[Any, Path | None, list[dict[str, Any]]]:
        """(config, its file, problems) for YAML text from the page; the file is kept only when it is valid."""
        from ftkit.config import TrainConfig, load_stage_config
        from ftkit.data.registry import dataset_problems
        from ftkit.models.structure import training_target_problems

        if not isinstance(text, str) or not text.strip():
            return None, None, [{"line": None, "key": None, "message": "The config is empty; write or pick a train "
                                                                       "config (YAML) first."}]
        configs = self.folder / "configs"
        configs.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), suffix=".yaml", dir=configs)
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
        path = Path(name)
        problems: list[dict[str, Any]] = []
        config = None
        try:
            config = load_stage_config(TrainConfig, path, checks=(dataset_problems, training_target_problems)).config
        except FtkitError as error:
            problems = located_problems(error, path)
        if config is not None:
            problems = self._output_dir_problems(config, path)
        if problems:
            path.unlink(missing_ok=True)
            return None, None, problems
        return config, path, []

    def _output_dir_problems(self, config: Any, path: Path) -> list[dict[str, Any]]:
        output_dir = resolved_path(self.workdir / config.output_dir)
        if output_dir is None or output_dir == self.root or self.root not in output_dir.parents:
            return [_problem(path, "output_dir", f"output_dir {config.output_dir} is not under the board's root "
                             f"{self.root}; the board launches runs only where it can show them (for example "
                             f"output_dir: {os.path.relpath(self.root / 'my-run', self.workdir)}).")]
        if BOARD_DIR in output_dir.relative_to(self.root).parts:
            return [_problem(path, "output_dir", f"output_dir {config.output_dir} is inside the board's own "
                             f"{BOARD_DIR} folder; choose another folder under {self.root}.")]
        return []

    # -- starting and stopping ---------------------------------------------------------------------------
    def launch(self, text: str) -> Launch:
        """Check ``text`` and start ``ftkit train`` on it; BoardError (400 with the problems, or 409) otherwise."""
        config, path, problems = self.check(text)
        if problems:
            count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
            raise BoardError(400, f"The config has {count}; nothing was started.", problems=problems)
        output_dir = resolved_path(self.workdir / config.output_dir)  # checked under the root by check()
        try:
            return self._start(output_dir, [str(path)], path)
        except BoardError:
            path.unlink(missing_ok=True)
            raise

    def resume(self, folder: Path) -> Launch:
        """Train ``folder``'s run on from its last complete checkpoint (into ``folder`` itself, whatever
        working folder the run was started from)."""
        state, _ = run_state(folder)
        if state == "running":
            raise BoardError(409, f"Run {run_id(self.root, folder)} is still running; stop it before resuming.")
        if state == "finished":
            raise BoardError(409, f"Run {run_id(self.root, folder)} has finished; there is nothing to resume.")
        if not (folder / RUN_CONFIG_FILE).is_file():
            raise BoardError(409, f"Run {run_id(self.root, folder)} has no {RUN_CONFIG_FILE} to resume with.")
        if not any(c["complete"] for c in checkpoints(folder)):
            raise BoardError(409, f"Run {run_id(self.root, folder)} has no complete checkpoint to resume from; "
                             "launch it again from the Launch tab (with overwrite_output_dir: true).")
        output_dir = folder.resolve()
        config_file = output_dir / RUN_CONFIG_FILE
        return self._start(output_dir, [str(config_file), "resume_from_checkpoint=true", "overwrite_output_dir=false",
                                        f"output_dir={json.dumps(str(output_dir))}"], config_file)

    def _start(self, output_dir: Path, args: list[str], config_file: Path) -> Launch:
        with self._lock:
            self.reap()
            current = self.launches.get(output_dir)
            if current is not None and current.alive and run_state(output_dir)[0] != "running":
                with contextlib.suppress(subprocess.TimeoutExpired):  # it has ended its run and is exiting
                    current.process.wait(timeout=15)
            if current is not None and current.alive:
                raise BoardError(409, f"The board is already running a training into {output_dir} (process "
                                 f"{current.process.pid}); stop it first or choose another output_dir.")
            if run_state(output_dir)[0] == "running":
                pid = (read_status(output_dir) or {}).get("pid")
                raise BoardError(409, f"Another ftkit run (process {pid}) is training into {output_dir}; wait for "
                                 "it to finish or choose another output_dir.")
            launches = self.folder / "launches"
            launches.mkdir(parents=True, exist_ok=True)
            console_file = launches / f"{time.strftime('%Y%m%d-%H%M%S')}-{output_dir.name}.log"
            with open(console_file, "wb") as console:
                process = subprocess.Popen(
                    [sys.executable, "-m", "ftkit", "train", *args], cwd=self.workdir, stdout=console,
                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                    env={**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "120"})
            launch = Launch(output_dir, process, config_file, console_file, time.time())
            self.launches[output_dir] = launch
            return launch

    def stop(self, folder: Path) -> int:
        """SIGTERM to the run training into ``folder`` (the board's own, or one its status names on this host)."""
        self.reap()
        launch = self.launches.get(folder.resolve())
        if launch is not None and launch.alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(launch.process.pid, signal.SIGTERM)
            return launch.process.pid
        state, _ = run_state(folder)
        status = read_status(folder) or {}
        pid = status.get("pid")
        if state != "running" or not _is_ftkit_process(pid):
            raise BoardError(409, f"Run {run_id(self.root, folder)} is not running on this machine; there is "
                             "nothing to stop.")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        return pid

    def reap(self) -> None:
        """Collect the exit status of finished children (no zombies)."""
        for launch in self.launches.values():
            launch.process.poll()

    def pending(self) -> list[Launch]:
        """Launches whose run folder has no run files yet (starting, or refused before writing any)."""
        self.reap()
        return [launch for launch in self.launches.values()
                if not (launch.output_dir / RUN_CONFIG_FILE).exists() and (launch.alive or time.time() -
                                                                            launch.started < 3600)]

    def for_folder(self, folder: Path) -> Launch | None:
        return self.launches.get(folder.resolve())

    def stop_all(self) -> None:
        for launch in self.launches.values():
            if launch.alive:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(launch.process.pid, signal.SIGTERM)


def _is_ftkit_process(pid: Any) -> bool:
    """Whether ``pid`` is a live ``ftkit train`` process other than this one (never signal anything else)."""
    if not process_is_running(pid) or pid == os.getpid():
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return b"ftkit\x00train\x00" in cmdline.read()
    except OSError:
        return False


def located_problems(error: FtkitError, path: Path) -> list[dict[str, Any]]:
    """The config loader's sentences ("<file>:<line>: <key>: ...") as {line, key, message} for the page."""
    prefix = re.compile(re.escape(str(path)) + r"(?::(\d+|\?))?:\s*")
    key_at = {line: key for key, line in _key_lines(path).items()}
    located = []
    for sentence in error.problems or [str(error)]:
        match = prefix.match(sentence)
        line = int(match.group(1)) if match and match.group(1) and match.group(1).isdigit() else None
        message = sentence[match.end():] if match else sentence.replace(str(path), "the config")
        located.append({"line": line, "key": key_at.get(line), "message": message})
    return located


def _problem(path: Path, key: str, message: str) -> dict[str, Any]:
    """A problem found by the board itself, at the line of ``key`` (if the config sets it)."""
    return {"line": _key_lines(path).get(key), "key": key, "message": message}


def _key_lines(path: Path) -> dict[str, int]:
    """Each top-level key's line, as the config loader reads them; none when the file is not a YAML mapping."""
    from ftkit.config.loading import read_yaml_mapping

    try:
        return read_yaml_mapping(path)[1]
    except FtkitError:
        return {}
