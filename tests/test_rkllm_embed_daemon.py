"""Embeddings on `.rkllm` models (RKLLM hidden-layer mode) through a live daemon on the C simulator.

One daemon per ABI family (every supported family, C to F, has RKLLM_INFER_GET_LAST_HIDDEN_LAYER: C hands
the states back with its own GET_LAST_HIDDEN_LAYER callback state, D onward with NORMAL), driven with the
real `ollama` and `openai` clients. The simulator's hidden row for a token prefix is deterministic
(native/rkllm_sim/rkllm_sim.c `hidden_row`); `sim_hidden_row` below is the same function, so every vector
is checked against the exact value the runtime produced for the input's last token.

Models (an `.rkllm` whose file name says "embedding" is embedding-only, models/capabilities.py):
- `emb`: embedding-only, no tokenizer (prompt input, one token per UTF-8 byte), 48-wide hidden layer;
- `emb-tok`: the same with a byte-level Hugging Face tokenizer (token input);
- `emb-small`: embedding-only with a 64-token context;
- `emb-crash`: embedding-only whose hidden-layer run segfaults in the native library (see `add_crash_model`);
- `chat`: a chat model with a tokenizer, to prove chat still works after hidden-layer runs.
"""

from __future__ import annotations

import base64
import math
import string
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import ollama
import openai
import pytest

from rkllama_ollama.generation import INPUT_TOO_LONG
from tests.rkllm_support.sim import (
    FAMILIES,
    add_sim_model,
    build_simulators,
)
from tests.support.daemon import Daemon

EMBD_SIZE = 48  # not the simulator's default (64): the width must come from the runtime
SMALL_CONTEXT = 64
CHAT_REPLY = "Sure, here it is."
EMBEDDING_FILE = "Qwen3-Embedding-0.6B-sim.rkllm"
INPUTS = ["alpha", "beta", "alpha", "Grüße, 世界 🙂"]

# `emb-crash`: the simulator allocates embd_size x n_tokens floats for a hidden-layer run and writes
# them without checking the allocation. 2^31-1 floats (8 GiB) per token x 40000 tokens is ~320 TiB, more
# than any user address space (128 TiB on x86-64, 256 TiB on AArch64), so malloc returns NULL whatever the
# overcommit policy and the first write is a SIGSEGV inside rkllm_run, before any memory is touched.
# (The simulator's `crash_after_tokens` only fires while generating, never in hidden-layer mode.)
CRASH_EMBD_SIZE = 2**31 - 1
CRASH_CONTEXT = 65536
CRASH_INPUT = "x" * 40000


def sim_hidden_row(tokens: Sequence[int], embd_size: int) -> list[float]:
    """rkllm_sim.c `hidden_row` for the prefix `tokens`: an FNV-1a-style hash spread over the dims."""
    mask = (1 << 64) - 1
    state = 1469598103934665603
    for token in tokens:
        state = ((state ^ (token + 1)) * 1099511628211) & mask
    row: list[float] = []
    for dim in range(embd_size):
        x = (state + dim * 0x9E3779B97F4A7C15) & mask
        x ^= x >> 31
        x = (x * 0xBF58476D1CE4E5B9) & mask
        x ^= x >> 29
        unit = float32((x >> 11) / float(1 << 53))
        row.append(float32(unit * 2.0 - 1.0))
    return row


def float32(value: float) -> float:
    return struct.unpack("<f", struct.pack("<f", value))[0]


def expected_vector(text: str) -> list[float]:
    """The raw vector of `text` (the last token's hidden row); both byte tokenizers give ids = UTF-8 bytes."""
    return sim_hidden_row(list(text.encode("utf-8")), EMBD_SIZE)


def norm(vector: Sequence[float]) -> float:
    return math.sqrt(math.fsum(value * value for value in vector))


def unit(vector: Sequence[float]) -> list[float]:
    length = norm(vector)
    return [value / length for value in vector]


def token_count(texts: Sequence[str]) -> int:
    return sum(len(text.encode("utf-8")) for text in texts)


def chat_prompt_tokens(messages: Sequence[dict[str, str]]) -> int:
    """Tokens of the rendered chat prompt (CHAT_TEMPLATE, byte tokenizer: `<|im_end|>` is one token)."""
    text = "".join(f"<|{m['role']}|>{m['content']}<|im_end|>" for m in messages) + "<|assistant|>"
    return len(text.replace("<|im_end|>", "").encode("utf-8")) + text.count("<|im_end|>")


def add_model(
    store: Path,
    name: str,
    *,
    file_name: str = "sim.rkllm",
    tokenizer: bool = False,
    num_ctx: int | None = None,
    **keys: object,
) -> None:
    lines = ("TEMPERATURE=0.7",) + ((f"NUM_CTX={num_ctx}",) if num_ctx is not None else ())
    add_sim_model(store, name, file_name=file_name, tokenizer=tokenizer, modelfile=lines, **keys)


@pytest.fixture(scope="module", params=FAMILIES)
def family_daemon(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Daemon]:
    family = request.param
    library = build_simulators()[family]
    store = tmp_path_factory.mktemp(f"rkllm-embed-{family}") / "models"
    add_model(store, "emb", file_name=EMBEDDING_FILE, embd_size=EMBD_SIZE)
    add_model(store, "emb-tok", file_name=EMBEDDING_FILE, tokenizer=True, embd_size=EMBD_SIZE)
    add_model(
        store, "emb-small", file_name=EMBEDDING_FILE, embd_size=EMBD_SIZE, max_context_len=SMALL_CONTEXT
    )
    add_model(
        store,
        "emb-crash",
        file_name=EMBEDDING_FILE,
        num_ctx=CRASH_CONTEXT,
        embd_size=CRASH_EMBD_SIZE,
        max_context_len=CRASH_CONTEXT,
    )
    add_model(store, "chat", tokenizer=True, reply=CHAT_REPLY, embd_size=EMBD_SIZE)
    # Without conversation caches: these tests prove what the live KV cache may be trusted with (a saved
    # prompt-cache file would legitimately restore the turn after the hidden-layer runs).
    env = {"RKLLAMA_RKLLM_LIB": str(library), "RKLLAMA_KV_CACHE_SLOTS": "0"}
    with Daemon(store, env=env).start() as server:
        server.family = family  # type: ignore[attr-defined]
        yield server


@pytest.fixture
def client(family_daemon: Daemon) -> ollama.Client:
    return ollama.Client(host=family_daemon.url)


@pytest.fixture
def openai_client(family_daemon: Daemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=family_daemon.url + "/v1", api_key="x", max_retries=0)


def post(daemon: Daemon, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    reply = daemon.request("POST", path, body)
    return reply.status, reply.json()


# -- /api/embed ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["emb", "emb-tok"])
def test_embed_gives_the_last_tokens_hidden_row_normalised_per_input(
    client: ollama.Client, model: str
) -> None:
    """Proves: one vector per input in order, the runtime's width, unit length, the last token's row
    (prompt input and token input alike), determinism, and prompt_eval_count = every token fed."""
    reply = client.embed(model=model, input=INPUTS)
    assert reply.model == model
    assert len(reply.embeddings) == len(INPUTS)
    for text, vector in zip(INPUTS, reply.embeddings, strict=True):
        assert len(vector) == EMBD_SIZE
        assert norm(vector) == pytest.approx(1.0, abs=1e-5)
        assert vector == pytest.approx(unit(expected_vector(text)), abs=1e-6)
    assert reply.embeddings[0] == reply.embeddings[2]
    assert reply.embeddings[0] != pytest.approx(reply.embeddings[1], abs=1e-3)
    assert reply.embeddings[1] != pytest.approx(reply.embeddings[3], abs=1e-3)
    assert reply.prompt_eval_count == token_count(INPUTS)
    assert reply.total_duration and reply.load_duration
    again = client.embed(model=model, input=INPUTS[3])
    assert again.embeddings == [reply.embeddings[3]]
    assert again.prompt_eval_count == token_count(INPUTS[3:])


def test_empty_input_only_loads_the_model(family_daemon: Daemon) -> None:
    for empty in ("", []):
        assert post(family_daemon, "/api/embed", {"model": "emb", "input": empty}) == (
            200,
            {"model": "emb", "embeddings": []},
        )


def test_show_reports_the_embedding_capability(client: ollama.Client) -> None:
    assert client.show("emb").capabilities == ["embedding"]
    assert client.show("emb-tok").capabilities == ["embedding"]
    chat = client.show("chat").capabilities or []
    assert "completion" in chat and "embedding" not in chat


def test_dimensions_truncates_then_renormalises(client: ollama.Client) -> None:
    full = client.embed(model="emb", input="alpha").embeddings[0]
    cut = client.embed(model="emb", input="alpha", dimensions=8).embeddings[0]
    assert len(cut) == 8
    assert norm(cut) == pytest.approx(1.0, abs=1e-5)
    assert cut == pytest.approx(unit(full[:8]), abs=1e-6)
    assert cut == pytest.approx(unit(expected_vector("alpha")[:8]), abs=1e-6)
    wide = client.embed(model="emb", input="alpha", dimensions=10 * EMBD_SIZE).embeddings[0]
    assert wide == pytest.approx(full, abs=1e-9)  # more dimensions than the model has: unchanged


def test_input_longer_than_the_context(client: ollama.Client, family_daemon: Daemon) -> None:
    """Proves: truncate:false refuses with the GGUF path's (Ollama's) exact body, for a batch too; the
    default and truncate:true cut to the first SMALL_CONTEXT tokens; exactly the context fits."""
    long_text = string.ascii_lowercase * 4  # 104 tokens; its first and its last 64 differ
    refused = {"error": INPUT_TOO_LONG}
    body = {"model": "emb-small", "input": long_text, "truncate": False}
    assert post(family_daemon, "/api/embed", body) == (400, refused)
    body = {"model": "emb-small", "input": ["short", long_text], "truncate": False}
    assert post(family_daemon, "/api/embed", body) == (400, refused)
    with pytest.raises(ollama.ResponseError) as info:
        client.embed(model="emb-small", input=long_text, truncate=False)
    assert info.value.status_code == 400 and info.value.error == INPUT_TOO_LONG

    status, default = post(family_daemon, "/api/embed", {"model": "emb-small", "input": long_text})
    assert status == 200
    assert default["prompt_eval_count"] == SMALL_CONTEXT
    assert default["embeddings"][0] == pytest.approx(
        unit(expected_vector(long_text[:SMALL_CONTEXT])), abs=1e-6
    )
    explicit = client.embed(model="emb-small", input=long_text, truncate=True)
    assert explicit.embeddings == default["embeddings"]
    fits = client.embed(model="emb-small", input=long_text[:SMALL_CONTEXT], truncate=False)
    assert fits.embeddings == default["embeddings"] and fits.prompt_eval_count == SMALL_CONTEXT
    # The legacy endpoint has no truncate field: it always truncates.
    legacy = client.embeddings(model="emb-small", prompt=long_text).embedding
    assert unit(legacy) == pytest.approx(default["embeddings"][0], abs=1e-9)


# -- /api/embeddings and /v1/embeddings agree with /api/embed --------------------------------------------


def test_legacy_embeddings_are_the_raw_hidden_row(client: ollama.Client, family_daemon: Daemon) -> None:
    raw = client.embeddings(model="emb", prompt="alpha").embedding
    assert raw == pytest.approx(expected_vector("alpha"), abs=1e-7)
    assert norm(raw) != pytest.approx(1.0, abs=1e-3)  # legacy vectors are not normalised
    assert unit(raw) == pytest.approx(client.embed(model="emb", input="alpha").embeddings[0], abs=1e-9)
    assert post(family_daemon, "/api/embeddings", {"model": "emb", "prompt": ""}) == (200, {"embedding": []})


def test_openai_embeddings_agree_with_api_embed(client: ollama.Client, openai_client: openai.OpenAI) -> None:
    native = client.embed(model="emb", input=INPUTS).embeddings

    single = openai_client.embeddings.create(model="emb", input=INPUTS[1], encoding_format="float")
    assert single.model == "emb" and single.object == "list"
    assert [item.index for item in single.data] == [0]
    assert single.data[0].embedding == pytest.approx(native[1], abs=1e-9)
    assert single.usage.prompt_tokens == single.usage.total_tokens == token_count(INPUTS[1:2])

    batch = openai_client.embeddings.create(model="emb", input=INPUTS, encoding_format="float")
    assert [item.index for item in batch.data] == list(range(len(INPUTS)))
    for item, vector in zip(batch.data, native, strict=True):
        assert item.embedding == pytest.approx(vector, abs=1e-9)
    assert batch.usage.prompt_tokens == token_count(INPUTS)

    encoded = openai_client.embeddings.create(model="emb", input=INPUTS, encoding_format="base64")
    for item, vector in zip(encoded.data, native, strict=True):
        assert isinstance(item.embedding, str)
        raw = base64.b64decode(item.embedding)
        assert len(raw) == 4 * EMBD_SIZE
        assert list(struct.unpack(f"<{EMBD_SIZE}f", raw)) == pytest.approx(vector, abs=1e-6)

    # Without encoding_format the client asks for base64 and decodes it itself.
    implicit = openai_client.embeddings.create(model="emb", input=INPUTS)
    for item, vector in zip(implicit.data, native, strict=True):
        assert list(item.embedding) == pytest.approx(vector, abs=1e-6)

    cut = openai_client.embeddings.create(model="emb", input=INPUTS[0], dimensions=8, encoding_format="float")
    assert cut.data[0].embedding == pytest.approx(
        client.embed(model="emb", input=INPUTS[0], dimensions=8).embeddings[0], abs=1e-9
    )


# -- chat and embeddings in one daemon --------------------------------------------------------------------


def test_chat_after_hidden_layer_runs_feeds_the_whole_prompt_then_reuses_its_prefix_again(
    client: ollama.Client, family_daemon: Daemon
) -> None:
    """Proves: a chat model also embeds (hidden-layer mode on a completion model); a conversation that
    continues after hidden-layer runs on its model is answered correctly with its whole prompt fed (the
    runtime dropped its KV cache for the hidden-layer run, so no earlier prefix may be trusted); the turn
    after that reuses the KV prefix again (families D-F; C has no keep_history); and a chat after an
    embedding-only model was used works too.

    One RKLLM session does both (no reload to switch, which takes seconds on a board): the runner that
    chatted is the one that embeds. RkllmSession.embed resets its KV bookkeeping; without that reset turn 2
    would be fed only its new suffix."""
    turn1 = [{"role": "user", "content": "Tell me a story."}]
    reply = client.chat("chat", messages=turn1)
    assert reply.message.content == CHAT_REPLY
    assert reply.prompt_eval_count == chat_prompt_tokens(turn1)
    runners = family_daemon.runner_pids()

    embedded = client.embed(model="chat", input=["alpha", "Tell me a story."])
    assert family_daemon.runner_pids() == runners  # embedded in the same runner, not a reloaded one
    assert embedded.embeddings == [
        pytest.approx(unit(expected_vector(text)), abs=1e-6) for text in ("alpha", "Tell me a story.")
    ]

    turn2 = [*turn1, {"role": "assistant", "content": CHAT_REPLY}, {"role": "user", "content": "Another."}]
    reply = client.chat("chat", messages=turn2)
    assert reply.message.content == CHAT_REPLY
    assert reply.prompt_eval_count == chat_prompt_tokens(turn2)
    assert family_daemon.runner_pids() == runners

    turn3 = [*turn2, {"role": "assistant", "content": CHAT_REPLY}, {"role": "user", "content": "More."}]
    reply = client.chat("chat", messages=turn3)
    assert reply.message.content == CHAT_REPLY
    if family_daemon.family == "C":  # type: ignore[attr-defined]
        assert reply.prompt_eval_count == chat_prompt_tokens(turn3)
    else:
        # Only what follows turn 2's prompt, the reply generated for it and the end-of-turn token the model
        # sampled after it (held in the cache) is fed.
        new_tokens = chat_prompt_tokens(turn3) - chat_prompt_tokens(turn2) - len(CHAT_REPLY.encode()) - 1
        assert reply.prompt_eval_count == new_tokens

    assert client.embed(model="emb", input="beta").embeddings[0] == pytest.approx(
        unit(expected_vector("beta")), abs=1e-6
    )
    reply = client.chat("chat", messages=turn1)
    assert reply.message.content == CHAT_REPLY
    assert reply.prompt_eval_count == chat_prompt_tokens(turn1)


@pytest.mark.parametrize(
    ("path", "body", "error"),
    [
        ("/api/chat", {"messages": [{"role": "user", "content": "hi"}]}, '"emb" does not support chat'),
        ("/api/chat", {}, '"emb" does not support chat'),  # load-only too (conformance #25)
        ("/api/generate", {"prompt": "hi"}, '"emb" does not support generate'),
    ],
)
def test_an_embedding_model_refuses_to_chat(
    family_daemon: Daemon, path: str, body: dict[str, Any], error: str
) -> None:
    assert post(family_daemon, path, {"model": "emb", "stream": False, **body}) == (400, {"error": error})


def test_openai_chat_on_an_embedding_model_is_a_400(openai_client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        openai_client.chat.completions.create(model="emb", messages=[{"role": "user", "content": "hi"}])
    assert "does not support chat" in str(info.value)


# -- a runtime crash during a hidden-layer run -------------------------------------------------------------


def test_a_segfault_while_embedding_is_a_500_and_the_daemon_recovers(
    client: ollama.Client, openai_client: openai.OpenAI, family_daemon: Daemon
) -> None:
    status, body = post(family_daemon, "/api/embed", {"model": "emb-crash", "input": CRASH_INPUT})
    assert status == 500 and set(body) == {"error"}
    assert "SIGSEGV" in body["error"]
    assert client.embed(model="emb", input="alpha").embeddings[0] == pytest.approx(
        unit(expected_vector("alpha")), abs=1e-6
    )

    with pytest.raises(ollama.ResponseError) as info:
        client.embeddings(model="emb-crash", prompt=CRASH_INPUT)
    assert info.value.status_code == 500 and "SIGSEGV" in info.value.error
    with pytest.raises(openai.InternalServerError):
        openai_client.embeddings.create(model="emb-crash", input=CRASH_INPUT, encoding_format="float")

    assert client.chat("chat", messages=[{"role": "user", "content": "x"}]).message.content == CHAT_REPLY
    assert client.embed(model="emb", input=["alpha", "beta"]).prompt_eval_count == token_count(
        ["alpha", "beta"]
    )
    assert "killed by signal SIGSEGV" in family_daemon.log()
