"""What a generation yields to the face that asked for it, and how a non-streamed answer is gathered.

`logprobs`, when the request asked for them, are the entries of the tokens generated since the previous
event (in Ollama's wire shape). Every generated token's entry rides on exactly one event, even while the
text itself is held back (a tool call being buffered, a possible stop sequence): then it comes on an
empty Content.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from rkllama_ollama.chat.parse import ToolCall
from rkllama_ollama.runtime.base import DoneReason, GenerationStats, RuntimeFailure, TokenLogprob


@dataclass(frozen=True)
class Thinking:
    text: str
    logprobs: list[TokenLogprob] | None = None


@dataclass(frozen=True)
class Content:
    text: str
    logprobs: list[TokenLogprob] | None = None


@dataclass(frozen=True)
class ToolCallEvent:
    call: ToolCall
    logprobs: list[TokenLogprob] | None = None


@dataclass(frozen=True)
class Done:
    done_reason: DoneReason  # STOP or LENGTH
    stats: GenerationStats
    load_ns: int
    total_ns: int

    @property
    def context(self) -> list[int]:
        return self.stats.context


Event = Thinking | Content | ToolCallEvent | Done


async def first_event(events: AsyncIterator[Event]) -> Event:
    """The first event of a run. By then the turn is held, the model loaded and the prompt rendered, so
    whatever fails before a face writes a byte (queue full, load failure, template error, a prompt too
    long) has raised, and the face's error middleware still answers with a real HTTP status."""
    event = await anext(events, None)
    if event is None:
        raise RuntimeFailure("generation ended without a result")
    return event


@dataclass
class Answer:
    """A whole (non-streamed) answer gathered from a run's events; each face formats it its own way."""

    content_parts: list[str] = field(default_factory=list)
    thinking_parts: list[str] = field(default_factory=list)
    tool_calls: list[ToolCallEvent] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def content(self) -> str:
        return "".join(self.content_parts)

    @property
    def thinking(self) -> str:
        return "".join(self.thinking_parts)

    def add(self, event: Thinking | Content | ToolCallEvent) -> None:
        self.logprobs.extend(event.logprobs or ())
        if isinstance(event, Content):
            self.content_parts.append(event.text)
        elif isinstance(event, Thinking):
            self.thinking_parts.append(event.text)
        else:
            self.tool_calls.append(event)


async def collect_answer(first: Event, events: AsyncIterator[Event]) -> tuple[Answer, Done]:
    """Gather a run (from its `first_event`) into one Answer and its final Done."""
    answer = Answer()
    event: Event | None = first
    while event is not None:
        if isinstance(event, Done):
            return answer, event
        answer.add(event)
        event = await anext(events, None)
    raise RuntimeFailure("generation ended without a final result")
