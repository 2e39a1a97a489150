"""The server's side of the runner conversation, whatever carries the frames.

`RunnerClient` numbers requests, routes each reply to the request waiting for it, turns failures into
exceptions, and fails every waiting request when the runner ends. A subclass supplies the transport:
`_transmit` to send a request, and calls `deliver(reply)` for each reply and `_ended(reason)` once when
the runner is gone (process.py: a child process and its pipes).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from rkllama_ollama.runtime.base import (
    ContextOverflow,
    EmbedResult,
    InvalidInput,
    LoadSpec,
    ModelInfo,
    RuntimeFailure,
    SamplingOptions,
)
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
    Text,
    Tokenize,
    Tokens,
)
from rkllama_ollama.runtime.runner.protocol import Finished, Piece, RunnerDied

log = logging.getLogger("rkllama_ollama.runtime.runner")

NOT_RUNNING = "the model runner is not running"

R = TypeVar("R", Loaded, Embedded, Tokens, Text)


@dataclass(frozen=True)
class _Died:
    """Not a frame: what a waiting request receives when the runner ends."""

    message: str


Inbox = asyncio.Queue[Reply | _Died]


class RunnerClient:
    """Requests and replies with one runner. The scheduler gives one load at a time."""

    def __init__(self) -> None:
        self._next_id = 0
        self._waiting: dict[int, Inbox] = {}
        self._dead_reason: str | None = None
        self._died: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    # -- the transport's part ------------------------------------------------------------------

    def _transmit(self, request: Request) -> None:
        """Send one request; raise RunnerDied when it cannot be sent."""
        raise NotImplementedError

    def deliver(self, reply: Reply) -> None:
        """A reply arrived: hand it to the request waiting for it (replies to abandoned ones drop)."""
        if reply.id is None:
            log.error("runner could not read a request: %s", getattr(reply, "message", reply))
            return
        inbox = self._waiting.get(reply.id)
        if inbox is not None:
            inbox.put_nowait(reply)

    def _ended(self, reason: str) -> None:
        """The runner is gone: every waiting request fails with `reason` (said once)."""
        if self._dead_reason is not None:
            return
        self._dead_reason = reason
        if not self._died.done():
            self._died.set_result(reason)  # first: the scheduler forgets it before the requests wake
        for inbox in self._waiting.values():
            inbox.put_nowait(_Died(reason))

    def _explain_load_death(self, spec: LoadSpec, died: str) -> str:
        """The message of a runner that died while loading `spec`."""
        return f"could not load {spec.model_path}: {died} while loading it"

    # -- the Runner protocol -------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self._dead_reason is None

    @property
    def died(self) -> asyncio.Future[str]:
        return self._died

    def _send(self, request: Request) -> None:
        if not self.alive:
            raise RunnerDied(self._dead_reason or NOT_RUNNING)
        self._transmit(request)

    def _open(self) -> tuple[int, Inbox]:
        self._next_id += 1
        inbox: Inbox = asyncio.Queue()
        self._waiting[self._next_id] = inbox
        if not self.alive:
            inbox.put_nowait(_Died(self._dead_reason or NOT_RUNNING))
        return self._next_id, inbox

    async def _call(self, make: Callable[[int], Request], expect: type[R]) -> R:
        request_id, inbox = self._open()
        request = make(request_id)
        try:
            self._send(request)
            reply = await inbox.get()
            raise_failure(reply)
            if not isinstance(reply, expect):
                raise RuntimeFailure(
                    f"runner answered {type(reply).__name__} to {type(request).__name__.lower()}"
                )
            return reply
        finally:
            self._waiting.pop(request_id, None)

    async def load(self, spec: LoadSpec) -> tuple[ModelInfo, int]:
        try:
            reply = await self._call(lambda i: Load(i, spec), Loaded)
        except RunnerDied as exc:
            raise RunnerDied(self._explain_load_death(spec, str(exc))) from exc
        return reply.info, reply.load_ns

    async def embed(self, inputs: list[str], truncate: bool) -> EmbedResult:
        return (await self._call(lambda i: Embed(i, tuple(inputs), truncate), Embedded)).result

    async def tokenize(self, text: str) -> list[int]:
        return list((await self._call(lambda i: Tokenize(i, text), Tokens)).tokens)

    async def detokenize(self, tokens: list[int]) -> str:
        return (await self._call(lambda i: Detokenize(i, tuple(tokens)), Text)).text

    def generate(
        self, prompt: str, options: SamplingOptions, images: list[str] | None = None
    ) -> ClientGeneration:
        """Start a generation; iterate it for pieces and one Finished. `aclose()` before the end aborts.
        `images` (base64) go with a prompt holding one `<image>` tag per image, to a vision model."""
        request_id, inbox = self._open()
        try:
            self._send(Generate(request_id, prompt, options, tuple(images or ())))
        except BaseException:
            self._waiting.pop(request_id, None)
            raise
        return ClientGeneration(self, request_id, inbox)

    def _abort(self, request_id: int, *, forget: bool) -> None:
        if forget:
            self._waiting.pop(request_id, None)
        if self.alive:
            try:
                self._send(Abort(request_id))
            except RunnerDied:
                pass


def raise_failure(reply: Reply | _Died) -> None:
    """Raise what a failure reply stands for (nothing for other replies)."""
    if isinstance(reply, _Died):
        raise RunnerDied(reply.message)
    if isinstance(reply, Failed):
        if reply.overflow:
            raise ContextOverflow(reply.message)
        raise (InvalidInput if reply.invalid else RuntimeFailure)(reply.message)


class ClientGeneration:
    """One running generation: async-iterate for Piece values, ending with one Finished."""

    def __init__(self, client: RunnerClient, request_id: int, inbox: Inbox) -> None:
        self._client = client
        self._id = request_id
        self._inbox = inbox
        self._finished = False

    def __aiter__(self) -> ClientGeneration:
        return self

    async def __anext__(self) -> Piece | Finished:
        if self._finished:
            raise StopAsyncIteration
        try:
            reply = await self._inbox.get()
        except BaseException:
            await self.aclose()
            raise
        if isinstance(reply, Emitted):
            return Piece(reply.text, None if reply.logprobs is None else list(reply.logprobs))
        self._finished = True
        self._client._waiting.pop(self._id, None)
        if isinstance(reply, Done):
            return Finished(reply.stats)
        raise_failure(reply)
        raise RuntimeFailure(f"runner sent an unexpected {type(reply).__name__} reply to a generation")

    def abort(self) -> None:
        """Ask the runner to stop at the next token; keep iterating to receive its Finished."""
        if not self._finished:
            self._client._abort(self._id, forget=False)

    async def aclose(self) -> None:
        """Abandon the generation: abort it and stop listening (its remaining replies are dropped)."""
        if not self._finished:
            self._finished = True
            self._client._abort(self._id, forget=True)
