"""The scheduler stopping runners: a request cancelled while a runner is being stopped for it (a client
that leaves during an eviction, a reload or a delete) does not let the next load start before that
runner is gone, and does not leave it half stopped."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import pytest

from rkllama_ollama.models.modelfile import Modelfile
from rkllama_ollama.models.names import parse_name
from rkllama_ollama.models.store import ModelEntry
from rkllama_ollama.runtime.base import (
    EmbedResult,
    Engine,
    LoadSpec,
    ModelInfo,
    SamplingOptions,
)
from rkllama_ollama.runtime.runner.protocol import Generation, Runner
from rkllama_ollama.scheduler import Scheduler


def npu_entry(name: str) -> ModelEntry:
    return ModelEntry(
        name=parse_name(f"{name}:latest"),
        folder=Path("/nowhere"),
        weights=Path(f"/nowhere/{name}.rkllm"),
        format="rkllm",
        modelfile=Modelfile(),
        size=0,
        modified_at=datetime.now(UTC),
        digest="0" * 64,
        digest_provisional=False,
        details={},
        model_info={},
        capabilities=[],
        chat_template=None,
        bos_token="",
        eos_token="",
        tokenizer_dir=None,
        context_length=0,
        max_context_length=0,
        embedding_length=0,
    )


def npu_spec(entry: ModelEntry) -> LoadSpec:
    return LoadSpec(engine=Engine.RKLLM, model_path=str(entry.weights))


class SlowToStop:
    """A runner whose stop takes until `gate` is set (a model releasing the NPU)."""

    def __init__(self, path: str, events: list[str], gate: asyncio.Event) -> None:
        self._path = path
        self._events = events
        self._gate = gate
        self._died: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.stopping = asyncio.Event()

    @property
    def alive(self) -> bool:
        return not self._died.done()

    @property
    def died(self) -> asyncio.Future[str]:
        return self._died

    async def load(self, spec: LoadSpec) -> tuple[ModelInfo, int]:
        return ModelInfo(context_length=512), 0

    async def embed(self, inputs: list[str], truncate: bool) -> EmbedResult:
        raise NotImplementedError

    async def tokenize(self, text: str) -> list[int]:
        raise NotImplementedError

    async def detokenize(self, tokens: list[int]) -> str:
        raise NotImplementedError

    def generate(self, prompt: str, options: SamplingOptions, images: list[str] | None = None) -> Generation:
        raise NotImplementedError

    async def stop(self, timeout: float = 5.0) -> None:
        """Ends when `gate` is set (a graceful exit) or the runner is killed."""
        self.stopping.set()
        graceful = asyncio.ensure_future(self._gate.wait())
        await asyncio.wait([graceful, self._died], return_when=asyncio.FIRST_COMPLETED)
        graceful.cancel()
        self._events.append(f"stopped {self._path}")
        if not self._died.done():
            self._died.set_result("stopped")

    def kill(self) -> None:
        if not self._died.done():
            self._events.append(f"killed {self._path}")
            self._died.set_result("killed")


@pytest.fixture
def gate() -> asyncio.Event:
    return asyncio.Event()


def scheduler_with(events: list[str], runners: list[SlowToStop], gate: asyncio.Event) -> Scheduler:
    async def factory(spec: LoadSpec) -> Runner:
        events.append(f"started {spec.model_path}")
        runner = SlowToStop(spec.model_path, events, gate)
        runners.append(runner)
        return runner

    return Scheduler(runner_factory=factory, keep_alive_s=300, max_queue=8, memory_available=lambda: None)


async def use(scheduler: Scheduler, entry: ModelEntry) -> None:
    async with scheduler.session(entry, npu_spec(entry), interactive=True, keep_alive_s=None):
        pass


async def test_a_load_cancelled_while_evicting_the_npu_model_keeps_the_next_load_waiting(
    gate: asyncio.Event,
) -> None:
    events: list[str] = []
    runners: list[SlowToStop] = []
    scheduler = scheduler_with(events, runners, gate)
    first, second = npu_entry("first"), npu_entry("second")
    await use(scheduler, first)
    leaving = asyncio.create_task(use(scheduler, second))  # evicts `first`: only one model on the NPU
    await runners[0].stopping.wait()
    leaving.cancel()  # the client went away during the eviction
    await asyncio.sleep(0)
    coming = asyncio.create_task(use(scheduler, second))
    with pytest.raises(asyncio.CancelledError):
        await leaving
    await coming
    # `first` is killed (nobody waits for its graceful exit) and gone before `second` starts.
    assert events == [
        "started /nowhere/first.rkllm",
        "killed /nowhere/first.rkllm",
        "stopped /nowhere/first.rkllm",
        "started /nowhere/second.rkllm",
    ]
    assert [model.entry.name.display for model in scheduler.loaded_models] == ["second:latest"]
    gate.set()
    await scheduler.close()


async def test_a_delete_cancelled_while_stopping_the_runner_still_stops_it(gate: asyncio.Event) -> None:
    events: list[str] = []
    runners: list[SlowToStop] = []
    scheduler = scheduler_with(events, runners, gate)
    model = npu_entry("gone")
    await use(scheduler, model)
    deleting = asyncio.create_task(scheduler.unload_if_loaded(model.name.key))
    await runners[0].stopping.wait()
    deleting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await deleting
    assert events == [
        "started /nowhere/gone.rkllm",
        "killed /nowhere/gone.rkllm",
        "stopped /nowhere/gone.rkllm",
    ]
    assert not runners[0].alive
    assert scheduler.loaded_models == []
    await scheduler.close()


async def test_an_uncancelled_stop_is_graceful(gate: asyncio.Event) -> None:
    events: list[str] = []
    runners: list[SlowToStop] = []
    scheduler = scheduler_with(events, runners, gate)
    model = npu_entry("kept")
    await use(scheduler, model)
    deleting = asyncio.create_task(scheduler.unload_if_loaded(model.name.key))
    await runners[0].stopping.wait()
    gate.set()
    await deleting
    assert events == ["started /nowhere/kept.rkllm", "stopped /nowhere/kept.rkllm"]
    await scheduler.close()
