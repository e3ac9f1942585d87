"""What a run shows and records while it trains: a progress bar, trainer_log.jsonl, the loss plot."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm
from transformers import TrainerCallback

from ftkit.paths import atomic_write_text
from ftkit.run_files import LOSS_PLOT_FILE as PLOT_FILE
from ftkit.run_files import TRAINER_LOG_FILE as LOG_FILE
from ftkit.run_files import parse_log_lines


class ProgressAndLogCallback(TrainerCallback):
    """A progress bar with loss and tokens/s, and one JSON line per logging step in trainer_log.jsonl."""

    def __init__(self, output_dir: Path, tokens_seen: Callable[[], int],
                 horizon: Callable[[int], int] | None = None) -> None:
        """``horizon(step)``: the step the run is planned to reach from ``step`` when that is less than its
        ``max_steps`` (``num_train_epochs: auto``: the end of the current round); the bar's total follows it."""
        self.log_path = Path(output_dir) / LOG_FILE
        self.tokens_seen = tokens_seen
        self.horizon = horizon
        self.bar: tqdm | None = None
        self.started = time.perf_counter()
        self.last_time = self.started
        self.last_tokens = 0
        self.last_loss: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        total = self.horizon(state.global_step) if self.horizon else state.max_steps
        self.bar = tqdm(total=total, initial=state.global_step, desc="train", unit="step",
                        dynamic_ncols=True, leave=True)
        self.started = self.last_time = time.perf_counter()
        self.last_tokens = self.tokens_seen()

    def on_step_begin(self, args, state, control, **kwargs):
        if self.bar is not None and self.horizon and state.global_step >= self.bar.total:
            self.bar.total = self.horizon(state.global_step)  # a next round has begun
            self.bar.refresh()

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs: dict[str, Any] | None = None, **kwargs):
        logs = logs or {}
        now, tokens = time.perf_counter(), self.tokens_seen()
        rate = (tokens - self.last_tokens) / max(now - self.last_time, 1e-9)
        self.last_time, self.last_tokens = now, tokens
        if "loss" in logs:
            self.last_loss = float(logs["loss"])
            record = {
                "step": state.global_step, "epoch": round(float(logs.get("epoch", state.epoch or 0)), 4),
                "loss": round(float(logs["loss"]), 6), "learning_rate": logs.get("learning_rate"),
                "grad_norm": _round(logs.get("grad_norm")), "tokens_per_second": round(rate, 1),
                "elapsed_seconds": round(now - self.started, 2),
            }
            self._append(record)
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['learning_rate']:.2e}",
                                     tok_s=f"{rate:.0f}", refresh=False)
        elif "eval_loss" in logs:
            self._append({"step": state.global_step, "eval_loss": round(float(logs["eval_loss"]), 6),
                          "elapsed_seconds": round(now - self.started, 2)})

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()

    def _append(self, record: dict[str, Any]) -> None:
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def _round(value: Any) -> float | None:
    return None if value is None else round(float(value), 6)


def truncate_log(output_dir: Path, last_step: int) -> None:
    """On resume: drop log lines written after the checkpoint, so the log matches the resumed run."""
    path = Path(output_dir) / LOG_FILE
    if not path.is_file():
        return
    kept = [json.dumps(record) for record in read_log(output_dir) if record.get("step", 0) <= last_step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def read_log(output_dir: Path) -> list[dict[str, Any]]:
    """The records of trainer_log.jsonl; a line cut short by a killed run is skipped."""
    path = Path(output_dir) / LOG_FILE
    if not path.is_file():
        return []
    return list(parse_log_lines(path.read_bytes()))


def plot_loss(output_dir: Path) -> Path | None:
    """Draw training_loss.png (training loss per step, with a smoothed line, and eval loss if any)."""
    records = read_log(output_dir)
    steps = [r["step"] for r in records if "loss" in r]
    losses = [r["loss"] for r in records if "loss" in r]
    if not steps:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4), dpi=110)
    axis.plot(steps, losses, color="#9db4d6", linewidth=1, label="training loss")
    if len(losses) >= 5:
        smoothed, value = [], losses[0]
        for loss in losses:
            value = 0.8 * value + 0.2 * loss
            smoothed.append(value)
        axis.plot(steps, smoothed, color="#1f4e8c", linewidth=2, label="smoothed")
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if evals:
        axis.plot(*zip(*evals, strict=True), "o-", color="#d1495b", label="eval loss")
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.set_title(f"training loss: {Path(output_dir).name}")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    path = Path(output_dir) / PLOT_FILE
    tmp = path.with_name(".training_loss.tmp.png")
    figure.savefig(tmp)
    plt.close(figure)
    tmp.replace(path)
    return path
