"""One generation, independent of the HTTP face that asked for it.

A face (Ollama, OpenAI, the seed's native API) validates its wire format, resolves the model and builds
a GenerationRequest; `Generator.run()` takes a scheduler turn, loads the model, renders the prompt with
the model's chat template, streams the runner's pieces through the output parsers (thinking, tool
calls, stop sequences) and yields events the face turns into its own wire format.

Errors raised before the first event (queue full, load failure, template error, prompt too long) reach
the face before it has written a byte, so they keep their real HTTP status.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from rkllama_ollama.chat.parse import OutputPipeline, ToolCall
from rkllama_ollama.chat.template import ChatTemplate, TemplateError
from rkllama_ollama.models.store import ModelEntry
from rkllama_ollama.options import layer_options, sampling_from
from rkllama_ollama.runtime.base import GenerationStats, LoadSpec, RuntimeFailure
from rkllama_ollama.runtime.runner import Finished, Piece, RunnerDied
from rkllama_ollama.scheduler import LoadedModel, Scheduler

log = logging.getLogger(__name__)

# Options that change how a model is loaded; a different value reloads it.
LOAD_OPTIONS = ("num_ctx", "num_thread")


class CapabilityError(Exception):
    """The model cannot do what the request asks (400 with Ollama's wording)."""


@dataclass
class GenerationRequest:
    entry: ModelEntry
    messages: list[dict[str, Any]] | None = None  # chat
    prompt: str | None = None  # generate
    system: str | None = None  # generate: overrides the Modelfile SYSTEM
    raw: bool = False
    context: list[int] | None = None  # generate: token ids from an earlier reply
    tools: list[dict[str, Any]] | None = None
    think: bool | str | None = None
    options: dict[str, Any] = field(default_factory=dict)  # validated request options
    keep_alive_s: float | None = None
    interactive: bool = True  # streaming requests go ahead of queued non-streaming ones


@dataclass(frozen=True)
class Loaded:
    """The model is ready (first event of every run)."""

    load_ns: int


@dataclass(frozen=True)
class Thinking:
    text: str


@dataclass(frozen=True)
class Content:
    text: str


@dataclass(frozen=True)
class ToolCallEvent:
    call: ToolCall


@dataclass(frozen=True)
class Done:
    done_reason: str  # "stop" | "length"
    stats: GenerationStats
    load_ns: int
    total_ns: int

    @property
    def context(self) -> list[int]:
        return self.stats.context


Event = Loaded | Thinking | Content | ToolCallEvent | Done

INPUT_TOO_LONG = "the input length exceeds the context length"


class InputTooLong(RuntimeFailure):
    """An embedding input longer than the context, with truncation off (a 400, not a 500)."""


@dataclass(frozen=True)
class Embeddings:
    """The result of one embedding request: raw (not normalised) vectors, one per input."""

    vectors: list[list[float]]
    prompt_tokens: int
    load_ns: int
    total_ns: int


def l2_normalised(vector: list[float], dimensions: int | None = None) -> list[float]:
    """Cut to `dimensions` (when given), then scale to unit length; a zero vector stays zero.

    Raises RuntimeFailure on NaN or infinite values (Ollama refuses to return them).
    """
    if dimensions is not None:
        vector = vector[:dimensions]
    if not all(math.isfinite(value) for value in vector):
        raise RuntimeFailure("the embedding contains NaN or infinite values")
    norm = math.sqrt(math.fsum(value * value for value in vector))
    return [value / norm for value in vector] if norm > 0 else [0.0 for _ in vector]


class Generator:
    def __init__(self, scheduler: Scheduler, *, default_num_ctx: int, num_threads: int) -> None:
        self.scheduler = scheduler
        self.default_num_ctx = default_num_ctx
        self.num_threads = num_threads

    # -- loading --------------------------------------------------------------------------------

    def load_spec(self, entry: ModelEntry, options: dict[str, Any], *, embedding: bool = False) -> LoadSpec:
        merged = layer_options(entry.modelfile.parameters, options)
        num_ctx = merged.get("num_ctx") or self.default_num_ctx
        if entry.context_length:
            num_ctx = min(num_ctx, entry.context_length) if entry.format == "rkllm" else num_ctx
        if embedding and entry.max_context_length:  # like Ollama: embeddings never exceed the trained context
            num_ctx = min(num_ctx, entry.max_context_length)
        # Init-time defaults come from the Modelfile only: per-request sampling travels in SamplingOptions,
        # so a request's options never change the LoadSpec (which would reload the model).
        modelfile_defaults = layer_options(entry.modelfile.parameters, {})
        params = {k: v for k, v in modelfile_defaults.items() if k not in LOAD_OPTIONS}
        return LoadSpec(
            engine="rkllm" if entry.format == "rkllm" else "llamacpp",
            model_path=str(entry.weights),
            num_ctx=int(num_ctx),
            n_threads=int(merged.get("num_thread") or self.num_threads),
            embedding=embedding,
            tokenizer_dir=str(entry.tokenizer_dir) if entry.tokenizer_dir else None,
            # Sampling lives in SamplingOptions per request; rkllm families C-E need init-time defaults.
            params=params if entry.format == "rkllm" else {},
        )

    async def embed(
        self,
        entry: ModelEntry,
        inputs: list[str],
        *,
        truncate: bool = True,
        options: dict[str, Any] | None = None,
        keep_alive_s: float | None = None,
    ) -> Embeddings:
        """Embed `inputs` (raw vectors). Loads the model in embedding mode; no inputs = load only.

        Raises InputTooLong when an input exceeds the context and `truncate` is off.
        """
        started = time.perf_counter_ns()
        spec = self.load_spec(entry, options or {}, embedding=True)
        async with self.scheduler.turn(interactive=True):
            loaded = await self._ensure_loaded(entry, spec, keep_alive_s)
            load_ns = time.perf_counter_ns() - started
            result = None
            if inputs:
                try:
                    result = await loaded.runner.embed(inputs, truncate)
                except RunnerDied:
                    self.scheduler.forget_dead_runner()
                    raise
                except RuntimeFailure as exc:
                    if str(exc) == INPUT_TOO_LONG:
                        raise InputTooLong(INPUT_TOO_LONG) from None
                    raise
            self.scheduler.touch(keep_alive_s)
        vectors = result.vectors if result is not None else []
        if len(vectors) != len(inputs):
            raise RuntimeFailure(f"the runtime returned {len(vectors)} vectors for {len(inputs)} inputs")
        prompt_tokens = result.prompt_tokens if result is not None else 0
        return Embeddings(vectors, prompt_tokens, load_ns, time.perf_counter_ns() - started)

    async def load(self, entry: ModelEntry, options: dict[str, Any], keep_alive_s: float | None) -> int:
        """Load-only request: returns load_ns."""
        spec = self.load_spec(entry, options)
        async with self.scheduler.turn(interactive=True):
            loaded = await self._ensure_loaded(entry, spec, keep_alive_s)
            self.scheduler.touch(keep_alive_s)
            return loaded.load_ns

    async def _ensure_loaded(
        self, entry: ModelEntry, spec: LoadSpec, keep_alive_s: float | None
    ) -> LoadedModel:
        try:
            return await self.scheduler.ensure_loaded(entry, spec, keep_alive_s)
        except RunnerDied:
            self.scheduler.forget_dead_runner()
            raise

    @staticmethod
    def template_for(loaded: LoadedModel) -> ChatTemplate:
        template = loaded.extras.get("template")
        if template is None:
            entry = loaded.entry
            source = entry.chat_template or loaded.info.chat_template
            template = ChatTemplate(
                source or "",
                bos_token=entry.bos_token or loaded.info.bos_token,
                eos_token=entry.eos_token or loaded.info.eos_token,
            )
            loaded.extras["template"] = template
        assert isinstance(template, ChatTemplate)
        return template

    # -- prompts --------------------------------------------------------------------------------

    def check_capabilities(
        self, entry: ModelEntry, label: str, *, kind: str, think: bool | str | None
    ) -> None:
        """Ollama's capability errors, naming the model as the client sent it."""
        if "completion" not in entry.capabilities:
            raise CapabilityError(f'"{label}" does not support {kind}')
        if think not in (None, False) and "thinking" not in entry.capabilities:
            raise CapabilityError(f'"{label}" does not support thinking')

    def _chat_messages(self, request: GenerationRequest) -> list[dict[str, Any]]:
        modelfile = request.entry.modelfile
        messages = [dict(m) for m in (modelfile.messages or [])] + [dict(m) for m in request.messages or []]
        if modelfile.system and not (messages and messages[0].get("role") == "system"):
            messages.insert(0, {"role": "system", "content": modelfile.system})
        return messages

    async def _render(self, request: GenerationRequest, loaded: LoadedModel, think: bool | str | None) -> str:
        template = self.template_for(loaded)
        tools = request.tools or None
        if tools and not template.supports_tools:
            log.info(
                "model=%s cannot render tools; answering without the %d tool definitions",
                request.entry.name.display,
                len(tools),
            )
            tools = None
        if request.messages is not None:
            prompt = template.render(self._chat_messages(request), tools=tools, think=think)
        elif request.raw:
            prompt = request.prompt or ""
        else:
            system = request.system if request.system is not None else request.entry.modelfile.system
            messages = [{"role": "system", "content": system}] if system else []
            messages.append({"role": "user", "content": request.prompt or ""})
            prompt = template.render(messages, tools=None, think=think)
        if request.context:  # like Ollama: the earlier exchange goes before the new rendered prompt
            prompt = await loaded.runner.detokenize(request.context) + prompt
        return self._without_double_bos(prompt, loaded)

    @staticmethod
    def _without_double_bos(prompt: str, loaded: LoadedModel) -> str:
        """Engines that add BOS themselves would otherwise see it twice (templates often print it)."""
        bos = loaded.info.bos_token
        while loaded.info.add_bos_token and bos and prompt.startswith(bos):
            prompt = prompt[len(bos) :]
        return prompt

    # -- running --------------------------------------------------------------------------------

    async def run(self, request: GenerationRequest) -> AsyncIterator[Event]:
        started = time.perf_counter_ns()
        entry = request.entry
        options = layer_options(entry.modelfile.parameters, request.options)
        spec = self.load_spec(entry, request.options)
        think_arg = request.think if request.think is not None else ("thinking" in entry.capabilities or None)
        async with self.scheduler.turn(interactive=request.interactive):
            loaded = await self._ensure_loaded(entry, spec, request.keep_alive_s)
            load_ns = time.perf_counter_ns() - started  # like Ollama: request start until the model is ready
            yield Loaded(load_ns)
            try:
                prompt = await self._render(
                    request, loaded, think_arg if "thinking" in entry.capabilities else None
                )
            except TemplateError as exc:
                raise RuntimeFailure(f"cannot render the chat template: {exc}") from exc
            template = self.template_for(loaded)
            pipeline = OutputPipeline.for_request(
                None if request.raw else template,
                prompt,
                think=request.think,
                tools=request.tools if template.supports_tools else None,
                stops=list(options.get("stop") or []),
            )
            sampling = sampling_from(options)
            stats: GenerationStats | None = None
            stopped = False
            generation = loaded.runner.generate(prompt, sampling)
            try:
                async for item in generation:
                    if isinstance(item, Piece):
                        if stopped:
                            continue  # tokens produced between our abort and the runner seeing it
                        for event in pipeline.feed(item.text):
                            yield _wrap(event)
                        if pipeline.stopped:
                            stopped = True
                            generation.abort()
                    elif isinstance(item, Finished):
                        stats = item.stats
            except RunnerDied:
                self.scheduler.forget_dead_runner()
                raise
            finally:
                await generation.aclose()
            if not stopped:
                for event in pipeline.flush():
                    yield _wrap(event)
            if stats is None:
                raise RuntimeFailure("generation ended without statistics")
            self.scheduler.touch(request.keep_alive_s)
            reason = "stop" if stopped or stats.done_reason in ("stop", "abort") else stats.done_reason
            yield Done(reason, stats, load_ns + stats.reload_ns, time.perf_counter_ns() - started)


def _wrap(event: tuple[str, Any]) -> Event:
    kind, value = event
    if kind == "thinking":
        return Thinking(value)
    if kind == "tool_call":
        return ToolCallEvent(value)
    return Content(value)
