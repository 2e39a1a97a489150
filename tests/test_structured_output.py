"""Structured output: `format` (Ollama) and `response_format` (OpenAI) on both engines.

GGUF: the schema becomes a llama.cpp grammar inside the runner, so even the tiny random model can only
produce JSON that validates. `.rkllm` (the simulator, whose reply is fixed): the schema guides the
prompt and the answer is validated; an answer that does not match is an error, never returned.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import ollama
import openai
import pytest

from rkllama_ollama.chat.parse import ToolCall
from rkllama_ollama.generation_events import Content, Thinking, ToolCallEvent
from rkllama_ollama.generation_relay import _HeldAnswer, _passed
from rkllama_ollama.runtime.base import RuntimeFailure, SamplingOptions
from rkllama_ollama.runtime.llamacpp import _schema_grammar
from rkllama_ollama.structured import (
    FormatError,
    InvalidStructuredAnswer,
    check_format,
    guided_messages,
    schema_text,
    validated_answer,
)
from tests.rkllm_support.sim import add_sim_model, build_simulators
from tests.support.daemon import Daemon, http_request
from tests.support.inprocess_daemon import InProcessDaemon
from tests.support.tiny_gguf import write_tiny_gguf

# Only bounded values: a random model's strings might not close within num_predict.
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "count": {"type": "integer"},
        "ok": {"type": "boolean"},
        "mood": {"enum": ["happy", "sad"]},
    },
    "required": ["count", "ok", "mood"],
}
HELLO = [{"role": "user", "content": "describe yourself"}]
LONG_ENOUGH = {"num_predict": 200, "seed": 11}


def post(url: str, body: Any) -> tuple[int, bytes]:
    reply = http_request(url, "POST", body)
    return reply.status, reply.body


# -- unit: format checking and answer validation ---------------------------------------------------


def test_check_format_accepts_json_and_schemas_and_refuses_the_rest() -> None:
    assert check_format(None) is None and check_format("") is None
    assert check_format("json") == "json"
    assert check_format(SCHEMA) == SCHEMA
    with pytest.raises(FormatError, match="expected"):
        check_format("xml")
    with pytest.raises(FormatError, match="invalid JSON schema"):
        check_format({"type": "no-such-type"})
    with pytest.raises(FormatError):
        check_format(42)


def test_validated_answer_takes_matching_json_and_strips_a_code_fence() -> None:
    good = '{"count": 3, "ok": true, "mood": "sad"}'
    assert validated_answer(good, SCHEMA) == good
    assert validated_answer(f"```json\n{good}\n```", SCHEMA) == good
    assert validated_answer(' {"any": [1]} ', "json") == '{"any": [1]}'


@pytest.mark.parametrize(
    ("answer", "fmt", "reason"),
    [
        ("Sure! Here you go.", "json", "not valid JSON"),
        ("[1, 2]", "json", "not a JSON object"),
        ('{"count": "three", "ok": true, "mood": "sad"}', SCHEMA, "at count"),
        ('{"count": 1, "ok": true}', SCHEMA, "'mood' is a required property"),
        ('{"count": 1, "ok": true, "mood"', SCHEMA, "not valid JSON"),  # cut off by num_predict
    ],
)
def test_validated_answer_refuses_what_does_not_match(answer: str, fmt: Any, reason: str) -> None:
    with pytest.raises(InvalidStructuredAnswer, match=reason):
        validated_answer(answer, fmt)


def test_guidance_joins_the_system_message_or_becomes_one() -> None:
    with_system = guided_messages([{"role": "system", "content": "Be terse."}, *HELLO], SCHEMA)
    assert with_system[0]["content"].startswith("Be terse.\n\n")
    assert '"required":["count","ok","mood"]' in with_system[0]["content"]
    without = guided_messages(HELLO, "json")
    assert without[0]["role"] == "system" and "JSON object" in without[0]["content"]
    assert without[1:] == HELLO


def test_the_schema_reaches_the_runner_and_becomes_a_grammar() -> None:
    """The wire form of SamplingOptions carries the schema; the engine converts it (GBNF with a root)."""
    options = SamplingOptions(json_schema=schema_text(SCHEMA))
    assert SamplingOptions.from_wire(options.to_wire()).json_schema == schema_text(SCHEMA)
    assert schema_text("json") == "{}"
    grammar = _schema_grammar(schema_text(SCHEMA))
    assert "root ::=" in grammar and '\\"count\\"' in grammar
    assert re.search(r"^root\s+::=\s+object$", _schema_grammar("{}"), re.MULTILINE)


def test_held_answer_passes_thinking_and_tool_calls_and_holds_content() -> None:
    """On .rkllm the answer is held until validated; thinking streams; a tool-call-only reply is fine."""
    held = _HeldAnswer(SCHEMA)
    call = ToolCall(name="f", arguments={}, index=0)
    passed = _passed(held, [("thinking", "hmm"), ("content", '{"count": 1, '), ("tool_call", call)])
    assert passed == [Thinking("hmm"), ToolCallEvent(call)]
    _passed(held, [("content", '"ok": true, "mood": "sad"}')])
    assert held.release() == Content('{"count": 1, "ok": true, "mood": "sad"}')
    only_calls = _HeldAnswer("json")
    _passed(only_calls, [("tool_call", call)])
    assert only_calls.release() is None
    with pytest.raises(RuntimeFailure, match="not valid JSON"):
        _HeldAnswer("json").release()


# -- GGUF: real constrained decoding on the tiny random model -----------------------------------------


def test_ollama_chat_with_a_schema_yields_valid_json(served: Daemon) -> None:
    client = ollama.Client(host=served.url)
    reply = client.chat(model="tiny", messages=HELLO, format=SCHEMA, options=LONG_ENOUGH)
    assert reply.done_reason == "stop", "the grammar ends the answer, not num_predict"
    jsonschema.validate(json.loads(reply.message.content or ""), SCHEMA)
    streamed = "".join(
        part.message.content or ""
        for part in client.chat(model="tiny", messages=HELLO, format=SCHEMA, options=LONG_ENOUGH, stream=True)
    )
    assert streamed == reply.message.content


def test_ollama_generate_with_a_schema_yields_valid_json(served: Daemon) -> None:
    reply = ollama.Client(host=served.url).generate(
        model="tiny", prompt="hi", format=SCHEMA, options={"num_predict": 200, "seed": 5}
    )
    jsonschema.validate(json.loads(reply.response), SCHEMA)


def test_openai_response_format_json_schema_yields_valid_json(served: Daemon) -> None:
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0)
    for seed in (1, 2, 3):
        reply = client.chat.completions.create(
            model="tiny",
            messages=HELLO,  # type: ignore[arg-type]
            max_tokens=200,
            seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}},
        )
        assert reply.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(reply.choices[0].message.content or ""), SCHEMA)


def test_an_invalid_schema_is_a_400_on_both_apis(served: Daemon) -> None:
    bad = {"type": "no-such-type"}
    status, body = post(served.url + "/api/chat", {"model": "tiny", "messages": HELLO, "format": bad})
    assert status == 400 and "invalid JSON schema" in json.loads(body)["error"]
    status, body = post(
        served.url + "/v1/chat/completions",
        {
            "model": "tiny",
            "messages": HELLO,
            "response_format": {"type": "json_schema", "json_schema": {"schema": bad}},
        },
    )
    assert status == 400 and "invalid JSON schema" in json.loads(body)["error"]["message"]
    status, body = post(
        served.url + "/v1/chat/completions",
        {"model": "tiny", "messages": HELLO, "response_format": {"type": "yaml"}},
    )
    assert status == 400 and json.loads(body)["error"]["message"] == 'invalid response_format type: "yaml"'


def test_an_array_of_anything_is_enforced(served: Daemon) -> None:
    # `items: {}` ("any item") made the binding's GBNF converter fail with KeyError 'prefixItems': a 500.
    schema = {"type": "array", "items": {}}
    client = ollama.Client(host=served.url)
    for seed in (1, 2, 3):  # random weights nest deep: a complete answer is an array, a cut one starts as one
        reply = client.chat(
            model="tiny", messages=HELLO, format=schema, options={"num_predict": 1000, "seed": seed}
        )
        content = (reply.message.content or "").strip()
        if reply.done_reason == "stop":
            assert isinstance(json.loads(content), list), content
        else:
            assert content.startswith("["), content[:80]


def test_a_valid_schema_the_grammar_cannot_express_is_a_400_not_a_500(served: Daemon) -> None:
    schema = {"$ref": "#/definitions/missing"}  # valid JSON Schema, but the reference leads nowhere
    status, body = post(served.url + "/api/chat", {"model": "tiny", "messages": HELLO, "format": schema})
    assert status == 400
    assert json.loads(body)["error"].startswith("this JSON schema cannot be enforced on a GGUF model (")
    assert ollama.Client(host=served.url).chat(model="tiny", messages=HELLO, options={"num_predict": 2}).done


# -- .rkllm (simulator): guided, then validated -----------------------------------------------------


def _sim_model(store: Path, name: str, reply: str) -> None:
    add_sim_model(store, name, reply=reply, tokenizer=True)


@pytest.fixture(scope="module")
def sim_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    library = build_simulators()["F"]
    store = tmp_path_factory.mktemp("structured-sim") / "models"
    _sim_model(store, "fenced", '```json\n{"count": 2, "ok": false, "mood": "happy"}\n```')
    _sim_model(store, "wrong", '{"count": "two", "ok": false, "mood": "happy"}')
    _sim_model(store, "prose", "Sure, here is a JSON object for you.")
    with Daemon(store, env={"RKLLAMA_RKLLM_LIB": str(library)}).start() as server:
        yield server


@pytest.mark.parametrize("stream", [False, True])
def test_rkllm_answer_that_matches_is_returned_as_json(sim_daemon: Daemon, stream: bool) -> None:
    parts = ollama.Client(host=sim_daemon.url).chat(
        model="fenced", messages=HELLO, format=SCHEMA, stream=stream
    )
    content = "".join(p.message.content or "" for p in parts) if stream else parts.message.content  # type: ignore[union-attr]
    assert json.loads(content or "") == {"count": 2, "ok": False, "mood": "happy"}


@pytest.mark.parametrize(("model", "fmt"), [("wrong", SCHEMA), ("prose", "json")])
def test_rkllm_answer_that_does_not_match_is_an_error(sim_daemon: Daemon, model: str, fmt: Any) -> None:
    """Streamed or not, the client gets an error status and never the invalid answer."""
    for stream in (False, True):
        status, body = post(
            sim_daemon.url + "/api/chat", {"model": model, "messages": HELLO, "format": fmt, "stream": stream}
        )
        assert status == 500
        assert "the model's answer" in json.loads(body)["error"]
        assert set(json.loads(body)) == {"error"}, "no message, no content"
    status, body = post(
        sim_daemon.url + "/v1/chat/completions",
        {"model": model, "messages": HELLO, "response_format": {"type": "json_object"}}
        if fmt == "json"
        else {
            "model": model,
            "messages": HELLO,
            "response_format": {"type": "json_schema", "json_schema": {"schema": fmt}},
        },
    )
    assert status == 500 and "the model's answer" in json.loads(body)["error"]["message"]


def test_rkllm_without_format_returns_the_answer_untouched(sim_daemon: Daemon) -> None:
    reply = ollama.Client(host=sim_daemon.url).chat(model="prose", messages=HELLO)
    assert reply.message.content == "Sure, here is a JSON object for you."


# A DeepSeek-R1-style template: the generation prompt opens the thinking block.
OPENS_THINKING = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n' }}{% endif %}"
)


def test_a_thinking_model_thinks_freely_under_a_format(tmp_path: Path) -> None:
    # Ollama applies the format to the answer after the thinking block, not to the thinking. The tiny
    # model never closes its block, so its whole output is thinking: it must be exactly what it thinks
    # with no format at all (same seed), and the answer stays empty rather than forced JSON.
    store = tmp_path / "models"
    (store / "thinker").mkdir(parents=True)
    write_tiny_gguf(store / "thinker" / "tiny.gguf", chat_template=OPENS_THINKING)
    (store / "thinker" / "Modelfile").write_text('FROM="tiny.gguf"\n')
    options = {"num_predict": 40, "seed": 9, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
    with InProcessDaemon(store).start() as server:
        client = ollama.Client(host=server.url)
        assert "thinking" in client.show("thinker").capabilities
        free = client.chat(model="thinker", messages=HELLO, options=options)
        held = client.chat(model="thinker", messages=HELLO, options=options, format=SCHEMA)
    assert free.message.thinking and held.message.thinking == free.message.thinking
    assert held.message.content == "" and held.done_reason == "length"
