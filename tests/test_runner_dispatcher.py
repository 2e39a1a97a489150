"""The runner's side without a process: requests read from a byte stream, replies from the dispatcher."""

from __future__ import annotations

import io
import queue
import threading
from pathlib import Path

from rkllama_ollama.runtime.base import LoadSpec, SamplingOptions
from rkllama_ollama.runtime.runner.child import read_requests
from rkllama_ollama.runtime.runner.codec import HEADER, encode
from rkllama_ollama.runtime.runner.dispatcher import Dispatcher
from rkllama_ollama.runtime.runner.messages import (
    Abort,
    Done,
    Emitted,
    Failed,
    Generate,
    Load,
    Loaded,
    Reply,
    Shutdown,
    Tokenize,
)
from tests.support.tiny_gguf import write_tiny_gguf


def frame(raw: bytes) -> bytes:
    return HEADER.pack(len(raw)) + raw


def run(stream: bytes) -> list[Reply]:
    replies: list[Reply] = []
    dispatcher = Dispatcher(replies.append)
    read_requests(io.BytesIO(stream), dispatcher)  # reads to the end, then ends the input
    dispatcher.serve()
    return replies


def test_a_request_that_cannot_be_read_is_answered_and_the_next_one_still_runs() -> None:
    replies = run(frame(b'{"op": "dance", "id": 4}') + frame(b"not json") + encode(Tokenize(5, "hi")))
    assert replies[0] == Failed(4, "unknown runner command 'dance'")
    assert isinstance(replies[1], Failed) and replies[1].id is None
    assert replies[1].message.startswith("a frame is not JSON")
    assert replies[2:] == [Failed(5, "no model is loaded in this runner")]


def test_a_generation_aborted_while_queued_ends_without_stats_and_the_next_one_runs(tmp_path: Path) -> None:
    replies: queue.Queue[Reply] = queue.Queue()
    dispatcher = Dispatcher(replies.put)
    serving = threading.Thread(target=dispatcher.serve)
    serving.start()
    try:
        spec = LoadSpec("llamacpp", str(write_tiny_gguf(tmp_path / "tiny.gguf")), num_ctx=256)
        dispatcher.submit(Load(1, spec))
        dispatcher.submit(Generate(2, "hi", SamplingOptions()))
        dispatcher.submit(Abort(2))  # acted on at once: the generation has not started
        dispatcher.submit(Generate(3, "hi", SamplingOptions(num_predict=2, temperature=0)))
        got = [replies.get(timeout=60) for _ in range(2)]
        assert isinstance(got[0], Loaded) and got[1] == Done(2, None)
        rest = [replies.get(timeout=60)]
        while not isinstance(rest[-1], Done):
            rest.append(replies.get(timeout=60))
        assert all(isinstance(reply, Emitted) and reply.id == 3 for reply in rest[:-1])
        done = rest[-1]
        assert done.id == 3 and done.stats is not None and done.stats.eval_count == 2
    finally:
        dispatcher.end_of_input()
        serving.join(60)


def test_shutdown_ends_the_input_and_nothing_after_it_runs() -> None:
    replies = run(encode(Shutdown()) + encode(Tokenize(2, "hi")))
    assert replies == []
