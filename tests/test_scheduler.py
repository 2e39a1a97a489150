"""The scheduler's turn queue: arrival order, interactive first, aging, bound, cancellation."""

from __future__ import annotations

import asyncio

import pytest

from rkllama_ollama.scheduler import QueueFull, Scheduler
from tests.support.inprocess_runner import inprocess_runner_factory


def make(max_queue: int = 8, aging_s: float = 1000.0) -> Scheduler:
    return Scheduler(
        runner_factory=inprocess_runner_factory(), keep_alive_s=300, max_queue=max_queue, aging_s=aging_s
    )


async def hold(
    scheduler: Scheduler, name: str, order: list[str], *, interactive: bool, release: asyncio.Event
) -> None:
    async with scheduler.turn("m", interactive=interactive):
        order.append(name)
        await release.wait()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_interactive_requests_go_ahead_of_queued_background_work() -> None:
    scheduler = make()
    order: list[str] = []
    gate = asyncio.Event()
    first = asyncio.create_task(hold(scheduler, "first", order, interactive=False, release=gate))
    await settle()
    background = asyncio.create_task(hold(scheduler, "title", order, interactive=False, release=gate))
    await settle()
    chat = asyncio.create_task(hold(scheduler, "chat", order, interactive=True, release=gate))
    await settle()
    assert scheduler.queue_depth == 2
    gate.set()
    await asyncio.gather(first, background, chat)
    assert order == ["first", "chat", "title"]


async def test_same_priority_is_served_in_arrival_order() -> None:
    scheduler = make()
    order: list[str] = []
    gate = asyncio.Event()
    tasks = []
    for index in range(5):
        tasks.append(asyncio.create_task(hold(scheduler, str(index), order, interactive=True, release=gate)))
        await settle()
    gate.set()
    await asyncio.gather(*tasks)
    assert order == ["0", "1", "2", "3", "4"]


async def test_aged_background_work_is_not_starved() -> None:
    scheduler = make(aging_s=0.0)  # everything is "aged" at once: pure arrival order
    order: list[str] = []
    gate = asyncio.Event()
    first = asyncio.create_task(hold(scheduler, "first", order, interactive=True, release=gate))
    await settle()
    background = asyncio.create_task(hold(scheduler, "title", order, interactive=False, release=gate))
    await settle()
    chat = asyncio.create_task(hold(scheduler, "chat", order, interactive=True, release=gate))
    await settle()
    gate.set()
    await asyncio.gather(first, background, chat)
    assert order == ["first", "title", "chat"]


async def test_full_queue_is_refused_before_waiting() -> None:
    scheduler = make(max_queue=2)
    order: list[str] = []
    gate = asyncio.Event()
    tasks = [
        asyncio.create_task(hold(scheduler, str(i), order, interactive=True, release=gate)) for i in range(3)
    ]
    await settle()
    assert scheduler.queue_depth == 2
    with pytest.raises(QueueFull, match="maximum pending requests exceeded"):
        async with scheduler.turn("m", interactive=True):
            pass
    gate.set()
    await asyncio.gather(*tasks)
    assert sorted(order) == ["0", "1", "2"]


async def test_a_cancelled_waiter_leaves_the_queue_and_the_turn_moves_on() -> None:
    scheduler = make()
    order: list[str] = []
    gate = asyncio.Event()
    first = asyncio.create_task(hold(scheduler, "first", order, interactive=True, release=gate))
    await settle()
    gone = asyncio.create_task(hold(scheduler, "gone", order, interactive=True, release=gate))
    after = asyncio.create_task(hold(scheduler, "after", order, interactive=True, release=gate))
    await settle()
    gone.cancel()
    await settle()
    assert scheduler.queue_depth == 1
    gate.set()
    await asyncio.gather(first, after)
    assert order == ["first", "after"]
    # The lock is free again: a new turn is granted at once.
    async with scheduler.turn("m", interactive=False):
        assert scheduler.queue_depth == 0


async def test_close_refuses_waiters() -> None:
    scheduler = make()
    gate = asyncio.Event()
    order: list[str] = []
    first = asyncio.create_task(hold(scheduler, "first", order, interactive=True, release=gate))
    await settle()
    waiting = asyncio.create_task(hold(scheduler, "waiting", order, interactive=True, release=gate))
    await settle()
    await scheduler.close()
    with pytest.raises(QueueFull):
        await waiting
    gate.set()
    await first


async def test_turns_asking_for_the_same_load_share_a_runner_up_to_its_parallel_slots() -> None:
    from types import SimpleNamespace

    from rkllama_ollama.runtime.base import LoadSpec

    scheduler = make()
    chat = LoadSpec(engine="llamacpp", model_path="m.gguf", parallel=2)
    other = LoadSpec(engine="llamacpp", model_path="m.gguf", num_ctx=99, parallel=2)
    lane = scheduler._lane("m")
    lane.loaded = SimpleNamespace(  # type: ignore[assignment]
        key="m",
        spec=chat,
        info=SimpleNamespace(parallel=2),
        runner=SimpleNamespace(alive=True),
        keep_alive_s=-1.0,
        expires_at=0.0,
    )
    order: list[str] = []
    gate = asyncio.Event()

    async def hold_spec(name: str, spec: LoadSpec | None) -> None:
        async with scheduler.turn("m", interactive=True, spec=spec):
            order.append(name)
            await gate.wait()

    tasks = [asyncio.create_task(hold_spec("a", chat))]
    await settle()
    tasks.append(asyncio.create_task(hold_spec("b", chat)))  # shares the runner: two slots
    await settle()
    tasks.append(asyncio.create_task(hold_spec("c", chat)))  # a third waits: both slots are taken
    tasks.append(asyncio.create_task(hold_spec("d", other)))  # another load waits for the lane to empty
    tasks.append(asyncio.create_task(hold_spec("e", None)))  # a turn without a spec is always alone
    await settle()
    assert order == ["a", "b"] and scheduler.queue_depth == 3
    gate.set()
    await asyncio.gather(*tasks)
    assert order == ["a", "b", "c", "d", "e"]
    lane.loaded = None


async def test_waiters_cancelled_as_the_turn_passes_do_not_lose_the_session() -> None:
    """Clients that all disconnect at once (a router closing its connections): the holder and every
    waiter are cancelled in the same loop iteration; the session must still be free afterwards."""
    scheduler = make()
    order: list[str] = []
    gate = asyncio.Event()
    holder = asyncio.create_task(hold(scheduler, "holder", order, interactive=True, release=gate))
    await settle()
    waiters = [
        asyncio.create_task(hold(scheduler, f"w{i}", order, interactive=True, release=gate)) for i in range(2)
    ]
    await settle()
    assert scheduler.queue_depth == 2
    for task in (holder, *waiters):
        task.cancel()
    results = await asyncio.gather(holder, *waiters, return_exceptions=True)
    assert all(isinstance(result, asyncio.CancelledError) for result in results), results
    assert (scheduler.busy, scheduler.queue_depth) == (False, 0)
    async with asyncio.timeout(5):
        async with scheduler.turn("m", interactive=True):
            pass


def _preloaded(scheduler: Scheduler) -> tuple[object, object]:
    """A lane `m` whose runner is already loaded (a stand-in runner: only `alive` is read)."""
    from types import SimpleNamespace

    from rkllama_ollama.runtime.base import LoadSpec, ModelInfo
    from rkllama_ollama.scheduler import LoadedModel

    entry = SimpleNamespace(name=SimpleNamespace(key="m", display="m"))
    spec = LoadSpec(engine="llamacpp", model_path="m.gguf")
    loaded = LoadedModel(entry, spec, SimpleNamespace(alive=True), ModelInfo(64), 0, 60.0)  # type: ignore[arg-type]
    scheduler._lane("m").loaded = loaded
    return entry, loaded


async def test_a_session_yields_the_loaded_model_and_restarts_its_keep_alive_on_a_clean_exit() -> None:
    scheduler = make()
    entry, loaded = _preloaded(scheduler)
    spec = loaded.spec  # type: ignore[attr-defined]
    async with scheduler.session(entry, spec, interactive=True, keep_alive_s=5.0) as held:  # type: ignore[arg-type]
        assert held is loaded and scheduler.running == 1
        loaded.expires_at = 0.0  # type: ignore[attr-defined]
    assert scheduler.running == 0
    assert loaded.keep_alive_s == 5.0 and loaded.expires_at > 0.0  # type: ignore[attr-defined]

    with pytest.raises(ValueError):  # a failure: the turn is released, keep_alive is not restarted
        async with scheduler.session(entry, spec, interactive=True, keep_alive_s=7.0):  # type: ignore[arg-type]
            loaded.expires_at = 0.0  # type: ignore[attr-defined]
            raise ValueError("boom")
    assert scheduler.running == 0 and loaded.expires_at == 0.0  # type: ignore[attr-defined]
    assert scheduler.loaded_model("m") is loaded
