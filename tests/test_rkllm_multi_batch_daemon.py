"""RKLLAMA_RKLLM_MULTI_BATCH end to end: the daemon serving concurrent /api/chat requests on a simulated
E/F model in one batched run, each answer identical to its serial one; off, or on a runtime before
1.2.1, requests are served one at a time."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import ollama
import pytest

from tests.rkllm_support.sim import add_sim_model, build_simulators
from tests.support.daemon import Daemon

REPLY = "Here is an answer that takes a little while to stream, word by word."
QUESTIONS = [
    "What is the capital of France?",
    "Name three colours.",
    "Count to five.",
    "Why is the sky blue?",
]
ANSWER = re.compile(r"^.* #[0-9a-f]{8}$")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("batching") / "models"
    # The simulated answer depends on the prompt (reply_by_input): whose answer is whose shows.
    add_sim_model(store, "echo", tokenizer=True, reply=REPLY, reply_by_input=1, token_delay_ms=20)
    add_sim_model(store, "small", tokenizer=True, reply="ok", max_context_len=64)
    return store


def _env(family: str, multi_batch: bool) -> dict[str, str]:
    env = {"RKLLAMA_RKLLM_LIB": str(build_simulators()[family]), "RKLLAMA_NUM_PARALLEL": "4"}
    if multi_batch:
        env["RKLLAMA_RKLLM_MULTI_BATCH"] = "1"
    return env


def _chat(client: ollama.Client, question: str, first: threading.Event | None = None) -> str:
    parts: list[str] = []
    for chunk in client.chat("echo", messages=[{"role": "user", "content": question}], stream=True):
        parts.append(chunk.message.content or "")
        if first is not None:
            first.set()
    return "".join(parts)


def _batch_sizes(log: str) -> list[int]:
    return [int(n) for n in re.findall(r"multi-batch run: (\d+) requests", log)]


@pytest.mark.parametrize("family", ["E", "F"])
def test_concurrent_chats_share_one_batched_run_each_with_its_serial_answer(store: Path, family: str) -> None:
    with Daemon(store, env=_env(family, multi_batch=False)).start() as off:
        client = ollama.Client(host=off.url)
        serial = [_chat(client, question) for question in QUESTIONS]
        assert re.search(r"loaded model=echo:latest .* parallel=1", off.log())
        assert _batch_sizes(off.log()) == [] and "RKLLM multi-batch" not in off.log()
    assert all(ANSWER.match(text) for text in serial) and len(set(serial)) == len(QUESTIONS)

    with Daemon(store, env=_env(family, multi_batch=True)).start() as on:
        client = ollama.Client(host=on.url)
        texts: dict[str, str] = {}
        first = threading.Event()

        def user(question: str, started: threading.Event | None = None) -> None:
            texts[question] = _chat(client, question, started)

        # The first request takes the runtime; the three sent while it streams wait and share the next run.
        leader = threading.Thread(target=user, args=(QUESTIONS[0], first))
        leader.start()
        assert first.wait(30)
        others = [threading.Thread(target=user, args=(question,)) for question in QUESTIONS[1:]]
        for thread in others:
            thread.start()
        for thread in [leader, *others]:
            thread.join(60)
        assert [texts.get(question) for question in QUESTIONS] == serial
        log = on.log()
        assert re.search(r"loaded model=echo:latest .* parallel=4", log)
        assert _batch_sizes(log) == [1, 3]
        assert "RKLLM multi-batch is on (experimental" in log


def test_runtimes_before_1_2_1_serve_one_request_at_a_time_with_the_switch_on(store: Path) -> None:
    with Daemon(store, env=_env("D", multi_batch=True)).start() as daemon:
        client = ollama.Client(host=daemon.url)
        texts: list[str] = []
        threads = [threading.Thread(target=lambda q=q: texts.append(_chat(client, q))) for q in QUESTIONS[:2]]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert len(texts) == 2 and all(ANSWER.match(text) for text in texts)
        log = daemon.log()
        # Told at start-up from the library file: loads ask for one sequence, one KV cache is counted.
        assert "RKLLAMA_RKLLM_MULTI_BATCH is ignored: the RKLLM runtime" in log
        assert "is 1.2.0 and multi-batch needs 1.2.1 or later" in log
        assert "RKLLM multi-batch is on" not in log
        assert re.search(r"loaded model=echo:latest .* parallel=1", log)
        assert _batch_sizes(log) == []


def test_a_prompt_beyond_the_context_is_a_400_in_multi_batch(store: Path) -> None:
    with Daemon(store, env=_env("F", multi_batch=True)).start() as daemon:
        response = daemon.request(
            "POST",
            "/api/chat",
            {"model": "small", "messages": [{"role": "user", "content": "x" * 200}], "stream": False},
        )
        assert response.status == 400
        assert "the context window is 64 tokens" in response.error
