"""One generation, independent of the HTTP face that asked for it.

A face (Ollama, OpenAI, the seed's native API) validates its wire format, resolves the model and builds
a GenerationRequest; `Generator.run()` composes the rooms of a generation: a session from the scheduler
(the turn, the model loaded, keep_alive on the way out), the plan (generation_plan.py: prompt,
sampling, stops, format), the prompt fitted to the context with the runner's tokenizer, and the relay
(generation_relay.py) from the runner's pieces to the events a face turns into its wire format
(generation_events.py).

Errors raised before the first event (queue full, load failure, template error, prompt too long) reach
the face before it has written a byte, so they keep their real HTTP status.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rkllama_ollama.chat.template import ChatTemplate, TemplateError, template_from_runtime_pieces
from rkllama_ollama.generation_events import Event
from rkllama_ollama.generation_plan import GenerationPlan, GenerationRequest, plan_generation, prompt_images
from rkllama_ollama.generation_relay import GenerationObserver, NullObserver, Relay
from rkllama_ollama.models.store import ModelEntry
from rkllama_ollama.models.tokenizer_fetch import TokenizerFetcher
from rkllama_ollama.options import layer_options
from rkllama_ollama.runtime.base import (
    IMAGE_TAG,
    RKLLM_MAX_BATCH,
    ContextOverflow,
    Engine,
    LoadSpec,
    RuntimeFailure,
)
from rkllama_ollama.scheduler import LoadedModel, Scheduler

log = logging.getLogger(__name__)


def _missing_template_hint(entry: ModelEntry) -> str:
    """Why a model renders with ChatML, and what would give it its own template (one log line)."""
    if entry.engine is not Engine.RKLLM:
        return "using ChatML (the weights carry no tokenizer.chat_template)"
    repo = entry.modelfile.huggingface_path
    where = f"{entry.folder / 'tokenizer'}"
    if repo:
        where += f" nor the Hugging Face cache of HUGGINGFACE_PATH={repo}"
    return f"using ChatML (no tokenizer_config.json with a chat_template in {where})"


# Options that change how a model is loaded; a different value reloads it.
LOAD_OPTIONS = ("num_ctx", "num_thread")


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
        rkllm = entry.engine is Engine.RKLLM
        if rkllm and entry.context_length:  # a .rkllm file's context is fixed at conversion
            num_ctx = min(num_ctx, entry.context_length)
        if embedding and entry.max_context_length:  # like Ollama: embeddings never exceed the trained context
            num_ctx = min(num_ctx, entry.max_context_length)
        # Init-time defaults come from the Modelfile only: per-request sampling travels in SamplingOptions,
        # so a request's options never change the LoadSpec (which would reload the model).
        params = {k: v for k, v in defaults.items() if k not in LOAD_OPTIONS}
        if rkllm:  # RKLLama's runtime keys (MIROSTAT*, N_KEEP, ...): RKLLMParam at init
            params = {**entry.modelfile.rkllm_parameters(), **params}
            pieces = entry.modelfile.runtime_template()
            if pieces is not None and not entry.chat_template:  # the runtime's template, as RKLLama sets it
                params.update(zip(("system_prompt", "prompt_prefix", "prompt_postfix"), pieces, strict=True))
        return LoadSpec(
            engine=entry.engine,
            model_path=str(entry.weights),
            num_ctx=int(num_ctx),
            n_threads=int(merged.get("num_thread") or self.num_threads),
            cores=self.cpus if not rkllm else (),
            # llama.cpp loads a context for either generating or embedding; an RKLLM handle does both
            # (hidden-layer runs), so a .rkllm model is never reloaded to switch (seconds on a board).
            embedding=embedding and not rkllm,
            tokenizer_dir=str(entry.tokenizer_dir) if entry.tokenizer_dir else None,
            runtime_template=rkllm and not entry.chat_template,
            # Sampling lives in SamplingOptions per request; rkllm families C-E need init-time defaults.
            params=params if rkllm else {},
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
        if entry.engine is Engine.RKLLM:
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
        async with self.scheduler.session(entry, spec, interactive=True, keep_alive_s=keep_alive_s) as loaded:
            self._observe_load(loaded)
            load_ns = time.perf_counter_ns() - started
            result = None
            if inputs:
                try:
                    result = await loaded.runner.embed(inputs, truncate)
                except ContextOverflow:
                    raise ContextOverflow(INPUT_TOO_LONG) from None
        vectors = finite_vectors(result.vectors) if result is not None else []
        if len(vectors) != len(inputs):
            raise RuntimeFailure(f"the runtime returned {len(vectors)} vectors for {len(inputs)} inputs")
        prompt_tokens = result.prompt_tokens if result is not None else 0
        return Embeddings(vectors, prompt_tokens, load_ns, time.perf_counter_ns() - started)

    async def load(self, entry: ModelEntry, options: dict[str, Any], keep_alive_s: float | None) -> int:
        """Load-only request: returns load_ns."""
        entry = await self._complete(entry)
        spec = self.load_spec(entry, options)
        async with self.scheduler.session(entry, spec, interactive=True, keep_alive_s=keep_alive_s) as loaded:
            self._observe_load(loaded)
        return loaded.load_ns

    def _observe_load(self, loaded: LoadedModel) -> None:
        if loaded.load_ns:
            self.observer.model_loaded(loaded.entry.name.display, loaded.spec.engine, loaded.load_ns)

    @staticmethod
    def template_for(loaded: LoadedModel) -> ChatTemplate:
        template = loaded.extras.get("template")
        if template is None:
            entry = loaded.entry
            source = entry.chat_template or loaded.info.chat_template
            pieces = entry.modelfile.runtime_template() if entry.engine is Engine.RKLLM else None
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

    # -- running --------------------------------------------------------------------------------

    async def run(self, request: GenerationRequest) -> AsyncGenerator[Event, None]:
        started = time.perf_counter_ns()
        entry = await self._complete(request.entry)
        request = replace(request, entry=entry) if entry is not request.entry else request
        spec = self.load_spec(entry, request.options)
        model = entry.name.display
        self.observer.generation_started(model)
        session = self.scheduler.session(
            entry, spec, interactive=request.interactive, keep_alive_s=request.keep_alive_s
        )
        async with session as loaded:
            self._observe_load(loaded)
            load_ns = time.perf_counter_ns() - started  # like Ollama: request start until the model is ready
            try:
                plan = plan_generation(request, self.template_for(loaded), loaded.info)
                prompt = await self._prompt(plan, loaded)
            except TemplateError as exc:
                raise RuntimeFailure(f"cannot render the chat template: {exc}") from exc
            pipeline = plan.pipeline(prompt)
            relay = Relay(pipeline, plan.held_format, self.observer, model, started)
            generation = loaded.runner.generate(
                prompt, plan.sampling(pipeline), prompt_images(request, prompt)
            )
            # Closed with us when the face closes the run (a client gone): the runner stops at once.
            async with aclosing(relay.events(generation)) as events:
                async for event in events:
                    yield event
        yield relay.done(load_ns)  # after the session: the turn is already the next request's

    @staticmethod
    async def _prompt(plan: GenerationPlan, loaded: LoadedModel) -> str:
        """The plan's prompt, a chat fitted to the context (`truncate`) with the runner's tokenizer, an
        earlier `context` (generate) detokenized before it."""
        if plan.messages is None:
            prompt = plan.prompt or ""
        elif plan.request.truncate:
            prompt = await fit_messages(
                plan.messages, plan.render, loaded.runner.tokenize, plan.context_length
            )
        else:
            prompt = plan.render(plan.messages)
        if plan.request.context:  # like Ollama: the earlier exchange goes before the new rendered prompt
            prompt = await loaded.runner.detokenize(plan.request.context) + prompt
        return plan.without_double_bos(prompt)


async def fit_messages(
    messages: list[dict[str, Any]],
    render: Callable[[list[dict[str, Any]]], str],
    tokenize: Callable[[str], Awaitable[list[int]]],
    limit: int,
) -> str:
    """The chat prompt, made to fit `limit` tokens the way Ollama does: the oldest messages are dropped
    first; system messages always stay, and so does the last message (if it alone does not fit, the
    engine refuses the prompt). A kept conversation starts at a user message where one can, since many
    templates insist that roles alternate from a user turn. Tokenized only when it may not fit: a
    token is at least one byte (plus a BOS the engine may add), but a picture's `<image>` tag takes the
    picture's tokens, which a vision runner's `tokenize` counts."""
    prompt = render(messages)
    short = IMAGE_TAG not in prompt and len(prompt.encode("utf-8")) + 1 <= limit
    if short or len(await tokenize(prompt)) <= limit:
        return prompt
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
