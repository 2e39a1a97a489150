"""The one encoder and decoder of runner frames, used by both processes.

A frame is a 4-byte big-endian length and one orjson object (the shapes are listed in messages.py).
Decoding checks the shape: an unknown `op` or `ev`, a missing or mistyped field, or bytes that are not
a JSON object raise FrameError, which names the frame and what is wrong with it.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO, TypeGuard

import orjson

from rkllama_ollama.runtime.base import (
    EmbedResult,
    GenerationStats,
    LoadSpec,
    ModelInfo,
    SamplingOptions,
    TokenLogprob,
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
    Shutdown,
    Text,
    Tokenize,
    Tokens,
)

HEADER = struct.Struct(">I")
MAX_FRAME = 256 * 1024 * 1024


class FrameError(ValueError):
    """A frame that is not a message of the protocol. `request_id` is the id it carried, if any."""

    def __init__(self, message: str, request_id: int | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


# -- encoding --------------------------------------------------------------------------------------


def _request_fields(message: Request) -> dict[str, Any]:
    if isinstance(message, Load):
        return {"op": "load", "id": message.id, "spec": message.spec.to_wire()}
    if isinstance(message, Generate):
        fields = {
            "op": "generate",
            "id": message.id,
            "prompt": message.prompt,
            "options": message.options.to_wire(),
        }
        if message.images:
            fields["images"] = list(message.images)
        return fields
    if isinstance(message, Embed):
        return {"op": "embed", "id": message.id, "inputs": list(message.inputs), "truncate": message.truncate}
    if isinstance(message, Tokenize):
        return {"op": "tokenize", "id": message.id, "text": message.text}
    if isinstance(message, Detokenize):
        return {"op": "detokenize", "id": message.id, "tokens": list(message.tokens)}
    if isinstance(message, Abort):
        return {"op": "abort", "id": message.id}
    return {"op": "shutdown"}


def _fields(message: Request | Reply) -> dict[str, Any]:
    if isinstance(message, Load | Generate | Embed | Tokenize | Detokenize | Abort | Shutdown):
        return _request_fields(message)
    if isinstance(message, Emitted):
        fields: dict[str, Any] = {"ev": "piece", "id": message.id, "text": message.text}
        if message.logprobs is not None:
            fields["logprobs"] = [entry.to_wire() for entry in message.logprobs]
        return fields
    if isinstance(message, Done):
        stats = None if message.stats is None else message.stats.to_wire()
        return {"ev": "done", "id": message.id, "stats": stats}
    if isinstance(message, Loaded):
        return {"ev": "loaded", "id": message.id, "info": message.info.to_wire(), "load_ns": message.load_ns}
    if isinstance(message, Embedded):
        return {"ev": "embedded", "id": message.id, "result": message.result.to_wire()}
    if isinstance(message, Tokens):
        return {"ev": "tokens", "id": message.id, "tokens": list(message.tokens)}
    if isinstance(message, Text):
        return {"ev": "text", "id": message.id, "text": message.text}
    return {
        "ev": "error",
        "id": message.id,
        "message": message.message,
        "overflow": message.overflow,
        "invalid": message.invalid,
    }


def encode(message: Request | Reply) -> bytes:
    """One frame: length header and payload."""
    payload = orjson.dumps(_fields(message))
    return HEADER.pack(len(payload)) + payload


# -- decoding --------------------------------------------------------------------------------------


def _object(payload: bytes | bytearray | memoryview) -> dict[str, Any]:
    try:
        message = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise FrameError(f"a frame is not JSON: {exc}") from None
    if not isinstance(message, dict):
        raise FrameError("a frame is not a JSON object")
    return message


def _id(message: dict[str, Any], kind: str) -> int:
    value = message.get("id")
    if not _is_int(value):
        raise FrameError(f"{kind!r} frame without an integer id")
    return value


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _ints(message: dict[str, Any], key: str, kind: str) -> tuple[int, ...]:
    """A list of integers (token ids): a float, a bool or a numeric string is refused, never rounded."""
    values = _get(message, key, list, kind)
    if not all(_is_int(value) for value in values):
        raise FrameError(f"{kind!r} frame with a bad {key!r}", message.get("id"))
    return tuple(values)


def _get(message: dict[str, Any], key: str, expected: type | tuple[type, ...], kind: str) -> Any:
    value = message.get(key)
    if not isinstance(value, expected):
        raise FrameError(f"{kind!r} frame with a bad {key!r}", message.get("id"))
    return value


def _decoded(kind: str, message: dict[str, Any], build: Callable[[], Any]) -> Any:
    """Run `build`, turning a bad nested value (a spec, options, stats) into a FrameError."""
    try:
        return build()
    except FrameError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise FrameError(f"{kind!r} frame with a bad field: {exc}", message.get("id")) from None


def _request(op: str, m: dict[str, Any]) -> Request:
    if op == "shutdown":
        return Shutdown()
    request_id = _id(m, op)
    if op == "abort":
        return Abort(request_id)
    if op == "generate":
        images = m.get("images", [])  # absent means none; {}, "" or 0 are not a list of pictures
        if not isinstance(images, list) or not all(isinstance(image, str) for image in images):
            raise FrameError("'generate' frame with a bad 'images'", request_id)
        return Generate(
            request_id,
            _get(m, "prompt", str, op),
            SamplingOptions.from_wire(_get(m, "options", dict, op)),
            tuple(images),
        )
    if op == "load":
        return Load(request_id, LoadSpec.from_wire(_get(m, "spec", dict, op)))
    if op == "embed":
        inputs = _get(m, "inputs", list, op)
        if not all(isinstance(text, str) for text in inputs):
            raise FrameError("'embed' frame with a bad 'inputs'", request_id)
        return Embed(request_id, tuple(inputs), _get(m, "truncate", bool, op) if "truncate" in m else True)
    if op == "tokenize":
        return Tokenize(request_id, _get(m, "text", str, op))
    if op == "detokenize":
        return Detokenize(request_id, _ints(m, "tokens", op))
    raise FrameError(f"unknown runner command {op!r}", request_id)


def decode_request(payload: bytes | bytearray | memoryview) -> Request:
    """A request read by the runner. Raises FrameError."""
    message = _object(payload)
    op = message.get("op")
    if not isinstance(op, str):
        raise FrameError("a request frame without an 'op'", message.get("id"))
    result: Request = _decoded(op, message, lambda: _request(op, message))
    return result


def _reply(ev: str, m: dict[str, Any]) -> Reply:
    if ev == "error":
        request_id = m.get("id")
        return Failed(
            request_id if isinstance(request_id, int) else None,
            str(_get(m, "message", str, ev)),
            bool(m.get("overflow")),
            bool(m.get("invalid")),
        )
    request_id = _id(m, ev)
    if ev == "piece":
        logprobs = m.get("logprobs")
        return Emitted(
            request_id,
            _get(m, "text", str, ev),
            None if logprobs is None else tuple(TokenLogprob.from_wire(entry) for entry in logprobs),
        )
    if ev == "done":
        stats = m.get("stats")
        return Done(request_id, None if stats is None else GenerationStats.from_wire(stats))
    if ev == "loaded":
        info = ModelInfo.from_wire(_get(m, "info", dict, ev))
        load_ns = m.get("load_ns")
        if not _is_int(load_ns):
            raise FrameError(f"{ev!r} frame with a bad 'load_ns'", request_id)
        return Loaded(request_id, info, load_ns)
    if ev == "embedded":
        return Embedded(request_id, EmbedResult.from_wire(_get(m, "result", dict, ev)))
    if ev == "tokens":
        return Tokens(request_id, _ints(m, "tokens", ev))
    if ev == "text":
        return Text(request_id, _get(m, "text", str, ev))
    raise FrameError(f"unknown runner event {ev!r}", request_id)


def decode_reply(payload: bytes | bytearray | memoryview) -> Reply:
    """A reply read by the server. Raises FrameError."""
    message = _object(payload)
    ev = message.get("ev")
    if not isinstance(ev, str):
        raise FrameError("an event frame without an 'ev'", message.get("id"))
    result: Reply = _decoded(ev, message, lambda: _reply(ev, message))
    return result


# -- framing ---------------------------------------------------------------------------------------


def _checked_size(size: int) -> int:
    if size > MAX_FRAME:
        raise FrameError(f"frame of {size} bytes is too large")
    return size


def read_frame(stream: BinaryIO) -> bytes | None:
    """The next frame's payload from a blocking stream; None at the end of the stream."""
    header = _read_exact(stream, HEADER.size)
    if header is None:
        return None
    (size,) = HEADER.unpack(header)
    return _read_exact(stream, _checked_size(size))


def _read_exact(stream: BinaryIO, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = stream.read(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


class FrameBuffer:
    """Frames cut from bytes as they arrive, whatever the read sizes (the server's event pipe)."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> Iterator[bytes]:
        """The payloads completed by `data`, one at a time: the frames before a bad one are still
        handed out, then FrameError is raised (an oversized frame)."""
        buffer = self._buffer
        buffer += data
        start = 0
        while len(buffer) - start >= HEADER.size:
            (size,) = HEADER.unpack_from(buffer, start)
            end = start + HEADER.size + _checked_size(size)
            if len(buffer) < end:
                break
            payload = bytes(buffer[start + HEADER.size : end])
            start = end
            yield payload
        del buffer[:start]

    def clear(self) -> None:
        self._buffer.clear()
