"""Which library each ``ftkit quantize`` method runs on, and whether it can run here.

The method names and their one-line descriptions live in ``ftkit.config.stages.QUANTIZE_METHODS`` (the
config is validated before torch is imported); this module adds what needs the environment: the package a
method needs, the device it needs, and the refusal sentences when either is missing.

Backends, and why:

* ``int8``, ``int8-dynamic``, ``int8-static``, ``int4``: torchao (0.18), the PyTorch project's own
  quantization library. It has CPU kernels for int8 weight-only and int8 x int8 matmuls, and its tensors
  serialize through transformers' ``TorchAoConfig``, so ``from_pretrained`` loads int8/int8-dynamic outputs.
  torchao 0.18's int4 weight-only layouts are CUDA-only (``plain`` needs the mslk CUDA kernels,
  ``plain_int32`` and ``tile_packed_to_4d`` refuse the CPU), so ``int4`` needs a GPU.
* ``bnb-*``: bitsandbytes, whose CPU backend runs 8-bit and 4-bit (nf4/fp4) layers here.
* ``gptq``/``awq``: no backend for them runs on this CPU-only machine (gptqmodel and autoawq need CUDA);
  they are refused with the package and device they need.
* ``gguf``: the ``gguf`` package alone (no llama.cpp binaries), see ``ftkit.quantize.gguf_file``.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from ftkit.errors import FtkitError


@dataclass(frozen=True)
class Backend:
    """The package a method needs (its import name and its pip name) and whether it needs a CUDA GPU."""

    module: str
    package: str
    needs_cuda: bool = False
    cuda_reason: str = ""


_TORCHAO = Backend("torchao", "torchao")
BACKENDS: dict[str, Backend] = {
    "int8": _TORCHAO,
    "int8-dynamic": _TORCHAO,
    "int8-static": _TORCHAO,
    "int4": Backend("torchao", "torchao", needs_cuda=True, cuda_reason="torchao 0.18's int4 weight-only kernels "
                    "run on CUDA only; on a CPU use bnb-nf4 or method gguf with gguf_type q4_0"),
    "bnb-int8": Backend("bitsandbytes", "bitsandbytes"),
    "bnb-nf4": Backend("bitsandbytes", "bitsandbytes"),
    "bnb-fp4": Backend("bitsandbytes", "bitsandbytes"),
    "gptq": Backend("gptqmodel", "gptqmodel", needs_cuda=True, cuda_reason="GPTQ calibration and kernels "
                    "(gptqmodel) need a CUDA GPU"),
    "awq": Backend("awq", "autoawq", needs_cuda=True, cuda_reason="AWQ calibration and kernels (autoawq) need a "
                   "CUDA GPU"),
    "gguf": Backend("gguf", "gguf"),
}

WEIGHT_BITS: dict[str, int] = {"int8": 8, "int8-dynamic": 8, "int8-static": 8, "int4": 4, "bnb-int8": 8,
                               "bnb-nf4": 4, "bnb-fp4": 4, "gptq": 4, "awq": 4}
"""Bits per quantized weight (gguf: by gguf_type)."""

DEFAULT_GROUP_SIZE = 64
"""int4's default group: divides the widths of common models (SmolLM2's 576 is 9 x 64; 128 would not)."""


def check_method_available(method: str, device: torch.device) -> None:
    """Refuse a method whose package is not installed or whose device this machine lacks, in one sentence."""
    backend = BACKENDS[method]
    if backend.needs_cuda and device.type != "cuda":
        raise FtkitError(f"method {method} cannot run on this machine: {backend.cuda_reason}"
                         + ("" if method == "int4" else f" (pip install {backend.package} on a machine with one)")
                         + ".")
    if importlib.util.find_spec(backend.module) is None:
        raise FtkitError(f"method {method} needs the {backend.package} package, which is not installed; install it "
                         f"with `pip install {backend.package}` or pick another method.")


def is_excluded(module_name: str, excluded: list[str]) -> bool:
    """Whether ``module_name`` (``model.layers.0.mlp.up_proj``) is named by an ``exclude_modules`` entry:
    the full name, or a dotted suffix of it (``lm_head``, ``mlp.up_proj``, ``up_proj``)."""
    return any(module_name == name or module_name.endswith("." + name) for name in excluded)


def check_group_size(model: torch.nn.Module, group_size: int, excluded: list[str]) -> None:
    """Every linear layer that will be quantized must split into whole groups of ``group_size`` inputs."""
    for name, module in model.named_modules():
        quantized = isinstance(module, torch.nn.Linear) and not is_excluded(name, excluded)
        if quantized and module.in_features % group_size:
            raise FtkitError(f"group_size {group_size} does not divide the input width {module.in_features} of "
                             f"{name}; use a group size that divides every layer's width (e.g. 32 or 64), or "
                             "add the layer to exclude_modules.")
