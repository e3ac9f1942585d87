"""Decide which weights train: LoRA/QLoRA adapters, freeze (last N layers), or full fine-tuning.

``prepare_model_for_training`` is the one entry point the train stage calls; the pieces it dispatches to
are public. Loading *saved* adapters lives in ``ftkit.models.saved_adapters``. Written here rather than
left to peft defaults because of what peft does not check: a ``lora_target`` that names no module, LoRA
weights that must stay fp32 on a bf16 base, and which layers count as "the last N" for freeze.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from ftkit.errors import FtkitError
from ftkit.models.loader import sync_special_tokens
from ftkit.models.lora_variants import AdaLoraSchedule, adalora_schedule, lora_init_weights
from ftkit.models.parameters import is_quantized, upcast_trainable
from ftkit.models.saved_adapters import load_adapters
from ftkit.models.source import adapter_dirs_from_config

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from ftkit.config.stages import TrainConfig

_LORA_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d)
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
    init_lora_weights: bool | str = True,
    adaptive: AdaLoraSchedule | None = None,
) -> PeftModel:
    """Wrap ``model`` in a new trainable LoRA (QLoRA when ``quantized``); adapter weights are fp32.

    ``init_lora_weights`` is peft's (``"pissa"`` moves each weight's principal part into the adapter);
    ``adaptive`` makes it an AdaLoRA whose ranks follow that schedule (``rank`` is then unused)."""
    from peft import AdaLoraConfig, LoraConfig, get_peft_model

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
    common = dict(
        task_type="CAUSAL_LM",
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        modules_to_save=saved or None,
        ensure_weight_tying=tied and any(name in embedding_names for name in saved),
    )
    if adaptive is not None:
        config = AdaLoraConfig(**common, **adaptive.peft_kwargs())
    else:
        config = LoraConfig(**common, r=rank, use_rslora=use_rslora, use_dora=use_dora,
                            init_lora_weights=init_lora_weights)
    peft_model = get_peft_model(model, config, autocast_adapter_dtype=True)
    upcast_trainable(peft_model)
    return peft_model


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
    upcast_trainable(model)
    return model


def apply_full(model: PreTrainedModel) -> PreTrainedModel:
    """Train every parameter, as fp32 master weights."""
    if is_quantized(model):
        raise FtkitError("Full fine-tuning cannot update quantized weights; remove quantization_bit or use lora.")
    for param in model.parameters():
        param.requires_grad_(True)
    upcast_trainable(model)
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
    total_steps: int | None = None,
) -> PreTrainedModel | PeftModel:
    """Set up ``model`` for ``config.finetuning_type``: LoRA/QLoRA (new, or continuing the configured
    adapters), freeze, or full; with gradient checkpointing when ``gradient_checkpointing`` (default: unless
    the config disables it). With ``tokenizer``, the model's pad/stop ids and embedding rows are first
    synced to it (``sync_special_tokens``). ``total_steps`` (the run's optimizer steps) sizes AdaLoRA's schedule
    (adaptive_rank)."""
    if tokenizer is not None:
        sync_special_tokens(model, tokenizer)
    checkpointing = gradient_checkpointing if gradient_checkpointing is not None else (
        config.checkpointing_choice is not False)
    if config.uses_lora:
        quantized = is_quantized(model)
        if config.adapter_name_or_path:
            _prepare_base_for_adapters(model, quantized=quantized, gradient_checkpointing=checkpointing)
            return _fused(load_adapters(model, adapter_dirs_from_config(config), trainable=True))
        saved = config.additional_target or []
        return _fused(apply_lora(
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
            init_lora_weights=lora_init_weights(config),
            adaptive=adalora_schedule(config, total_steps or 1) if config.adaptive_rank else None,
        ))
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


def _fused(model: PeftModel) -> PeftModel:
    """Training runs LoRA's sum as one addmm (``ftkit.models.fused_lora``: same values, less memory)."""
    from ftkit.models.fused_lora import fuse_lora_sums

    fuse_lora_sums(model)
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

