"""The server's reader of the runner's event pipe: frames cut correctly whatever the read sizes."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rkllama_ollama.runtime.runner import _HEADER, MAX_FRAME, _EventFrames, encode_frame

texts = st.text(max_size=40)
messages = st.lists(
    st.fixed_dictionaries(
        {"ev": st.sampled_from(["piece", "done"]), "id": st.integers(0, 99), "text": texts}
    ),
    max_size=12,
)


class _Transport(asyncio.BaseTransport):
    def __init__(self) -> None:
        super().__init__()
        self.closed = False

    def close(self) -> None:
        self.closed = True


def _feed(chunks: list[bytes]) -> tuple[list[dict[str, Any]], _EventFrames, _Transport]:
    async def run() -> tuple[list[dict[str, Any]], _EventFrames, _Transport]:
        received: list[dict[str, Any]] = []
        frames = _EventFrames(received.append)
        transport = _Transport()
        frames.connection_made(transport)
        for chunk in chunks:
            frames.data_received(chunk)
        return received, frames, transport

    return asyncio.run(run())


@given(messages, st.lists(st.integers(min_value=1, max_value=64), max_size=200))
def test_any_split_of_the_byte_stream_gives_the_same_messages(
    sent: list[dict[str, Any]], cuts: list[int]
) -> None:
    stream = b"".join(encode_frame(m) for m in sent)
    chunks, start = [], 0
    for cut in cuts:
        if start >= len(stream):
            break
        chunks.append(stream[start : start + cut])
        start += cut
    chunks.append(stream[start:])
    received, frames, transport = _feed([c for c in chunks if c])
    assert received == sent
    assert not frames.corrupt and not transport.closed


@pytest.mark.parametrize(
    "stream",
    [
        _HEADER.pack(5) + b"nope!",  # not JSON
        _HEADER.pack(2) + b"[]",  # JSON, but not an object
        _HEADER.pack(MAX_FRAME + 1) + b"{}",  # absurd length
    ],
)
def test_a_corrupt_frame_closes_the_pipe_and_delivers_nothing_after_it(stream: bytes) -> None:
    good = encode_frame({"ev": "piece", "id": 1, "text": "a"})
    received, frames, transport = _feed([good + stream + good])
    assert received == [orjson.loads(good[_HEADER.size :])]
    assert frames.corrupt and transport.closed
