"""The runner: a child process that hosts exactly one Session, and the server-side handle to it.

Why a process: a segfault in a native library (wrong runtime version, vendor bugs) costs one request,
not the daemon; unloading is process exit, which returns all native memory; and the per-token
callback work never competes with the HTTP event loop for the GIL.

Protocol: length-prefixed frames (4-byte big-endian length + one orjson object) on two pipes.
Commands go to the child's stdin; events come back on a dedicated pipe, so whatever a native library
prints to stdout (the RKLLM banner) never corrupts the stream. Every command carries an `id`; every
event names the `id` it answers.

  server -> runner                                   runner -> server
  {"op": "load", "id", "spec"}                       {"ev": "loaded", "id", "info", "load_ns"}
  {"op": "generate", "id", "prompt", "options"}      {"ev": "piece", "id", "text"}..., {"ev": "done", ...}
    (+ "images": [base64...] for a vision model; the prompt holds one <image> tag per image)
  {"op": "embed", "id", "inputs", "truncate"}        {"ev": "embedded", "id", "result"}
  {"op": "tokenize", "id", "text"}                   {"ev": "tokens", "id", "tokens"}
  {"op": "detokenize", "id", "tokens"}               {"ev": "text", "id", "text"}
  {"op": "abort", "id"}  (acted on at once, even mid-generation)
  {"op": "shutdown"}
Any command may instead be answered {"ev": "error", "id", "message", "overflow", "invalid"}; `overflow`
marks a ContextOverflow (the input does not fit the context) and `invalid` an InvalidInput (the request's
input is unusable), which the server re-raises as such.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import os
import queue
import signal
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from rkllama_ollama.runtime.base import (
    NATIVE_LOG_ENV,
    Cancel,
    ContextOverflow,
    EmbedResult,
    GenerationStats,
    InvalidInput,
    LoadSpec,
    ModelInfo,
    Runtime,
    RuntimeFailure,
    SamplingOptions,
    Session,
    TokenLogprob,
)

log = logging.getLogger(__name__)

_HEADER = struct.Struct(">I")
MAX_FRAME = 256 * 1024 * 1024


def encode_frame(message: dict[str, Any]) -> bytes:
    payload = orjson.dumps(message)
    return _HEADER.pack(len(payload)) + payload


# ----------------------------------------------------------------------------------------------
# Child side
# ----------------------------------------------------------------------------------------------


def _read_exact(stream: BinaryIO, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = stream.read(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _read_frame(stream: BinaryIO) -> dict[str, Any] | None:
    header = _read_exact(stream, _HEADER.size)
    if header is None:
        return None
    (size,) = _HEADER.unpack(header)
    if size > MAX_FRAME:
        raise ValueError(f"frame of {size} bytes is too large")
    payload = _read_exact(stream, size)
    return None if payload is None else orjson.loads(payload)


def make_runtime(spec: LoadSpec) -> Runtime:
    """Import the engine only here, inside the child: the server process never loads native code."""
    engine = spec.engine
    if engine == "llamacpp" and spec.vision.get("encoder") and not spec.embedding:
        from rkllama_ollama.runtime.llamacpp_vision import LlamaCppVisionRuntime

        return LlamaCppVisionRuntime()
    if engine == "llamacpp" and spec.parallel > 1 and not spec.embedding:
        from rkllama_ollama.runtime.batched import BatchedLlamaCppRuntime

        return BatchedLlamaCppRuntime()
    if engine == "llamacpp":
        from rkllama_ollama.runtime.llamacpp import LlamaCppRuntime

        return LlamaCppRuntime()
    if engine == "rkllm":
        from rkllama_ollama.runtime.rkllm.session import RkllmRuntime

        return RkllmRuntime()
    raise RuntimeFailure(f"unknown engine {engine!r}")


class _ChildRunner:
    def __init__(self, commands: BinaryIO, events_fd: int) -> None:
        self._commands = commands
        self._events_fd = events_fd
        self._write_lock = threading.Lock()
        self._inbox: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self._session: Session | None = None
        # One Cancel per generate command, made when the command is read: an abort finds it whether
        # the generation is queued, running or finished (then it is gone, and the abort is dropped).
        self._cancels: dict[int, Cancel] = {}
        self._cancels_lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        frame = encode_frame(message)
        with self._write_lock:
            view = memoryview(frame)
            while view:
                written = os.write(self._events_fd, view)
                view = view[written:]

    def _read_commands(self) -> None:
        """Reader thread: abort is acted on immediately; everything else is queued in order."""
        try:
            while True:
                message = _read_frame(self._commands)
                if message is None or message.get("op") == "shutdown":
                    break
                if message.get("op") == "abort":
                    with self._cancels_lock:
                        cancel = self._cancels.get(message.get("id"))  # type: ignore[arg-type]
                    if cancel is not None:
                        cancel.set()
                    continue
                if message.get("op") == "generate":
                    with self._cancels_lock:
                        self._cancels[message.get("id")] = Cancel()  # type: ignore[index]
                self._inbox.put(message)
        finally:
            with self._cancels_lock:
                cancels = list(self._cancels.values())
            for cancel in cancels:  # the server is gone: stop what runs and what waits
                cancel.set()
            self._inbox.put(None)

    def serve(self) -> None:
        threading.Thread(target=self._read_commands, name="runner-commands", daemon=True).start()
        while True:
            message = self._inbox.get()
            if message is None:
                break
            session = self._session
            if message.get("op") == "generate" and session is not None and session.info.parallel > 1:
                # A session serving several sequences at once: each generation waits in its own thread.
                threading.Thread(target=self._handle_reporting, args=(message,), daemon=True).start()
            else:
                self._handle_reporting(message)
        if self._session is not None:
            self._session.close()

    def _handle_reporting(self, message: dict[str, Any]) -> None:
        """Handle one command; a failure becomes an error event for its request."""
        request_id = message.get("id")
        try:
            self._handle(message)
        except RuntimeFailure as exc:
            self.send(
                {
                    "ev": "error",
                    "id": request_id,
                    "message": str(exc),
                    "overflow": isinstance(exc, ContextOverflow),
                    "invalid": isinstance(exc, InvalidInput),
                }
            )
        except Exception as exc:  # an engine bug must not take the runner down silently
            log.exception("runner: %s failed", message.get("op"))
            self.send({"ev": "error", "id": request_id, "message": f"runner error: {exc}"})

    def _handle(self, message: dict[str, Any]) -> None:
        op = message.get("op")
        request_id: Any = message.get("id")
        if op == "load":
            spec = LoadSpec.from_wire(message["spec"])
            started = time.perf_counter_ns()
            if self._session is not None:
                self._session.close()
                self._session = None
            self._session = make_runtime(spec).load(spec)
            load_ns = time.perf_counter_ns() - started
            self.send(
                {"ev": "loaded", "id": request_id, "info": self._session.info.to_wire(), "load_ns": load_ns}
            )
            return
        session = self._session
        if session is None:
            raise RuntimeFailure("no model is loaded in this runner")
        if op == "generate":
            with self._cancels_lock:
                cancel = self._cancels.get(request_id) or Cancel()
            try:
                if cancel.is_set():  # aborted while queued
                    self.send({"ev": "done", "id": request_id, "stats": None})
                    return
                options = SamplingOptions.from_wire(message.get("options") or {})
                send = self.send

                def emit(text: str, logprobs: list[TokenLogprob] | None = None) -> None:
                    if logprobs is None:
                        send({"ev": "piece", "id": request_id, "text": text})
                    else:
                        wire = [entry.to_wire() for entry in logprobs]
                        send({"ev": "piece", "id": request_id, "text": text, "logprobs": wire})

                images = message.get("images")
                if images:
                    stats = _generate_with_images(session, message["prompt"], images, options, emit, cancel)
                else:
                    stats = session.generate(message["prompt"], options, emit, cancel)
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
            self.send({"ev": "done", "id": request_id, "stats": stats.to_wire()})
        elif op == "embed":
            result = session.embed(list(message["inputs"]), bool(message.get("truncate", True)))
            self.send({"ev": "embedded", "id": request_id, "result": result.to_wire()})
        elif op == "tokenize":
            self.send({"ev": "tokens", "id": request_id, "tokens": session.tokenize(message["text"])})
        elif op == "detokenize":
            self.send({"ev": "text", "id": request_id, "text": session.detokenize(message["tokens"])})
        else:
            raise RuntimeFailure(f"unknown runner command {op!r}")


def _generate_with_images(
    session: Session,
    prompt: str,
    images: list[str],
    options: SamplingOptions,
    emit: Callable[..., None],
    cancel: Cancel,
) -> GenerationStats:
    """A generation whose prompt holds images (base64, already checked by the server)."""
    generate_multimodal = getattr(session, "generate_multimodal", None)
    if generate_multimodal is None:
        raise InvalidInput("this model has no vision encoder: it cannot take images")
    pictures: list[bytes] = []
    for index, image in enumerate(images):
        try:
            pictures.append(base64.b64decode(image, validate=True))
        except (binascii.Error, ValueError):
            raise InvalidInput(f"image {index + 1} is not valid base64") from None
    stats: GenerationStats = generate_multimodal(prompt, pictures, options, emit, cancel)
    return stats


def child_main(argv: list[str]) -> int:
    """Entry point of the runner process: `python -m rkllama_ollama.runtime.runner <events-fd>`."""
    events_fd = int(argv[0])
    logging.basicConfig(
        level=os.environ.get("RKLLAMA_LOG_LEVEL", "INFO").upper(),
        format="runner[%(process)d] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server decides when we stop
    _ChildRunner(sys.stdin.buffer, events_fd).serve()
    return 0


# ----------------------------------------------------------------------------------------------
# Server side
# ----------------------------------------------------------------------------------------------


class RunnerDied(RuntimeFailure):
    """The runner process exited while a request was using it."""


@dataclass(frozen=True)
class Piece:
    text: str
    logprobs: list[TokenLogprob] | None = None  # the tokens that made `text`, when asked for


@dataclass(frozen=True)
class Finished:
    stats: GenerationStats | None  # None when aborted before it started


class _EventFrames(asyncio.Protocol):
    """The read end of the runner's event pipe: frames are cut and decoded as bytes arrive, and each
    message is handed to `deliver` in the same event-loop callback (one wake-up per token)."""

    def __init__(self, deliver: Callable[[dict[str, Any]], None]) -> None:
        self._deliver = deliver
        self._buffer = bytearray()
        self._transport: asyncio.BaseTransport | None = None
        self.corrupt = False
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        start = 0
        try:
            while len(buffer) - start >= _HEADER.size:
                (size,) = _HEADER.unpack_from(buffer, start)
                if size > MAX_FRAME:
                    raise ValueError(f"frame of {size} bytes is too large")
                end = start + _HEADER.size + size
                if len(buffer) < end:
                    break
                message = orjson.loads(buffer[start + _HEADER.size : end])
                if not isinstance(message, dict):
                    raise ValueError("an event frame is not a JSON object")
                start = end
                self._deliver(message)
        except ValueError:  # orjson.JSONDecodeError is a ValueError
            self.corrupt = True
            buffer.clear()
            if self._transport is not None:
                self._transport.close()
            return
        del buffer[:start]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


class RunnerProcess:
    """The server's handle on one runner child. One command at a time (the scheduler serialises)."""

    def __init__(self, process: asyncio.subprocess.Process, native_log: Path | None = None) -> None:
        self._process = process
        self._native_log = native_log
        self._native_tail: list[str] = []  # what the native library printed while loading, if it died
        self._events = _EventFrames(self._deliver)
        self._next_id = 0
        self._waiting: dict[int, asyncio.Queue[dict[str, Any]]] = {}
        self._dead_reason: str | None = None
        self._reader_task = asyncio.get_running_loop().create_task(self._watch())

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def alive(self) -> bool:
        return self._dead_reason is None and self._process.returncode is None

    @classmethod
    async def start(cls, env: dict[str, str] | None = None) -> RunnerProcess:
        log_fd, log_name = tempfile.mkstemp(prefix="rkllama-runner-", suffix=".log")
        os.close(log_fd)
        native_log = Path(log_name)
        env = {**(os.environ if env is None else env), NATIVE_LOG_ENV: log_name}
        read_fd, write_fd = os.pipe()
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "rkllama_ollama.runtime.runner",
                str(write_fd),
                stdin=asyncio.subprocess.PIPE,
                stdout=sys.stderr.fileno() if _has_fileno(sys.stderr) else None,
                pass_fds=(write_fd,),
                env=env,
                start_new_session=True,  # a Ctrl-C in a terminal reaches the server only
            )
        except BaseException:
            native_log.unlink(missing_ok=True)
            raise
        finally:
            os.close(write_fd)
        runner = cls(process, native_log)
        try:
            await asyncio.get_running_loop().connect_read_pipe(
                lambda: runner._events, os.fdopen(read_fd, "rb", 0)
            )
        except BaseException:
            process.kill()
            runner._events.connection_lost(None)  # lets the watcher reap the process
            raise
        log.info("runner started pid=%d", process.pid)
        return runner

    def _deliver(self, message: dict[str, Any]) -> None:
        inbox = self._waiting.get(message.get("id"))  # type: ignore[arg-type]  # ids are ints
        if inbox is not None:
            inbox.put_nowait(message)

    async def _watch(self) -> None:
        """When the event pipe closes (exit, crash or a corrupt frame), fail whoever is waiting."""
        await self._events.closed
        if self._events.corrupt:
            log.error("runner pid=%d sent a corrupt event frame; killing it", self._process.pid)
            self.kill()
        returncode = await self._process.wait()
        if returncode < 0:
            try:
                how = f"was killed by signal {signal.Signals(-returncode).name}"
            except ValueError:
                how = f"was killed by signal {-returncode}"
        else:
            how = f"exited with status {returncode}"
        self._dead_reason = f"the model runner {how}"
        if returncode != 0:
            log.warning("runner pid=%d %s", self._process.pid, how)
        if self._native_log is not None:
            try:
                self._native_tail = self._native_log.read_text(
                    encoding="utf-8", errors="replace"
                ).splitlines()
            except OSError:
                self._native_tail = []
            self._native_log.unlink(missing_ok=True)
        for inbox in self._waiting.values():
            inbox.put_nowait({"ev": "died", "message": self._dead_reason})

    def _send(self, message: dict[str, Any]) -> None:
        if not self.alive or self._process.stdin is None:
            raise RunnerDied(self._dead_reason or "the model runner is not running")
        try:
            self._process.stdin.write(encode_frame(message))
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise RunnerDied(self._dead_reason or "the model runner is not running") from exc

    def _open(self) -> tuple[int, asyncio.Queue[dict[str, Any]]]:
        self._next_id += 1
        inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._waiting[self._next_id] = inbox
        if not self.alive:
            inbox.put_nowait(
                {"ev": "died", "message": self._dead_reason or "the model runner is not running"}
            )
        return self._next_id, inbox

    @staticmethod
    def _raise_if_failed(message: dict[str, Any]) -> None:
        kind = message.get("ev")
        if kind == "died":
            raise RunnerDied(message["message"])
        if kind == "error":
            if message.get("overflow"):
                raise ContextOverflow(message["message"])
            raise (InvalidInput if message.get("invalid") else RuntimeFailure)(message["message"])

    async def _call(self, command: dict[str, Any], expect: str) -> dict[str, Any]:
        request_id, inbox = self._open()
        try:
            self._send({**command, "id": request_id})
            message = await inbox.get()
            self._raise_if_failed(message)
            if message.get("ev") != expect:
                raise RuntimeFailure(f"runner answered {message.get('ev')!r} to {command['op']!r}")
            return message
        finally:
            self._waiting.pop(request_id, None)

    async def load(self, spec: LoadSpec) -> tuple[ModelInfo, int]:
        try:
            message = await self._call({"op": "load", "spec": spec.to_wire()}, "loaded")
        except RunnerDied as exc:
            raise RunnerDied(self._load_crash_message(spec, str(exc))) from exc
        return ModelInfo.from_wire(message["info"]), int(message["load_ns"])

    def _load_crash_message(self, spec: LoadSpec, died: str) -> str:
        """A runner that died while loading (a native library crashed in its init): say what it printed."""
        message = f"could not load {spec.model_path}: {died} while loading it"
        tail = self._native_tail
        if spec.engine == "rkllm":
            from rkllama_ollama.runtime.rkllm.startup import diagnose, error_lines

            problem = diagnose(tail)
            if problem is not None:
                return f"{message}; {problem.message()}"
            errors = error_lines(tail)
            if errors:
                return f"{message} (the runtime said: {'; '.join(errors)})"
        if tail:
            return f"{message} (its last output: {tail[-1].strip()})"
        return message

    async def embed(self, inputs: list[str], truncate: bool) -> EmbedResult:
        message = await self._call({"op": "embed", "inputs": inputs, "truncate": truncate}, "embedded")
        return EmbedResult.from_wire(message["result"])

    async def tokenize(self, text: str) -> list[int]:
        return list((await self._call({"op": "tokenize", "text": text}, "tokens"))["tokens"])

    async def detokenize(self, tokens: list[int]) -> str:
        return str((await self._call({"op": "detokenize", "tokens": tokens}, "text"))["text"])

    def generate(
        self, prompt: str, options: SamplingOptions, images: list[str] | None = None
    ) -> RunnerGeneration:
        """Start a generation; iterate it for pieces and one Finished. `aclose()` before the end aborts.
        `images` (base64) go with a prompt holding one `<image>` tag per image, to a vision model."""
        request_id, inbox = self._open()
        command: dict[str, Any] = {
            "op": "generate",
            "id": request_id,
            "prompt": prompt,
            "options": options.to_wire(),
        }
        if images:
            command["images"] = images
        try:
            self._send(command)
        except BaseException:
            self._waiting.pop(request_id, None)
            raise
        return RunnerGeneration(self, request_id, inbox)

    def _abort(self, request_id: int) -> None:
        self._waiting.pop(request_id, None)
        if self.alive:
            try:
                self._send({"op": "abort", "id": request_id})
            except RunnerDied:
                pass

    async def stop(self, timeout: float = 5.0) -> None:
        """Ask the runner to exit (releasing the model); kill it if it does not within `timeout`."""
        if self._process.returncode is None:
            try:
                if self._process.stdin is not None:
                    self._process.stdin.write(encode_frame({"op": "shutdown"}))
                    self._process.stdin.close()
            except (BrokenPipeError, ConnectionResetError, RuntimeError):
                pass
            try:
                await asyncio.wait_for(self._process.wait(), timeout)
            except TimeoutError:
                log.warning("runner pid=%d did not exit in %.1fs; killing it", self._process.pid, timeout)
                self._process.kill()
                await self._process.wait()
        try:
            await asyncio.wait_for(self._reader_task, 1.0)
        except (TimeoutError, asyncio.CancelledError):
            self._reader_task.cancel()
        log.info("runner pid=%d stopped", self._process.pid)

    def kill(self) -> None:
        if self._process.returncode is None:
            self._process.kill()


class RunnerGeneration:
    """One running generation: async-iterate for Piece events, ending with one Finished."""

    def __init__(self, runner: RunnerProcess, request_id: int, inbox: asyncio.Queue[dict[str, Any]]) -> None:
        self._runner = runner
        self._id = request_id
        self._inbox = inbox
        self._finished = False

    def __aiter__(self) -> RunnerGeneration:
        return self

    async def __anext__(self) -> Piece | Finished:
        if self._finished:
            raise StopAsyncIteration
        try:
            message = await self._inbox.get()
        except BaseException:
            await self.aclose()
            raise
        kind = message.get("ev")
        if kind == "piece":
            logprobs = message.get("logprobs")
            if logprobs is None:
                return Piece(message["text"])
            return Piece(message["text"], [TokenLogprob.from_wire(entry) for entry in logprobs])
        self._finished = True
        self._runner._waiting.pop(self._id, None)
        if kind == "done":
            stats = message.get("stats")
            return Finished(None if stats is None else GenerationStats.from_wire(stats))
        RunnerProcess._raise_if_failed(message)
        raise RuntimeFailure(f"runner sent an unexpected {kind!r} event")

    def abort(self) -> None:
        """Ask the runner to stop at the next token; keep iterating to receive its Finished."""
        if not self._finished and self._runner.alive:
            try:
                self._runner._send({"op": "abort", "id": self._id})
            except RunnerDied:
                pass

    async def aclose(self) -> None:
        """Abandon the generation: abort it and stop listening (its remaining events are dropped)."""
        if not self._finished:
            self._finished = True
            self._runner._abort(self._id)


def _has_fileno(stream: Any) -> bool:
    try:
        stream.fileno()
        return True
    except (AttributeError, OSError, ValueError):
        return False


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
