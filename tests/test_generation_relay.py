"""generation_relay.py in-process: a scripted runner generation stands in for the runner."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from rkllama_ollama.chat.parse import OutputPipeline
from rkllama_ollama.generation_events import Content, Event, Thinking
from rkllama_ollama.generation_relay import NullObserver, Relay
from rkllama_ollama.runtime.base import DoneReason, GenerationStats, RuntimeFailure
from rkllama_ollama.runtime.runner.protocol import Finished, Piece


class Scripted:
    """Yields its pieces, then Finished(stats); records abort() and aclose()."""

    def __init__(self, pieces: list[str], stats: GenerationStats | None) -> None:
        self.items: list[Piece | Finished] = [Piece(text) for text in pieces] + [Finished(stats)]
        self.aborted_at: int | None = None
        self.closed = False
        self.sent = 0

    def __aiter__(self) -> AsyncIterator[Piece | Finished]:
        return self._items()

    async def _items(self) -> AsyncIterator[Piece | Finished]:
        for item in self.items:
            self.sent += 1
            yield item

    def abort(self) -> None:
        self.aborted_at = self.sent

    async def aclose(self) -> None:
        self.closed = True


class Counting(NullObserver):
    def __init__(self) -> None:
        self.first = 0
        self.next = 0
        self.finished: list[GenerationStats] = []

    def first_piece(self, model: str, ttft_ns: int) -> None:
        self.first += 1

    def next_piece(self, model: str, gap_ns: int) -> None:
        self.next += 1

    def generation_finished(self, model: str, stats: GenerationStats) -> None:
        self.finished.append(stats)


def stats(reason: DoneReason, reload_ns: int = 0) -> GenerationStats:
    return GenerationStats(reason, 5, 5, 10, 3, 30, reload_ns=reload_ns)


async def relay_all(relay: Relay, generation: Scripted) -> list[Event]:
    return [event async for event in relay.events(generation)]


async def test_a_stop_sequence_aborts_the_runner_and_later_pieces_are_dropped() -> None:
    observer = Counting()
    relay = Relay(OutputPipeline(stops=["END"]), None, observer, "m", 0)
    generation = Scripted(["Hello ", "wor", "ld END and", " more"], stats(DoneReason.ABORT))
    events = await relay_all(relay, generation)
    assert "".join(e.text for e in events if isinstance(e, Content)) == "Hello world "
    assert generation.aborted_at == 3 and generation.closed
    assert (observer.first, observer.next) == (1, 2)  # the piece after the abort is not a token served
    done = relay.done(load_ns=7)
    assert done.done_reason is DoneReason.STOP and done.load_ns == 7
    assert observer.finished == [done.stats]


async def test_a_reply_cut_by_the_limit_ends_with_length_and_its_reload_time() -> None:
    pipeline = OutputPipeline(split_thinking=True, start_in_thinking=True)
    relay = Relay(pipeline, None, NullObserver(), "m", 0)
    events = await relay_all(relay, Scripted(["hmm</think>", "yes"], stats(DoneReason.LENGTH, 40)))
    assert [type(e) for e in events] == [Thinking, Content]
    done = relay.done(load_ns=2)
    assert done.done_reason is DoneReason.LENGTH and done.load_ns == 42


async def test_a_held_format_releases_only_a_valid_answer() -> None:
    relay = Relay(OutputPipeline(), "json", NullObserver(), "m", 0)
    events = await relay_all(relay, Scripted(['{"a"', ": 1}"], stats(DoneReason.STOP)))
    assert events == [Content('{"a": 1}')]  # held back, then released whole
    refused = Relay(OutputPipeline(), "json", NullObserver(), "m", 0)
    with pytest.raises(RuntimeFailure):
        await relay_all(refused, Scripted(["not json"], stats(DoneReason.STOP)))


async def test_a_generation_without_statistics_is_a_failure() -> None:
    relay = Relay(OutputPipeline(), None, NullObserver(), "m", 0)
    generation = Scripted(["x"], None)
    with pytest.raises(RuntimeFailure, match="without statistics"):
        await relay_all(relay, generation)
    assert generation.closed
