"""Which device a stage runs on, which mixed precision it trains in, and which dtype weights load in.

These three decisions are made once, here, so train, merge, serve, evaluate and quantize agree. The
rules in short:

* Mixed precision ``bf16: auto`` means bf16 where the hardware runs it fast: CUDA GPUs that support it,
  and CPUs with AVX512-BF16 or AMX-BF16 (read from ``/proc/cpuinfo``; torch does not expose it). On a
  CPU without those instructions bf16 is emulated and slower than fp32, so ``auto`` turns it off.
* The *frozen* base of a LoRA/QLoRA run is loaded in the mixed-precision dtype: half the memory and no
  per-step down-casts, while the trainable adapter weights stay fp32 (peft's ``autocast_adapter_dtype``).
* Full and freeze fine-tuning update base weights, so those load as fp32 master weights.
* Inference (chat, serve, evaluate) loads in bf16 wherever bf16 is fast (fp16 on older GPUs, fp32 on
  CPUs without native bf16).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Literal

import torch

from ftkit.errors import FtkitError

MixedPrecision = Literal["bf16", "fp16", "no"]

_DTYPE_NAMES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}


def default_device() -> torch.device:
    """The device a single-process stage uses: CUDA (this process's ``LOCAL_RANK``), then MPS, then CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bf16 matrix instructions (AVX512-BF16 or AMX-BF16).

    Reads the flags line of ``/proc/cpuinfo``; anywhere that file cannot be read (macOS, Windows) the
    answer is False, which only means ``bf16: auto`` stays off on CPU there.
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        return False
    return False


def resolve_mixed_precision(bf16: bool | Literal["auto"], fp16: bool, device: torch.device) -> MixedPrecision:
    """Turn the ``bf16``/``fp16`` config keys into one mixed-precision mode for ``device``."""
    if fp16:
        if device.type != "cuda":
            raise FtkitError(
                f"fp16 mixed precision needs a CUDA GPU but this run is on {device.type}; "
                "use bf16 (auto) on CPU (set fp16: false)."
            )
        return "fp16"
    if bf16 is True:
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise FtkitError(
                "bf16: true but this GPU does not support bf16 (it needs Ampere or newer); "
                "set fp16: true and bf16: false, or bf16: auto."
            )
        return "bf16"
    if bf16 == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "no"
        if device.type == "cpu":
            return "bf16" if cpu_has_fast_bf16() else "no"
        return "no"
    return "no"


def resolve_load_dtype(mixed_precision: MixedPrecision, finetuning_type: str) -> torch.dtype:
    """The dtype the base weights are loaded in for training.

    ``lora``/``qlora``: the base is frozen, so it is stored in the compute dtype of the mixed-precision
    mode (bf16 or fp16; fp32 without mixed precision) and only the adapter trains in fp32.
    ``full``/``freeze``: the optimizer updates base weights, which must be fp32 master weights.
    """
    if mixed_precision not in ("bf16", "fp16", "no") or finetuning_type not in ("lora", "qlora", "full", "freeze"):
        raise TypeError(
            f"resolve_load_dtype(mixed_precision, finetuning_type) got ({mixed_precision!r}, {finetuning_type!r})"
        )
    if finetuning_type in ("full", "freeze"):
        return torch.float32
    if mixed_precision == "bf16":
        return torch.bfloat16
    if mixed_precision == "fp16":
        return torch.float16
    return torch.float32


def inference_dtype(device: torch.device) -> torch.dtype:
    """The dtype to load a model in for generation (chat, serve, evaluate) on ``device``.

    GPUs: bf16 where supported, else fp16. CPUs: bf16 where it runs natively (AVX512-BF16/AMX), else
    fp32. Measured here (SmolLM2-135M, 2 threads, greedy, batch 1): about 16 tokens/s in fp32 and 25 in
    bf16, with the same answers; on CPUs without native bf16 it is emulated and slower than fp32.
    """
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def parse_dtype(name: str | torch.dtype, *, auto: torch.dtype = torch.float32) -> torch.dtype:
    """``"bf16"``, ``"bfloat16"``, ``"fp16"``, ``"float16"``, ``"fp32"``, ``"float32"`` or ``"auto"`` -> dtype.

    ``"auto"`` means "whatever the caller considers natural" and returns ``auto`` (for a checkpoint's
    own dtype, pass ``auto=checkpoint_dtype(path)``).
    """
    if isinstance(name, torch.dtype):
        return name
    key = str(name).strip().lower().removeprefix("torch.")
    if key == "auto":
        return auto
    if key not in _DTYPE_NAMES:
        raise FtkitError(
            f"Unknown dtype '{name}'; use one of auto, bf16, fp16, fp32 (or bfloat16, float16, float32)."
        )
    return _DTYPE_NAMES[key]


def checkpoint_dtype(model_dir: Path) -> torch.dtype:
    """The dtype a checkpoint was saved in (``dtype``/``torch_dtype`` of its config.json; fp32 if absent)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return torch.float32
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return _DTYPE_NAMES.get(str(name).lower().removeprefix("torch."), torch.float32)
