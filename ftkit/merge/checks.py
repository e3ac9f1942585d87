"""What merge-lora refuses beyond any export's checks (``ftkit.export.checks``), as early as it can be known.

An adapter trained on another base (architecture, hidden size or name), before any model is loaded. An
adapter listed twice is refused by ``ftkit.models.source.refuse_repeated_adapters``; shapes and ranks by
``ftkit.models.saved_adapters.check_adapter_matches`` as each adapter loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ftkit.errors import FtkitError
from ftkit.models import ModelSource, adapter_base_name
from ftkit.models.source import model_identity


def check_adapter_base(adapter_dir: Path, model_name: str, source: ModelSource, trained_on: str | None) -> None:
    """The adapter must have been trained on this base: same architecture, hidden size and model name.

    The recorded base is ``base_model_name_or_path`` (adapter_config.json) and the training config's
    ``model_name_or_path``. Names match when they are the same directory or name the same model
    (``HuggingFaceTB/SmolLM2-135M-Instruct``, a hub-cache snapshot of it and ``smollm2-135m-instruct``
    do); architecture and hidden size are compared when the recorded base's config.json is on disk.
    """
    recorded = adapter_base_name(adapter_dir)
    base_config = _read_config(source.path / "config.json") if not source.gguf_file else None
    recorded_config = _read_config(Path(recorded).expanduser() / "config.json") if recorded else None
    if base_config and recorded_config:
        ours, theirs = _architecture(base_config), _architecture(recorded_config)
        if ours and theirs and ours != theirs:
            raise FtkitError(f"Adapter {adapter_dir} was trained on a {theirs} ({recorded}) but model_name_or_path "
                             f"{model_name} is a {ours}; pass the adapter's base model as model_name_or_path.")
        ours_size, theirs_size = _hidden_size(base_config), _hidden_size(recorded_config)
        if ours_size and theirs_size and ours_size != theirs_size:
            raise FtkitError(f"Adapter {adapter_dir} was trained on a model with hidden size {theirs_size} "
                             f"({recorded}) but model_name_or_path {model_name} has hidden size {ours_size}; pass "
                             "the adapter's base model as model_name_or_path.")
    names = [name for name in (recorded, trained_on) if name]
    if names and not any(_same_model(name, model_name, source.path) for name in names):
        raise FtkitError(f"Adapter {adapter_dir} was trained on '{names[0]}' but model_name_or_path is "
                         f"'{model_name}'; pass that base (if it is the same model under another name, set "
                         f"base_model_name_or_path in {adapter_dir / 'adapter_config.json'} to '{model_name}').")


def _same_model(recorded: str, model_name: str, model_path: Path) -> bool:
    recorded_path = Path(recorded).expanduser()
    if recorded_path.exists() and recorded_path.resolve() == model_path.resolve():
        return True
    return model_identity(recorded) in {model_identity(model_name), model_identity(str(model_path))}


def _read_config(path: Path) -> dict[str, Any] | None:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def _architecture(config: dict[str, Any]) -> str | None:
    architectures = config.get("architectures")
    if isinstance(architectures, list) and architectures:
        return str(architectures[0])
    return str(config["model_type"]) if config.get("model_type") else None


def _hidden_size(config: dict[str, Any]) -> int | None:
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    for key in ("hidden_size", "n_embd", "d_model"):
        if isinstance(text.get(key), int):
            return text[key]
    return None
