"""RKLLAMA_NUM_PARALLEL=4 on a live daemon: four users stream from one llama.cpp model at the same time,
each with the text of its serial run at temperature 0 (tiny GGUF, the real ollama client)."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import ollama
import pytest

from tests.conftest import make_gguf_model
from tests.support.inprocess_daemon import InProcessDaemon

pytest.importorskip("llama_cpp")

OPTIONS = {"num_predict": 120, "temperature": 0, "seed": 3}
QUESTIONS = ["hello there", "tell me about the sea", "a b c d e f g", "why is the sky blue?"]


def stream(client: ollama.Client, question: str, events: list[tuple[str, str]], lock: threading.Lock) -> str:
    parts: list[str] = []
    for chunk in client.chat(
        "tiny", messages=[{"role": "user", "content": question}], options=OPTIONS, stream=True
    ):
        if not parts:
            with lock:
                events.append(("first", question))
        parts.append(chunk.message.content or "")
    with lock:
        events.append(("done", question))
    return "".join(parts)


def test_four_concurrent_streams_match_their_serial_runs(tmp_path: Path) -> None:
    store = tmp_path / "models"
    make_gguf_model(store, "tiny")
    with InProcessDaemon(store, env={"RKLLAMA_NUM_PARALLEL": "4"}).start() as served:
        client = ollama.Client(host=served.url)
        ignored: list[tuple[str, str]] = []
        serial = [stream(client, question, ignored, threading.Lock()) for question in QUESTIONS]
        events: list[tuple[str, str]] = []
        lock = threading.Lock()
        texts: dict[str, str] = {}

        def user(question: str) -> None:
            texts[question] = stream(client, question, events, lock)

        threads = [threading.Thread(target=user, args=(question,)) for question in QUESTIONS]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        assert [texts.get(question) for question in QUESTIONS] == serial
        # They streamed at the same time: some stream began before another one ended.
        first_done = next(i for i, (kind, _) in enumerate(events) if kind == "done")
        assert sum(kind == "first" for kind, _ in events[:first_done]) >= 2
        log = served.log()
        assert len(re.findall(r"loaded model=tiny:latest .* parallel=4", log)) == 1
        assert [m.model for m in client.ps().models] == ["tiny:latest"]


def test_num_parallel_does_not_apply_to_embeddings(tmp_path: Path) -> None:
    store = tmp_path / "models"
    make_gguf_model(store, "tiny")
    with InProcessDaemon(store, env={"OLLAMA_NUM_PARALLEL": "3"}).start() as served:
        client = ollama.Client(host=served.url)
        assert len(client.embed("tiny", input=["a", "b"]).embeddings) == 2
        assert "parallel=1" in served.log()
        client.chat("tiny", messages=[{"role": "user", "content": "hi"}], options=OPTIONS)
        assert "parallel=3" in served.log()
