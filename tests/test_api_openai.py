"""OpenAI `/v1` conformance against a live daemon, driven by the real `openai` client and raw HTTP.

The model is the tiny random GGUF: shapes, counts and error texts are asserted, never words.
Raw SSE is read with urllib where the client would hide a detail (role only in the first delta,
the empty finish delta, `data: [DONE]`).
"""

from __future__ import annotations

import base64
import json
import math
import struct
import urllib.error
import urllib.request
from typing import Any

import openai
import pytest

from rkllama_ollama.api.openai import _tool_call
from rkllama_ollama.chat.parse import ToolCall
from rkllama_ollama.generation_events import ToolCallEvent
from tests.support.daemon import Daemon, Reply

MODEL = "tiny"
# Every generation is seeded: unseeded, the random model may sample EOS early and end with "stop".
HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def client(daemon: Daemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=daemon.url + "/v1", api_key="x", max_retries=0)


def post(daemon: Daemon, path: str, body: Any = None, raw: bytes | None = None) -> Reply:
    return daemon.request("POST", path, body, raw, headers={"Content-Type": "application/json"})


def get(daemon: Daemon, path: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(daemon.url + path, timeout=60) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read()


def sse_events(payload: bytes) -> list[Any]:
    """The `data:` payloads of an SSE body, with `[DONE]` kept as the string."""
    text = payload.decode()
    assert text.endswith("data: [DONE]\n\n")
    events = []
    for block in text.split("\n\n"):
        if not block:
            continue
        assert block.startswith("data: "), block
        data = block[len("data: ") :]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def assert_openai_error(status: int, payload: bytes, expected_status: int, message: str) -> None:
    """The OpenAI envelope, with the type derived from the status and the exact message."""
    assert status == expected_status
    error = json.loads(payload)["error"]
    assert error["message"] == message
    assert error["param"] is None and error["code"] is None
    expected_type = {400: "invalid_request_error", 404: "not_found_error"}.get(expected_status, "api_error")
    assert error["type"] == expected_type


# -- models ----------------------------------------------------------------------------------------


def test_models_list_matches_tags_in_order_and_shape(client: openai.OpenAI, daemon: Daemon) -> None:
    """/v1/models has /api/tags' ids and order, unix `created` = modified_at, owned_by the namespace."""
    status, ctype, body = get(daemon, "/v1/models")
    assert status == 200 and ctype == "application/json"
    listing = json.loads(body)
    assert listing["object"] == "list"
    tags = json.loads(get(daemon, "/api/tags")[2])["models"]
    assert [m["id"] for m in listing["data"]] == [t["model"] for t in tags]
    models = client.models.list().data
    tiny = next(m for m in models if m.id == "tiny:latest")
    assert tiny.object == "model" and tiny.owned_by == "library"
    assert isinstance(tiny.created, int) and tiny.created > 0


def test_model_retrieve_echoes_the_id_and_unknown_is_404(client: openai.OpenAI, daemon: Daemon) -> None:
    model = client.models.retrieve(MODEL)
    assert (model.id, model.object, model.owned_by) == (MODEL, "model", "library")
    assert client.models.retrieve("tiny:latest").created == model.created
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    status, _, body = get(daemon, "/v1/models/no-such-model")
    assert_openai_error(status, body, 404, "model 'no-such-model' not found")


# -- chat ------------------------------------------------------------------------------------------


def test_chat_not_streamed_maps_max_tokens_and_reports_usage(client: openai.OpenAI) -> None:
    """max_tokens -> num_predict: exactly that many tokens, finish_reason length, usage adds up."""
    reply = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5, seed=7)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert reply.model == MODEL and reply.system_fingerprint == "fp_ollama"
    choice = reply.choices[0]
    assert choice.finish_reason == "length" and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.message.tool_calls is None
    assert reply.usage is not None and reply.usage.completion_tokens == 5
    assert reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 5


def test_max_completion_tokens_is_honoured_too(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=HELLO, max_completion_tokens=3, seed=1)
    assert reply.usage is not None and reply.usage.completion_tokens == 3


def test_seed_makes_sampling_repeatable_at_default_temperature(client: openai.OpenAI) -> None:
    """Same seed -> same text at OpenAI's default temperature 1.0 (so the seed reached the sampler)."""
    texts = {
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, seed=42)
        .choices[0]
        .message.content
        for _ in range(2)
    }
    assert len(texts) == 1


def test_stop_ends_the_answer_before_the_stop_text(client: openai.OpenAI) -> None:
    full = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=20, seed=3, temperature=0)
    text = full.choices[0].message.content or ""
    assert len(text) > 4
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    stopped = client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=20, seed=3, temperature=0, stop=[stop]
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == text[: text.index(stop)]


def test_chat_stream_sse_shape(daemon: Daemon) -> None:
    """Role only in the first delta, shared id/created, finish chunk with {} delta, usage chunk, [DONE]."""
    body = {
        "model": MODEL,
        "messages": HELLO,
        "max_tokens": 6,
        "seed": 1,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    status, ctype, payload = post(daemon, "/v1/chat/completions", body)
    assert status == 200 and ctype.startswith("text/event-stream")
    events = sse_events(payload)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    *deltas, finish, usage = chunks
    assert deltas, "at least one content chunk"
    assert deltas[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("role" not in c["choices"][0]["delta"] for c in deltas[1:])
    assert all(c["choices"][0]["delta"].get("content") for c in deltas), "no empty content chunk"
    assert all(c["choices"][0]["finish_reason"] is None for c in deltas)
    assert finish["choices"] == [{"index": 0, "delta": {}, "finish_reason": "length"}]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 6
    assert len({c["id"] for c in chunks}) == 1 and len({c["created"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


def test_chat_stream_without_usage_has_no_usage_chunk(daemon: Daemon) -> None:
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 3, "seed": 1, "stream": True}
    events = sse_events(post(daemon, "/v1/chat/completions", body)[2])
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert all(e == "[DONE]" or e["choices"] for e in events)


def test_openai_client_streams_a_chat_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        max_tokens=4,
        seed=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_streamed_and_whole_answers_agree(client: openai.OpenAI) -> None:
    args: dict[str, Any] = {"model": MODEL, "messages": HELLO, "max_tokens": 8, "seed": 5, "temperature": 0}
    whole = client.chat.completions.create(**args).choices[0].message.content
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(stream=True, **args)
        if c.choices
    )
    assert streamed == whole


def test_content_parts_tools_and_tool_history_are_accepted(client: openai.OpenAI) -> None:
    """Array content, ~tools on a template without tool support (answered, not refused), and an
    assistant tool call (arguments as a JSON string) followed by its tool result."""
    tools = [
        {
            "type": "function",
            "function": {
                "name": f"tool_{i}",
                "description": "d",
                "parameters": {"type": "object", "properties": {"x": {"type": "string"}}},
            },
        }
        for i in range(35)
    ]
    messages: list[Any] = [
        {"role": "system", "content": [{"type": "text", "text": "be brief"}]},
        {"role": "user", "content": [{"type": "text", "text": "weather?"}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "tool_1", "arguments": '{"x": "Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    reply = client.chat.completions.create(model=MODEL, messages=messages, tools=tools, max_tokens=3, seed=1)
    assert reply.choices[0].finish_reason == "length"


def test_tool_calls_leave_as_openai_json_string_arguments() -> None:
    """Ollama's object arguments become OpenAI's JSON string, with id, index and type."""
    event = ToolCallEvent(
        ToolCall(name="get_weather", arguments={"city": "Oslo", "n": 2}, index=1, id="call_a")
    )
    call = _tool_call(event)
    assert call == {
        "id": "call_a",
        "index": 1,
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city":"Oslo","n":2}'},
    }
    assert json.loads(call["function"]["arguments"]) == {"city": "Oslo", "n": 2}


# -- completions -----------------------------------------------------------------------------------


def test_completions_not_streamed(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=MODEL, prompt="once upon", max_tokens=4, seed=1)
    assert reply.object == "text_completion" and reply.id.startswith("cmpl-")
    assert reply.choices[0].finish_reason == "length" and reply.choices[0].text
    assert reply.usage is not None and reply.usage.completion_tokens == 4


def test_completions_stream_with_usage(daemon: Daemon) -> None:
    """Every chunk carries a zeroed usage, a final `choices: []` chunk the real one, then [DONE]."""
    body = {
        "model": MODEL,
        "prompt": "once upon",
        "max_tokens": 4,
        "seed": 1,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    events = sse_events(post(daemon, "/v1/completions", body)[2])
    chunks = events[:-1]
    *texts, finish, usage = chunks
    assert all(c["usage"]["total_tokens"] == 0 for c in texts + [finish])
    assert all(c["choices"][0]["finish_reason"] is None and c["choices"][0]["text"] for c in texts)
    assert finish["choices"][0]["finish_reason"] == "length"
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 4
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "text_completion" for c in chunks)


def test_openai_client_streams_completions(client: openai.OpenAI) -> None:
    chunks = list(client.completions.create(model=MODEL, prompt="hi", max_tokens=3, seed=1, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "length"


# -- embeddings ------------------------------------------------------------------------------------


def test_embeddings_single_batch_dimensions_and_base64(client: openai.OpenAI, daemon: Daemon) -> None:
    single = client.embeddings.create(model=MODEL, input="hello world", encoding_format="float")
    assert len(single.data) == 1 and single.data[0].index == 0
    vector = single.data[0].embedding
    assert math.isclose(math.fsum(v * v for v in vector), 1.0, rel_tol=1e-4)
    assert single.usage.prompt_tokens > 0
    batch = client.embeddings.create(model=MODEL, input=["a", "b c"], dimensions=8, encoding_format="float")
    assert [d.index for d in batch.data] == [0, 1]
    assert all(len(d.embedding) == 8 for d in batch.data)
    status, _, body = post(
        daemon, "/v1/embeddings", {"model": MODEL, "input": "hello world", "encoding_format": "base64"}
    )
    assert status == 200
    packed = base64.b64decode(json.loads(body)["data"][0]["embedding"])
    decoded = struct.unpack(f"<{len(packed) // 4}f", packed)
    assert all(math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6) for a, b in zip(decoded, vector, strict=True))


# -- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "[] is too short - 'messages'"),
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": 1.5}]},
            400,
            "invalid message content type: float64",
        ),
        (
            "/v1/chat/completions",
            {"model": "no-such-model", "messages": HELLO},
            404,
            "model 'no-such-model' not found",
        ),
        (
            "/v1/chat/completions",
            {
                "model": MODEL,
                "messages": [
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": {"a": 1}}}],
                    }
                ],
            },
            400,
            "invalid tool call arguments",
        ),
        (
            "/v1/chat/completions",
            {
                "model": MODEL,
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}],
                    }
                ],
            },
            400,
            "image URLs are not currently supported, please use base64 encoded data instead",
        ),
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": HELLO, "reasoning_effort": "extreme"},
            400,
            'invalid reasoning value: "extreme" (must be one of none, minimal, low, medium, high, max)',
        ),
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": HELLO, "reasoning_effort": "high"},
            400,
            '"tiny" does not support thinking',
        ),
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": HELLO, "temperature": "hot"},
            400,
            "invalid type for 'temperature' field: string",
        ),
        (
            "/v1/completions",
            {"model": MODEL, "prompt": "x", "stop": [1, 2]},
            400,
            "invalid type for 'stop' field: float64",
        ),
        ("/v1/embeddings", {"model": MODEL}, 400, "invalid input"),
        ("/v1/embeddings", {"model": MODEL, "input": []}, 400, "invalid input"),
        (
            "/v1/embeddings",
            {"model": MODEL, "input": "x", "encoding_format": "int8"},
            400,
            'invalid encoding_format "int8": use "float" or "base64"',
        ),
        ("/v1/chat/completions", {"messages": HELLO}, 400, "model is required"),
    ],
)
def test_bad_requests_get_the_openai_envelope(
    daemon: Daemon, path: str, body: dict[str, Any], status: int, message: str
) -> None:
    got_status, ctype, payload = post(daemon, path, body)
    assert ctype.startswith("application/json")
    assert_openai_error(got_status, payload, status, message)


def test_malformed_json_is_a_400_envelope(daemon: Daemon) -> None:
    status, _, payload = post(daemon, "/v1/chat/completions", raw=b'{"model": ')
    assert status == 400
    assert json.loads(payload)["error"]["type"] == "invalid_request_error"


def test_the_client_raises_typed_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="too short"):
        client.chat.completions.create(model=MODEL, messages=[])
    with pytest.raises(openai.NotFoundError, match="not found"):
        client.chat.completions.create(model="missing", messages=HELLO)  # type: ignore[arg-type]
