"""What a router needs from each daemon: liveness never blocked by a busy model, readiness that tells
busy from down, 503 + Retry-After before any byte on every face, unbuffered streams, load gauges."""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ollama
import pytest
from aiohttp.test_utils import make_mocked_request
from prometheus_client.parser import text_string_to_metric_families

from rkllama_ollama.api.app import create_app
from rkllama_ollama.api.readiness import Readiness
from rkllama_ollama.config import Settings
from rkllama_ollama.scheduler import Scheduler
from tests.rkllm_support.sim import add_sim_model, build_simulators
from tests.support.daemon import Daemon
from tests.support.inprocess_runner import inprocess_runner_factory

LONG_REPLY = "lorem ipsum " * 1000  # 12000 tokens at 10 ms: far longer than the test, unless aborted


def gauges(text: str) -> dict[str, float]:
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.labels
    }


# -- in process -------------------------------------------------------------------------------


async def test_an_idle_daemon_is_ready_and_says_so(aiohttp_client: Any, tmp_path: Path) -> None:
    settings = Settings(models_dir=tmp_path, offer_embedded=False, max_queue=5)
    client = await aiohttp_client(create_app(settings))
    response = await client.get("/api/ready")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("application/json")
    assert await response.json() == {
        "status": "idle",
        "queue": 0,
        "max_queue": 5,
        "running": 0,
        "in_flight": 0,
        "loaded": [],
    }
    metrics = gauges(await (await client.get("/metrics")).text())
    assert metrics["rkllama_in_flight_requests"] == 0
    assert metrics["rkllama_queue_limit"] == 5
    assert metrics["rkllama_session_busy"] == 0


async def test_a_draining_daemon_is_not_ready() -> None:
    readiness = Readiness(Scheduler(runner_factory=inprocess_runner_factory(), keep_alive_s=300, max_queue=4))
    await readiness._on_shutdown(None)  # type: ignore[arg-type]  # the app is not used
    response = await readiness.handle(make_mocked_request("GET", "/api/ready"))
    assert response.status == 503
    assert json.loads(response.body)["status"] == "draining"  # type: ignore[arg-type]


# -- a real daemon with a long generation running -----------------------------------------------


@pytest.fixture(scope="module")
def busy_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    store = tmp_path_factory.mktemp("ready") / "models"
    add_sim_model(store, "slow", reply=LONG_REPLY, token_delay_ms=10)
    env = {"RKLLAMA_RKLLM_LIB": str(build_simulators()["F"]), "RKLLAMA_MAX_QUEUE": "1"}
    with Daemon(store, env=env).start() as daemon:
        yield daemon


def raw_request(
    daemon: Daemon, method: str, path: str, body: Any = None
) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body exactly as the daemon sent them."""
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=30)
    try:
        payload = None if body is None else json.dumps(body)
        conn.request(method, path, body=payload, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def ready(daemon: Daemon) -> dict[str, Any]:
    status, _, body = raw_request(daemon, "GET", "/api/ready")
    assert status == 200
    return json.loads(body)


def wait_for_queue(daemon: Daemon, depth: int) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        state = ready(daemon)
        if state["queue"] == depth:
            return state
        time.sleep(0.02)
    raise AssertionError(f"the queue never reached {depth}: {ready(daemon)}")


GENERATIONS = [  # every face that asks for the model, streaming and not
    ("/api/chat", {"model": "slow", "messages": [{"role": "user", "content": "hi"}]}),
    ("/api/chat", {"model": "slow", "messages": [{"role": "user", "content": "hi"}], "stream": False}),
    ("/api/generate", {"model": "slow", "prompt": "hi"}),
    ("/v1/chat/completions", {"model": "slow", "messages": [{"role": "user", "content": "hi"}]}),
    (
        "/v1/chat/completions",
        {"model": "slow", "messages": [{"role": "user", "content": "hi"}], "stream": True},
    ),
    ("/v1/completions", {"model": "slow", "prompt": "hi", "stream": True}),
    ("/generate", {"model": "slow", "messages": [{"role": "user", "content": "hi"}], "stream": True}),
]


def test_liveness_readiness_and_a_full_queue_while_a_model_is_busy(busy_daemon: Daemon) -> None:
    daemon = busy_daemon
    sock, head = daemon.open_stream(
        "/api/chat", {"model": "slow", "messages": [{"role": "user", "content": "go"}]}
    )
    queued: list[Any] = []
    waiter = threading.Thread(
        target=lambda: queued.append(
            ollama.Client(host=daemon.url).generate("slow", "short one", options={"num_predict": 3})
        )
    )
    try:
        assert b"\r\nX-Accel-Buffering: no\r\n" in head
        # Liveness answers at once although the model session is taken.
        status, _, body = raw_request(daemon, "GET", "/")
        assert (status, body) == (200, b"Ollama is running")
        state = ready(daemon)
        assert state == {
            "status": "busy",
            "queue": 0,
            "max_queue": 1,
            "running": 1,
            "in_flight": 1,
            "loaded": ["slow:latest"],
        }
        waiter.start()
        state = wait_for_queue(daemon, 1)
        assert state["status"] == "full"
        assert state["in_flight"] == 2
        status, _, text = raw_request(daemon, "GET", "/metrics")
        metrics = gauges(text.decode())
        assert metrics["rkllama_queue_depth"] == 1
        assert metrics["rkllama_session_busy"] == 1
        assert metrics["rkllama_in_flight_requests"] == 2
        # The queue is full: every face answers 503 + Retry-After as its status line, before any byte.
        for path, request in GENERATIONS:
            status, headers, body = raw_request(daemon, "POST", path, request)
            assert status == 503, (path, request)
            assert headers["Retry-After"] == "1"
            assert headers["Content-Type"].startswith("application/json")
            error = json.loads(body)["error"]
            message = error["message"] if path.startswith("/v1/") else error
            assert message == "server busy, please try again.  maximum pending requests exceeded"
        # The stream that holds the model is still going: nothing above waited for it.
        sock.settimeout(30)
        assert b'"done":false' in sock.recv(65536)
    finally:
        sock.close()  # abort the long generation: the queued request runs next
        if waiter.is_alive() or waiter.ident is not None:
            waiter.join(60)
    assert queued and queued[0].done
    assert queued[0].response == LONG_REPLY[:3]


def test_every_stream_face_asks_proxies_not_to_buffer(busy_daemon: Daemon) -> None:
    for path, request in GENERATIONS:
        if request.get("stream") is False or (path.startswith("/v1/") and not request.get("stream")):
            continue
        if path == "/generate":
            # The native face has no token limit: closing the socket aborts it after the first chunk.
            sock, head = busy_daemon.open_stream(path, request, until=b'"choices"')
        else:
            limit = {"max_tokens": 2} if path.startswith("/v1/") else {"options": {"num_predict": 2}}
            sock, head = busy_daemon.open_stream(path, {**request, **limit}, until=b"\r\n\r\n")
        sock.close()
        assert b"\r\nX-Accel-Buffering: no\r\n" in head, (path, head[:400])
