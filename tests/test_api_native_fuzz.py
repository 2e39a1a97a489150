"""Hypothesis-generated bodies for RKLLama's native API on a live daemon of its own: never a 5xx, every
error is `{"error": "<message>"}`, a 200 stream carries no error object, nothing leaves the store."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.conftest import make_gguf_model
from tests.support.daemon import Daemon
from tests.support.inprocess_daemon import InProcessDaemon
from tests.test_api_ollama_fuzz import messages, one_fault, rarely_bad

names = rarely_bad(st.sampled_from(["tiny", "tiny:latest", "TINY"]))
generate_bodies = st.fixed_dictionaries(
    {"model": names, "messages": messages}, optional={"stream": rarely_bad(st.booleans())}
)
load_bodies = st.fixed_dictionaries({"model_name": names})
remove_bodies = st.fixed_dictionaries({"model": rarely_bad(st.sampled_from(["gone", "../x", "tiny2"]))})


@pytest.fixture(scope="module")
def native_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    store = tmp_path_factory.mktemp("native-fuzz") / "models"
    make_gguf_model(store, "tiny")
    make_gguf_model(store, "tiny2")
    # Replies stay short: the native API takes no options, so the Modelfile context bounds them.
    with InProcessDaemon(store, env={"RKLLAMA_CONTEXT_LENGTH": "256"}).start() as server:
        yield server


def assert_served(served: Daemon, method: str, path: str, body: Any) -> None:
    reply = served.request(method, path, body)
    event(f"status {reply.status}")
    assert reply.status < 500, (reply.status, reply.body[:300])
    if reply.status >= 400:
        error = json.loads(reply.body)["error"]
        assert isinstance(error, str) and error
        return
    for block in reply.body.split(b"\n\n"):  # the seed's framing: JSON objects separated by blank lines
        for line in block.splitlines():
            if line.strip():
                assert "error" not in json.loads(line), line


FUZZ = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize(
    ("method", "path", "bodies"),
    [
        ("POST", "/generate", generate_bodies),
        ("POST", "/load_model", load_bodies),
        ("POST", "/unload_model", st.just({})),
        ("DELETE", "/rm", remove_bodies),
    ],
    ids=["generate", "load_model", "unload_model", "rm"],
)
@FUZZ
@given(data=st.data())
def test_never_5xx(
    native_daemon: Daemon, method: str, path: str, bodies: st.SearchStrategy[Any], data: st.DataObject
) -> None:
    assert_served(native_daemon, method, path, data.draw(one_fault(bodies), label="body"))
    assert (native_daemon.models_dir / "tiny").is_dir()  # the fuzzed names never reach the real model
