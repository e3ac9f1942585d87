"""Quantize a full-precision model's linear layers and save it as a transformers checkpoint.

torchao methods quantize the in-memory model (adapters already merged in fp32) with ``quantize_`` and save
it with its ``TorchAoConfig``, so ``from_pretrained`` rebuilds the quantized tensors. bitsandbytes quantizes
while loading, so a bnb method loads the full-precision checkpoint (saved first when adapters were merged or
the source was a GGUF file) with a ``BitsAndBytesConfig`` and saves that.

``int8-static`` calibrates with forward pre-hooks: each linear layer records, per input channel, the largest
absolute input it sees over ``calibration_samples`` chat-rendered prompts. A per-tensor static scale taken
straight from those maxima fails on LLMs: a few outlier channels (SmolLM2's down_proj inputs reach
hundreds) leave the other channels a handful of int8 levels (measured on the embedded model: perplexity
+157%, top-1 agreement 47%). So the scales are smoothed first, as SmoothQuant (Xiao et al., 2023) does:
per input channel ``s = amax_x ** ALPHA / amax_w ** (1 - ALPHA)``, weights multiplied by ``s`` before they
are quantized per output channel, activations multiplied by ``1 / s`` (torchao's ``act_pre_scale``) and then
quantized with the fixed per-tensor scale ``max(amax_x / s) / 127``. torchao, not optimum-quanto: torchao is
installed already for the other int8 methods, runs int8 x int8 on CPU, and its ``Int8Tensor`` carries both
the smoothing and the static scale, so the checkpoint is self-contained.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ftkit.errors import FtkitError
from ftkit.quantize.methods import DEFAULT_GROUP_SIZE, is_excluded

SMOOTHQUANT_ALPHA = 0.8
"""How much of the activations' range moves into the weights. SmoothQuant uses 0.8-0.85 for Llama models;
measured on the embedded model: 0.5 gave perplexity +29% and top-1 agreement 67%, 0.8 gave +5.8% and 88%
(int8-dynamic's per-token scales: +5.3%, 88%)."""


def torchao_config(method: str, *, per_channel: bool, group_size: int | None, act_scale: torch.Tensor | None = None):
    """The torchao config of a torchao method (``act_scale``: int8-static's calibrated activation scale)."""
    from torchao.quantization import (
        Int4WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8StaticActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
    )
    from torchao.quantization.granularity import PerRow, PerTensor

    weight_granularity = PerRow() if per_channel else PerTensor()
    if method == "int8":
        return Int8WeightOnlyConfig(granularity=weight_granularity)
    if method == "int8-dynamic":
        return Int8DynamicActivationInt8WeightConfig(granularity=[PerRow(), weight_granularity])
    if method == "int8-static":
        return Int8StaticActivationInt8WeightConfig(act_quant_scale=act_scale,
                                                    granularity=[PerTensor(), weight_granularity])
    if method == "int4":
        # tinygemm's layout (torch's own CUDA int4 kernel); the plain layout needs the separate mslk package
        return Int4WeightOnlyConfig(group_size=group_size or DEFAULT_GROUP_SIZE,
                                    int4_packing_format="tile_packed_to_4d")
    raise ValueError(f"not a torchao method: {method}")


def quantized_linear_names(model: torch.nn.Module, excluded: list[str]) -> list[str]:
    """The linear layers a method quantizes: every ``nn.Linear`` not named in ``exclude_modules``."""
    return [name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and not is_excluded(name, excluded)]


@torch.inference_mode()
def calibrate_activation_amax(model: Any, tokenizer: Any, texts: list[str], names: list[str], *,
                              batch_size: int, max_length: int) -> dict[str, torch.Tensor]:
    """Per input channel, the largest absolute input each named linear layer sees over ``texts`` (padding
    positions excluded)."""
    modules = dict(model.named_modules())
    amax: dict[str, torch.Tensor] = {name: torch.zeros(modules[name].in_features) for name in names}
    mask_holder: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable:
        def record(_module: torch.nn.Module, inputs: tuple) -> None:
            values = inputs[0].detach().abs()
            mask = mask_holder.get("mask")
            if mask is not None and values.shape[:2] == mask.shape:
                values = values * mask[..., None]
            amax[name] = torch.maximum(amax[name], values.reshape(-1, values.shape[-1]).amax(dim=0).float().cpu())
        return record

    handles = [modules[name].register_forward_pre_hook(hook(name)) for name in names]
    try:
        device = next(model.parameters()).device
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True, truncation=True,
                              max_length=max_length, add_special_tokens=False)
            mask_holder["mask"] = batch["attention_mask"].to(device=device, dtype=next(model.parameters()).dtype)
            model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
    finally:
        for handle in handles:
            handle.remove()
    return amax


def quantize_with_torchao(model: Any, method: str, *, excluded: list[str], per_channel: bool,
                          group_size: int | None, act_amax: dict[str, float] | None = None) -> list[str]:
    """Quantize ``model``'s linear layers in place; returns their names. Marks the model as torchao-quantized so
    ``save_pretrained`` writes the tensors and ``config.json`` the ``TorchAoConfig`` that loads them back."""
    from torchao.quantization import quantize_
    from transformers import TorchAoConfig
    from transformers.quantizers.auto import AutoHfQuantizer

    names = quantized_linear_names(model, excluded)
    if method == "int8-static":
        assert act_amax is not None
        for name in names:
            _smooth_and_quantize_static(model.get_submodule(name), act_amax[name], per_channel=per_channel)
        saved_config = torchao_config(method, per_channel=per_channel, group_size=group_size, act_scale=None)
    else:
        saved_config = torchao_config(method, per_channel=per_channel, group_size=group_size)
        wanted = set(names)
        quantize_(model, saved_config, filter_fn=lambda module, fqn: fqn in wanted)
    skipped = sorted({name for name, module in model.named_modules()
                      if isinstance(module, torch.nn.Linear) and name not in set(names)})
    quantization = TorchAoConfig(quant_type=saved_config, modules_to_not_convert=skipped or None)
    model.config.quantization_config = quantization
    model.hf_quantizer = AutoHfQuantizer.from_config(quantization, pre_quantized=True)
    return names


def _smooth_and_quantize_static(linear: torch.nn.Linear, act_amax: torch.Tensor, *, per_channel: bool) -> None:
    """SmoothQuant this layer with its calibrated per-channel input maxima, then quantize it to torchao's static
    int8 (see the module docstring)."""
    from torchao.quantization.granularity import PerRow, PerTensor
    from torchao.quantization.quant_primitives import MappingType
    from torchao.quantization.quantize_.workflows.int8.int8_tensor import (
        Int8Tensor,
        QuantizeTensorToInt8Kwargs,
    )

    weight = linear.weight.detach()
    act = act_amax.clamp(min=1e-5)
    weight_amax = weight.abs().amax(dim=0).float().clamp(min=1e-5)
    smooth = (act.pow(SMOOTHQUANT_ALPHA) / weight_amax.pow(1 - SMOOTHQUANT_ALPHA)).clamp(min=1e-5)
    act_scale = (act / smooth).max() / 127.0
    smoothed = (weight.float() * smooth[None, :]).to(weight.dtype)
    quantized = Int8Tensor.from_hp(
        smoothed, granularity=PerRow() if per_channel else PerTensor(),
        act_quant_kwargs=QuantizeTensorToInt8Kwargs(granularity=PerTensor(), mapping_type=MappingType.SYMMETRIC),
        act_quant_scale=act_scale.reshape(1, 1, 1), act_pre_scale=(1.0 / smooth).to(weight.dtype))
    linear.weight = torch.nn.Parameter(quantized, requires_grad=False)


def bnb_config(method: str, *, excluded: list[str], compute_dtype: torch.dtype):
    """The ``BitsAndBytesConfig`` of a bnb method (the excluded modules stay unquantized)."""
    from transformers import BitsAndBytesConfig

    if method == "bnb-int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=excluded or None)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=method.removeprefix("bnb-"),
                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype,
                              llm_int8_skip_modules=excluded or None)


def load_with_bnb(checkpoint: Path, method: str, *, excluded: list[str], dtype: torch.dtype) -> Any:
    """Load a full-precision checkpoint directory quantized by bitsandbytes (on the CPU)."""
    from transformers import AutoModelForCausalLM

    half = dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    try:
        return AutoModelForCausalLM.from_pretrained(
            str(checkpoint), dtype=half, device_map={"": "cpu"},
            quantization_config=bnb_config(method, excluded=excluded, compute_dtype=half))
    except (ValueError, RuntimeError) as error:
        raise FtkitError(f"bitsandbytes could not quantize {checkpoint} with method {method} ({error}).") from error


def bnb_quantized_names(model: Any) -> list[str]:
    """The layers bitsandbytes replaced (Linear8bitLt / Linear4bit)."""
    return [name for name, module in model.named_modules()
            if type(module).__name__ in ("Linear8bitLt", "Linear4bit")]
