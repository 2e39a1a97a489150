"""RKLLM engine: RkllmRuntime.load(spec) -> RkllmSession (the runtime/base.py Session protocol).

One session owns one rkllm handle. Runs in the runner child process only.

- rkllm_run is called on the thread that calls generate(); the runtime delivers callbacks on its
  own thread while that call blocks, and `emit` is called from the callback (never concurrently
  with the generate() caller, which is blocked in rkllm_run).
- KV prefix reuse (families D/E/F): the session remembers the tokens in the runtime's cache, runs
  with keep_history=1 and feeds only the new suffix; when the prompt diverges it clears the cache
  and feeds the whole prompt. Family C has no history: every prompt is fed whole.
- Sampling: on F per request through RKLLMSamplingParam; on C/D/E sampling lives in RKLLMParam,
  so a request whose sampling differs from the loaded values re-initialises the handle (destroy +
  init: the model is loaded again, seconds on a device; the time is in `last_reload_ns`, and the
  KV cache starts empty).
- num_predict: on F through RKLLMInferParam.max_new_tokens; on C/D/E the session aborts the run
  when the count is reached.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rkllama_ollama.runtime.base import (
    Cancel,
    ContextOverflow,
    EmbedResult,
    EmitPiece,
    GenerationStats,
    LoadSpec,
    ModelInfo,
    RuntimeFailure,
    SamplingOptions,
)
from rkllama_ollama.runtime.rkllm import abi
from rkllama_ollama.runtime.rkllm.abi import Family
from rkllama_ollama.runtime.rkllm.library import RkllmLibrary, open_library
from rkllama_ollama.runtime.rkllm.params import load_params, sampling_key
from rkllama_ollama.runtime.rkllm.tokens import PromptTokenizer, load_tokenizer, resolve_tokenizer_dir

log = logging.getLogger(__name__)

_CONTEXT_LIMIT = re.compile(r"max_context_limit:\s*(\d+)")
_LIBC = ctypes.CDLL(None)


@contextlib.contextmanager
def capture_native_output(sink: list[str]) -> Iterator[None]:
    """Redirect fds 1 and 2 (C stdio included) into `sink` lines for the duration of the block."""
    _LIBC.fflush(None)
    saved = (os.dup(1), os.dup(2))
    with tempfile.TemporaryFile() as scratch:
        try:
            os.dup2(scratch.fileno(), 1)
            os.dup2(scratch.fileno(), 2)
            yield
        finally:
            _LIBC.fflush(None)
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            scratch.seek(0)
            sink.extend(scratch.read().decode("utf-8", "replace").splitlines())


def _common_prefix_length(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class _Run:
    """What one rkllm_run produced, filled in by the callback thread."""

    emit: EmitPiece | None
    num_predict: int  # > 0: stop after this many tokens
    abort_on_limit: bool  # C/D/E: enforce num_predict by aborting
    hidden_mode: bool = False
    decoder: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))
    token_ids: list[int] = field(default_factory=list)
    text_bytes: bytearray = field(default_factory=bytearray)
    first_token_at: float | None = None
    finished: bool = False
    failed: bool = False
    aborted: bool = False  # the request's Cancel was set
    limit_reached: bool = False
    abort_sent_from_callback: bool = False
    emit_error: BaseException | None = None
    perf: tuple[float, int, float, int] | None = None
    hidden: list[float] | None = None
    embd_size: int = 0


class RkllmSession:
    """One loaded .rkllm model."""

    def __init__(self, library: RkllmLibrary, spec: LoadSpec) -> None:
        self._lib = library.cdll
        self._layout = library.layout
        self._family = library.identity.family
        self._version = library.identity.version
        self._spec = spec
        self._model_path = os.fsencode(spec.model_path)
        self._load = load_params(spec.params, spec.num_ctx)
        tokenizer_dir = resolve_tokenizer_dir(spec.tokenizer_dir, spec.model_path)
        self._tokenizer: PromptTokenizer
        self._tokenizer, facts = load_tokenizer(tokenizer_dir)
        self._eos_id = self._tokenizer.token_id(facts.eos_token)
        self._handle = ctypes.c_void_p()
        self._handle_lock = threading.Lock()  # guards _handle and _run against a cancel and close()
        self._run: _Run | None = None
        self._cached: list[int] = []  # tokens (or bytes) believed to be in the runtime's KV cache
        self._kv_dirty = False  # the cache holds something we cannot describe: clear before reuse
        self._loaded_sampling = self._load.sampling
        self.last_reload_ns = 0  # time spent re-initialising for the last generate() (C/D/E)
        self._callback = self._layout.ResultCallback(self._on_result)
        self._callback_struct: Any = None
        self._param: Any = None
        self._context_limit = self._load.num_ctx
        self._init_handle(self._loaded_sampling)
        self.info = ModelInfo(
            context_length=self._context_limit,
            chat_template=facts.chat_template,
            bos_token=facts.bos_token,
            eos_token=facts.eos_token,
            add_bos_token=facts.add_bos_token,
        )

    # ------------------------------------------------------------------ init / destroy

    def _build_param(self, sampling: SamplingOptions) -> Any:
        load = self._load
        param = abi.default_param(self._lib, self._layout)
        param.model_path = self._model_path
        param.max_context_len = load.num_ctx
        # Generation is bounded per request (see module doc); the init value only has to be large.
        param.max_new_tokens = load.max_new_tokens if load.max_new_tokens > 0 else load.num_ctx
        param.top_k = int(sampling.top_k)
        param.top_p = float(sampling.top_p)
        param.temperature = float(sampling.temperature)
        param.repeat_penalty = float(sampling.repeat_penalty)
        param.frequency_penalty = float(sampling.frequency_penalty)
        param.presence_penalty = float(sampling.presence_penalty)
        param.mirostat = load.mirostat
        param.mirostat_tau = load.mirostat_tau
        param.mirostat_eta = load.mirostat_eta
        param.skip_special_token = True
        param.is_async = False
        extend = param.extend_param
        extend.base_domain_id = load.base_domain_id
        if self._family >= Family.D:
            param.n_keep = load.n_keep
            extend.embed_flash = 1 if load.embed_flash else 0
            extend.enabled_cpus_mask = load.cpu_mask
            extend.enabled_cpus_num = bin(load.cpu_mask).count("1")
        if self._family >= Family.E:
            extend.n_batch = 1
            extend.use_cross_attn = 0
        ctypes.memset(ctypes.addressof(extend.reserved), 0, ctypes.sizeof(extend.reserved))
        return param

    def _init_handle(self, sampling: SamplingOptions) -> None:
        self._param = self._build_param(sampling)
        if self._layout.Callback is not None:
            self._callback_struct = self._layout.Callback(result_callback=self._callback)
            third: Any = ctypes.byref(self._callback_struct)
        else:
            third = self._callback
        handle = ctypes.c_void_p()
        output: list[str] = []
        with capture_native_output(output):
            rc = self._lib.rkllm_init(ctypes.byref(handle), ctypes.byref(self._param), third)
        for line in output:
            log.info("rkllm: %s", line)
        if rc != 0 or not handle.value:
            errors = [line for line in output if line.startswith("E ")]
            detail = "; ".join(errors[-3:]) if errors else f"rkllm_init returned {rc}"
            raise RuntimeFailure(
                f"could not load {self._spec.model_path} with the RKLLM runtime {self._version}: {detail}"
            )
        for line in output:
            match = _CONTEXT_LIMIT.search(line)
            if match and 0 < int(match.group(1)) < self._load.num_ctx:
                self._context_limit = int(match.group(1))
        if self._family >= Family.D:
            # The server renders the full prompt; blank the runtime's own chat template.
            rc = self._lib.rkllm_set_chat_template(handle, b"", b"", b"")
            if rc != 0:
                log.warning("rkllm_set_chat_template returned %d", rc)
        with self._handle_lock:
            self._handle = handle
        self._cached = []
        self._kv_dirty = False
        self._loaded_sampling = sampling

    def _destroy_handle(self) -> None:
        with self._handle_lock:
            handle, self._handle = self._handle, ctypes.c_void_p()
        if handle.value:
            self._lib.rkllm_destroy(handle)

    def close(self) -> None:
        self._destroy_handle()

    # ------------------------------------------------------------------ callback

    def _on_result(self, result_p: Any, userdata: Any, state: int) -> int:
        try:
            run = self._run
            if run is not None and result_p:
                self._handle_result(run, result_p.contents, state)
        except BaseException:  # noqa: BLE001 - nothing may escape into the native thread
            log.exception("error in the rkllm callback")
        return abi.CALLBACK_CONTINUE

    def _handle_result(self, run: _Run, result: Any, state: int) -> None:
        if state == abi.RUN_FINISH:
            run.finished = True
            if self._layout.has_perf:
                perf = result.perf
                run.perf = (
                    perf.prefill_time_ms,
                    perf.prefill_tokens,
                    perf.generate_time_ms,
                    perf.generate_tokens,
                )
            return
        if state == abi.RUN_ERROR:
            run.failed = True
            return
        if run.hidden_mode:
            if state == self._layout.hidden_layer_state:
                layer = result.last_hidden_layer
                if layer.hidden_states and layer.embd_size > 0 and layer.num_tokens > 0:
                    start = (layer.num_tokens - 1) * layer.embd_size
                    run.hidden = layer.hidden_states[start : start + layer.embd_size]
                    run.embd_size = layer.embd_size
            return
        if state not in (abi.RUN_NORMAL, abi.RUN_WAITING):
            return
        if run.first_token_at is None:
            run.first_token_at = time.perf_counter()
        run.token_ids.append(int(result.token_id))
        stopping = run.aborted or run.limit_reached or run.emit_error is not None
        if stopping:
            self._abort_from_callback(run)
            return
        if state == abi.RUN_NORMAL and result.text:
            data = ctypes.string_at(result.text)
            run.text_bytes += data
            piece = run.decoder.decode(data)
            if piece and run.emit is not None:
                try:
                    run.emit(piece)
                except BaseException as exc:  # noqa: BLE001 - re-raised by generate()
                    run.emit_error = exc
                    self._abort_from_callback(run)
                    return
        if run.num_predict > 0 and len(run.token_ids) >= run.num_predict:
            run.limit_reached = True
            if run.abort_on_limit:
                self._abort_from_callback(run)

    def _abort_from_callback(self, run: _Run) -> None:
        if not run.abort_sent_from_callback:
            run.abort_sent_from_callback = True
            handle = self._handle
            if handle.value:
                self._lib.rkllm_abort(handle)

    # ------------------------------------------------------------------ running

    def _execute(self, run: _Run, rkllm_input: Any, infer: Any, cancel: Cancel | None = None) -> int:
        with self._handle_lock:
            if not self._handle.value:
                raise RuntimeFailure("the RKLLM session is closed")
            self._run = run
            handle = self._handle

        def interrupt() -> None:
            # Also flagged on the run: an rkllm_abort that lands before rkllm_run has really begun may
            # be lost, and the callback then aborts at the first token it sees.
            run.aborted = True
            with self._handle_lock:
                if self._handle.value:
                    self._lib.rkllm_abort(self._handle)
            log.info("rkllm generation abort requested")

        try:
            with cancel.interrupting(interrupt) if cancel is not None else contextlib.nullcontext():
                return int(self._lib.rkllm_run(handle, ctypes.byref(rkllm_input), ctypes.byref(infer), None))
        finally:
            with self._handle_lock:
                self._run = None

    def _make_input(self, feed: list[int], keepalive: list[Any]) -> Any:
        rkllm_input = self._layout.Input()
        if self._layout.has_role:
            rkllm_input.role = b"user"
            rkllm_input.enable_thinking = False
        if self._tokenizer.feeds_tokens:
            ids = (ctypes.c_int32 * len(feed))(*feed)
            keepalive.append(ids)
            rkllm_input.input_type = abi.INPUT_TOKEN
            rkllm_input.token_input.input_ids = ctypes.cast(ids, ctypes.POINTER(ctypes.c_int32))
            rkllm_input.token_input.n_tokens = len(feed)
        else:
            text = bytes(feed)
            keepalive.append(text)
            rkllm_input.input_type = abi.INPUT_PROMPT
            rkllm_input.prompt_input = text
        return rkllm_input

    def _make_infer(
        self, mode: int, keep_history: bool, options: SamplingOptions | None, num_predict: int
    ) -> Any:
        infer = self._layout.InferParam()
        infer.mode = mode
        if self._layout.has_keep_history:
            infer.keep_history = 1 if keep_history else 0
        if self._family == Family.F and options is not None:
            assert self._layout.SamplingParam is not None
            sampling = self._layout.SamplingParam(
                top_k=int(options.top_k),
                top_p=float(options.top_p),
                temperature=float(options.temperature),
                repeat_penalty=float(options.repeat_penalty),
                frequency_penalty=float(options.frequency_penalty),
                presence_penalty=float(options.presence_penalty),
                mirostat=self._load.mirostat,
                mirostat_tau=self._load.mirostat_tau,
                mirostat_eta=self._load.mirostat_eta,
            )
            infer.sampling_params = ctypes.pointer(sampling)
            infer.max_new_tokens = num_predict if num_predict > 0 else 0
        return infer

    def _clear_cache(self) -> None:
        self._cached = []
        self._kv_dirty = False
        if self._family == Family.C:
            return
        if self._family >= Family.E:
            rc = self._lib.rkllm_clear_kv_cache(self._handle, 0, None, None)
        else:
            rc = self._lib.rkllm_clear_kv_cache(self._handle, 0)
        if rc != 0:
            raise RuntimeFailure(f"rkllm_clear_kv_cache failed ({rc})")

    def _ensure_sampling(self, options: SamplingOptions) -> None:
        self.last_reload_ns = 0
        if self._family == Family.F or sampling_key(options) == sampling_key(self._loaded_sampling):
            return
        started = time.perf_counter_ns()
        self._destroy_handle()
        self._init_handle(options)
        self.last_reload_ns = time.perf_counter_ns() - started
        log.info(
            "re-initialised the RKLLM model for new sampling options in %.1f ms (runtime %s)",
            self.last_reload_ns / 1e6,
            self._version,
        )

    def _request_limit(self, options: SamplingOptions) -> int:
        if options.num_predict > 0:
            return options.num_predict
        return self._load.max_new_tokens if self._load.max_new_tokens > 0 else 0

    def generate(
        self, prompt: str, options: SamplingOptions, emit: EmitPiece, cancel: Cancel | None = None
    ) -> GenerationStats:
        tokens = self._tokenizer.encode(prompt)
        if not tokens:
            raise RuntimeFailure("the prompt is empty")
        if cancel is not None and cancel.is_set():
            return self._cancelled_before_start(tokens)
        if options.top_logprobs >= 0:
            log.info("log-probabilities are not available from the RKLLM runtime: none are returned")
        self._ensure_sampling(options)
        context = self._context_limit
        if len(tokens) >= context:
            raise ContextOverflow(
                f"the prompt is {len(tokens)} tokens but the context window is {context} tokens (num_ctx); "
                "shorten the conversation or raise num_ctx"
            )
        keep_history = self._family >= Family.D
        feed = tokens
        if keep_history:
            if self._kv_dirty:
                self._clear_cache()
            common = _common_prefix_length(self._cached, tokens)
            if common == len(self._cached) and common < len(tokens):
                feed = tokens[common:]
            elif self._cached:
                log.debug(
                    "prompt diverges from the KV cache at %d of %d: clearing", common, len(self._cached)
                )
                self._clear_cache()
        num_predict = self._request_limit(options)
        run = _Run(emit=emit, num_predict=num_predict, abort_on_limit=self._family != Family.F)
        keepalive: list[Any] = []
        rkllm_input = self._make_input(feed, keepalive)
        infer = self._make_infer(abi.INFER_GENERATE, keep_history, options, num_predict)
        started = time.perf_counter()
        rc = self._execute(run, rkllm_input, infer, cancel)
        ended = time.perf_counter()
        tail = run.decoder.decode(b"", final=True)
        if tail and not run.aborted and run.emit_error is None:
            emit(tail)
        if run.emit_error is not None:
            self._kv_dirty = True
            raise run.emit_error
        generated = run.token_ids
        if run.failed or (rc != 0 and not run.aborted and not run.limit_reached):
            self._kv_dirty = True
            raise RuntimeFailure(self._run_error_message(rc, len(tokens), context))
        stopped_early = run.aborted or (run.limit_reached and run.abort_on_limit)
        self._remember_cache(tokens, generated, run, keep_history, stopped_early)
        return self._stats(tokens, feed, run, started, ended, context)

    def _run_error_message(self, rc: int, prompt_tokens: int, context: int) -> str:
        return (
            f"the RKLLM runtime reported an error during generation (rc={rc}; prompt {prompt_tokens} tokens, "
            f"context window {context} tokens); see the runner log for the runtime's message"
        )

    def _remember_cache(
        self, tokens: list[int], generated: list[int], run: _Run, keep_history: bool, stopped_early: bool
    ) -> None:
        if not keep_history:
            return
        if self._tokenizer.feeds_tokens:
            expected = tokens + generated
            if self._family >= Family.E:
                self._reconcile_with_runtime(expected)
            elif stopped_early:
                self._kv_dirty = True
            else:
                self._cached = expected
        elif stopped_early:
            # Prompt mode: what an interrupted run left in the cache is not known exactly.
            self._kv_dirty = True
        else:
            self._cached = tokens + list(bytes(run.text_bytes))

    def _reconcile_with_runtime(self, expected: list[int]) -> None:
        size = ctypes.c_int(-1)
        if self._lib.rkllm_get_kv_cache_size(self._handle, ctypes.byref(size)) != 0 or size.value < 0:
            self._kv_dirty = True
            return
        held = size.value
        if held == len(expected):
            self._cached = expected
        elif held == len(expected) + 1 and self._eos_id is not None:
            self._cached = expected + [self._eos_id]
        elif held < len(expected):
            self._cached = expected[:held]
        else:
            log.warning(
                "KV cache holds %d tokens, expected %d: clearing before the next turn", held, len(expected)
            )
            self._kv_dirty = True

    def _stats(
        self, tokens: list[int], feed: list[int], run: _Run, started: float, ended: float, context: int
    ) -> GenerationStats:
        eval_count = len(run.token_ids)
        first = run.first_token_at if run.first_token_at is not None else ended
        if run.perf is not None:
            if run.perf[1] != len(feed):
                log.warning("runtime prefilled %d tokens, the session fed %d", run.perf[1], len(feed))
            prompt_eval_ns = int(run.perf[0] * 1e6)
            eval_ns = int(run.perf[2] * 1e6)
        else:
            prompt_eval_ns = int((first - started) * 1e9)
            eval_ns = int((ended - first) * 1e9)
        if run.aborted:
            done_reason = "abort"
        elif run.limit_reached or len(tokens) + eval_count >= context:
            done_reason = "length"
        else:
            done_reason = "stop"
        return GenerationStats(
            done_reason=done_reason,
            prompt_tokens=len(tokens),
            prompt_eval_count=len(feed),
            prompt_eval_ns=prompt_eval_ns,
            eval_count=eval_count,
            eval_ns=eval_ns,
            context=tokens + run.token_ids,
            reload_ns=self.last_reload_ns,
        )

    def _cancelled_before_start(self, tokens: list[int]) -> GenerationStats:
        return GenerationStats(
            done_reason="abort",
            prompt_tokens=len(tokens),
            prompt_eval_count=0,
            prompt_eval_ns=0,
            eval_count=0,
            eval_ns=0,
            context=list(tokens),
        )

    # ------------------------------------------------------------------ embeddings / tokens

    def embed(self, inputs: list[str], truncate: bool) -> EmbedResult:
        vectors: list[list[float]] = []
        total = 0
        context = self._context_limit
        try:
            for index, text in enumerate(inputs):
                tokens = self._tokenizer.encode(text) or self._tokenizer.encode(" ")
                if len(tokens) > context:
                    if not truncate:
                        raise ContextOverflow(
                            f"input {index} is {len(tokens)} tokens, more than the context window ({context})"
                        )
                    tokens = tokens[:context]
                run = _Run(emit=None, num_predict=0, abort_on_limit=False, hidden_mode=True)
                keepalive: list[Any] = []
                rkllm_input = self._make_input(tokens, keepalive)
                infer = self._make_infer(abi.INFER_GET_LAST_HIDDEN_LAYER, False, None, 0)
                rc = self._execute(run, rkllm_input, infer)
                if run.failed or rc != 0 or run.hidden is None:
                    raise RuntimeFailure(
                        f"the RKLLM runtime returned no hidden states for input {index} (rc={rc})"
                    )
                vectors.append(list(run.hidden))
                total += len(tokens)
        finally:
            # Hidden-layer runs do not continue the conversation: start the next turn from scratch.
            self._cached = []
            self._kv_dirty = self._family >= Family.D
        if vectors and self.info.embedding_length != len(vectors[0]):
            self.info = replace(self.info, embedding_length=len(vectors[0]))
        return EmbedResult(vectors=vectors, prompt_tokens=total)

    def tokenize(self, text: str) -> list[int]:
        return self._tokenizer.encode(text)

    def detokenize(self, tokens: list[int]) -> str:
        return self._tokenizer.decode(tokens)


class RkllmRuntime:
    """Loads .rkllm models through librkllmrt (found and identified by library.py)."""

    def __init__(self, library_path: str | None = None) -> None:
        self._library_path = library_path
        self._library: RkllmLibrary | None = None

    def library(self) -> RkllmLibrary:
        if self._library is None:
            self._library = open_library(self._library_path)
        return self._library

    def load(self, spec: LoadSpec) -> RkllmSession:
        if not Path(spec.model_path).is_file():
            raise RuntimeFailure(f"model file not found: {spec.model_path}")
        if spec.vision.get("encoder"):
            from rkllama_ollama.runtime.rkllm.vision_session import VisionRkllmSession

            return VisionRkllmSession(self.library(), spec)
        return RkllmSession(self.library(), spec)
