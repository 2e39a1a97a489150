"""Faults: a client that vanishes mid-stream and a full queue (in-process daemon), a runner process that
dies mid-generation (live daemon: only a real child process can be killed)."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import ollama
import pytest

from tests.conftest import make_gguf_model
from tests.support.daemon import Daemon
from tests.support.inprocess_daemon import InProcessDaemon

LONG = {"num_predict": 20000, "num_ctx": 32768, "seed": 3, "temperature": 1.0}


def tiny_store(root: Path) -> Path:
    store = root / "models"
    make_gguf_model(store, "tiny", context_length=32768)
    return store


# A long default context: a request without options (the native API's) runs long enough to be left.
LONG_DEFAULT = {"RKLLAMA_CONTEXT_LENGTH": "32768"}


@pytest.fixture
def own_daemon(tmp_path: Path) -> Iterator[Daemon]:
    with InProcessDaemon(tiny_store(tmp_path), env=LONG_DEFAULT).start() as server:
        yield server


@pytest.fixture
def live_daemon(tmp_path: Path) -> Iterator[Daemon]:
    with Daemon(tiny_store(tmp_path), env=LONG_DEFAULT).start() as server:
        yield server


GO_ON = [{"role": "user", "content": "go on"}]


@pytest.mark.parametrize(
    ("path", "body", "until"),
    [
        ("/api/generate", {"model": "tiny", "prompt": "go on", "options": LONG}, b'"done":false'),
        (
            "/v1/chat/completions",
            {"model": "tiny", "messages": GO_ON, "stream": True, "max_tokens": 20000, "seed": 3},
            b'"content"',
        ),
        (
            "/v1/completions",
            {"model": "tiny", "prompt": "go", "stream": True, "max_tokens": 20000},
            b'"text"',
        ),
        ("/generate", {"model": "tiny", "messages": GO_ON, "stream": True}, b'"token"'),
    ],
    ids=["ollama-generate", "openai-chat", "openai-completions", "native-generate"],
)
def test_a_client_that_leaves_any_face_mid_stream_frees_the_session(
    own_daemon: Daemon, path: str, body: dict[str, object], until: bytes
) -> None:
    sock, _ = own_daemon.open_stream(path, body, until)
    sock.close()
    reply = ollama.Client(host=own_daemon.url).generate("tiny", prompt="next", options={"num_predict": 3})
    assert reply.done and reply.eval_count == 3
    ended = own_daemon.ended_generations()
    assert ended[0][0] == "abort" and ended[-1] == ("length", 3)


def test_a_client_that_disconnects_frees_the_session(own_daemon: Daemon) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "go on"}], "options": LONG}
    sock, _ = own_daemon.open_stream("/api/chat", body)
    sock.close()
    # The next request gets the session; the abandoned one was stopped, not run to its 20000 tokens.
    reply = ollama.Client(host=own_daemon.url).chat(
        "tiny", messages=[{"role": "user", "content": "next"}], options={"num_predict": 4, "num_ctx": 32768}
    )
    assert reply.done and reply.eval_count == 4
    ended = own_daemon.ended_generations()
    assert ended[0][0] == "abort" and ended[0][1] < LONG["num_predict"]
    assert ended[-1] == ("length", 4)


def test_killing_the_runner_mid_generation_is_an_error_line_then_recovery(live_daemon: Daemon) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "go on"}], "options": LONG}
    sock, received = live_daemon.open_stream("/api/chat", body)
    runners = live_daemon.runner_pids()
    assert len(runners) == 1
    os.kill(runners[0], signal.SIGKILL)
    sock.settimeout(60)
    while not received.endswith(b"0\r\n\r\n"):  # the end of the chunked body
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
    sock.close()
    lines = [line for line in received.split(b"\r\n") if line.startswith(b"{")]
    last = json.loads(lines[-1])
    assert "error" in last and "runner" in last["error"] and "SIGKILL" in last["error"]
    assert live_daemon.process is not None and live_daemon.process.poll() is None
    client = ollama.Client(host=live_daemon.url)
    reply = client.chat("tiny", messages=[{"role": "user", "content": "again"}], options={"num_predict": 3})
    assert reply.done and reply.eval_count == 3
    assert len(live_daemon.runner_pids()) == 1 and live_daemon.runner_pids() != runners


def test_a_full_queue_is_503_with_retry_after_in_both_faces(tmp_path: Path) -> None:
    store = tmp_path / "models"
    make_gguf_model(store, "tiny", context_length=32768)
    with InProcessDaemon(store, env={"RKLLAMA_MAX_QUEUE": "1"}).start() as server:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "go on"}], "options": LONG}
        sock, _ = server.open_stream("/api/chat", body)  # holds the session
        queued = {"model": "tiny", "prompt": "x", "stream": False, "options": {"num_predict": 2}}
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(server.request, "POST", "/api/generate", queued)  # fills the queue
            deadline = time.monotonic() + 30
            while (
                time.monotonic() < deadline
                and "rkllama_queue_depth 1.0" not in server.request("GET", "/metrics").body.decode()
            ):
                time.sleep(0.02)
            refused = urllib.request.Request(
                server.url + "/api/chat", data=json.dumps({**body, "stream": False}).encode(), method="POST"
            )
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(refused, timeout=60)
            assert info.value.code == 503 and info.value.headers["Retry-After"] == "1"
            assert json.loads(info.value.read()) == {
                "error": "server busy, please try again.  maximum pending requests exceeded"
            }
            openai_body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}]}
            reply = server.request("POST", "/v1/chat/completions", openai_body)
            assert reply.status == 503 and reply.json()["error"]["type"] == "api_error"
            sock.close()  # the held stream goes away; the queued request gets its turn
            assert waiting.result(timeout=60).status == 200
