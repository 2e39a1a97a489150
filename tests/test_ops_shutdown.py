"""The serve loop under systemd: the notify protocol over a real socket, and SIGTERM during a stream."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from rkllama_ollama.api import wire
from rkllama_ollama.api.shutdown import SHUTDOWN_MESSAGE, InFlightRequests
from rkllama_ollama.notify import Notifier
from tests.rkllm_support.sim import add_sim_model, build_simulators
from tests.support.daemon import child_pids, free_port

LONG_REPLY = "lorem ipsum " * 2000  # 24000 bytes at 5 ms each: minutes, unless something stops it


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    yield sock, path
    sock.close()


def sim_store(root: Path) -> Path:
    store = root / "models"
    add_sim_model(store, "slow", reply=LONG_REPLY, token_delay_ms=5)
    return store


def start_daemon(store: Path, port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    full_env = {
        **os.environ,
        "RKLLAMA_EMBEDDED_MODEL": "0",
        "RKLLAMA_HOST": f"127.0.0.1:{port}",
        "RKLLAMA_MODELS": str(store),
        "RKLLAMA_RKLLM_LIB": str(build_simulators()["F"]),
        **env,
    }
    full_env.pop("OLLAMA_HOST", None)
    log = open(store.parent / "daemon.log", "wb")  # noqa: SIM115 - the child keeps it
    return subprocess.Popen(
        [sys.executable, "-m", "rkllama_ollama.cli", "serve"],
        env=full_env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def receive(sock: socket.socket, timeout: float) -> dict[str, str]:
    sock.settimeout(timeout)
    data = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.splitlines() if "=" in line)


def port_answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return True
    except OSError:
        return False


def open_stream(port: int, model: str) -> socket.socket:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "go"}]}).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(
        b"POST /api/chat HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    return sock


def read_until(sock: socket.socket, marker: bytes, limit: int = 1 << 20) -> bytes:
    data = b""
    while marker not in data and len(data) < limit:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def ndjson_lines(raw: bytes) -> list[dict]:
    """The JSON objects of a chunked NDJSON body (chunk-size lines are not JSON objects)."""
    lines = []
    for line in raw.split(b"\r\n\r\n", 1)[1].splitlines():
        line = line.strip()
        if line.startswith(b"{"):
            lines.append(json.loads(line))
    return lines


def test_notifier_speaks_the_datagram_protocol(notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "3000000"})
    assert notifier.enabled and notifier.watchdog_interval_s == pytest.approx(1.5)
    assert notifier.ready("up")
    assert receive(sock, 5) == {"READY": "1", "MAINPID": str(os.getpid()), "STATUS": "up"}
    assert notifier.watchdog()
    assert receive(sock, 5) == {"WATCHDOG": "1"}
    assert notifier.stopping()
    assert receive(sock, 5) == {"STOPPING": "1"}


def test_notifier_abstract_socket_and_no_socket() -> None:
    name = f"rkllama-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).send("READY=1")
        assert receive(sock, 5) == {"READY": "1"}
    silent = Notifier({})
    assert not silent.enabled and not silent.ready() and silent.watchdog_interval_s is None
    assert (
        Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"}).watchdog_interval_s
        is None
    )


def test_ready_after_bind_then_watchdog_then_stopping(
    tmp_path: Path, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, path = notify_socket
    port = free_port()
    process = start_daemon(sim_store(tmp_path), port, {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})
    try:
        ready = receive(sock, 30)
        assert ready.get("READY") == "1", ready
        assert port_answers(port)  # READY=1 is only sent once the port is bound
        assert ready["MAINPID"] == str(process.pid)
        assert receive(sock, 10) == {"WATCHDOG": "1"}
        process.send_signal(signal.SIGTERM)
        while (message := receive(sock, 10)).get("WATCHDOG"):
            pass
        assert message.get("STOPPING") == "1", message
        assert process.wait(10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_sigterm_during_a_stream_ends_it_with_an_error_line(tmp_path: Path) -> None:
    port = free_port()
    store = sim_store(tmp_path)
    process = start_daemon(store, port, {})
    try:
        deadline = time.monotonic() + 30
        while not port_answers(port):
            assert process.poll() is None and time.monotonic() < deadline, (
                store.parent / "daemon.log"
            ).read_text()
            time.sleep(0.05)
        stream = open_stream(port, "slow")
        head = read_until(stream, b'"done":false')  # generating: the runner is up and streaming
        assert b"200 OK" in head
        runners = child_pids(process.pid)
        assert runners
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        rest = read_until(stream, b"0\r\n\r\n")  # the chunked body ends properly
        stream.close()
        process.wait(10)  # a hang guard, not a measurement: the goal is <= 5 s
        exited_after = time.monotonic() - signalled
        lines = ndjson_lines(head + rest)
        assert lines[-1] == {"error": "server is shutting down"}, lines[-3:]
        assert all("error" not in line for line in lines[:-1])
        assert exited_after <= 5.0 + 5.0  # generous: a hang guard on a shared machine
        assert process.returncode == 0
        for pid in runners:
            assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid), f"runner {pid} left behind"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except (FileNotFoundError, IndexError):
        return True


# -- in process: the last word in each wire format --------------------------------------------


async def test_end_all_gives_sse_ndjson_and_unstarted_requests_a_last_word(aiohttp_client: Any) -> None:
    in_flight = InFlightRequests()
    started = asyncio.Event()

    async def sse(request: web.Request) -> web.StreamResponse:
        out = wire.sse_stream(request)
        await out.send({"delta": "a"})
        started.set()
        await asyncio.sleep(3600)
        return await out.finish()

    async def ndjson(request: web.Request) -> web.StreamResponse:
        out = wire.ndjson_stream(request)
        await out.send({"response": "a", "done": False})
        started.set()
        await asyncio.sleep(3600)
        return await out.finish()

    async def waiting(request: web.Request) -> web.StreamResponse:
        started.set()
        await asyncio.sleep(3600)
        return web.Response(text="never")

    app = web.Application(middlewares=[in_flight.middleware])
    in_flight.install(app)
    app.router.add_post("/v1/chat/completions", sse)
    app.router.add_post("/api/generate", ndjson)
    app.router.add_get("/api/tags", waiting)
    client = await aiohttp_client(app)
    for method, path in (("POST", "/v1/chat/completions"), ("POST", "/api/generate"), ("GET", "/api/tags")):
        started.clear()
        request = asyncio.ensure_future(client.request(method, path))
        await started.wait()
        assert len(in_flight) == 1
        await in_flight.end_all(grace_s=5)
        response = await request
        body = await response.read()
        if path.startswith("/v1/"):
            assert body.endswith(
                b'data: {"error":{"message":"server is shutting down","type":"api_error",'
                b'"param":null,"code":null}}\n\n'
            ), body
        elif path == "/api/generate":
            assert body.splitlines()[-1] == b'{"error":"server is shutting down"}', body
        else:
            assert response.status == 503 and await response.json() == {"error": SHUTDOWN_MESSAGE}
        assert len(in_flight) == 0


async def test_a_client_that_leaves_is_not_treated_as_shutdown(aiohttp_client: Any) -> None:
    in_flight = InFlightRequests()
    cancelled = asyncio.Event()
    started = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return web.Response()

    outcome: list[str] = []

    @web.middleware
    async def outer(request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            response = await handler(request)
        except asyncio.CancelledError:
            outcome.append("cancelled")
            raise
        outcome.append(f"answered {response.status}")
        return response

    app = web.Application(middlewares=[outer, in_flight.middleware])
    app.router.add_get("/slow", slow)
    client = await aiohttp_client(app, server_kwargs={"handler_cancellation": True})
    request = asyncio.ensure_future(client.get("/slow"))
    await started.wait()
    request.cancel()
    await asyncio.wait_for(cancelled.wait(), 10)
    for _ in range(100):
        if outcome:
            break
        await asyncio.sleep(0.01)
    assert outcome == ["cancelled"]  # the disconnect propagates; no shutdown line is written
    assert len(in_flight) == 0


def test_a_port_in_use_is_one_clear_line_and_exit_1(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = start_daemon(sim_store(tmp_path), port, {})
        assert process.wait(30) == 1
    log = (tmp_path / "daemon.log").read_text()
    assert f"cannot listen on 127.0.0.1:{port}" in log and "Traceback" not in log
