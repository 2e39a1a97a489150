"""After Open WebUI-style background requests, the last streamed conversation is fed back into the KV
cache while the session is idle, so the next message only feeds what is new (tiny GGUF, live daemon)."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import ollama

from rkllama_ollama.prefix_keeper import PrefixKeeper
from rkllama_ollama.runtime.base import GenerationStats, LoadSpec
from rkllama_ollama.runtime.runner import Finished
from rkllama_ollama.scheduler import Scheduler
from tests.conftest import make_gguf_model
from tests.support.daemon import Daemon

RESTORED = re.compile(r"conversation restored in the cache model=tiny:latest: (\d+) tokens fed")
OPTIONS = {"num_predict": 6, "seed": 2, "temperature": 0}


def wait_for_log(daemon: Daemon, pattern: re.Pattern[str], count: int, timeout: float = 30.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = pattern.findall(daemon.log())
        if len(found) >= count:
            return found
        time.sleep(0.05)
    raise AssertionError(f"no {pattern.pattern!r} in the log:\n{daemon.log()[-3000:]}")


def test_the_next_message_after_background_requests_feeds_only_what_is_new(tmp_path: Path) -> None:
    store = tmp_path / "models"
    make_gguf_model(store, "tiny", context_length=4096)
    history = [{"role": "user", "content": "tell me about the water and the people " * 8}]
    with Daemon(store).start() as daemon:
        client = ollama.Client(host=daemon.url)
        reply = "".join(
            part.message.content or ""
            for part in client.chat("tiny", messages=history, options=OPTIONS, stream=True)
        )
        # Open WebUI's title request: non-streamed, an unrelated prompt (its follow-ups and tags would only
        # postpone the restore: each background request restarts the idle delay).
        client.generate("tiny", prompt="### Task: Generate a concise title " * 5, options=OPTIONS)
        (restored,) = wait_for_log(daemon, RESTORED, 1)
        history += [{"role": "assistant", "content": reply}, {"role": "user", "content": "and then?"}]
        final = list(client.chat("tiny", messages=history, options=OPTIONS, stream=True))[-1]
        assert final.prompt_eval_count is not None
        # Without the restore the whole conversation (more than the restored part) would be fed again.
        assert 0 < final.prompt_eval_count < int(restored) // 2
        # A streamed request never triggers a restore: the cache already holds its conversation.
        assert len(RESTORED.findall(daemon.log())) == 1


# -- the keeper alone, with a stand-in scheduler and runner -------------------------------------


class FakeGeneration:
    def __init__(self, runs: list[str], text: str) -> None:
        runs.append(text)
        self.aborted = False
        GENERATIONS.append(self)

    def __aiter__(self) -> FakeGeneration:
        self._done = False
        return self

    async def __anext__(self) -> Finished:
        if self._done:
            raise StopAsyncIteration
        self._done = True
        return Finished(GenerationStats("stop", 10, 10, 1, 0, 0))

    def abort(self) -> None:
        self.aborted = True

    async def aclose(self) -> None:
        pass


GENERATIONS: list[FakeGeneration] = []


class FakeScheduler:
    def __init__(self, spec: LoadSpec) -> None:
        self.runs: list[str] = []
        runner = SimpleNamespace(generate=lambda text, options: FakeGeneration(self.runs, text))
        self.loaded = SimpleNamespace(key="k", spec=spec, runner=runner)
        self.granted = True
        self.arrival_at_once = False

    def loaded_model(self, key: str) -> SimpleNamespace | None:
        return self.loaded if key == self.loaded.key else None

    @asynccontextmanager
    async def idle_turn(self, key: str, preempt: Callable[[], None]) -> AsyncIterator[bool]:
        if self.granted and self.arrival_at_once:
            preempt()  # a request arrives the moment the turn is granted
        yield self.granted


SPEC = LoadSpec(engine="llamacpp", model_path="m.gguf")


async def test_background_requests_in_a_row_give_one_restore_of_the_last_streamed_text() -> None:
    scheduler = FakeScheduler(SPEC)
    keeper = PrefixKeeper(cast(Scheduler, scheduler), delay_s=0.01)
    keeper.background_ended("k")  # nothing streamed yet: nothing to restore
    keeper.streamed("k", "m", SPEC, "prompt + reply")
    keeper.background_ended("k")
    keeper.background_ended("k")  # a second one restarts the delay instead of restoring twice
    await asyncio.sleep(0.1)
    assert scheduler.runs == ["prompt + reply"]


async def test_nothing_is_restored_for_rkllm_or_a_model_no_longer_loaded_or_a_busy_session() -> None:
    scheduler = FakeScheduler(SPEC)
    keeper = PrefixKeeper(cast(Scheduler, scheduler), delay_s=0.01)
    keeper.streamed("k", "m", LoadSpec(engine="rkllm", model_path="m.rkllm"), "text")
    keeper.background_ended("k")
    keeper.streamed("other", "o", SPEC, "text")  # a model that is not the loaded one
    keeper.background_ended("other")
    await asyncio.sleep(0.05)
    scheduler.granted = False
    keeper.streamed("k", "m", SPEC, "text")
    keeper.background_ended("k")
    await asyncio.sleep(0.05)
    assert scheduler.runs == []


async def test_a_request_arriving_before_the_restore_has_begun_still_stops_it() -> None:
    scheduler = FakeScheduler(SPEC)
    scheduler.arrival_at_once = True
    keeper = PrefixKeeper(cast(Scheduler, scheduler), delay_s=0.01)
    GENERATIONS.clear()
    keeper.streamed("k", "m", SPEC, "text")
    keeper.background_ended("k")
    await asyncio.sleep(0.1)
    assert [generation.aborted for generation in GENERATIONS] == [True]
