"""Linear weights packed once into oneDNN's layout, for bf16 decoding on CPU.

A bf16 ``nn.Linear`` on CPU hands oneDNN a plain row-major weight on every call, and oneDNN reorders it into
its blocked (AMX/AVX-512) layout each time. Reordering once, when the engine takes the model over, is what
vLLM's CPU backend and PyTorch inductor's ``freezing`` pass do; on this machine it makes the decode step's
matrix multiplies 1.3-2x faster (``bench/README.md``) with bit-identical results, because the same oneDNN
kernel runs on the same numbers. PyTorch has the kernels (``torch.ops.mkldnn._reorder_linear_weight`` and
``_linear_pointwise``) but no module that keeps a packed weight, so ``PackedLinear`` is that module.

Only bf16 on a CPU with oneDNN's bf16 support is packed: fp32 goes through MKL, where packing gains nothing
for the compute-bound prefills that dominate fp32 runs (GSM8K) and could change the last bits of results.
Packing replaces the model's linear layers in place and keeps their ``weight`` (shapes, tied embeddings,
adapters' checks still see it), so it is for a model the engine owns: ``ftkit serve`` and
``ftkit evaluate``, not the model being trained.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """True when ``pack_linear_weights`` would speed up a model on ``device`` in ``dtype``."""
    return (device.type == "cpu" and dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` whose forward runs on a weight reordered once for oneDNN."""

    def __init__(self, linear: nn.Linear, batch_hint: int) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        with torch.no_grad():
            self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(
                linear.weight.detach(), batch_hint), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.packed_weight.dtype or torch.is_grad_enabled() and self.weight.requires_grad:
            return super().forward(x)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")


def pack_linear_weights(model: Any, batch_hint: int) -> int:
    """Replace every plain bf16 ``nn.Linear`` of ``model`` by a ``PackedLinear``; the number replaced. Layers
    whose weight is a tensor subclass (quantized weights: ``ftkit quantize``'s torchao outputs) keep theirs."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if (type(child) is nn.Linear and type(child.weight.data) is torch.Tensor  # not torchao's int8 tensors
                    and child.weight.dtype == torch.bfloat16 and child.weight.device.type == "cpu"):
                setattr(parent, name, PackedLinear(child, batch_hint))
                replaced += 1
    return replaced
