"""``LLMEngine``: requests in, tokens out, one scheduled step at a time.

It wires the pieces together (block pool -> KV-cache manager -> scheduler -> model runner -> sampler ->
output processor) and keeps what belongs to a caller's request: its ``n`` samples, its errors. A bad
request (a prompt longer than ``max_model_len``, a bad sampling parameter, an unknown adapter) is refused
by ``add_request`` with one ``FtkitError`` and a failing sample ends only that request: the engine and
the other requests go on.

``n > 1`` samples share the prompt's blocks: the first sample is scheduled alone and its siblings join once
its prompt is in the cache, so they find every full prompt block there (prefix caching) and compute only
the last, partial one.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftkit.engine.block_pool import BlockPool
from ftkit.engine.cpu_weights import can_pack, pack_linear_weights
from ftkit.engine.kv_cache_manager import KVCacheManager
from ftkit.engine.lora import MultiLoRA
from ftkit.engine.model_runner import (
    PagedModelRunner,
    RecomputeModelRunner,
    model_geometry,
    supports_paged_attention,
)
from ftkit.engine.options import EngineOptions, plan_kv_blocks
from ftkit.engine.output_processor import append_token, detokenize
from ftkit.engine.paged_attention import PagedKVCache
from ftkit.engine.request import CompletionOutput, Request, RequestOutput, SamplingParams
from ftkit.engine.sampler import sample_step
from ftkit.engine.scheduler import Scheduler
from ftkit.errors import FtkitError
from ftkit.models import resolve_adapter_dir

Prompt = str | Sequence[int]


@dataclass
class EngineStats:
    steps: int = 0
    peak_used_blocks: int = 0
    num_preemptions: int = 0


@dataclass
class _Group:
    """One caller request: its samples (``deferred`` ones wait for the first sample's prompt to be cached)."""

    request_id: str
    samples: list[Request]
    deferred: list[Request] = field(default_factory=list)
    arrival: float = field(default_factory=time.monotonic)

    @property
    def finished(self) -> bool:
        return not self.deferred and all(s.finished for s in self.samples)


def eos_token_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """The ids that end a sequence: the generation config's eos ids and the tokenizer's."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return frozenset(ids)


class LLMEngine:
    """Continuous batching over a loaded causal LM (``ftkit.models.load_for_inference`` gives one)."""

    def __init__(self, model: Any, tokenizer: Any, options: EngineOptions | None = None) -> None:
        self.options = options = options or EngineOptions()
        options.validate()
        self.model, self.tokenizer = model, tokenizer
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.eos_token_ids = eos_token_ids(model, tokenizer)
        num_layers, kv_heads, head_dim = model_geometry(model)
        bytes_per_block = PagedKVCache.bytes_per_block(num_layers=num_layers, block_size=options.block_size,
                                                       num_kv_heads=kv_heads, head_dim=head_dim, dtype=self.dtype)
        model_max_len = getattr(model.config, "max_position_embeddings", None) or 2048
        self.num_blocks, self.max_model_len = plan_kv_blocks(options, bytes_per_block=bytes_per_block,
                                                             model_max_len=model_max_len, device=self.device)
        self.pool = BlockPool(self.num_blocks, enable_caching=options.enable_prefix_caching)
        self.kv_cache = KVCacheManager(self.pool, options.block_size)
        self.scheduler = Scheduler(self.kv_cache, max_num_seqs=options.max_num_seqs,
                                   max_num_batched_tokens=options.max_num_batched_tokens,
                                   policy=options.scheduling_policy)
        if options.pack_weights and can_pack(self.device, self.dtype):
            pack_linear_weights(model, batch_hint=options.max_num_seqs)
        self.lora = MultiLoRA(model, max_loras=options.max_loras) if options.max_loras else None
        if supports_paged_attention(model):
            self.runner: PagedModelRunner | RecomputeModelRunner = PagedModelRunner(
                model, self.kv_cache, num_blocks=self.num_blocks, dtype=self.dtype, device=self.device, lora=self.lora)
        else:
            self.runner = RecomputeModelRunner(model, self.device, lora=self.lora)
        self.stats = EngineStats()
        self._groups: dict[str, _Group] = {}

    @classmethod
    def from_inference_model(cls, loaded: Any, options: EngineOptions | None = None) -> LLMEngine:
        """An engine over ``ftkit.models.load_for_inference``'s result."""
        return cls(loaded.model, loaded.tokenizer, options)

    # ---- requests ---------------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams | None = None, *,
                    priority: int = 0, adapter: str | None = None) -> None:
        """Queue a request; raise ``FtkitError`` (and queue nothing) when it cannot be served."""
        params = params or SamplingParams()
        if request_id in self._groups:
            raise FtkitError(f"Request id {request_id!r} is already in use; give each request its own id.")
        token_ids = self._encode(prompt)
        if not token_ids:
            raise FtkitError(f"Request {request_id!r} has an empty prompt; give it at least one token.")
        if len(token_ids) >= self.max_model_len:
            raise FtkitError(f"Request {request_id!r}: the prompt has {len(token_ids)} tokens but max_model_len is "
                             f"{self.max_model_len}; shorten the prompt to at most {self.max_model_len - 1} tokens.")
        if any(not 0 <= t < self.vocab_size for t in token_ids):
            raise FtkitError(f"Request {request_id!r} has token ids outside the vocabulary (0..{self.vocab_size - 1}).")
        try:
            params.validate(self.vocab_size)
        except FtkitError as error:
            raise FtkitError(f"Request {request_id!r}: {error}") from None
        if adapter is not None and adapter not in self.adapters:
            known = ", ".join(self.adapters) or "none"
            raise FtkitError(f"Request {request_id!r} asks for adapter {adapter!r}, which is not loaded "
                             f"(loaded: {known}).")
        samples = [Request(request_id if params.n == 1 else f"{request_id}#{index}", token_ids, params,
                           priority=priority, adapter=adapter, eos_token_ids=self.eos_token_ids,
                           max_model_len=self.max_model_len, group_id=request_id, sample_index=index,
                           device=self.device) for index in range(params.n)]
        group = _Group(request_id, samples)
        self._groups[request_id] = group
        self.scheduler.add(samples[0])
        if self.options.enable_prefix_caching:
            group.deferred = samples[1:]
        else:
            for sample in samples[1:]:
                self.scheduler.add(sample)

    @property
    def adapters(self) -> list[str]:
        """The names of the resident LoRA adapters requests may ask for."""
        return self.lora.names if self.lora is not None else []

    def load_adapter(self, name: str, adapter: str | Path) -> None:
        """Make a saved LoRA adapter (a directory or hub id) servable as ``name``, beside the base and the others.

        Replacing an adapter that unfinished requests use is refused; replacing an idle one forgets the
        prefix cache (its entries were computed with the old weights).
        """
        if self.lora is None:
            raise FtkitError("This engine was built with max_loras: 0; build it with max_loras >= 1 to serve adapters.")
        in_use = {r.adapter for g in self._groups.values() for r in g.samples if not r.finished and r.adapter}
        if name in in_use:
            raise FtkitError(f"Adapter {name!r} is serving requests; load the new weights under another name.")
        if self.lora.load(name, resolve_adapter_dir(str(adapter)), in_use=in_use):
            self.pool.reset_prefix_cache()

    def unload_adapter(self, name: str) -> None:
        """Stop serving adapter ``name`` (refused while unfinished requests use it)."""
        if self.lora is None or name not in self.lora:
            raise FtkitError(f"No adapter named {name!r} is loaded (loaded: {', '.join(self.adapters) or 'none'}).")
        if any(r.adapter == name and not r.finished for g in self._groups.values() for r in g.samples):
            raise FtkitError(f"Adapter {name!r} is serving requests; unload it when they have finished.")
        self.lora.unload(name)

    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt)["input_ids"])
        return [int(t) for t in prompt]

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request; its blocks go back to the pool now. Returns its final output (None for an unknown
        or already finished id)."""
        group = self._groups.get(request_id)
        if group is None:
            return None
        group.deferred = []
        for sample in group.samples:
            if not sample.finished:
                sample.finish("abort")
                self.scheduler.finish(sample)
        del self._groups[request_id]
        return self._output(group)

    @property
    def has_unfinished_requests(self) -> bool:
        return any(not group.finished for group in self._groups.values())

    # ---- the step ---------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one scheduled step; return an output for every request that changed (finished ones once)."""
        changed: dict[str, _Group] = {}
        plan = self.scheduler.schedule()
        self.stats.num_preemptions += len(plan.preempted)
        self.stats.peak_used_blocks = max(self.stats.peak_used_blocks, self.pool.num_used_blocks)
        if plan.scheduled:
            self.stats.steps += 1
            logits = self.runner.execute(plan.scheduled)
            for request, count in plan.scheduled:
                request.num_computed_tokens += count
            now = time.monotonic()
            for sampled in sample_step(logits):
                request = sampled.request
                if sampled.token_id is None:
                    request.error = sampled.error
                    request.finish("error")
                else:
                    request.first_token_time = request.first_token_time or now
                    append_token(request, sampled.token_id, sampled.logprob, self.tokenizer)
                if request.finished:
                    self.scheduler.finish(request)
                changed[request.group_id] = self._groups[request.group_id]
        self._release_deferred_samples()
        outputs = [self._output(group) for group in changed.values()]
        for group in changed.values():
            if group.finished:
                del self._groups[group.request_id]
        return outputs

    def _release_deferred_samples(self) -> None:
        for group in self._groups.values():
            leader = group.samples[0]
            if group.deferred and (leader.output_token_ids or leader.finished):
                for sample in group.deferred:
                    self.scheduler.add(sample)
                group.deferred = []

    def _output(self, group: _Group) -> RequestOutput:
        leader = group.samples[0]
        completions = []
        for sample in group.samples:
            text = sample.text if sample.finished else detokenize(self.tokenizer, sample)
            completions.append(CompletionOutput(sample.sample_index, list(sample.output_token_ids), text,
                                                sample.finish_reason, sample.stop_reason,
                                                list(sample.logprobs) if sample.params.logprobs is not None else None))
        errors = [s.error for s in group.samples if s.error]
        metrics = {"arrival": group.arrival}
        if leader.first_token_time is not None:
            metrics["first_token"] = leader.first_token_time
        return RequestOutput(group.request_id, list(leader.prompt_token_ids), completions, group.finished,
                             list(leader.prompt_logprobs) if leader.params.prompt_logprobs is not None else None,
                             errors[0] if errors else None, metrics)

    # ---- convenience ------------------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams] | None = None,
                 *, priorities: Sequence[int] | None = None,
                 adapters: Sequence[str | None] | None = None) -> list[RequestOutput]:
        """Run ``prompts`` to completion; one output per prompt, in order (a refused prompt's carries ``error``)."""
        every = list(params) if isinstance(params, Sequence) else [params or SamplingParams()] * len(prompts)
        results: dict[str, RequestOutput] = {}
        ids = [f"generate-{id(self)}-{time.monotonic_ns()}-{index}" for index in range(len(prompts))]
        for index, (request_id, prompt) in enumerate(zip(ids, prompts, strict=True)):
            try:
                self.add_request(request_id, prompt, every[index], priority=priorities[index] if priorities else 0,
                                 adapter=adapters[index] if adapters else None)
            except FtkitError as error:
                token_ids = list(prompt) if not isinstance(prompt, str) else []
                results[request_id] = RequestOutput(request_id, token_ids, [], True, error=str(error))
        while self.has_unfinished_requests:
            for output in self.step():
                if output.finished:
                    results[output.request_id] = output
        return [results[request_id] for request_id in ids]

    def free_blocks_all_returned(self) -> bool:
        """True when no block is in use (every request finished or aborted)."""
        return self.pool.num_free_blocks == self.pool.num_blocks
