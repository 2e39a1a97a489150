"""What the server relies on in a runner, whatever hosts it.

The scheduler makes runners through a `RunnerFactory` and talks to them through `Runner`; a generation
is a `Generation` that yields `Piece` values and ends with one `Finished`. The daemon's factory starts
a child process (process.py); a test may pass one that runs the same dispatcher in its own process.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from rkllama_ollama.runtime.base import (
    EmbedResult,
    GenerationStats,
    LoadSpec,
    ModelInfo,
    RuntimeFailure,
    SamplingOptions,
    TokenLogprob,
)


class RunnerDied(RuntimeFailure):
    """The runner exited while a request was using it."""


@dataclass(frozen=True)
class Piece:
    text: str
    logprobs: list[TokenLogprob] | None = None  # the tokens that made `text`, when asked for


@dataclass(frozen=True)
class Finished:
    stats: GenerationStats | None  # None when aborted before it started


class Generation(Protocol):
    """One running generation: async-iterate for Piece values, ending with one Finished."""

    def __aiter__(self) -> Generation: ...

    async def __anext__(self) -> Piece | Finished: ...

    def abort(self) -> None:
        """Ask the runner to stop at the next token; keep iterating to receive its Finished."""

    async def aclose(self) -> None:
        """Abandon the generation: abort it and stop listening (its remaining values are dropped)."""


class Runner(Protocol):
    """One model host. One load at a time; the scheduler serialises loads and decides on sharing."""

    @property
    def alive(self) -> bool: ...

    @property
    def died(self) -> asyncio.Future[str]:
        """Resolved, with the reason, when the runner has ended for any cause (a crash, a kill, a stop)."""

    async def load(self, spec: LoadSpec) -> tuple[ModelInfo, int]:
        """Load the model; (what was loaded, engine load time in ns). Raises RunnerDied, RuntimeFailure."""

    async def embed(self, inputs: list[str], truncate: bool) -> EmbedResult: ...

    async def tokenize(self, text: str) -> list[int]: ...

    async def detokenize(self, tokens: list[int]) -> str: ...

    def generate(
        self, prompt: str, options: SamplingOptions, images: list[str] | None = None
    ) -> Generation: ...

    async def stop(self, timeout: float = 5.0) -> None:
        """End the runner, releasing the model (forcefully after `timeout`)."""

    def kill(self) -> None:
        """End the runner now, whatever it is doing."""


RunnerFactory = Callable[[LoadSpec], Awaitable[Runner]]
"""Makes a runner, ready to be asked to load `spec` (the scheduler then calls `load(spec)`)."""
