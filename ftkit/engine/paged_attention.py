"""Attention over the paged KV cache, plugged into a transformers model as its attention function.

transformers (5.x) lets a model's own attention modules call any function registered with
``AttentionInterface.register`` (models that set ``_supports_attention_backend``): each layer computes its
queries, keys and values with RoPE applied and hands them over. We run the whole step as one flattened
row (every scheduled token of every request, batch 1, ``position_ids`` per token), and this function:

1. writes the step's keys and values into the layer's cache tensors ``[num_blocks, block_size, kv_heads,
   head_dim]`` at the slots the KV-cache manager assigned (``slot_mapping``);
2. attends each request's new queries to its whole context, gathered through its block table: all
   single-token decodes in one SDPA over a padded gather with a key mask (one call, however many
   requests), each multi-token prefill chunk in its own causal SDPA.

Written here rather than using transformers' ``paged|eager``/``generate_batch`` path because that one
owns its own cache and scheduler (no prefix sharing, no preemption, no priorities).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

ATTENTION_NAME = "ftkit_paged"


class PagedKVCache:
    """Every layer's key and value blocks: ``[num_blocks, block_size, kv_heads, head_dim]`` each."""

    def __init__(self, *, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        # Uninitialised, so a CPU process only pays for the pages it writes; the one extra slot at the end is
        # zeroed and pads the decode gathers (masked out, but uninitialised NaN times a zero weight is NaN).
        self.pad_slot = num_blocks * block_size
        shape = (self.pad_slot + 1, num_kv_heads, head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        for tensor in (*self.keys, *self.values):
            tensor[self.pad_slot].zero_()
        self.block_size = block_size

    @staticmethod
    def bytes_per_block(*, num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        """Memory one block takes over all layers, keys and values."""
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


@dataclass
class PrefillChunk:
    """A request's multi-token chunk: its queries are rows ``start:start + length`` of the step; its context
    (``context_slots``, every position so far including this chunk) ends with them."""

    start: int
    length: int
    context_slots: torch.Tensor


@dataclass
class StepAttention:
    """What the attention function needs for one step, shared by every layer."""

    cache: PagedKVCache
    slot_mapping: torch.Tensor  # [tokens]: where each new token's K/V goes
    decode_rows: torch.Tensor | None  # [decodes]: the step rows of single-token requests
    decode_slots: torch.Tensor | None  # [decodes, longest context]: their context slots, then the pad slot
    decode_mask: torch.Tensor | None  # [decodes, 1, 1, longest context]: True where a slot is real
    prefills: list[PrefillChunk]

    @classmethod
    def build(cls, cache: PagedKVCache, slot_mapping: list[int], decodes: list[tuple[int, list[int]]],
              prefills: list[tuple[int, int, list[int]]], device: torch.device) -> StepAttention:
        """``decodes``: (row, context slots); ``prefills``: (first row, length, context slots)."""
        decode_rows = decode_slots = decode_mask = None
        if decodes:
            longest = max(len(slots) for _, slots in decodes)
            padded = [slots + [cache.pad_slot] * (longest - len(slots)) for _, slots in decodes]
            lengths = torch.tensor([len(slots) for _, slots in decodes])
            decode_rows = torch.tensor([row for row, _ in decodes], device=device)
            decode_slots = torch.tensor(padded, device=device)
            decode_mask = (torch.arange(longest)[None, :] < lengths[:, None])[:, None, None, :].to(device)
        chunks = [PrefillChunk(start, length, torch.tensor(slots, device=device)) for start, length, slots in prefills]
        return cls(cache, torch.tensor(slot_mapping, device=device), decode_rows, decode_slots, decode_mask, chunks)


def paged_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: Any, scaling: float | None = None, dropout: float = 0.0,
                            **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The registered attention function: ``query`` ``[1, heads, tokens, dim]``, ``key``/``value``
    ``[1, kv_heads, tokens, dim]`` -> ``[1, tokens, heads, dim]``."""
    step: StepAttention = kwargs["ftkit_step"]
    layer = module.layer_idx
    keys, values = step.cache.keys[layer], step.cache.values[layer]
    keys.index_copy_(0, step.slot_mapping, key[0].transpose(0, 1).to(keys.dtype))
    values.index_copy_(0, step.slot_mapping, value[0].transpose(0, 1).to(values.dtype))
    queries = query[0].transpose(0, 1)  # [tokens, heads, dim]
    only_decodes = not step.prefills  # then the decode rows are all the rows, in order: no gather, no scatter
    output = None if only_decodes else torch.empty_like(queries)
    if step.decode_rows is not None:
        q = (queries if only_decodes else queries[step.decode_rows])[:, :, None, :]  # [decodes, heads, 1, dim]
        shape = (*step.decode_slots.shape, *keys.shape[1:])  # index_select: about twice as fast as keys[slots]
        k = keys.index_select(0, step.decode_slots.view(-1)).view(shape).transpose(1, 2)  # [decodes, kv_heads, context, dim]
        v = values.index_select(0, step.decode_slots.view(-1)).view(shape).transpose(1, 2)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=step.decode_mask, scale=scaling, enable_gqa=True)
        if only_decodes:
            return attended.transpose(1, 2).reshape(1, -1, *queries.shape[1:]), None
        output[step.decode_rows] = attended[:, :, 0, :]
    for chunk in step.prefills:
        q = queries[chunk.start:chunk.start + chunk.length].transpose(0, 1)[None]  # [1, heads, length, dim]
        k = keys.index_select(0, chunk.context_slots).transpose(0, 1)[None]
        v = values.index_select(0, chunk.context_slots).transpose(0, 1)[None]
        context = chunk.context_slots.numel()
        if context == chunk.length:
            attended = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=True)
        else:  # a later chunk, or a prompt after a prefix-cache hit: queries sit at the end of the context
            offset = context - chunk.length
            mask = torch.arange(context, device=q.device)[None, :] <= (
                torch.arange(chunk.length, device=q.device)[:, None] + offset)
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=True)
        output[chunk.start:chunk.start + chunk.length] = attended[0].transpose(0, 1)
    return output[None], None


def register_paged_attention() -> None:
    """Make ``ATTENTION_NAME`` a transformers attention implementation (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, paged_attention_forward)
