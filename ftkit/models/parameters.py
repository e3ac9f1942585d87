"""Facts about a model's parameters and the casts applied to them, shared by training and loading adapters.

Kept apart from ``adapters`` (what trains) and ``saved_adapters`` (loading saved ones) so that neither
imports the other's private helpers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def is_quantized(model: nn.Module) -> bool:
    """True for a model loaded in 4 or 8 bits (its quantized weights cannot be merged into or trained)."""
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def upcast_trainable(model: nn.Module) -> None:
    """Trainable weights live in fp32 (peft leaves ``modules_to_save`` copies in the base's half dtype)."""
    for param in model.parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()


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
