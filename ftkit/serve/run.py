"""The serve recipe, top to bottom: check the address -> bind it -> load the base -> build the engine -> load the
adapters by name -> the app -> uvicorn until SIGTERM/SIGINT -> drain -> exit 0.

The socket is bound before the model is loaded, so a port in use is reported at once, and port 0 picks a
free one (the log line says which). On SIGTERM or SIGINT the server stops accepting connections, lets the
requests in flight finish for ``shutdown_timeout`` seconds, aborts the rest (their clients get what was
generated so far) and returns; uvicorn's habit of re-raising the signal afterwards (which would end the
process with the signal's status, not 0) is turned off.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.markup import escape

from ftkit.config import LoadedConfig, ServeConfig
from ftkit.errors import FtkitError

console = Console(stderr=True, highlight=False)
_ABORT_GRACE_S = 5  # after aborting, seconds for the aborted streams to send their last chunk


def _say(message: str) -> None:
    console.print(f"[bold cyan]ftkit[/] {escape(message)}", soft_wrap=True)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``; a port in use or an address this machine lacks is one sentence."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        reason = "is in use by another program; pick another port (or 0 for any free one)" if error.errno in (
            98, 48, 10048) else f"cannot be listened on ({error.strerror})"
        raise FtkitError(f"Port {port} on {host} {reason}.") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def build_state(config: ServeConfig) -> Any:
    """Load the model and adapters and build everything the app serves (``ftkit.serve.app.ServerState``)."""
    import torch

    from ftkit.engine import EngineOptions, LLMEngine
    from ftkit.engine.async_engine import AsyncEngine
    from ftkit.models import (
        LoadOptions,
        load_for_inference,
        model_source_from_config,
        parse_dtype,
        resolve_adapter_dir,
    )
    from ftkit.serve.app import ServerState
    from ftkit.serve.generation import Generation
    from ftkit.serve.metrics import ServerMetrics
    from ftkit.serve.served_models import ServedModels

    source = model_source_from_config(config)
    adapters = {name: resolve_adapter_dir(path) for name, path in config.adapter_names().items()}  # before loading
    device = torch.device(config.device) if config.device else None
    dtype = None if config.infer_dtype == "auto" else parse_dtype(config.infer_dtype)
    loaded = load_for_inference(source, template=config.template, dtype=dtype, device=device,
                                options=LoadOptions.from_config(config))
    options = EngineOptions(max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
                            max_model_len=config.max_model_len, kv_cache_memory=config.kv_cache_memory,
                            enable_prefix_caching=config.enable_prefix_caching,
                            scheduling_policy=config.scheduling_policy, max_loras=config.max_loras,
                            pack_weights=True)
    engine = LLMEngine.from_inference_model(loaded, options)
    models = ServedModels(config.served_model_name or config.model_name_or_path, source, loaded.tokenizer,
                          template=config.template, trust_remote_code=config.trust_remote_code)
    for name, adapter_dir in adapters.items():
        models.add_adapter(engine, name, str(adapter_dir))
    front = AsyncEngine(engine)
    metrics = ServerMetrics(engine)
    generation = Generation(front, models, metrics, max_waiting=config.max_waiting)
    api_key = config.api_key or os.environ.get("FTKIT_API_KEY") or None
    return ServerState(front, models, metrics, generation, api_key)


class _Server:
    """uvicorn's server draining on SIGTERM/SIGINT: ``shutdown_timeout`` seconds for requests in flight, then
    ``on_timeout`` (abort them, so their clients still get a final chunk); the process then exits 0 (uvicorn's
    re-raise of the signal is left out)."""

    def __init__(self, app: Any, *, shutdown_timeout: float, on_timeout: Any = None, log_level: str = "warning") -> None:
        import uvicorn

        config = uvicorn.Config(app, log_level=log_level, lifespan="on", access_log=False,
                                timeout_graceful_shutdown=shutdown_timeout + _ABORT_GRACE_S)
        self.server = uvicorn.Server(config)
        self.server.capture_signals = self._capture_signals  # type: ignore[method-assign]
        self.shutdown_timeout, self.on_timeout = shutdown_timeout, on_timeout

    @contextlib.contextmanager
    def _capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.server.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    async def _abort_after_timeout(self) -> None:
        while not self.server.should_exit:
            await asyncio.sleep(0.05)
        await asyncio.sleep(self.shutdown_timeout)
        if self.on_timeout is not None:
            await self.on_timeout()

    async def _serve(self, sock: socket.socket) -> None:
        watcher = asyncio.create_task(self._abort_after_timeout())
        try:
            await self.server.serve(sockets=[sock])
        finally:
            watcher.cancel()

    def serve(self, sock: socket.socket) -> None:
        asyncio.run(self._serve(sock))


def run_serve(loaded: LoadedConfig) -> None:
    """Run ``ftkit serve`` for a validated config until SIGTERM or SIGINT."""
    config: ServeConfig = loaded.config
    if config.infer_backend == "vllm":
        from ftkit.serve.vllm_backend import run_vllm

        run_vllm(config)
        return
    started = time.monotonic()
    sock = bind_socket(config.host, config.port)
    try:
        from ftkit.serve.app import create_app

        state = build_state(config)
        engine = state.front.engine
        host, port = sock.getsockname()[:2]
        names = ", ".join(n.name for n in state.models.names)
        _say(f"serving {names} | {engine.device.type}, {str(engine.dtype).removeprefix('torch.')}, "
             f"{engine.num_blocks} KV blocks of {engine.options.block_size} tokens, max_model_len "
             f"{engine.max_model_len}" + (" | API key required" if state.api_key else ""))
        url_host = f"[{host}]" if ":" in host else host
        _say(f"ready in {time.monotonic() - started:.1f} s: http://{url_host}:{port}/v1 (OpenAI API), /health, "
             "/metrics; Ctrl-C or SIGTERM stops it")
        _Server(create_app(state), shutdown_timeout=config.shutdown_timeout,
                on_timeout=state.generation.abort_all).serve(sock)
    finally:
        sock.close()
    _say("stopped")


class BackgroundServer:
    """``with BackgroundServer(app) as server:`` serves ``app`` from a thread on a free loopback port (tests,
    notebooks, benchmarks); ``server.url`` is the API's base URL."""

    def __init__(self, app: Any, *, host: str = "127.0.0.1", port: int = 0, shutdown_timeout: float = 5) -> None:
        self.sock = bind_socket(host, port)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}/v1"
        self._server = _Server(app, shutdown_timeout=shutdown_timeout)
        self._thread = threading.Thread(target=self._server.serve, args=(self.sock,), name="ftkit-serve", daemon=True)

    def __enter__(self) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the background server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.server.should_exit = True
        self._thread.join()
        self.sock.close()
