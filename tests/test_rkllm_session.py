"""RkllmSession on the simulator of every ABI family: streaming, abort, faults, KV prefix reuse."""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from rkllama_ollama.runtime.base import Cancel, InvalidInput, LoadSpec, RuntimeFailure, SamplingOptions
from rkllama_ollama.runtime.rkllm import abi
from rkllama_ollama.runtime.rkllm.library import RkllmLibrary, open_library
from rkllama_ollama.runtime.rkllm.session import RkllmRuntime, RkllmSession
from tests.rkllm_support.sim import (
    CHAT_TEMPLATE,
    EOS_TOKEN,
    FAMILIES,
    REPO,
    build_simulators,
    write_byte_tokenizer,
    write_model,
)

UTF8_REPLY = "Grüße — 世界 🎉🇩🇪 ok\nZeile 2: ñ€𝄞"


@pytest.fixture(scope="session")
def sims() -> dict[str, Path]:
    return build_simulators()


@pytest.fixture(params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def runtime(sims: dict[str, Path], family: str) -> RkllmRuntime:
    return RkllmRuntime(str(sims[family]))


@pytest.fixture
def open_session(runtime: RkllmRuntime, tmp_path: Path) -> Iterator[Callable[..., RkllmSession]]:
    sessions: list[RkllmSession] = []

    def make(reply: str = "ok", num_ctx: int = 4096, tokenizer: bool = False, **keys: object) -> RkllmSession:
        folder = tmp_path / f"model{len(sessions)}"
        tokenizer_path = write_byte_tokenizer(folder / "tokenizer") if tokenizer else None
        model = write_model(folder, reply=reply, tokenizer=tokenizer_path, **keys)
        tokenizer_dir = str(tokenizer_path) if tokenizer_path else None
        spec = LoadSpec(engine="rkllm", model_path=str(model), num_ctx=num_ctx, tokenizer_dir=tokenizer_dir)
        session = runtime.load(spec)
        sessions.append(session)
        return session

    yield make
    for session in sessions:
        session.close()


def generate(session: RkllmSession, prompt: str, **options: object) -> tuple[list[str], object]:
    pieces: list[str] = []
    stats = session.generate(prompt, SamplingOptions(**options), pieces.append)
    return pieces, stats


@pytest.mark.parametrize("tokenizer", [False, True], ids=["prompt-input", "token-input"])
def test_multibyte_utf8_reply_arrives_intact(
    open_session: Callable[..., RkllmSession], tokenizer: bool
) -> None:
    session = open_session(reply=UTF8_REPLY, tokenizer=tokenizer)
    pieces, stats = generate(session, "Hallo")
    assert "".join(pieces) == UTF8_REPLY
    assert all("\ufffd" not in piece for piece in pieces)
    assert len(pieces) == len(UTF8_REPLY)  # one piece per character: WAITING held the partial bytes
    assert stats.eval_count == len(UTF8_REPLY.encode("utf-8"))
    assert stats.done_reason == "stop"


def test_a_cancel_set_before_the_run_ends_it_without_running(
    open_session: Callable[..., RkllmSession],
) -> None:
    session = open_session(reply="never said")
    cancel = Cancel()
    cancel.set()
    pieces: list[str] = []
    stats = session.generate("hi", SamplingOptions(), pieces.append, cancel)
    assert (stats.done_reason, stats.eval_count, pieces) == ("abort", 0, [])
    assert generate(session, "hi")[0] == list("never said")  # it did not outlive its request


def test_a_cancel_during_prefill_ends_the_run_before_any_text(
    open_session: Callable[..., RkllmSession],
) -> None:
    session = open_session(reply="a long answer", prefill_us_per_token=20_000)
    cancel = Cancel()
    pieces: list[str] = []
    timer = threading.Timer(0.1, cancel.set)  # lands inside the ~1 s prefill of a 50-token prompt
    timer.start()
    stats = session.generate("p" * 50, SamplingOptions(), pieces.append, cancel)
    timer.join()
    assert stats.done_reason == "abort"
    assert pieces == [] and stats.eval_count <= 1


def test_callbacks_come_from_a_native_thread(open_session: Callable[..., RkllmSession]) -> None:
    session = open_session(reply="abc")
    threads: set[int] = set()
    session.generate("x", SamplingOptions(), lambda piece: threads.add(threading.get_ident()))
    assert threads and threading.get_ident() not in threads


def test_abort_mid_generation(open_session: Callable[..., RkllmSession]) -> None:
    reply = "x" * 400
    session = open_session(reply=reply, token_delay_ms=2)
    first_piece = threading.Event()
    pieces: list[str] = []

    def emit(piece: str) -> None:
        pieces.append(piece)
        first_piece.set()

    result: dict[str, object] = {}
    cancel = Cancel()
    worker = threading.Thread(
        target=lambda: result.update(stats=session.generate("go", SamplingOptions(), emit, cancel))
    )
    worker.start()
    assert first_piece.wait(30)
    cancel.set()
    worker.join(30)
    assert not worker.is_alive()
    stats = result["stats"]
    assert stats.done_reason == "abort"
    assert 0 < stats.eval_count < len(reply)
    assert len("".join(pieces)) < len(reply)
    # The session stays usable and the next run is complete: a late cancel reaches nothing.
    cancel.set()
    pieces2, stats2 = generate(session, "again")
    assert "".join(pieces2) == reply and stats2.done_reason == "stop"


def test_num_predict_stops_generation(open_session: Callable[..., RkllmSession]) -> None:
    session = open_session(reply="abcdefghij")
    pieces, stats = generate(session, "go", num_predict=3)
    assert "".join(pieces) == "abc"
    assert stats.eval_count == 3 and stats.done_reason == "length"
    pieces, stats = generate(session, "go")  # the next request is not limited
    assert "".join(pieces) == "abcdefghij"


def test_fail_init_is_a_clear_error(runtime: RkllmRuntime, tmp_path: Path) -> None:
    model = write_model(tmp_path, fail_init=1)
    with pytest.raises(RuntimeFailure, match="could not load .*fail_init"):
        runtime.load(LoadSpec(engine="rkllm", model_path=str(model)))


def test_not_a_model_file_is_a_clear_error(runtime: RkllmRuntime, tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.rkllm"
    bogus.write_text("GGUF but not really\n")
    with pytest.raises(RuntimeFailure, match="invalid rkllm model"):
        runtime.load(LoadSpec(engine="rkllm", model_path=str(bogus)))
    with pytest.raises(RuntimeFailure, match="not found"):
        runtime.load(LoadSpec(engine="rkllm", model_path=str(tmp_path / "missing.rkllm")))


def test_prompt_longer_than_the_context_is_a_clear_error(open_session: Callable[..., RkllmSession]) -> None:
    session = open_session(num_ctx=64)
    with pytest.raises(RuntimeFailure, match=r"prompt is 100 tokens but the context window is 64"):
        generate(session, "y" * 100)
    assert "".join(generate(session, "short")[0]) == "ok"


def test_model_context_limit_caps_num_ctx(open_session: Callable[..., RkllmSession]) -> None:
    session = open_session(num_ctx=4096, max_context_len=48)
    assert session.info.context_length == 48
    with pytest.raises(RuntimeFailure, match="context window is 48"):
        generate(session, "z" * 60)


def test_runtime_context_error_becomes_a_runtime_failure(open_session: Callable[..., RkllmSession]) -> None:
    session = open_session(num_ctx=4096, max_context_len=32)
    session._context_limit = 10_000  # pretend the session did not know: the runtime must refuse
    with pytest.raises(RuntimeFailure, match="error"):
        generate(session, "w" * 40)
    session._context_limit = 32
    assert "".join(generate(session, "fine")[0]) == "ok"


def _conversation_prompts(session: RkllmSession, turns: int) -> list[tuple[int, int]]:
    """(prompt_eval_count, prompt_tokens) per turn of a growing chat."""
    history = "<|system|>You are terse.<|im_end|>"
    counts = []
    for turn in range(turns):
        prompt = history + f"<|user|>question number {turn}?<|im_end|><|assistant|>"
        pieces, stats = generate(session, prompt)
        history = prompt + "".join(pieces) + "<|im_end|>"
        counts.append((stats.prompt_eval_count, stats.prompt_tokens))
    return counts


@pytest.mark.parametrize("tokenizer", [False, True], ids=["prompt-input", "token-input"])
def test_eight_turns_reuse_the_kv_prefix(
    open_session: Callable[..., RkllmSession], family: str, tokenizer: bool
) -> None:
    session = open_session(reply="A fine answer, ünïcödé 🙂.", tokenizer=tokenizer)
    counts = _conversation_prompts(session, 8)
    fed = [c[0] for c in counts]
    totals = [c[1] for c in counts]
    assert fed[0] == totals[0]
    assert totals[7] > 2 * totals[1]
    if family == "C":
        assert fed == totals  # no keep_history: the whole prompt every time
    else:
        assert fed[7] <= 1.5 * fed[1]
        assert all(f < t for f, t in zip(fed[1:], totals[1:], strict=True))


def test_diverging_prompt_clears_the_cache(open_session: Callable[..., RkllmSession], family: str) -> None:
    session = open_session(reply="ok")
    generate(session, "first conversation")
    _, stats = generate(session, "first conversation" + "ok" + " more")
    expected_second = len(" more") if family != "C" else len("first conversationok more")
    assert stats.prompt_eval_count == expected_second
    _, stats = generate(session, "another conversation")
    assert stats.prompt_eval_count == len("another conversation")
    _, stats = generate(session, "another conversation")  # same prompt again: nothing new to feed
    assert stats.prompt_eval_count == len("another conversation")


def test_changed_sampling_reinitialises_except_on_f(
    open_session: Callable[..., RkllmSession], family: str
) -> None:
    session = open_session(reply="ok")
    generate(session, "hello")
    assert session.last_reload_ns == 0
    _, stats = generate(session, "hello" + "ok" + "!", temperature=0.1)
    if family == "F":
        assert session.last_reload_ns == 0 and stats.reload_ns == 0
        assert stats.prompt_eval_count == 1
    else:
        assert session.last_reload_ns > 0 and stats.reload_ns == session.last_reload_ns
        assert stats.prompt_eval_count == stats.prompt_tokens  # a fresh handle has an empty cache


def test_embeddings_are_deterministic_and_distinct(open_session: Callable[..., RkllmSession]) -> None:
    session = open_session(num_ctx=64, embd_size=16)
    result = session.embed(["alpha", "beta", "alpha"], truncate=False)
    assert len(result.vectors) == 3 and all(len(v) == 16 for v in result.vectors)
    assert result.vectors[0] == result.vectors[2]
    assert result.vectors[0] != result.vectors[1]
    assert result.prompt_tokens == len("alpha") * 2 + len("beta")
    assert session.info.embedding_length == 16
    with pytest.raises(RuntimeFailure, match="more than the context"):
        session.embed(["q" * 100], truncate=False)
    assert len(session.embed(["q" * 100], truncate=True).vectors[0]) == 16
    # Generation after embeddings starts a fresh conversation and works.
    _, stats = generate(session, "after")
    assert stats.prompt_eval_count == len("after")


def test_emit_exception_propagates_and_session_survives(open_session: Callable[..., RkllmSession]) -> None:
    session = open_session(reply="abcdef")

    def broken(piece: str) -> None:
        raise ValueError("client went away")

    with pytest.raises(ValueError, match="client went away"):
        session.generate("x", SamplingOptions(), broken)
    assert "".join(generate(session, "x")[0]) == "abcdef"


def test_tokenizer_folder_fills_model_info(open_session: Callable[..., RkllmSession]) -> None:
    session = open_session(tokenizer=True)
    assert session.info.chat_template == CHAT_TEMPLATE
    assert session.info.eos_token == EOS_TOKEN
    assert session.tokenize("é") == [0xC3, 0xA9]
    assert session.detokenize([0xC3, 0xA9]) == "é"


def test_crash_after_tokens_kills_the_process(sims: dict[str, Path], family: str, tmp_path: Path) -> None:
    model = write_model(tmp_path, reply="0123456789", crash_after_tokens=3)
    script = textwrap.dedent(
        f"""
        import sys
        from rkllama_ollama.runtime.base import LoadSpec, SamplingOptions
        from rkllama_ollama.runtime.rkllm.session import RkllmRuntime
        spec = LoadSpec(engine="rkllm", model_path={str(model)!r})
        session = RkllmRuntime({str(sims[family])!r}).load(spec)
        session.generate("go", SamplingOptions(), lambda piece: print(piece, end="", flush=True))
        print("survived")
        """
    )
    child = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert child.returncode == -signal.SIGSEGV
    assert child.stdout.endswith("012") and "survived" not in child.stdout


def _raw(sims: dict[str, Path], family: str) -> RkllmLibrary:
    return open_library(str(sims[family]), environ={})


@pytest.mark.parametrize("family_letter", ["E", "F"])
def test_sim_allows_ranged_clear_only_after_a_single_turn_pause(
    sims: dict[str, Path], family_letter: str, tmp_path: Path
) -> None:
    """Reference 5.4: ranged clear_kv_cache is valid only with keep_history=0 after a pause."""
    lib = _raw(sims, family_letter)
    layout = lib.layout
    model = write_model(tmp_path, reply="abcdefgh")
    states: list[int] = []

    def on_result(result: object, userdata: object, state: int) -> int:
        states.append(state)
        return abi.CALLBACK_PAUSE if state == abi.RUN_NORMAL and len(states) == 2 else abi.CALLBACK_CONTINUE

    callback = layout.ResultCallback(on_result)
    param = abi.default_param(lib.cdll, layout)
    param.model_path = str(model).encode()
    handle = ctypes.c_void_p()
    third = ctypes.byref(layout.Callback(result_callback=callback)) if layout.Callback else callback
    assert lib.cdll.rkllm_init(ctypes.byref(handle), ctypes.byref(param), third) == 0
    try:
        start, end = ctypes.c_int(0), ctypes.c_int(1)

        def run(keep_history: int) -> None:
            rkllm_input = layout.Input(role=b"user", input_type=abi.INPUT_PROMPT)
            rkllm_input.prompt_input = b"hello"
            infer = layout.InferParam(mode=abi.INFER_GENERATE, keep_history=keep_history)
            states.clear()
            assert lib.cdll.rkllm_run(handle, ctypes.byref(rkllm_input), ctypes.byref(infer), None) == 0

        run(keep_history=1)
        assert states[-1] == abi.RUN_NORMAL  # paused: no FINISH
        assert lib.cdll.rkllm_clear_kv_cache(handle, 0, ctypes.byref(start), ctypes.byref(end)) != 0
        run(keep_history=0)
        assert lib.cdll.rkllm_clear_kv_cache(handle, 0, ctypes.byref(start), ctypes.byref(end)) == 0
        size = ctypes.c_int()
        assert lib.cdll.rkllm_get_kv_cache_size(handle, ctypes.byref(size)) == 0
        assert lib.cdll.rkllm_clear_kv_cache(handle, 0, None, None) == 0
        assert lib.cdll.rkllm_get_kv_cache_size(handle, ctypes.byref(size)) == 0 and size.value == 0
    finally:
        lib.cdll.rkllm_destroy(handle)


@pytest.mark.parametrize("tokenizer", [False, True], ids=["byte-tokens", "hf-tokenizer"])
@pytest.mark.parametrize("token", [-1, 100_000])
def test_detokenizing_an_id_outside_the_vocabulary_is_invalid_input(
    open_session: Callable[..., RkllmSession], tokenizer: bool, token: int
) -> None:
    session = open_session(tokenizer=tokenizer)
    assert session.detokenize([104, 105]) == "hi"
    with pytest.raises(InvalidInput, match=f"token id {token} is outside this model's vocabulary of "):
        session.detokenize([104, token])


def test_simulator_defaults_are_the_vendors(sims: dict[str, Path], family: str) -> None:
    """rkllm_createDefaultParam: the documented sampling defaults, n_batch 1, reserved zeroed."""
    from rkllama_ollama.runtime.rkllm import abi

    lib = _raw(sims, family)
    param = abi.default_param(lib.cdll, lib.layout)
    assert (param.top_k, param.mirostat) == (40, 0)
    assert [round(v, 4) for v in (param.top_p, param.temperature, param.repeat_penalty)] == [0.9, 0.8, 1.1]
    assert (param.frequency_penalty, param.presence_penalty) == (0.0, 0.0)
    assert [round(v, 4) for v in (param.mirostat_tau, param.mirostat_eta)] == [5.0, 0.1]
    extend = param.extend_param
    assert bytes(extend.reserved) == bytes(len(extend.reserved))
    if family != "C":
        assert (extend.enabled_cpus_num, extend.enabled_cpus_mask) == (4, 0xF0)
    if family in ("E", "F"):
        assert extend.n_batch == 1


def test_session_overrides_match_the_vendor_demos(
    open_session: Callable[..., RkllmSession], family: str
) -> None:
    """embed_flash=1, the big cores (by core count), reserved zeroed, starting from the default param."""
    from rkllama_ollama.runtime.rkllm.params import default_cpu_mask

    session = open_session()
    param = session._param
    extend = param.extend_param
    assert bytes(extend.reserved) == bytes(len(extend.reserved))
    assert param.model_path and param.skip_special_token
    if family != "C":
        assert extend.embed_flash == 1
        assert extend.enabled_cpus_mask == default_cpu_mask()
        assert extend.enabled_cpus_num == bin(default_cpu_mask()).count("1")


@pytest.mark.parametrize(
    ("cores", "mask"), [(8, 0xF0), (16, 0xF0), (4, 0x0F), (2, 0x03), (1, 0x01), (6, 0x0F)]
)
def test_default_cpu_mask_is_the_big_cores(cores: int, mask: int) -> None:
    from rkllama_ollama.runtime.rkllm.params import default_cpu_mask

    assert default_cpu_mask(cores) == mask
