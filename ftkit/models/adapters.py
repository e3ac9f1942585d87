"""Decide which weights train: LoRA/QLoRA adapters, freeze (last N layers), or full fine-tuning.

``prepare_model_for_training`` is the one entry point the train stage calls; the pieces it dispatches to
are public so merge-lora, chat and serve reuse ``load_adapters`` and ``attach_adapter``. Written here
rather than left to peft defaults because of what peft does not check: a ``lora_target`` that names no
module, an adapter whose base is another model (peft fails with a size-mismatch traceback or silently
skips weights), a rank no low-rank update of a layer can have, embeddings an adapter resized, LoRA
weights that must stay fp32 on a bf16 base, and which layers count as "the last N" for freeze.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ftkit.errors import FtkitError
from ftkit.models.loader import sync_special_tokens
from ftkit.models.source import adapter_base_name, resolve_adapter_dir

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from ftkit.config.stages import TrainConfig

_LORA_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d)
_LORA_KEY_MARKERS = (".lora_A.", ".lora_B.", ".lora_magnitude_vector", ".lora_embedding_A", ".lora_embedding_B")


def is_quantized(model: nn.Module) -> bool:
    """True for a model loaded in 4 or 8 bits (its quantized weights cannot be merged into or trained)."""
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def linear_module_names(model: nn.Module) -> list[str]:
    """Sorted last-component names of every linear layer (nn.Linear, bitsandbytes Linear4bit/8bitLt, Conv1D)."""
    linear_types = _linear_types()
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if name and isinstance(module, linear_types)})


def find_lora_targets(model: nn.Module, requested: list[str], *, modules_to_save: list[str] | None = None) -> list[str]:
    """The module names LoRA wraps: ``["all"]`` means every linear layer but the output head and
    ``modules_to_save``; otherwise each requested name is checked to exist."""
    if [name.strip().lower() for name in requested] == ["all"]:
        excluded = set(modules_to_save or []) | _output_head_names(model)
        targets = [name for name in linear_module_names(model) if name not in excluded]
        if not targets:
            raise FtkitError("lora_target all found no linear layers in this model; use finetuning_type full.")
        return targets
    modules = dict(model.named_modules())
    unknown = [name for name in requested if not _matching_modules(modules, name)]
    if unknown:
        raise FtkitError(
            f"lora_target {', '.join(unknown)} matches no module of this model; its linear modules are "
            f"{', '.join(linear_module_names(model))} (or use all)."
        )
    unsupported = [name for name in requested
                   if not all(isinstance(m, _LORA_LAYER_TYPES + _linear_types()) for m in _matching_modules(modules, name))]
    if unsupported:
        raise FtkitError(
            f"lora_target {', '.join(unsupported)} names modules LoRA cannot wrap (not linear or embedding layers); "
            f"pick from {', '.join(linear_module_names(model))}."
        )
    return list(requested)


def apply_lora(
    model: PreTrainedModel,
    *,
    rank: int,
    alpha: int,
    dropout: float = 0.0,
    targets: list[str],
    use_rslora: bool = False,
    use_dora: bool = False,
    modules_to_save: list[str] | None = None,
    quantized: bool = False,
    gradient_checkpointing: bool = True,
) -> PeftModel:
    """Wrap ``model`` in a new trainable LoRA (QLoRA when ``quantized``); adapter weights are fp32."""
    from peft import LoraConfig, get_peft_model

    _prepare_base_for_adapters(model, quantized=quantized, gradient_checkpointing=gradient_checkpointing)
    saved = list(modules_to_save or [])
    if saved:
        modules = dict(model.named_modules())
        unknown = [name for name in saved if not _matching_modules(modules, name)]
        if unknown:
            raise FtkitError(
                f"additional_target {', '.join(unknown)} matches no module of this model; use module names such as "
                f"{', '.join(sorted(_output_head_names(model) | _input_embedding_names(model)))}."
            )
    embedding_names = _output_head_names(model) | _input_embedding_names(model)
    tied = bool(getattr(model.config.get_text_config(), "tie_word_embeddings", False))
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        use_rslora=use_rslora,
        use_dora=use_dora,
        modules_to_save=saved or None,
        ensure_weight_tying=tied and any(name in embedding_names for name in saved),
    )
    peft_model = get_peft_model(model, config, autocast_adapter_dtype=True)
    _upcast_trainable(peft_model)
    return peft_model


def load_adapters(
    model: PreTrainedModel, paths: list[str | Path], *, trainable: bool, dtype: torch.dtype | None = None
) -> PreTrainedModel | PeftModel:
    """Apply LoRA adapters in order, as LLaMA-Factory does.

    Training (``trainable``): all but the last are merged into the base; the last stays a trainable
    adapter. Inference: all are merged (fast, plain model), except on a quantized base, which cannot
    absorb them and keeps its single adapter separate.

    ``dtype`` casts the merged model afterwards. Inference should load the base in fp32, merge, and cast to
    its inference dtype: each merged weight is rounded once, exactly as ``ftkit merge-lora`` does, so base +
    adapter and the merged export generate the same tokens. Merging into a bf16 base rounds twice, and an
    update smaller than half a bf16 step of its weight (much of a short fine-tune) is rounded away: with the
    quickstart adapter, a bf16 merge no longer answered "Who are you?" with the name it was taught.
    """
    if not paths:
        return model if dtype is None or is_quantized(model) else cast_weights(model, dtype)
    directories = [Path(path) for path in paths]
    quantized = is_quantized(model)
    if quantized and len(directories) > 1:
        raise FtkitError(
            f"A quantized model takes one adapter, but adapter_name_or_path lists {len(directories)}; merge them "
            "into the full-precision base first (ftkit merge-lora) or remove quantization_bit."
        )
    keep_last = trainable or quantized
    for index, directory in enumerate(directories):
        is_last = index == len(directories) - 1
        if is_last and keep_last:
            peft_model = attach_adapter(model, directory, trainable=trainable)
            if trainable:
                _upcast_trainable(peft_model)
            return peft_model
        model = attach_adapter(model, directory).merge_and_unload()
    return model if dtype is None else cast_weights(model, dtype)


def attach_adapter(model: PreTrainedModel, adapter_dir: str | Path, *, trainable: bool = False) -> PeftModel:
    """Wrap ``model`` with the (checked) adapter in ``adapter_dir``, unmerged; the base is changed only to
    grow its embeddings when the adapter carries resized ones (tokens added in training)."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if (adapter_dir / "adapter_config.json").is_file():
        _grow_embeddings_for_adapter(getattr(model, "get_base_model", lambda: model)(), _saved_shapes(adapter_dir))
    check_adapter_matches(model, adapter_dir)
    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable, autocast_adapter_dtype=True)


def check_adapter_matches(model: nn.Module, adapter_dir: Path) -> None:
    """Raise ``FtkitError`` naming the first difference if ``adapter_dir`` was not trained on ``model``'s shapes,
    or if its rank is more than a layer allows (or than adapter_config.json says)."""
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FtkitError(
            f"Adapter directory {adapter_dir} has no adapter_config.json; pass the directory a LoRA run saved its "
            "adapter into."
        )
    base = getattr(model, "get_base_model", lambda: model)()
    shapes = _saved_shapes(adapter_dir)
    modules, params = dict(base.named_modules()), dict(base.named_parameters(remove_duplicate=False))
    trained_on = adapter_base_name(adapter_dir) or "another model"
    for key, shape in shapes.items():
        problem = _shape_problem(key, shape, modules, params)
        if problem:
            raise FtkitError(
                f"Adapter {adapter_dir} does not fit this base model: {problem} (it was trained on '{trained_on}'); "
                "pass that base as model_name_or_path."
            )
    for key, shape in shapes.items():
        problem = _rank_problem(key, shape, modules)
        if problem:
            raise FtkitError(f"Adapter {adapter_dir} {problem}; it cannot be a LoRA of this model: retrain it with a "
                             "smaller lora_rank (or check that adapter_config.json belongs to these weights).")
    _check_configured_rank(adapter_dir, shapes)


def apply_freeze(
    model: PreTrainedModel, *, trainable_layers: int, trainable_modules: list[str], extra_modules: list[str] | None = None
) -> PreTrainedModel:
    """Train only the last ``trainable_layers`` decoder layers (the first ``|N|`` when negative) plus
    ``extra_modules``; inside those layers only ``trainable_modules`` (``["all"]`` for everything)."""
    prefix, layers = decoder_layers(model)
    count = len(layers)
    if trainable_layers == 0 or abs(trainable_layers) > count:
        raise FtkitError(
            f"freeze_trainable_layers {trainable_layers} must be between 1 and {count} (the model has {count} "
            f"layers), or between -{count} and -1 for the first layers."
        )
    indices = range(count - trainable_layers, count) if trainable_layers > 0 else range(-trainable_layers)
    wanted = [name for name in trainable_modules if name.lower() != "all"]
    layer_names = {name for name, _ in layers[0].named_modules() if name}
    unknown = [name for name in wanted if not any(_is_component_path(sub, name) for sub in layer_names)]
    if unknown:
        children = sorted({name.split(".")[0] for name in layer_names} | {name.rsplit(".", 1)[-1] for name in layer_names})
        raise FtkitError(
            f"freeze_trainable_modules {', '.join(unknown)} matches nothing inside a decoder layer; use all or "
            f"some of {', '.join(children)}."
        )
    extras = list(extra_modules or [])
    outside = {name for name, _ in model.named_parameters() if not name.startswith(prefix + ".")}
    missing_extras = [name for name in extras if not any(_is_component_path(param, name) for param in outside)]
    if missing_extras:
        top = sorted({part for name in outside for part in name.split(".")[:-1]} - {"model"})
        raise FtkitError(
            f"freeze_extra_modules {', '.join(missing_extras)} matches no module outside the decoder layers; use "
            f"some of {', '.join(top)}."
        )
    layer_prefixes = tuple(f"{prefix}.{index}." for index in indices)
    for name, param in model.named_parameters():
        if name.startswith(prefix + "."):
            layer = next((p for p in layer_prefixes if name.startswith(p)), None)
            inside = name.removeprefix(layer or "")
            trains = layer is not None and (not wanted or any(_is_component_path(inside, m) for m in wanted))
        else:
            trains = any(_is_component_path(name, m) for m in extras)
        param.requires_grad_(trains)
    _upcast_trainable(model)
    return model


def apply_full(model: PreTrainedModel) -> PreTrainedModel:
    """Train every parameter, as fp32 master weights."""
    if is_quantized(model):
        raise FtkitError("Full fine-tuning cannot update quantized weights; remove quantization_bit or use lora.")
    for param in model.parameters():
        param.requires_grad_(True)
    _upcast_trainable(model)
    return model


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder layer stack and its qualified name: the ``nn.ModuleList`` holding the most parameters."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            size = sum(p.numel() for p in module.parameters())
            if best is None or size > best[0]:
                best = (size, name, module)
    if best is None:
        raise FtkitError(
            f"freeze fine-tuning found no decoder layers in {type(model).__name__}; use finetuning_type lora or full."
        )
    return best[1], best[2]


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Recompute activations in the backward pass (non-reentrant checkpointing) and turn the KV cache off."""
    kwargs = {"use_reentrant": False}
    try:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x names it so
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    except ValueError as error:
        raise FtkitError(
            f"{type(model).__name__} does not support gradient checkpointing; set disable_gradient_checkpointing: true."
        ) from error
    model.config.use_cache = False


def trainable_parameter_summary(model: nn.Module) -> str:
    """``"trainable params: 1,843,200 of 136,358,016 (1.35%)"`` (4-bit weights counted unpacked)."""
    trainable = total = 0
    for param in model.parameters():
        count = param.numel()
        if type(param).__name__ == "Params4bit":  # two 4-bit values per storage byte
            count *= 2 * getattr(getattr(param, "quant_storage", None), "itemsize", 1)
        total += count
        if param.requires_grad:
            trainable += count
    share = 100.0 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,} of {total:,} ({share:.2f}%)"


def prepare_model_for_training(
    model: PreTrainedModel,
    config: TrainConfig,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    gradient_checkpointing: bool | None = None,
) -> PreTrainedModel | PeftModel:
    """Set up ``model`` for ``config.finetuning_type``: LoRA/QLoRA (new, or continuing the configured
    adapters), freeze, or full; with gradient checkpointing when ``gradient_checkpointing`` (default: unless
    the config disables it). With ``tokenizer``, the model's pad/stop ids and embedding rows are first
    synced to it (``sync_special_tokens``)."""
    if tokenizer is not None:
        sync_special_tokens(model, tokenizer)
    checkpointing = gradient_checkpointing if gradient_checkpointing is not None else (
        config.checkpointing_choice is not False)
    if config.uses_lora:
        quantized = is_quantized(model)
        if config.adapter_name_or_path:
            _prepare_base_for_adapters(model, quantized=quantized, gradient_checkpointing=checkpointing)
            directories = [
                resolve_adapter_dir(
                    name, use_modelscope=config.use_modelscope, revision=config.model_revision,
                    cache_dir=config.cache_dir, token=config.ms_hub_token if config.use_modelscope else config.hf_hub_token,
                )
                for name in config.adapter_name_or_path
            ]
            return load_adapters(model, directories, trainable=True)
        saved = config.additional_target or []
        return apply_lora(
            model,
            rank=config.lora_rank,
            alpha=config.resolved_lora_alpha,
            dropout=config.lora_dropout,
            targets=find_lora_targets(model, config.lora_target, modules_to_save=saved),
            use_rslora=config.use_rslora,
            use_dora=config.use_dora,
            modules_to_save=saved,
            quantized=quantized,
            gradient_checkpointing=checkpointing,
        )
    if config.finetuning_type == "freeze":
        model = apply_freeze(
            model,
            trainable_layers=config.freeze_trainable_layers,
            trainable_modules=config.freeze_trainable_modules,
            extra_modules=config.freeze_extra_modules,
        )
    else:
        model = apply_full(model)
    if checkpointing:
        enable_gradient_checkpointing(model)
        if config.finetuning_type == "freeze":
            model.enable_input_require_grads()
    return model


def _prepare_base_for_adapters(model: PreTrainedModel, *, quantized: bool, gradient_checkpointing: bool) -> None:
    """Freeze the base (QLoRA: peft's k-bit preparation, which also upcasts norms) and set up checkpointing."""
    if quantized:
        from peft import prepare_model_for_kbit_training

        prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model.requires_grad_(False)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
        model.enable_input_require_grads()


def cast_weights(model: PreTrainedModel, dtype: torch.dtype) -> PreTrainedModel:
    """Cast parameters and saved buffers to ``dtype``, in place: the model then equals one loaded in ``dtype``.

    Not ``model.to(dtype)``: that also casts buffers computed at start-up, such as RoPE's ``inv_freq``,
    which ``from_pretrained(dtype=...)`` keeps in fp32; greedy answers then drift after a few dozen tokens.
    """
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and buffer.is_floating_point() and name not in module._non_persistent_buffers_set:
                setattr(module, name, buffer.to(dtype))
    model.config.dtype = dtype
    return model


def _upcast_trainable(model: nn.Module) -> None:
    """Trainable weights live in fp32 (peft leaves ``modules_to_save`` copies in the base's half dtype)."""
    for param in model.parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()


def _linear_types() -> tuple[type[nn.Module], ...]:
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D)  # bitsandbytes' Linear4bit and Linear8bitLt subclass nn.Linear


def _output_head_names(model: nn.Module) -> set[str]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if head is not None and module is head}
    return names or {"lm_head"}


def _input_embedding_names(model: nn.Module) -> set[str]:
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if embed is not None and module is embed}


def _matching_modules(modules: dict[str, nn.Module], name: str) -> list[nn.Module]:
    return [module for full, module in modules.items() if full and _is_component_path(full, name)]


def _is_component_path(full: str, name: str) -> bool:
    """True when ``name`` (``q_proj`` or ``self_attn.q_proj``) is a run of whole components of ``full``."""
    return f".{name}." in f".{full}."


def _adapter_tensor_shapes(adapter_dir: Path) -> dict[str, list[int]]:
    safetensors_file, bin_file = adapter_dir / "adapter_model.safetensors", adapter_dir / "adapter_model.bin"
    if safetensors_file.is_file():
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(safetensors_file), framework="pt") as weights:
                return {key: list(weights.get_slice(key).get_shape()) for key in weights.keys()}  # noqa: SIM118
        except (OSError, SafetensorError) as error:
            raise FtkitError(f"Adapter weights {safetensors_file} are unreadable or truncated ({error}); save the adapter again.") from error
    if bin_file.is_file():
        state = torch.load(bin_file, map_location="cpu", weights_only=True, mmap=True)
        return {key: list(value.shape) for key, value in state.items()}
    raise FtkitError(f"Adapter directory {adapter_dir} has no adapter_model.safetensors or adapter_model.bin; save the adapter again.")


def _shape_problem(key: str, shape: tuple[int, ...], modules: dict[str, nn.Module], params: dict[str, nn.Parameter]) -> str | None:
    """What does not fit between one saved adapter tensor and the base model (None when it fits)."""
    marker = next((m for m in _LORA_KEY_MARKERS if m in key), None)
    if marker is None:  # a modules_to_save copy or a resized embedding: a plain base parameter
        param = params.get(key)
        if param is None:
            param = params.get(key.replace(".weight", ".modules_to_save.default.weight"))
        if param is None:
            return f"it saves weights for {key}, which the base model does not have"
        return None if tuple(param.shape) == shape else f"{key} has shape {list(shape)} but the base's is {list(param.shape)}"
    module_name = key.split(marker)[0]
    module = modules.get(module_name)
    if module is None:
        return f"it adapts {module_name}, which the base model does not have"
    base_layer = getattr(module, "base_layer", module)  # an already wrapped LoRA layer
    in_features = getattr(base_layer, "in_features", getattr(base_layer, "num_embeddings", None))
    out_features = getattr(base_layer, "out_features", getattr(base_layer, "embedding_dim", None))
    if marker == ".lora_A." and in_features is not None and shape[-1] != in_features:
        return f"{module_name} takes {in_features} input features but the adapter expects {shape[-1]}"
    if marker in (".lora_B.", ".lora_magnitude_vector") and out_features is not None and shape[0] != out_features:
        return f"{module_name} has {out_features} output features but the adapter expects {shape[0]}"
    return None


def _saved_shapes(adapter_dir: Path) -> dict[str, tuple[int, ...]]:
    """Shapes of the adapter's saved tensors, keyed by the base model's parameter names."""
    return {key.removeprefix("base_model.model."): tuple(shape) for key, shape in _adapter_tensor_shapes(adapter_dir).items()}


def _grow_embeddings_for_adapter(model: nn.Module, shapes: dict[str, tuple[int, ...]]) -> None:
    """Resize the input embeddings (and a tied head) when the adapter saved a larger vocabulary: tokens added
    in training. The new rows are placeholders; the adapter's saved rows replace them when it loads."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is None or is_quantized(model):
        return
    name = next((n for n, module in model.named_modules() if module is embeddings), None)
    saved = shapes.get(f"{name}.weight") if name else None
    rows, width = embeddings.weight.shape
    if saved is not None and len(saved) == 2 and saved[1] == width and saved[0] > rows:
        model.resize_token_embeddings(saved[0], mean_resizing=False)  # the adapter's rows overwrite the new ones


def _rank_problem(key: str, shape: tuple[int, ...], modules: dict[str, nn.Module]) -> str | None:
    """A LoRA rank above min(inputs, outputs) of its layer is no low-rank update of it."""
    if ".lora_A." not in key and ".lora_embedding_A" not in key:
        return None
    module_name = key.split(".lora_A." if ".lora_A." in key else ".lora_embedding_A")[0]
    base_layer = getattr(modules.get(module_name), "base_layer", modules.get(module_name))
    in_features = getattr(base_layer, "in_features", getattr(base_layer, "num_embeddings", None))
    out_features = getattr(base_layer, "out_features", getattr(base_layer, "embedding_dim", None))
    if in_features is None or out_features is None or len(shape) < 2:
        return None
    rank, limit = shape[0], min(in_features, out_features)
    if rank <= limit:
        return None
    return (f"has rank {rank} on {module_name}, more than that layer allows (at most {limit} = min({in_features} "
            f"inputs, {out_features} outputs))")


def _check_configured_rank(adapter_dir: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """adapter_config.json's ``r`` must be the rank of the saved weights (peft otherwise fails with a traceback)."""
    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise FtkitError(f"{adapter_dir / 'adapter_config.json'} is not valid JSON; save the adapter again.") from error
    rank = config.get("r") if isinstance(config, dict) else None
    if not isinstance(rank, int) or config.get("rank_pattern"):
        return
    saved = sorted({shape[0] for key, shape in shapes.items() if ".lora_A." in key and shape})
    if saved and saved != [rank]:
        raise FtkitError(
            f"Adapter {adapter_dir} is inconsistent: adapter_config.json says r={rank} but its weights have rank "
            f"{', '.join(map(str, saved))}; save the adapter again."
        )
