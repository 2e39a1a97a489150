"""RKLLM multi-batch (experimental; RKLLAMA_RKLLM_MULTI_BATCH): several requests in one rkllm_run.

From runtime 1.2.1 (families E and F) a handle can be initialised with `extend_param.n_batch` > 1:
`rkllm_run` then reads an array of n_batch `RKLLMInput`, every callback carries an array of n_batch
`RKLLMResult` (one step of each element), an element that has finished reports token_id -1 while the
others go on, and each element has a KV cache of its own. On the NPU a decode step is bound by reading
the weights, so a step for several elements costs little more than a step for one.

How this session uses it:
- one batch thread owns the handle; each `generate` (the runner calls each in a thread of its own,
  because `info.parallel` > 1) queues its request and waits. The thread gathers the waiting requests
  (up to n_batch; after the first arrives it waits up to GATHER_S for company) into one run and
  streams each element's pieces to its own request;
- every run is single-turn (keep_history = 0) and feeds each prompt whole: no prefix reuse and no
  conversation caches, the price of sharing one handle between conversations;
- a run always passes n_batch inputs (the runtime reads that many): free places get a one-token input
  (cheap to prefill) and their output is dropped;
- sampling is set per run (F: RKLLMSamplingParam; E: at init, so a change re-initialises the handle),
  so a run only takes requests whose sampling options are equal; the others wait for the next run.
  num_predict: F bounds the run by the largest request's limit; each request stops at its own limit
  here, and when every request of the run has ended the run is aborted;
- a request cancelled mid-run stops receiving pieces; the others go on;
- embeddings (hidden-layer runs) put the input first, one-token pads after it, and read the first element.
"""

from __future__ import annotations

import codecs
import collections
import ctypes
import logging
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

from rkllama_ollama.runtime.base import (
    RKLLM_MAX_BATCH,
    Cancel,
    DoneReason,
    EmbedResult,
    EmitPiece,
    GenerationStats,
    LoadSpec,
    RuntimeFailure,
    SamplingOptions,
)
from rkllama_ollama.runtime.rkllm import abi
from rkllama_ollama.runtime.rkllm.abi import Family
from rkllama_ollama.runtime.rkllm.library import RkllmLibrary
from rkllama_ollama.runtime.rkllm.params import sampling_key
from rkllama_ollama.runtime.rkllm.session import RkllmSession

log = logging.getLogger(__name__)

GATHER_S = 0.05  # how long a lone request waits for others to share its run


def multi_batch_unavailable(library: RkllmLibrary, spec: LoadSpec) -> str | None:
    """Why `spec` (asking for `parallel` > 1) is served one request at a time, or None."""
    if library.identity.family < Family.E:
        return (
            f"multi-batch needs RKLLM runtime 1.2.1 or later, this is {library.identity.version}: "
            "serving one request at a time"
        )
    if spec.vision.get("encoder"):
        return "multi-batch is not used for vision models: serving one request at a time"
    return None


@dataclass(eq=False)
class _Request:
    """One request of a run; its fields are written by the callback thread during the run."""

    tokens: list[int]
    options: SamplingOptions
    emit: EmitPiece
    cancel: Cancel
    limit: int  # > 0: stop after this many tokens
    decoder: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))
    token_ids: list[int] = field(default_factory=list)
    started: float = 0.0
    first_token_at: float | None = None
    ended_at: float | None = None
    reason: DoneReason | None = None  # set when the request has ended
    emit_error: BaseException | None = None
    stats: GenerationStats | None = None
    error: BaseException | None = None
    finished: threading.Event = field(default_factory=threading.Event)

    def end(self, reason: DoneReason) -> None:
        if not self.reason:
            self.reason = reason
            self.ended_at = time.perf_counter()


@dataclass(eq=False)
class _BatchRun:
    """What one multi-batch rkllm_run produced."""

    requests: list[_Request]
    hidden_mode: bool = False
    finished: bool = False
    failed: bool = False
    abort_sent: bool = False
    hidden: list[float] | None = None


class MultiBatchRkllmSession(RkllmSession):
    """A .rkllm model on a handle with n_batch > 1 (families E/F). See the module docstring."""

    def __init__(self, library: RkllmLibrary, spec: LoadSpec) -> None:
        self._n_batch = max(2, min(spec.parallel, RKLLM_MAX_BATCH))
        self._batch: _BatchRun | None = None
        super().__init__(library, spec)
        self.info = replace(self.info, parallel=self._n_batch)
        self._run_lock = threading.Lock()  # one rkllm_run at a time: batches and embeddings
        self._queue: collections.deque[_Request] = collections.deque()
        self._wake = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._batch_loop, name="rkllm-multi-batch", daemon=True)
        self._thread.start()
        log.info(
            "RKLLM multi-batch (experimental): up to %d requests per run (runtime %s)",
            self._n_batch,
            self._version,
        )

    def _build_param(self, sampling: SamplingOptions) -> Any:
        param = super()._build_param(sampling)
        param.extend_param.n_batch = self._n_batch
        return param

    # ------------------------------------------------------------------ requests

    def generate(
        self, prompt: str, options: SamplingOptions, emit: EmitPiece, cancel: Cancel | None = None
    ) -> GenerationStats:
        # The sampling options are loaded by the batch thread, under the run lock.
        tokens, cancelled = self._admit_prompt(prompt, options, cancel, load_sampling=False)
        if cancelled is not None:
            return cancelled
        request = _Request(tokens, options, emit, cancel or Cancel(), self._request_limit(options))
        request.started = time.perf_counter()
        with self._wake:
            if self._closing:
                raise RuntimeFailure("the model has been unloaded")
            self._queue.append(request)
            self._wake.notify()
        request.finished.wait()
        if request.error is not None:
            raise request.error
        assert request.stats is not None
        return request.stats

    # ------------------------------------------------------------------ the batch thread

    def _batch_loop(self) -> None:
        while True:
            with self._wake:
                while not self._closing and not self._queue:
                    self._wake.wait()
                if not self._closing:
                    deadline = self._queue[0].started + GATHER_S
                    while not self._closing and len(self._queue) < self._n_batch:
                        remaining = deadline - time.perf_counter()
                        if remaining <= 0:
                            break
                        self._wake.wait(remaining)
                if self._closing:
                    left = list(self._queue)
                    self._queue.clear()
                    break
                batch = self._take_batch()
            try:
                self._run_batch(batch)
            except Exception as exc:  # noqa: BLE001 - every request of the run gets the failure
                log.exception("RKLLM multi-batch run failed")
                error = exc if isinstance(exc, RuntimeFailure) else RuntimeFailure(f"multi-batch run: {exc}")
                for request in batch:
                    if request.stats is None:
                        request.error = error
            finally:
                for request in batch:
                    request.finished.set()
        for request in left:
            request.error = RuntimeFailure("the model has been unloaded")
            request.finished.set()

    def _take_batch(self) -> list[_Request]:
        """The first waiting request and, in arrival order, the others with the same sampling, up to
        n_batch; requests cancelled while they waited come along too (they end at once and take no
        place in the run)."""
        waiting = [request for request in self._queue if not request.cancel.is_set()]
        key = sampling_key(waiting[0].options) if waiting else None
        batch: list[_Request] = []
        places = 0
        kept: collections.deque[_Request] = collections.deque()
        while self._queue:
            request = self._queue.popleft()
            if request.cancel.is_set():
                batch.append(request)
            elif places < self._n_batch and sampling_key(request.options) == key:
                batch.append(request)
                places += 1
            else:
                kept.append(request)
        self._queue = kept
        return batch

    def _run_batch(self, batch: list[_Request]) -> None:
        for request in batch:
            if request.cancel.is_set():
                request.end(DoneReason.ABORT)
                request.stats = self._cancelled_before_start(request.tokens)
        live = [request for request in batch if request.stats is None]
        if not live:
            return
        options = live[0].options
        with self._run_lock:
            self._ensure_sampling(options)
            limits = [request.limit for request in live]
            num_predict = 0 if 0 in limits else max(limits)
            keepalive: list[Any] = []  # what the inputs point at, alive until rkllm_run returns
            inputs = self._batch_inputs([request.tokens for request in live], keepalive)
            infer = self._make_infer(abi.INFER_GENERATE, False, options, num_predict)
            run = _BatchRun(live)
            started = time.perf_counter()
            rc = self._execute_batch(run, inputs, infer)
            ended = time.perf_counter()
        for request in live:
            self._finish(request, run, rc, ended)
        log.info(
            "multi-batch run: %d requests in n_batch %d, %d tokens generated in %.0f ms",
            len(live),
            self._n_batch,
            sum(len(request.token_ids) for request in live),
            (ended - started) * 1e3,
        )

    def _batch_inputs(self, feeds: list[list[int]], keepalive: list[Any]) -> Any:
        """n_batch RKLLMInput: `feeds`, then one-token inputs in the free places (the runtime reads n_batch
        inputs whatever the number of requests; a one-token pad adds nearly nothing to the prefill, and
        what it generates is dropped)."""
        inputs = (self._layout.Input * self._n_batch)()
        first = feeds[-1][0]
        # Token input: the first token of the last prompt. Text: its first byte, unless that would be
        # half a character (then a space).
        pad = [first if self._tokenizer.feeds_tokens or first < 0x80 else 0x20]
        for index in range(self._n_batch):
            inputs[index] = self._make_input(feeds[index] if index < len(feeds) else pad, keepalive)
        return inputs

    def _execute_batch(self, run: _BatchRun, inputs: Any, infer: Any) -> int:
        with self._handle_lock:
            if not self._handle.value:
                raise RuntimeFailure("the RKLLM session is closed")
            self._batch = run
            handle = self._handle
        try:
            first = ctypes.cast(inputs, ctypes.POINTER(self._layout.Input))
            return int(self._lib.rkllm_run(handle, first, ctypes.byref(infer), None))
        finally:
            with self._handle_lock:
                self._batch = None

    def _finish(self, request: _Request, run: _BatchRun, rc: int, ended: float) -> None:
        tail = request.decoder.decode(b"", final=True)
        if tail and request.reason != DoneReason.ABORT and request.emit_error is None:
            try:
                request.emit(tail)
            except BaseException as exc:  # noqa: BLE001 - raised to this request's caller
                request.emit_error = exc
        if request.emit_error is not None:
            request.error = request.emit_error
            return
        if run.failed or (rc != 0 and not run.abort_sent):
            request.error = RuntimeFailure(
                self._run_error_message(rc, len(request.tokens), self._context_limit)
            )
            return
        eval_count = len(request.token_ids)
        reason = request.reason or DoneReason.STOP
        if reason == DoneReason.STOP and len(request.tokens) + eval_count >= self._context_limit:
            reason = DoneReason.LENGTH
        first = request.first_token_at if request.first_token_at is not None else ended
        last = request.ended_at if request.ended_at is not None else ended
        request.stats = GenerationStats(
            done_reason=reason,
            prompt_tokens=len(request.tokens),
            prompt_eval_count=len(request.tokens),  # single-turn runs: every prompt is fed whole
            prompt_eval_ns=int((first - request.started) * 1e9),
            eval_count=eval_count,
            eval_ns=int((last - first) * 1e9),
            context=request.tokens + request.token_ids,
            reload_ns=self.last_reload_ns,
        )

    # ------------------------------------------------------------------ callback

    def _on_result(self, result_p: Any, userdata: Any, state: int) -> int:
        try:
            run = self._batch
            if run is not None and result_p:
                self._handle_batch(run, result_p, state)
        except BaseException:  # noqa: BLE001 - nothing may escape into the native thread
            log.exception("error in the rkllm multi-batch callback")
        return abi.CALLBACK_CONTINUE

    def _handle_batch(self, run: _BatchRun, results: Any, state: int) -> None:
        """`results` points at n_batch RKLLMResult; element i belongs to run.requests[i] (the elements
        after the run's requests are padding)."""
        if state == abi.RUN_FINISH:
            run.finished = True
            for request in run.requests:
                request.end(DoneReason.STOP)
            return
        if state == abi.RUN_ERROR:
            run.failed = True
            return
        if state not in (abi.RUN_NORMAL, abi.RUN_WAITING):
            return
        if run.hidden_mode:
            layer = results[0].last_hidden_layer
            if layer.hidden_states and layer.embd_size > 0 and layer.num_tokens > 0:
                start = (layer.num_tokens - 1) * layer.embd_size
                run.hidden = layer.hidden_states[start : start + layer.embd_size]
            return
        now = time.perf_counter()
        for index, request in enumerate(run.requests):
            if not request.reason:
                self._take_step(request, results[index], now)
        if all(request.reason for request in run.requests) and not run.abort_sent:
            run.abort_sent = True  # only padding (or nothing) is left to generate
            handle = self._handle
            if handle.value:
                self._lib.rkllm_abort(handle)

    def _take_step(self, request: _Request, result: Any, now: float) -> None:
        if request.cancel.is_set():
            request.end(DoneReason.ABORT)
            return
        token_id = int(result.token_id)
        if token_id < 0:  # this element has finished; the others go on
            request.end(DoneReason.STOP)
            return
        if request.first_token_at is None:
            request.first_token_at = now
        request.token_ids.append(token_id)
        if result.text:  # NULL while a character is incomplete
            piece = request.decoder.decode(ctypes.string_at(result.text))
            if piece:
                try:
                    request.emit(piece)
                except BaseException as exc:  # noqa: BLE001 - raised to this request's caller
                    request.emit_error = exc
                    request.end(DoneReason.ABORT)
                    return
        if request.limit > 0 and len(request.token_ids) >= request.limit:
            request.end(DoneReason.LENGTH)

    # ------------------------------------------------------------------ embeddings

    def embed(self, inputs: list[str], truncate: bool) -> EmbedResult:
        return self._embed_inputs(inputs, truncate)  # batches keep no conversation to forget

    def _hidden_state(self, tokens: list[int]) -> tuple[list[float] | None, int]:
        keepalive: list[Any] = []
        batch_inputs = self._batch_inputs([tokens], keepalive)
        infer = self._make_infer(abi.INFER_GET_LAST_HIDDEN_LAYER, False, None, 0)
        run = _BatchRun([], hidden_mode=True)
        with self._run_lock:
            rc = self._execute_batch(run, batch_inputs, infer)
        return (None if run.failed or rc != 0 else run.hidden), rc

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        with self._wake:
            self._closing = True
            self._wake.notify()
        with self._handle_lock:  # a run under way ends at its next step
            run = self._batch
            if run is not None and self._handle.value:
                for request in run.requests:
                    request.end(DoneReason.ABORT)
                run.abort_sent = True
                self._lib.rkllm_abort(self._handle)
        self._thread.join()
        super().close()
