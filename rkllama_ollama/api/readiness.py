"""Readiness for routers and probes: `GET /api/ready`, and the count of requests in flight.

Liveness is `GET /`: it is answered from the event loop and never waits for the model. Readiness says
whether this daemon should be given new work, and how loaded it is:

- 200 with `status` "idle" (nothing running), "busy" (a request holds the model session; `queue` more
  wait behind it) or "full" (the queue is at its limit: the next request that needs the model gets 503
  with Retry-After until one ends). A board with one NPU is busy whenever it is used, so being busy is
  no reason to leave the rotation (every board would flap); routers balance on connections instead.
- 503 with `status` "draining" once the daemon is shutting down.

The body also carries `in_flight` (HTTP requests being served, the probes excluded), `running` (turns
held now, over every loaded model), `max_queue` and `loaded` (the models loaded now, by name).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from rkllama_ollama.api import wire
from rkllama_ollama.scheduler import Scheduler

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

READY_PATH = "/api/ready"
# Probes and scrapes are not work: counting them would make every board look busy to its own monitor.
PROBE_PATHS = frozenset({"/", READY_PATH, "/metrics"})


class Readiness:
    def __init__(self, scheduler: Scheduler) -> None:
        self._scheduler = scheduler
        self.in_flight = 0
        self.draining = False

    def install(self, app: web.Application) -> None:
        app.on_shutdown.insert(0, self._on_shutdown)  # before in-flight requests are ended
        app.add_routes([web.get(READY_PATH, self.handle)])

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in PROBE_PATHS:
            return await handler(request)
        self.in_flight += 1
        try:
            return await handler(request)
        finally:
            self.in_flight -= 1

    def status(self) -> str:
        scheduler = self._scheduler
        if self.draining:
            return "draining"
        if scheduler.queue_depth >= scheduler.max_queue and scheduler.busy:
            return "full"
        return "busy" if scheduler.busy else "idle"

    def snapshot(self) -> dict[str, Any]:
        scheduler = self._scheduler
        return {
            "status": self.status(),
            "queue": scheduler.queue_depth,
            "max_queue": scheduler.max_queue,
            "running": scheduler.running,
            "in_flight": self.in_flight,
            "loaded": [model.entry.name.display for model in scheduler.loaded_models],
        }

    async def handle(self, request: web.Request) -> web.Response:
        body = self.snapshot()
        return wire.json_response(body, 503 if body["status"] == "draining" else 200)

    async def _on_shutdown(self, app: web.Application) -> None:
        self.draining = True
