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

When many decodes share a long cached prefix (one system prompt before many questions: their block tables
start with the same physical blocks), gathering that prefix once per request per layer costs more than
the model's matrix multiplies. Then the decodes use *cascade attention* (as vLLM does for shared
prefixes): every query attends to the shared blocks in one batched matrix multiply, gathered once, and to
its own remaining blocks separately; the two partial softmaxes are merged through their log-sum-exps.

Written here rather than using transformers' ``paged|eager``/``generate_batch`` path because that one
owns its own cache and scheduler (no prefix sharing, no preemption, no priorities).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

ATTENTION_NAME = "ftkit_paged"
CASCADE_MIN_SHARED_TOKENS = 256  # a shorter shared prefix is cheaper to gather per request
CASCADE_MIN_DECODES = 4


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
    shared_slots: torch.Tensor | None = None  # cascade: the slots every decode's context starts with

    @classmethod
    def build(cls, cache: PagedKVCache, slot_mapping: list[int], decodes: list[tuple[int, list[int]]],
              prefills: list[tuple[int, int, list[int]]], device: torch.device) -> StepAttention:
        """``decodes``: (row, context slots); ``prefills``: (first row, length, context slots)."""
        decode_rows = decode_slots = decode_mask = shared_slots = None
        if decodes:
            contexts = [slots for _, slots in decodes]
            shared = shared_prefix_length(contexts, cache.block_size)
            if shared >= CASCADE_MIN_SHARED_TOKENS and len(decodes) >= CASCADE_MIN_DECODES:
                shared_slots = torch.tensor(contexts[0][:shared], device=device)
                contexts = [slots[shared:] for slots in contexts]
            longest = max(len(slots) for slots in contexts)
            padded = [slots + [cache.pad_slot] * (longest - len(slots)) for slots in contexts]
            lengths = torch.tensor([len(slots) for slots in contexts])
            decode_rows = torch.tensor([row for row, _ in decodes], device=device)
            decode_slots = torch.tensor(padded, device=device)
            decode_mask = (torch.arange(longest)[None, :] < lengths[:, None])[:, None, None, :].to(device)
        chunks = [PrefillChunk(start, length, torch.tensor(slots, device=device)) for start, length, slots in prefills]
        return cls(cache, torch.tensor(slot_mapping, device=device), decode_rows, decode_slots, decode_mask, chunks,
                   shared_slots)


def shared_prefix_length(contexts: list[list[int]], block_size: int) -> int:
    """How many leading slots every context has in common, in whole blocks (shared blocks are cached ones)."""
    first, shared = contexts[0], min(len(slots) for slots in contexts) // block_size * block_size
    for slots in contexts[1:]:
        if slots[:shared] == first[:shared]:
            continue
        common = 0
        while common + block_size <= shared and \
                slots[common:common + block_size] == first[common:common + block_size]:
            common += block_size
        shared = common
        if not shared:
            break
    return shared


def cascade_decode_attention(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, step: StepAttention,
                             scale: float) -> torch.Tensor:
    """Decode attention split at the shared prefix: ``queries`` ``[decodes, heads, dim]`` -> the same shape.

    Each part returns unnormalised outputs with their running max and sum of exponentials (in float32); the
    merge rescales both to the common max, as flash attention merges its tiles."""
    decodes, heads, dim = queries.shape
    kv_heads = keys.shape[1]
    group = heads // kv_heads  # query head h reads kv head h // group (transformers' repeat_kv)
    grouped = queries.view(decodes, kv_heads, group, dim)
    # Shared part: [kv_heads, decodes * group, dim] @ [kv_heads, dim, shared] in one batched multiply.
    shared_keys = keys.index_select(0, step.shared_slots).permute(1, 2, 0)
    shared_values = values.index_select(0, step.shared_slots).permute(1, 0, 2)
    by_kv_head = grouped.permute(1, 0, 2, 3).reshape(kv_heads, decodes * group, dim)
    scores = torch.bmm(by_kv_head, shared_keys).float() * scale
    shared_max = scores.amax(-1, keepdim=True)
    weights = torch.exp(scores - shared_max)
    shared_sum = weights.sum(-1, keepdim=True)
    shared_out = torch.bmm(weights, shared_values.float())
    # [kv_heads, decodes * group, x] -> [decodes, kv_heads, group, x]
    shared_out, shared_max, shared_sum = (t.view(kv_heads, decodes, group, -1).permute(1, 0, 2, 3)
                                          for t in (shared_out, shared_max, shared_sum))
    # Own part: each decode's remaining slots, padded and masked.
    shape = (*step.decode_slots.shape, *keys.shape[1:])
    own_keys = keys.index_select(0, step.decode_slots.view(-1)).view(shape).permute(0, 2, 3, 1)  # [d, kv, dim, len]
    own_values = values.index_select(0, step.decode_slots.view(-1)).view(shape).transpose(1, 2)  # [d, kv, len, dim]
    scores = torch.matmul(grouped, own_keys).float() * scale  # [decodes, kv_heads, group, len]
    scores = scores.masked_fill(~step.decode_mask, float("-inf"))
    own_max = scores.amax(-1, keepdim=True)
    weights = torch.exp(scores - own_max)
    own_sum = weights.sum(-1, keepdim=True)
    own_out = torch.matmul(weights, own_values.float())
    best = torch.maximum(shared_max, own_max)
    shared_scale, own_scale = torch.exp(shared_max - best), torch.exp(own_max - best)
    merged = (shared_out * shared_scale + own_out * own_scale) / (shared_sum * shared_scale + own_sum * own_scale)
    return merged.reshape(decodes, heads, dim).to(queries.dtype)


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
    if step.shared_slots is not None:
        q = queries if only_decodes else queries[step.decode_rows]
        attended = cascade_decode_attention(q, keys, values, step, scaling or q.shape[-1] ** -0.5)
        if only_decodes:
            return attended[None], None
        output[step.decode_rows] = attended
    elif step.decode_rows is not None:
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
