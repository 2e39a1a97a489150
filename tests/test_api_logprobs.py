"""Log-probabilities through a live daemon, with the real ollama and openai clients (GGUF engine):
one entry per generated token, riding on the chunk of its token, concatenated when not streamed."""

from __future__ import annotations

import math
from typing import Any

import ollama
import openai
import orjson
import pytest

from tests.support.daemon import Daemon

MODEL = "tiny"
HELLO = [{"role": "user", "content": "hello"}]
SAMPLED = {"num_predict": 12, "seed": 4, "temperature": 1.2, "top_k": 0, "top_p": 1.0}


def assert_sane(entries: list[Any], alternatives: int) -> None:
    for entry in entries:
        assert entry.logprob <= 0.0
        tops = entry.top_logprobs or []
        assert len(tops) == alternatives
        values = [top.logprob for top in tops]
        assert values == sorted(values, reverse=True) and sum(math.exp(v) for v in values) <= 1.0 + 1e-6


def test_ollama_chat_streamed_one_entry_per_token_on_its_chunk(served: Daemon) -> None:
    client = ollama.Client(host=served.url)
    chunks = list(
        client.chat(MODEL, messages=HELLO, options=SAMPLED, stream=True, logprobs=True, top_logprobs=2)
    )
    final = chunks[-1]
    entries = [entry for chunk in chunks[:-1] for entry in chunk.logprobs or []]
    assert final.done and len(entries) == final.eval_count
    assert_sane(entries, 2)


def test_the_wire_entries_carry_the_exact_bytes_of_their_chunk(served: Daemon) -> None:
    body = {"model": MODEL, "messages": HELLO, "options": SAMPLED, "logprobs": True}
    lines = [orjson.loads(line) for line in served.request("POST", "/api/chat", body).body.splitlines()]
    *chunks, final = lines
    entries = [entry for chunk in chunks for entry in chunk.get("logprobs", [])]
    assert len(entries) == final["eval_count"] and "logprobs" not in final
    content = "".join(chunk["message"]["content"] for chunk in chunks)
    assert bytes(b for entry in entries for b in entry["bytes"]).decode("utf-8", errors="replace") == content
    assert all("top_logprobs" not in entry for entry in entries)  # none asked for
    for chunk in chunks:  # a chunk's entries are the tokens its text came from (nothing is held back here)
        raw = bytes(b for entry in chunk.get("logprobs", []) for b in entry["bytes"])
        assert chunk["message"]["content"] == raw.decode("utf-8", "replace")


def test_ollama_generate_whole_concatenates_them(served: Daemon) -> None:
    client = ollama.Client(host=served.url)
    reply = client.generate(MODEL, prompt="hi", options=SAMPLED, logprobs=True)
    assert reply.logprobs is not None and len(reply.logprobs) == reply.eval_count
    assert_sane(reply.logprobs, 0)
    assert client.generate(MODEL, prompt="hi", options=SAMPLED).logprobs is None  # only when asked


def test_ollama_greedy_token_is_the_likeliest(served: Daemon) -> None:
    client = ollama.Client(host=served.url)
    reply = client.chat(
        MODEL, messages=HELLO, options={"num_predict": 6, "temperature": 0}, logprobs=True, top_logprobs=1
    )
    assert reply.logprobs
    for entry in reply.logprobs:
        assert entry.token == entry.top_logprobs[0].token
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)


def test_ollama_bad_logprobs_fields_are_400s(served: Daemon) -> None:
    body: dict[str, Any] = {"model": MODEL, "prompt": "hi", "logprobs": "yes"}
    reply = served.request("POST", "/api/generate", body)
    assert reply.status == 400 and reply.error == '"logprobs" must be a boolean'
    reply = served.request("POST", "/api/chat", {"model": MODEL, "messages": HELLO, "top_logprobs": -1})
    assert reply.status == 400 and reply.error == "top_logprobs must be between 0 and 20"


def test_openai_chat_logprobs_whole_and_streamed(served: Daemon) -> None:
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0)
    reply = client.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        max_tokens=10,
        seed=3,
        logprobs=True,
        top_logprobs=3,  # type: ignore[arg-type]
    )
    choice = reply.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    assert reply.usage is not None and len(choice.logprobs.content) == reply.usage.completion_tokens
    assert_sane(choice.logprobs.content, 3)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=HELLO,  # type: ignore[arg-type]
        max_tokens=10,
        seed=3,
        logprobs=True,
        stream=True,
        stream_options={"include_usage": True},
    )
    streamed, usage = [], None
    for chunk in stream:
        usage = chunk.usage or usage
        for part in chunk.choices:
            streamed.extend(part.logprobs.content or [] if part.logprobs else [])
    assert usage is not None and len(streamed) == usage.completion_tokens
    assert all(entry.top_logprobs == [] for entry in streamed)
    plain = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3)  # type: ignore[arg-type]
    assert plain.choices[0].logprobs is None


def test_openai_completions_legacy_logprobs(served: Daemon) -> None:
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0)
    reply = client.completions.create(model=MODEL, prompt="once upon", max_tokens=10, seed=5, logprobs=2)
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens is not None and reply.usage is not None
    assert len(logprobs.tokens) == reply.usage.completion_tokens
    assert logprobs.text_offset is not None and logprobs.text_offset[0] == 0
    assert logprobs.text_offset == sorted(logprobs.text_offset)
    assert logprobs.top_logprobs is not None and all(len(tops) <= 2 for tops in logprobs.top_logprobs)
    assert logprobs.token_logprobs is not None and all(lp <= 0 for lp in logprobs.token_logprobs)
    with pytest.raises(openai.BadRequestError, match="top_logprobs must be between 0 and 20"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, logprobs=21)
