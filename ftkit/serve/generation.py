"""From an OpenAI request to engine requests and back: prompts, sampling parameters, admission, streams.

A chat is rendered with its model's chat template (``render_conversation``, as training and ``ftkit chat``
render it), encoded without extra special tokens and stopped at eos or the template's end-of-turn token,
so a greedy reply equals ``ftkit chat``'s. A completion prompt is encoded as the engine encodes text (with
the tokenizer's special tokens, as vLLM does) or taken as token ids. Everything a request could get wrong
is checked here, before the engine sees it, and refused with a 400 naming the field.

Admission is bounded: more than ``max_num_seqs + max_waiting`` sequences in flight gets a 429 at once.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from ftkit.engine import RequestOutput, SamplingParams
from ftkit.engine.async_engine import AsyncEngine
from ftkit.errors import FtkitError
from ftkit.serve.metrics import ServerMetrics
from ftkit.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest
from ftkit.serve.served_models import ServedModels, ServedName


@dataclass
class Job:
    """One HTTP request's work: its prompts (token ids), the engine parameters and who asked."""

    request_id: str
    served: ServedName
    prompts: list[list[int]]
    params: SamplingParams
    priority: int
    prompt_texts: list[str] | None = None  # for echo
    implicit_stop_ids: list[int] = field(default_factory=list)  # eos/end-of-turn added for chats

    @property
    def num_sequences(self) -> int:
        return len(self.prompts) * self.params.n


class Generation:
    """Prepares, admits and runs jobs on the asyncio engine."""

    def __init__(self, front: AsyncEngine, models: ServedModels, metrics: ServerMetrics, *,
                 max_waiting: int) -> None:
        self.front, self.models, self.metrics = front, models, metrics
        engine = front.engine
        self.max_model_len, self.vocab_size = engine.max_model_len, engine.vocab_size
        self.capacity = engine.options.max_num_seqs + max_waiting
        self.in_flight = 0
        self.engine_request_ids: set[str] = set()

    # ---- preparing ---------------------------------------------------------------------------------------

    def prepare_chat(self, request: ChatCompletionRequest) -> Job:
        from ftkit.data.templates import render_conversation

        request.refuse_unsupported()
        served = self.models.lookup(request.model)
        messages = request.conversation()
        try:
            text = render_conversation(served.tokenizer, messages, add_generation_prompt=request.add_generation_prompt)
        except FtkitError as error:
            raise APIError(400, str(error), "messages") from None
        except Exception as error:  # a template that raises on these messages (jinja's raise_exception)
            raise APIError(400, f"The chat template cannot render these messages: {error}", "messages") from None
        ids = list(served.tokenizer(text, add_special_tokens=False)["input_ids"])
        stops = [] if request.ignore_eos else served.stop_token_ids
        params = self._params(request, [ids], request.requested_max_tokens, logprobs=request.logprobs_k,
                              prompt_logprobs=None, stop_token_ids=stops, field="messages")
        return Job(f"chatcmpl-{uuid.uuid4().hex}", served, [ids], params, request.priority,
                   implicit_stop_ids=list(stops))

    def prepare_completion(self, request: CompletionRequest) -> Job:
        request.refuse_unsupported()
        served = self.models.lookup(request.model)
        prompts: list[list[int]] = []
        for index, prompt in enumerate(request.prompts()):
            ids = list(served.tokenizer(prompt)["input_ids"]) if isinstance(prompt, str) else list(prompt)
            if not ids:
                raise APIError(400, f"prompt {index} is empty; give it at least one token.", "prompt")
            if any(not 0 <= t < self.vocab_size for t in ids):
                raise APIError(400, f"prompt {index} has token ids outside the vocabulary "
                               f"(0..{self.vocab_size - 1}).", "prompt")
            prompts.append(ids)
        prompt_logprobs = request.logprobs if request.echo else None
        params = self._params(request, prompts, request.requested_max_tokens, logprobs=request.logprobs,
                              prompt_logprobs=prompt_logprobs, stop_token_ids=[], field="prompt")
        texts = None
        if request.echo:
            texts = [p if isinstance(p, str) else served.tokenizer.decode(p) for p in request.prompts()]
        return Job(f"cmpl-{uuid.uuid4().hex}", served, prompts, params, request.priority, texts)

    def _params(self, request: Any, prompts: list[list[int]], requested: int | None, *, logprobs: int | None,
                prompt_logprobs: int | None, stop_token_ids: list[int], field: str) -> SamplingParams:
        longest = max(len(p) for p in prompts)
        room = self.max_model_len - longest
        if room < 1:
            raise APIError(400, f"The prompt has {longest} tokens but this server's context (max_model_len) is "
                           f"{self.max_model_len} tokens; shorten it to at most {self.max_model_len - 1} tokens.",
                           field)
        if requested is not None and requested > room:
            raise APIError(400, f"max_tokens {requested} plus the prompt's {longest} tokens exceed the context of "
                           f"{self.max_model_len} tokens; ask for at most {room} tokens.", "max_tokens")
        params = request.sampling_params(max_tokens=requested or room, logprobs=logprobs,
                                         prompt_logprobs=prompt_logprobs, stop_token_ids=stop_token_ids,
                                         vocab_size=self.vocab_size)
        try:
            params.validate(self.vocab_size)
        except FtkitError as error:
            raise APIError(400, str(error).removeprefix("Sampling parameter "), None) from None
        return params

    # ---- running -----------------------------------------------------------------------------------------

    def admit(self, job: Job) -> None:
        """Hold a place for ``job`` (give it back with ``release``); a 429 at once when the server is full."""
        if self.in_flight and self.in_flight + job.num_sequences > self.capacity:
            raise APIError(429, f"The server is busy ({self.in_flight} sequences in flight, at most "
                           f"{self.capacity}); retry shortly.")
        self.in_flight += job.num_sequences
        if job.served.adapter:
            self.models.busy[job.served.adapter] += 1

    def release(self, job: Job) -> None:
        self.in_flight -= job.num_sequences
        if job.served.adapter:
            self.models.busy[job.served.adapter] -= 1

    async def stream(self, job: Job) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Every prompt's outputs as they come: (prompt index, output); closing the iterator aborts them all."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int) -> None:
            request_id = f"{job.request_id}-{index}"
            self.engine_request_ids.add(request_id)
            try:
                async for output in self.front.generate(request_id, job.prompts[index], job.params,
                                                        priority=job.priority, adapter=job.served.adapter):
                    if output.finished:
                        self._observe(output)
                    await queue.put((index, output))
            except FtkitError as error:  # refused by the engine after all (an adapter evicted meanwhile)
                await queue.put((index, APIError(400, str(error))))
            except Exception as error:
                await queue.put((index, error))
            finally:
                self.engine_request_ids.discard(request_id)

        tasks = [asyncio.create_task(pump(index)) for index in range(len(job.prompts))]
        remaining = len(tasks)
        try:
            while remaining:
                index, item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                remaining -= item.finished
                yield index, item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def run(self, job: Job) -> list[RequestOutput]:
        """Every prompt's finished output, in prompt order."""
        finals: dict[int, RequestOutput] = {}
        stream = self.stream(job)
        try:
            async for index, output in stream:
                if output.finished:
                    finals[index] = output
        finally:
            await stream.aclose()
        return [finals[index] for index in range(len(job.prompts))]

    async def abort_all(self) -> None:
        """Abort every request in flight: each ends with finish_reason ``abort`` and what it generated so far."""
        for request_id in list(self.engine_request_ids):
            await self.front.abort(request_id)

    def _observe(self, output: RequestOutput) -> None:
        self.metrics.observe_generation(
            prompt_tokens=len(output.prompt_token_ids),
            generated_tokens=sum(len(c.token_ids) for c in output.outputs),
            arrival=output.metrics.get("arrival", time.monotonic()), first_token=output.metrics.get("first_token"),
            finished=time.monotonic())
