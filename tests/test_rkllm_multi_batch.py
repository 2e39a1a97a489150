"""RKLLM multi-batch on the simulator: the runtime's n_batch arrays (raw ctypes) and the session that
batches waiting requests into one rkllm_run (runtime/rkllm/multi_batch.py)."""

from __future__ import annotations

import ctypes
import logging
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rkllama_ollama.runtime.base import Cancel, GenerationStats, LoadSpec, SamplingOptions
from rkllama_ollama.runtime.rkllm import abi, multi_batch
from rkllama_ollama.runtime.rkllm.library import RkllmLibrary, open_library
from rkllama_ollama.runtime.rkllm.multi_batch import MultiBatchRkllmSession
from rkllama_ollama.runtime.rkllm.session import RkllmRuntime, RkllmSession
from tests.rkllm_support.sim import build_simulators, write_byte_tokenizer, write_model

REPLY = "The quick brown fox jumps over the lazy dog, again and again."
PROMPTS = [
    "What is the capital of France?",
    "Name three colours.",
    "Count to five.",
    "Why is the sky blue?",
]
ANSWER = re.compile(r"^(.*) #([0-9a-f]{8})$")


@pytest.fixture(scope="module")
def sims() -> dict[str, Path]:
    return build_simulators()


@pytest.fixture(autouse=True)
def patient_gathering(monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests started together share a run even on a loaded machine: a longer gathering window."""
    monkeypatch.setattr(multi_batch, "GATHER_S", 0.5)


@pytest.fixture
def open_session(sims: dict[str, Path], tmp_path: Path) -> Iterator[Callable[..., RkllmSession]]:
    sessions: list[RkllmSession] = []

    def make(family: str, parallel: int = 1, tokenizer: bool = True, **keys: object) -> RkllmSession:
        folder = tmp_path / f"model{len(sessions)}"
        tokenizer_dir = write_byte_tokenizer(folder / "tokenizer") if tokenizer else None
        model = write_model(folder, reply=REPLY, reply_by_input=1, **keys)
        spec = LoadSpec(
            engine="rkllm",
            model_path=str(model),
            num_ctx=4096,
            tokenizer_dir=str(tokenizer_dir) if tokenizer_dir else None,
            parallel=parallel,
        )
        session = RkllmRuntime(str(sims[family])).load(spec)
        sessions.append(session)
        return session

    yield make
    for session in sessions:
        session.close()


def _generate(
    session: RkllmSession, prompt: str, cancel: Cancel | None = None, **options: Any
) -> tuple[str, Any]:
    pieces: list[str] = []
    stats = session.generate(prompt, SamplingOptions(temperature=0, **options), pieces.append, cancel)
    return "".join(pieces), stats


def _concurrently(
    session: RkllmSession, prompts: list[str], options: list[dict[str, Any]] | None = None
) -> list[tuple[str, GenerationStats]]:
    results: list[Any] = [None] * len(prompts)

    def one(index: int) -> None:
        results[index] = _generate(session, prompts[index], **(options[index] if options else {}))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert all(result is not None for result in results)
    return results


def _batch_sizes(caplog: pytest.LogCaptureFixture) -> list[int]:
    return [int(n) for n in re.findall(r"multi-batch run: (\d+) requests", caplog.text)]


# ------------------------------------------------------------------ the session


@pytest.mark.parametrize("family", ["E", "F"])
@pytest.mark.parametrize("tokenizer", [True, False], ids=["token-input", "prompt-input"])
def test_waiting_requests_share_one_run_and_each_gets_its_serial_answer(
    open_session: Callable[..., RkllmSession], family: str, tokenizer: bool, caplog: pytest.LogCaptureFixture
) -> None:
    serial = open_session(family, tokenizer=tokenizer)
    expected = [_generate(serial, prompt)[0] for prompt in PROMPTS]
    assert len(set(expected)) == len(PROMPTS) and all(ANSWER.match(text) for text in expected)
    assert len({len(text) for text in expected}) > 1  # elements finish at different steps
    batched = open_session(family, parallel=4, tokenizer=tokenizer)
    assert isinstance(batched, MultiBatchRkllmSession) and batched.info.parallel == 4
    with caplog.at_level(logging.INFO):
        results = _concurrently(batched, PROMPTS)
    assert [text for text, _ in results] == expected
    for (text, stats), prompt in zip(results, PROMPTS, strict=True):
        assert stats.done_reason == "stop" and stats.eval_count == len(text.encode())
        assert stats.prompt_eval_count == stats.prompt_tokens == len(batched.tokenize(prompt))
    assert sum(_batch_sizes(caplog)) == 4 and max(_batch_sizes(caplog)) >= 2


@pytest.mark.parametrize("family", ["E", "F"])
def test_requests_waiting_for_a_run_go_together_into_the_next(
    open_session: Callable[..., RkllmSession], family: str, caplog: pytest.LogCaptureFixture
) -> None:
    session = open_session(family, parallel=4, token_delay_ms=5)
    first_piece = threading.Event()
    pieces: list[str] = []

    def first() -> None:
        session.generate(PROMPTS[0], SamplingOptions(), lambda p: (pieces.append(p), first_piece.set()))

    runner = threading.Thread(target=first)
    with caplog.at_level(logging.INFO):
        runner.start()
        assert first_piece.wait(10)
        results = _concurrently(session, PROMPTS[1:])  # queued while the first run goes on
        runner.join(10)
    assert _batch_sizes(caplog) == [1, 3]
    serial = open_session(family)
    assert [text for text, _ in results] == [_generate(serial, p)[0] for p in PROMPTS[1:]]


@pytest.mark.parametrize("family", ["E", "F"])
def test_each_request_stops_at_its_own_num_predict(
    open_session: Callable[..., RkllmSession], family: str, caplog: pytest.LogCaptureFixture
) -> None:
    session = open_session(family, parallel=2)
    with caplog.at_level(logging.INFO):
        (short, short_stats), (full, full_stats) = _concurrently(
            session, PROMPTS[:2], [{"num_predict": 5}, {}]
        )
    assert _batch_sizes(caplog) == [2]
    assert short_stats.done_reason == "length" and short_stats.eval_count == 5 and len(short) == 5
    assert full_stats.done_reason == "stop" and ANSWER.match(full)


@pytest.mark.parametrize("family", ["E", "F"])
def test_a_cancelled_request_stops_and_the_others_go_on(
    open_session: Callable[..., RkllmSession], family: str
) -> None:
    session = open_session(family, parallel=2, token_delay_ms=2)
    cancel = Cancel()
    cancelled: list[Any] = []

    def emit(piece: str) -> None:
        cancelled.append(piece)
        if len(cancelled) == 3:
            cancel.set()

    def victim() -> None:
        cancelled.append(session.generate(PROMPTS[0], SamplingOptions(), emit, cancel))

    thread = threading.Thread(target=victim)
    thread.start()
    text, stats = _generate(session, PROMPTS[1])
    thread.join(10)
    assert cancelled[-1].done_reason == "abort" and len(cancelled) == 4
    assert stats.done_reason == "stop" and ANSWER.match(text)


@pytest.mark.parametrize("family", ["E", "F"])
def test_different_sampling_waits_for_the_next_run(
    open_session: Callable[..., RkllmSession], family: str, caplog: pytest.LogCaptureFixture
) -> None:
    session = open_session(family, parallel=3)
    with caplog.at_level(logging.INFO):
        results = _concurrently(session, PROMPTS[:3], [{}, {"top_k": 5}, {}])
    assert sorted(_batch_sizes(caplog)) == [1, 2]
    assert all(stats.done_reason == "stop" for _, stats in results)


@pytest.mark.parametrize("family", ["E", "F"])
def test_embeddings_on_a_multi_batch_handle_equal_the_serial_ones(
    open_session: Callable[..., RkllmSession], family: str
) -> None:
    batched = open_session(family, parallel=4).embed(["one", "two words"], truncate=True)
    serial = open_session(family).embed(["one", "two words"], truncate=True)
    assert batched.vectors == serial.vectors and batched.prompt_tokens == serial.prompt_tokens


@pytest.mark.parametrize("family", ["C", "D"])
def test_runtimes_before_multi_batch_serve_one_request_at_a_time(
    open_session: Callable[..., RkllmSession], family: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        session = open_session(family, parallel=4)
    assert not isinstance(session, MultiBatchRkllmSession) and session.info.parallel == 1
    assert "multi-batch needs RKLLM runtime 1.2.1 or later" in caplog.text


# ------------------------------------------------------------------ the simulator, through raw ctypes


class RawHandle:
    """An n_batch handle of the simulator driven by hand: results are recorded per element."""

    def __init__(self, library: RkllmLibrary, model: Path, n_batch: int, pause_at: int = 0) -> None:
        self.lib, self.layout = library.cdll, library.layout
        self.n_batch = n_batch
        self.pause_at = pause_at  # > 0: the callback returns 1 (pause) at this step
        self.steps: list[list[tuple[int, bytes | None]]] = []
        self.states: list[int] = []
        self.callback = self.layout.ResultCallback(self._on_result)
        param = abi.default_param(self.lib, self.layout)
        self.model = str(model).encode()
        param.model_path = self.model
        param.max_context_len = 4096
        param.extend_param.n_batch = n_batch
        self.param = param
        self.handle = ctypes.c_void_p()
        if self.layout.Callback is not None:
            self.callback_struct = self.layout.Callback(result_callback=self.callback)
            third: Any = ctypes.byref(self.callback_struct)
        else:
            third = self.callback
        self.init_rc = self.lib.rkllm_init(ctypes.byref(self.handle), ctypes.byref(param), third)
        if self.init_rc == 0:  # prompts as given: no template tokens in the caches
            self.lib.rkllm_set_chat_template(self.handle, b"", b"", b"")

    def _on_result(self, results: Any, userdata: Any, state: int) -> int:
        self.states.append(state)
        if state in (abi.RUN_NORMAL, abi.RUN_WAITING):
            step = [
                (int(results[i].token_id), ctypes.string_at(results[i].text) if results[i].text else None)
                for i in range(self.n_batch)
            ]
            self.steps.append(step)
            if self.pause_at and len(self.steps) == self.pause_at:
                return abi.CALLBACK_PAUSE
        return abi.CALLBACK_CONTINUE

    def run(self, prompts: list[bytes | None], keep_history: int = 0) -> int:
        inputs = (self.layout.Input * len(prompts))()
        for element, prompt in zip(inputs, prompts, strict=True):
            element.role = b"user"
            element.input_type = abi.INPUT_PROMPT
            element.prompt_input = prompt
        infer = self.layout.InferParam()
        infer.mode = abi.INFER_GENERATE
        infer.keep_history = keep_history
        first = ctypes.cast(inputs, ctypes.POINTER(self.layout.Input))
        return int(self.lib.rkllm_run(self.handle, first, ctypes.byref(infer), None))

    def text(self, element: int) -> bytes:
        return b"".join(step[element][1] or b"" for step in self.steps)

    def kv_sizes(self) -> list[int]:
        sizes = (ctypes.c_int * self.n_batch)()
        assert self.lib.rkllm_get_kv_cache_size(self.handle, sizes) == 0
        return list(sizes)

    def close(self) -> None:
        if self.handle.value:
            self.lib.rkllm_destroy(self.handle)


@pytest.fixture
def raw(sims: dict[str, Path], tmp_path: Path) -> Iterator[Callable[..., RawHandle]]:
    handles: list[RawHandle] = []

    def make(family: str, n_batch: int, pause_at: int = 0, **keys: object) -> RawHandle:
        model = write_model(tmp_path / f"raw{len(handles)}", reply=keys.pop("reply", REPLY), **keys)
        handle = RawHandle(open_library(str(sims[family])), model, n_batch, pause_at)
        handles.append(handle)
        return handle

    yield make
    for handle in handles:
        handle.close()


@pytest.mark.parametrize("family", ["E", "F"])
def test_results_arrive_as_an_array_and_finished_elements_report_minus_one(
    raw: Callable[..., RawHandle], family: str, capfd: pytest.CaptureFixture[str]
) -> None:
    handle = raw(family, 3, reply_by_input=1)
    assert handle.init_rc == 0
    assert "I rkllm: multi-batch: n_batch = 3" in capfd.readouterr().out
    prompts = [prompt.encode() for prompt in PROMPTS[:3]]
    assert handle.run(list(prompts)) == 0
    texts = [handle.text(i).decode() for i in range(3)]
    assert all(ANSWER.match(text) for text in texts) and len(set(texts)) == 3
    assert handle.states[-1] == abi.RUN_FINISH
    for element, text in enumerate(texts):  # one token per byte; -1 and NULL text once it has finished
        tokens = [step[element] for step in handle.steps]
        assert all(token >= 0 for token, _ in tokens[: len(text)])
        assert all(token == -1 and piece is None for token, piece in tokens[len(text) :])
    assert len(handle.steps) == max(len(text) for text in texts) > min(len(text) for text in texts)
    # keep_history=0: each element's cache holds its prompt and its reply
    assert handle.kv_sizes() == [len(p) + len(t) for p, t in zip(prompts, texts, strict=True)]


@pytest.mark.parametrize("family", ["E", "F"])
def test_each_element_keeps_its_own_history(raw: Callable[..., RawHandle], family: str) -> None:
    handle = raw(family, 2, reply="ok")
    assert handle.run([b"abc", b"defgh"], keep_history=1) == 0
    assert handle.kv_sizes() == [5, 7]
    assert handle.run([b"x", b"yz"], keep_history=1) == 0
    assert handle.kv_sizes() == [8, 11]
    assert handle.lib.rkllm_clear_kv_cache(handle.handle, 0, None, None) == 0
    assert handle.kv_sizes() == [0, 0]


@pytest.mark.parametrize("family", ["E", "F"])
def test_ranged_clear_works_per_element_after_a_pause(raw: Callable[..., RawHandle], family: str) -> None:
    handle = raw(family, 2, pause_at=1, reply="ok")
    assert handle.run([b"abcd", b"efghij"]) == 0
    assert abi.RUN_FINISH not in handle.states and handle.kv_sizes() == [5, 7]
    start, end = (ctypes.c_int * 2)(1, 0), (ctypes.c_int * 2)(3, 7)
    assert handle.lib.rkllm_clear_kv_cache(handle.handle, 0, start, end) == 0
    assert handle.kv_sizes() == [3, 0]
    bad_start, bad_end = (ctypes.c_int * 2)(0, 0), (ctypes.c_int * 2)(1, 1)  # element 1 is empty now
    assert handle.lib.rkllm_clear_kv_cache(handle.handle, 0, bad_start, bad_end) == -1


@pytest.mark.parametrize("family", ["E", "F"])
def test_a_single_input_where_n_batch_are_read_is_refused(
    raw: Callable[..., RawHandle], family: str, capfd: pytest.CaptureFixture[str]
) -> None:
    handle = raw(family, 2)
    assert handle.run([b"hello", None]) == -1  # what follows a lone struct: here a zeroed one
    assert "batch input 1 of 2: prompt is NULL" in capfd.readouterr().err
    assert handle.steps == []


@pytest.mark.parametrize("family", ["E", "F"])
def test_n_batch_limits(
    raw: Callable[..., RawHandle], family: str, capfd: pytest.CaptureFixture[str]
) -> None:
    assert raw(family, 17).init_rc == -1
    assert "n_batch 17 is more than the maximum (16)" in capfd.readouterr().err
    assert raw(family, 9).init_rc == 0
    assert "n_batch 9 is more than the recommended 8" in capfd.readouterr().err


def test_closing_ends_the_run_under_way_as_aborted(sims: dict[str, Path], tmp_path: Path) -> None:
    model = write_model(tmp_path / "slow", reply="x" * 400, token_delay_ms=5)
    spec = LoadSpec(engine="rkllm", model_path=str(model), num_ctx=4096, parallel=2)
    session = RkllmRuntime(str(sims["F"])).load(spec)
    started = threading.Event()
    outcome: list[Any] = []

    def request() -> None:
        outcome.append(session.generate("go", SamplingOptions(), lambda _piece: started.set()))

    thread = threading.Thread(target=request)
    thread.start()
    assert started.wait(10)
    session.close()
    thread.join(10)
    assert outcome[0].done_reason == "abort" and 0 < outcome[0].eval_count < 400


def test_why_a_load_is_served_one_request_at_a_time() -> None:
    from types import SimpleNamespace

    from rkllama_ollama.runtime.rkllm.abi import Family
    from rkllama_ollama.runtime.rkllm.multi_batch import multi_batch_unavailable

    def library(family: Family, version: str) -> Any:
        return SimpleNamespace(identity=SimpleNamespace(family=family, version=version))

    text = LoadSpec(engine="rkllm", model_path="m.rkllm", parallel=4)
    vision = LoadSpec(engine="rkllm", model_path="m.rkllm", parallel=4, vision={"encoder": "v.rknn"})
    assert multi_batch_unavailable(library(Family.F, "1.3.0"), text) is None
    assert multi_batch_unavailable(library(Family.E, "1.2.1"), text) is None
    assert "this is 1.1.4" in str(multi_batch_unavailable(library(Family.C, "1.1.4"), text))
    assert "this is 1.2.1b1" in str(multi_batch_unavailable(library(Family.D_PRIME, "1.2.1b1"), text))
    assert "not used for vision models" in str(multi_batch_unavailable(library(Family.F, "1.3.0"), vision))


@pytest.mark.parametrize("tokenizer", [True, False], ids=["token-input", "prompt-input"])
def test_free_places_get_a_one_token_input(
    open_session: Callable[..., RkllmSession], tokenizer: bool
) -> None:
    session = open_session("F", parallel=4, tokenizer=tokenizer)
    text, stats = _generate(session, PROMPTS[3])
    sizes = (ctypes.c_int * 4)()
    assert session._lib.rkllm_get_kv_cache_size(session._handle, sizes) == 0
    assert sizes[0] == stats.prompt_tokens + stats.eval_count
    # a pad holds its one token and what it generated until the run was stopped with the request's end
    assert all(1 < size <= 2 + stats.eval_count for size in sizes[1:])


@pytest.mark.parametrize(("family", "capable"), [("C", False), ("D", False), ("E", True), ("F", True)])
def test_the_daemon_tells_multi_batch_from_the_library_file_without_loading_it(
    family: str, capable: bool
) -> None:
    from rkllama_ollama.runtime.rkllm.library import has_multi_batch, version_without_loading
    from tests.rkllm_support.sim import SIM_VERSIONS, build_simulators

    path = str(build_simulators()[family])
    found = version_without_loading({"RKLLAMA_RKLLM_LIB": path})
    assert found is not None and found[1] == SIM_VERSIONS[family]
    assert has_multi_batch(found[1]) is capable
    # RKLLAMA_RKLLM_VERSION wins, as in the runner; an unknown version is "cannot tell"
    forced = version_without_loading({"RKLLAMA_RKLLM_LIB": path, "RKLLAMA_RKLLM_VERSION": "1.2.3"})
    assert forced is not None and has_multi_batch(forced[1]) is True
    assert has_multi_batch("9.9.9") is None


def test_without_a_library_the_daemon_cannot_tell_and_leaves_it_to_the_runner(tmp_path: Path) -> None:
    from rkllama_ollama.runtime.rkllm.library import version_without_loading

    assert version_without_loading({"RKLLAMA_RKLLM_LIB": str(tmp_path / "missing.so")}) is None


def test_requests_cancelled_while_waiting_take_no_place_in_the_run() -> None:
    import collections

    def waiting(temperature: float, cancelled: bool = False) -> Any:
        cancel = threading.Event()
        if cancelled:
            cancel.set()
        return multi_batch._Request([1], SamplingOptions(temperature=temperature), lambda _p: None, cancel, 0)

    session = MultiBatchRkllmSession.__new__(MultiBatchRkllmSession)  # only the queue and n_batch are read
    gone_first, gone_later = waiting(0.9, cancelled=True), waiting(0.0, cancelled=True)
    live = [waiting(0.0) for _ in range(3)]
    other = waiting(0.5)
    session._queue = collections.deque([gone_first, live[0], gone_later, other, live[1], live[2]])
    session._n_batch = 3
    batch = session._take_batch()
    # the three live requests with the first live request's sampling fill the run; the cancelled ones
    # come along to be ended at once (the first of them does not choose the run's sampling)
    assert [request for request in batch if not request.cancel.is_set()] == live
    assert gone_first in batch and gone_later in batch
    assert list(session._queue) == [other]
