"""The runtime sessions: one lane per model, each a turn lock with a bounded, priority-aware queue;
load, evict, unload.

- Every loaded model lives in its own runner process, and every use of it happens inside a *turn* on
  that model's lane. Several models may be loaded at once; residency.py decides which may stay (at most
  one `.rkllm` model on the NPU, `max_loaded` in all, what memory allows, the least recently used idle
  one goes first). All loading and unloading is serialised by one lock, so two NPU runners never
  overlap, not even while one is exiting.
- A turn is exclusive, except that a runner serving several sequences at once (llama.cpp with
  RKLLAMA_NUM_PARALLEL > 1: `ModelInfo.parallel`) admits that many turns that ask for the same load.
- Waiting requests are served in arrival order, except that interactive (streaming) requests go ahead
  of queued non-streaming ones. Aging: a non-streaming request that has waited `aging_s` competes in
  arrival order again, so background work (Open WebUI's title requests) is delayed, never starved.
- A load that can only fit once a busy model is idle waits for it; that model's requests that arrived
  after the load do not go ahead of it (arrival order across models, as with a single session).
- A full queue (all models together) raises QueueFull before any byte is written (503 + Retry-After).
- keep_alive: after the last turn on a model, it stays loaded for its keep_alive (0 = unload at once,
  negative = forever); a timer unloads it, and unloading is the runner process exiting.
- Runners come from the `runner_factory` it is given (runtime/runner/protocol.py; the daemon's starts
  child processes). It watches each runner's `died`: a model whose runner ended without being stopped
  here (a crash) is forgotten at once, and the next request on it starts a new runner.
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
from rkllama_ollama.residency import Resident, estimated_bytes, mem_available_bytes, plan_load
from rkllama_ollama.runtime.base import LoadSpec, ModelInfo
from rkllama_ollama.runtime.runner.protocol import Runner, RunnerFactory

log = logging.getLogger(__name__)

AGING_S = 20.0
DEFAULT_MAX_LOADED = 3  # like Ollama on a machine without GPUs


class QueueFull(Exception):
    """Too many requests are waiting for the session."""


@dataclass
class LoadedModel:
    entry: ModelEntry
    spec: LoadSpec
    runner: Runner
    info: ModelInfo
    load_ns: int
    keep_alive_s: float
    expires_at: float = math.inf  # wall-clock seconds; inf = forever
    extras: dict[str, object] = field(default_factory=dict)  # per-load caches of upper layers (templates)
    last_used: float = field(default_factory=time.monotonic)  # for least-recently-used eviction

    @property
    def key(self) -> str:
        return self.entry.name.key


@dataclass(eq=False)
class _Ticket:
    seq: int
    interactive: bool
    enqueued: float
    spec: LoadSpec | None  # the load the turn will use (turns asking for the same may share); None = alone
    future: asyncio.Future[None]


@dataclass(eq=False)
class _RoomWaiter:
    """A load waiting until one of the busy models in `wait_for` is idle, so that it can be evicted."""

    seq: int
    wait_for: frozenset[str]
    future: asyncio.Future[None]


@dataclass(eq=False)
class _Lane:
    """One model's turns and what is loaded for it."""

    key: str
    loaded: LoadedModel | None = None
    holders: int = 0
    holder_spec: LoadSpec | None = None  # what the holders asked for (None: one holder, alone)
    holder_seq: int = 0  # the first holder's arrival
    waiters: list[_Ticket] = field(default_factory=list)
    expiry: asyncio.TimerHandle | None = None

    def live(self) -> LoadedModel | None:
        loaded = self.loaded
        return loaded if loaded is not None and loaded.runner.alive else None


class Scheduler:
    def __init__(
        self,
        *,
        runner_factory: RunnerFactory,
        keep_alive_s: float,
        max_queue: int,
        aging_s: float = AGING_S,
        max_loaded: int = DEFAULT_MAX_LOADED,
        memory_available: Callable[[], int | None] = mem_available_bytes,
    ) -> None:
        self.default_keep_alive_s = keep_alive_s
        self.max_queue = max_queue
        self.max_loaded = max(1, max_loaded)
        self._runner_factory = runner_factory
        self._aging_s = aging_s
        self._memory_available = memory_available
        self._lanes: dict[str, _Lane] = {}
        self._seq = itertools.count(1)
        self._load_lock = asyncio.Lock()
        self._room_waiters: list[_RoomWaiter] = []
        self._closed = False

    def _lane(self, key: str) -> _Lane:
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane(key)
        return lane

    # -- queue ------------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return sum(len(lane.waiters) for lane in self._lanes.values())

    @property
    def busy(self) -> bool:
        """A turn is held on some model: a generation, a load, or background work."""
        return self.running > 0

    @property
    def running(self) -> int:
        """Turns held now, over every model (a runner serving several sequences counts each)."""
        return sum(lane.holders for lane in self._lanes.values())

    @asynccontextmanager
    async def turn(self, key: str, *, interactive: bool, spec: LoadSpec | None = None) -> AsyncIterator[None]:
        """A turn on model `key`. Turns that name the same `spec` may run together when its runner
        serves several sequences at once; without a spec the turn is always alone."""
        lane = self._lane(key)
        await self._acquire(lane, interactive, spec)
        try:
            yield
        finally:
            self._release(lane)

    async def _acquire(self, lane: _Lane, interactive: bool, spec: LoadSpec | None) -> None:
        if self._closed:
            raise QueueFull("server is shutting down")
        seq = next(self._seq)
        if not lane.waiters and self._grantable(lane, spec, seq):
            self._grant(lane, spec, seq)
            return
        if self.queue_depth >= self.max_queue:
            raise QueueFull("server busy, please try again.  maximum pending requests exceeded")
        ticket = _Ticket(seq, interactive, time.monotonic(), spec, asyncio.get_running_loop().create_future())
        lane.waiters.append(ticket)
        try:
            await ticket.future
        except BaseException:
            if ticket.future.done() and not ticket.future.cancelled():
                self._release(lane)  # granted just as we were cancelled: pass the turn on
            elif ticket in lane.waiters:  # a dispatch may already have dropped it (see _dispatch)
                lane.waiters.remove(ticket)
                self._dispatch(lane)  # it may have been the one that held the others back
            raise

    def _held_for_room(self, lane: _Lane, seq: int) -> bool:
        """Whether an earlier load is waiting for this model to be idle so that it can evict it."""
        return any(lane.key in waiter.wait_for and waiter.seq < seq for waiter in self._room_waiters)

    def _grantable(self, lane: _Lane, spec: LoadSpec | None, seq: int) -> bool:
        if self._held_for_room(lane, seq):
            return False
        if lane.holders == 0:
            return True
        loaded = lane.live()
        return (
            spec is not None
            and lane.holder_spec == spec
            and loaded is not None
            and loaded.spec == spec
            and lane.holders < loaded.info.parallel
        )

    def _grant(self, lane: _Lane, spec: LoadSpec | None, seq: int) -> None:
        if lane.holders == 0:
            lane.holder_spec, lane.holder_seq = spec, seq
        lane.holders += 1
        self._cancel_expiry(lane)

    def _pick(self, lane: _Lane) -> _Ticket:
        now = time.monotonic()
        ahead = [t for t in lane.waiters if t.interactive or now - t.enqueued >= self._aging_s]
        return min(ahead or lane.waiters, key=lambda t: t.seq)

    def _dispatch(self, lane: _Lane) -> None:
        """Grant the lane's waiters while they may go (in turn order: one that may not blocks the rest)."""
        while lane.waiters and not self._closed:
            ticket = self._pick(lane)
            if ticket.future.done():  # cancelled, its task not yet run: the turn goes to the next one
                lane.waiters.remove(ticket)
                continue
            if not self._grantable(lane, ticket.spec, ticket.seq):
                break
            lane.waiters.remove(ticket)
            self._grant(lane, ticket.spec, ticket.seq)
            ticket.future.set_result(None)
        if lane.holders == 0 and not lane.waiters:
            self._arm_expiry(lane)

    def _release(self, lane: _Lane) -> None:
        lane.holders -= 1
        if lane.holders == 0:
            lane.holder_spec = None
        self._dispatch(lane)
        self._wake_room_waiters()

    # -- keep_alive ---------------------------------------------------------------------------

    def _cancel_expiry(self, lane: _Lane) -> None:
        if lane.expiry is not None:
            lane.expiry.cancel()
            lane.expiry = None

    def _arm_expiry(self, lane: _Lane) -> None:
        self._cancel_expiry(lane)
        loaded = lane.loaded
        if loaded is None or self._closed:
            return
        if not loaded.runner.alive:
            lane.loaded = None
            return
        if loaded.keep_alive_s < 0:
            return
        delay = max(0.0, loaded.expires_at - time.time())
        lane.expiry = asyncio.get_running_loop().call_later(delay, self._on_expiry, lane)

    def _on_expiry(self, lane: _Lane) -> None:
        lane.expiry = None
        asyncio.get_running_loop().create_task(self._unload_if_expired(lane))

    async def _unload_if_expired(self, lane: _Lane) -> None:
        if lane.holders or lane.waiters:
            return  # the next release re-arms the timer
        async with self.turn(lane.key, interactive=False):
            loaded = lane.loaded
            if loaded is not None and loaded.keep_alive_s >= 0 and loaded.expires_at <= time.time():
                await self._unload(lane, "keep_alive expired")

    def touch(self, loaded: LoadedModel, keep_alive_s: float | None) -> None:
        """Reset a loaded model's expiry (called at the end of each request on it)."""
        if keep_alive_s is not None:
            loaded.keep_alive_s = keep_alive_s
        ka = loaded.keep_alive_s
        loaded.expires_at = math.inf if ka < 0 else time.time() + ka
        loaded.last_used = time.monotonic()

    # -- what is loaded -------------------------------------------------------------------------

    @property
    def loaded_models(self) -> list[LoadedModel]:
        """Every loaded model, the most recently used first."""
        models = [loaded for lane in self._lanes.values() if (loaded := lane.live()) is not None]
        return sorted(models, key=lambda m: m.last_used, reverse=True)

    @property
    def loaded(self) -> LoadedModel | None:
        """The most recently used loaded model (the seed's API knows one current model)."""
        models = self.loaded_models
        return models[0] if models else None

    def loaded_model(self, key: str) -> LoadedModel | None:
        lane = self._lanes.get(key)
        return lane.live() if lane is not None else None

    # -- loading ------------------------------------------------------------------------------

    async def ensure_loaded(
        self, entry: ModelEntry, spec: LoadSpec, keep_alive_s: float | None
    ) -> LoadedModel:
        """Make `entry` loaded with `spec` (must be called inside a turn on it). load_ns is 0 if it
        already was. Other models are unloaded first when residency.py says they must make room."""
        lane = self._lane(entry.name.key)
        loaded = lane.live()
        if loaded is not None and loaded.spec == spec:
            loaded.load_ns = 0
            if keep_alive_s is not None:
                loaded.keep_alive_s = keep_alive_s
            loaded.last_used = time.monotonic()
            return loaded
        size = estimated_bytes(entry, spec)
        waiter = _RoomWaiter(lane.holder_seq, frozenset(), asyncio.get_running_loop().create_future())
        self._room_waiters.append(waiter)
        try:
            while True:
                async with self._load_lock:
                    if self._closed:
                        raise QueueFull("server is shutting down")
                    if lane.loaded is not None:
                        await self._stop_lane(lane, "reloading")
                    plan = plan_load(
                        self._residents(),
                        engine=spec.engine,
                        size=size,
                        available=self._memory_available(),
                        max_loaded=self.max_loaded,
                    )
                    if plan.ready:
                        waiter.wait_for = frozenset()
                        self._dispatch_held()
                        for key in plan.evict:
                            await self._stop_lane(self._lanes[key], f"making room for {entry.name.display}")
                        return await self._start(lane, entry, spec, keep_alive_s)
                waiter.wait_for = plan.wait_for
                waiter.future = asyncio.get_running_loop().create_future()
                log.info(
                    "model=%s waits for %s to be idle to take its place",
                    entry.name.display,
                    ", ".join(sorted(plan.wait_for)),
                )
                await waiter.future
        finally:
            self._room_waiters.remove(waiter)
            self._dispatch_held()

    def _dispatch_held(self) -> None:
        """Requests held back for a load that no longer waits for their model go on."""
        for lane in list(self._lanes.values()):
            if lane.holders == 0 and lane.waiters:
                self._dispatch(lane)

    def _residents(self) -> list[Resident]:
        return [
            Resident(
                lane.key,
                loaded.spec.engine,
                loaded.info.memory_bytes or estimated_bytes(loaded.entry, loaded.spec),
                loaded.last_used,
                lane.holders > 0,
            )
            for lane in self._lanes.values()
            if (loaded := lane.live()) is not None
        ]

    def _wake_room_waiters(self) -> None:
        for waiter in self._room_waiters:
            if not waiter.future.done():
                waiter.future.set_result(None)

    async def _start(
        self, lane: _Lane, entry: ModelEntry, spec: LoadSpec, keep_alive_s: float | None
    ) -> LoadedModel:
        started = time.perf_counter_ns()
        runner = await self._runner_factory(spec)
        try:
            info, engine_ns = await runner.load(spec)
        except BaseException:
            await runner.stop()
            raise
        if self._closed:  # the server began shutting down during the load: nobody will stop it later
            await runner.stop()
            raise QueueFull("server is shutting down")
        load_ns = time.perf_counter_ns() - started
        ka = self.default_keep_alive_s if keep_alive_s is None else keep_alive_s
        loaded = lane.loaded = LoadedModel(entry, spec, runner, info, load_ns, ka)
        self.touch(loaded, None)
        runner.died.add_done_callback(lambda _: self._forget_dead(lane, loaded))
        log.info(
            "loaded model=%s engine=%s ctx=%d parallel=%d in %.3fs (engine %.3fs); %d model(s) loaded",
            entry.name.display,
            spec.engine,
            info.context_length,
            info.parallel,
            load_ns / 1e9,
            engine_ns / 1e9,
            len(self.loaded_models),
        )
        self._dispatch(lane)  # turns asking for the same load may now share it
        return loaded

    async def _stop_lane(self, lane: _Lane, why: str) -> None:
        """Stop the lane's runner (the caller holds the load lock)."""
        loaded, lane.loaded = lane.loaded, None
        self._cancel_expiry(lane)
        if loaded is not None:
            log.info("unloading model=%s (%s)", loaded.entry.name.display, why)
            await _stop_to_the_end(loaded.runner)
        self._wake_room_waiters()

    async def _unload(self, lane: _Lane, why: str) -> None:
        async with self._load_lock:
            await self._stop_lane(lane, why)

    def _forget_dead(self, lane: _Lane, loaded: LoadedModel) -> None:
        """A runner ended. If its model was still loaded (not stopped by us), forget it: the next
        request on the model starts a new runner."""
        if lane.loaded is not loaded:
            return
        log.warning(
            "model=%s lost its runner; it will be reloaded on the next request", loaded.entry.name.display
        )
        lane.loaded = None
        self._cancel_expiry(lane)
        self._wake_room_waiters()

    async def unload(self, entry: ModelEntry) -> None:
        """keep_alive 0 with no prompt: unload now if idle, else as soon as the running request ends."""
        lane = self._lanes.get(entry.name.key)
        loaded = lane.loaded if lane is not None else None
        if lane is None or loaded is None:
            return
        loaded.keep_alive_s = 0
        loaded.expires_at = time.time()
        if lane.holders:
            return
        async with self.turn(lane.key, interactive=True):
            if lane.loaded is loaded:
                await self._unload(lane, "keep_alive 0")

    async def unload_if_loaded(self, key: str) -> None:
        """Used before deleting a model: wait for its turn, then stop it."""
        async with self.turn(key, interactive=True):
            lane = self._lanes[key]
            if lane.loaded is not None:
                await self._unload(lane, "model deleted")

    async def close(self) -> None:
        self._closed = True
        for lane in self._lanes.values():
            self._cancel_expiry(lane)
            for ticket in lane.waiters:
                if not ticket.future.done():
                    ticket.future.set_exception(QueueFull("server is shutting down"))
            lane.waiters.clear()
        self._wake_room_waiters()
        await asyncio.gather(*(self._stop_lane(lane, "shutdown") for lane in list(self._lanes.values())))

    @asynccontextmanager
    async def session(
        self, entry: ModelEntry, spec: LoadSpec, *, interactive: bool, keep_alive_s: float | None
    ) -> AsyncIterator[LoadedModel]:
        """A turn on `entry`'s model with the model loaded as `spec` asks (yielded). Leaving it cleanly
        restarts the model's keep_alive. A runner that dies meanwhile is forgotten by the scheduler itself
        (it watches every runner's `died`), so the next request starts a new one."""
        async with self.turn(entry.name.key, interactive=interactive, spec=spec):
            loaded = await self.ensure_loaded(entry, spec, keep_alive_s)
            yield loaded
            self.touch(loaded, keep_alive_s)


async def _stop_to_the_end(runner: Runner) -> None:
    """`runner.stop()` carried to its end even when the caller is cancelled meanwhile (a client that
    leaves during an eviction, a reload or a delete, or the shutdown deadline): the runner is then
    killed, its stop awaited, and the cancellation raised afterwards. So the load lock is held until the
    runner is gone (the next load never overlaps a runner still exiting: two on the NPU) and a runner is
    never left half stopped, with nobody to kill it if it hangs."""
    stopping = asyncio.ensure_future(runner.stop())
    cancelled = False
    while True:
        try:
            await asyncio.shield(stopping)
            break
        except asyncio.CancelledError:
            if stopping.done():
                raise
            if not cancelled:
                cancelled = True
                runner.kill()  # nobody waits for a graceful exit any more
    if cancelled:
        raise asyncio.CancelledError


def runner_environment(rkllm_lib: str | None, rkllm_version: str | None, log_level: str) -> dict[str, str]:
    env = dict(os.environ)
    if rkllm_lib:
        env["RKLLAMA_RKLLM_LIB"] = rkllm_lib
    if rkllm_version:
        env["RKLLAMA_RKLLM_VERSION"] = rkllm_version
    env["RKLLAMA_LOG_LEVEL"] = log_level
    return env
