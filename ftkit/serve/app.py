"""The HTTP routes: OpenAI's /v1 API (models, chat/completions, completions, LoRA loading), /health, /metrics.

Every refusal is an OpenAI-style error body (``{"error": {"message", "type", "param", "code"}}``): 400 for a
malformed or unsupported request, 401 without the API key, 404 for an unknown model or route, 429 when
the server is full. An unexpected failure is a 500 for that request alone. A client that hangs up, while
streaming or not, has its request aborted and its KV blocks freed. With an API key every /v1 route needs
``Authorization: Bearer <key>``; /health and /metrics stay open (as in vLLM) for probes and scrapers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException

from ftkit.engine.async_engine import AsyncEngine
from ftkit.http_server import bearer_matches
from ftkit.serve.generation import Generation, Job
from ftkit.serve.metrics import ServerMetrics
from ftkit.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest
from ftkit.serve.responses import (
    StreamState,
    chat_logprobs,
    chat_response,
    completion_logprobs,
    completion_response,
    error_event,
    sse,
)
from ftkit.serve.served_models import ServedModels

logger = logging.getLogger(__name__)


@dataclass
class ServerState:
    """What the routes share: the engine front, the served names, the metrics and the API key."""

    front: AsyncEngine
    models: ServedModels
    metrics: ServerMetrics
    generation: Generation
    api_key: str | None = None


class LoadAdapterRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    lora_name: str
    lora_path: str = ""


def validation_error(error: RequestValidationError) -> APIError:
    """The first problem of a request body as one sentence naming the field."""
    first = error.errors()[0]
    if first.get("type") == "json_invalid":
        return APIError(400, f"The request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}.")
    parts = [p for p in first.get("loc", ())[1:] if isinstance(p, int) or ("[" not in p and p not in _TYPE_TAGS)]
    field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".")
    if not field:
        return APIError(400, f"The request body must be a JSON object: {first['msg'].lower()}.")
    if first.get("type") == "missing":
        return APIError(400, f"{field} is required.", field)
    got = first.get("input")
    shown = f" (got {got!r})" if not isinstance(got, (dict, list)) else ""
    top = parts[0] if isinstance(parts[0], str) else ""
    if top in _UNION_FIELDS and len(error.errors()) > 1:
        return APIError(400, f"{top} must be {_UNION_FIELDS[top]}.", top)
    return APIError(400, f"{field}: {first['msg'][0].lower()}{first['msg'][1:]}{shown}.", field)


_UNION_FIELDS = {"prompt": "a string, a list of strings, a list of token ids or a list of lists of token ids",
                 "stop": "a string or a list of strings", "messages": "a list of {role, content} messages whose "
                 "content is a string or a list of text parts"}


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "function-after", "function-plain",
              "literal", "TextPart"}


class _ClosingStream(StreamingResponse):
    """A streaming response that runs ``on_close`` however it ends (finished, client gone, shutdown)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._iterator, self._on_close = content, on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._iterator.aclose()  # type: ignore[attr-defined]
            self._on_close()


async def _until_disconnected(request: Request, work: Any) -> Any:
    """Await ``work``; if the client hangs up first, cancel it (which aborts its engine requests)."""
    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    if task not in done:
        await asyncio.gather(task, return_exceptions=True)
        return None
    return task.result()


def create_app(state: ServerState) -> FastAPI:
    """The FastAPI application serving ``state``."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        await asyncio.to_thread(state.front.shutdown)

    app = FastAPI(title="ftkit serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(_CountRequests, metrics=state.metrics)
    generation = state.generation

    async def authorized(request: Request) -> None:
        if state.api_key is None:
            return
        if not bearer_matches(request.headers.get("authorization", ""), state.api_key):
            raise APIError(401, "Missing or wrong API key: send the header 'Authorization: Bearer <key>'.")

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, error: RequestValidationError) -> JSONResponse:
        refused = validation_error(error)
        return JSONResponse(refused.body(), status_code=refused.status)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, error: HTTPException) -> JSONResponse:
        message = (f"There is no route {request.method} {request.url.path}." if error.status_code in (404, 405)
                   else str(error.detail))
        status = 404 if error.status_code == 405 else error.status_code
        return JSONResponse(APIError(status, message).body(), status_code=status)

    @app.exception_handler(Exception)
    async def _internal(_request: Request, error: Exception) -> JSONResponse:
        logger.exception("request failed")
        failure = APIError(500, f"Internal error while serving this request: {type(error).__name__}: {error}")
        return JSONResponse(failure.body(), status_code=500)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def list_models() -> dict[str, Any]:
        base = state.models.base.name
        return {"object": "list", "data": [
            {"id": served.name, "object": "model", "created": int(time.time()), "owned_by": "ftkit",
             "root": served.path, "parent": None if served.adapter is None else base,
             "max_model_len": generation.max_model_len} for served in state.models.names]}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        job = generation.prepare_chat(body)
        return await _answer(generation, job, request, body.stream,
                             lambda model: _chat_events(generation, job, model, body),
                             lambda model, outputs: chat_response(job, model, outputs[0], body.logprobs))

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: CompletionRequest, request: Request) -> Response:
        job = generation.prepare_completion(body)
        return await _answer(generation, job, request, body.stream,
                             lambda model: _completion_events(generation, job, model, body),
                             lambda model, outputs: completion_response(job, model, outputs, body.echo))

    @app.post("/v1/load_lora_adapter", dependencies=[Depends(authorized)])
    async def load_lora_adapter(body: LoadAdapterRequest) -> Response:
        if not body.lora_path:
            raise APIError(400, "lora_path is required: the adapter directory (or hub id) to load.", "lora_path")
        await state.models.load(state.front, body.lora_name, body.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", dependencies=[Depends(authorized)])
    async def unload_lora_adapter(body: LoadAdapterRequest) -> Response:
        await state.models.unload(state.front, body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    return app


async def _events(generation: Generation, job: Job, chunk: Callable[..., dict[str, Any]], opening: list[dict],
                  include_usage: bool, base: dict[str, Any]) -> AsyncIterator[str]:
    """The SSE body: opening chunks, one chunk per change, the usage chunk if asked for, ``[DONE]``."""
    state = StreamState(job)
    for payload in opening:
        yield sse(payload)
    stream = generation.stream(job)
    try:
        async for prompt_index, output in stream:
            for index, text, entries, reason in state.deltas(prompt_index, output):
                yield sse(chunk(index, text, entries, reason))
    except APIError as error:
        yield error_event(error)
        yield sse("[DONE]")
        return
    except Exception as error:  # one request's failure: reported in its stream, the server goes on
        logger.exception("streaming request failed")
        yield error_event(APIError(500, f"Internal error while serving this request: {type(error).__name__}: "
                                        f"{error}"))
        yield sse("[DONE]")
        return
    finally:
        await stream.aclose()
    if include_usage:
        yield sse({**base, "choices": [], "usage": state.usage()})
    yield sse("[DONE]")


def _chat_events(generation: Generation, job: Job, model: str, body: ChatCompletionRequest) -> AsyncIterator[str]:
    base = {"id": job.request_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
    tokenizer = job.served.tokenizer

    def chunk(index: int, text: str, entries: list, reason: str | None) -> dict[str, Any]:
        choice = {"index": index, "delta": {"content": text} if text else {},
                  "logprobs": chat_logprobs(tokenizer, entries) if body.logprobs else None, "finish_reason": reason}
        return {**base, "choices": [choice]}

    opening = [{**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                     "finish_reason": None}]} for i in range(job.params.n)]
    return _events(generation, job, chunk, opening, body.include_usage, base)


def _completion_events(generation: Generation, job: Job, model: str, body: CompletionRequest) -> AsyncIterator[str]:
    base = {"id": job.request_id, "object": "text_completion", "created": int(time.time()), "model": model}
    tokenizer = job.served.tokenizer

    def chunk(index: int, text: str, entries: list, reason: str | None) -> dict[str, Any]:
        ids = [e.token_id for e in entries]
        logprobs = completion_logprobs(tokenizer, entries, ids) if body.logprobs is not None else None
        return {**base, "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}]}

    opening = []
    if body.echo and job.prompt_texts:
        opening = [{**base, "choices": [{"index": p * job.params.n + s, "text": text, "logprobs": None,
                                         "finish_reason": None}]}
                   for p, text in enumerate(job.prompt_texts) for s in range(job.params.n)]
    return _events(generation, job, chunk, opening, body.include_usage, base)


_ROUTES = {"/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/load_lora_adapter",
           "/v1/unload_lora_adapter"}


class _CountRequests:
    """ASGI middleware counting requests by route and status for /metrics (streams count when they start)."""

    def __init__(self, app: Any, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in _ROUTES else "other"

        async def counting_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                self.metrics.observe_request(endpoint, message["status"])
            await send(message)

        await self.app(scope, receive, send=counting_send)


async def _answer(generation: Any, job: Any, request: Request, stream: bool, events: Any, respond: Any) -> Response:
    """Admit ``job``, then stream its ``events(model)`` or wait for it and return ``respond(model, outputs)``;
    a client that hangs up gets its request aborted (499)."""
    model = job.served.name
    generation.admit(job)
    if stream:
        return _ClosingStream(events(model), lambda: generation.release(job))
    try:
        outputs = await _until_disconnected(request, generation.run(job))
    finally:
        generation.release(job)
    if outputs is None:
        return Response(status_code=499)
    return JSONResponse(respond(model, outputs))
