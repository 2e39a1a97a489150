"""A runner in a child process (`python -m rkllama_ollama.runtime.runner <events-fd>`), and its factory.

Requests go to the child's stdin; replies come back on a dedicated pipe, read by an asyncio protocol
that decodes frames as bytes arrive (one wake-up per token, no polling). The child's native output is
also written to a file, so a load that crashed the runner can say what the native library printed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rkllama_ollama.runtime.base import NATIVE_LOG_ENV, Engine, LoadSpec, RuntimeFailure
from rkllama_ollama.runtime.runner.client import RunnerClient
from rkllama_ollama.runtime.runner.codec import FrameBuffer, FrameError, decode_reply, encode
from rkllama_ollama.runtime.runner.messages import Reply, Request, Shutdown
from rkllama_ollama.runtime.runner.protocol import Runner, RunnerDied, RunnerFactory

log = logging.getLogger("rkllama_ollama.runtime.runner")


class EventFrames(asyncio.Protocol):
    """The read end of the runner's event pipe: frames are cut and decoded as bytes arrive, and each
    reply is handed to `deliver` in the same event-loop callback. A frame that cannot be decoded marks
    the pipe corrupt and closes it."""

    def __init__(self, deliver: Callable[[Reply], None]) -> None:
        self._deliver = deliver
        self._frames = FrameBuffer()
        self._transport: asyncio.BaseTransport | None = None
        self.corrupt: str | None = None  # what was wrong with the frame that closed the pipe
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            for payload in self._frames.feed(data):
                self._deliver(decode_reply(payload))
        except FrameError as exc:
            self.corrupt = str(exc)
            self._frames.clear()
            if self._transport is not None:
                self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


class RunnerProcess(RunnerClient):
    """The server's handle on one runner child."""

    def __init__(self, process: asyncio.subprocess.Process, native_log: Path | None = None) -> None:
        super().__init__()
        self._process = process
        self._native_log = native_log
        self._native_tail: list[str] = []  # what the native library printed while loading, if it died
        self._events = EventFrames(self.deliver)
        self._reader_task = asyncio.get_running_loop().create_task(self._watch())

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def alive(self) -> bool:
        return super().alive and self._process.returncode is None

    @classmethod
    async def start(cls, env: dict[str, str] | None = None) -> RunnerProcess:
        """Start a runner child. The system refusing one (no descriptors, no memory, no process slot)
        is a RuntimeFailure saying so, not an unexplained error."""
        try:
            return await cls._start(env)
        except OSError as exc:
            log.error("could not start a runner: %s", exc)
            raise RuntimeFailure(f"could not start the model runner: {exc}") from exc

    @classmethod
    async def _start(cls, env: dict[str, str] | None) -> RunnerProcess:
        log_fd, log_name = tempfile.mkstemp(prefix="rkllama-runner-", suffix=".log")
        os.close(log_fd)
        native_log = Path(log_name)
        env = {**(os.environ if env is None else env), NATIVE_LOG_ENV: log_name}
        try:
            read_fd, write_fd = os.pipe()
        except BaseException:
            native_log.unlink(missing_ok=True)
            raise
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
            os.close(read_fd)  # no child: nobody will ever write to the event pipe
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

    async def _watch(self) -> None:
        """When the event pipe closes (exit, crash or a corrupt frame), fail whoever is waiting."""
        await self._events.closed
        if self._events.corrupt:
            log.error(
                "runner pid=%d sent a corrupt event frame (%s); killing it",
                self._process.pid,
                self._events.corrupt,
            )
            self.kill()
        returncode = await self._process.wait()
        if returncode < 0:
            try:
                how = f"was killed by signal {signal.Signals(-returncode).name}"
            except ValueError:
                how = f"was killed by signal {-returncode}"
        else:
            how = f"exited with status {returncode}"
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
        self._ended(f"the model runner {how}")

    def _transmit(self, request: Request) -> None:
        if self._process.stdin is None:
            raise RunnerDied(self._dead_reason or "the model runner is not running")
        try:
            self._process.stdin.write(encode(request))
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise RunnerDied(self._dead_reason or "the model runner is not running") from exc

    def _explain_load_death(self, spec: LoadSpec, died: str) -> str:
        """A runner that died while loading (a native library crashed in its init): say what it printed."""
        message = super()._explain_load_death(spec, died)
        tail = self._native_tail
        if spec.engine == Engine.RKLLM:
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

    async def stop(self, timeout: float = 5.0) -> None:
        """Ask the runner to exit (releasing the model); kill it if it does not within `timeout`."""
        if self._process.returncode is None:
            try:
                if self._process.stdin is not None:
                    self._process.stdin.write(encode(Shutdown()))
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


def process_runner_factory(env: dict[str, str] | None = None) -> RunnerFactory:
    """Runners as child processes with `env` (None: this process's environment)."""

    async def start(spec: LoadSpec) -> Runner:
        return await RunnerProcess.start(env)

    return start


def _has_fileno(stream: Any) -> bool:
    try:
        stream.fileno()
        return True
    except (AttributeError, OSError, ValueError):
        return False
