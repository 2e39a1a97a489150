"""The seed's native API (RKLLama's own endpoints, as its CLI and exo-rkllama call them), over raw HTTP.

One test-local store and daemon: the native API loads, unloads and deletes, which would disturb the
shared `daemon` fixture. Words are never asserted (the model is a tiny random GGUF).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import make_gguf_model
from tests.support.daemon import Daemon
from tests.support.inprocess_daemon import InProcessDaemon

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]


def http(daemon: Daemon, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
    reply = daemon.request(method, path, body)
    return reply.status, reply.body


def stream_objects(payload: bytes) -> list[dict[str, Any]]:
    """The seed's framing: every object is followed by exactly one blank line."""
    text = payload.decode()
    assert text.endswith("\n\n")
    parts = text[:-2].split("\n\n")
    assert all(part and "\n" not in part for part in parts)
    return [json.loads(part) for part in parts]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    store = tmp_path_factory.mktemp("native") / "models"
    # The seed's /generate has no options: the Modelfile bounds the replies of the random model.
    for name in ("Qwen2.5-1.5B-Instruct", "second", "to-remove"):
        make_gguf_model(store, name, max_new_tokens=48)
    with InProcessDaemon(Path(store)).start() as server:
        yield server


def test_health_and_models(daemon: Daemon) -> None:
    assert http(daemon, "GET", "/") == (200, b"Ollama is running")
    status, body = http(daemon, "GET", "/models")
    assert status == 200
    assert set(json.loads(body)["models"]) >= {"Qwen2.5-1.5B-Instruct", "second"}


def test_load_current_generate_unload_cycle(daemon: Daemon) -> None:
    """Proves exo-rkllama's contract: current_model 404 when idle, unknown fields ignored, no-body unload."""
    http(daemon, "POST", "/unload_model")
    status, body = http(daemon, "GET", "/current_model")
    assert status == 404 and "error" in json.loads(body)
    status, body = http(
        daemon, "POST", "/load_model", {"model_name": "Qwen2.5-1.5B-Instruct", "core_mask": "0x0f"}
    )
    assert status == 200, body
    assert http(daemon, "POST", "/load_model", {"model_name": "Qwen2.5-1.5B-Instruct"})[0] == 200
    status, body = http(daemon, "GET", "/current_model")
    assert (status, json.loads(body)) == (200, {"model_name": "Qwen2.5-1.5B-Instruct"})
    status, body = http(daemon, "POST", "/generate", {"messages": MESSAGES, "stream": False})
    assert status == 200, body
    assert http(daemon, "POST", "/unload_model")[0] == 200
    assert http(daemon, "GET", "/current_model")[0] == 404
    assert http(daemon, "POST", "/unload_model")[0] == 200  # nothing loaded: still harmless


def test_generate_stream_in_the_seed_shape(daemon: Daemon) -> None:
    status, payload = http(
        daemon, "POST", "/generate", {"model": "second", "messages": MESSAGES, "stream": True}
    )
    assert status == 200
    objects = stream_objects(payload)
    *pieces, final = objects
    assert pieces, "at least one token before the final object"
    for piece in pieces:
        assert isinstance(piece["token"], str) and piece["thinking"] is False
        assert piece["choices"] == [{"role": "assistant", "content": piece["token"], "finish_reason": None}]
    assert final["token"] == "" and final["finish"] is True
    assert isinstance(final["tokens_per_second"], float) and final["tokens_per_second"] > 0
    assert final["choices"] == [{"role": "assistant", "content": "", "finish_reason": "stop"}]
    assert http(daemon, "GET", "/current_model")[1] == b'{"model_name":"second"}'


def test_generate_batch_in_the_seed_shape(daemon: Daemon) -> None:
    """Model omitted: the loaded one answers. The batch carries the seed's fields and exo's `choices`."""
    http(daemon, "POST", "/load_model", {"model_name": "second"})
    status, payload = http(daemon, "POST", "/generate", {"messages": MESSAGES, "stream": False, "extra": 1})
    assert status == 200
    reply = json.loads(payload)
    assert isinstance(reply["response"], str)
    assert reply["tokens_generated"] > 0 and reply["tokens_per_second"] > 0
    assert reply["choices"] == [{"role": "assistant", "content": reply["response"], "finish_reason": "stop"}]
    usage = reply["usage"]
    assert usage["completion_tokens"] == reply["tokens_generated"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", "/load_model", {"model_name": "ghost"}, 404),
        ("POST", "/load_model", {}, 400),
        ("POST", "/load_model", {"model_name": "../etc"}, 400),
        ("POST", "/generate", {"model": "ghost", "messages": MESSAGES}, 404),
        ("POST", "/generate", {"model": "second", "messages": []}, 400),
        ("POST", "/generate", {"model": "second", "messages": "hi"}, 400),
        ("DELETE", "/rm", {"model": "ghost"}, 404),
        ("DELETE", "/rm", {}, 400),
    ],
)
def test_bad_requests_get_an_error_body(
    daemon: Daemon, method: str, path: str, body: dict[str, Any], status: int
) -> None:
    got_status, payload = http(daemon, method, path, body)
    assert got_status == status
    assert isinstance(json.loads(payload)["error"], str)


def test_generate_without_a_loaded_model_is_a_clear_400(daemon: Daemon) -> None:
    http(daemon, "POST", "/unload_model")
    status, payload = http(daemon, "POST", "/generate", {"messages": MESSAGES})
    assert status == 400
    assert "load_model" in json.loads(payload)["error"]


def test_rm_deletes_like_api_delete(daemon: Daemon) -> None:
    http(daemon, "POST", "/load_model", {"model_name": "to-remove"})
    status, payload = http(daemon, "DELETE", "/rm", {"model": "to-remove"})
    assert status == 200, payload
    assert "to-remove" not in json.loads(http(daemon, "GET", "/models")[1])["models"]
    assert http(daemon, "GET", "/current_model")[0] == 404  # it was unloaded before being deleted
