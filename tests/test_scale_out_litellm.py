"""Three boards behind LiteLLM's proxy (the configuration of docs/scale-out.md), driven with the openai
library: least-busy spreading, a full board's 503 retried on another, per-model routing, a fallback
when the only board of a model is gone, session affinity by `x-litellm-session-id`.

LiteLLM is heavy and not a dependency of this project: the test runs where a `litellm` command is
found (RKLLAMA_TEST_LITELLM=/path/to/litellm, or on PATH), e.g. after
`python3 -m venv /opt/litellm && /opt/litellm/bin/pip install 'litellm[proxy]'`, and skips otherwise.
The boards listen on loopback; LiteLLM is told to use its bundled model list instead of fetching one.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import openai
import pytest

from tests.rkllm_support.sim import add_sim_model, build_simulators
from tests.support.cluster import kill_board, requests_503
from tests.support.daemon import Daemon, free_port

BOARDS = {"a": 10, "b": 15, "c": 20}
MAX_QUEUE = 2
FILLER = "lorem ipsum dolor sit amet " * 200


def litellm_command() -> str:
    command = os.environ.get("RKLLAMA_TEST_LITELLM") or shutil.which("litellm")
    if not command or not os.access(command, os.X_OK):
        reason = "LiteLLM's proxy is not installed (set RKLLAMA_TEST_LITELLM to its `litellm` command)"
        print(f"\n{reason}")
        pytest.skip(reason)
    return command


def litellm_config(boards: dict[str, Daemon]) -> str:
    lines = ["model_list:"]
    for board, daemon in boards.items():
        lines += [
            "  - model_name: sim",
            f"    litellm_params: {{model: ollama_chat/sim, api_base: '{daemon.url}'}}",
            f"    model_info: {{id: board-{board}}}",
        ]
    lines += [
        "  - model_name: solo",
        f"    litellm_params: {{model: ollama_chat/solo, api_base: '{boards['c'].url}'}}",
        "    model_info: {id: board-c-solo}",
        "router_settings:",
        "  routing_strategy: least-busy",
        "  num_retries: 2",
        "  timeout: 600",
        "  stream_timeout: 600",
        "  allowed_fails: 3",
        "  cooldown_time: 30",
        "  optional_pre_call_checks: [session_affinity]",
        "  fallbacks: [{solo: [sim]}]",
        "litellm_settings:",
        "  request_timeout: 600",
        "general_settings:",
        "  master_key: os.environ/LITELLM_MASTER_KEY",
    ]
    return "\n".join(lines) + "\n"


@dataclass
class Proxy:
    boards: dict[str, Daemon]
    url: str
    key: str

    def client(self, **headers: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.key, default_headers=headers or None)

    def ask(self, content: str, model: str = "sim", tokens: int = 4, **headers: str) -> str:
        reply = self.client(**headers).chat.completions.create(
            model=model, messages=[{"role": "user", "content": content}], max_tokens=tokens
        )
        return reply.choices[0].message.content or ""


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    command = litellm_command()
    root = tmp_path_factory.mktemp("litellm")
    library = str(build_simulators()["F"])
    boards: dict[str, Daemon] = {}
    process: subprocess.Popen[bytes] | None = None
    try:
        for board, delay in BOARDS.items():
            store = root / f"board-{board}" / "models"
            add_sim_model(store, "sim", reply=f"[{board}] {FILLER}", token_delay_ms=delay)
            if board == "c":
                add_sim_model(store, "solo", reply=f"[{board}] solo {FILLER}", token_delay_ms=1)
            env = {"RKLLAMA_RKLLM_LIB": library, "RKLLAMA_MAX_QUEUE": str(MAX_QUEUE)}
            boards[board] = Daemon(store, env=env, name=board).start()
        config = root / "litellm.yaml"
        config.write_text(litellm_config(boards))
        port = free_port()
        key = "sk-" + secrets.token_hex(32)
        env = {
            "LITELLM_MASTER_KEY": key,
            **os.environ,
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # never fetch the model list from the internet
            "LITELLM_TELEMETRY": "False",
        }
        log = open(root / "litellm.log", "wb")  # noqa: SIM115 - kept open for the child
        process = subprocess.Popen(
            [command, "--config", str(config), "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, (root / "litellm.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "LiteLLM did not start in 120 s"
            try:
                with urllib.request.urlopen(url + "/health/liveliness", timeout=2):
                    break
            except OSError:
                time.sleep(0.2)
        yield Proxy(boards, url, key)
    finally:
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
        for daemon in boards.values():
            daemon.stop()


def board_of(text: str) -> str:
    assert text[:1] == "[" and text[2:3] == "]", text[:40]
    return text[1]


def test_least_busy_spreads_concurrent_requests(proxy: Proxy) -> None:
    start = threading.Barrier(9)
    served: list[str] = []
    errors: list[BaseException] = []

    def one(index: int) -> None:
        try:
            start.wait()
            served.append(board_of(proxy.ask(f"spread {index}", tokens=60)))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(9)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    assert not errors, errors
    print(f"least-busy placed 9 concurrent requests as {dict(Counter(served))}")
    assert set(Counter(served)) == {"a", "b", "c"}, served


def test_a_full_board_503_is_retried_on_another(proxy: Proxy) -> None:
    board = proxy.boards["a"]
    body = {"model": "sim", "messages": [{"role": "user", "content": "hold"}]}
    held: list[socket.socket] = []
    try:
        sock, _ = board.open_stream("/api/chat", body)
        held.append(sock)
        for _ in range(MAX_QUEUE):
            held.append(board.open_stream("/api/chat", body, until=b"")[0])
        deadline = time.monotonic() + 30
        while board.request("GET", "/api/ready").json()["status"] != "full":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        refused_before = requests_503(board)
        served = [board_of(proxy.ask(f"while a is full {i}")) for i in range(6)]
        assert "a" not in served
        assert requests_503(board) > refused_before  # a was tried, refused, and the client never knew
    finally:
        for sock in held:
            sock.close()


def test_a_model_goes_to_the_board_that_serves_it(proxy: Proxy) -> None:
    assert all(proxy.ask(f"solo {i}", model="solo", tokens=9) == "[c] solo " for i in range(3))


def test_a_session_id_keeps_a_conversation_on_one_board(proxy: Proxy) -> None:
    """Between turns, a long request without a session occupies a board (least-busy puts it on an idle
    one, the conversation's own when that is first in line): without affinity the next turns would go
    to a less busy board; with it they wait for theirs."""
    for conversation in range(2):
        session = {"x-litellm-session-id": f"chat-{conversation}"}
        boards = [board_of(proxy.ask("turn 0", **session))]
        noise = proxy.client().chat.completions.create(
            model="sim", messages=[{"role": "user", "content": f"noise {conversation}"}], stream=True
        )
        try:
            next(iter(noise))  # it is running
            boards += [board_of(proxy.ask(f"turn {turn}", **session)) for turn in (1, 2)]
        finally:
            noise.close()
        assert len(set(boards)) == 1, boards
        wait_all_idle(proxy)


def wait_all_idle(proxy: Proxy) -> None:
    deadline = time.monotonic() + 30
    for board in proxy.boards.values():
        while board.request("GET", "/api/ready").json()["status"] != "idle":
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_the_fallback_answers_when_the_only_board_of_a_model_is_gone(proxy: Proxy) -> None:
    kill_board(proxy.boards["c"])
    try:
        text = proxy.ask("solo, please", model="solo")
        assert board_of(text) in {"a", "b"}
    finally:
        proxy.boards["c"].start()
