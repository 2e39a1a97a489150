"""Hypothesis-generated `/api` bodies against a live daemon: whatever arrives, the answer is never a 5xx,
every error is Ollama's `{"error": "<message>"}`, and a 200 stream never carries an error line. The
daemon has its own store, so generated copies, deletes and creates touch nothing else. Generation is
kept short (num_predict is small or of a wrong type)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.conftest import make_gguf_model
from tests.support.daemon import Daemon
from tests.support.inprocess_daemon import InProcessDaemon
from tests.test_api_openai_fuzz import UTF8, json_values, texts

NASTY = st.sampled_from(
    [
        "",
        "../etc/passwd",
        "/abs",
        "a/b/c/d",
        "x:y:z",
        "missing",
        "a" * 300,
        "300",
        "soon",
        "xml",
        "loud",
        "\u0000",
    ]
)
faults = json_values | NASTY


def rarely_bad(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A valid value 29 times in 30, a fault otherwise: nested fields go wrong now and then too."""
    return st.integers(0, 29).flatmap(lambda n: faults if n == 0 else valid)


def one_fault(bodies: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[Any]:
    """Half the bodies as generated (most reach the model), half with one top-level field replaced by
    a fault (each probes one error path), and one in twenty not an object at all."""

    def spoil(body: dict[str, Any]) -> st.SearchStrategy[Any]:
        keys = sorted(body) or ["model"]
        spoiled = st.tuples(st.sampled_from(keys), faults).map(lambda kv: {**body, kv[0]: kv[1]})
        return st.just(body) | spoiled

    return st.integers(0, 19).flatmap(lambda n: json_values if n == 0 else bodies.flatmap(spoil))


names = rarely_bad(st.sampled_from(["tiny", "tiny:latest", "TINY", "tiny"]))
new_names = rarely_bad(st.sampled_from(["copy", "ns/copy:v1", "Copy:Two", "tiny"]))
options = st.fixed_dictionaries(
    {"num_predict": rarely_bad(st.integers(1, 3))},  # never unlimited: that is slow, not more thorough
    optional={
        "temperature": rarely_bad(st.floats(0, 2)),
        "top_k": rarely_bad(st.integers(-1, 50)),
        "top_p": rarely_bad(st.floats(0, 1)),
        "min_p": rarely_bad(st.floats(0, 1)),
        "repeat_penalty": rarely_bad(st.floats(0, 2)),
        "seed": rarely_bad(st.integers(-5, 2**33)),
        "stop": rarely_bad(st.text(UTF8, max_size=3) | st.lists(st.text(UTF8, max_size=3), max_size=2)),
        "num_ctx": rarely_bad(st.sampled_from([64, 2048, 10**9, 0, -1])),
        "unknown_key": json_values,
    },
)
keep_alive = rarely_bad(st.sampled_from(["5m", "1h30m", 0, -1, 30, 1.5, None]))
formats = rarely_bad(st.sampled_from(["json", "", {"type": "object"}, {"type": "array", "items": {}}]))
# The tiny model cannot think or see: True, levels and images are 400s, so they come now and then.
think = rarely_bad(st.just(False)) | st.integers(0, 9).flatmap(
    lambda n: st.sampled_from([True, "high", "low"]) if n == 0 else st.just(False)
)
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
tool_calls = st.lists(
    st.fixed_dictionaries(
        {"function": st.fixed_dictionaries({"name": texts, "arguments": rarely_bad(st.just({"a": 1}))})}
    ),
    max_size=2,
)
messages = rarely_bad(
    st.lists(
        rarely_bad(
            st.fixed_dictionaries(
                {
                    "role": rarely_bad(st.sampled_from(["user", "user", "system", "assistant", "tool"])),
                    "content": rarely_bad(st.text(UTF8, max_size=20)),
                },
                optional={
                    "images": rarely_bad(st.just([])),
                    "tool_calls": rarely_bad(tool_calls),
                    "thinking": rarely_bad(texts),
                    "tool_name": rarely_bad(texts),
                },
            )
        ),
        min_size=1,
        max_size=3,
    )
)
generation = {
    "stream": rarely_bad(st.booleans()),
    "keep_alive": keep_alive,
    "format": formats,
    "think": think,
}
chat_bodies = st.fixed_dictionaries(
    {"model": names, "messages": messages, "options": options},
    optional={**generation, "tools": rarely_bad(st.lists(st.just(TOOL), max_size=2))},
)
generate_bodies = st.fixed_dictionaries(
    {"model": names, "prompt": rarely_bad(st.text(UTF8, max_size=20)), "options": options},
    optional={
        **generation,
        "system": rarely_bad(texts),
        "template": rarely_bad(st.sampled_from(["{{ .Prompt }}", "{{ broken"])),
        "raw": rarely_bad(st.booleans()),
        "context": rarely_bad(st.lists(st.integers(-(2**31), 2**31), max_size=4)),
        "images": rarely_bad(st.lists(st.just("aGVsbG8="), max_size=1)),
    },
)
embed_bodies = st.fixed_dictionaries(
    {"model": names},
    optional={
        "input": rarely_bad(st.text(UTF8, max_size=20) | st.lists(st.text(UTF8, max_size=10), max_size=3)),
        "truncate": rarely_bad(st.booleans()),
        "dimensions": rarely_bad(st.integers(-2, 80)),
        "keep_alive": keep_alive,
        "options": rarely_bad(
            st.fixed_dictionaries({}, optional={"num_ctx": st.sampled_from([8, 64, 4096])})
        ),
    },
)
embeddings_bodies = st.fixed_dictionaries(
    {"model": names}, optional={"prompt": rarely_bad(st.text(UTF8, max_size=20)), "keep_alive": keep_alive}
)
show_bodies = st.fixed_dictionaries({"model": names}, optional={"verbose": rarely_bad(st.booleans())})
copy_bodies = st.fixed_dictionaries({"source": names, "destination": new_names})
delete_bodies = st.fixed_dictionaries(
    {"model": rarely_bad(st.sampled_from(["copy", "ns/copy:v1", "Copy:Two"]))}
)
create_bodies = st.fixed_dictionaries(
    {"model": new_names, "from": names},
    optional={
        "files": rarely_bad(
            st.dictionaries(
                st.sampled_from(["m.gguf", "../x.gguf", "/abs.gguf"]), st.just("sha256:" + "0" * 64)
            )
        ),
        "system": rarely_bad(texts),
        "template": rarely_bad(texts),
        "parameters": rarely_bad(
            st.fixed_dictionaries(
                {}, optional={"temperature": st.floats(0, 2), "num_ctx": st.integers(1, 8192)}
            )
        ),
        "messages": messages,
        "stream": rarely_bad(st.booleans()),
    },
)


@pytest.fixture(scope="module")
def fuzz_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    store = tmp_path_factory.mktemp("fuzz") / "models"
    make_gguf_model(store, "tiny", context_length=4096)
    with InProcessDaemon(store).start() as server:
        yield server


def assert_served(served: Daemon, path: str, body: Any, method: str = "POST") -> None:
    reply = served.request(method, path, body)
    event(f"status {reply.status}")
    assert reply.status < 500, (reply.status, reply.body[:500])
    if reply.status >= 400:
        error = json.loads(reply.body)["error"]
        assert isinstance(error, str) and error, reply.body
        return
    for line in reply.body.splitlines():  # a stream (or one object): no error in a 200
        if line.strip():
            assert "error" not in json.loads(line), (body, line)


def assert_store_contained(served: Daemon) -> None:
    store = served.models_dir
    assert not (store.parent / "escape").exists() and not Path("/abs").exists()
    assert not any(p.name.startswith(".create-") for p in store.iterdir())  # no partial model visible


FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize(
    ("path", "bodies"),
    [
        ("/api/chat", chat_bodies),
        ("/api/generate", generate_bodies),
        ("/api/embed", embed_bodies),
        ("/api/embeddings", embeddings_bodies),
        ("/api/show", show_bodies),
    ],
    ids=["chat", "generate", "embed", "embeddings", "show"],
)
@FUZZ
@given(data=st.data())
def test_never_5xx(
    fuzz_daemon: Daemon, path: str, bodies: st.SearchStrategy[Any], data: st.DataObject
) -> None:
    assert_served(fuzz_daemon, path, data.draw(one_fault(bodies), label="body"))


@FUZZ
@given(copy=one_fault(copy_bodies), delete=one_fault(delete_bodies))
def test_copy_and_delete_never_5xx_and_stay_in_the_store(fuzz_daemon: Daemon, copy: Any, delete: Any) -> None:
    assert_served(fuzz_daemon, "/api/copy", copy)
    assert_served(fuzz_daemon, "/api/delete", delete, method="DELETE")
    assert_store_contained(fuzz_daemon)


@FUZZ
@given(body=one_fault(create_bodies))
def test_create_never_5xx_and_stays_in_the_store(fuzz_daemon: Daemon, body: Any) -> None:
    assert_served(fuzz_daemon, "/api/create", body)
    assert_store_contained(fuzz_daemon)
