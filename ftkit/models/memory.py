"""What a training run keeps in memory on each device: the planner behind ``ftkit estimate`` and the
activation estimate behind ``ftkit train``'s gradient-checkpointing decision.

Written here because no library covers it whole: DeepSpeed's estimators
(``estimate_zero2_model_states_mem_needs``, ``estimate_zero3_model_states_mem_needs``) count the model states
of a full fine-tune only, and accelerate's ``estimate-memory`` counts weights. A LoRA or QLoRA run, a frozen
base, activations and logits are what decide whether a run fits, so the plan counts all of them, from the
model's shapes alone (``ModelShape``, built from config.json on the meta device).

**Model states** follow DeepSpeed's accounting of mixed-precision Adam, so the figures agree with its
estimators: per *trainable* parameter 2 bytes of 16-bit weights, 6 of gradients (16-bit, plus the fp32
accumulation copy) and 12 of optimizer states (the fp32 master weights, Adam's momentum and variance: the
"12 bytes per parameter" that make a 1.5B model's Adam states 18 GB). A frozen parameter costs its storage
only: 2 bytes in bf16/fp16, about 0.56 in 4 bits (0.52 with double quantization), about 1 in 8 bits. Per
strategy, on N devices (``GB`` = 10^9 bytes):

- none (DDP): everything on every device;
- ZeRO-1: optimizer states and the fp32 gradient copy split N ways;
- ZeRO-2: all gradients split too (DeepSpeed's 2 + 18/N bytes per parameter);
- ZeRO-3: the weights split too; the largest layer is gathered whole while it runs (4 bytes a parameter:
  weights and gradients), and gradients are reduced straight into fp32 partitions (4 + 12 bytes split);
- offload: ZeRO-2 keeps the 16-bit weights on the device and the rest in CPU memory; ZeRO-3 keeps only the
  gathered layer. The CPU side uses DeepSpeed's 1.5x buffer factor for pinned memory.

**Activations** follow Korthikanti et al. (2022), "Reducing Activation Recomputation in Large Transformer
Models": per token and layer a decoder keeps about 7·hidden + 2.5·intermediate values for backward (34·h bytes
at 16 bits with a 4·h MLP), 2 bytes a value in bf16/fp16 and 4 in fp32. The attention scores' s² term is left
out, as flash and memory-efficient attention never store it. Measured on the embedded model, a LoRA run on
CPU in bf16 without checkpointing, packed rows: 2.98 and 4.87 GB peak RSS at 4,096 and 8,192 tokens a
micro-batch, planned 3.11 and 5.05 (+4%). With checkpointing the same runs peaked at 1.81 and 2.81 GB against
1.38 and 1.59 planned: CPU attention over packed rows (a block mask, so no flash kernel) holds more during the
recomputed layer than this counts. With gradient checkpointing each layer keeps only its input (hidden values a token) and
one layer's activations exist at a time, while it is recomputed. **Logits**: ftkit computes the loss in
chunks of ``CHUNK_TOKENS`` trained tokens (``ftkit.train.loss``), fp32 logits and their gradient. **Runtime**:
what the framework holds before any tensor: the CUDA context on a GPU, the imported libraries in a CPU
process (measured: torch, transformers, peft and ftkit's training modules take 0.41 GB of RSS).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

GB = 1e9
STRATEGIES = ("none", "zero1", "zero2", "zero2_offload", "zero3", "zero3_offload")
STRATEGY_NAMES = {"none": "no sharding", "zero1": "ZeRO-1", "zero2": "ZeRO-2", "zero2_offload": "ZeRO-2+offload",
                  "zero3": "ZeRO-3", "zero3_offload": "ZeRO-3+offload"}
WEIGHT_BYTES, GRADIENT_BYTES, OPTIMIZER_BYTES = 2, 6, 12  # per trainable parameter, mixed-precision Adam
FP32_GRADIENT_BYTES = 4  # the part of GRADIENT_BYTES kept in fp32 (ZeRO-1 shards it; ZeRO-3 keeps only it)
GATHERED_LAYER_BYTES = 4  # ZeRO-3: a gathered layer's 16-bit weights and gradients
CPU_BUFFER_FACTOR = 1.5  # DeepSpeed's additional_buffer_factor for offloaded (pinned) states
QUANTIZED_BYTES = {4: 0.5 + 4 / 64, 8: 1.0 + 4 / 4096}  # weights + one fp32 absmax per block (64) or row (~4096)
DOUBLE_QUANT_4BIT_BYTES = (4 + 8 / 64 + 4 / (64 * 256)) / 8  # absmax in 8 bits, one fp32 per 256 blocks
CHUNK_TOKENS = 1024  # ftkit.train.loss computes fp32 logits for this many trained tokens at a time
RUNTIME_BYTES = {"cuda": 0.5 * GB, "cpu": 0.41 * GB}  # CUDA context; a CPU process's imported libraries
FITS_SHARE = 0.9  # a plan fits when it needs at most this share of the device (allocator fragmentation)


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of a model: parameter counts and the sizes activations scale with."""

    parameters: int  # all parameters, adapter weights included
    trainable: int
    quantized: int = 0  # frozen parameters stored in ``bits`` bits (QLoRA's base linear layers)
    bits: int | None = None
    double_quantization: bool = True
    largest_layer: int = 0  # the most parameters one module holds itself (ZeRO-3 gathers it whole)
    hidden: int = 0
    intermediate: int = 0
    layers: int = 0
    vocab: int = 0
    weight_bytes: int = WEIGHT_BYTES  # a plain weight: 2 with bf16/fp16 mixed precision, 4 training in fp32

    @property
    def mixed_precision(self) -> bool:
        return self.weight_bytes < 4

    @property
    def frozen_bytes(self) -> float:
        """Bytes of the frozen parameters' storage."""
        if self.bits == 4:
            per = DOUBLE_QUANT_4BIT_BYTES if self.double_quantization else QUANTIZED_BYTES[4]
        else:
            per = QUANTIZED_BYTES.get(self.bits or 0, self.weight_bytes)
        plain = self.parameters - self.trainable - self.quantized
        return plain * self.weight_bytes + self.quantized * per


def shape_of(model: Any) -> dict[str, int]:
    """The activation-relevant sizes of a transformers model's text config, and its largest module."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    largest = max((sum(p.numel() for p in module.parameters(recurse=False)) for module in model.modules()), default=0)
    return {"hidden": hidden, "intermediate": int(getattr(config, "intermediate_size", 0) or 4 * hidden),
            "layers": int(getattr(config, "num_hidden_layers", 0) or 0), "vocab": int(getattr(config, "vocab_size", 0)),
            "largest_layer": int(largest)}


def activation_values_per_token(hidden: int, intermediate: int, layers: int, *, checkpointing: bool) -> float:
    """Values a forward pass keeps for backward, per token of the micro-batch (Korthikanti et al.)."""
    per_layer = 7 * hidden + 2.5 * intermediate
    return layers * hidden + per_layer if checkpointing else layers * per_layer


def activation_bytes(model_config: Any, tokens_per_batch: int, *, checkpointing: bool = False,
                     bytes_per_value: int = 4) -> int:
    """Bytes of activations a forward pass over ``tokens_per_batch`` tokens keeps for backward."""
    config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    values = activation_values_per_token(hidden, int(getattr(config, "intermediate_size", 0) or 4 * hidden),
                                         int(getattr(config, "num_hidden_layers", 0) or 0), checkpointing=checkpointing)
    return int(values * bytes_per_value * tokens_per_batch)


@dataclass
class DeviceMemory:
    """Bytes one device needs under one strategy, by kind, and the CPU memory offload needs per node."""

    strategy: str
    weights: float
    gradients: float
    optimizer: float
    activations: float
    activations_without_checkpointing: float
    logits: float
    runtime: float
    cpu_offload_per_node: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def model_states(self) -> float:
        return self.weights + self.gradients + self.optimizer

    @property
    def total(self) -> float:
        return self.model_states + self.activations + self.logits + self.runtime

    @property
    def total_without_checkpointing(self) -> float:
        return self.total - self.activations + self.activations_without_checkpointing


def model_states(shape: ModelShape, strategy: str, devices: int, nodes: int = 1) -> tuple[float, float, float, float]:
    """(weights, gradients, optimizer) bytes on each device and the CPU bytes per node, for ``strategy``."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy}")
    n, t = devices, shape.trainable
    # Training in fp32 keeps no 16-bit copies: 4-byte gradients, and Adam's two states without a master copy.
    gradient_bytes = GRADIENT_BYTES if shape.mixed_precision else FP32_GRADIENT_BYTES
    optimizer_bytes = OPTIMIZER_BYTES if shape.mixed_precision else OPTIMIZER_BYTES - 4
    gathered_bytes = GATHERED_LAYER_BYTES * shape.weight_bytes // WEIGHT_BYTES
    weights = shape.frozen_bytes + shape.weight_bytes * t
    gradients, optimizer, cpu = gradient_bytes * t, optimizer_bytes * t, 0.0
    if strategy == "zero1":
        gradients = (gradient_bytes - FP32_GRADIENT_BYTES) * t + FP32_GRADIENT_BYTES * t / n
        optimizer /= n
    elif strategy == "zero2":
        gradients, optimizer = gradients / n, optimizer / n
    elif strategy == "zero2_offload":
        # DeepSpeed: the fp32 states of every device's partition live in its node's CPU memory
        cpu = t * max(4 * n, FP32_GRADIENT_BYTES + optimizer_bytes) * CPU_BUFFER_FACTOR
        gradients = optimizer = 0.0
    elif strategy == "zero3":
        weights = weights / n + gathered_bytes * shape.largest_layer
        gradients, optimizer = FP32_GRADIENT_BYTES * t / n, optimizer / n
    elif strategy == "zero3_offload":
        cpu = (weights + (FP32_GRADIENT_BYTES + optimizer_bytes) * t) * CPU_BUFFER_FACTOR / nodes
        weights, gradients, optimizer = gathered_bytes * shape.largest_layer, 0.0, 0.0
    return weights, gradients, optimizer, cpu


def plan(shape: ModelShape, strategy: str, *, devices: int = 1, nodes: int = 1, tokens_per_batch: int,
         device_type: str = "cuda", bytes_per_value: int = 2, chunked_loss: bool = True) -> DeviceMemory:
    """One device's memory under ``strategy`` for micro-batches of ``tokens_per_batch`` tokens, activations
    stored in ``bytes_per_value`` bytes (2 in bf16/fp16, 4 in fp32)."""
    weights, gradients, optimizer, cpu = model_states(shape, strategy, devices, nodes)
    with_ckpt, without = (activation_values_per_token(shape.hidden, shape.intermediate, shape.layers, checkpointing=c)
                          * bytes_per_value * tokens_per_batch for c in (True, False))
    logit_tokens = min(tokens_per_batch, CHUNK_TOKENS) if chunked_loss else tokens_per_batch
    logits = 2 * 4 * logit_tokens * shape.vocab  # fp32 logits and their gradient
    return DeviceMemory(strategy, weights, gradients, optimizer, with_ckpt, without, logits,
                        RUNTIME_BYTES.get(device_type, RUNTIME_BYTES["cuda"]), cpu)
