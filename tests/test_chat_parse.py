"""Streaming output parsers: chunking invariance, no lost text, stop strings, tool-call formats."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from rkllama_ollama.chat.parse import (
    CONTENT,
    STYLE_HERMES,
    STYLE_LLAMA3_JSON,
    STYLE_QWEN_XML,
    THINKING,
    TOOL_CALL,
    Event,
    OutputPipeline,
    StopMatcher,
    ThinkingSplitter,
    ToolCall,
    ToolCallParser,
    detect_tool_style,
    new_call_id,
    prompt_opens_thinking,
)
from rkllama_ollama.chat.template import ChatTemplate

settings.register_profile("chat", max_examples=150, deadline=None)
settings.load_profile("chat")


# -- helpers ---------------------------------------------------------------------------------------


def normalise(events: list[Event]) -> list[tuple[str, Any]]:
    """Join adjacent text of one kind; tool calls compared without their random id."""
    out: list[tuple[str, Any]] = []
    for kind, value in events:
        if kind == TOOL_CALL:
            out.append(
                (kind, (value.name, value.arguments, value.index) if isinstance(value, ToolCall) else value)
            )
        elif not value:
            continue
        elif out and out[-1][0] == kind:
            out[-1] = (kind, out[-1][1] + value)
        else:
            out.append((kind, value))
    return out


@st.composite
def split(draw: st.DrawFn, text: str) -> list[str]:
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=12)))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def run_parser(make: Callable[[], Any], chunks: list[str]) -> list[Event]:
    parser = make()
    events: list[Event] = []
    for chunk in chunks:
        events.extend(parser.feed(chunk))
    events.extend(parser.flush())
    return events


def texts(events: list[Event], kind: str) -> str:
    return "".join(value for k, value in events if k == kind)


def calls(events: list[Event]) -> list[ToolCall]:
    return [value for kind, value in events if kind == TOOL_CALL]


THINK_PIECES = [
    "<think>",
    "</think>",
    "<",
    "/",
    "<th",
    "ink>",
    "</th",
    "think",
    ">",
    " ",
    "\n",
    "a",
    "x",
    "é",
    "🙂",
]
think_text = st.lists(st.sampled_from(THINK_PIECES), max_size=25).map("".join)


# -- thinking --------------------------------------------------------------------------------------


def reference_thinking(text: str, start_in_thinking: bool) -> list[tuple[str, str]]:
    """The whole-text meaning of ThinkingSplitter, written independently of the streaming code."""
    if start_in_thinking:
        rest = text.lstrip()
        if rest.startswith("<think>"):
            rest = rest[len("<think>") :]
    else:
        stripped = text.lstrip()
        if not stripped.startswith("<think>"):
            return [(CONTENT, text)] if text else []
        rest = stripped[len("<think>") :]
    rest = rest.lstrip()
    thinking, closed, content = rest.partition("</think>")
    return [(kind, value) for kind, value in ((THINKING, thinking), (CONTENT, content.lstrip())) if value]


def test_checklist_41_template_ending_in_think() -> None:
    """Checklist #41 (docs/ollama-conformance.md): prompt ends in <think>, output " x </think> y" ->
    thinking "x ", content "y"."""
    splitter = ThinkingSplitter(start_in_thinking=True)
    assert normalise(splitter.feed(" x </think> y") + splitter.flush()) == [(THINKING, "x "), (CONTENT, "y")]


def test_checklist_41_streamed_byte_by_byte() -> None:
    splitter = ThinkingSplitter(start_in_thinking=True)
    events = [event for char in " x </think> y" for event in splitter.feed(char)] + splitter.flush()
    assert normalise(events) == [(THINKING, "x "), (CONTENT, "y")]


def test_model_opens_thinking_itself() -> None:
    splitter = ThinkingSplitter()
    events = (
        splitter.feed("\n<th")
        + splitter.feed("ink>\nhmm, 2+2")
        + splitter.feed("=4\n</think>\n\n4")
        + splitter.flush()
    )
    assert normalise(events) == [(THINKING, "hmm, 2+2=4\n"), (CONTENT, "4")]


def test_no_thinking_keeps_text_verbatim() -> None:
    splitter = ThinkingSplitter()
    events = splitter.feed("  Hello <think>not thinking</think>") + splitter.flush()
    assert normalise(events) == [(CONTENT, "  Hello <think>not thinking</think>")]


def test_thinking_holds_only_a_possible_close_tag() -> None:
    splitter = ThinkingSplitter(start_in_thinking=True)
    assert splitter.feed("abc</th") == [(THINKING, "abc")]
    assert splitter.feed("x") == [(THINKING, "</thx")]
    assert splitter.feed("def") == [(THINKING, "def")]


def test_unclosed_thinking_is_flushed_as_thinking() -> None:
    splitter = ThinkingSplitter(start_in_thinking=True)
    assert normalise(splitter.feed("still going </thi") + splitter.flush()) == [
        (THINKING, "still going </thi")
    ]


def test_repeated_open_tag_is_swallowed_when_prompt_opened_thinking() -> None:
    splitter = ThinkingSplitter(start_in_thinking=True)
    assert normalise(splitter.feed("<think>\nplan</think>done") + splitter.flush()) == [
        (THINKING, "plan"),
        (CONTENT, "done"),
    ]


@given(st.data(), think_text, st.booleans())
def test_thinking_split_is_chunking_invariant_and_loses_nothing(
    data: st.DataObject, text: str, start_in_thinking: bool
) -> None:
    chunks = data.draw(split(text))
    events = run_parser(lambda: ThinkingSplitter(start_in_thinking=start_in_thinking), chunks)
    assert normalise(events) == reference_thinking(text, start_in_thinking)


# -- stop sequences --------------------------------------------------------------------------------

stop_alphabet = st.sampled_from(["a", "b", "c", "<", "|", "é"])
stop_text = st.lists(stop_alphabet, max_size=30).map("".join)
stop_list = st.lists(st.lists(stop_alphabet, max_size=4).map("".join), max_size=4)


@given(st.data(), stop_text, stop_list)
def test_stop_matcher_cuts_at_the_first_stop_in_any_split(
    data: st.DataObject, text: str, stops: list[str]
) -> None:
    chunks = data.draw(split(text))
    matcher = StopMatcher(stops)
    real_stops = [s for s in stops if s]
    emitted, fed, stopped = "", "", False
    for chunk in chunks:
        out, stopped = matcher.feed(chunk)
        emitted += out
        fed += chunk
        if stopped:
            break
        # buffering bound: only a proper prefix of some stop string is held back
        held = fed[len(emitted) :]
        assert fed.startswith(emitted)
        assert not held or any(s.startswith(held) and len(held) < len(s) for s in real_stops)
    if not stopped:
        emitted += matcher.flush()
        stopped = matcher.stopped
    hits = [at for at in (text.find(s) for s in real_stops) if at != -1]
    if hits:
        assert stopped
        assert emitted == text[: min(hits)]
    else:
        assert not stopped
        assert emitted == text


def test_stop_matcher_waits_for_a_longer_stop_that_starts_earlier() -> None:
    matcher = StopMatcher(["a", "baa"])
    assert matcher.feed("xba") == ("x", False)
    assert matcher.feed("a!") == ("", True)
    ended = StopMatcher(["a", "baa"])
    assert ended.feed("xba") == ("x", False)
    assert ended.flush() == "b" and ended.stopped


def test_stop_matcher_examples() -> None:
    matcher = StopMatcher(["<|end|>", "", "\n\nUser:"])
    assert matcher.feed("Hello <|en") == ("Hello ", False)
    assert matcher.feed("d|> more") == ("", True)
    assert matcher.feed("later") == ("", True)
    assert StopMatcher([""]).feed("text") == ("text", False)
    other = StopMatcher(["\n\nUser:"])
    assert other.feed("a\n\nUs") == ("a", False)
    assert other.feed("ually") == ("\n\nUsually", False)
    assert other.flush() == ""


# -- tool calls ------------------------------------------------------------------------------------

names = st.from_regex(r"[a-z_][a-z0-9_]{0,11}", fullmatch=True)
plain = st.text(st.characters(codec="utf-8", exclude_characters="<{"), max_size=15)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-1000, 1000) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
arguments = st.dictionaries(st.text(max_size=6), json_values, max_size=3)


@st.composite
def hermes_reply(draw: st.DrawFn) -> tuple[str, list[tuple[str, Any]]]:
    """A reply of content and tool calls (some malformed), with the events it must give."""
    text, expected = "", []
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["content", "call", "bad"]))
        if kind == "content":
            piece = draw(plain)
            text += piece
            expected.append((CONTENT, piece))
        elif kind == "call":
            name, args = draw(names), draw(arguments)
            key = draw(st.sampled_from(["arguments", "parameters"]))
            body = json.dumps({"name": name, key: args}, ensure_ascii=draw(st.booleans()))
            text += f"<tool_call>{draw(st.sampled_from(['', chr(10)]))}{body}\n</tool_call>"
            expected.append((TOOL_CALL, (name, args)))
        else:
            raw = (
                "<tool_call>\n"
                + draw(st.sampled_from(['{"name": "x", "arguments": {', "not json", "{}"]))
                + "</tool_call>"
            )
            text += raw
            expected.append((CONTENT, raw))
    return text, expected


def with_indexes(expected: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    out, index = [], 0
    for kind, value in expected:
        if kind == TOOL_CALL:
            out.append((kind, (*value, index)))
            index += 1
        else:
            out.append((kind, value))
    return normalise(out)


@given(st.data(), hermes_reply())
def test_hermes_calls_in_any_split(data: st.DataObject, reply: tuple[str, list[tuple[str, Any]]]) -> None:
    text, expected = reply
    chunks = data.draw(split(text))
    events = run_parser(lambda: ToolCallParser(STYLE_HERMES), chunks)
    assert normalise(events) == with_indexes(expected)
    assert all(call.id.startswith("call_") for call in calls(events))


TOOL_PIECES = [
    "<tool_call>",
    "</tool_call>",
    "<tool",
    "_call>",
    "<",
    "{",
    "}",
    '"name"',
    ":",
    '"f"',
    ", ",
    '"arguments"',
    "{}",
    " ",
    "\n",
    "x",
]


@given(
    st.data(),
    st.lists(st.sampled_from(TOOL_PIECES), max_size=30).map("".join),
    st.sampled_from([STYLE_HERMES, STYLE_QWEN_XML, STYLE_LLAMA3_JSON]),
)
def test_tool_parser_is_chunking_invariant_on_noise(data: st.DataObject, text: str, style: str) -> None:
    whole = run_parser(lambda: ToolCallParser(style), [text])
    chunked = run_parser(lambda: ToolCallParser(style), data.draw(split(text)))
    assert normalise(chunked) == normalise(whole)
    if not calls(whole) and style != STYLE_LLAMA3_JSON:
        assert texts(whole, CONTENT) == text  # nothing recognised: nothing lost


@given(
    st.text(st.characters(codec="utf-8", exclude_characters="<"), max_size=40),
    st.sampled_from([STYLE_HERMES, STYLE_QWEN_XML]),
)
def test_content_without_a_tag_start_is_never_held(text: str, style: str) -> None:
    parser = ToolCallParser(style)
    assert normalise(parser.feed(text)) == normalise([(CONTENT, text)])


def test_hermes_holds_only_a_possible_tag() -> None:
    parser = ToolCallParser(STYLE_HERMES)
    assert parser.feed("Sure. <tool") == [(CONTENT, "Sure. ")]
    assert parser.feed("s are fun") == [(CONTENT, "<tools are fun")]


def test_hermes_two_calls_and_ids() -> None:
    reply = (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Tokyo"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": "{\\"tz\\": \\"JST\\"}"}\n</tool_call>'
    )
    parser = ToolCallParser()
    events = [event for char in reply for event in parser.feed(char)] + parser.flush()
    found = calls(events)
    assert [(c.name, c.arguments, c.index) for c in found] == [
        ("get_weather", {"city": "Tokyo"}, 0),
        ("get_time", {"tz": "JST"}, 1),
    ]
    for call in found:
        assert re.fullmatch(r"call_[a-z0-9]{8}", call.id)
    assert found[0].id != found[1].id
    assert texts(events, CONTENT) == "\n"


def test_hermes_unterminated_call_at_the_end_is_still_a_call() -> None:
    parser = ToolCallParser()
    events = parser.feed('<tool_call>\n{"name": "f", "arguments": {}}\n') + parser.flush()
    assert [(c.name, c.arguments) for c in calls(events)] == [("f", {})]


def test_hermes_unterminated_garbage_is_content() -> None:
    parser = ToolCallParser()
    events = parser.feed("<tool_call>\n{half") + parser.flush()
    assert normalise(events) == [(CONTENT, "<tool_call>\n{half")]


XML_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "search",
            "parameters": {
                "type": "object",
                "properties": {
                    "query": {"type": "string"},
                    "limit": {"type": "integer"},
                    "tags": {"type": "array"},
                },
            },
        },
    }
]


def test_qwen_xml_call_with_typed_values() -> None:
    reply = (
        "Let me look.\n<tool_call>\n<function=search>\n<parameter=query>\n42\n</parameter>\n"
        "<parameter=limit>\n5\n</parameter>\n"
        '<parameter=tags>\n["a", "b"]\n</parameter>\n</function>\n</tool_call>'
    )
    parser = ToolCallParser(STYLE_QWEN_XML, tools=XML_TOOLS)
    events = [event for char in reply for event in parser.feed(char)] + parser.flush()
    assert normalise(events) == [
        (CONTENT, "Let me look.\n"),
        (TOOL_CALL, ("search", {"query": "42", "limit": 5, "tags": ["a", "b"]}, 0)),
    ]


def test_qwen_xml_without_schema_tries_json_then_string() -> None:
    parser = ToolCallParser(STYLE_QWEN_XML)
    reply = (
        "<tool_call><function=f><parameter=a>\nTokyo\n</parameter>"
        "<parameter=b>\n3.5\n</parameter></function></tool_call>"
    )
    assert normalise(parser.feed(reply) + parser.flush()) == [(TOOL_CALL, ("f", {"a": "Tokyo", "b": 3.5}, 0))]


def test_qwen_xml_multiline_value_and_missing_parameter_close() -> None:
    parser = ToolCallParser(STYLE_QWEN_XML)
    reply = (
        "<tool_call>\n<function=write>\n<parameter=code>\nline1\nline2\n"
        "<parameter=path>\n/tmp/x\n</function>\n</tool_call>"
    )
    assert normalise(parser.feed(reply) + parser.flush()) == [
        (TOOL_CALL, ("write", {"code": "line1\nline2", "path": "/tmp/x"}, 0))
    ]


def test_qwen_xml_bare_function_block() -> None:
    parser = ToolCallParser(STYLE_QWEN_XML)
    events = (
        parser.feed("ok <func")
        + parser.feed("tion=f>\n<parameter=x>\n1\n</parameter>\n</function> done")
        + parser.flush()
    )
    assert normalise(events) == [(CONTENT, "ok "), (TOOL_CALL, ("f", {"x": 1}, 0)), (CONTENT, " done")]


def test_qwen_xml_malformed_is_content() -> None:
    parser = ToolCallParser(STYLE_QWEN_XML)
    reply = "<tool_call>\n<function=>oops</function>\n</tool_call> after"
    assert normalise(parser.feed(reply) + parser.flush()) == [(CONTENT, reply)]


def test_json_inside_tool_call_accepted_in_xml_style_and_vice_versa() -> None:
    xml_style = ToolCallParser(STYLE_QWEN_XML)
    events = xml_style.feed('<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>') + xml_style.flush()
    assert normalise(events) == [(TOOL_CALL, ("f", {"a": 1}, 0))]
    hermes = ToolCallParser(STYLE_HERMES)
    events = (
        hermes.feed("<tool_call><function=g><parameter=b>x</parameter></function></tool_call>")
        + hermes.flush()
    )
    assert normalise(events) == [(TOOL_CALL, ("g", {"b": "x"}, 0))]


@st.composite
def xml_reply(draw: st.DrawFn) -> tuple[str, list[tuple[str, Any]], list[dict[str, Any]]]:
    text, expected, tools = "", [], []
    value_text = st.text(st.characters(codec="utf-8", exclude_characters="<"), max_size=10)
    for _ in range(draw(st.integers(0, 3))):
        if draw(st.booleans()):
            piece = draw(plain)
            text += piece
            expected.append((CONTENT, piece))
            continue
        name = draw(names)
        params = draw(st.dictionaries(names, st.one_of(value_text, st.integers(-99, 99)), max_size=3))
        properties = {k: {"type": "string" if isinstance(v, str) else "integer"} for k, v in params.items()}
        tools.append(
            {"type": "function", "function": {"name": name, "parameters": {"properties": properties}}}
        )
        body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params.items())
        text += f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"
        expected.append((TOOL_CALL, (name, params)))
    # names may repeat with other parameter types: keep the test's schema unambiguous
    assume(len({t["function"]["name"] for t in tools}) == len(tools))
    return text, expected, tools


@given(st.data(), xml_reply())
def test_qwen_xml_calls_in_any_split(
    data: st.DataObject, reply: tuple[str, list[Any], list[dict[str, Any]]]
) -> None:
    text, expected, tools = reply
    events = run_parser(lambda: ToolCallParser(STYLE_QWEN_XML, tools=tools), data.draw(split(text)))
    assert normalise(events) == with_indexes(expected)


def test_llama3_json_reply_is_a_call() -> None:
    parser = ToolCallParser(STYLE_LLAMA3_JSON)
    reply = '{"name": "get_weather", "parameters": {"city": "San Francisco, CA", "note": "a } brace"}}'
    events = [event for char in reply for event in parser.feed(char)] + parser.flush()
    assert normalise(events) == [
        (TOOL_CALL, ("get_weather", {"city": "San Francisco, CA", "note": "a } brace"}, 0))
    ]


def test_llama3_python_tag_and_several_calls() -> None:
    parser = ToolCallParser(STYLE_LLAMA3_JSON)
    events = (
        parser.feed(
            '<|python_tag|>{"name": "a", "arguments": {}}; '
            '{"type": "function", "name": "b", "parameters": {"x": [1]}}\n'
        )
        + parser.flush()
    )
    assert normalise(events) == [(TOOL_CALL, ("a", {}, 0)), (TOOL_CALL, ("b", {"x": [1]}, 1))]


def test_llama3_plain_answer_streams_immediately() -> None:
    parser = ToolCallParser(STYLE_LLAMA3_JSON)
    assert parser.feed("  ") == []
    assert parser.feed("The weather") == [(CONTENT, "  The weather")]
    assert parser.feed(" {is} fine") == [(CONTENT, " {is} fine")]


def test_llama3_json_that_is_not_a_call_is_content() -> None:
    parser = ToolCallParser(STYLE_LLAMA3_JSON)
    assert parser.feed('{"answer"') == [(CONTENT, '{"answer"')]  # decided at the first key
    assert parser.feed(": 42}") == [(CONTENT, ": 42}")]
    other = ToolCallParser(STYLE_LLAMA3_JSON)
    reply = '{"name": "f", "value": 1} and more'
    assert normalise(other.feed(reply) + other.flush()) == [(CONTENT, reply)]
    broken = ToolCallParser(STYLE_LLAMA3_JSON)
    assert normalise(broken.feed('{"name": "f", "parameters": {') + broken.flush()) == [
        (CONTENT, '{"name": "f", "parameters": {')
    ]


def test_llama3_text_after_a_call_is_content() -> None:
    parser = ToolCallParser(STYLE_LLAMA3_JSON)
    events = parser.feed('{"name": "f", "parameters": {}} I called it') + parser.flush()
    assert normalise(events) == [(TOOL_CALL, ("f", {}, 0)), (CONTENT, " I called it")]


@given(
    st.data(),
    st.lists(st.tuples(names, arguments), min_size=1, max_size=3),
    st.sampled_from(["", "; ", "\n"]),
)
def test_llama3_calls_in_any_split(
    data: st.DataObject, specs: list[tuple[str, dict[str, Any]]], sep: str
) -> None:
    text = (sep or " ").join(json.dumps({"name": n, "parameters": a}) for n, a in specs) + sep
    events = run_parser(lambda: ToolCallParser(STYLE_LLAMA3_JSON), data.draw(split(text)))
    assert normalise(events) == [(TOOL_CALL, (n, a, i)) for i, (n, a) in enumerate(specs)]


def test_detect_tool_style() -> None:
    assert detect_tool_style(None) == STYLE_HERMES
    assert detect_tool_style("{{ '<tool_call>' }}{{ tools | tojson }}") == STYLE_HERMES
    assert detect_tool_style("<tool_call>\n<function={{ name }}>\n<parameter=") == STYLE_QWEN_XML
    assert detect_tool_style("<|start_header_id|>{% if tools %}{% endif %}") == STYLE_LLAMA3_JSON
    assert detect_tool_style("{{- '<|python_tag|>' }}") == STYLE_LLAMA3_JSON
    with pytest.raises(ValueError):
        ToolCallParser("mistral")


def test_call_ids_have_ollamas_shape() -> None:
    ids = {new_call_id() for _ in range(50)}
    assert len(ids) == 50
    for call_id in ids:
        assert re.fullmatch(r"call_[a-z0-9]{8}", call_id)


# -- the pipeline ----------------------------------------------------------------------------------

QWEN3_LIKE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if tools %}<tools>{{ tools | tojson }}</tools> reply with <tool_call>{}</tool_call>{% endif %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
R1_LIKE = "{% for m in messages %}{{ m.content }}{% endfor %}<｜Assistant｜><think>\n"


def run_pipeline(pipeline: OutputPipeline, chunks: list[str]) -> list[Event]:
    events: list[Event] = []
    for chunk in chunks:
        events.extend(pipeline.feed(chunk))
        if pipeline.stopped:
            break
    events.extend(pipeline.flush())
    return events


def test_pipeline_qwen3_thinking_then_tool_call_byte_by_byte() -> None:
    template = ChatTemplate(QWEN3_LIKE)
    tools = [{"type": "function", "function": {"name": "get_weather"}}]
    prompt = template.render([{"role": "user", "content": "Weather?"}], tools=tools)
    pipeline = OutputPipeline.for_request(template, prompt, think=None, tools=tools)
    reply = (
        "<think>\nNeed the tool.\n</think>\n\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Tokyo"}}\n</tool_call>'
    )
    events = run_pipeline(pipeline, list(reply))
    assert normalise(events) == [
        (THINKING, "Need the tool.\n"),
        (TOOL_CALL, ("get_weather", {"city": "Tokyo"}, 0)),
    ]


def test_pipeline_prompt_opened_thinking() -> None:
    template = ChatTemplate(R1_LIKE)
    prompt = template.render([{"role": "user", "content": "Hi"}])
    assert prompt_opens_thinking(prompt)
    events = run_pipeline(OutputPipeline.for_request(template, prompt), [" x </th", "ink> y"])
    assert normalise(events) == [(THINKING, "x "), (CONTENT, "y")]
    # think:false cannot stop a template that always opens thinking: the thinking is dropped
    dropped = run_pipeline(OutputPipeline.for_request(template, prompt, think=False), [" x </think> y"])
    assert normalise(dropped) == [(CONTENT, "y")]


def test_pipeline_think_false_leaves_output_as_is() -> None:
    template = ChatTemplate(QWEN3_LIKE)
    prompt = template.render([{"role": "user", "content": "Hi"}], think=False)
    assert not prompt_opens_thinking(prompt)
    events = run_pipeline(OutputPipeline.for_request(template, prompt, think=False), ["<think>a</think>b"])
    assert normalise(events) == [(CONTENT, "<think>a</think>b")]


def test_pipeline_without_tools_does_not_parse_calls() -> None:
    template = ChatTemplate(QWEN3_LIKE)
    reply = '<tool_call>{"name": "f", "arguments": {}}</tool_call>'
    for tools in (None, []):
        events = run_pipeline(OutputPipeline.for_request(template, "p", tools=tools), [reply])
        assert normalise(events) == [(CONTENT, reply)]
    no_tool_template = ChatTemplate("{{ messages }}")
    events = run_pipeline(
        OutputPipeline.for_request(no_tool_template, "p", tools=[{"type": "function"}]), [reply]
    )
    assert normalise(events) == [(CONTENT, reply)]


def test_pipeline_stop_applies_to_raw_text_and_ends_everything() -> None:
    template = ChatTemplate(QWEN3_LIKE)
    pipeline = OutputPipeline.for_request(template, "p", stops=["STOP"])
    first = pipeline.feed("<think>plan ST")
    assert not pipeline.stopped
    second = pipeline.feed("OP never")
    assert pipeline.stopped
    assert normalise(first + second) == [(THINKING, "plan ")]
    assert pipeline.feed("more") == [] and pipeline.flush() == []


def test_pipeline_stop_inside_a_tool_call_releases_the_partial_call_as_content() -> None:
    template = ChatTemplate(QWEN3_LIKE)
    pipeline = OutputPipeline.for_request(
        template, "p", stops=["}}"], tools=[{"type": "function"}], think=False
    )
    events = run_pipeline(pipeline, ['Hi <tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>'])
    assert pipeline.stopped
    assert normalise(events) == [(CONTENT, 'Hi <tool_call>{"name": "f", "arguments": {"a": 1')]


PIPE_PIECES = THINK_PIECES + [
    "<tool_call>",
    "</tool_call>",
    '{"name": "f", "arguments": {}}',
    "END",
    "EN",
    "D",
]


@given(
    st.data(), st.lists(st.sampled_from(PIPE_PIECES), max_size=25).map("".join), st.booleans(), st.booleans()
)
def test_pipeline_is_chunking_invariant(
    data: st.DataObject, text: str, opened: bool, with_stop: bool
) -> None:
    def make() -> OutputPipeline:
        return OutputPipeline(
            stops=["END"] if with_stop else None,
            split_thinking=True,
            start_in_thinking=opened,
            tool_style=STYLE_HERMES,
        )

    whole = run_pipeline(make(), [text])
    chunked = run_pipeline(make(), data.draw(split(text)))
    assert normalise(chunked) == normalise(whole)
    raw = text[: text.find("END")] if with_stop and "END" in text else text
    if "<tool_call>" not in raw:
        assert normalise(whole) == reference_thinking(raw, opened)
