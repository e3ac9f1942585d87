"""The asyncio front: concurrent requests stream what the engine generates, abort frees blocks, a refused
request raises in its caller only."""

from __future__ import annotations

import asyncio

import pytest
import torch

from ftkit.engine import LLMEngine, SamplingParams
from ftkit.engine.async_engine import AsyncEngine
from ftkit.errors import FtkitError
from ftkit.models import load_for_inference

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load_for_inference(str(tiny_llama_dir), dtype=torch.float32, device=torch.device("cpu"))


async def collect(front: AsyncEngine, request_id: str, prompt: str, params: SamplingParams) -> list:
    return [output async for output in front.generate(request_id, prompt, params)]


def test_concurrent_streams_give_what_the_engine_gives_and_abort_frees_the_blocks(tiny):
    prompts = ["Once upon a time", "The capital of France is", "def main():"]
    expected = [o.outputs[0].token_ids for o in LLMEngine.from_inference_model(tiny).generate(prompts, GREEDY)]
    engine = LLMEngine.from_inference_model(tiny)

    async def scenario():
        async with AsyncEngine(engine) as front:
            streams = [asyncio.create_task(collect(front, f"r{i}", p, GREEDY)) for i, p in enumerate(prompts)]
            long = front.generate("long", "Tell me a story", SamplingParams(temperature=0, max_tokens=10_000))
            first = await anext(long)
            await front.abort("long")
            rest = [output async for output in long]
            with pytest.raises(FtkitError, match="max_tokens must be at least 1"):
                await collect(front, "bad", "Hello", SamplingParams(max_tokens=0))
            return await asyncio.gather(*streams), first, rest

    results, first, rest = asyncio.run(scenario())
    for outputs, tokens in zip(results, expected, strict=True):
        assert outputs[-1].finished and outputs[-1].outputs[0].token_ids == tokens
        growing = [len(o.outputs[0].token_ids) for o in outputs]
        assert growing == sorted(growing) and len(outputs) > 1  # streamed, step by step
    assert not first.finished and rest[-1].outputs[0].finish_reason == "abort"
    assert engine.free_blocks_all_returned()


def test_a_caller_that_stops_listening_aborts_its_request(tiny):
    engine = LLMEngine.from_inference_model(tiny)

    async def scenario():
        async with AsyncEngine(engine) as front:
            stream = front.generate("gone", "Hello there", SamplingParams(temperature=0, max_tokens=10_000))
            await anext(stream)
            await stream.aclose()
            await collect(front, "after", "Hi", GREEDY)  # one more request: the abort has been applied
            assert await front.between_steps(lambda: engine.pool.num_used_blocks) == 0
            with pytest.raises(FtkitError, match="No adapter named 'x' is loaded"):
                await front.between_steps(lambda: engine.unload_adapter("x"))

    asyncio.run(scenario())
    assert not engine.has_unfinished_requests and engine.free_blocks_all_returned()
