"""Decide whether to checkpoint activations, from an estimate of what the largest batch would store.

Gradient checkpointing recomputes every layer's forward pass during backward: about a third more
compute, measured on the embedded model (272 vs. 174 tokens/s on short rows). It only pays when
activations are large. LLaMA-Factory and trl turn it on always; ftkit leaves it off when the largest
batch's activations fit a fifth of the training device's free memory, and on a GPU also three times the
model's fp32 weights (so a run stays below a full fine-tune's fp32 weights and Adam state, four times the
weights), and says which way it decided.

The activation estimate is the planner's (``ftkit.models.memory``, also behind ``ftkit estimate``), counted at 4
bytes a value on purpose: CPU autocast keeps some values in fp32, and erring high only costs checkpointing's
third more compute, where erring low runs out of memory. On CPU the process's memory grows by about three
times that estimate (``CPU_FOOTPRINT``, measured in fp32 with padded batches: 2.85x on the embedded model at
408 tokens, 3.0x at 848, 2.7x on a 360M model at 2,500 tokens): autograd's temporaries in backward and
glibc's allocator, which keeps freed blocks between 128 KB and 32 MB for reuse. So on CPU the rule weighs
that footprint against free memory alone: at 360M on long conversations the old rule (estimate against
three times the weights) kept checkpointing off and the run peaked at 13.2 GB; with it on, 7.1 GB at the
same speed (74.8 vs 75.4 s), because allocating that much fresh memory every step cost as much as the
recomputation. On short rows, where checkpointing does cost a third, it stays off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ftkit.models.memory import activation_bytes

SHARE_OF_FREE_MEMORY = 0.2
WEIGHT_MULTIPLE = 3  # on a GPU
CPU_FOOTPRINT = 3.0  # RSS growth per estimated activation byte, on CPU (measured; see above)


@dataclass(frozen=True)
class CheckpointingDecision:
    enabled: bool
    reason: str


def free_memory_bytes(device_type: str) -> int:
    """Free memory of the training device (GPU memory on CUDA, available RAM otherwise)."""
    if device_type == "cuda":
        import torch

        return int(torch.cuda.mem_get_info()[0])
    import psutil

    return int(psutil.virtual_memory().available)


def decide_gradient_checkpointing(
    setting: bool | None, model_config: Any, tokens_per_batch: int, device_type: str, parameter_count: int,
    free_bytes: int | None = None,
) -> CheckpointingDecision:
    """``setting``: True/False when the config forces checkpointing on/off; None estimates and decides, against
    ``free_bytes`` of free device memory (default: measured now)."""
    if setting is not None:
        return CheckpointingDecision(setting, f"gradient checkpointing {'on' if setting else 'off'} (set in the config)")
    needed = activation_bytes(model_config, tokens_per_batch)
    free = free_memory_bytes(device_type) if free_bytes is None else free_bytes
    if device_type == "cpu":
        needed, budget = int(needed * CPU_FOOTPRINT), SHARE_OF_FREE_MEMORY * free
    else:
        budget = min(SHARE_OF_FREE_MEMORY * free, WEIGHT_MULTIPLE * 4 * parameter_count)
    enabled = needed > budget
    gib = 1024**3
    detail = (f"activations of the largest batch ({tokens_per_batch:,} tokens) ~{needed / gib:.1f} GiB, "
              f"budget {budget / gib:.1f} GiB")
    if enabled:
        return CheckpointingDecision(True, f"gradient checkpointing on: {detail}")
    return CheckpointingDecision(False, f"gradient checkpointing off (faster): {detail}; "
                                        "set disable_gradient_checkpointing: false to force it on")
