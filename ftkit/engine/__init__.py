"""The inference engine: continuous batching on a paged KV cache with prefix sharing and priorities.

Read in data-flow order: ``request`` (what is asked) -> ``scheduler`` (what runs each step) ->
``kv_cache_manager`` and ``block_pool`` (where its K/V live) -> ``model_runner`` and ``paged_attention``
(one batched step) -> ``sampler`` -> ``output_processor`` (stops, text) ; ``engine`` wires them,
``async_engine`` puts an asyncio front on it.
"""

from ftkit.engine.engine import LLMEngine
from ftkit.engine.options import EngineOptions
from ftkit.engine.request import CompletionOutput, RequestOutput, SamplingParams, TokenLogprob

__all__ = ["CompletionOutput", "EngineOptions", "LLMEngine", "RequestOutput", "SamplingParams", "TokenLogprob"]
