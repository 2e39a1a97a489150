"""Graceful shutdown of in-flight requests.

Every request runs in its own task; this module keeps track of them. On shutdown (aiohttp's on_shutdown,
after the listening socket is closed) each one is cancelled: the generation aborts and gives its turn
back, and the client gets a last word instead of a cut connection:
- a stream that has started gets an error line in its own format (an NDJSON `{"error": ...}` line, or an
  SSE `data: {"error": {...}}` event) and a clean end of the chunked body;
- a request that has not written anything yet gets 503 with the same message.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from rkllama_ollama.api import wire

log = logging.getLogger(__name__)

SHUTDOWN_MESSAGE = "server is shutting down"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_PREPARED_KEY = web.RequestKey("prepared_response", web.StreamResponse)
_ENDED_BY_SHUTDOWN_KEY = web.RequestKey("ended_by_shutdown", bool)


class InFlightRequests:
    def __init__(self, message: str = SHUTDOWN_MESSAGE) -> None:
        self.message = message
        self._tasks: dict[asyncio.Task[object], web.Request] = {}

    def __len__(self) -> int:
        return len(self._tasks)

    def install(self, app: web.Application) -> None:
        app.on_response_prepare.append(self._remember_prepared)
        app.on_shutdown.append(self._on_shutdown)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        task = asyncio.current_task()
        assert task is not None
        self._tasks[task] = request
        try:
            return await handler(request)
        except asyncio.CancelledError:
            if not request.get(_ENDED_BY_SHUTDOWN_KEY):
                raise  # the client went away: nothing to say
            task.uncancel()
            return await self._last_word(request)
        finally:
            self._tasks.pop(task, None)

    async def end_all(self, grace_s: float = 2.0) -> None:
        """Cancel every in-flight request and wait (at most `grace_s`) for their last words."""
        tasks = list(self._tasks.items())
        if not tasks:
            return
        log.info("ending %d in-flight request(s): %s", len(tasks), self.message)
        for task, request in tasks:
            request[_ENDED_BY_SHUTDOWN_KEY] = True
            task.cancel(self.message)
        _, pending = await asyncio.wait([task for task, _ in tasks], timeout=grace_s)
        if pending:
            log.warning("%d request(s) did not end within %.1fs", len(pending), grace_s)

    async def _on_shutdown(self, app: web.Application) -> None:
        await self.end_all()

    @staticmethod
    async def _remember_prepared(request: web.Request, response: web.StreamResponse) -> None:
        request[_PREPARED_KEY] = response

    async def _last_word(self, request: web.Request) -> web.StreamResponse:
        response = request.get(_PREPARED_KEY)
        if response is None:
            if request.path.startswith("/v1/"):
                return wire.openai_error_response(503, self.message)
            return wire.error_response(503, self.message)
        if response.content_type == wire.SSE:
            error = {"error": {"message": self.message, "type": "api_error", "param": None, "code": None}}
            line = b"data: " + wire.dumps(error) + b"\n\n"
        else:
            line = wire.dumps({"error": self.message}) + b"\n"
        try:
            await response.write(line)
            await response.write_eof()
        except (ConnectionError, RuntimeError) as exc:  # client gone, or the body had already ended
            log.debug("could not send the shutdown line on %s: %s", request.path, exc)
        return response
