"""Bad requests to a real ``ftkit serve`` over raw HTTP: each gets an OpenAI-style error body with the right status
(400/401/404/429, never a 500), an internal failure is a 500 for that request alone, and a client that hangs
up has its request aborted and its KV blocks freed.
"""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from ftkit.config import ServeConfig
from ftkit.http_server import BackgroundServer
from ftkit.serve.app import create_app
from ftkit.serve.run import build_state

KEY = "sekret-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
USER = [{"role": "user", "content": "Hello"}]
LONG = 1500  # tokens: far more than a test ever lets a request run when it is aborted


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    config = ServeConfig(model_name_or_path=str(tiny_llama_dir), served_model_name="tiny", infer_dtype="fp32",
                         device="cpu", api_key=KEY, max_num_seqs=2, max_waiting=0)
    state = build_state(config)
    with BackgroundServer(create_app(state)) as running:
        running.state = state
        running.engine = state.front.engine
        yield running


def post(server, path: str, body, headers=AUTH) -> httpx.Response:
    content = body if isinstance(body, str) else json.dumps(body)
    return httpx.post(f"{server.url}{path}", content=content, headers={**headers, "content-type": "application/json"})


def chat(**fields):
    return {"model": "tiny", "messages": USER, "max_tokens": 4, **fields}


# (id, path, body, status, words the message names, param)
CASES = [
    ("malformed-json", "/chat/completions", '{"model": "tiny", "messages": [', 400, ["not valid JSON"], None),
    ("body-not-an-object", "/chat/completions", "[1, 2]", 400, ["JSON object"], None),
    ("messages-missing", "/chat/completions", {"model": "tiny"}, 400, ["messages is required"], "messages"),
    ("messages-empty", "/chat/completions", chat(messages=[]), 400, ["messages is empty"], "messages"),
    ("role-unknown", "/chat/completions", chat(messages=[{"role": "robot", "content": "x"}]), 400,
     ["messages[0].role", "robot"], "messages[0].role"),
    ("image-part", "/chat/completions", chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), 400,
     ["messages[0].content[0]", "image_url", "text-only"], "messages[0].content"),
    ("temperature-a-string", "/chat/completions", chat(temperature="hot"), 400, ["temperature", "'hot'"],
     "temperature"),
    ("n-a-boolean", "/chat/completions", chat(n=True), 400, ["n:", "True"], "n"),
    ("max-tokens-zero", "/chat/completions", chat(max_tokens=0), 400, ["max_tokens must be at least 1"], "max_tokens"),
    ("max-tokens-negative", "/completions", {"model": "tiny", "prompt": "x", "max_tokens": -3}, 400,
     ["max_tokens must be at least 1, got -3"], "max_tokens"),
    ("max-tokens-past-context", "/chat/completions", chat(max_tokens=100_000), 400, ["ask for at most"], "max_tokens"),
    ("prompt-longer-than-context", "/completions", {"model": "tiny", "prompt": "sea " * 2100}, 400,
     ["max_model_len", "shorten"], "prompt"),
    ("prompt-empty-list", "/completions", {"model": "tiny", "prompt": []}, 400, ["prompt is empty"], "prompt"),
    ("prompt-wrong-type", "/completions", {"model": "tiny", "prompt": {"text": "x"}}, 400,
     ["prompt must be a string, a list of strings"], "prompt"),
    ("token-id-out-of-vocabulary", "/completions", {"model": "tiny", "prompt": [1, 10**9]}, 400,
     ["outside the vocabulary"], "prompt"),
    ("unknown-model", "/chat/completions", chat(model="gpt-4o"), 404, ["'gpt-4o' does not exist", "tiny"], "model"),
    ("tools-unsupported", "/chat/completions", chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400,
     ["tools is not supported"], "tools"),
    ("json-mode-unsupported", "/chat/completions", chat(response_format={"type": "json_object"}), 400,
     ["response_format is not supported"], "response_format"),
    ("suffix-unsupported", "/completions", {"model": "tiny", "prompt": "x", "suffix": "end"}, 400,
     ["suffix is not supported"], "suffix"),
    ("top-logprobs-too-many", "/chat/completions", chat(logprobs=True, top_logprobs=50), 400, ["top_logprobs"],
     "top_logprobs"),
    ("logit-bias-not-a-token", "/chat/completions", chat(logit_bias={"hello": 5}), 400, ["logit_bias key 'hello'"],
     "logit_bias"),
    ("top-p-out-of-range", "/chat/completions", chat(top_p=0), 400, ["top_p must be in (0, 1]"], None),
    ("stop-token-out-of-vocabulary", "/completions", {"model": "tiny", "prompt": "x", "stop_token_ids": [10**9]}, 400,
     ["stop_token_ids"], None),
    ("unknown-route", "/chat/complete", chat(), 404, ["no route POST /v1/chat/complete"], None),
]


@pytest.mark.parametrize(("path", "body", "status", "words", "param"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_bad_request_gets_an_openai_error_naming_what_is_wrong(server, path, body, status, words, param):
    response = post(server, path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    for word in words:
        assert word in error["message"], error["message"]
    assert error["param"] == param


def test_unknown_fields_are_ignored_as_openai_ignores_them(server):
    response = post(server, "/chat/completions", chat(user="u-1", store=False, metadata={"a": "b"}, reasoning=1))
    assert response.status_code == 200, response.text


def test_without_the_api_key_v1_is_401_and_health_stays_open(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        response = post(server, "/chat/completions", chat(), headers=headers)
        assert response.status_code == 401 and "API key" in response.json()["error"]["message"]
    assert httpx.get(f"{server.url}/models").status_code == 401
    assert httpx.get(f"{server.url}/models", headers=AUTH).status_code == 200
    assert httpx.get(server.url.removesuffix("/v1") + "/health").status_code == 200


def test_an_internal_error_fails_that_request_alone(server, monkeypatch):
    import ftkit.serve.app as app_module

    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(app_module, "chat_response", broken)
    failed = post(server, "/chat/completions", chat())
    monkeypatch.undo()
    assert failed.status_code == 500 and "simulated failure" in failed.json()["error"]["message"]
    assert post(server, "/chat/completions", chat()).status_code == 200
    wait_until_idle(server.engine)


def wait_until_idle(engine, limit_s: float = 60) -> None:
    deadline = time.monotonic() + limit_s
    while engine.has_unfinished_requests or not engine.free_blocks_all_returned():
        assert time.monotonic() < deadline, "the engine still has requests in flight"
        time.sleep(0.02)


def wait_until_busy(engine, limit_s: float = 60) -> None:
    deadline = time.monotonic() + limit_s
    while not engine.has_unfinished_requests:
        assert time.monotonic() < deadline, "the request never reached the engine"
        time.sleep(0.005)


def test_more_sequences_than_max_waiting_get_429_at_once_not_a_hang(server):
    body = chat(max_tokens=LONG, ignore_eos=True, n=2, stream=True)  # fills max_num_seqs=2 (+ max_waiting=0)
    with httpx.stream("POST", f"{server.url}/chat/completions", json=body, headers=AUTH) as stream:
        assert stream.status_code == 200
        lines = stream.iter_lines()  # kept: dropping the iterator closes the connection
        next(lines)
        refused = post(server, "/chat/completions", chat())
    assert refused.status_code == 429 and "busy" in refused.json()["error"]["message"]
    wait_until_idle(server.engine)
    assert post(server, "/chat/completions", chat()).status_code == 200


def test_a_client_that_hangs_up_mid_stream_has_its_request_aborted_and_blocks_freed(server):
    steps = server.engine.stats.steps
    body = chat(max_tokens=LONG, ignore_eos=True, stream=True)
    with httpx.stream("POST", f"{server.url}/chat/completions", json=body, headers=AUTH) as stream:
        assert stream.status_code == 200
        lines = stream.iter_lines()
        received = [next(lines) for _ in range(6)]
    assert all(line.startswith("data: ") or not line for line in received)
    wait_until_idle(server.engine)
    assert server.engine.stats.steps - steps < LONG  # it stopped long before its max_tokens


def test_a_client_that_hangs_up_before_a_plain_reply_has_its_request_aborted(server):
    steps = server.engine.stats.steps
    body = json.dumps(chat(max_tokens=LONG, ignore_eos=True)).encode()
    host, port = server.url.removeprefix("http://").split("/")[0].split(":")
    with socket.create_connection((host, int(port))) as connection:
        connection.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        wait_until_busy(server.engine)
    wait_until_idle(server.engine)
    assert server.engine.stats.steps - steps < LONG
