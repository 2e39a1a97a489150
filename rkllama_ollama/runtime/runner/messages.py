"""Every frame of the runner's pipe protocol as a typed value.

Requests go from the server to the runner, replies come back. Every request but `Shutdown` carries an
`id`; every reply names the `id` it answers. On the wire (codec.py) a request is an object with an
`op`, a reply an object with an `ev`:

  server -> runner                                   runner -> server
  Load       {"op": "load", "id", "spec"}             Loaded   {"ev": "loaded", "id", "info", "load_ns"}
  Generate   {"op": "generate", "id", "prompt",       Emitted  {"ev": "piece", "id", "text"[, "logprobs"]}...
              "options"[, "images"]}                  Done     {"ev": "done", "id", "stats"}
  Embed      {"op": "embed", "id", "inputs",          Embedded {"ev": "embedded", "id", "result"}
              "truncate"}
  Tokenize   {"op": "tokenize", "id", "text"}          Tokens   {"ev": "tokens", "id", "tokens"}
  Detokenize {"op": "detokenize", "id", "tokens"}      Text     {"ev": "text", "id", "text"}
  Abort      {"op": "abort", "id"}  (acted on at once, even mid-generation)
  Shutdown   {"op": "shutdown"}

Any request may instead be answered by `Failed` {"ev": "error", "id", "message", "overflow", "invalid"}:
`overflow` marks a ContextOverflow (the input does not fit the context) and `invalid` an InvalidInput
(the request's input is unusable), which the server raises again as such.

`images` (base64, checked by the server) go with a prompt holding one `<image>` tag per image.
`Done.stats` is None for a generation aborted before it started.
"""

from __future__ import annotations

from dataclasses import dataclass

from rkllama_ollama.runtime.base import (
    EmbedResult,
    GenerationStats,
    LoadSpec,
    ModelInfo,
    SamplingOptions,
    TokenLogprob,
)

# -- requests (server -> runner) -------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    id: int
    spec: LoadSpec


@dataclass(frozen=True)
class Generate:
    id: int
    prompt: str
    options: SamplingOptions
    images: tuple[str, ...] = ()


@dataclass(frozen=True)
class Embed:
    id: int
    inputs: tuple[str, ...]
    truncate: bool = True


@dataclass(frozen=True)
class Tokenize:
    id: int
    text: str


@dataclass(frozen=True)
class Detokenize:
    id: int
    tokens: tuple[int, ...]


@dataclass(frozen=True)
class Abort:
    id: int


@dataclass(frozen=True)
class Shutdown:
    pass


Request = Load | Generate | Embed | Tokenize | Detokenize | Abort | Shutdown

# -- replies (runner -> server) --------------------------------------------------------------------


@dataclass(frozen=True)
class Loaded:
    id: int
    info: ModelInfo
    load_ns: int


@dataclass(frozen=True)
class Emitted:
    id: int
    text: str
    logprobs: tuple[TokenLogprob, ...] | None = None  # the tokens that made `text`, when asked for


@dataclass(frozen=True)
class Done:
    id: int
    stats: GenerationStats | None


@dataclass(frozen=True)
class Embedded:
    id: int
    result: EmbedResult


@dataclass(frozen=True)
class Tokens:
    id: int
    tokens: tuple[int, ...]


@dataclass(frozen=True)
class Text:
    id: int
    text: str


@dataclass(frozen=True)
class Failed:
    id: int | None  # None when the request it answers could not be read
    message: str
    overflow: bool = False
    invalid: bool = False


Reply = Loaded | Emitted | Done | Embedded | Tokens | Text | Failed
