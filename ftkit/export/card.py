"""What the export says about itself: the adapter's training summary and the README.md model card.

``ftkit train`` leaves ``ftkit_config.yaml`` (the resolved training config) and ``train_results.json``
next to each adapter; adapters trained elsewhere have only peft's ``adapter_config.json``, and the card
then says what that file tells.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ftkit.run_files import RUN_CONFIG_FILE, RUN_RESULTS_FILE, read_adapter_config


@dataclass(frozen=True)
class AdapterTraining:
    """How one adapter was trained, as far as its directory records it."""

    directory: Path
    config: dict[str, Any] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    peft: dict[str, Any] = field(default_factory=dict)

    @property
    def quantization_bits(self) -> int | None:
        """4 or 8 when the adapter was trained on a quantized base (QLoRA), else None."""
        bits = self.config.get("quantization_bit")
        if bits is None and self.config.get("finetuning_type") == "qlora":
            return 4
        return int(bits) if isinstance(bits, int) else None

    @property
    def base_name(self) -> str | None:
        """``model_name_or_path`` of the training config (None for adapters trained elsewhere)."""
        name = self.config.get("model_name_or_path")
        return str(name) if name else None

    @property
    def template(self) -> str | None:
        name = self.config.get("template")
        return str(name) if name else None

    def summary(self) -> str:
        """One line: method, rank, targets, data, schedule and final loss (what is known of them)."""
        rank = self.config.get("lora_rank", self.peft.get("r"))
        alpha = self.config.get("lora_alpha") or self.peft.get("lora_alpha")
        targets = self.config.get("lora_target") or self.peft.get("target_modules")
        if isinstance(targets, list) and not self.config.get("lora_target"):
            targets = sorted(targets)  # peft stores a set
        method = self.config.get("finetuning_type", "lora")
        if self.quantization_bits and method != "qlora":
            method = f"qlora ({self.quantization_bits}-bit base)"
        parts = [f"{self.config.get('stage', 'sft')} {method}" if self.config else "LoRA"]
        parts.append(f"rank {rank}, alpha {alpha}" if rank else "")
        if targets:
            parts.append(f"targets {_join(targets)}")
        if self.config.get("dataset"):
            parts.append(f"data {_join(self.config['dataset'])}")
        epochs, rate = self.config.get("num_train_epochs"), self.config.get("learning_rate")
        if epochs == "auto":  # the epochs it took are in the results
            epochs = self.results.get("epoch")
        if isinstance(epochs, (int, float)) and isinstance(rate, (int, float)):
            parts.append(f"{epochs:g} epochs at learning rate {rate:g}")
        if isinstance(self.results.get("train_loss"), (int, float)):
            steps = self.results.get("global_step")
            parts.append(f"final train loss {self.results['train_loss']:.4f}" + (f" after {steps} steps" if steps else ""))
        return "; ".join(part for part in parts if part)


def read_adapter_training(adapter_dir: Path) -> AdapterTraining:
    """Read what ``adapter_dir`` records about its training; unreadable files count as absent."""
    config = _read(adapter_dir / RUN_CONFIG_FILE, yaml.safe_load)
    results = _read(adapter_dir / RUN_RESULTS_FILE, json.loads)
    peft = read_adapter_config(adapter_dir) or {}
    return AdapterTraining(adapter_dir, config, results, peft)


def model_card(
    *,
    base: str,
    adapters: list[AdapterTraining],
    dtype_name: str,
    shards: int,
    template_origin: str,
    verification: str,
    today: _dt.date | None = None,
) -> str:
    """README.md for the export: base, adapters with their training summary, merge date and self-check."""
    today = today or _dt.datetime.now(_dt.timezone.utc).date()
    lines = [
        "---",
        f"base_model: {json.dumps(base)}",
        "library_name: transformers",
        "tags: [ftkit, lora, merged]",
        "---",
        "",
        "# Merged model",
        "",
        f"LoRA adapter{'s' if len(adapters) > 1 else ''} merged into `{base}` by `ftkit merge-lora` on "
        f"{today.isoformat()} (UTC).",
        "",
        f"- **Base model:** `{base}`",
        f"- **Adapters (merged in this order):** {', '.join(f'`{a.directory}`' for a in adapters)}",
        f"- **Weights:** {dtype_name} safetensors, {shards} shard{'s' if shards > 1 else ''}",
        f"- **Chat template:** {template_origin}",
        f"- **Self-check:** {verification}",
        "",
        "## Training",
        "",
    ]
    for adapter in adapters:
        lines.append(f"- `{adapter.directory}`: {adapter.summary()}")
        if adapter.quantization_bits:
            lines.append(f"  (trained with QLoRA on a {adapter.quantization_bits}-bit base; merged into the "
                         "full-precision base weights)")
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'model = AutoModelForCausalLM.from_pretrained("path/to/this/directory")',
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/directory")',
        "```",
        "",
        "or `ftkit chat --model path/to/this/directory`.",
        "",
    ]
    return "\n".join(lines)


def _read(path: Path, parse) -> dict[str, Any]:
    try:
        value = parse(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return {}
    return value if isinstance(value, dict) else {}


def _join(value: Any) -> str:
    return ", ".join(map(str, value)) if isinstance(value, (list, tuple, set)) else str(value)
