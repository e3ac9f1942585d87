"""A model's module tree read from its config.json without loading weights, and the config checks it allows.

``ftkit validate`` (and ``train`` and ``data preview`` before they start) checks ``lora_target`` and the
``freeze_*`` keys against the model's real module names. The model is built on the meta device from its
config.json (shapes, no storage: about a second for any size), and the same functions that decide what
trains at load time (``find_lora_targets``, ``apply_freeze``) judge it, so validate and train agree.

Only a model whose config.json is already on this machine is checked: a local directory, the embedded
model once converted, or a Hugging Face hub id in the local cache. A hub id not in the cache, a ModelScope
id, a ``.gguf`` file or a model that needs its own code (``trust_remote_code``) is skipped quietly; the
loader checks it when the run loads the model.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ftkit.config.sections import ModelSection, Problem, problem_from_sentence
from ftkit.config.stages import TrainConfig
from ftkit.errors import FtkitError
from ftkit.models.adapters import apply_freeze, find_lora_targets
from ftkit.models.embedded import EMBEDDED_ALIAS, embedded_model_dir
from ftkit.models.source import MODELSCOPE_PREFIX, wants_modelscope

CONFIG_FILE = "config.json"


def local_config_dir(section: ModelSection) -> Path | None:
    """The folder on this machine holding the model's config.json, found without downloading; None if none."""
    name = section.model_name_or_path.strip()
    if name.lower() == EMBEDDED_ALIAS:
        folder = embedded_model_dir()
        return folder if (folder / CONFIG_FILE).is_file() else None
    if name.startswith(MODELSCOPE_PREFIX) or wants_modelscope(name, section.use_modelscope):
        return None
    path = Path(name).expanduser()
    if path.is_dir():
        return path if (path / CONFIG_FILE).is_file() else None
    if path.exists():  # a file (.gguf, or a mistake the loader explains)
        return None
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(name, CONFIG_FILE, cache_dir=section.cache_dir, revision=section.model_revision)
    except ValueError:  # not a valid repo id
        return None
    return Path(cached).parent if isinstance(cached, str) else None


def empty_model(config_dir: Path) -> nn.Module | None:
    """The model described by ``config_dir/config.json``, built on the meta device (no weights, no memory).

    None when transformers cannot build it without running the model's own code or at all; loading the
    model then reports why.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(config_dir), trust_remote_code=False)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except Exception:  # noqa: BLE001 - an advisory check: whatever stops it here, the real load reports properly
        return None


def training_target_problems(config: TrainConfig) -> list[Problem]:
    """``lora_target`` (new LoRA/QLoRA adapters) or the ``freeze_*`` keys checked against the model's modules.

    Empty when they match, or when the model is not on this machine (see the module docstring).
    """
    if not config.names_model_modules:  # full fine-tuning, or continued adapters (they keep their targets)
        return []
    folder = local_config_dir(config)
    model = empty_model(folder) if folder is not None else None
    if model is None:
        return []
    try:
        if config.uses_lora:
            find_lora_targets(model, config.lora_target, modules_to_save=config.additional_target)
        else:
            apply_freeze(model, trainable_layers=config.freeze_trainable_layers,
                         trainable_modules=config.freeze_trainable_modules, extra_modules=config.freeze_extra_modules)
    except FtkitError as error:
        return [problem_from_sentence(str(error), type(config).model_fields, "finetuning_type")]
    return []
