"""The names of the files a run leaves in its folder, and reading peft's adapter_config.json: one owner.

``ftkit train`` writes them, ``ftkit merge-lora`` reads them to describe an adapter, ``ftkit evaluate``
writes its results beside them, ``ftkit board`` lists and watches them; every module names them, reads a
status or a log, and asks whether a recorded process still runs through this one.

``ftkit_status.json`` says what a run is doing, so nothing has to guess it from timestamps:
``{"status": "running" | "finished" | "failed" | "interrupted", "pid", "host", "started", "heartbeat",
"ended", "step", "max_steps", "message"}`` (times in seconds since the epoch). Rank 0 writes it atomically
when training starts, every ``HEARTBEAT_S`` seconds while it runs (the heartbeat) and when it ends; a run
killed with SIGKILL leaves "running" behind with a process id that no longer exists (or, after a restart,
one reused by another program, but then with a heartbeat that has stopped), which readers report as
interrupted.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

RUN_CONFIG_FILE = "ftkit_config.yaml"  # the resolved config of the run (rerun it as is)
RUN_RESULTS_FILE = "train_results.json"  # final metrics; its presence marks a finished run
TRAINER_LOG_FILE = "trainer_log.jsonl"  # one JSON line per logging step
ADALORA_STATE_FILE = "adalora_state.pt"  # in a checkpoint of an AdaLoRA run: full-rank weights, scores
LOSS_PLOT_FILE = "training_loss.png"
ADAPTER_CONFIG_FILE = "adapter_config.json"  # peft's; marks a LoRA adapter folder
RUN_STATUS_FILE = "ftkit_status.json"  # what the run is doing now (see above)
RUN_STATES = ("running", "finished", "failed", "interrupted")
HEARTBEAT_S = 5.0  # how often a running run rewrites its status
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
CHECKPOINT_MANIFEST = "ftkit_checkpoint.json"  # inside checkpoint-N: its files' sizes and checksums, written last
EVALUATION_RESULTS_FILE = "results.json"  # ftkit evaluate's scores (beside it: samples.jsonl)


def read_adapter_config(adapter_dir: str | Path) -> dict[str, Any] | None:
    """peft's ``adapter_config.json`` in ``adapter_dir`` as a dict; None when it is missing or not a JSON object."""
    try:
        config = json.loads((Path(adapter_dir) / ADAPTER_CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def read_run_status(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's ``ftkit_status.json``; None when it is missing, half-written or not a status."""
    try:
        return run_status_from_text((Path(run_dir) / RUN_STATUS_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        return None


def run_status_from_text(text: str) -> dict[str, Any] | None:
    """A status file's text as a dict; None when it is half-written or not a status."""
    try:
        status = json.loads(text)
    except ValueError:
        return None
    if not isinstance(status, dict) or status.get("status") not in RUN_STATES:
        return None
    return status


def parse_log_lines(data: bytes) -> Iterator[dict[str, Any]]:
    """The records of ``trainer_log.jsonl`` text; a line cut short by a killed run, or garbled, is skipped."""
    for line in data.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            yield record


def process_is_running(pid: Any) -> bool:
    """Whether process ``pid`` exists on this host and has not finished (a zombie waiting for its parent has)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0 checks without sending anything
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc (macOS): the signal said it exists
