"""``ftkit serve`` through the official ``openai`` client: a real server on a loopback port, a tiny random Llama in
fp32 with two LoRA adapters served side by side (one saved with its own chat template, as ``ftkit train`` does).

The reference answers come from the paths users already trust: ``ftkit chat``'s ``generate_replies`` on the
model with the adapter merged, and a plain forward pass for log-probabilities.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch
from test_engine_lora import save_random_lora

from ftkit.config import ServeConfig
from ftkit.http_server import BackgroundServer
from ftkit.models import load_for_inference
from ftkit.serve.app import create_app
from ftkit.serve.run import build_state

BASE = "tiny"
CHAT = [{"role": "user", "content": "Tell me about the sea."}]


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir, tmp_path_factory):
    """Two random LoRA adapters; ``blue`` carries the tokenizer with ftkit's 'default' template beside it."""
    from transformers import AutoTokenizer

    from ftkit.data.templates import apply_chat_template_to_tokenizer

    root = tmp_path_factory.mktemp("serve-loras")
    found = {name: save_random_lora(tiny_llama_dir, root / name, seed) for name, seed in (("red", 1), ("blue", 2))}
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    apply_chat_template_to_tokenizer(tokenizer, "default")
    tokenizer.save_pretrained(found["blue"])
    return found


@pytest.fixture(scope="module")
def server(tiny_llama_dir, adapters):
    config = ServeConfig(model_name_or_path=str(tiny_llama_dir), served_model_name=BASE, infer_dtype="fp32",
                         device="cpu", adapter_name_or_path=[f"{name}={path}" for name, path in adapters.items()])
    state = build_state(config)
    with BackgroundServer(create_app(state)) as running:
        running.state = state
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)


def chat_answer(base_dir, adapter_dir, max_new_tokens: int) -> str:
    """What ``ftkit chat --model BASE --adapter ADAPTER --prompt ...`` prints (fp32, adapter merged)."""
    from ftkit.engine.replies import generate_replies

    loaded = load_for_inference(str(base_dir), [adapter_dir] if adapter_dir else None, dtype=torch.float32,
                                device=torch.device("cpu"))
    return generate_replies(loaded.model, loaded.tokenizer, [CHAT], max_new_tokens=max_new_tokens)[0].text


def test_models_lists_the_base_and_each_adapter(client):
    models = {m.id: m for m in client.models.list()}
    assert list(models) == [BASE, "red", "blue"]
    assert models["red"].model_extra["parent"] == BASE and models[BASE].model_extra["parent"] is None


@pytest.mark.parametrize("name", [BASE, "red", "blue"])
def test_greedy_chat_through_the_server_equals_ftkit_chat(client, tiny_llama_dir, adapters, name):
    expected = chat_answer(tiny_llama_dir, adapters.get(name), 24)
    reply = client.chat.completions.create(model=name, messages=CHAT, max_tokens=24, temperature=0)
    assert reply.choices[0].message.content.strip() == expected
    assert reply.usage.completion_tokens <= 24 and reply.choices[0].finish_reason in ("stop", "length")


def test_the_adapter_with_its_own_template_is_prompted_with_it(client):
    plain = client.completions.create(model="blue", prompt="Human: Tell me about the sea.\nAssistant:", max_tokens=1,
                                      temperature=0, echo=True)
    chat = client.chat.completions.create(model="blue", messages=CHAT, max_tokens=1, temperature=0)
    red = client.chat.completions.create(model="red", messages=CHAT, max_tokens=1, temperature=0)
    assert chat.usage.prompt_tokens != red.usage.prompt_tokens  # blue renders 'default', red chatml
    assert plain.choices[0].text.startswith("Human:")


def test_completions_take_a_string_a_list_and_token_ids(client, server):
    tokenizer = server.state.models.base.tokenizer
    ids = tokenizer("Once upon a time")["input_ids"]
    by_text = client.completions.create(model=BASE, prompt="Once upon a time", max_tokens=8, temperature=0)
    by_ids = client.completions.create(model=BASE, prompt=ids, max_tokens=8, temperature=0)
    several = client.completions.create(model=BASE, prompt=["Once upon a time", "The sea"], max_tokens=8,
                                        temperature=0, n=2)
    assert by_text.choices[0].text == by_ids.choices[0].text
    assert [c.index for c in several.choices] == [0, 1, 2, 3]
    assert several.choices[0].text == several.choices[1].text == by_text.choices[0].text  # greedy: n equal
    assert several.usage.prompt_tokens == len(ids) + len(tokenizer("The sea")["input_ids"])
    assert several.usage.completion_tokens == 4 * 8


def test_streamed_chat_joins_to_the_non_streamed_reply_and_ends_with_usage_and_done(client, server):
    request = {"model": "red", "messages": CHAT, "max_tokens": 20, "temperature": 0}
    whole = client.chat.completions.create(**request)
    chunks = list(client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    with httpx.stream("POST", f"{server.url}/completions", json={"model": BASE, "prompt": "Hi", "max_tokens": 4,
                                                                 "stream": True}) as response:
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_n_samples_differ_and_a_seed_reproduces_them(client):
    request = {"model": BASE, "messages": CHAT, "max_tokens": 12, "temperature": 1.0, "n": 3, "seed": 7}
    first = client.chat.completions.create(**request)
    again = client.chat.completions.create(**request)
    other = client.chat.completions.create(**{**request, "seed": 8})
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2] and len(set(texts)) == 3
    assert texts == [c.message.content for c in again.choices]
    assert texts != [c.message.content for c in other.choices]


def test_a_stop_string_cuts_the_reply_there_and_finishes_with_stop(client):
    request = {"model": BASE, "prompt": "The sea is", "max_tokens": 16, "temperature": 0}
    full = client.completions.create(**request).choices[0].text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    cut = client.completions.create(**request, stop=[stop])
    streamed = list(client.completions.create(**request, stop=stop, stream=True))
    expected = full[:full.index(stop)]
    assert cut.choices[0].text == expected and cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].model_extra["stop_reason"] == stop
    assert "".join(c.choices[0].text for c in streamed) == expected


def test_echo_returns_the_prompt_logprobs_a_forward_pass_gives(client, server, tiny_llama_dir):
    tokenizer = server.state.models.base.tokenizer
    ids = tokenizer("The sea is deep and blue")["input_ids"]
    reply = client.completions.create(model=BASE, prompt=ids, max_tokens=1, temperature=0, echo=True, logprobs=1)
    logprobs = reply.choices[0].logprobs
    loaded = load_for_inference(str(tiny_llama_dir), dtype=torch.float32, device=torch.device("cpu"))
    with torch.no_grad():
        expected = torch.log_softmax(loaded.model(torch.tensor([ids])).logits[0].float(), -1)
    assert logprobs.token_logprobs[0] is None and len(logprobs.tokens) == len(ids) + 1
    for position in range(1, len(ids)):
        assert logprobs.token_logprobs[position] == pytest.approx(expected[position - 1, ids[position]].item(), abs=1e-4)
        assert len(logprobs.top_logprobs[position]) in (1, 2)  # top 1, plus the token itself when it is not top
    assert reply.choices[0].text.startswith("The sea is deep and blue")
    assert reply.choices[0].logprobs.token_logprobs[-1] == pytest.approx(expected[-1].max().item(), abs=1e-4)


def test_chat_logprobs_give_each_token_and_its_top_alternatives(client):
    reply = client.chat.completions.create(model=BASE, messages=CHAT, max_tokens=6, temperature=0, logprobs=True,
                                           top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= entry.top_logprobs[2].logprob


def test_ignore_eos_and_min_tokens_and_priority_are_honoured(client):
    reply = client.completions.create(model=BASE, prompt="Hello", max_tokens=10, temperature=0,
                                      extra_body={"ignore_eos": True, "min_tokens": 10, "priority": -1})
    assert reply.usage.completion_tokens == 10 and reply.choices[0].finish_reason == "length"


def test_adapters_load_and_unload_while_serving(client, server, adapters):
    load = httpx.post(f"{server.url}/load_lora_adapter", json={"lora_name": "green", "lora_path": str(adapters["red"])})
    assert load.status_code == 200, load.text
    green = client.chat.completions.create(model="green", messages=CHAT, max_tokens=8, temperature=0)
    red = client.chat.completions.create(model="red", messages=CHAT, max_tokens=8, temperature=0)
    assert green.choices[0].message.content == red.choices[0].message.content  # same weights
    assert httpx.post(f"{server.url}/unload_lora_adapter", json={"lora_name": "green"}).status_code == 200
    with pytest.raises(openai.NotFoundError, match="'green' does not exist"):
        client.chat.completions.create(model="green", messages=CHAT, max_tokens=8)
    missing = httpx.post(f"{server.url}/load_lora_adapter", json={"lora_name": "x", "lora_path": "/no/such/adapter"})
    assert missing.status_code == 400 and "/no/such/adapter" in missing.json()["error"]["message"]


def test_metrics_count_requests_tokens_and_show_the_kv_pool(client, server):
    client.chat.completions.create(model=BASE, messages=CHAT, max_tokens=4, temperature=0)
    text = httpx.get(server.url.removesuffix("/v1") + "/metrics").text
    for name in ('ftkit_requests_total{endpoint="/v1/chat/completions",status="200"}', "ftkit_generation_tokens_total",
                 "ftkit_prompt_tokens_total", "ftkit_kv_blocks_free", "ftkit_kv_blocks_used",
                 "ftkit_prefix_cache_hit_rate", "ftkit_time_to_first_token_seconds_bucket",
                 "ftkit_time_per_output_token_seconds_bucket", "ftkit_e2e_request_latency_seconds_bucket",
                 "ftkit_requests_running", "ftkit_requests_waiting"):
        assert name in text, name
    assert httpx.get(server.url.removesuffix("/v1") + "/health").status_code == 200
