"""`/api/embed` and `/api/embeddings` against a live daemon, with the real `ollama` client.

Models: `emb`, a tiny GGUF that presents itself as an embedding model (mean pooling, 512-token context),
and `tiny`, the chat model, to prove a session switches between generation and embedding modes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ollama
import pytest

from tests.conftest import make_gguf_model
from tests.support.daemon import Daemon
from tests.support.inprocess_daemon import InProcessDaemon
from tests.support.tiny_gguf import N_EMBD, write_tiny_gguf

LONG_TEXT = "hello world " * 600  # well over the 512-token context of `emb`


def http(daemon: Daemon, path: str, body: Any) -> tuple[int, dict[str, Any]]:
    reply = daemon.request("POST", path, body)
    return reply.status, reply.json()


def norm(vector: list[float]) -> float:
    return math.sqrt(sum(value * value for value in vector))


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    store = tmp_path_factory.mktemp("embed") / "models"
    (store / "emb").mkdir(parents=True)
    write_tiny_gguf(store / "emb" / "emb.gguf", embedding=True)
    make_gguf_model(store, "tiny")
    with InProcessDaemon(Path(store)).start() as server:
        yield server


@pytest.fixture(scope="module")
def client(daemon: Daemon) -> ollama.Client:
    return ollama.Client(host=daemon.url)


def test_embed_returns_one_unit_vector_per_input(client: ollama.Client) -> None:
    """Proves: string and list inputs, L2 normalisation, model echoed, metrics present."""
    single = client.embed(model="emb", input="hello world")
    assert single.model == "emb"
    assert len(single.embeddings) == 1 and len(single.embeddings[0]) == N_EMBD
    assert norm(single.embeddings[0]) == pytest.approx(1.0, abs=1e-6)
    assert single.prompt_eval_count and single.prompt_eval_count > 0
    assert single.total_duration and single.total_duration > 0
    batch = client.embed(model="emb", input=["hello world", "the water is long"])
    assert len(batch.embeddings) == 2
    assert batch.embeddings[0] == pytest.approx(single.embeddings[0], abs=1e-5)
    assert batch.embeddings[0] != pytest.approx(batch.embeddings[1], abs=1e-3)


def test_embed_dimensions_truncates_then_renormalises(client: ollama.Client) -> None:
    full = client.embed(model="emb", input="hello world").embeddings[0]
    cut = client.embed(model="emb", input="hello world", dimensions=8).embeddings[0]
    assert len(cut) == 8
    assert norm(cut) == pytest.approx(1.0, abs=1e-6)
    scale = norm(full[:8])
    assert cut == pytest.approx([value / scale for value in full[:8]], abs=1e-5)


@pytest.mark.parametrize("empty", ["", []])
def test_embed_empty_input_gives_an_empty_list(daemon: Daemon, empty: Any) -> None:
    status, body = http(daemon, "/api/embed", {"model": "emb", "input": empty})
    assert (status, body) == (200, {"model": "emb", "embeddings": []})


def test_embed_too_long_input(client: ollama.Client, daemon: Daemon) -> None:
    """Proves: truncate:false refuses with Ollama's wording; the default truncates silently."""
    status, body = http(daemon, "/api/embed", {"model": "emb", "input": LONG_TEXT, "truncate": False})
    assert (status, body) == (400, {"error": "the input length exceeds the context length"})
    truncated = client.embed(model="emb", input=LONG_TEXT)
    assert norm(truncated.embeddings[0]) == pytest.approx(1.0, abs=1e-6)
    assert truncated.prompt_eval_count == 512


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        ({"model": "emb", "input": 3}, 400, "invalid input type"),
        ({"model": "emb", "input": ["a", 1]}, 400, "invalid input type"),
        ({"input": "x"}, 400, "model is required"),
        ({"model": "nope", "input": "x"}, 404, 'model "nope" not found, try pulling it first'),
        ({"model": "emb", "input": "x", "dimensions": 0}, 400, "dimensions must be greater than 0"),
        ({"model": "emb", "input": "x", "truncate": "yes"}, 400, '"truncate" must be a boolean'),
    ],
)
def test_embed_bad_requests(daemon: Daemon, body: dict[str, Any], status: int, error: str) -> None:
    assert http(daemon, "/api/embed", body) == (status, {"error": error})


def test_legacy_embeddings_are_raw_vectors(client: ollama.Client) -> None:
    """Proves: /api/embeddings is the same direction as /api/embed but not normalised."""
    raw = client.embeddings(model="emb", prompt="hello world").embedding
    unit = client.embed(model="emb", input="hello world").embeddings[0]
    assert len(raw) == N_EMBD
    assert norm(raw) != pytest.approx(1.0, abs=1e-3)
    assert [value / norm(raw) for value in raw] == pytest.approx(unit, abs=1e-5)


def test_legacy_embeddings_edge_cases(daemon: Daemon) -> None:
    assert http(daemon, "/api/embeddings", {"model": "emb", "prompt": ""}) == (200, {"embedding": []})
    assert http(daemon, "/api/embeddings", {"prompt": "x"}) == (400, {"error": "model is required"})
    assert http(daemon, "/api/embeddings", {"model": "nope", "prompt": "x"}) == (
        404,
        {"error": 'model "nope" not found, try pulling it first'},
    )


def test_chat_model_switches_between_generation_and_embedding(client: ollama.Client) -> None:
    """Proves: one model reloads between modes in both directions and both keep working."""
    options = {"num_predict": 4, "seed": 1, "temperature": 0}
    assert client.generate(model="tiny", prompt="hello", options=options).done
    vector = client.embed(model="tiny", input="hello world").embeddings[0]
    assert norm(vector) == pytest.approx(1.0, abs=1e-6)
    assert client.generate(model="tiny", prompt="hello", options=options).done
