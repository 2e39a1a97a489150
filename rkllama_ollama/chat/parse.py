"""Streaming output parsers: model text pieces in, thinking / content / tool-call events out.

Every parser is incremental and works on arbitrary chunk boundaries (a tag may arrive as `</th` +
`ink>`). Feeding a text whole or in any split gives the same output once adjacent events of one kind
are joined. Nothing is held back except characters that might still start a tag or stop string
(and, inside a tool call, the call itself, which is emitted whole once it closes).

Order in `OutputPipeline`: stop sequences -> thinking -> tool calls. Stop sequences match the raw
model text, as in Ollama (its runner checks `stop` before any parsing); so a stop string also stops
inside thinking or inside a tool call, and tags never hide a stop string.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import string
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rkllama_ollama.chat.template import ChatTemplate

logger = logging.getLogger(__name__)

THINKING = "thinking"
CONTENT = "content"
TOOL_CALL = "tool_call"

STYLE_HERMES = "hermes"  # Qwen2.5 / Qwen3 / Hermes: <tool_call>{"name": ..., "arguments": {...}}</tool_call>
STYLE_QWEN_XML = "qwen_xml"  # Qwen3-Coder / Qwen3.5: <tool_call><function=N><parameter=K>v</parameter>...
STYLE_LLAMA3_JSON = "llama3_json"  # Llama 3.x: the reply is {"name": ..., "parameters": {...}}
TOOL_STYLES = (STYLE_HERMES, STYLE_QWEN_XML, STYLE_LLAMA3_JSON)

Event = tuple[str, Any]  # ("thinking", str) | ("content", str) | ("tool_call", ToolCall)

_CALL_ID_ALPHABET = string.ascii_lowercase + string.digits


def new_call_id() -> str:
    """`call_` plus 8 lowercase alphanumerics, the id format Ollama gives tool calls."""
    return "call_" + "".join(secrets.choice(_CALL_ID_ALPHABET) for _ in range(8))


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]
    index: int  # position among this reply's calls, from 0
    id: str = field(default_factory=new_call_id)


def _partial_start(text: str, tag: str) -> int:
    """Where the longest suffix of `text` that is a proper prefix of `tag` begins (len(text) if none)."""
    end = len(text)
    i = text.find(tag[0], max(0, end - len(tag) + 1))
    while i != -1:
        if tag.startswith(text[i:]):
            return i
        i = text.find(tag[0], i + 1)
    return end


def _partial_start_any(text: str, tags: Iterable[str]) -> int:
    return min((_partial_start(text, tag) for tag in tags), default=len(text))


class _Events:
    """An event list that joins adjacent text events of one kind and drops empty text."""

    def __init__(self) -> None:
        self.items: list[Event] = []

    def text(self, kind: str, text: str) -> None:
        if not text:
            return
        if self.items and self.items[-1][0] == kind:
            self.items[-1] = (kind, self.items[-1][1] + text)
        else:
            self.items.append((kind, text))

    def call(self, call: ToolCall) -> None:
        self.items.append((TOOL_CALL, call))

    def extend(self, events: Iterable[Event]) -> None:
        for kind, value in events:
            if kind == TOOL_CALL:
                self.call(value)
            else:
                self.text(kind, value)


class _BufferedParser:
    """A streaming parser: text accumulates in `_pending`; `_advance` emits what is decided and keeps
    only what might still turn out to be a tag."""

    _pending: str

    def feed(self, text: str) -> list[Event]:
        events = _Events()
        self._pending += text
        self._advance(events, final=False)
        return events.items

    def flush(self) -> list[Event]:
        events = _Events()
        self._advance(events, final=True)
        return events.items

    def _advance(self, events: _Events, *, final: bool) -> None:
        raise NotImplementedError


# --------------------------------------------------------------------------------------------------
# thinking


class ThinkingSplitter(_BufferedParser):
    """Splits `<think>...</think>` reasoning from the answer.

    - `start_in_thinking`: the prompt already opened the block (the template ends with the open tag),
      so output starts as thinking; a repeated open tag at that point is swallowed.
    - Otherwise an open tag counts only at the very start of the output (after whitespace); any other
      first character makes the whole output content, tags included.
    - Whitespace right after the open tag and right after the close tag is dropped (Ollama:
      `<think>` + `" x </think> y"` gives thinking `"x "` and content `"y"`).
    """

    _LOOK_FOR_OPEN = 0
    _EAT_THINKING_START = 1
    _THINKING = 2
    _EAT_CONTENT_START = 3
    _CONTENT = 4

    def __init__(
        self, open_tag: str = "<think>", close_tag: str = "</think>", *, start_in_thinking: bool = False
    ) -> None:
        self.open_tag = open_tag
        self.close_tag = close_tag
        self._state = self._EAT_THINKING_START if start_in_thinking else self._LOOK_FOR_OPEN
        self._may_repeat_open = start_in_thinking
        self._pending = ""

    def _advance(self, events: _Events, *, final: bool) -> None:
        while True:
            pending = self._pending
            if self._state == self._CONTENT:
                events.text(CONTENT, pending)
                self._pending = ""
                return
            if self._state == self._THINKING:
                close = pending.find(self.close_tag)
                if close != -1:
                    events.text(THINKING, pending[:close])
                    self._pending = pending[close + len(self.close_tag) :]
                    self._state = self._EAT_CONTENT_START
                    continue
                cut = len(pending) if final else _partial_start(pending, self.close_tag)
                events.text(THINKING, pending[:cut])
                self._pending = pending[cut:]
                return
            stripped = pending.lstrip()
            if self._state == self._LOOK_FOR_OPEN:
                if stripped.startswith(self.open_tag):
                    self._pending = stripped[len(self.open_tag) :]
                    self._state = self._EAT_THINKING_START
                    continue
                if self.open_tag.startswith(stripped) and not final:
                    return  # only whitespace or the start of the open tag so far
                self._state = self._CONTENT  # no thinking: keep the text exactly as produced
                continue
            if not stripped:
                self._pending = ""
                return
            if self._state == self._EAT_THINKING_START:
                if self._may_repeat_open:
                    if stripped.startswith(self.open_tag):
                        self._pending = stripped[len(self.open_tag) :]
                        self._may_repeat_open = False
                        continue
                    if self.open_tag.startswith(stripped) and not final:
                        self._pending = stripped
                        return
                self._may_repeat_open = False
                self._state = self._THINKING
            else:
                self._state = self._CONTENT
            self._pending = stripped


def prompt_opens_thinking(prompt: str, open_tag: str = "<think>") -> bool:
    """True when a rendered prompt ends inside an opened thinking block (e.g. `...assistant\\n<think>\\n`)."""
    return prompt.rstrip().endswith(open_tag)


# --------------------------------------------------------------------------------------------------
# stop sequences


class StopMatcher:
    """Cuts the output at the first stop string; holds back only a possible start of one."""

    def __init__(self, stops: Iterable[str]) -> None:
        self.stops = sorted({s for s in stops if s})
        self.stopped = False
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Text safe to emit now, and whether a stop string matched (nothing follows it)."""
        if self.stopped:
            return "", True
        if not self.stops:
            return text, False
        buffer = self._held + text
        first = self._first_match(buffer)
        cut = _partial_start_any(buffer, self.stops)
        if first != -1 and first <= cut:
            self.stopped = True
            self._held = ""
            return buffer[:first], True
        # no match yet, or a longer stop string that starts earlier may still complete: wait for it
        self._held = buffer[cut:]
        return buffer[:cut], False

    def flush(self) -> str:
        """The held text once the generation has ended (cut at a stop string found in it)."""
        held, self._held = self._held, ""
        first = self._first_match(held)
        if first != -1:
            self.stopped = True
            return held[:first]
        return held

    def _first_match(self, buffer: str) -> int:
        first = -1
        for stop in self.stops:
            at = buffer.find(stop)
            if at != -1 and (first == -1 or at < first):
                first = at
        return first


# --------------------------------------------------------------------------------------------------
# tool calls


def detect_tool_style(template_source: str | None) -> str:
    """The tool-call format a model uses, read from its chat template. Default: Hermes/Qwen JSON."""
    source = template_source or ""
    if "<function=" in source or "<parameter=" in source:
        return STYLE_QWEN_XML
    if "<tool_call>" in source:
        return STYLE_HERMES
    if "<|python_tag|>" in source or ("<|start_header_id|>" in source and "tools" in source):
        return STYLE_LLAMA3_JSON
    return STYLE_HERMES


def _decode_arguments(value: Any) -> dict[str, Any] | None:
    if isinstance(value, dict):
        return value
    if isinstance(value, str):
        try:
            decoded = json.loads(value)
        except ValueError:
            return None
        return decoded if isinstance(decoded, dict) else None
    return None


def _call_from_object(obj: Any, *, require_arguments: bool) -> tuple[str, dict[str, Any]] | None:
    """(name, arguments) from a decoded JSON call object, or None when it is not one."""
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("function"), dict):
        obj = obj["function"]
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return None
    for key in ("arguments", "parameters"):
        if key in obj:
            arguments = _decode_arguments(obj[key])
            return (name, arguments) if arguments is not None else None
    return None if require_arguments else (name, {})


def _parse_json_calls(body: str) -> list[tuple[str, dict[str, Any]]] | None:
    """Hermes body: one call object, or a list of them."""
    try:
        decoded = json.loads(body)
    except ValueError:
        return None
    objects = decoded if isinstance(decoded, list) else [decoded]
    calls = [_call_from_object(obj, require_arguments=False) for obj in objects]
    if not calls or any(call is None for call in calls):
        return None
    return calls  # type: ignore[return-value]


_XML_FUNCTION = re.compile(r"<function=([^>\n]+)>(.*?)</function>", re.DOTALL)
_XML_PARAMETER = re.compile(r"<parameter=([^>\n]+)>(.*?)(?:</parameter>|(?=<parameter=)|\Z)", re.DOTALL)


def _parameter_types(tools: list[dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """Tool name -> {parameter: JSON-schema type}, for typing XML parameter values."""
    types: dict[str, dict[str, Any]] = {}
    for tool in tools or []:
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            continue
        properties = (function.get("parameters") or {}).get("properties") or {}
        if isinstance(properties, dict):
            types[function["name"]] = {
                key: spec.get("type") for key, spec in properties.items() if isinstance(spec, dict)
            }
    return types


def _xml_value(raw: str, declared_type: Any) -> Any:
    value = raw[1:] if raw.startswith("\n") else raw
    value = value[:-1] if value.endswith("\n") else value
    is_string = declared_type == "string" or (isinstance(declared_type, list) and "string" in declared_type)
    if is_string:
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


def _parse_xml_calls(
    text: str, parameter_types: dict[str, dict[str, Any]]
) -> list[tuple[str, dict[str, Any]]] | None:
    """Qwen3-Coder body: `<function=NAME>` with `<parameter=KEY>value</parameter>` items."""
    calls: list[tuple[str, dict[str, Any]]] = []
    rest = text
    for match in _XML_FUNCTION.finditer(text):
        name = match.group(1).strip()
        if not name:
            return None
        types = parameter_types.get(name, {})
        arguments = {
            key.strip(): _xml_value(value, types.get(key.strip()))
            for key, value in _XML_PARAMETER.findall(match.group(2))
        }
        calls.append((name, arguments))
        rest = rest.replace(match.group(0), "", 1)
    if not calls or rest.replace("<tool_call>", "").replace("</tool_call>", "").strip():
        return None
    return calls


class _JsonObjectEnd:
    """Finds where a JSON object that starts at offset 0 ends, scanning each character once."""

    def __init__(self) -> None:
        self._depth = 0
        self._in_string = False
        self._escaped = False
        self._scanned = 0

    def find(self, text: str) -> int:
        """Index of the closing brace of the outer object in `text` (which only grows), or -1."""
        for i in range(self._scanned, len(text)):
            char = text[i]
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif char == "\\":
                    self._escaped = True
                elif char == '"':
                    self._in_string = False
            elif char == '"':
                self._in_string = True
            elif char in "{[":
                self._depth += 1
            elif char in "}]":
                self._depth -= 1
                if self._depth == 0:
                    self._scanned = i + 1
                    return i
        self._scanned = len(text)
        return -1


_LLAMA_PYTHON_TAG = "<|python_tag|>"
_LLAMA_FIRST_KEY = re.compile(r'\{\s*"((?:[^"\\]|\\.)*)"')
_LLAMA_NOT_A_KEY = re.compile(r'\{\s*[^\s"]')
_LLAMA_CALL_KEYS = frozenset({"name", "type", "function", "parameters", "arguments"})
_LLAMA_SEPARATORS = " \t\r\n;"


class ToolCallParser(_BufferedParser):
    """Extracts tool calls from the content stream; everything else passes through as content.

    A call whose body does not parse is emitted as content, tags and all (never lost). In the
    Llama-3 style, `;` and whitespace between or after JSON calls are dropped.
    """

    _OUTSIDE = 0  # tag styles: between calls
    _INSIDE = 1  # tag styles: inside an opened call
    _LLAMA_START = 2  # llama: nothing but whitespace (or the python tag) so far
    _LLAMA_JSON = 3  # llama: inside a JSON object that might be a call
    _LLAMA_BETWEEN = 4  # llama: after a call, only separators so far
    _PASS = 5  # everything else is content

    def __init__(self, style: str = STYLE_HERMES, *, tools: list[dict[str, Any]] | None = None) -> None:
        if style not in TOOL_STYLES:
            raise ValueError(f"unknown tool-call style {style!r}; expected one of {', '.join(TOOL_STYLES)}")
        self.style = style
        self._parameter_types = _parameter_types(tools) if style != STYLE_LLAMA3_JSON else {}
        self._closers = {"<tool_call>": "</tool_call>"}
        if style == STYLE_QWEN_XML:
            self._closers["<function="] = "</function>"
        self._state = self._LLAMA_START if style == STYLE_LLAMA3_JSON else self._OUTSIDE
        self._pending = ""  # held text (outside calls) or the call so far (inside)
        self._opener = ""
        self._scan_from = 0
        self._raw_prefix = ""  # llama: whitespace / python tag before the JSON object
        self._json_end = _JsonObjectEnd()
        self._first_key_checked = False
        self._count = 0

    def _emit_calls(self, events: _Events, calls: list[tuple[str, dict[str, Any]]]) -> None:
        for name, arguments in calls:
            events.call(ToolCall(name=name, arguments=arguments, index=self._count))
            self._count += 1

    def _parse_tagged(self, opener: str, body: str, closer: str) -> list[tuple[str, dict[str, Any]]] | None:
        """Calls in one tagged block: the style's own format first, then the other tag format."""
        as_xml = _parse_xml_calls(opener + body + closer, self._parameter_types)
        as_json = _parse_json_calls(body.strip()) if opener == "<tool_call>" else None
        if self.style == STYLE_QWEN_XML:
            return as_xml or as_json
        return as_json or as_xml

    def _advance(self, events: _Events, *, final: bool) -> None:
        while True:
            state = self._state
            if state == self._PASS:
                events.text(CONTENT, self._pending)
                self._pending = ""
                return
            if state == self._OUTSIDE:
                if not self._advance_outside(events, final):
                    return
            elif state == self._INSIDE:
                if not self._advance_inside(events, final):
                    return
            elif state == self._LLAMA_JSON:
                if not self._advance_llama_json(events, final):
                    return
            elif not self._advance_llama_edge(events, final):
                return

    def _advance_outside(self, events: _Events, final: bool) -> bool:
        pending = self._pending
        found, opener = -1, ""
        for candidate in self._closers:
            at = pending.find(candidate)
            if at != -1 and (found == -1 or at < found):
                found, opener = at, candidate
        if found == -1:
            cut = len(pending) if final else _partial_start_any(pending, self._closers)
            events.text(CONTENT, pending[:cut])
            self._pending = pending[cut:]
            return False
        events.text(CONTENT, pending[:found])
        self._pending = pending[found + len(opener) :]
        self._opener, self._scan_from, self._state = opener, 0, self._INSIDE
        return True

    def _advance_inside(self, events: _Events, final: bool) -> bool:
        body, opener = self._pending, self._opener
        closer = self._closers[opener]
        end = body.find(closer, self._scan_from)
        if end == -1 and not final:
            self._scan_from = max(0, len(body) - len(closer) + 1)
            return False
        if end == -1:  # the reply ended inside the call: accept it if it is complete without the tag
            calls = self._parse_tagged(opener, body, closer)
            raw, self._pending = opener + body, ""
        else:
            calls = self._parse_tagged(opener, body[:end], closer)
            raw, self._pending = opener + body[: end + len(closer)], body[end + len(closer) :]
        if calls is None:
            logger.info("tool call did not parse; passing it on as content (%d chars)", len(raw))
            events.text(CONTENT, raw)
        else:
            self._emit_calls(events, calls)
        self._state = self._OUTSIDE
        return True

    def _advance_llama_edge(self, events: _Events, final: bool) -> bool:
        """Llama style, at the start of the reply or after a call: is a JSON call coming?"""
        pending = self._pending
        stripped = pending.lstrip(_LLAMA_SEPARATORS if self._state == self._LLAMA_BETWEEN else None)
        at_start = self._state == self._LLAMA_START
        if at_start and stripped.startswith(_LLAMA_PYTHON_TAG):
            self._raw_prefix += pending[: len(pending) - len(stripped) + len(_LLAMA_PYTHON_TAG)]
            self._pending = stripped[len(_LLAMA_PYTHON_TAG) :]
            return True
        if stripped.startswith("{"):
            if at_start:
                self._raw_prefix += pending[: len(pending) - len(stripped)]
            self._pending = stripped
            self._json_end, self._first_key_checked = _JsonObjectEnd(), False
            self._state = self._LLAMA_JSON
            return True
        if not stripped or (at_start and _LLAMA_PYTHON_TAG.startswith(stripped)):
            if final:
                if at_start:
                    events.text(CONTENT, self._raw_prefix + pending)
                self._pending = self._raw_prefix = ""
            return False
        events.text(CONTENT, self._raw_prefix + pending)
        self._pending = self._raw_prefix = ""
        self._state = self._PASS
        return False

    def _advance_llama_json(self, events: _Events, final: bool) -> bool:
        pending = self._pending
        if not self._first_key_checked:
            first_key = _LLAMA_FIRST_KEY.match(pending)
            if first_key or _LLAMA_NOT_A_KEY.match(pending):
                self._first_key_checked = True
                if not first_key or first_key.group(1) not in _LLAMA_CALL_KEYS:
                    return self._llama_give_up(events)
        end = self._json_end.find(pending)
        if end == -1:
            return self._llama_give_up(events) if final else False
        try:
            decoded = json.loads(pending[: end + 1])
        except ValueError:
            decoded = None
        call = _call_from_object(decoded, require_arguments=True)
        if call is None:
            return self._llama_give_up(events)
        self._emit_calls(events, [call])
        self._pending, self._raw_prefix = pending[end + 1 :], ""
        self._state = self._LLAMA_BETWEEN
        return True

    def _llama_give_up(self, events: _Events) -> bool:
        if self._count:
            logger.info("text after a Llama tool call is not a call; passing it on as content")
        events.text(CONTENT, self._raw_prefix + self._pending)
        self._pending = self._raw_prefix = ""
        self._state = self._PASS
        return False


# --------------------------------------------------------------------------------------------------
# the whole chain for one request


class OutputPipeline:
    """Stop sequences -> thinking -> tool calls, for one request. Feed it every piece the engine emits.

    `feed` and `flush` return events: ("thinking", str), ("content", str), ("tool_call", ToolCall).
    When `stopped` turns true a stop string matched: the events just returned are final (later calls
    return nothing) and the caller aborts the generation (done_reason "stop").
    """

    def __init__(
        self,
        *,
        stops: Iterable[str] | None = None,
        split_thinking: bool = False,
        keep_thinking: bool = True,
        start_in_thinking: bool = False,
        tool_style: str | None = None,
        tools: list[dict[str, Any]] | None = None,
        open_tag: str = "<think>",
        close_tag: str = "</think>",
    ) -> None:
        stop_list = [s for s in stops or () if s]
        self._stops = StopMatcher(stop_list) if stop_list else None
        self._thinking = (
            ThinkingSplitter(open_tag, close_tag, start_in_thinking=start_in_thinking)
            if split_thinking
            else None
        )
        self._keep_thinking = keep_thinking
        # What a grammar must let through before the answer (runtime/grammar.py): the open tag ("" when
        # the prompt already opened the block) and the close tag; None when output is not split.
        self.thinking_tags: tuple[str, str] | None = (
            ("" if start_in_thinking else open_tag, close_tag) if split_thinking else None
        )
        self._tools = ToolCallParser(tool_style, tools=tools) if tool_style else None
        self.stopped = False
        self._finished = False

    @classmethod
    def for_request(
        cls,
        template: ChatTemplate | None,
        prompt: str,
        *,
        think: bool | str | None = None,
        tools: list[dict[str, Any]] | None = None,
        stops: Iterable[str] | None = None,
    ) -> OutputPipeline:
        """The pipeline for a rendered prompt.

        Thinking is split when the template knows thinking and `think` is not false (unset means on,
        as in Ollama), or when the prompt itself opened a thinking block; in that last case with
        `think: false` the thinking is dropped. With `think: false` otherwise, output stays as is.
        Tool calls are parsed only when the request has tools and the template rendered them.
        """
        opened = prompt_opens_thinking(prompt)
        supports_thinking = template is not None and template.supports_thinking
        split = opened or (supports_thinking and think is not False)
        keep = think is not False
        style = None
        if tools and (template is None or template.supports_tools):
            style = detect_tool_style(template.source if template is not None else None)
        return cls(
            stops=stops,
            split_thinking=split,
            keep_thinking=keep,
            start_in_thinking=opened,
            tool_style=style,
            tools=tools,
        )

    def feed(self, piece: str) -> list[Event]:
        if self._finished:
            return []
        events = _Events()
        if self._stops is None:
            text, stopped = piece, False
        else:
            text, stopped = self._stops.feed(piece)
        self._pass_down(events, text)
        if stopped:
            self.stopped = True
            self._flush_down(events)
        return events.items

    def flush(self) -> list[Event]:
        """The remaining events once the generation has ended."""
        if self._finished:
            return []
        events = _Events()
        if self._stops is not None:
            self._pass_down(events, self._stops.flush())
            self.stopped = self._stops.stopped
        self._flush_down(events)
        return events.items

    def _pass_down(self, events: _Events, text: str) -> None:
        if not text:
            return
        if self._thinking is None:
            self._to_tools(events, [(CONTENT, text)])
        else:
            self._to_tools(events, self._thinking.feed(text))

    def _flush_down(self, events: _Events) -> None:
        if self._thinking is not None:
            self._to_tools(events, self._thinking.flush())
        if self._tools is not None:
            events.extend(self._tools.flush())
        self._finished = True

    def _to_tools(self, events: _Events, split: list[Event]) -> None:
        for kind, text in split:
            if kind == THINKING:
                if self._keep_thinking:
                    events.text(THINKING, text)
            elif self._tools is None:
                events.text(CONTENT, text)
            else:
                events.extend(self._tools.feed(text))
