"""A soak: a few hundred mixed requests at a real ``ftkit serve`` (streaming and not, cancelled mid-stream, three
models from one base, malformed ones), 16 in flight at a time. Every request gets what it should, every KV
block is back in the pool at the end, and memory does not grow from the first half to the second.
"""

from __future__ import annotations

import asyncio
import json
import random

import httpx
import psutil
import pytest
from test_engine_lora import save_random_lora

from ftkit.config import ServeConfig
from ftkit.http_server import BackgroundServer
from ftkit.serve.app import create_app
from ftkit.serve.run import build_state

REQUESTS = 320
CONCURRENCY = 16
MODELS = ["tiny", "red", "blue"]
MALFORMED = [
    ('{"model": "tiny", "messages": [', 400),
    ('{"model": "tiny", "messages": []}', 400),
    ('{"model": "nobody", "messages": [{"role": "user", "content": "x"}]}', 404),
    ('{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}', 400),
    ('{"model": "tiny", "prompt": "x", "temperature": "warm"}', 400),
]
RSS_NOISE = 64 * 2**20


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("soak-loras")
    adapters = [f"{name}={save_random_lora(tiny_llama_dir, root / name, seed)}" for name, seed in (("red", 3), ("blue", 4))]
    config = ServeConfig(model_name_or_path=str(tiny_llama_dir), served_model_name="tiny", infer_dtype="fp32",
                         device="cpu", adapter_name_or_path=adapters)
    state = build_state(config)
    with BackgroundServer(create_app(state)) as running:
        running.engine = state.front.engine
        yield running


def events(lines: list[str]) -> list[str]:
    return [line.removeprefix("data: ") for line in lines if line]


async def one_request(client: httpx.AsyncClient, index: int, rng: random.Random) -> str | None:
    """Send request ``index`` (its kind is index % 10); return a description of anything unexpected."""
    kind, model = index % 10, MODELS[index % 3]
    chat = {"model": model, "messages": [{"role": "user", "content": f"Question {index}: tell me a story."}],
            "max_tokens": rng.randint(1, 16), "temperature": rng.choice([0, 0.8]), "seed": index}
    if kind <= 3:
        response = await client.post("/chat/completions", json=chat)
        body = response.json()
        if response.status_code != 200 or body["choices"][0]["finish_reason"] not in ("stop", "length"):
            return f"{index}: {response.status_code} {response.text[:200]}"
        return None
    if kind in (4, 5, 6, 9):
        stream_body = ({**chat, "stream": True, "stream_options": {"include_usage": True}} if kind != 6 else
                       {"model": model, "prompt": f"Story {index}", "max_tokens": 200, "ignore_eos": True, "stream": True})
        if kind == 9:
            stream_body = {"model": model, "prompt": "Once upon a time", "max_tokens": 12, "stop": [" the", "e"],
                           "stream": True, "temperature": 0}
        async with client.stream("POST", "/chat/completions" if kind in (4, 5) else "/completions",
                                 json=stream_body) as response:
            if response.status_code != 200:
                return f"{index}: stream {response.status_code}"
            received = []
            async for line in response.aiter_lines():
                received.append(line)
                if kind == 6 and len(events(received)) == 3:
                    return None  # hang up mid-stream: the server must abort the request
        got = events(received)
        if got[-1] != "[DONE]" or "error" in got[-2]:
            return f"{index}: stream ended with {got[-2:]}"
        if kind in (4, 5) and not json.loads(got[-2]).get("usage"):
            return f"{index}: no usage chunk"
        return None
    if kind == 7:
        body = {"model": model, "prompt": ["One", "Two"], "max_tokens": 4, "n": 2, "logprobs": 1, "echo": True}
        response = await client.post("/completions", json=body)
        if response.status_code != 200 or len(response.json()["choices"]) != 4:
            return f"{index}: {response.status_code} {response.text[:200]}"
        return None
    content, status = MALFORMED[index % len(MALFORMED)]
    path = "/completions" if '"prompt"' in content else "/chat/completions"
    response = await client.post(path, content=content, headers={"content-type": "application/json"})
    if response.status_code != status or "error" not in response.json():
        return f"{index}: malformed got {response.status_code}, expected {status}"
    return None


async def soak(url: str, indices: range) -> list[str]:
    rng = random.Random(indices.start)
    limit = asyncio.Semaphore(CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        async def guarded(index: int) -> str | None:
            async with limit:
                try:
                    return await one_request(client, index, rng)
                except Exception as error:
                    return f"{index}: {type(error).__name__}: {error}"

        outcomes = await asyncio.gather(*(guarded(i) for i in indices))
    return [o for o in outcomes if o]


def wait_until_idle(engine, limit_s: float = 60) -> None:
    import time

    deadline = time.monotonic() + limit_s
    while engine.has_unfinished_requests or not engine.free_blocks_all_returned():
        assert time.monotonic() < deadline, "requests still hold KV blocks after the soak"
        time.sleep(0.05)


def test_hundreds_of_mixed_requests_all_answer_right_and_give_every_block_back(server):
    process = psutil.Process()
    half = REQUESTS // 2
    unexpected = asyncio.run(soak(server.url, range(0, half)))
    wait_until_idle(server.engine)
    first_half_rss = process.memory_info().rss
    unexpected += asyncio.run(soak(server.url, range(half, REQUESTS)))
    wait_until_idle(server.engine)
    second_half_rss = process.memory_info().rss
    assert unexpected == []
    assert server.engine.free_blocks_all_returned() and not server.engine.has_unfinished_requests
    assert second_half_rss - first_half_rss < RSS_NOISE, (first_half_rss, second_half_rss)
