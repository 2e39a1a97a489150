"""The Runtime / Session protocol every engine implements, and the value types they exchange.

Engines (llama.cpp for GGUF, the RKLLM ctypes binding for `.rkllm`) live inside the runner
child process. The runner turns these values into pipe frames (`to_wire` / `from_wire`);
the scheduler in the server process only ever sees the wire form.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from typing import Any, Protocol

# The runner's native-output file (set by the server for each runner): an engine writes what its native
# library prints while loading there, so the server can still read it when loading crashed the runner.
NATIVE_LOG_ENV = "RKLLAMA_RUNNER_NATIVE_LOG"
# Where an image goes in a prompt given to a vision session: one tag per image, in the images' order.
IMAGE_TAG = "<image>"
# What a vision session's `tokenize` gives for each context position a picture takes (its `<image>` tag
# is counted as the picture's real size, so a conversation is fitted to the context with its pictures).
# Never a token id: only counted, never fed or detokenized.
PICTURE_CELL = -1
# RKLLM multi-batch (RKLLAMA_RKLLM_MULTI_BATCH): most requests in one run; the vendor recommends n_batch <= 8.
RKLLM_MAX_BATCH = 8


class RuntimeFailure(Exception):
    """An engine could not do what was asked (bad model file, context overflow, runtime error).

    The message is shown to the client as is, so it must say what went wrong in plain words.
    """


class InvalidInput(RuntimeFailure):
    """The engine cannot use what the request gave it (a token id outside the vocabulary, a JSON
    schema it cannot enforce): the client's to fix, so a 400, never a 500."""


class ContextOverflow(InvalidInput):
    """The input does not fit the context window: the client's to fix (shorter input, larger num_ctx)."""


class Engine(StrEnum):
    """The engine that hosts a model in its runner."""

    LLAMACPP = "llamacpp"  # llama-cpp-python: GGUF files on the CPU
    RKLLM = "rkllm"  # Rockchip's RKLLM runtime: .rkllm files on the NPU


class DoneReason(StrEnum):
    """Why a generation ended (Ollama's `done_reason`); an engine reports the first three."""

    STOP = "stop"  # end of generation (EOS), or a stop sequence
    LENGTH = "length"  # num_predict or the context reached
    ABORT = "abort"  # cancelled
    LOAD = "load"  # a load-only request
    UNLOAD = "unload"  # an unload request (keep_alive 0, nothing to answer)


def _from_dict(cls: type, data: dict[str, Any]) -> Any:
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class LoadSpec:
    """Everything an engine needs to load one model. Built by the scheduler from the store."""

    engine: Engine
    model_path: str  # the weights file (.gguf or .rkllm)
    num_ctx: int = 4096
    n_threads: int = 0  # 0 = engine default
    cores: tuple[int, ...] = ()  # llama.cpp: the cores to pin to (RKLLAMA_CPUS); () = engine default
    embedding: bool = False  # load for embeddings (llama.cpp) / hidden-layer mode (rkllm)
    tokenizer_dir: str | None = None  # Hugging Face tokenizer files (rkllm models)
    # rkllm, runtime 1.2.0+: the server has no chat template for the model, so the runtime applies the one
    # built into the .rkllm (or the Modelfile's SYSTEM_PROMPT/PROMPT_PREFIX/PROMPT_POSTFIX in `params`)
    runtime_template: bool = False
    parallel: int = 1  # sequences served at once (llama.cpp generation; RKLLAMA_NUM_PARALLEL)
    # Modelfile defaults that are load-time parameters on some engines (RKLLMParam on families C-E):
    params: dict[str, Any] = field(default_factory=dict)
    # Conversation caches (runtime/kv_cache.py): the model's cache folder (None: RAM only, and none for
    # RKLLM), how many conversations (-1: from free memory, 0: off), RAM budget in MiB (0: from free memory)
    kv_cache_dir: str | None = None
    kv_cache_slots: int = -1
    kv_cache_ram_mb: int = 0
    # A vision model's image encoder: {"encoder": path of the .rknn file, "family": recipe name,
    # "img_start"/"img_end"/"img_content": marker overrides}; empty for text-only models.
    vision: dict[str, Any] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> LoadSpec:
        return _from_dict(
            cls, {**data, "engine": Engine(data["engine"]), "cores": tuple(data.get("cores") or ())}
        )


@dataclass(frozen=True)
class ModelInfo:
    """What an engine reports after a load: what the server needs to render prompts."""

    context_length: int  # the n_ctx actually in force
    chat_template: str | None = None  # Hugging Face jinja chat template, if the model has one
    bos_token: str = ""
    eos_token: str = ""
    add_bos_token: bool = False  # engine adds BOS itself when tokenizing a prompt
    embedding_length: int = 0
    memory_bytes: int = 0  # resident size of the loaded model (for /api/ps)
    parallel: int = 1  # sequences the session serves at once (RKLLAMA_NUM_PARALLEL, where supported)

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> ModelInfo:
        return _from_dict(cls, data)


@dataclass(frozen=True)
class SamplingOptions:
    """Per-request sampling, already layered (defaults < Modelfile < request options)."""

    num_predict: int = -1  # -1 unlimited (up to the context), -2 fill context
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.9
    min_p: float = 0.0
    typical_p: float = 1.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int = -1  # -1 = random
    grammar: str | None = None  # GBNF grammar (llama.cpp) for structured output
    # Structured output: a JSON schema as JSON text; engines that can constrain decoding (llama.cpp)
    # turn it into a grammar inside the runner. Ignored when `grammar` is set.
    json_schema: str | None = None
    # A reply that fills the context: `shift` drops the older half of what follows the first `num_keep`
    # tokens and goes on (Ollama's context shift); without it the reply ends there ("length").
    shift: bool = True
    num_keep: int = 4
    # A thinking model: `grammar`/`json_schema` constrain only the answer after its thinking block, which
    # ends with `think_close`; `think_open` empty = the prompt already opened the block, else the model
    # may open one itself with that tag (runtime/grammar.py).
    think_open: str = ""
    think_close: str = ""
    # Log-probabilities of the generated tokens: -1 = off, n >= 0 = on, with the n likeliest
    # alternatives of each token (engines that cannot compute them ignore it).
    top_logprobs: int = -1

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> SamplingOptions:
        return _from_dict(cls, data)


@dataclass(frozen=True)
class GenerationStats:
    """Reported when a generation ends. Durations are integer nanoseconds."""

    done_reason: DoneReason  # STOP (EOS), LENGTH (num_predict / context), ABORT
    prompt_tokens: int  # tokens in the whole prompt
    prompt_eval_count: int  # tokens actually fed (not already in the KV cache)
    prompt_eval_ns: int
    eval_count: int  # tokens generated
    eval_ns: int
    context: list[int] = field(default_factory=list)  # prompt + output token ids (generate's `context`)
    reload_ns: int = 0  # time spent re-initialising the model for this request (rkllm families C-E)

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> GenerationStats:
        return _from_dict(cls, {**data, "done_reason": DoneReason(data["done_reason"])})


@dataclass(frozen=True)
class EmbedResult:
    vectors: list[list[float]]  # raw (not normalised) vectors, one per input
    prompt_tokens: int

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> EmbedResult:
        return _from_dict(cls, data)


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model, with the likeliest tokens at its position
    when they were asked for (each a TokenLogprob without alternatives of its own). The faces turn it
    into their wire shapes."""

    raw: bytes  # the token's bytes (a token may hold part of a character)
    logprob: float
    top: tuple[TokenLogprob, ...] = ()

    @property
    def text(self) -> str:
        return self.raw.decode("utf-8", errors="replace")

    def to_wire(self) -> list[Any]:
        return [self.raw.hex(), self.logprob, [t.to_wire() for t in self.top]]

    @classmethod
    def from_wire(cls, data: list[Any]) -> TokenLogprob:
        raw, logprob, top = data
        return cls(bytes.fromhex(raw), float(logprob), tuple(cls.from_wire(t) for t in top))


class EmitPiece(Protocol):
    """Receives generated text as it is produced. Called `emit(text)`, or `emit(text, logprobs)` when
    the request asked for log-probabilities: one entry per token that went into `text` since the
    last call (`text` may be "" when tokens were generated that do not complete a character)."""

    def __call__(self, text: str, logprobs: list[TokenLogprob] | None = None, /) -> None: ...


class Cancel:
    """One request's cancellation. `set()` may be called from any thread, at any time.

    It belongs to one request only, so a cancel that arrives late (after its generation ended, or
    before it started) can never stop another request. Engines read `is_set()` between tokens; around
    a blocking native call they install an interrupt with `interrupting(hook)`: `set()` calls the hook
    while, and only while, that call is under way (the engine checks `is_set()` itself just before).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._set = False
        self._interrupt: Callable[[], None] | None = None

    def set(self) -> None:
        with self._lock:
            self._set = True
            if self._interrupt is not None:
                self._interrupt()

    def is_set(self) -> bool:
        return self._set

    @contextmanager
    def interrupting(self, hook: Callable[[], None]) -> Iterator[None]:
        with self._lock:
            self._interrupt = hook
        try:
            yield
        finally:
            with self._lock:
                self._interrupt = None


class Session(Protocol):
    """One loaded model, used from one thread; a request's `Cancel` may be set from any thread."""

    info: ModelInfo

    def generate(
        self, prompt: str, options: SamplingOptions, emit: EmitPiece, cancel: Cancel | None = None
    ) -> GenerationStats:
        """Feed `prompt` (reusing the KV-cache prefix it shares with the last call) and generate.

        `emit` receives decoded text pieces as they are produced, never a split UTF-8 character.
        Returns when EOS, `num_predict`, the context limit or `cancel` ends the generation (a cancel
        already set returns at once with done_reason "abort" and nothing generated).
        Raises RuntimeFailure on engine errors.
        """
        ...

    def embed(self, inputs: list[str], truncate: bool) -> EmbedResult:
        """Embed each input. Raises RuntimeFailure when an input exceeds the context and not truncate."""
        ...

    def tokenize(self, text: str) -> list[int]: ...

    def detokenize(self, tokens: list[int]) -> str: ...

    def close(self) -> None:
        """Release the model (native memory). The session is unusable afterwards."""
        ...


class Runtime(Protocol):
    def load(self, spec: LoadSpec) -> Session:
        """Load a model. Raises RuntimeFailure with a clear message when it cannot."""
        ...
