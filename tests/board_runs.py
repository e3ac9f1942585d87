"""Run folders written in the format ``ftkit train`` writes (``ftkit.run_files``): the board's tests and
``bench/board_load.py`` use them where a real training run would only cost time (the real runs are in the
tests that launch ``ftkit train`` from the page)."""

from __future__ import annotations

import json
import math
import os
import socket
import time
from pathlib import Path
from typing import Any

import yaml

from ftkit.run_files import RUN_CONFIG_FILE, RUN_RESULTS_FILE, RUN_STATUS_FILE, TRAINER_LOG_FILE


def log_record(step: int) -> dict[str, Any]:
    """The line ``ftkit train`` logs at ``step`` (a smoothly falling loss, a cosine learning rate)."""
    return {"step": step, "epoch": round(step / 50, 4), "loss": round(2.0 * math.exp(-step / 400) + 0.3 + 0.01 *
                                                                       math.sin(step), 6),
            "learning_rate": 1e-4 * 0.5 * (1 + math.cos(math.pi * min(step / 10000, 1))),
            "grad_norm": round(1 + 0.5 * math.cos(step / 7), 6), "tokens_per_second": 250.0,
            "elapsed_seconds": round(step * 0.5, 2)}


def append_log(folder: Path, steps: range, *, eval_every: int = 0) -> list[dict[str, Any]]:
    """Append the log lines of ``steps`` (and an eval line every ``eval_every`` steps); returns them."""
    records = []
    for step in steps:
        records.append(log_record(step))
        if eval_every and step % eval_every == 0:
            records.append({"step": step, "eval_loss": round(log_record(step)["loss"] + 0.1, 6),
                            "elapsed_seconds": step * 0.5})
    with open(folder / TRAINER_LOG_FILE, "a", encoding="utf-8") as log:
        log.write("".join(json.dumps(record) + "\n" for record in records))
    return records


def write_status(folder: Path, status: str, *, pid: int | None = None, step: int = 0,
                 max_steps: int | None = None, message: str | None = None, heartbeat_age: float = 0) -> None:
    now = time.time()
    (folder / RUN_STATUS_FILE).write_text(json.dumps({
        "status": status, "pid": pid if pid is not None else os.getpid(), "host": socket.gethostname(),
        "started": now - 600, "heartbeat": now - heartbeat_age, "ended": None if status == "running" else now,
        "step": step,
        "max_steps": max_steps, "message": message}) + "\n")


def write_run(folder: Path, *, steps: int = 20, status: str = "finished", pid: int | None = None,
              config: dict[str, Any] | None = None, eval_every: int = 0) -> Path:
    """A run folder: resolved config, ``steps`` log lines, status, and results when finished."""
    folder.mkdir(parents=True, exist_ok=True)
    resolved = {"model_name_or_path": "smollm2-135m-instruct", "stage": "sft", "finetuning_type": "lora",
                "dataset": ["identity"], "learning_rate": 1e-4, "lora_rank": 8, "output_dir": str(folder),
                **(config or {})}
    (folder / RUN_CONFIG_FILE).write_text(yaml.safe_dump(resolved, sort_keys=False))
    append_log(folder, range(1, steps + 1), eval_every=eval_every)
    write_status(folder, status, pid=pid, step=steps, max_steps=steps)
    if status == "finished":
        (folder / RUN_RESULTS_FILE).write_text(json.dumps({
            "train_loss": log_record(steps)["loss"], "global_step": steps, "tokens_per_second": 250.0,
            "total_seconds": steps * 0.5, "general_answers_kept": 20, "general_answers_base_right": 21,
            "learned_answers": 35, "learned_checked": 40}))
    return folder
