"""A thin asyncio front on ``LLMEngine``: submit, stream outputs, abort; the model never blocks the event loop.

The step loop runs in its own thread and owns the engine: requests and aborts reach it through a queue and
are applied between steps; each step's outputs go back to the waiting coroutines with
``call_soon_threadsafe``. A caller that stops listening (its task is cancelled, a client hung up) aborts its
request, whose blocks are freed before the next step. A refused request raises its ``FtkitError`` in the
caller, as ``LLMEngine.add_request`` does.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from typing import Any

from ftkit.engine.engine import LLMEngine, Prompt
from ftkit.engine.request import RequestOutput, SamplingParams

logger = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.05


class AsyncEngine:
    """``async for output in engine.generate(...)`` over an ``LLMEngine`` stepped in a background thread."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: queue.Queue[tuple[Callable[[], Any], Future]] = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ftkit-engine-loop", daemon=True)
        self._thread.start()

    # ---- the loop thread --------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._apply_commands(block=not self.engine.has_unfinished_requests)
            if not self.engine.has_unfinished_requests:
                continue
            try:
                outputs = self.engine.step()
            except Exception as error:  # a broken step fails the requests in flight, not the loop
                logger.exception("engine step failed")
                self._fail_all(error)
                continue
            for output in outputs:
                self._deliver(output.request_id, output, last=output.finished)

    def _apply_commands(self, *, block: bool) -> None:
        try:
            command, done = self._commands.get(timeout=_IDLE_WAIT_S) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            try:
                done.set_result(command())
            except Exception as error:
                done.set_exception(error)
            try:
                command, done = self._commands.get_nowait()
            except queue.Empty:
                return

    def _deliver(self, request_id: str, item: RequestOutput | BaseException, *, last: bool) -> None:
        stream = self._streams.pop(request_id, None) if last else self._streams.get(request_id)
        if stream is not None:
            loop, outputs = stream
            loop.call_soon_threadsafe(outputs.put_nowait, item)

    def _fail_all(self, error: BaseException) -> None:
        for request_id in list(self._streams):
            self.engine.abort(request_id)
            self._deliver(request_id, error, last=True)

    def _call(self, command: Callable[[], Any]) -> Future:
        done: Future = Future()
        self._commands.put((command, done))
        return done

    # ---- the asyncio side -------------------------------------------------------------------------------

    async def generate(self, request_id: str, prompt: Prompt, params: SamplingParams | None = None, *,
                       priority: int = 0, adapter: str | None = None) -> AsyncIterator[RequestOutput]:
        """Submit a request and yield its output after every step that changes it, the finished one last."""
        outputs: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), outputs)

        def add() -> None:
            self.engine.add_request(request_id, prompt, params, priority=priority, adapter=adapter)

        try:
            await asyncio.wrap_future(self._call(add))
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        finished = False
        try:
            while not finished:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self._streams.pop(request_id, None)
                self._call(lambda: self.engine.abort(request_id))

    async def between_steps(self, command: Callable[[], Any]) -> Any:
        """Run ``command`` (e.g. ``lambda: engine.load_adapter(...)``) on the loop thread between two steps, and
        return its result (or raise its error) here."""
        return await asyncio.wrap_future(self._call(command))

    async def abort(self, request_id: str) -> None:
        """Stop a request (its stream ends with an ``abort`` output); its blocks are back in the pool when this
        returns."""
        await asyncio.wrap_future(self._call(lambda: self._abort(request_id)))

    def _abort(self, request_id: str) -> None:
        output = self.engine.abort(request_id)
        if output is not None:
            self._deliver(request_id, output, last=True)

    def shutdown(self) -> None:
        """Stop the loop thread (requests in flight are dropped)."""
        self._stopping.set()
        self._thread.join()

    async def __aenter__(self) -> AsyncEngine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.shutdown)
