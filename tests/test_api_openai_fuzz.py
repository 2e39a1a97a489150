"""Hypothesis-generated `/v1` bodies against a live daemon: whatever arrives, the answer is never a 5xx
and every error uses OpenAI's envelope. Generation is kept short (max_tokens is small or invalid)."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.support.daemon import Daemon

UTF8 = st.characters(codec="utf-8")  # JSON cannot carry lone surrogates
texts = st.text(UTF8, max_size=8)
json_scalars = st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | texts
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(UTF8, max_size=6), inner, max_size=3),
    max_leaves=8,
)


def mostly(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Valid values nine times in ten, any JSON value otherwise (so many bodies reach the generator)."""
    return st.integers(0, 9).flatmap(lambda n: json_values if n == 0 else valid)


models = mostly(st.sampled_from(["tiny", "tiny", "tiny:latest", "missing", "../etc", ""]))
roles = mostly(st.sampled_from(["user", "system", "assistant", "tool", "developer", "bogus"]))
parts = st.lists(
    mostly(
        st.fixed_dictionaries({"type": st.just("text"), "text": st.text(UTF8, max_size=10)})
        | st.fixed_dictionaries({"type": st.sampled_from(["image_url", "input_audio", "x"])})
    ),
    max_size=3,
)
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
tool_calls = st.lists(
    st.fixed_dictionaries(
        {
            "id": texts,
            "type": st.just("function"),
            "function": st.fixed_dictionaries(
                {"name": texts, "arguments": st.sampled_from(["{}", '{"a": 1}', "[1]", "nope"])}
            ),
        }
    ),
    max_size=2,
)
contents = mostly(st.text(UTF8, max_size=20) | parts)
messages = mostly(
    st.lists(
        mostly(
            st.fixed_dictionaries(
                {"role": roles, "content": contents},
                optional={
                    "tool_calls": mostly(tool_calls),
                    "tool_call_id": mostly(texts),
                    "name": mostly(texts),
                },
            )
        ),
        min_size=1,
        max_size=3,
    )
)
# Never absent or negative: an unlimited generation would make the test slow, not more thorough.
small_tokens = st.integers(0, 9).flatmap(
    lambda n: st.sampled_from(["x", True, [1]]) if n == 0 else st.integers(1, 3)
)
common = {
    "stream": mostly(st.booleans()),
    "stream_options": mostly(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "temperature": mostly(st.floats(0, 2)),
    "top_p": mostly(st.floats(0, 1)),
    "seed": mostly(st.integers(-5, 2**33)),
    "stop": mostly(st.text(UTF8, max_size=3) | st.lists(st.text(UTF8, max_size=3), max_size=2)),
    "frequency_penalty": mostly(st.floats(-2, 2)),
    "presence_penalty": mostly(st.floats(-2, 2)),
}
chat_bodies = st.fixed_dictionaries(
    {"model": models, "messages": messages, "max_tokens": small_tokens},
    optional={
        **common,
        "tools": mostly(st.lists(st.just(TOOL), max_size=2)),
        "reasoning_effort": mostly(st.sampled_from(["none", "low", "high", "weird"])),
        "response_format": mostly(
            st.sampled_from(
                [
                    {"type": "json_object"},
                    {"type": "text"},
                    {"type": "json_schema", "json_schema": {"schema": {}}},
                ]
            )
        ),
    },
)
completion_bodies = st.fixed_dictionaries(
    {"model": models, "prompt": mostly(st.text(UTF8, max_size=20)), "max_tokens": small_tokens},
    optional={**common, "suffix": json_values},
)
embedding_bodies = st.fixed_dictionaries(
    {"model": models},
    optional={
        "input": mostly(st.text(UTF8, max_size=20) | st.lists(st.text(UTF8, max_size=10), max_size=3)),
        "dimensions": mostly(st.integers(-2, 80)),
        "encoding_format": mostly(st.sampled_from(["float", "base64", "int8"])),
    },
)


def post(served: Daemon, path: str, body: Any) -> tuple[int, bytes]:
    reply = served.request("POST", path, body)
    return reply.status, reply.body


def assert_served(served: Daemon, path: str, body: Any) -> None:
    status, payload = post(served, path, body)
    # --hypothesis-show-statistics shows how many bodies were served and how many refused.
    event(f"status {status}")
    assert status < 500, (status, payload)
    if status >= 400:
        error = json.loads(payload)["error"]
        assert isinstance(error["message"], str) and error["message"]
        assert error["type"] in ("invalid_request_error", "not_found_error")


FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(body=mostly(chat_bodies))
def test_chat_completions_never_5xx(served: Daemon, body: Any) -> None:
    assert_served(served, "/v1/chat/completions", body)


@FUZZ
@given(body=mostly(completion_bodies))
def test_completions_never_5xx(served: Daemon, body: Any) -> None:
    assert_served(served, "/v1/completions", body)


@FUZZ
@given(body=mostly(embedding_bodies))
def test_embeddings_never_5xx(served: Daemon, body: Any) -> None:
    assert_served(served, "/v1/embeddings", body)
