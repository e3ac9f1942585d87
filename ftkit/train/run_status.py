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
from ftkit.run_files import RUN_STATUS_FILE

HEARTBEAT_S = 5.0


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
            if not self.path.parent.is_dir():
                return  # the run's folder was deleted under it: do not create it again
            with contextlib.suppress(OSError):  # the folder went away or filled up: the run reports what matters
                atomic_write_text(self.path, text)


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
