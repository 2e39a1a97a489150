"""Faults on a live daemon: a client that vanishes mid-stream, a runner that dies mid-generation."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import ollama
import pytest

from tests.conftest import make_gguf_model
from tests.support.daemon import Daemon

LONG = {"num_predict": 20000, "num_ctx": 32768, "seed": 3, "temperature": 1.0}


@pytest.fixture
def own_daemon(tmp_path: Path) -> Iterator[Daemon]:
    store = tmp_path / "models"
    make_gguf_model(store, "tiny", context_length=32768)
    server = Daemon(store).start()
    yield server
    server.stop()


def open_stream(daemon: Daemon, body: dict) -> tuple[socket.socket, bytes]:
    """Send a streaming request by hand and read until the first NDJSON line has arrived."""
    sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=60)
    payload = json.dumps(body).encode()
    sock.sendall(
        b"POST /api/chat HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    received = b""
    while b'"done":false' not in received:
        chunk = sock.recv(65536)
        assert chunk, "connection closed before the first token"
        received += chunk
    return sock, received


def ended_generations(daemon: Daemon) -> list[tuple[str, int]]:
    return [
        (m[0], int(m[1]))
        for m in re.findall(r"ended: (\w+), \d+ prompt tokens fed, (\d+) generated", daemon.log())
    ]


def test_a_client_that_disconnects_frees_the_session(own_daemon: Daemon) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "go on"}], "options": LONG}
    sock, _ = open_stream(own_daemon, body)
    sock.close()
    # The next request gets the session; the abandoned one was stopped, not run to its 20000 tokens.
    reply = ollama.Client(host=own_daemon.url).chat(
        "tiny", messages=[{"role": "user", "content": "next"}], options={"num_predict": 4, "num_ctx": 32768}
    )
    assert reply.done and reply.eval_count == 4
    ended = ended_generations(own_daemon)
    assert ended[0][0] == "abort" and ended[0][1] < LONG["num_predict"]
    assert ended[-1] == ("length", 4)


def test_killing_the_runner_mid_generation_is_an_error_line_then_recovery(own_daemon: Daemon) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "go on"}], "options": LONG}
    sock, received = open_stream(own_daemon, body)
    runners = own_daemon.runner_pids()
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
    assert own_daemon.process is not None and own_daemon.process.poll() is None
    client = ollama.Client(host=own_daemon.url)
    reply = client.chat("tiny", messages=[{"role": "user", "content": "again"}], options={"num_predict": 3})
    assert reply.done and reply.eval_count == 3
    assert len(own_daemon.runner_pids()) == 1 and own_daemon.runner_pids() != runners
