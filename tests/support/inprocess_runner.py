"""A Runner that hosts its model in the test process: the real dispatcher and engines, no child process.

The dispatcher's serve loop runs in a thread (as the child's main thread would); requests and replies
still go through the frame codec, so the messages are the ones a child process would exchange. What
this runner cannot show is what only a process shows: a crash in native code, the native output file,
a kill by signal, CPU pinning of a whole process. Tests of those use a live daemon.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import TypeVar

from rkllama_ollama.runtime.base import LoadSpec
from rkllama_ollama.runtime.runner.client import RunnerClient
from rkllama_ollama.runtime.runner.codec import HEADER, decode_reply, decode_request, encode
from rkllama_ollama.runtime.runner.dispatcher import Dispatcher
from rkllama_ollama.runtime.runner.messages import Reply, Request
from rkllama_ollama.runtime.runner.protocol import Runner, RunnerFactory

log = logging.getLogger("rkllama_ollama.runtime.runner")

T = TypeVar("T")

STOPPED = "the model runner exited with status 0"
KILLED = "the model runner was killed by signal SIGKILL"


class InProcessRunner(RunnerClient):
    def __init__(self, thread_name: str = "inprocess-runner") -> None:
        super().__init__()
        self._loop = asyncio.get_running_loop()
        self._dispatcher = Dispatcher(self._reply_from_thread, thread_name=thread_name)
        self._thread = threading.Thread(target=self._serve, name=thread_name, daemon=True)
        self._thread.start()
        log.info("runner started in-process thread=%s", thread_name)

    def _serve(self) -> None:
        try:
            self._dispatcher.serve()
        finally:
            self._to_loop(self._ended, STOPPED)

    def _to_loop(self, callback: Callable[[T], None], argument: T) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, argument)
        except RuntimeError:  # the test's loop is already closed: nobody listens any more
            pass

    def _reply_from_thread(self, reply: Reply) -> None:
        self._to_loop(self.deliver, decode_reply(encode(reply)[HEADER.size :]))

    def _transmit(self, request: Request) -> None:
        self._dispatcher.submit(decode_request(encode(request)[HEADER.size :]))

    async def stop(self, timeout: float = 5.0) -> None:
        self._dispatcher.end_of_input()
        await asyncio.to_thread(self._thread.join, timeout)
        if self._thread.is_alive():
            log.warning("in-process runner did not stop in %.1fs", timeout)
            self._ended(KILLED)
        else:
            await asyncio.shield(self.died)

    def kill(self) -> None:
        """A thread cannot be killed: stop what runs at its next token, and fail everyone now."""
        self._dispatcher.end_of_input()
        self._ended(KILLED)


def inprocess_runner_factory(thread_name: str = "inprocess-runner") -> RunnerFactory:
    async def start(spec: LoadSpec) -> Runner:
        return InProcessRunner(thread_name)

    return start
