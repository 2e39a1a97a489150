"""Tool calls and thinking through a live daemon, with the real ollama and openai clients.

The model is the RKLLM simulator (family F) whose `reply` is a tool call or a `<think>` block: it streams
one byte per token, the hardest case for the streaming parsers. Each test says what it proves.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import ollama
import openai
import pytest

from tests.rkllm_support.sim import add_sim_model, build_simulators
from tests.support.daemon import Daemon

# A Qwen-style template: renders tools, and knows thinking (so the store reports both capabilities).
TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools:\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}"
    "<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
TOOL_REPLY = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Tokyo", "days": 2}}\n</tool_call>'
THINK_REPLY = "<think>The user greets me; be brief.</think>Hello there!"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather forecast for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}


def add_model(store: Path, name: str, reply: str) -> None:
    folder = store / name
    add_sim_model(store, name, reply=reply, tokenizer=True)
    tokenizer = folder / "tokenizer"
    config = json.loads((tokenizer / "tokenizer_config.json").read_text())
    config["chat_template"] = TEMPLATE
    (tokenizer / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def sim_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    store = tmp_path_factory.mktemp("tools") / "models"
    add_model(store, "caller", TOOL_REPLY)
    add_model(store, "thinker", THINK_REPLY)
    with Daemon(store, env={"RKLLAMA_RKLLM_LIB": str(build_simulators()["F"])}).start() as server:
        yield server


def test_capabilities_come_from_the_template(sim_daemon: Daemon) -> None:
    """The store derives `tools` and `thinking` from the model's chat template."""
    capabilities = ollama.Client(host=sim_daemon.url).show("caller").capabilities or []
    assert {"completion", "tools", "thinking"} <= set(capabilities)


@pytest.mark.parametrize("stream", [True, False])
def test_ollama_tool_call_arrives_as_an_object(sim_daemon: Daemon, stream: bool) -> None:
    """Streamed byte by byte or not, the call comes out whole: arguments an object, no raw tags leak."""
    client = ollama.Client(host=sim_daemon.url)
    messages = [{"role": "user", "content": "Weather in Tokyo?"}]
    if stream:
        chunks = list(
            client.chat("caller", messages=messages, tools=[WEATHER_TOOL], stream=True, think=False)
        )
        calls = [call for chunk in chunks for call in (chunk.message.tool_calls or [])]
        content = "".join(chunk.message.content for chunk in chunks)
    else:
        reply = client.chat("caller", messages=messages, tools=[WEATHER_TOOL], think=False)
        calls, content = list(reply.message.tool_calls or []), reply.message.content
    assert len(calls) == 1
    assert calls[0].function.name == "get_weather"
    assert calls[0].function.arguments == {"city": "Tokyo", "days": 2}
    assert "<tool_call>" not in content and "get_weather" not in content


def test_ollama_tool_call_has_id_and_index_on_the_wire(sim_daemon: Daemon) -> None:
    """Ollama's wire shape: `id` is call_ + 8 characters, `function.index` is always present."""

    body = {
        "model": "caller",
        "messages": [{"role": "user", "content": "x"}],
        "tools": [WEATHER_TOOL],
        "stream": False,
    }
    call = sim_daemon.request("POST", "/api/chat", body).json()["message"]["tool_calls"][0]
    assert call["id"].startswith("call_") and len(call["id"]) == 13
    assert call["function"]["index"] == 0


@pytest.mark.parametrize("stream", [True, False])
def test_openai_tool_call_arguments_are_a_json_string(sim_daemon: Daemon, stream: bool) -> None:
    """OpenAI's shape: arguments as a JSON string, finish_reason tool_calls."""
    client = openai.OpenAI(base_url=sim_daemon.url + "/v1", api_key="unused")
    messages = [{"role": "user", "content": "Weather in Tokyo?"}]
    if stream:
        names, arguments, finish = [], [], None
        for chunk in client.chat.completions.create(
            model="caller", messages=messages, tools=[WEATHER_TOOL], stream=True
        ):
            if not chunk.choices:
                continue
            for call in chunk.choices[0].delta.tool_calls or []:
                names.append(call.function.name)
                arguments.append(call.function.arguments)
            finish = chunk.choices[0].finish_reason or finish
        assert names == ["get_weather"] and finish == "tool_calls"
        assert json.loads(arguments[0]) == {"city": "Tokyo", "days": 2}
    else:
        reply = client.chat.completions.create(model="caller", messages=messages, tools=[WEATHER_TOOL])
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert json.loads(choice.message.tool_calls[0].function.arguments) == {"city": "Tokyo", "days": 2}


def test_a_tool_result_round_trips(sim_daemon: Daemon) -> None:
    """The assistant's call and the tool's answer render back into the prompt without errors."""
    client = ollama.Client(host=sim_daemon.url)
    first = client.chat(
        "caller", messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER_TOOL], think=False
    )
    messages = [
        {"role": "user", "content": "Weather?"},
        first.message,
        {"role": "tool", "content": "Sunny, 21 C", "tool_name": "get_weather"},
    ]
    follow = client.chat("caller", messages=messages, tools=[WEATHER_TOOL], think=False)
    assert follow.done and follow.message.tool_calls


@pytest.mark.parametrize("stream", [True, False])
def test_thinking_is_split_in_the_ollama_api(sim_daemon: Daemon, stream: bool) -> None:
    """`<think>…</think>` goes to message.thinking, the answer to content, streamed or not."""
    client = ollama.Client(host=sim_daemon.url)
    messages = [{"role": "user", "content": "Hi"}]
    if stream:
        chunks = list(client.chat("thinker", messages=messages, stream=True, think=True))
        thinking = "".join(c.message.thinking or "" for c in chunks)
        content = "".join(c.message.content for c in chunks)
    else:
        reply = client.chat("thinker", messages=messages, think=True)
        thinking, content = reply.message.thinking or "", reply.message.content
    assert thinking == "The user greets me; be brief."
    assert content == "Hello there!"


def test_thinking_is_reasoning_in_the_openai_api(sim_daemon: Daemon) -> None:
    """OpenAI's face carries the thinking in `reasoning` deltas, the answer in `content`."""
    client = openai.OpenAI(base_url=sim_daemon.url + "/v1", api_key="unused")
    reasoning, content = "", ""
    for chunk in client.chat.completions.create(
        model="thinker", messages=[{"role": "user", "content": "Hi"}], stream=True
    ):
        if chunk.choices:
            delta = chunk.choices[0].delta
            reasoning += getattr(delta, "reasoning", None) or (delta.model_extra or {}).get("reasoning") or ""
            content += delta.content or ""
    assert reasoning == "The user greets me; be brief."
    assert content == "Hello there!"
