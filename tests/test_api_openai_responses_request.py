"""`/v1/responses` bodies -> chat messages, tools and options (api/openai_responses_request.py), in process.

The live behaviour is in test_api_openai_responses.py; here the conversions themselves, and a property:
whatever JSON arrives, parsing either succeeds or raises BadRequest (never another exception)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rkllama_ollama.api.openai_responses_request import parse_request
from rkllama_ollama.api.wire import BadRequest


def test_a_string_input_with_instructions_is_system_then_user() -> None:
    parsed = parse_request({"model": "m", "input": "Hi", "instructions": "Be brief."})
    assert parsed.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert parsed.options == {"temperature": 1.0} and parsed.think is None and not parsed.stream


def test_items_become_a_conversation() -> None:
    """Developer -> system; reasoning -> the next assistant turn's thinking; function calls join the
    assistant turn before them; an output names its call's function."""
    body = {
        "model": "m",
        "input": [
            {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "Rules"}]},
            {"role": "user", "content": "Weather?"},
            {"type": "reasoning", "summary": [{"type": "summary_text", "text": "Use the tool."}]},
            {"role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
            {
                "type": "function_call",
                "call_id": "call_1",
                "name": "get_weather",
                "arguments": '{"city":"Oslo"}',
            },
            {"type": "function_call", "call_id": "call_2", "name": "get_time", "arguments": ""},
            {"type": "function_call_output", "call_id": "call_1", "output": "Rain"},
            {
                "type": "function_call_output",
                "call_id": "call_2",
                "output": [{"type": "input_text", "text": "9"}],
            },
        ],
    }
    assert parse_request(body).messages == [
        {"role": "system", "content": "Rules"},
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "thinking": "Use the tool.",
            "tool_calls": [
                {
                    "id": "call_1",
                    "function": {"name": "get_weather", "arguments": {"city": "Oslo"}, "index": 0},
                },
                {"id": "call_2", "function": {"name": "get_time", "arguments": {}, "index": 1}},
            ],
        },
        {"role": "tool", "content": "Rain", "tool_call_id": "call_1", "tool_name": "get_weather"},
        {"role": "tool", "content": "9", "tool_call_id": "call_2", "tool_name": "get_time"},
    ]


def test_tools_options_reasoning_and_format() -> None:
    parsed = parse_request(
        {
            "model": "m",
            "input": "x",
            "tools": [
                {"type": "function", "name": "f", "description": "d", "parameters": {"type": "object"}}
            ],
            "max_output_tokens": 32,
            "temperature": 0.2,
            "top_p": 0.5,
            "reasoning": {"effort": "minimal"},
            "text": {"format": {"type": "json_schema", "name": "s", "schema": {"type": "object"}}},
            "stream": True,
        }
    )
    assert parsed.tools == [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}, "description": "d"}}
    ]
    assert parsed.options == {"num_predict": 32, "temperature": 0.2, "top_p": 0.5}
    assert parsed.think == "low" and parsed.format == {"type": "object"} and parsed.stream
    assert parsed.echo["max_output_tokens"] == 32 and parsed.echo["reasoning"] == {
        "effort": "minimal",
        "summary": None,
    }
    assert (
        parse_request({"model": "m", "input": "x", "text": {"format": {"type": "json_object"}}}).format
        == "json"
    )
    assert parse_request({"model": "m", "input": "x", "reasoning": {"effort": "none"}}).think is False
    assert parse_request({"model": "m", "input": "x", "tools": [{"type": "function", "name": "f"}],
                          "tool_choice": "none"}).tools is None  # fmt: skip


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"model": "m", "input": 3}, '"input" must be a string or an array of input items, not float64'),
        ({"model": "m", "input": [1]}, "input[0] must be an object"),
        ({"model": "m", "input": [{"content": "x"}]}, "input[0] needs a 'type' (or a 'role' for a message)"),
        (
            {"model": "m", "input": [{"role": "tool", "content": "x"}]},
            'input[0].role must be one of "user", "system", "developer", "assistant"',
        ),  # fmt: skip
        (
            {"model": "m", "input": [{"type": "function_call", "name": "f"}]},
            "input[0].call_id must be a non-empty string",
        ),
        (
            {
                "model": "m",
                "input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "[1]"}],
            },
            "input[0].arguments must be a JSON object",
        ),  # fmt: skip
        (
            {"model": "m", "input": [{"type": "function_call_output"}]},
            "input[0].call_id must be a non-empty string",
        ),
        (
            {
                "model": "m",
                "input": [
                    {"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}
                ],
            },
            "image URLs are not currently supported, please use base64 encoded data instead",
        ),  # fmt: skip
        ({"model": "m", "input": "x", "instructions": 5}, '"instructions" must be a string'),
        ({"model": "m", "input": "x", "temperature": "hot"}, '"temperature" must be a number'),
        (
            {"model": "m", "input": "x", "tools": [{"type": "function"}]},
            "tools[0].name must be a non-empty string",
        ),
        (
            {"model": "m", "input": "x", "text": {"format": {"type": "yaml"}}},
            'invalid "text.format" type: "yaml"',
        ),
        (
            {"model": "m", "input": "x", "background": True},
            '"background" is not supported: responses are not stored',
        ),
        (
            {"model": "m", "instructions": "only rules"},
            '"input" is required: a string or a non-empty array of input items',
        ),
    ],
)
def test_bad_bodies_name_the_field(body: dict[str, Any], message: str) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_request(body)
    assert caught.value.status == 400 and caught.value.message == message


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=10,
)
item_types = st.sampled_from(["message", "function_call", "function_call_output", "reasoning", "x"])
items = st.dictionaries(
    st.sampled_from(["type", "role", "content", "call_id", "name", "arguments", "output", "summary"]),
    item_types | st.sampled_from(["user", "assistant", "{}", '{"a": 1}']) | json_values,
    max_size=6,
)
bodies = st.fixed_dictionaries(
    {"model": st.just("m")},
    optional={
        "input": st.text(max_size=5) | st.lists(items, max_size=4) | json_values,
        "instructions": st.text(max_size=5) | json_values,
        "tools": st.lists(st.dictionaries(st.sampled_from(["type", "name", "parameters"]), json_values)),
        "max_output_tokens": st.integers(-5, 50) | json_values,
        "temperature": json_values,
        "reasoning": st.fixed_dictionaries({"effort": st.sampled_from(["low", "none", "bad"])}) | json_values,
        "text": json_values,
    },
)


@settings(max_examples=400, deadline=None)
@given(bodies)
def test_any_body_parses_or_is_a_bad_request(body: dict[str, Any]) -> None:
    try:
        parsed = parse_request(body)
    except BadRequest as exc:
        assert exc.status == 400 and exc.message
        return
    assert any(m["role"] != "system" for m in parsed.messages)
    assert all(isinstance(m["content"], str) for m in parsed.messages)


def test_a_text_field_that_is_not_an_object_is_a_bad_request() -> None:
    """Found by the property below: `text` is checked before the response echoes it."""
    with pytest.raises(BadRequest) as caught:
        parse_request({"model": "m", "input": "0", "text": 1})
    assert caught.value.message == '"text" must be an object'
