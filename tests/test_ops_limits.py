"""Request bodies over RKLLAMA_MAX_BODY_MB: a 413 in each face's error shape, and the daemon serves on."""

from __future__ import annotations

from collections.abc import Iterator

import orjson
import pytest

from rkllama_ollama.config import ConfigError, settings_from_env
from tests.support.daemon import Daemon
from tests.support.inprocess_daemon import InProcessDaemon

TWO_MIB_OF_TEXT = "x" * (2 * 2**20)


@pytest.fixture(scope="module")
def small_limit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with InProcessDaemon(
        tmp_path_factory.mktemp("limits") / "models", env={"RKLLAMA_MAX_BODY_MB": "1"}
    ).start() as d:
        yield d


def big_chat(model: str = "whatever") -> bytes:
    return orjson.dumps({"model": model, "messages": [{"role": "user", "content": TWO_MIB_OF_TEXT}]})


def test_an_oversized_ollama_body_is_413_with_the_limit_named(small_limit: Daemon) -> None:
    reply = small_limit.request("POST", "/api/chat", raw=big_chat())
    assert reply.status == 413
    assert reply.error.startswith("request body too large: Maximum request body size 1048576 exceeded")


def test_an_oversized_openai_body_is_413_in_the_openai_envelope(small_limit: Daemon) -> None:
    reply = small_limit.request("POST", "/v1/chat/completions", raw=big_chat())
    assert reply.status == 413
    error = reply.json()["error"]
    assert error["message"].startswith("request body too large: Maximum request body size 1048576")
    assert error["type"] == "api_error"


def test_the_daemon_serves_on_after_an_oversized_body(small_limit: Daemon) -> None:
    assert small_limit.request("POST", "/api/chat", raw=big_chat()).status == 413
    small = small_limit.request("POST", "/api/chat", body={"model": "nope", "messages": []})
    assert small.status == 404 and "not found" in small.error


def test_the_limit_is_read_in_mib() -> None:
    assert settings_from_env({}).max_body_bytes == 64 * 2**20
    assert settings_from_env({"RKLLAMA_MAX_BODY_MB": "8"}).max_body_bytes == 8 * 2**20
    with pytest.raises(ConfigError, match="RKLLAMA_MAX_BODY_MB must be an integer"):
        settings_from_env({"RKLLAMA_MAX_BODY_MB": "lots"})
