"""The relay from a runner's pieces to a generation's events.

Each piece goes through the output parsers (stop sequences, then thinking, then tool calls) and comes
out as Thinking / Content / ToolCallEvent events, its logprobs on the first of them; a stop sequence
aborts the generation. A format the engine could not constrain holds the answer back until it is
checked. The observer hears time to first token, the gaps after it and the final statistics.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, Iterable
from dataclasses import replace
from typing import Any, Protocol

from rkllama_ollama.chat.parse import OutputPipeline
from rkllama_ollama.generation_events import Content, Done, Event, Thinking, ToolCallEvent
from rkllama_ollama.runtime.base import DoneReason, GenerationStats, RuntimeFailure, TokenLogprob
from rkllama_ollama.runtime.runner.protocol import Finished, Generation, Piece
from rkllama_ollama.structured import Format, InvalidStructuredAnswer, validated_answer

log = logging.getLogger(__name__)


class GenerationObserver(Protocol):
    """Hooks for metrics and request logs, called in the requesting task. They must be cheap and not raise."""

    def generation_started(self, model: str) -> None: ...

    def model_loaded(self, model: str, engine: str, load_ns: int) -> None:
        """A runner actually loaded the model (not called when it was already loaded)."""

    def first_piece(self, model: str, ttft_ns: int) -> None:
        """The first output piece, `ttft_ns` after the request reached the Generator."""

    def next_piece(self, model: str, gap_ns: int) -> None:
        """Every later output piece, `gap_ns` after the previous one."""

    def generation_finished(self, model: str, stats: GenerationStats) -> None: ...


class NullObserver:
    def generation_started(self, model: str) -> None:
        pass

    def model_loaded(self, model: str, engine: str, load_ns: int) -> None:
        pass

    def first_piece(self, model: str, ttft_ns: int) -> None:
        pass

    def next_piece(self, model: str, gap_ns: int) -> None:
        pass

    def generation_finished(self, model: str, stats: GenerationStats) -> None:
        pass


class Relay:
    """One generation's way from pieces to events. `events()` yields them; once it has ended, `done()`
    is the final event."""

    def __init__(
        self,
        pipeline: OutputPipeline,
        held_format: Format | None,
        observer: GenerationObserver,
        model: str,
        started_ns: int,
    ) -> None:
        self.pipeline = pipeline
        self.held = _HeldAnswer(held_format) if held_format is not None else None
        self.observer = observer
        self.model = model
        self.started_ns = started_ns
        self.stats: GenerationStats | None = None
        self.stopped = False  # a stop sequence ended the answer

    async def events(self, generation: Generation) -> AsyncGenerator[Event, None]:
        pipeline, held = self.pipeline, self.held
        last_piece_ns = 0
        try:
            async for item in generation:
                if isinstance(item, Piece):
                    if self.stopped:
                        continue  # tokens produced between our abort and the runner seeing it
                    now_ns = time.perf_counter_ns()
                    if last_piece_ns:
                        self.observer.next_piece(self.model, now_ns - last_piece_ns)
                    else:
                        self.observer.first_piece(self.model, now_ns - self.started_ns)
                    last_piece_ns = now_ns
                    for event in _with_logprobs(_passed(held, pipeline.feed(item.text)), item.logprobs):
                        yield event
                    if pipeline.stopped:
                        self.stopped = True
                        generation.abort()
                elif isinstance(item, Finished):
                    self.stats = item.stats
        finally:
            await generation.aclose()
        if not self.stopped:
            for event in _passed(held, pipeline.flush()):
                yield event
        answer = held.release() if held is not None else None
        if answer is not None:
            yield answer
        if self.stats is None:
            raise RuntimeFailure("generation ended without statistics")
        self.observer.generation_finished(self.model, self.stats)

    def done(self, load_ns: int) -> Done:
        """The final event: why it ended, the statistics, the load time (plus any reload during the
        generation) and the time since the request reached the Generator."""
        stats = self.stats
        if stats is None:
            raise RuntimeFailure("generation ended without statistics")
        stopped = self.stopped or stats.done_reason in (DoneReason.STOP, DoneReason.ABORT)
        reason = DoneReason.STOP if stopped else stats.done_reason
        return Done(reason, stats, load_ns + stats.reload_ns, time.perf_counter_ns() - self.started_ns)


class _HeldAnswer:
    """Structured output on an engine that cannot constrain decoding: the answer is held back and
    released only once it is JSON matching the format; otherwise the request fails."""

    def __init__(self, fmt: Format) -> None:
        self.fmt = fmt
        self.parts: list[str] = []
        self.tool_calls = 0

    def release(self) -> Content | None:
        """The validated answer; None when the model answered with tool calls only."""
        if self.tool_calls and not "".join(self.parts).strip():
            return None
        try:
            return Content(validated_answer("".join(self.parts), self.fmt))
        except InvalidStructuredAnswer as exc:
            log.warning("structured output rejected: %s", exc)
            raise RuntimeFailure(str(exc)) from None


def _passed(held: _HeldAnswer | None, events: Iterable[tuple[str, Any]]) -> list[Event]:
    """The parser's events as Events; answer text goes to `held` instead when the answer is held back."""
    passed: list[Event] = []
    for event in events:
        wrapped = _wrap(event)
        if held is not None and isinstance(wrapped, Content):
            held.parts.append(wrapped.text)
            continue
        if held is not None and isinstance(wrapped, ToolCallEvent):
            held.tool_calls += 1
        passed.append(wrapped)
    return passed


def _with_logprobs(events: list[Event], logprobs: list[TokenLogprob] | None) -> list[Event]:
    """Put a piece's logprobs on the first event it produced, or on an empty Content if it produced
    none (its text is held back), so that no token's entry is lost or delayed."""
    if logprobs is None:
        return events
    if not events:
        return [Content("", logprobs)]
    first = events[0]
    assert not isinstance(first, Done)  # the parser's events never include Done
    return [replace(first, logprobs=logprobs), *events[1:]]


def _wrap(event: tuple[str, Any]) -> Event:
    kind, value = event
    if kind == "thinking":
        return Thinking(value)
    if kind == "tool_call":
        return ToolCallEvent(value)
    return Content(value)
