"""The engine's settings, and how many KV blocks fit the memory it may use.

On CUDA the cache takes ``kv_cache_fraction`` of the memory free after the weights are loaded; on CPU it
takes at most 0.5 GiB or a tenth of the available RAM, whichever is smaller (transformers' continuous
batching takes 60% of RAM by default: 8.5 GB measured here). ``kv_cache_memory`` (GiB) overrides both.
The cache is never bigger than ``max_num_seqs`` full-length sequences could use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ftkit.errors import FtkitError

GIB = 1024**3
CPU_KV_CACHE_CAP = GIB // 2
CPU_KV_CACHE_SHARE = 0.1


@dataclass
class EngineOptions:
    """How the engine batches and how much cache it keeps."""

    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None: the model's max_position_embeddings (capped by the cache)
    kv_cache_memory: float | None = None  # GiB
    kv_cache_fraction: float = 0.5  # of free accelerator memory
    num_kv_blocks: int | None = None  # an exact block count (tests, benchmarks); overrides the memory rules
    enable_prefix_caching: bool = True
    scheduling_policy: str = "fcfs"
    max_loras: int = 4  # adapters resident at once (multi-LoRA)
    pack_weights: bool = False  # bf16 on CPU: pack linear weights for oneDNN, in place (a model the engine owns)

    def validate(self) -> None:
        """Raise ``FtkitError`` naming the first setting out of range."""
        checks = [
            (self.block_size >= 1, f"block_size must be at least 1, got {self.block_size}"),
            (self.max_num_seqs >= 1, f"max_num_seqs must be at least 1, got {self.max_num_seqs}"),
            (self.max_num_batched_tokens >= 1,
             f"max_num_batched_tokens must be at least 1, got {self.max_num_batched_tokens}"),
            (self.max_model_len is None or self.max_model_len >= 2,
             f"max_model_len must be at least 2, got {self.max_model_len}"),
            (self.kv_cache_memory is None or self.kv_cache_memory > 0,
             f"kv_cache_memory must be a positive number of GiB, got {self.kv_cache_memory}"),
            (0 < self.kv_cache_fraction <= 0.95, f"kv_cache_fraction must be in (0, 0.95], got {self.kv_cache_fraction}"),
            (self.max_loras >= 0, f"max_loras must be 0 or more, got {self.max_loras}"),
            (self.num_kv_blocks is None or self.num_kv_blocks >= 1,
             f"num_kv_blocks must be at least 1, got {self.num_kv_blocks}"),
        ]
        for ok, message in checks:
            if not ok:
                raise FtkitError(f"Engine option {message}.")


def kv_cache_budget_bytes(options: EngineOptions, device: torch.device) -> int:
    """The bytes the KV cache may take on ``device``."""
    if options.kv_cache_memory is not None:
        return int(options.kv_cache_memory * GIB)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * options.kv_cache_fraction)
    import psutil

    return int(min(CPU_KV_CACHE_CAP, psutil.virtual_memory().available * CPU_KV_CACHE_SHARE))


def plan_kv_blocks(options: EngineOptions, *, bytes_per_block: int, model_max_len: int,
                   device: torch.device) -> tuple[int, int]:
    """(number of blocks, max_model_len): as many blocks as the budget allows and full-length sequences could
    use, and a max_model_len no longer than the model's and than the whole cache."""
    max_model_len = options.max_model_len or model_max_len
    blocks_per_sequence = -(-max_model_len // options.block_size)
    if options.num_kv_blocks is not None:
        num_blocks = options.num_kv_blocks
    else:
        num_blocks = min(kv_cache_budget_bytes(options, device) // bytes_per_block,
                         options.max_num_seqs * blocks_per_sequence)
    if num_blocks < 1:
        raise FtkitError(f"The KV cache budget holds no block of {bytes_per_block} bytes; raise kv_cache_memory.")
    return num_blocks, min(max_model_len, num_blocks * options.block_size)
