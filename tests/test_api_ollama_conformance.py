"""Ollama API conformance against a live daemon, driven by the real `ollama` Python client.

The model is a tiny random GGUF (fast, deterministic structure); words are never asserted.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from pathlib import Path
from typing import Any

import ollama
import pytest

from tests.support.daemon import Daemon, error_of
from tests.support.tiny_gguf import write_tiny_gguf

MODEL = "tiny"
SHORT = {"num_predict": 8, "seed": 1, "temperature": 0}


@pytest.fixture(scope="module")
def client(daemon: Daemon) -> ollama.Client:
    return ollama.Client(host=daemon.url)


def assert_positive_stats(final: Any) -> None:
    for key in ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count"):
        value = getattr(final, key)
        assert isinstance(value, int) and value > 0, key
    assert isinstance(final.eval_duration, int) and final.eval_duration > 0


# -- service and listing -----------------------------------------------------------------------


def test_root_answers_like_ollama(daemon: Daemon) -> None:
    status, ctype, body = daemon.request("GET", "/")
    assert (status, body) == (200, b"Ollama is running")
    assert ctype.startswith("text/plain")
    status, _, body = daemon.request("HEAD", "/")
    assert status == 200 and body == b""


def test_version_is_numeric_json(daemon: Daemon) -> None:
    status, ctype, body = daemon.request("GET", "/api/version")
    assert status == 200 and ctype == "application/json; charset=utf-8"
    version = json.loads(body)["version"]
    assert all(part.isdigit() for part in version.split("."))
    assert list(json.loads(body)) == ["version"]


def test_list_shows_the_store_with_full_entries(client: ollama.Client, daemon: Daemon) -> None:
    models = client.list().models
    names = [m.model for m in models]
    assert "tiny:latest" in names
    tiny = next(m for m in models if m.model == "tiny:latest")
    assert tiny.size and tiny.size > 0
    assert tiny.digest and len(tiny.digest) >= 12
    assert isinstance(tiny.modified_at, dt.datetime)
    assert tiny.details and tiny.details.format == "gguf"
    _, ctype, body = daemon.request("GET", "/api/tags")
    assert ctype == "application/json; charset=utf-8"
    raw = json.loads(body)["models"][0]
    assert raw["name"] == raw["model"]
    assert "expires_at" not in raw
    assert "completion" in raw["capabilities"]
    assert all(
        isinstance(raw["details"][k], str)
        for k in ("format", "family", "parameter_size", "quantization_level")
    )


def test_show_has_model_info_and_parameters(client: ollama.Client, daemon: Daemon) -> None:
    shown = client.show(MODEL)
    assert shown.modelinfo is not None and shown.modelinfo.get("general.architecture") == "llama"
    assert shown.parameters and "temperature" in shown.parameters
    assert "completion" in (shown.capabilities or [])
    status, _, body = daemon.request("POST", "/api/show", {"name": MODEL})  # legacy key
    assert status == 200 and "model_info" in json.loads(body)


def test_tags_details_carry_context_and_embedding_lengths(daemon: Daemon) -> None:
    """Current Ollama lists `details.context_length` and `details.embedding_length` (omitted when 0)."""
    raw = next(m for m in daemon.request("GET", "/api/tags").json()["models"] if m["model"] == "tiny:latest")
    assert raw["details"]["context_length"] == 32768  # the tiny GGUF's trained context (no num_ctx set)
    assert isinstance(raw["details"]["embedding_length"], int) and raw["details"]["embedding_length"] > 0


def test_show_answers_copilot_with_the_name_it_asked_for(daemon: Daemon) -> None:
    """Like Ollama: a GitHub Copilot Chat client gets the requested name as `general.basename`."""
    agent = {"User-Agent": "GitHubCopilotChat/0.30.0"}
    shown = daemon.request("POST", "/api/show", {"model": "Tiny:latest"}, headers=agent).json()
    assert shown["model_info"]["general.basename"] == "Tiny:latest"
    plain = daemon.request("POST", "/api/show", {"model": "Tiny:latest"}).json()
    assert plain["model_info"].get("general.basename") != "Tiny:latest"


def test_show_unknown_and_missing_model(daemon: Daemon) -> None:
    status, _, body = daemon.request("POST", "/api/show", {"model": "nope"})
    assert status == 404 and error_of(body) == "model 'nope:latest' not found"
    status, _, body = daemon.request("POST", "/api/show", {})
    assert status == 400 and error_of(body) == "model is required"


def test_unknown_path_and_wrong_method(daemon: Daemon) -> None:
    status, _, body = daemon.request("GET", "/api/nothing-here")
    assert (status, body) == (404, b"404 page not found")
    status, _, body = daemon.request("GET", "/api/show")
    assert (status, body) == (405, b"405 method not allowed")


# -- generation ----------------------------------------------------------------------------------


def test_chat_streamed(client: ollama.Client) -> None:
    chunks = list(
        client.chat(MODEL, messages=[{"role": "user", "content": "hello"}], stream=True, options=SHORT)
    )
    assert chunks[-1].done and chunks[-1].done_reason in ("stop", "length")
    assert all(not c.done for c in chunks[:-1])
    assert all(c.message.role == "assistant" for c in chunks)
    assert all(c.model == MODEL for c in chunks)
    assert_positive_stats(chunks[-1])
    assert chunks[-1].eval_count <= 8


def test_chat_not_streamed(client: ollama.Client) -> None:
    reply = client.chat(MODEL, messages=[{"role": "USER", "content": "hello"}], stream=False, options=SHORT)
    assert reply.done and reply.done_reason == "length"
    assert reply.message.role == "assistant" and isinstance(reply.message.content, str)
    assert_positive_stats(reply)
    assert reply.eval_count == 8


def test_stream_and_batch_agree_with_a_seed(client: ollama.Client) -> None:
    messages = [{"role": "user", "content": "the model"}]
    streamed = "".join(
        c.message.content for c in client.chat(MODEL, messages=messages, stream=True, options=SHORT)
    )
    batch = client.chat(MODEL, messages=messages, stream=False, options=SHORT).message.content
    assert streamed == batch and streamed


def test_generate_streamed_and_not(client: ollama.Client) -> None:
    chunks = list(client.generate(MODEL, prompt="hello", stream=True, options=SHORT))
    final = chunks[-1]
    assert final.done and final.context and all(isinstance(t, int) for t in final.context)
    assert_positive_stats(final)
    reply = client.generate(MODEL, prompt="hello", stream=False, options=SHORT)
    assert reply.done and reply.done_reason == "length" and reply.context
    assert reply.response == "".join(c.response for c in chunks)
    # `context` continues the conversation: the new prompt starts with the earlier exchange
    # (its prompt part re-tokenises identically; random output tokens need not).
    follow = client.generate(MODEL, prompt=" and", context=reply.context, stream=False, options=SHORT)
    prompt_part = len(reply.context) - reply.eval_count
    assert follow.context[:prompt_part] == reply.context[:prompt_part]
    assert len(follow.context) > len(reply.context)


def test_generate_raw_has_no_context(client: ollama.Client) -> None:
    reply = client.generate(MODEL, prompt="hello world", raw=True, stream=False, options=SHORT)
    assert reply.done and reply.context is None


def test_num_predict_limits_and_stop_is_accepted_as_string(daemon: Daemon) -> None:
    body = {
        "model": MODEL,
        "prompt": "x",
        "stream": False,
        "options": {"num_predict": 3, "stop": "zzz", "mirostat": 1},
    }
    status, ctype, payload = daemon.request("POST", "/api/generate", body)
    assert status == 200 and ctype == "application/json; charset=utf-8"
    assert json.loads(payload)["eval_count"] == 3


def test_load_then_unload(client: ollama.Client, daemon: Daemon) -> None:
    loaded = client.generate(MODEL, prompt="")
    assert loaded.done and loaded.done_reason == "load"
    running = client.ps().models
    assert [m.model for m in running] == ["tiny:latest"]
    assert running[0].expires_at is not None and running[0].context_length
    status, ctype, payload = daemon.request(
        "POST", "/api/generate", {"model": MODEL, "prompt": "", "keep_alive": 0}
    )
    assert status == 200 and ctype == "application/json; charset=utf-8"
    assert json.loads(payload)["done_reason"] == "unload"
    assert client.ps().models == []
    chat_load = client.chat(MODEL, messages=[])
    assert chat_load.done_reason == "load" and chat_load.message.content == ""
    unload = client.chat(MODEL, messages=[], keep_alive=0)
    assert unload.done_reason == "unload" and client.ps().models == []


def test_keep_alive_forever_and_zero(client: ollama.Client) -> None:
    client.generate(MODEL, prompt="", keep_alive=-1)
    expires = client.ps().models[0].expires_at
    assert expires is not None and expires.year > 2200
    client.generate(MODEL, prompt="hi", keep_alive=0, options=SHORT)
    for _ in range(100):  # the unload happens right after the reply
        if not client.ps().models:
            break
        asyncio.run(asyncio.sleep(0.05))
    assert client.ps().models == []


# -- errors ---------------------------------------------------------------------------------------


def test_unknown_model_is_404_not_found(client: ollama.Client) -> None:
    for call in (
        lambda: client.chat("nope", messages=[{"role": "user", "content": "x"}]),
        lambda: client.generate("nope", prompt="x"),
    ):
        with pytest.raises(ollama.ResponseError) as info:
            call()
        assert info.value.status_code == 404 and "not found" in info.value.error
        assert "'nope'" in info.value.error


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("/api/chat", b"{}", 400, "model is required"),
        ("/api/chat", b"null", 400, "model is required"),
        ("/api/generate", b"{}", 404, "model '' not found"),
        ("/api/chat", b"", 400, "missing request body"),
        ("/api/chat", b"{not json", 400, "invalid JSON"),
        ("/api/chat", b"[1, 2]", 400, "must be a JSON object"),
        ("/api/chat", b'{"model": 5}', 400, '"model" must be a string'),
        ("/api/chat", b'{"model": "tiny", "messages": "hi"}', 400, '"messages" must be'),
        ("/api/chat", b'{"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}', 400, "role"),
        (
            "/api/chat",
            b'{"model": "tiny", "messages": [], "stream": "yes"}',
            400,
            '"stream" must be a boolean',
        ),
        ("/api/generate", b'{"model": "tiny", "prompt": "", "keep_alive": "300"}', 400, "missing unit"),
        ("/api/generate", b'{"model": "tiny", "prompt": 3}', 400, '"prompt" must be a string'),
        (
            "/api/generate",
            b'{"model": "tiny", "options": {"temperature": "hot"}}',
            400,
            'option "temperature"',
        ),
        ("/api/generate", b'{"model": "tiny", "options": {"stop": [1]}}', 400, 'option "stop"'),
        ("/api/generate", b'{"model": "tiny", "think": "very"}', 400, "invalid think value"),
        ("/api/generate", b'{"model": "tiny", "think": true}', 400, '"tiny" does not support thinking'),
        ("/api/generate", b'{"model": "tiny", "format": 7}', 400, "invalid format"),
        (
            "/api/generate",
            b'{"model": "tiny", "top_logprobs": 21}',
            400,
            "top_logprobs must be between 0 and 20",
        ),
        ("/api/generate", b'{"model": "tiny", "raw": true, "system": "x", "prompt": "y"}', 400, "raw mode"),
        ("/api/generate", b'{"model": "tiny", "prompt": "x", "suffix": "y"}', 400, "does not support insert"),
        ("/api/chat", b'{"model": "../../etc/passwd", "messages": []}', 400, "invalid model name"),
        (
            "/api/chat",
            b'{"model": "tiny", "messages": [{"role": "user", "content": "x", "images": ["aGk="]}]}',
            400,
            "does not support images",
        ),
    ],
)
def test_bad_requests_get_precise_errors(
    daemon: Daemon, path: str, body: bytes, status: int, message: str
) -> None:
    got_status, ctype, payload = daemon.request("POST", path, raw=body)
    assert got_status == status
    assert ctype == "application/json; charset=utf-8"
    assert message in error_of(payload)


def test_a_prompt_longer_than_the_context_is_a_400_and_the_daemon_serves_on(daemon: Daemon) -> None:
    long = {"role": "user", "content": "the model answer " * 200}
    status, _, payload = daemon.request(
        "POST", "/api/chat", {"model": MODEL, "messages": [long], "options": {"num_ctx": 64}}
    )
    assert status == 400 and "more than the context length of 64 tokens" in error_of(payload)
    client = ollama.Client(host=daemon.url)
    assert client.chat(MODEL, messages=[{"role": "user", "content": "hi"}], options=SHORT).done


def test_think_false_is_fine_on_a_non_thinking_model(daemon: Daemon) -> None:
    status, _, _ = daemon.request("POST", "/api/generate", {"model": MODEL, "prompt": "", "think": False})
    assert status == 200


def test_ndjson_stream_has_no_blank_lines(daemon: Daemon) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "options": SHORT}
    status, ctype, payload = daemon.request("POST", "/api/chat", body)
    assert status == 200 and ctype == "application/x-ndjson"
    lines = payload.split(b"\n")
    assert lines[-1] == b""
    objects = [json.loads(line) for line in lines[:-1]]
    assert objects and all(line.strip() for line in lines[:-1])
    assert objects[-1]["done"] is True and all(o["done"] is False for o in objects[:-1])
    assert all(o["created_at"].endswith("Z") for o in objects)


def test_sixteen_concurrent_streaming_clients_all_complete(daemon: Daemon) -> None:
    async def one(index: int) -> tuple[bool, int]:
        client = ollama.AsyncClient(host=daemon.url)
        final = None
        stream = await client.chat(
            MODEL,
            messages=[{"role": "user", "content": f"client {index}"}],
            stream=True,
            options={"num_predict": 16, "seed": index},
        )
        async for chunk in stream:
            final = chunk
        assert final is not None
        return final.done, final.eval_count or 0

    async def all_of_them() -> list[tuple[bool, int]]:
        return await asyncio.gather(*(one(i) for i in range(16)))

    results = asyncio.run(all_of_them())
    assert all(done for done, _ in results)
    assert all(count == 16 for _, count in results)


FIM_TEMPLATE = (
    "{% if suffix %}<PRE> {{ prompt }} <SUF>{{ suffix }} <MID>"
    "{% else %}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "<|im_start|>assistant\n{% endif %}"
)


def test_suffix_renders_fill_in_the_middle_on_an_insert_model(tmp_path: Path) -> None:
    """Ollama's FIM example: the template renders `<PRE> def add( <SUF>    return c <MID>` from prompt and
    suffix."""
    (tmp_path / "models" / "fim").mkdir(parents=True)
    write_tiny_gguf(tmp_path / "models" / "fim" / "fim.gguf", chat_template=FIM_TEMPLATE)
    (tmp_path / "models" / "fim" / "Modelfile").write_text('FROM="fim.gguf"\n')
    with Daemon(tmp_path / "models").start() as server:
        client = ollama.Client(host=server.url)
        assert "insert" in (client.show("fim").capabilities or [])
        options = {"num_predict": 1, "temperature": 0}
        fim = client.generate("fim", prompt="def add(", suffix="    return c", options=options)
        assert fim.prompt_eval_count and fim.prompt_eval_count > 5
        # The same text sent raw right after finds every prompt token already in the KV cache: the
        # rendered FIM prompt was exactly `<PRE> def add( <SUF>    return c <MID>`.
        raw = client.generate(
            "fim", prompt="<PRE> def add( <SUF>    return c <MID>", raw=True, options=options
        )
        assert raw.prompt_eval_count == 1


@pytest.mark.parametrize("token", [-1, 2**31, 10**6])
def test_a_context_token_outside_the_vocabulary_is_a_400_not_a_crash(
    client: ollama.Client, token: int
) -> None:
    # llama.cpp aborts the whole runner process on such an id: it must be refused before it gets there.
    with pytest.raises(ollama.ResponseError) as failure:
        client.generate(MODEL, prompt="hi", context=[1, token], options=SHORT)
    assert failure.value.status_code == 400
    assert f"token id {token} is outside this model's vocabulary of " in failure.value.error
    assert client.generate(MODEL, prompt="hi", options=SHORT).done  # the same runner still serves
