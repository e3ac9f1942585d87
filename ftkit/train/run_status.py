"""``ftkit_status.json``: what a run is doing, kept current while it trains (the format: ``ftkit.run_files``).

Written atomically by rank 0 at three moments: "running" when training starts (``RunFolder.start``), a
heartbeat with the current step every ``HEARTBEAT_S`` seconds from a daemon thread (so the heartbeat
continues through long evaluations and the checks after training), and the end: "finished", "failed"
with the error's sentence, or "interrupted" (Ctrl-C, SIGTERM). A SIGKILL leaves "running" with a process
id that no longer exists; readers such as ``ftkit board`` report that as interrupted.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from ftkit.errors import FtkitError
from ftkit.paths import atomic_write_text
from ftkit.run_files import HEARTBEAT_S, RUN_STATUS_FILE, read_run_status


class RunStatus:
    """The status file of one run while this process trains it."""

    def __init__(self, output_dir: Path) -> None:
        self.path = Path(output_dir) / RUN_STATUS_FILE
        self.record: dict[str, Any] = {"status": "running", "pid": os.getpid(), "host": socket.gethostname(),
                                       "started": round(time.time(), 3), "heartbeat": None, "ended": None,
                                       "step": 0, "max_steps": None, "message": None}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Write "running" and start the heartbeat."""
        self._write()
        self._thread = threading.Thread(target=self._beat, name="ftkit-heartbeat", daemon=True)
        self._thread.start()

    def progress(self, step: int, max_steps: int | None) -> None:
        """The step reached (written with the next heartbeat)."""
        with self._lock:
            self.record["step"], self.record["max_steps"] = int(step), max_steps

    def end(self, error: BaseException | None = None) -> None:
        """Stop the heartbeat and write how the run ended: finished (no error), interrupted or failed."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            if error is None:
                self.record["status"] = "finished"
            elif isinstance(error, (KeyboardInterrupt, SystemExit)):
                self.record["status"], self.record["message"] = "interrupted", _interruption(error)
            else:
                self.record["status"], self.record["message"] = "failed", _sentence(error)
            self.record["ended"] = round(time.time(), 3)
        self._write()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self._write()

    def _write(self) -> None:
        with self._lock:
            self.record["heartbeat"] = round(time.time(), 3)
            text = json.dumps(self.record) + "\n"
            # a folder deleted under the run is not created again (that would leave a run of one file)
            with contextlib.suppress(OSError):  # the folder went away or filled up: the run reports what matters
                atomic_write_text(self.path, text, create_parent=False)


def record_failure(output_dir: Path, message: str) -> None:
    """A multi-process run whose other process failed: the launcher corrects rank 0's "interrupted" (it was
    stopped by the launcher) to "failed" with the launcher's sentence."""
    status = read_run_status(output_dir)
    if status is None or status["status"] not in ("running", "interrupted"):
        return
    status.update(status="failed", message=message, ended=round(time.time(), 3))
    with contextlib.suppress(OSError):
        atomic_write_text(Path(output_dir) / RUN_STATUS_FILE, json.dumps(status) + "\n", create_parent=False)


def _interruption(error: BaseException) -> str:
    if isinstance(error, KeyboardInterrupt):
        return "stopped with Ctrl-C"
    return "stopped by a signal (SIGTERM)" if error.code == 128 + 15 else f"stopped (exit status {error.code})"


def _sentence(error: BaseException) -> str:
    """The user's sentence for an FtkitError; the exception's type and first line otherwise."""
    if isinstance(error, FtkitError):
        return str(error)
    first = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first}" if first else type(error).__name__
