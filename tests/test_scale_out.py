"""Three boards behind HAProxy, each daemon in its own network namespace, driven with ollama-python.

The boards serve the same simulator model at different speeds; each reply starts with its board's tag
(`[a]`, `[b]`, `[c]`), so the client can tell who answered. Board c also serves a model of its own.
The HAProxy configuration is the one docs/scale-out.md explains (tests/support/cluster.py writes it).

Skipped, with the reason, where haproxy is not installed or network namespaces cannot be made (root).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest

from tests.rkllm_support.sim import add_sim_model, build_simulators
from tests.support.cluster import (
    BOARD_PORT,
    Haproxy,
    Namespaces,
    Unavailable,
    haproxy_binary,
    haproxy_config,
    kill_board,
    requests_503,
)
from tests.support.daemon import Daemon

BOARDS = {"a": 10, "b": 15, "c": 20}  # board -> ms per token: three boards of different speeds
MAX_QUEUE = 2  # each board: one running, two waiting; more get 503
FILLER = "lorem ipsum dolor sit amet " * 200
MODEL = "sim"
SOLO = "solo"  # only on board c


@dataclass
class Cluster:
    boards: dict[str, Daemon]
    router: Haproxy

    def client(self, **headers: str) -> ollama.Client:
        return ollama.Client(host=self.router.url, headers=headers or None)

    def board_of(self, text: str) -> str:
        assert text[:1] == "[" and text[2:3] == "]", text[:40]
        return text[1]


def make_board_store(root: Path, board: str) -> Path:
    store = root / f"board-{board}" / "models"
    add_sim_model(store, MODEL, reply=f"[{board}] {FILLER}", token_delay_ms=BOARDS[board])
    if board == "c":
        add_sim_model(store, SOLO, reply=f"[{board}] solo {FILLER}", token_delay_ms=1)
    return store


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    try:
        haproxy_binary()
        namespaces = Namespaces(len(BOARDS))
        spaces = namespaces.__enter__()
    except Unavailable as exc:
        print(f"\nscale-out test skipped: {exc}")
        pytest.skip(str(exc))
    root = tmp_path_factory.mktemp("cluster")
    library = str(build_simulators()["F"])
    boards: dict[str, Daemon] = {}
    router: Haproxy | None = None
    try:
        for board, space in zip(BOARDS, spaces, strict=True):
            daemon = Daemon(
                make_board_store(root, board),
                env={"RKLLAMA_RKLLM_LIB": library, "RKLLAMA_MAX_QUEUE": str(MAX_QUEUE)},
                host=space.address,
                port=BOARD_PORT,
                wrapper=space.wrapper,
                name=board,
            )
            boards[board] = daemon.start()
            ollama.Client(host=daemon.url).generate(MODEL, "warm up", options={"num_predict": 1})
        address = {
            board: f"{space.address}:{BOARD_PORT}" for board, space in zip(BOARDS, spaces, strict=True)
        }
        router = Haproxy(
            root,
            servers=[(board, address[board]) for board in BOARDS],
            solo_servers=[("c", address["c"])],
            solo_model=SOLO,
        ).start()
        yield Cluster(boards, router)
    finally:
        if router is not None:
            router.stop()
        for daemon in boards.values():
            daemon.stop()
        namespaces.__exit__(None, None, None)


def chat_text(client: ollama.Client, content: str, num_predict: int = 4, model: str = MODEL) -> str:
    reply = client.chat(model, [{"role": "user", "content": content}], options={"num_predict": num_predict})
    return reply.message.content or ""


def ready_state(board: Daemon) -> dict[str, Any]:
    return board.request("GET", "/api/ready").json()


def wait_until(what: str, check: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def wait_idle(board: Daemon) -> None:
    wait_until(f"board {board.name} to be idle", lambda: ready_state(board)["status"] == "idle")


# ------------------------------------------------------------------------------------------------


def test_every_board_is_up_behind_the_router(cluster: Cluster) -> None:
    states = cluster.router.server_states()
    assert states == {"boards/a": "UP", "boards/b": "UP", "boards/c": "UP", "solo/c": "UP"}
    # /api/tags and /api/ps through the router answer for the board they reach.
    listing = cluster.client().list()
    assert MODEL in {m.model.split(":")[0] for m in listing.models}
    assert [m.model for m in cluster.client().ps().models] == [f"{MODEL}:latest"]


def test_load_spreads_by_least_connections(cluster: Cluster) -> None:
    """Nine long requests at once: with leastconn each board gets three (one runs, two wait)."""
    start = threading.Barrier(9)
    served: list[str] = []
    errors: list[BaseException] = []

    def one(index: int) -> None:
        try:
            start.wait()
            text = chat_text(cluster.client(), f"spread {index}", num_predict=120)  # 1.2-2.4 s each
            served.append(cluster.board_of(text))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(9)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    assert Counter(served) == {"a": 3, "b": 3, "c": 3}


def test_a_full_board_503_sends_the_request_to_another(cluster: Cluster) -> None:
    """Board a is kept full by clients that reach it directly; the router's requests that land there
    get 503 before any byte, and HAProxy (retry-on 503, redispatch) serves them elsewhere."""
    board = cluster.boards["a"]
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hold the board"}]}
    held: list[socket.socket] = []
    try:
        sock, _ = board.open_stream("/api/chat", body)
        held.append(sock)
        for _ in range(MAX_QUEUE):
            sock, _ = board.open_stream("/api/chat", body, until=b"")
            held.append(sock)
        wait_until("board a to be full", lambda: ready_state(board)["status"] == "full")
        refused_before = requests_503(board)
        served = [chat_text(cluster.client(), f"while a is full {i}") for i in range(6)]
        boards = Counter(cluster.board_of(text) for text in served)
        assert "a" not in boards
        assert sum(boards.values()) == 6
        assert requests_503(board) > refused_before  # a was asked, said 503, and the client never saw it
    finally:
        for sock in held:
            sock.close()
    wait_idle(board)


def test_model_aware_routing_sends_a_model_to_the_board_that_serves_it(cluster: Cluster) -> None:
    texts = [chat_text(cluster.client(), f"solo {i}", num_predict=9, model=SOLO) for i in range(4)]
    assert all(text.startswith("[c] solo") for text in texts)


def conversation_turns(client: ollama.Client, first: list[dict[str, str]], turns: int) -> list[str]:
    messages = list(first)
    boards = []
    for turn in range(turns):
        reply = client.chat(MODEL, messages, options={"num_predict": 4})
        text = reply.message.content or ""
        boards.append(text[1])
        messages += [{"role": "assistant", "content": text}, {"role": "user", "content": f"and {turn}?"}]
    return boards


def test_a_session_header_keeps_a_conversation_on_one_board(cluster: Cluster) -> None:
    placements = {}
    for conversation in range(3):
        client = cluster.client(**{"X-Session-Id": f"conversation-{conversation}"})
        placements[conversation] = conversation_turns(
            client, [{"role": "user", "content": f"hello from {conversation}"}], 3
        )
        # In between, other traffic moves leastconn's round robin along.
        chat_text(cluster.client(), f"noise {conversation}")
    for boards in placements.values():
        assert len(set(boards)) == 1, placements


def test_the_first_user_message_keeps_a_conversation_on_one_board(cluster: Cluster) -> None:
    """No header at all (Open WebUI as it is): the router hashes the first user message."""
    client = cluster.client()
    starts = [
        [{"role": "user", "content": "tell me about boards"}],
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "tell me about routers"}],
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "tell me about queues"}],
    ]
    placements = [conversation_turns(client, start, 4) for start in starts]
    for boards in placements:
        assert len(set(boards)) == 1, placements


def stream_until_board(client: ollama.Client, content: str) -> tuple[Iterator[Any], str]:
    """Start a long stream and read until its reply shows which board runs it."""
    stream = client.chat(MODEL, [{"role": "user", "content": content}], stream=True)
    text = ""
    while len(text) < 3:
        text += next(stream).message.content or ""
    return stream, text[1]


def test_a_board_stopped_mid_stream_ends_it_with_an_error_line(cluster: Cluster) -> None:
    client = cluster.client(**{"X-Session-Id": "stopped-board"})
    stream, victim = stream_until_board(client, "a long story, please")
    board = cluster.boards[victim]
    assert board.process is not None
    board.process.send_signal(signal.SIGTERM)  # a graceful stop: the daemon says why the stream ends
    with pytest.raises(ollama.ResponseError) as error:
        for _ in stream:
            pass
    assert error.value.error == "server is shutting down"
    board.process.wait(20)
    try:
        # The same conversation, and new ones, are served by the others.
        texts = [chat_text(client, "are you still there?")]
        texts += [chat_text(cluster.client(), f"after the stop {i}") for i in range(4)]
        assert victim not in {cluster.board_of(text) for text in texts}
        cluster.router.wait_state(f"boards/{victim}", "DOWN")
    finally:
        board.start()
    ollama.Client(host=board.url).generate(MODEL, "warm up", options={"num_predict": 1})
    cluster.router.wait_state(f"boards/{victim}", "UP")


def test_a_board_killed_mid_stream_breaks_the_stream_and_the_next_requests_go_elsewhere(
    cluster: Cluster,
) -> None:
    client = cluster.client(**{"X-Session-Id": "killed-board"})
    stream, victim = stream_until_board(client, "another long story")
    board = cluster.boards[victim]
    kill_board(board)  # no last word possible: the client must see an error, not a clean end
    finished = False
    with pytest.raises(httpx.RemoteProtocolError):  # the body ended without its last chunk
        for chunk in stream:
            finished = finished or chunk.done
    assert not finished
    try:
        # Before the health checks notice, connection failures are retried on another board.
        texts = [chat_text(client, "still there?")]
        texts += [chat_text(cluster.client(), f"after the kill {i}") for i in range(4)]
        assert victim not in {cluster.board_of(text) for text in texts}
        cluster.router.wait_state(f"boards/{victim}", "DOWN")
    finally:
        board.start()
    cluster.router.wait_state(f"boards/{victim}", "UP")
    # The conversation stays where it moved to: that board now holds its cache.
    assert cluster.board_of(chat_text(client, "and now?")) == cluster.board_of(texts[0])


def test_the_documented_configuration_is_valid_and_is_the_tested_one() -> None:
    try:
        binary = haproxy_binary()
    except Unavailable as exc:
        pytest.skip(str(exc))
    doc = (Path(__file__).parents[1] / "docs" / "scale-out.md").read_text()
    block = doc.split("```haproxy\n", 1)[1].split("```", 1)[0]
    checked = subprocess.run(
        [binary, "-c", "-f", "/dev/stdin"], input=block, capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    documented = {line.split("#", 1)[0].rstrip() for line in block.splitlines()}
    tested = haproxy_config(1, 2, [("a", "127.0.0.1:3")])
    for line in tested.splitlines():
        if line.startswith("    http-request") or line.strip().startswith(("retry-on", "option", "stick")):
            assert line in documented, line
