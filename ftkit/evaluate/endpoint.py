"""Endpoint mode: the same prompts sent to an OpenAI-compatible server (``ftkit serve``, vLLM, llama.cpp).

Plain prompts go to ``/completions``, chat prompts (``--apply-chat-template``) to ``/chat/completions``;
greedy (temperature 0), the stop strings as ``stop``. At most ``max_concurrency`` requests are in flight
(threads over one httpx client). A connection error, a timeout or a 5xx answer is retried with exponential
backoff; after ``max_retries`` the run stops with one sentence naming the endpoint and the last problem
(the items finished so far are already in samples.jsonl, so ``--resume`` picks up from there).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Any

from ftkit.errors import FtkitError
from ftkit.evaluate.backends import Generation, OnDone, PromptRequest

MAX_STOP_STRINGS = 4  # OpenAI's limit on ``stop``


class EndpointBackend:
    """An OpenAI-compatible server at ``base_url`` (e.g. http://127.0.0.1:8000/v1)."""

    def __init__(self, base_url: str, *, model: str | None = None, api_key: str | None = None,
                 max_concurrency: int = 8, max_retries: int = 4, backoff_s: float = 0.25,
                 timeout_s: float = 600.0) -> None:
        import httpx

        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout_s)
        self.max_concurrency, self.max_retries, self.backoff_s = max_concurrency, max_retries, backoff_s
        self.model = model or self._served_model()

    def describe(self) -> dict[str, Any]:
        return {"model": self.model, "adapters": [], "dtype": "as served", "backend": "endpoint",
                "endpoint": self.base_url}

    def _post_or_get(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        import httpx

        problem = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                response = self.client.post(path, json=body) if body is not None else self.client.get(path)
            except httpx.TransportError as error:  # refused, reset, timed out
                problem = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
                continue
            if response.status_code >= 500:
                problem = f"HTTP {response.status_code}"
                continue
            if response.status_code >= 400:
                raise FtkitError(f"Endpoint {self.base_url}{path} refused the request with HTTP "
                                 f"{response.status_code} ({response.text[:200].strip()}); check --endpoint, "
                                 "--model and --api-key.")
            try:
                return response.json()
            except ValueError:
                raise FtkitError(f"Endpoint {self.base_url}{path} did not answer with JSON; is it an "
                                 "OpenAI-compatible server?") from None
        raise FtkitError(f"Endpoint {self.base_url} failed {self.max_retries + 1} times ({problem}); check that the "
                         "server is running at that address, then run again with --resume.")

    def _served_model(self) -> str:
        listed = self._post_or_get("/models").get("data") or []
        if not listed or not isinstance(listed[0], dict) or "id" not in listed[0]:
            raise FtkitError(f"Endpoint {self.base_url}/models lists no model; pass --model with the served name.")
        return str(listed[0]["id"])

    def _one(self, request: PromptRequest, max_tokens: int, stop: list[str]) -> Generation:
        body: dict[str, Any] = {"model": self.model, "max_tokens": max_tokens, "temperature": 0.0, "stop": stop}
        if request.messages is not None:
            answer = self._post_or_get("/chat/completions", {**body, "messages": request.messages})
            choice = answer["choices"][0]
            text, prompt = choice["message"]["content"] or "", ""
        else:
            answer = self._post_or_get("/completions", {**body, "prompt": request.prompt})
            choice = answer["choices"][0]
            text, prompt = choice["text"], request.prompt
        for s in stop:  # servers differ on whether they cut at stop strings; lm-eval cuts the text
            text = text.split(s)[0]
        return Generation(request.key, text, prompt, choice.get("finish_reason"))

    def generate(self, requests: Sequence[PromptRequest], *, max_tokens: int, stop: Sequence[str],
                 on_done: OnDone) -> None:
        stop = list(dict.fromkeys(stop))[:MAX_STOP_STRINGS]
        with ThreadPoolExecutor(max_workers=self.max_concurrency) as pool:
            futures = [pool.submit(self._one, r, max_tokens, stop) for r in requests]
            pending = set(futures)
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    if future.exception() is not None:
                        for other in pending:
                            other.cancel()
                        raise future.exception()
                    on_done(future.result())
