"""The one HTTP server runner of ``ftkit serve`` and ``ftkit board``: a bound socket, uvicorn, a clean stop;
and the two checks both make of a request's address and secret (``is_loopback``, ``bearer_matches``).

The socket is bound before anything slow (loading a model), so a port in use is reported at once, and
port 0 picks a free one. On SIGTERM or SIGINT the server stops accepting connections, lets the requests
in flight finish for ``shutdown_timeout`` seconds, calls ``on_timeout`` (serve aborts what is left, so its
clients get what was generated so far) and returns; uvicorn's habit of re-raising the signal afterwards
(which would end the process with the signal's status, not 0) is turned off.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import signal
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

from ftkit.errors import FtkitError

_ABORT_GRACE_S = 5  # after aborting, seconds for the aborted streams to send their last chunk


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address, IPv6 with or without brackets) is this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bearer_matches(authorization: str, secret: str) -> bool:
    """Whether an ``Authorization`` header is ``Bearer <secret>`` (compared in constant time)."""
    scheme, _, token = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), secret.encode())


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


class HttpServer:
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


class BackgroundServer:
    """``with BackgroundServer(app) as server:`` serves ``app`` from a thread on a free loopback port (tests,
    notebooks, benchmarks); ``server.root`` is its address, ``server.url`` the OpenAI API's base URL under it."""

    def __init__(self, app: Any, *, host: str = "127.0.0.1", port: int = 0, shutdown_timeout: float = 5) -> None:
        self.sock = bind_socket(host, port)
        self.port = self.sock.getsockname()[1]
        self.root = f"http://{host}:{self.port}"
        self.url = f"{self.root}/v1"
        self._server = HttpServer(app, shutdown_timeout=shutdown_timeout)
        self._thread = threading.Thread(target=self._server.serve, args=(self.sock,), name="ftkit-http", daemon=True)

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
