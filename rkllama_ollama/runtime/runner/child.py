"""The runner process's main loop: requests from stdin, replies on a dedicated event pipe.

Replies do not go to stdout, so whatever a native library prints there (the RKLLM banner) never
corrupts the stream. A reader thread decodes requests as they arrive, so an abort is acted on even in
the middle of a generation; the main thread runs the dispatcher.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import BinaryIO

from rkllama_ollama.runtime.runner.codec import FrameError, decode_request, encode, read_frame
from rkllama_ollama.runtime.runner.dispatcher import Dispatcher
from rkllama_ollama.runtime.runner.messages import Reply, Shutdown

log = logging.getLogger("rkllama_ollama.runtime.runner")


class _EventPipe:
    """The write end of the event pipe, shared by the threads that send replies."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.Lock()

    def send(self, reply: Reply) -> None:
        frame = encode(reply)
        with self._lock:
            view = memoryview(frame)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]


def read_requests(stream: BinaryIO, dispatcher: Dispatcher) -> None:
    """Reader thread: decode requests until the end of the stream or a shutdown."""
    try:
        while True:
            try:
                payload = read_frame(stream)
            except FrameError as exc:  # the stream cannot be cut into frames any more
                log.error("runner: %s; stopping", exc)
                break
            if payload is None:
                break
            try:
                request = decode_request(payload)
            except FrameError as exc:
                dispatcher.reject(exc)
                continue
            if isinstance(request, Shutdown):
                break
            dispatcher.submit(request)
    finally:
        dispatcher.end_of_input()


def child_main(argv: list[str]) -> int:
    """Entry point of the runner process: `python -m rkllama_ollama.runtime.runner <events-fd>`."""
    events_fd = int(argv[0])
    logging.basicConfig(
        level=os.environ.get("RKLLAMA_LOG_LEVEL", "INFO").upper(),
        format="runner[%(process)d] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server decides when we stop
    dispatcher = Dispatcher(_EventPipe(events_fd).send)
    reader = threading.Thread(
        target=read_requests, args=(sys.stdin.buffer, dispatcher), name="runner-commands", daemon=True
    )
    reader.start()
    dispatcher.serve()
    return 0
