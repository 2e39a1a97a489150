"""How a piece's logprobs ride on the events the output parser makes of its text (checklist #38 of
docs/ollama-conformance.md: the count is preserved even while the text is held back, e.g. a tool call
being buffered)."""

from __future__ import annotations

import orjson

from rkllama_ollama.chat.parse import ToolCall
from rkllama_ollama.generation_events import Content, Thinking, ToolCallEvent
from rkllama_ollama.generation_relay import _with_logprobs
from rkllama_ollama.runtime.base import TokenLogprob

ENTRY = TokenLogprob(b"a", -0.5)


def test_without_logprobs_the_events_are_untouched() -> None:
    events = [Content("a"), Thinking("b")]
    assert _with_logprobs(events, None) == events


def test_they_go_on_the_first_event_only() -> None:
    events = _with_logprobs([Thinking("x"), Content("y")], [ENTRY, ENTRY])
    assert events == [Thinking("x", [ENTRY, ENTRY]), Content("y")]
    call = ToolCall(name="f", arguments={}, index=0)
    assert _with_logprobs([ToolCallEvent(call)], [ENTRY]) == [ToolCallEvent(call, [ENTRY])]


def test_held_back_text_still_streams_its_logprobs_on_an_empty_content() -> None:
    assert _with_logprobs([], [ENTRY]) == [Content("", [ENTRY])]


def test_an_entry_crosses_the_runner_pipe_unchanged() -> None:
    entry = TokenLogprob(b"\xe6\x97", -1.25, (TokenLogprob(b"\xe6\x97", -1.25), TokenLogprob(b" the", -2.5)))
    assert TokenLogprob.from_wire(orjson.loads(orjson.dumps(entry.to_wire()))) == entry
    assert entry.text == "\ufffd"  # part of a character: the raw bytes keep what the text cannot
