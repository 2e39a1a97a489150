"""The one runtime session: a turn lock with a bounded, priority-aware queue; load, switch, unload.

- One runner process hosts one model at a time; every use of it happens inside a *turn*.
- Waiting requests are served in arrival order, except that interactive (streaming) requests go ahead
  of queued non-streaming ones. Aging: a non-streaming request that has waited `aging_s` competes in
  arrival order again, so background work (Open WebUI's title requests) is delayed, never starved.
- A full queue raises QueueFull before any byte is written (the API answers 503 + Retry-After).
- keep_alive: after the last turn on a model, it stays loaded for its keep_alive (0 = unload at once,
  negative = forever); a timer unloads it, and unloading is the runner process exiting.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from rkllama_ollama.models.store import ModelEntry
from rkllama_ollama.runtime.base import LoadSpec, ModelInfo
from rkllama_ollama.runtime.runner import RunnerProcess

log = logging.getLogger(__name__)

AGING_S = 20.0


class QueueFull(Exception):
    """Too many requests are waiting for the session."""


@dataclass
class LoadedModel:
    entry: ModelEntry
    spec: LoadSpec
    runner: RunnerProcess
    info: ModelInfo
    load_ns: int
    keep_alive_s: float
    expires_at: float = math.inf  # wall-clock seconds; inf = forever
    extras: dict[str, object] = field(default_factory=dict)  # per-load caches of upper layers (templates)

    @property
    def key(self) -> str:
        return self.entry.name.key


@dataclass(eq=False)
class _Ticket:
    seq: int
    interactive: bool
    enqueued: float
    future: asyncio.Future[None]


class Scheduler:
    def __init__(
        self,
        *,
        keep_alive_s: float,
        max_queue: int,
        runner_env: dict[str, str] | None = None,
        aging_s: float = AGING_S,
    ) -> None:
        self.default_keep_alive_s = keep_alive_s
        self.max_queue = max_queue
        self._runner_env = runner_env
        self._aging_s = aging_s
        self._busy = False
        self._waiters: list[_Ticket] = []
        self._seq = itertools.count()
        self._loaded: LoadedModel | None = None
        self._expiry: asyncio.TimerHandle | None = None
        self._closed = False
        self._preempt: Callable[[], None] | None = None  # set while background work holds the session

    # -- queue ------------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self._waiters)

    @property
    def busy(self) -> bool:
        """A turn is held: a generation, a load, or background work is using the session."""
        return self._busy

    @asynccontextmanager
    async def turn(self, *, interactive: bool) -> AsyncIterator[None]:
        await self._acquire(interactive)
        try:
            yield
        finally:
            self._release()

    @asynccontextmanager
    async def idle_turn(self, preempt: Callable[[], None]) -> AsyncIterator[bool]:
        """A turn for background work: granted only when nobody wants the session (yields whether it
        was), and `preempt` is called the moment a request arrives, so that the work stops at once."""
        if self._closed or self._busy or self._waiters:
            yield False
            return
        self._busy = True
        self._cancel_expiry()
        self._preempt = preempt
        try:
            yield True
        finally:
            self._preempt = None
            self._release()

    def _preempt_background(self) -> None:
        if self._preempt is not None:
            preempt, self._preempt = self._preempt, None
            preempt()

    async def _acquire(self, interactive: bool) -> None:
        if self._closed:
            raise QueueFull("server is shutting down")
        if not self._busy and not self._waiters:
            self._busy = True
            self._cancel_expiry()
            return
        if len(self._waiters) >= self.max_queue:
            raise QueueFull("server busy, please try again.  maximum pending requests exceeded")
        ticket = _Ticket(
            next(self._seq), interactive, time.monotonic(), asyncio.get_running_loop().create_future()
        )
        self._waiters.append(ticket)
        self._preempt_background()
        try:
            await ticket.future
        except BaseException:
            if ticket.future.done() and not ticket.future.cancelled():
                self._release()  # granted just as we were cancelled: pass the turn on
            elif ticket in self._waiters:  # a release may already have dropped it (see _release)
                self._waiters.remove(ticket)
            raise
        self._cancel_expiry()

    def _pick(self) -> _Ticket:
        now = time.monotonic()
        ahead = [t for t in self._waiters if t.interactive or now - t.enqueued >= self._aging_s]
        return min(ahead or self._waiters, key=lambda t: t.seq)

    def _release(self) -> None:
        while self._waiters:
            ticket = self._pick()
            self._waiters.remove(ticket)
            if ticket.future.done():  # cancelled, its task not yet run: the turn goes to the next one
                continue
            ticket.future.set_result(None)
            return
        self._busy = False
        self._arm_expiry()

    # -- keep_alive ---------------------------------------------------------------------------

    def _cancel_expiry(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None

    def _arm_expiry(self) -> None:
        self._cancel_expiry()
        loaded = self._loaded
        if loaded is None or self._closed:
            return
        if not loaded.runner.alive:
            self._loaded = None
            return
        if loaded.keep_alive_s < 0:
            return
        delay = max(0.0, loaded.expires_at - time.time())
        self._expiry = asyncio.get_running_loop().call_later(delay, self._on_expiry)

    def _on_expiry(self) -> None:
        self._expiry = None
        asyncio.get_running_loop().create_task(self._unload_if_expired())

    async def _unload_if_expired(self) -> None:
        if self._busy or self._waiters:
            return  # the next release re-arms the timer
        async with self.turn(interactive=False):
            loaded = self._loaded
            if loaded is not None and loaded.keep_alive_s >= 0 and loaded.expires_at <= time.time():
                await self._stop_loaded("keep_alive expired")

    def touch(self, keep_alive_s: float | None) -> None:
        """Reset the loaded model's expiry (called at the end of each request on it)."""
        loaded = self._loaded
        if loaded is None:
            return
        if keep_alive_s is not None:
            loaded.keep_alive_s = keep_alive_s
        ka = loaded.keep_alive_s
        loaded.expires_at = math.inf if ka < 0 else time.time() + ka

    # -- loading ------------------------------------------------------------------------------

    @property
    def loaded(self) -> LoadedModel | None:
        loaded = self._loaded
        if loaded is not None and not loaded.runner.alive:
            return None
        return loaded

    async def ensure_loaded(
        self, entry: ModelEntry, spec: LoadSpec, keep_alive_s: float | None
    ) -> LoadedModel:
        """Make `entry` loaded with `spec` (must be called inside a turn). load_ns is 0 if it already was."""
        loaded = self._loaded
        if (
            loaded is not None
            and loaded.runner.alive
            and loaded.key == entry.name.key
            and loaded.spec == spec
        ):
            loaded.load_ns = 0
            if keep_alive_s is not None:
                loaded.keep_alive_s = keep_alive_s
            return loaded
        if loaded is not None:
            await self._stop_loaded("switching model" if loaded.key != entry.name.key else "reloading")
        started = time.perf_counter_ns()
        runner = await RunnerProcess.start(self._runner_env)
        try:
            info, engine_ns = await runner.load(spec)
        except BaseException:
            await runner.stop()
            raise
        load_ns = time.perf_counter_ns() - started
        ka = self.default_keep_alive_s if keep_alive_s is None else keep_alive_s
        self._loaded = LoadedModel(entry, spec, runner, info, load_ns, ka)
        self.touch(None)
        log.info(
            "loaded model=%s engine=%s ctx=%d in %.3fs (engine %.3fs)",
            entry.name.display,
            spec.engine,
            info.context_length,
            load_ns / 1e9,
            engine_ns / 1e9,
        )
        return self._loaded

    async def _stop_loaded(self, why: str) -> None:
        loaded, self._loaded = self._loaded, None
        self._cancel_expiry()
        if loaded is not None:
            log.info("unloading model=%s (%s)", loaded.entry.name.display, why)
            await loaded.runner.stop()

    def forget_dead_runner(self) -> None:
        """Drop a runner that died; the next request starts a new one."""
        loaded = self._loaded
        if loaded is not None and not loaded.runner.alive:
            log.warning(
                "model=%s lost its runner; it will be reloaded on the next request", loaded.entry.name.display
            )
            self._loaded = None

    async def unload(self, entry: ModelEntry) -> None:
        """keep_alive 0 with no prompt: unload now if idle, else as soon as the running request ends."""
        loaded = self._loaded
        if loaded is None or loaded.key != entry.name.key:
            return
        loaded.keep_alive_s = 0
        loaded.expires_at = time.time()
        if self._busy:
            self._preempt_background()  # background work must not hold an unload back
            return
        async with self.turn(interactive=True):
            if self._loaded is loaded:
                await self._stop_loaded("keep_alive 0")

    async def unload_if_loaded(self, key: str) -> None:
        """Used before deleting a model: wait for its turn, then stop it."""
        async with self.turn(interactive=True):
            if self._loaded is not None and self._loaded.key == key:
                await self._stop_loaded("model deleted")

    async def close(self) -> None:
        self._closed = True
        self._cancel_expiry()
        for ticket in self._waiters:
            if not ticket.future.done():
                ticket.future.set_exception(QueueFull("server is shutting down"))
        self._waiters.clear()
        await self._stop_loaded("shutdown")


def runner_environment(rkllm_lib: str | None, rkllm_version: str | None, log_level: str) -> dict[str, str]:
    env = dict(os.environ)
    if rkllm_lib:
        env["RKLLAMA_RKLLM_LIB"] = rkllm_lib
    if rkllm_version:
        env["RKLLAMA_RKLLM_VERSION"] = rkllm_version
    env["RKLLAMA_LOG_LEVEL"] = log_level
    return env
