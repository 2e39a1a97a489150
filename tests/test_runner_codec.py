"""The runner's one codec: every message survives the trip, and what is not a message says why."""

from __future__ import annotations

import io

import orjson
import pytest

from rkllama_ollama.runtime.base import (
    EmbedResult,
    GenerationStats,
    LoadSpec,
    ModelInfo,
    SamplingOptions,
    TokenLogprob,
)
from rkllama_ollama.runtime.runner.codec import (
    HEADER,
    FrameError,
    decode_reply,
    decode_request,
    encode,
    read_frame,
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
    Shutdown,
    Text,
    Tokenize,
    Tokens,
)

SPEC = LoadSpec("llamacpp", "/models/tiny.gguf", num_ctx=2048, cores=(2, 3), params={"top_k": 5})
LOGPROB = TokenLogprob(b"hi", -0.5, (TokenLogprob(b"ho", -1.5),))

REQUESTS = [
    Load(1, SPEC),
    Generate(2, "hello", SamplingOptions(temperature=0.1, num_predict=3)),
    Generate(3, "<image> what is it", SamplingOptions(), ("aGk=",)),
    Embed(4, ("a", "b"), False),
    Tokenize(5, "hello"),
    Detokenize(6, (1, 2, 3)),
    Abort(7),
    Shutdown(),
]
REPLIES = [
    Loaded(1, ModelInfo(context_length=2048), 12345),
    Emitted(2, "he"),
    Emitted(2, "llo", (LOGPROB,)),
    Done(2, GenerationStats("stop", 5, 3, 100, 2, 200, [1, 2], 0)),
    Done(3, None),
    Embedded(4, EmbedResult([[0.5, 0.25]], 2)),
    Tokens(5, (9, 8)),
    Text(6, "abc"),
    Failed(7, "too long", overflow=True, invalid=True),
    Failed(None, "unreadable"),
]


def payload(frame: bytes) -> bytes:
    (size,) = HEADER.unpack(frame[: HEADER.size])
    assert size == len(frame) - HEADER.size
    return frame[HEADER.size :]


@pytest.mark.parametrize("message", REQUESTS, ids=lambda m: type(m).__name__)
def test_every_request_survives_the_trip(message: object) -> None:
    assert decode_request(payload(encode(message))) == message  # type: ignore[arg-type]


@pytest.mark.parametrize("message", REPLIES, ids=lambda m: type(m).__name__)
def test_every_reply_survives_the_trip(message: object) -> None:
    assert decode_reply(payload(encode(message))) == message  # type: ignore[arg-type]


def test_the_wire_keeps_its_shape() -> None:
    """The frames a runner of the previous release exchanged: `op`/`ev` objects, optional keys left out."""
    assert orjson.loads(payload(encode(Generate(2, "p", SamplingOptions())))).keys() == {
        "op",
        "id",
        "prompt",
        "options",
    }
    assert orjson.loads(payload(encode(Emitted(2, "x")))) == {"ev": "piece", "id": 2, "text": "x"}
    assert orjson.loads(payload(encode(Shutdown()))) == {"op": "shutdown"}


@pytest.mark.parametrize(
    ("raw", "message", "request_id"),
    [
        (b"nope", "a frame is not JSON", None),
        (b"[1]", "a frame is not a JSON object", None),
        (b'{"id": 3}', "a request frame without an 'op'", 3),
        (b'{"op": "dance", "id": 4}', "unknown runner command 'dance'", 4),
        (b'{"op": "tokenize", "id": 5}', "'tokenize' frame with a bad 'text'", 5),
        (b'{"op": "tokenize", "id": "5", "text": "x"}', "'tokenize' frame without an integer id", None),
        (b'{"op": "embed", "id": 6, "inputs": ["a", 1]}', "'embed' frame with a bad 'inputs'", 6),
        (b'{"op": "load", "id": 7, "spec": {"model_path": "x"}}', "'load' frame with a bad field", 7),
        (b'{"op": "generate", "id": 8, "prompt": "p", "options": {}, "images": [1]}', "bad 'images'", 8),
        (b'{"op": "generate", "id": 8, "prompt": "p", "options": {}, "images": {}}', "bad 'images'", 8),
        (b'{"op": "generate", "id": 8, "prompt": "p", "options": {}, "images": ""}', "bad 'images'", 8),
        # Token ids are integers: a float is not rounded, a bool or a numeric string is not read as one.
        (b'{"op": "detokenize", "id": 9, "tokens": [1, 2.7]}', "'detokenize' frame with a bad 'tokens'", 9),
        (b'{"op": "detokenize", "id": 10, "tokens": [true]}', "'detokenize' frame with a bad 'tokens'", 10),
        (b'{"op": "detokenize", "id": 11, "tokens": ["12"]}', "'detokenize' frame with a bad 'tokens'", 11),
        (b'{"op": "embed", "id": 12, "inputs": ["a"], "truncate": "false"}', "bad 'truncate'", 12),
    ],
)
def test_a_bad_request_is_a_frame_error_naming_its_id(
    raw: bytes, message: str, request_id: int | None
) -> None:
    with pytest.raises(FrameError, match=message) as caught:
        decode_request(raw)
    assert caught.value.request_id == request_id


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b'{"ev": "gone", "id": 1}', "unknown runner event 'gone'"),
        (b'{"id": 1}', "an event frame without an 'ev'"),
        (b'{"ev": "text", "id": 1, "text": 5}', "'text' frame with a bad 'text'"),
        (b'{"ev": "loaded", "id": 1, "info": {}}', "'loaded' frame with a bad field"),
        (b'{"ev": "tokens", "id": 1, "tokens": [3, 4.5]}', "'tokens' frame with a bad 'tokens'"),
        (b'{"ev": "tokens", "id": 1, "tokens": [false]}', "'tokens' frame with a bad 'tokens'"),
    ],
)
def test_a_bad_reply_is_a_frame_error(raw: bytes, message: str) -> None:
    with pytest.raises(FrameError, match=message):
        decode_reply(raw)


def test_read_frame_reads_whole_frames_and_stops_at_the_end() -> None:
    stream = io.BytesIO(encode(Abort(1)) + encode(Shutdown()) + encode(Abort(2))[:3])
    assert decode_request(read_frame(stream) or b"") == Abort(1)
    assert decode_request(read_frame(stream) or b"") == Shutdown()
    assert read_frame(stream) is None  # a cut frame is the end of the stream


def test_read_frame_refuses_an_absurd_length() -> None:
    with pytest.raises(FrameError, match="too large"):
        read_frame(io.BytesIO(HEADER.pack(2**31) + b"{}"))


@pytest.mark.parametrize("load_ns", ["12345", 1.5, True, None])
def test_a_loaded_reply_needs_an_integer_load_time(load_ns: object) -> None:
    fields = orjson.loads(payload(encode(Loaded(1, ModelInfo(context_length=2048), 12345))))
    fields["load_ns"] = load_ns
    with pytest.raises(FrameError, match="'loaded' frame with a bad 'load_ns'"):
        decode_reply(orjson.dumps(fields))
