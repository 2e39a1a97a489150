"""RKLLM engine: RkllmRuntime.load(spec) -> RkllmSession (the runtime/base.py Session protocol).

One session owns one rkllm handle. Runs in the runner child process only.

- rkllm_run is called on the thread that calls generate(); the runtime delivers callbacks on its
  own thread while that call blocks, and `emit` is called from the callback (never concurrently
  with the generate() caller, which is blocked in rkllm_run).
- KV prefix reuse (families D/E/F): the session remembers the tokens the runtime's cache really holds
  (the ids fed, the ids generated and the end-of-turn token the runtime sampled), runs with
  keep_history=1 and feeds only what extends them. When the prompt diverges from them, the runtime
  offers no way to cut a multi-turn cache at a position (ranged clearing needs a paused single-turn
  run), so the session clears it and restores the best conversation cache instead, else feeds the
  whole prompt. Family C has no history: every prompt is fed whole, or restored from a cache.
- Conversation caches (runtime/kv_cache.py, every family): prompt-cache files
  (RKLLMInferParam.prompt_cache_params), saved by every run on C (no history) and, on D-F, when a
  prompt of another conversation is about to replace the live cache; a prompt that shares more tokens
  with one of them than with the live cache clears the live cache, loads that file
  (rkllm_load_prompt_cache) and runs the whole prompt: the runtime prefills only what follows the
  shared prefix.
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
    NATIVE_LOG_ENV,
    Cancel,
    ContextOverflow,
    DoneReason,
    EmbedResult,
    EmitPiece,
    GenerationStats,
    LoadSpec,
    ModelInfo,
    RuntimeFailure,
    SamplingOptions,
)
from rkllama_ollama.runtime.kv_cache import (
    RESTORE_MIN_GAIN,
    SAVE_MIN_TOKENS,
    CacheBudget,
    ConversationCache,
    common_prefix_length,
)
from rkllama_ollama.runtime.rkllm import abi
from rkllama_ollama.runtime.rkllm.abi import Family
from rkllama_ollama.runtime.rkllm.library import RkllmLibrary, open_library
from rkllama_ollama.runtime.rkllm.params import load_params, sampling_key
from rkllama_ollama.runtime.rkllm.startup import StartupProblem, diagnose, error_lines
from rkllama_ollama.runtime.rkllm.tokens import (
    RUNTIME_TURN_TEMPLATE,
    PromptTokenizer,
    load_tokenizer,
    resolve_tokenizer_dir,
)

log = logging.getLogger(__name__)

_CONTEXT_LIMIT = re.compile(r"max_context_limit:\s*(\d+)")
_LIBC = ctypes.CDLL(None)


_IOLBF = 1


def _line_buffer_c_stdout() -> None:
    """C stdout redirected to a file is fully buffered: a crash would lose what is buffered."""
    try:
        stdout = ctypes.c_void_p.in_dll(_LIBC, "stdout")
        _LIBC.setvbuf(stdout, None, _IOLBF, 0)
    except (AttributeError, ValueError, OSError):  # not glibc
        pass


@contextlib.contextmanager
def capture_native_output(sink: list[str], keep_at: str | None = None) -> Iterator[None]:
    """Redirect fds 1 and 2 (C stdio included) into `sink` lines for the duration of the block; with
    `keep_at`, through that file (truncated first and left in place)."""
    _LIBC.fflush(None)
    saved = (os.dup(1), os.dup(2))
    scratch = open(keep_at, "w+b") if keep_at else tempfile.TemporaryFile()  # noqa: SIM115
    with scratch:
        try:
            os.dup2(scratch.fileno(), 1)
            os.dup2(scratch.fileno(), 2)
            _line_buffer_c_stdout()
            yield
        finally:
            _LIBC.fflush(None)
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            scratch.seek(0)
            sink.extend(scratch.read().decode("utf-8", "replace").splitlines())


def _template_pieces(params: dict[str, Any]) -> tuple[str, str, str] | None:
    """The Modelfile's (SYSTEM_PROMPT, PROMPT_PREFIX, PROMPT_POSTFIX), when all three are given."""
    pieces = [params.get(key) for key in ("system_prompt", "prompt_prefix", "prompt_postfix")]
    if not all(isinstance(piece, str) for piece in pieces):
        return None
    return (str(pieces[0]), str(pieces[1]), str(pieces[2]))


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
        # No template of our own and a runtime that templates prompts itself: let it (see _init_handle).
        self._runtime_template = (
            spec.runtime_template
            and self._family >= Family.D
            and not facts.chat_template
            and not self._tokenizer.feeds_tokens
        )
        self._template_pieces = _template_pieces(spec.params)
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
        self._conversations = ConversationCache(
            Path(spec.kv_cache_dir) if spec.kv_cache_dir else None,
            f"rkllm-{self._version}",  # prompt-cache files are tied to the runtime version
            CacheBudget.sized(spec.kv_cache_slots, spec.kv_cache_ram_mb, 0),
        )
        self._init_handle(self._loaded_sampling)
        self.info = ModelInfo(
            context_length=self._context_limit,
            chat_template=RUNTIME_TURN_TEMPLATE if self._runtime_template else facts.chat_template,
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
        with capture_native_output(output, os.environ.get(NATIVE_LOG_ENV) or None):
            rc = self._lib.rkllm_init(ctypes.byref(handle), ctypes.byref(self._param), third)
        for line in output:
            log.info("rkllm: %s", line)
        problem = diagnose(output)
        if rc != 0 or not handle.value or (problem is not None and problem.fatal):
            if rc == 0 and handle.value:
                # 1.1.x reports success for a model it did not load; the handle would crash the first
                # run, and destroying it may too. It is left to the process exit (the runner ends).
                log.error("rkllm_init returned 0 but the runtime reported a failure: not using the handle")
            raise RuntimeFailure(
                f"could not load {self._spec.model_path} with the RKLLM runtime {self._version}: "
                + self._init_failure_detail(rc, problem, output)
            )
        if problem is not None:
            log.warning("RKLLM runtime start-up: %s", problem.message())
        for line in output:
            match = _CONTEXT_LIMIT.search(line)
            if match and 0 < int(match.group(1)) < self._load.num_ctx:
                self._context_limit = int(match.group(1))
        if self._family >= Family.D:
            self._apply_chat_template(handle)
        with self._handle_lock:
            self._handle = handle
        self._cached = []
        self._kv_dirty = False
        self._loaded_sampling = sampling

    @staticmethod
    def _init_failure_detail(rc: int, problem: StartupProblem | None, output: list[str]) -> str:
        if problem is not None and problem.fatal:
            return problem.message()
        errors = error_lines(output)
        said = f" (the runtime said: {'; '.join(errors)})" if errors else ""
        if rc == 0:
            return f"rkllm_init returned 0 without a model handle{said}"
        return f"rkllm_init returned {rc}{said}"

    def _apply_chat_template(self, handle: Any) -> None:
        """Blank the runtime's chat template when the server renders the whole prompt; otherwise keep the
        one built into the .rkllm, or install the Modelfile's SYSTEM_PROMPT, PROMPT_PREFIX, PROMPT_POSTFIX."""
        if not self._runtime_template:
            pieces: tuple[str, str, str] | None = ("", "", "")
        else:
            pieces = self._template_pieces
            source = (
                "the Modelfile's SYSTEM_PROMPT/PROMPT_PREFIX/PROMPT_POSTFIX" if pieces else "the .rkllm file"
            )
            log.info(
                "no tokenizer files for %s: the RKLLM runtime %s applies the chat template of %s, "
                "one turn per run (earlier turns are folded into the prompt text)",
                self._spec.model_path,
                self._version,
                source,
            )
        if pieces is None:
            return
        rc = self._lib.rkllm_set_chat_template(handle, *(piece.encode("utf-8") for piece in pieces))
        if rc != 0:
            log.warning("rkllm_set_chat_template returned %d", rc)

    def _destroy_handle(self) -> None:
        with self._handle_lock:
            handle, self._handle = self._handle, ctypes.c_void_p()
        if handle.value:
            self._lib.rkllm_destroy(handle)

    def close(self) -> None:
        self._destroy_handle()
        self._conversations.clear()

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

    def _admit_prompt(
        self, prompt: str, options: SamplingOptions, cancel: Cancel | None, *, load_sampling: bool
    ) -> tuple[list[int], GenerationStats | None]:
        """The prompt's tokens, refused when empty or too long for the context, and the stats to return
        at once (else None) when the request was cancelled before it started. With `load_sampling` the
        handle is first re-initialised for the request's sampling options (before the length check)."""
        tokens = self._tokenizer.encode(prompt)
        if not tokens:
            raise RuntimeFailure("the prompt is empty")
        if cancel is not None and cancel.is_set():
            return tokens, self._cancelled_before_start(tokens)
        if options.top_logprobs >= 0:
            log.info("log-probabilities are not available from the RKLLM runtime: none are returned")
        if load_sampling:
            self._ensure_sampling(options)
        if len(tokens) >= self._context_limit:
            raise ContextOverflow(
                f"the prompt is {len(tokens)} tokens but the context window is {self._context_limit} "
                "tokens (num_ctx); shorten the conversation or raise num_ctx"
            )
        return tokens, None

    def generate(
        self, prompt: str, options: SamplingOptions, emit: EmitPiece, cancel: Cancel | None = None
    ) -> GenerationStats:
        tokens, cancelled = self._admit_prompt(prompt, options, cancel, load_sampling=True)
        if cancelled is not None:
            return cancelled
        context = self._context_limit
        # With the runtime's own template every run is one templated turn: no history is kept across runs.
        keep_history = self._family >= Family.D and not self._runtime_template
        if keep_history and self._kv_dirty:
            self._clear_cache()
        feed, reused, restoring = self._plan_feed(tokens, keep_history)
        num_predict = self._request_limit(options)
        run = _Run(emit=emit, num_predict=num_predict, abort_on_limit=self._family != Family.F)
        keepalive: list[Any] = []
        rkllm_input = self._make_input(feed, keepalive)
        infer = self._make_infer(abi.INFER_GENERATE, keep_history, options, num_predict)
        # Without history every run starts from scratch, so each run's prefill state is saved for the
        # next turn. With history the live cache carries the conversation, and it is saved only when
        # another prompt is about to replace it (_save_leaving_conversation): a save writes the whole KV
        # state to disk before the first token, a cost a continuing turn should not pay.
        save_path = None if keep_history else self._conversations.reserve_file()
        if save_path is not None:
            cache_param = self._layout.PromptCacheParam(
                save_prompt_cache=1, prompt_cache_path=os.fsencode(save_path)
            )
            keepalive.append(cache_param)
            infer.prompt_cache_params = ctypes.pointer(cache_param)
        started = time.perf_counter()
        try:
            rc = self._execute(run, rkllm_input, infer, cancel)
        finally:
            if restoring:
                self._lib.rkllm_release_prompt_cache(self._handle)
        ended = time.perf_counter()
        if save_path is not None and not run.failed:
            self._conversations.add_file(tokens, save_path)
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
        return self._stats(tokens, len(tokens) - reused, run, started, ended, context)

    def _save_leaving_conversation(self) -> None:
        """Save the live cache (prompt, reply and end-of-turn token) as a conversation cache before a
        prompt of another conversation replaces it. The runtime saves a run's prefill state only, so a
        one-token run appends the token that followed the previous end-of-turn in the prompt (likely what
        the conversation's next prompt continues with; any token would do: a restore reuses only the
        shared prefix) and is stopped at its first generated token."""
        held = self._cached
        entry, shared = self._conversations.best_match(held)
        if (entry is not None and shared == len(held)) or len(held) + 2 >= self._context_limit:
            return
        path = self._conversations.reserve_file()
        if path is None:
            return
        follower = self._token_after_last_turn(held)
        run = _Run(emit=None, num_predict=1, abort_on_limit=True)
        keepalive: list[Any] = []
        rkllm_input = self._make_input([follower], keepalive)
        infer = self._make_infer(abi.INFER_GENERATE, True, None, 1)
        cache_param = self._layout.PromptCacheParam(save_prompt_cache=1, prompt_cache_path=os.fsencode(path))
        keepalive.append(cache_param)
        infer.prompt_cache_params = ctypes.pointer(cache_param)
        started = time.perf_counter()
        self._execute(run, rkllm_input, infer)
        self._kv_dirty = True  # holds the extra tokens: cleared before anything else runs
        if not run.failed:
            self._conversations.add_file([*held, follower], path)
            log.info(
                "conversation cache saved: %d tokens in %.0f ms",
                len(held),
                (time.perf_counter() - started) * 1e3,
            )

    def _token_after_last_turn(self, held: list[int]) -> int:
        newline = self._tokenizer.encode("\n")
        fallback = (
            newline[0] if len(newline) == 1 else (self._eos_id if self._eos_id is not None else held[-1])
        )
        if self._eos_id is None:
            return fallback
        ends = [i for i, token in enumerate(held[:-1]) if token == self._eos_id]
        return held[ends[-1] + 1] if ends else fallback

    def _plan_feed(self, tokens: list[int], keep_history: bool) -> tuple[list[int], int, bool]:
        """What to feed for `tokens`, how many of them the runtime already holds or restores, and whether
        a conversation cache was loaded for this run (released after it)."""
        common = common_prefix_length(self._cached, tokens) if keep_history else 0
        extends = keep_history and common == len(self._cached) and common < len(tokens)
        in_place = common if extends else 0
        if keep_history and len(self._cached) - common >= SAVE_MIN_TOKENS:
            self._save_leaving_conversation()
        entry, shared = self._conversations.best_match(tokens)
        shared = min(shared, len(tokens) - 1)  # the runtime prefills at least one token
        if entry is not None and entry.path is not None and shared >= in_place + RESTORE_MIN_GAIN:
            if self._cached:
                self._clear_cache()
            rc = self._lib.rkllm_load_prompt_cache(self._handle, os.fsencode(entry.path))
            if rc == 0:
                self._conversations.touch(entry)
                log.info("conversation cache restored: %d of %d prompt tokens", shared, len(tokens))
                return tokens, shared, True
            log.warning("rkllm_load_prompt_cache failed (%d): dropping that conversation cache", rc)
            self._conversations.forget(entry)
        if extends:
            return tokens[common:], common, False
        if self._cached:
            log.debug("prompt diverges from the KV cache at %d of %d: clearing", common, len(self._cached))
            self._clear_cache()
        return tokens, 0, False

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
            elif run.finished and self._eos_id is not None and len(expected) < self._context_limit:
                # Ended by the end-of-turn token: the runtime sampled it, so its cache holds it (on E/F
                # rkllm_get_kv_cache_size confirms this; D has no way to ask).
                self._cached = expected + [self._eos_id]
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
        self, tokens: list[int], fed: int, run: _Run, started: float, ended: float, context: int
    ) -> GenerationStats:
        eval_count = len(run.token_ids)
        first = run.first_token_at if run.first_token_at is not None else ended
        prompt_eval_count = fed
        if run.perf is not None and self._runtime_template:
            prompt_eval_count = run.perf[1]  # what the runtime prefilled: its own template's tokens too
        elif run.perf is not None and run.perf[1] != fed:
            log.warning("runtime prefilled %d tokens, the session expected %d", run.perf[1], fed)
        if run.perf is not None:
            prompt_eval_ns = int(run.perf[0] * 1e6)
            eval_ns = int(run.perf[2] * 1e6)
        else:
            prompt_eval_ns = int((first - started) * 1e9)
            eval_ns = int((ended - first) * 1e9)
        if run.aborted:
            done_reason = DoneReason.ABORT
        elif run.limit_reached or len(tokens) + eval_count >= context:
            done_reason = DoneReason.LENGTH
        else:
            done_reason = DoneReason.STOP
        return GenerationStats(
            done_reason=done_reason,
            prompt_tokens=len(tokens),
            prompt_eval_count=prompt_eval_count,
            prompt_eval_ns=prompt_eval_ns,
            eval_count=eval_count,
            eval_ns=eval_ns,
            context=tokens + run.token_ids,
            reload_ns=self.last_reload_ns,
        )

    def _cancelled_before_start(self, tokens: list[int]) -> GenerationStats:
        return GenerationStats(
            done_reason=DoneReason.ABORT,
            prompt_tokens=len(tokens),
            prompt_eval_count=0,
            prompt_eval_ns=0,
            eval_count=0,
            eval_ns=0,
            context=list(tokens),
        )

    # ------------------------------------------------------------------ embeddings / tokens

    def embed(self, inputs: list[str], truncate: bool) -> EmbedResult:
        try:
            return self._embed_inputs(inputs, truncate)
        finally:
            # Hidden-layer runs do not continue the conversation: start the next turn from scratch.
            self._cached = []
            self._kv_dirty = self._family >= Family.D

    def _embed_inputs(self, inputs: list[str], truncate: bool) -> EmbedResult:
        """One hidden-state vector per input (cut to the context with `truncate`, else refused)."""
        vectors: list[list[float]] = []
        total = 0
        context = self._context_limit
        for index, text in enumerate(inputs):
            tokens = self._tokenizer.encode(text) or self._tokenizer.encode(" ")
            if len(tokens) > context:
                if not truncate:
                    raise ContextOverflow(
                        f"input {index} is {len(tokens)} tokens, more than the context window ({context})"
                    )
                tokens = tokens[:context]
            hidden, rc = self._hidden_state(tokens)
            if hidden is None:
                raise RuntimeFailure(
                    f"the RKLLM runtime returned no hidden states for input {index} (rc={rc})"
                )
            vectors.append(list(hidden))
            total += len(tokens)
        if vectors and self.info.embedding_length != len(vectors[0]):
            self.info = replace(self.info, embedding_length=len(vectors[0]))
        return EmbedResult(vectors=vectors, prompt_tokens=total)

    def _hidden_state(self, tokens: list[int]) -> tuple[list[float] | None, int]:
        """The last hidden layer for `tokens` (None when the run failed or gave none) and the run's rc."""
        run = _Run(emit=None, num_predict=0, abort_on_limit=False, hidden_mode=True)
        keepalive: list[Any] = []
        rkllm_input = self._make_input(tokens, keepalive)
        infer = self._make_infer(abi.INFER_GET_LAST_HIDDEN_LAYER, False, None, 0)
        rc = self._execute(run, rkllm_input, infer)
        return (None if run.failed or rc != 0 else run.hidden), rc

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
        if spec.parallel > 1:  # RKLLAMA_RKLLM_MULTI_BATCH: several requests per rkllm_run (E/F)
            from rkllama_ollama.runtime.rkllm.multi_batch import (
                MultiBatchRkllmSession,
                multi_batch_unavailable,
            )

            reason = multi_batch_unavailable(self.library(), spec)
            if reason is None:
                return MultiBatchRkllmSession(self.library(), spec)
            log.warning("%s", reason)
        if spec.vision.get("encoder"):
            from rkllama_ollama.runtime.rkllm.vision_session import VisionRkllmSession

            return VisionRkllmSession(self.library(), spec)
        return RkllmSession(self.library(), spec)
