"""The server's reader of the runner's event pipe: frames cut correctly whatever the read sizes."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rkllama_ollama.runtime.runner.codec import HEADER, MAX_FRAME, encode
from rkllama_ollama.runtime.runner.messages import Done, Emitted, Reply
from rkllama_ollama.runtime.runner.process import EventFrames

ids = st.integers(0, 99)
messages = st.lists(
    st.one_of(st.builds(Emitted, ids, st.text(max_size=40)), st.builds(Done, ids, st.none())),
    max_size=12,
)


class _Transport(asyncio.BaseTransport):
    def __init__(self) -> None:
        super().__init__()
        self.closed = False

    def close(self) -> None:
        self.closed = True


def _feed(chunks: list[bytes]) -> tuple[list[Reply], EventFrames, _Transport]:
    async def run() -> tuple[list[Reply], EventFrames, _Transport]:
        received: list[Reply] = []
        frames = EventFrames(received.append)
        transport = _Transport()
        frames.connection_made(transport)
        for chunk in chunks:
            frames.data_received(chunk)
        return received, frames, transport

    return asyncio.run(run())


@given(messages, st.lists(st.integers(min_value=1, max_value=64), max_size=200))
def test_any_split_of_the_byte_stream_gives_the_same_messages(sent: list[Reply], cuts: list[int]) -> None:
    stream = b"".join(encode(m) for m in sent)
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
        HEADER.pack(5) + b"nope!",  # not JSON
        HEADER.pack(2) + b"[]",  # JSON, but not an object
        HEADER.pack(MAX_FRAME + 1) + b"{}",  # absurd length
        HEADER.pack(26) + b'{"ev": "surprise", "id":1}',  # not an event of the protocol
        HEADER.pack(24) + b'{"ev": "piece", "id": 1}',  # an event without its text
    ],
)
def test_a_corrupt_frame_closes_the_pipe_and_delivers_nothing_after_it(stream: bytes) -> None:
    good = encode(Emitted(1, "a"))
    received, frames, transport = _feed([good + stream + good])
    assert received == [Emitted(1, "a")]
    assert frames.corrupt and transport.closed
