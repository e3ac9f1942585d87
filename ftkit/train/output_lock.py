"""One run per output_dir at a time: a lock file holding the process id and host of the run that owns it.

``output_dir/.ftkit-lock`` is created with ``O_CREAT | O_EXCL`` (only one process can create it) and
holds ``{"pid", "host", "started"}``. A second run finds it and is refused, naming the process. A lock
whose process is gone (a run killed with SIGKILL, a lost machine) is stale: the next run on the same host
takes it over and says so. On another host the process cannot be checked, so the lock is only reported.
The lock is removed when the run ends, however it ends (``release`` runs in a ``finally``; SIGTERM is
turned into an exit by ``ftkit.train.output_dir`` so it runs then too).

Written here rather than with ``filelock``: its locks say nothing about who holds them, and the message
a user needs is which process to wait for.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ftkit.errors import FtkitError
from ftkit.run_files import process_is_running
from ftkit.train.checkpoints import LOCK_FILE

_HALF_WRITTEN_GRACE_S = 5.0  # a lock with no readable holder younger than this is being written right now


@dataclass(frozen=True)
class RunLock:
    """A held lock: ``release`` removes the file if it still names this process."""

    path: Path
    pid: int

    def release(self) -> None:
        """Remove the lock file if this process still holds it."""
        holder = _read_holder(self.path)
        if holder is not None and holder.get("pid") == self.pid and holder.get("host") == socket.gethostname():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


def acquire_run_lock(output_dir: Path, report: Callable[[str], None]) -> RunLock:
    """Take ``output_dir``'s lock (the folder must exist); reclaim a stale one with a note, refuse a live one."""
    path = output_dir / LOCK_FILE
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(3):  # a stale lock is removed, then taken like a free one (another run may be quicker)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            _remove_if_stale(path, output_dir, report)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as lock_file:
            lock_file.write(json.dumps(me) + "\n")
            lock_file.flush()
            os.fsync(lock_file.fileno())
        return RunLock(path, me["pid"])
    raise FtkitError(f"output_dir {output_dir} is being claimed by other ftkit runs at the same moment ({path} keeps "
                     "reappearing); start one run per output_dir.")


def _remove_if_stale(path: Path, output_dir: Path, report: Callable[[str], None]) -> None:
    """Remove the lock at ``path`` if its process is gone; raise FtkitError naming the holder otherwise."""
    holder = _read_holder(path)
    if holder is None:
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return  # released meanwhile
        if age < _HALF_WRITTEN_GRACE_S:
            raise FtkitError(f"output_dir {output_dir} is being claimed by another ftkit run right now ({path}); wait "
                             "for it to finish or choose another output_dir.")
        report(f"note: {path} names no process (a run was killed while taking it); taking it over")
    else:
        pid, host = holder.get("pid"), holder.get("host")
        if host != socket.gethostname():
            raise FtkitError(f"output_dir {output_dir} is locked by process {pid} on host {host} ({path}); wait for "
                             "that run to finish, or delete the lock file if no ftkit run is using the folder.")
        if process_is_running(pid):
            raise FtkitError(f"output_dir {output_dir} is in use by another ftkit run (process {pid}, started "
                             f"{holder.get('started', 'at an unknown time')}); wait for it to finish or choose another "
                             f"output_dir (if process {pid} is not an ftkit run, delete {path}).")
        report(f"note: output_dir {output_dir} was locked by process {pid}, which is no longer running (the run was "
               "killed); taking the lock over")
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _read_holder(path: Path) -> dict | None:
    """The lock's ``{"pid", "host", ...}``, or None when it is missing, empty or garbled."""
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(holder, dict) or not isinstance(holder.get("pid"), int) or not isinstance(holder.get("host"), str):
        return None
    return holder
