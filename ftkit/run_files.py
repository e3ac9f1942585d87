"""The names of the files a run leaves in its folder, and reading peft's adapter_config.json: one owner.

``ftkit train`` writes them, ``ftkit merge-lora`` reads them to describe an adapter, and later stages
(evaluate, board) will list them; every module names them through this one.
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


def read_adapter_config(adapter_dir: str | Path) -> dict[str, Any] | None:
    """peft's ``adapter_config.json`` in ``adapter_dir`` as a dict; None when it is missing or not a JSON object."""
    try:
        config = json.loads((Path(adapter_dir) / ADAPTER_CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None
