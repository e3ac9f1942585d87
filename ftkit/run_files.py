"""The names of the files a run leaves in its folder, and reading peft's adapter_config.json: one owner.

``ftkit train`` writes them, ``ftkit merge-lora`` reads them to describe an adapter, ``ftkit board`` lists
and watches them; every module names them through this one.

``ftkit_status.json`` says what a run is doing, so nothing has to guess it from timestamps:
``{"status": "running" | "finished" | "failed" | "interrupted", "pid", "host", "started", "heartbeat",
"ended", "step", "max_steps", "message"}`` (times in seconds since the epoch). Rank 0 writes it atomically
when training starts, every few seconds while it runs (the heartbeat) and when it ends; a run killed with
SIGKILL leaves "running" behind with a process id that no longer exists, which readers report as interrupted.
"""

from __future__ import annotations

import json
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
CHECKPOINT_MANIFEST = "ftkit_checkpoint.json"  # inside checkpoint-N: its files' sizes and checksums, written last


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
        status = json.loads((Path(run_dir) / RUN_STATUS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(status, dict) or status.get("status") not in RUN_STATES:
        return None
    return status
