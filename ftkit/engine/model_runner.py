"""Runs one scheduled step through the model and returns the logits the sampler needs.

``PagedModelRunner`` flattens every scheduled token of every request into one row (batch 1, a position per
token, no transformers cache) and runs the model's own modules with ``paged_attention_forward`` as their
attention function (see ``paged_attention``), so no padding is ever computed and the K/V stay in the
paged cache between steps. The LM head runs only at rows whose logits are used (``logits_to_keep``): the
last token of each request whose tokens are all computed, and prompt positions when prompt log-probabilities
are asked for.

``RecomputeModelRunner`` is the slow path for a model the paged runner cannot drive (no attention-backend
support, sliding-window layers): it recomputes each sampling request's whole sequence with the model's own
attention every step. It is correct, logged once, and quadratic in the sequence length.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ftkit.engine.kv_cache_manager import KVCacheManager
from ftkit.engine.lora import MultiLoRA
from ftkit.engine.paged_attention import ATTENTION_NAME, PagedKVCache, StepAttention, register_paged_attention
from ftkit.engine.request import Request

logger = logging.getLogger(__name__)


@dataclass
class RequestLogits:
    """Where one request's logits are in a step's result: the next-token row, and prompt rows
    ``(first row, first position, count)`` (the row for position p scores prompt token p + 1)."""

    request: Request
    sample_row: int | None
    prompt_rows: tuple[int, int, int] | None


@dataclass
class StepLogits:
    logits: torch.Tensor  # [rows, vocab], float32
    requests: list[RequestLogits]


def model_geometry(model: Any) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of a causal LM's config."""
    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, head_dim


def supports_paged_attention(model: Any) -> bool:
    """True when every layer is full attention dispatched through transformers' attention interface."""
    config = model.config
    if not getattr(model, "_supports_attention_backend", False) or not getattr(config, "is_causal", True):
        return False
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return all(kind == "full_attention" for kind in layer_types)
    return getattr(config, "sliding_window", None) is None or not getattr(config, "use_sliding_window", True)


def _plan_rows(plan: list[tuple[Request, int]]) -> tuple[list[int], list[RequestLogits]]:
    """The step rows whose logits are needed, and each request's place among them."""
    rows: list[int] = []
    placed: list[RequestLogits] = []
    first_row = 0
    for request, count in plan:
        start, end = request.num_computed_tokens, request.num_computed_tokens + count
        prompt_rows = None
        if request.wants_prompt_logprobs:
            first = max(start, len(request.prompt_logprobs) - 1)
            last = min(end, request.num_prompt_tokens - 1)
            if last > first:
                prompt_rows = (len(rows), first, last - first)
                rows.extend(first_row + p - start for p in range(first, last))
        sample_row = None
        if end == request.num_tokens:
            sample_row = len(rows)
            rows.append(first_row + count - 1)
        placed.append(RequestLogits(request, sample_row, prompt_rows))
        first_row += count
    return rows, placed


@contextlib.contextmanager
def _lora_step(lora: MultiLoRA | None, plan: list[tuple[Request, int]], device: torch.device) -> Iterator[None]:
    """Tell the LoRA layers which step rows belong to which adapter, for one forward."""
    if lora is None or not any(request.adapter for request, _ in plan):
        yield
        return
    lora.begin_step([request.adapter for request, count in plan for _ in range(count)], device)
    try:
        yield
    finally:
        lora.end_step()


class PagedModelRunner:
    """One batched step of a transformers causal LM over the paged KV cache."""

    def __init__(self, model: Any, kv_cache: KVCacheManager, *, num_blocks: int, dtype: torch.dtype,
                 device: torch.device, lora: MultiLoRA | None = None) -> None:
        register_paged_attention()
        self.model, self.kv_cache, self.device, self.lora = model, kv_cache, device, lora
        num_layers, kv_heads, head_dim = model_geometry(model)
        self.cache = PagedKVCache(num_layers=num_layers, num_blocks=num_blocks, block_size=kv_cache.block_size,
                                  num_kv_heads=kv_heads, head_dim=head_dim, dtype=dtype, device=device)
        # A ready 4-D mask makes transformers skip building one; our attention function ignores it.
        self._no_mask = torch.zeros(1, 1, 1, 1, dtype=torch.bool, device=device)

    @contextlib.contextmanager
    def _paged_attention(self) -> Iterator[None]:
        config = self.model.config
        previous = config._attn_implementation
        config._attn_implementation = ATTENTION_NAME
        try:
            yield
        finally:
            config._attn_implementation = previous

    @torch.inference_mode()
    def execute(self, plan: list[tuple[Request, int]]) -> StepLogits:
        """Compute the plan's tokens (writing their K/V) and return the logits at the rows that need them."""
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        decodes: list[tuple[int, list[int]]] = []
        prefills: list[tuple[int, int, list[int]]] = []
        for request, count in plan:
            start, end = request.num_computed_tokens, request.num_computed_tokens + count
            row = len(tokens)
            tokens.extend(request.all_token_ids[start:end])
            positions.extend(range(start, end))
            context = self.kv_cache.slot_mapping(request, 0, end)
            slots.extend(context[start:])
            if count == 1:
                decodes.append((row, context))
            else:
                prefills.append((row, count, context))
        rows, placed = _plan_rows(plan)
        step = StepAttention.build(self.cache, slots, decodes, prefills, self.device)
        with self._paged_attention(), _lora_step(self.lora, plan, self.device):
            output = self.model(
                input_ids=torch.tensor([tokens], device=self.device),
                position_ids=torch.tensor([positions], device=self.device),
                attention_mask=self._no_mask, use_cache=False,
                logits_to_keep=torch.tensor(rows, dtype=torch.long, device=self.device), ftkit_step=step)
        return StepLogits(output.logits[0].float(), placed)


class RecomputeModelRunner:
    """The slow, general path: each sampling request's whole sequence through the model's own forward."""

    def __init__(self, model: Any, device: torch.device, lora: MultiLoRA | None = None) -> None:
        self.model, self.device, self.lora = model, device, lora
        logger.warning("The engine does not know how to page the KV cache of %s; using the slower path that "
                       "recomputes each sequence every step.", type(model).__name__)

    @torch.inference_mode()
    def execute(self, plan: list[tuple[Request, int]]) -> StepLogits:
        _, placed = _plan_rows(plan)
        pieces: list[torch.Tensor] = []
        for (request, count), item in zip(plan, placed, strict=True):
            if item.sample_row is None and item.prompt_rows is None:
                continue
            ids = torch.tensor([request.all_token_ids[:request.num_computed_tokens + count]], device=self.device)
            with _lora_step(self.lora, [(request, ids.shape[1])], self.device):
                logits = self.model(input_ids=ids, use_cache=False).logits[0].float()
            if item.prompt_rows is not None:
                _, first, num_rows = item.prompt_rows
                pieces.append(logits[first:first + num_rows])
            if item.sample_row is not None:
                pieces.append(logits[-1:])
        vocab = self.model.config.vocab_size
        logits = torch.cat(pieces) if pieces else torch.empty(0, vocab, device=self.device)
        return StepLogits(logits, placed)

