"""Keeping the last streamed conversation in the KV cache across background requests.

Open WebUI follows every streamed reply with non-streamed background requests (a title, follow-up
suggestions, tags). Their prompts evict the conversation from the single KV cache, so the user's next
message would re-feed the whole conversation: tens of seconds on a CPU for a long chat. After such a
background request, once nothing has asked for the session for `delay_s`, the keeper feeds the last
streamed prompt and its reply again (prefill; one token is sampled and dropped) in an idle turn that any
arriving request preempts at once. The next message then only feeds what is new.

llama.cpp only: its session keeps whatever prefix the next prompt shares. The RKLLM session can reuse
its cache only when the next prompt extends it exactly, which a prefill that sampled one more token
does not leave; it would spend NPU time for nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from rkllama_ollama.runtime.base import LoadSpec, RuntimeFailure, SamplingOptions
from rkllama_ollama.runtime.runner import Finished, RunnerDied, RunnerGeneration
from rkllama_ollama.scheduler import Scheduler

log = logging.getLogger(__name__)

RESTORE_DELAY_S = 1.0  # Open WebUI sends its background requests one after another: let them pass


@dataclass(frozen=True)
class _Conversation:
    key: str  # the model's store key
    model: str  # its name for the log
    spec: LoadSpec  # the load it ran on (a reload empties the cache anyway)
    text: str  # the prompt and the reply as generated


class PrefixKeeper:
    def __init__(self, scheduler: Scheduler, delay_s: float = RESTORE_DELAY_S) -> None:
        self._scheduler = scheduler
        self._delay_s = delay_s
        self._last: _Conversation | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._generation: RunnerGeneration | None = None
        self._preempted = False

    def streamed(self, key: str, model: str, spec: LoadSpec, text: str) -> None:
        """A streamed (interactive) generation ended: the cache holds `text`."""
        self._cancel_timer()
        self._last = _Conversation(key, model, spec, text) if spec.engine == "llamacpp" else None

    def background_ended(self, key: str) -> None:
        """A non-streamed generation on model `key` ended: on the conversation's model it has evicted
        the conversation, restore it when idle (another resident model has a cache of its own)."""
        if self._last is None or self._last.key != key:
            return
        self._cancel_timer()
        self._timer = asyncio.get_running_loop().call_later(self._delay_s, self._start)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _start(self) -> None:
        self._timer = None
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._restore())

    def _preempt(self) -> None:
        self._preempted = True
        if self._generation is not None:
            self._generation.abort()

    async def _restore(self) -> None:
        last = self._last
        if last is None:
            return
        self._preempted = False
        async with self._scheduler.idle_turn(last.key, self._preempt) as granted:
            loaded = self._scheduler.loaded_model(last.key)
            if not granted or loaded is None or loaded.key != last.key or loaded.spec != last.spec:
                return
            started = time.perf_counter()
            generation = loaded.runner.generate(last.text, SamplingOptions(num_predict=1, temperature=0.0))
            self._generation = generation
            if self._preempted:
                generation.abort()
            fed = 0
            try:
                async for item in generation:
                    if isinstance(item, Finished) and item.stats is not None:
                        fed = item.stats.prompt_eval_count
            except RunnerDied:
                self._scheduler.forget_dead_runner()
                return
            except RuntimeFailure as exc:
                log.warning("restoring the conversation in the cache failed model=%s: %s", last.model, exc)
                return
            finally:
                self._generation = None
                await generation.aclose()
        if self._preempted:
            log.info("conversation restore preempted by a request after %.2fs", time.perf_counter() - started)
        else:
            log.info(
                "conversation restored in the cache model=%s: %d tokens fed in %.2fs",
                last.model,
                fed,
                time.perf_counter() - started,
            )
