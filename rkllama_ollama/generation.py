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
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from rkllama_ollama.chat.images import images_in_order, tagged_messages, with_image_tags
from rkllama_ollama.chat.parse import OutputPipeline, ToolCall
from rkllama_ollama.chat.template import ChatTemplate, TemplateError, template_from_runtime_pieces
from rkllama_ollama.models.store import ModelEntry
from rkllama_ollama.models.tokenizer_fetch import TokenizerFetcher
from rkllama_ollama.options import layer_options, sampling_from
from rkllama_ollama.runtime.base import (
    IMAGE_TAG,
    RKLLM_MAX_BATCH,
    ContextOverflow,
    GenerationStats,
    InvalidInput,
    LoadSpec,
    RuntimeFailure,
    TokenLogprob,
)
from rkllama_ollama.runtime.runner.protocol import Finished, Piece
from rkllama_ollama.scheduler import LoadedModel, Scheduler
from rkllama_ollama.structured import (
    Format,
    InvalidStructuredAnswer,
    guided_messages,
    guided_system,
    schema_text,
    validated_answer,
)

log = logging.getLogger(__name__)


def _missing_template_hint(entry: ModelEntry) -> str:
    """Why a model renders with ChatML, and what would give it its own template (one log line)."""
    if entry.format != "rkllm":
        return "using ChatML (the weights carry no tokenizer.chat_template)"
    repo = entry.modelfile.huggingface_path
    where = f"{entry.folder / 'tokenizer'}"
    if repo:
        where += f" nor the Hugging Face cache of HUGGINGFACE_PATH={repo}"
    return f"using ChatML (no tokenizer_config.json with a chat_template in {where})"


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
    suffix: str | None = None  # generate: fill-in-the-middle (models whose template has `suffix`)
    raw: bool = False
    context: list[int] | None = None  # generate: token ids from an earlier reply
    tools: list[dict[str, Any]] | None = None
    think: bool | str | None = None
    options: dict[str, Any] = field(default_factory=dict)  # validated request options
    keep_alive_s: float | None = None
    interactive: bool = True  # streaming requests go ahead of queued non-streaming ones
    format: Format | None = None  # structured output: "json" or a JSON schema (already checked)
    top_logprobs: int = -1  # -1: no log-probabilities; n >= 0: with each token's n likeliest alternatives
    truncate: bool = True  # chat: drop the oldest messages when the conversation outgrows the context
    shift: bool = True  # a reply that fills the context shifts it and goes on (llama.cpp)
    images: list[str] | None = None  # generate: base64 pictures (checked); chat images ride on messages


# `logprobs`, when the request asked for them: the entries of the tokens generated since the previous
# event (in Ollama's wire shape). Every generated token's entry rides on exactly one event, even while
# the text itself is held back (a tool call being buffered, a possible stop sequence): then it comes on
# an empty Content.
@dataclass(frozen=True)
class Thinking:
    text: str
    logprobs: list[TokenLogprob] | None = None


@dataclass(frozen=True)
class Content:
    text: str
    logprobs: list[TokenLogprob] | None = None


@dataclass(frozen=True)
class ToolCallEvent:
    call: ToolCall
    logprobs: list[TokenLogprob] | None = None


@dataclass(frozen=True)
class Done:
    done_reason: str  # "stop" | "length"
    stats: GenerationStats
    load_ns: int
    total_ns: int

    @property
    def context(self) -> list[int]:
        return self.stats.context


Event = Thinking | Content | ToolCallEvent | Done


async def first_event(events: AsyncIterator[Event]) -> Event:
    """The first event of a run. By then the turn is held, the model loaded and the prompt rendered, so
    whatever fails before a face writes a byte (queue full, load failure, template error, a prompt too
    long) has raised, and the face's error middleware still answers with a real HTTP status."""
    event = await anext(events, None)
    if event is None:
        raise RuntimeFailure("generation ended without a result")
    return event


@dataclass
class Answer:
    """A whole (non-streamed) answer gathered from a run's events; each face formats it its own way."""

    content_parts: list[str] = field(default_factory=list)
    thinking_parts: list[str] = field(default_factory=list)
    tool_calls: list[ToolCallEvent] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def content(self) -> str:
        return "".join(self.content_parts)

    @property
    def thinking(self) -> str:
        return "".join(self.thinking_parts)

    def add(self, event: Thinking | Content | ToolCallEvent) -> None:
        self.logprobs.extend(event.logprobs or ())
        if isinstance(event, Content):
            self.content_parts.append(event.text)
        elif isinstance(event, Thinking):
            self.thinking_parts.append(event.text)
        else:
            self.tool_calls.append(event)


async def collect_answer(first: Event, events: AsyncIterator[Event]) -> tuple[Answer, Done]:
    """Gather a run (from its `first_event`) into one Answer and its final Done."""
    answer = Answer()
    event: Event | None = first
    while event is not None:
        if isinstance(event, Done):
            return answer, event
        answer.add(event)
        event = await anext(events, None)
    raise RuntimeFailure("generation ended without a final result")


INPUT_TOO_LONG = "the input length exceeds the context length"  # Ollama's wording for embeddings


@dataclass(frozen=True)
class Embeddings:
    """The result of one embedding request: raw (not normalised) vectors, one per input."""

    vectors: list[list[float]]
    prompt_tokens: int
    load_ns: int
    total_ns: int


def finite_vectors(vectors: list[list[float]]) -> list[list[float]]:
    """The vectors as they are; RuntimeFailure on NaN or infinite values (Ollama refuses to return them)."""
    if not all(math.isfinite(value) for vector in vectors for value in vector):
        raise RuntimeFailure("the embedding contains NaN or infinite values")
    return vectors


def l2_normalised(vector: list[float], dimensions: int | None = None) -> list[float]:
    """Cut to `dimensions` (when given), then scale to unit length; a zero vector stays zero."""
    if dimensions is not None:
        vector = vector[:dimensions]
    norm = math.sqrt(math.fsum(value * value for value in vector))
    return [value / norm for value in vector] if norm > 0 else [0.0 for _ in vector]


class GenerationObserver(Protocol):
    """Hooks for metrics and request logs, called in the requesting task. They must be cheap and not raise."""

    def generation_started(self, model: str) -> None: ...

    def model_loaded(self, model: str, engine: str, load_ns: int) -> None:
        """A runner actually loaded the model (not called when it was already loaded)."""

    def first_piece(self, model: str, ttft_ns: int) -> None:
        """The first output piece, `ttft_ns` after the request reached the Generator."""

    def next_piece(self, model: str, gap_ns: int) -> None:
        """Every later output piece, `gap_ns` after the previous one."""

    def generation_finished(self, model: str, stats: GenerationStats) -> None: ...


class NullObserver:
    def generation_started(self, model: str) -> None:
        pass

    def model_loaded(self, model: str, engine: str, load_ns: int) -> None:
        pass

    def first_piece(self, model: str, ttft_ns: int) -> None:
        pass

    def next_piece(self, model: str, gap_ns: int) -> None:
        pass

    def generation_finished(self, model: str, stats: GenerationStats) -> None:
        pass


@dataclass(frozen=True)
class KvCacheSettings:
    """Conversation caches (RKLLAMA_KV_CACHE_*): the store's cache folder (None: none on disk), the
    conversations kept per model (-1: from free memory, 0: off), the RAM budget in MiB (0: from free
    memory)."""

    root: Path | None = None
    slots: int = -1
    ram_mb: int = 0


class Generator:
    def __init__(
        self,
        scheduler: Scheduler,
        *,
        default_num_ctx: int,
        num_threads: int,
        cpus: tuple[int, ...] = (),
        observer: GenerationObserver | None = None,
        kv_cache: KvCacheSettings | None = None,
        num_parallel: int = 1,
        rkllm_multi_batch: bool = False,
    ) -> None:
        self.scheduler = scheduler
        self.default_num_ctx = default_num_ctx
        self.num_threads = num_threads
        self.cpus = cpus
        self.kv_cache = kv_cache or KvCacheSettings()
        self.num_parallel = num_parallel
        self.rkllm_multi_batch = rkllm_multi_batch
        self.observer: GenerationObserver = observer or NullObserver()
        # Downloads missing tokenizer files of RKLLama-style models once (set by the app; None: never).
        self.tokenizers: TokenizerFetcher | None = None

    async def _complete(self, entry: ModelEntry) -> ModelEntry:
        return entry if self.tokenizers is None else await self.tokenizers.complete(entry)

    # -- loading --------------------------------------------------------------------------------

    def load_spec(self, entry: ModelEntry, options: dict[str, Any], *, embedding: bool = False) -> LoadSpec:
        defaults = layer_options(entry.modelfile.parameters, {})
        merged = {**defaults, **options}
        num_ctx = merged.get("num_ctx") or self.default_num_ctx
        if entry.format == "rkllm" and entry.context_length:  # a .rkllm file's context is fixed at conversion
            num_ctx = min(num_ctx, entry.context_length)
        if embedding and entry.max_context_length:  # like Ollama: embeddings never exceed the trained context
            num_ctx = min(num_ctx, entry.max_context_length)
        # Init-time defaults come from the Modelfile only: per-request sampling travels in SamplingOptions,
        # so a request's options never change the LoadSpec (which would reload the model).
        params = {k: v for k, v in defaults.items() if k not in LOAD_OPTIONS}
        if entry.format == "rkllm":  # RKLLama's runtime keys (MIROSTAT*, N_KEEP, ...): RKLLMParam at init
            params = {**entry.modelfile.rkllm_parameters(), **params}
            pieces = entry.modelfile.runtime_template()
            if pieces is not None and not entry.chat_template:  # the runtime's template, as RKLLama sets it
                params.update(zip(("system_prompt", "prompt_prefix", "prompt_postfix"), pieces, strict=True))
        return LoadSpec(
            engine="rkllm" if entry.format == "rkllm" else "llamacpp",
            model_path=str(entry.weights),
            num_ctx=int(num_ctx),
            n_threads=int(merged.get("num_thread") or self.num_threads),
            cores=self.cpus if entry.format != "rkllm" else (),
            # llama.cpp loads a context for either generating or embedding; an RKLLM handle does both
            # (hidden-layer runs), so a .rkllm model is never reloaded to switch (seconds on a board).
            embedding=embedding and entry.format != "rkllm",
            tokenizer_dir=str(entry.tokenizer_dir) if entry.tokenizer_dir else None,
            runtime_template=entry.format == "rkllm" and not entry.chat_template,
            # Sampling lives in SamplingOptions per request; rkllm families C-E need init-time defaults.
            params=params if entry.format == "rkllm" else {},
            kv_cache_dir=(
                str(self.kv_cache.root / entry.name.folder_name) if self.kv_cache.root is not None else None
            ),
            kv_cache_slots=self.kv_cache.slots,
            kv_cache_ram_mb=self.kv_cache.ram_mb,
            parallel=self._parallel_for(entry, embedding),
            vision=entry.vision_settings(),
        )

    def _parallel_for(self, entry: ModelEntry, embedding: bool) -> int:
        """Sequences one load serves at once: several in one llama.cpp context (runtime/batched.py;
        embedding loads stay serial); for .rkllm only with RKLLAMA_RKLLM_MULTI_BATCH, as the runtime's
        n_batch, at most 8 (runtime/rkllm/multi_batch.py; runtimes before 1.2.1 serve one at a time)."""
        if entry.format == "rkllm":
            return min(self.num_parallel, RKLLM_MAX_BATCH) if self.rkllm_multi_batch else 1
        return 1 if embedding else self.num_parallel

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

        Raises ContextOverflow when an input exceeds the context and `truncate` is off.
        """
        started = time.perf_counter_ns()
        entry = await self._complete(entry)
        spec = self.load_spec(entry, options or {}, embedding=True)
        async with self.scheduler.turn(entry.name.key, interactive=True, spec=spec):
            loaded = await self._ensure_loaded(entry, spec, keep_alive_s)
            load_ns = time.perf_counter_ns() - started
            result = None
            if inputs:
                try:
                    result = await loaded.runner.embed(inputs, truncate)
                except ContextOverflow:
                    raise ContextOverflow(INPUT_TOO_LONG) from None
            self.scheduler.touch(loaded, keep_alive_s)
        vectors = finite_vectors(result.vectors) if result is not None else []
        if len(vectors) != len(inputs):
            raise RuntimeFailure(f"the runtime returned {len(vectors)} vectors for {len(inputs)} inputs")
        prompt_tokens = result.prompt_tokens if result is not None else 0
        return Embeddings(vectors, prompt_tokens, load_ns, time.perf_counter_ns() - started)

    async def load(self, entry: ModelEntry, options: dict[str, Any], keep_alive_s: float | None) -> int:
        """Load-only request: returns load_ns."""
        entry = await self._complete(entry)
        spec = self.load_spec(entry, options)
        async with self.scheduler.turn(entry.name.key, interactive=True, spec=spec):
            loaded = await self._ensure_loaded(entry, spec, keep_alive_s)
            self.scheduler.touch(loaded, keep_alive_s)
            return loaded.load_ns

    async def _ensure_loaded(
        self, entry: ModelEntry, spec: LoadSpec, keep_alive_s: float | None
    ) -> LoadedModel:
        loaded = await self.scheduler.ensure_loaded(entry, spec, keep_alive_s)
        if loaded.load_ns:
            self.observer.model_loaded(entry.name.display, spec.engine, loaded.load_ns)
        return loaded

    @staticmethod
    def default_think(entry: ModelEntry) -> bool | None:
        """`think` when the request has none: the Modelfile's ENABLE_THINKING (RKLLama's switch), else
        on for models that can think."""
        configured = entry.modelfile.enable_thinking()
        if configured is not None:
            return configured
        return "thinking" in entry.capabilities or None

    @staticmethod
    def template_for(loaded: LoadedModel) -> ChatTemplate:
        template = loaded.extras.get("template")
        if template is None:
            entry = loaded.entry
            source = entry.chat_template or loaded.info.chat_template
            pieces = entry.modelfile.runtime_template() if entry.format == "rkllm" else None
            if not source and pieces is not None:
                log.info(
                    "model=%s renders with its Modelfile's SYSTEM_PROMPT/PROMPT_PREFIX/PROMPT_POSTFIX",
                    entry.name.display,
                )
                source = template_from_runtime_pieces(*pieces)
            if not source:
                log.warning(
                    "model=%s has no chat template: %s", entry.name.display, _missing_template_hint(entry)
                )
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
        guide = None if self._constrains(request.entry) else request.format  # asked in the prompt instead
        if request.messages is not None:
            messages = tagged_messages(self._chat_messages(request))
            if guide is not None:
                messages = guided_messages(messages, guide)

            def render(kept: list[dict[str, Any]]) -> str:
                return self._without_double_bos(template.render(kept, tools=tools, think=think), loaded)

            if request.truncate:
                prompt = await fit_messages(
                    messages, render, loaded.runner.tokenize, loaded.info.context_length
                )
            else:
                prompt = render(messages)
        elif request.raw:
            prompt = with_image_tags(request.prompt or "", len(request.images or ()))
        else:
            system = request.system if request.system is not None else request.entry.modelfile.system
            if guide is not None:
                system = guided_system(system, guide)
            prompt = template.render_generate(
                with_image_tags(request.prompt or "", len(request.images or ())),
                system,
                suffix=request.suffix,
                think=think,
            )
        if request.context:  # like Ollama: the earlier exchange goes before the new rendered prompt
            prompt = await loaded.runner.detokenize(request.context) + prompt
        return self._without_double_bos(prompt, loaded)

    @staticmethod
    def _constrains(entry: ModelEntry) -> bool:
        """Whether the model's engine constrains decoding to a JSON schema (llama.cpp grammars)."""
        return entry.format != "rkllm"

    @staticmethod
    def _without_double_bos(prompt: str, loaded: LoadedModel) -> str:
        """Engines that add BOS themselves would otherwise see it twice (templates often print it)."""
        bos = loaded.info.bos_token
        while loaded.info.add_bos_token and bos and prompt.startswith(bos):
            prompt = prompt[len(bos) :]
        return prompt

    # -- running --------------------------------------------------------------------------------

    async def run(self, request: GenerationRequest) -> AsyncGenerator[Event, None]:
        started = time.perf_counter_ns()
        entry = await self._complete(request.entry)
        if entry is not request.entry:
            request = replace(request, entry=entry)
        options = layer_options(entry.modelfile.parameters, request.options)
        spec = self.load_spec(entry, request.options)
        think_arg = request.think if request.think is not None else self.default_think(entry)
        model = entry.name.display
        self.observer.generation_started(model)
        async with self.scheduler.turn(entry.name.key, interactive=request.interactive, spec=spec):
            loaded = await self._ensure_loaded(entry, spec, request.keep_alive_s)
            load_ns = time.perf_counter_ns() - started  # like Ollama: request start until the model is ready
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
            held: _HeldAnswer | None = None
            if request.top_logprobs >= 0:
                sampling = replace(sampling, top_logprobs=request.top_logprobs)
            if not request.shift:
                sampling = replace(sampling, shift=False)
            if request.format is not None and self._constrains(entry):
                # Like Ollama: a thinking model thinks freely, the format holds for the answer after it.
                think_open, think_close = pipeline.thinking_tags or ("", "")
                sampling = replace(
                    sampling,
                    json_schema=schema_text(request.format),
                    think_open=think_open,
                    think_close=think_close,
                )
            elif request.format is not None:
                held = _HeldAnswer(request.format)
            stats: GenerationStats | None = None
            stopped = False
            last_piece_ns = 0
            images = prompt_images(request, prompt)
            generation = loaded.runner.generate(prompt, sampling, images)
            try:
                async for item in generation:
                    if isinstance(item, Piece):
                        if stopped:
                            continue  # tokens produced between our abort and the runner seeing it
                        now_ns = time.perf_counter_ns()
                        if last_piece_ns:
                            self.observer.next_piece(model, now_ns - last_piece_ns)
                        else:
                            self.observer.first_piece(model, now_ns - started)
                        last_piece_ns = now_ns
                        for event in _with_logprobs(_passed(held, pipeline.feed(item.text)), item.logprobs):
                            yield event
                        if pipeline.stopped:
                            stopped = True
                            generation.abort()
                    elif isinstance(item, Finished):
                        stats = item.stats
            finally:
                await generation.aclose()
            if not stopped:
                for event in _passed(held, pipeline.flush()):
                    yield event
            answer = held.release() if held is not None else None
            if answer is not None:
                yield answer
            if stats is None:
                raise RuntimeFailure("generation ended without statistics")
            self.observer.generation_finished(model, stats)
            self.scheduler.touch(loaded, request.keep_alive_s)
            reason = "stop" if stopped or stats.done_reason in ("stop", "abort") else stats.done_reason
            yield Done(reason, stats, load_ns + stats.reload_ns, time.perf_counter_ns() - started)


def prompt_images(request: GenerationRequest, prompt: str) -> list[str] | None:
    """The request's images that the rendered prompt still holds, in order. When the conversation was
    truncated, the oldest messages went with their images: the prompt's tags belong to the last ones."""
    if request.messages is not None:
        images = images_in_order(request.messages)
    else:
        images = list(request.images or ())
    if not images:
        return None
    tags = prompt.count(IMAGE_TAG)
    if tags > len(images):
        raise InvalidInput(f"the prompt has {tags} {IMAGE_TAG} tags but the request has {len(images)} images")
    return images[len(images) - tags :] if tags else None


async def fit_messages(
    messages: list[dict[str, Any]],
    render: Callable[[list[dict[str, Any]]], str],
    tokenize: Callable[[str], Awaitable[list[int]]],
    limit: int,
) -> str:
    """The chat prompt, made to fit `limit` tokens the way Ollama does: the oldest messages are dropped
    first; system messages always stay, and so does the last message (if it alone does not fit, the
    engine refuses the prompt). A kept conversation starts at a user message where one can, since many
    templates insist that roles alternate from a user turn. Tokenized only when it may not fit."""
    prompt = render(messages)
    if len(prompt.encode("utf-8")) + 1 <= limit or len(await tokenize(prompt)) <= limit:
        return prompt  # a token is at least one byte (plus a BOS the engine may add)
    droppable = [i for i, m in enumerate(messages) if m.get("role") != "system"]

    def keeping(count: int) -> list[dict[str, Any]]:
        dropped = set(droppable[: len(droppable) - count])
        return [m for i, m in enumerate(messages) if i not in dropped]

    counts = list(range(1, len(droppable)))  # how many of the droppable messages to keep
    at_user = [n for n in counts if messages[droppable[-n]].get("role") == "user"]
    counts = at_user or counts
    best = counts[0] if counts else len(droppable)
    low, high = 0, len(counts) - 1
    while low <= high:  # the prompt only shrinks as fewer messages are kept
        middle = (low + high) // 2
        if len(await tokenize(render(keeping(counts[middle])))) <= limit:
            best, low = counts[middle], middle + 1
        else:
            high = middle - 1
    log.info(
        "conversation truncated to the context of %d tokens: kept the last %d of %d messages",
        limit,
        best,
        len(droppable),
    )
    return render(keeping(best))


class _HeldAnswer:
    """Structured output on an engine that cannot constrain decoding: the answer is held back and
    released only once it is JSON matching the format; otherwise the request fails."""

    def __init__(self, fmt: Format) -> None:
        self.fmt = fmt
        self.parts: list[str] = []
        self.tool_calls = 0

    def release(self) -> Content | None:
        """The validated answer; None when the model answered with tool calls only."""
        if self.tool_calls and not "".join(self.parts).strip():
            return None
        try:
            return Content(validated_answer("".join(self.parts), self.fmt))
        except InvalidStructuredAnswer as exc:
            log.warning("structured output rejected: %s", exc)
            raise RuntimeFailure(str(exc)) from None


def _passed(held: _HeldAnswer | None, events: Iterable[tuple[str, Any]]) -> list[Event]:
    """The parser's events as Events; answer text goes to `held` instead when the answer is held back."""
    passed: list[Event] = []
    for event in events:
        wrapped = _wrap(event)
        if held is not None and isinstance(wrapped, Content):
            held.parts.append(wrapped.text)
            continue
        if held is not None and isinstance(wrapped, ToolCallEvent):
            held.tool_calls += 1
        passed.append(wrapped)
    return passed


def _with_logprobs(events: list[Event], logprobs: list[TokenLogprob] | None) -> list[Event]:
    """Put a piece's logprobs on the first event it produced, or on an empty Content if it produced
    none (its text is held back), so that no token's entry is lost or delayed."""
    if logprobs is None:
        return events
    if not events:
        return [Content("", logprobs)]
    first = events[0]
    assert not isinstance(first, Done)  # the parser's events never include Done
    return [replace(first, logprobs=logprobs), *events[1:]]


def _wrap(event: tuple[str, Any]) -> Event:
    kind, value = event
    if kind == "thinking":
        return Thinking(value)
    if kind == "tool_call":
        return ToolCallEvent(value)
    return Content(value)
