"""The runner's side of the protocol: requests in, replies out, over the one Session it hosts.

Transport-free: whoever reads requests calls `submit` (from any thread), and `serve` runs them in order
on the calling thread, handing every reply to `send`. The child process (child.py) feeds it from its
command pipe; tests may feed it in their own process (tests/support/inprocess_runner.py).
"""

from __future__ import annotations

import base64
import binascii
import logging
import queue
import threading
import time
from collections.abc import Callable

from rkllama_ollama.runtime.base import (
    Cancel,
    ContextOverflow,
    Engine,
    GenerationStats,
    InvalidInput,
    LoadSpec,
    Runtime,
    RuntimeFailure,
    SamplingOptions,
    Session,
    TokenLogprob,
)
from rkllama_ollama.runtime.runner.codec import FrameError
from rkllama_ollama.runtime.runner.messages import (
    Abort,
    Detokenize,
    Done,
    Embed,
    Embedded,
    Emitted,
    Failed,
    Generate,
    Load,
    Loaded,
    Reply,
    Request,
    Shutdown,
    Text,
    Tokenize,
    Tokens,
)

log = logging.getLogger("rkllama_ollama.runtime.runner")


def make_runtime(spec: LoadSpec) -> Runtime:
    """Import the engine only here, inside the runner: the server process never loads native code."""
    engine = spec.engine
    if engine == Engine.LLAMACPP and spec.vision.get("encoder") and not spec.embedding:
        from rkllama_ollama.runtime.llamacpp_vision import LlamaCppVisionRuntime

        return LlamaCppVisionRuntime()
    if engine == Engine.LLAMACPP and spec.parallel > 1 and not spec.embedding:
        from rkllama_ollama.runtime.batched import BatchedLlamaCppRuntime

        return BatchedLlamaCppRuntime()
    if engine == Engine.LLAMACPP:
        from rkllama_ollama.runtime.llamacpp import LlamaCppRuntime

        return LlamaCppRuntime()
    if engine == Engine.RKLLM:
        from rkllama_ollama.runtime.rkllm.session import RkllmRuntime

        return RkllmRuntime()
    raise RuntimeFailure(f"unknown engine {engine!r}")


Send = Callable[[Reply], None]


class Dispatcher:
    """Runs requests on one Session. `send` may be called from several threads at once (a session
    serving several sequences runs each generation in its own thread); it must be thread-safe."""

    def __init__(self, send: Send, *, thread_name: str = "runner-generation") -> None:
        self._send = send
        self._thread_name = thread_name  # of the threads that run generations side by side
        self._inbox: queue.SimpleQueue[Request | None] = queue.SimpleQueue()
        self._session: Session | None = None
        # One Cancel per generate request, made when the request is submitted: an abort finds it
        # whether the generation is queued, running or finished (then it is gone, and the abort is
        # dropped).
        self._cancels: dict[int, Cancel] = {}
        self._cancels_lock = threading.Lock()

    # -- input (any thread) --------------------------------------------------------------------

    def submit(self, request: Request) -> None:
        """An abort is acted on at once; a shutdown ends the input; everything else is queued in order."""
        if isinstance(request, Shutdown):
            self.end_of_input()
        elif isinstance(request, Abort):
            with self._cancels_lock:
                cancel = self._cancels.get(request.id)
            if cancel is not None:
                cancel.set()
        else:
            if isinstance(request, Generate):
                with self._cancels_lock:
                    self._cancels[request.id] = Cancel()
            self._inbox.put(request)

    def reject(self, error: FrameError) -> None:
        """A request that could not be read is answered with its error (when it named an id)."""
        log.error("runner: %s", error)
        self._send(Failed(error.request_id, str(error)))

    def end_of_input(self) -> None:
        """No more requests (the server is gone or asked to stop): stop what runs and what waits."""
        with self._cancels_lock:
            cancels = list(self._cancels.values())
        for cancel in cancels:
            cancel.set()
        self._inbox.put(None)

    # -- the serve loop ------------------------------------------------------------------------

    def serve(self) -> None:
        """Handle requests until the end of input, then close the session."""
        while True:
            request = self._inbox.get()
            if request is None:
                break
            session = self._session
            if isinstance(request, Generate) and session is not None and session.info.parallel > 1:
                # A session serving several sequences at once: each generation waits in its own thread.
                threading.Thread(
                    target=self._handle_reporting, args=(request,), name=self._thread_name, daemon=True
                ).start()
            else:
                self._handle_reporting(request)
        if self._session is not None:
            self._session.close()
            self._session = None

    def _handle_reporting(self, request: Request) -> None:
        """Handle one request; a failure becomes a Failed reply to it."""
        request_id = getattr(request, "id", None)
        try:
            self._handle(request)
        except RuntimeFailure as exc:
            self._send(
                Failed(
                    request_id,
                    str(exc),
                    overflow=isinstance(exc, ContextOverflow),
                    invalid=isinstance(exc, InvalidInput),
                )
            )
        except Exception as exc:  # an engine bug must not take the runner down silently
            log.exception("runner: %s failed", type(request).__name__.lower())
            self._send(Failed(request_id, f"runner error: {exc}"))

    def _handle(self, request: Request) -> None:
        if isinstance(request, Load):
            self._load(request)
            return
        session = self._session
        if session is None:
            raise RuntimeFailure("no model is loaded in this runner")
        if isinstance(request, Generate):
            self._generate(session, request)
        elif isinstance(request, Embed):
            result = session.embed(list(request.inputs), request.truncate)
            self._send(Embedded(request.id, result))
        elif isinstance(request, Tokenize):
            self._send(Tokens(request.id, tuple(session.tokenize(request.text))))
        elif isinstance(request, Detokenize):
            self._send(Text(request.id, session.detokenize(list(request.tokens))))
        else:
            raise RuntimeFailure(f"unexpected runner request {type(request).__name__}")

    def _load(self, request: Load) -> None:
        started = time.perf_counter_ns()
        if self._session is not None:
            self._session.close()
            self._session = None
        self._session = make_runtime(request.spec).load(request.spec)
        load_ns = time.perf_counter_ns() - started
        self._send(Loaded(request.id, self._session.info, load_ns))

    def _generate(self, session: Session, request: Generate) -> None:
        request_id = request.id
        with self._cancels_lock:
            cancel = self._cancels.get(request_id) or Cancel()
        try:
            if cancel.is_set():  # aborted while queued
                self._send(Done(request_id, None))
                return
            send = self._send

            def emit(text: str, logprobs: list[TokenLogprob] | None = None) -> None:
                send(Emitted(request_id, text, None if logprobs is None else tuple(logprobs)))

            if request.images:
                stats = _generate_with_images(session, request, emit, cancel)
            else:
                stats = session.generate(request.prompt, request.options, emit, cancel)
        finally:
            with self._cancels_lock:
                self._cancels.pop(request_id, None)
        log.info(
            "generate id=%s ended: %s, %d prompt tokens fed, %d generated",
            request_id,
            stats.done_reason,
            stats.prompt_eval_count,
            stats.eval_count,
        )
        self._send(Done(request_id, stats))


def _generate_with_images(
    session: Session, request: Generate, emit: Callable[..., None], cancel: Cancel
) -> GenerationStats:
    """A generation whose prompt holds images (base64, already checked by the server)."""
    generate_multimodal = getattr(session, "generate_multimodal", None)
    if generate_multimodal is None:
        raise InvalidInput("this model has no vision encoder: it cannot take images")
    pictures: list[bytes] = []
    for index, image in enumerate(request.images):
        try:
            pictures.append(base64.b64decode(image, validate=True))
        except (binascii.Error, ValueError):
            raise InvalidInput(f"image {index + 1} is not valid base64") from None
    options: SamplingOptions = request.options
    stats: GenerationStats = generate_multimodal(request.prompt, pictures, options, emit, cancel)
    return stats
