"""Read a GGUF file's metadata (the key/value section of the header) with plain `struct` reads.

Only the header is read, never the tensor data, so a multi-GB file costs a few hundred KB of I/O
(the vocabulary arrays are walked, not kept). Long arrays (``tokenizer.ggml.tokens``, ``merges``,
``scores``, ...) are cut to their first `max_array_items` items (None keeps them whole, for
`/api/show` with `verbose`); the full length of every array is in `GGUFHeader.array_lengths`. With
`tensor_infos` the name, ggml type and shape of every tensor are kept too. Both byte orders are
understood.

Layout (GGUF v2/v3; v1 used 32-bit counts and lengths): magic ``GGUF``, u32 version, tensor count,
key/value count, then per key: string key, u32 value type, value. A string is a length followed by
UTF-8 bytes; an array is u32 item type, a count, then the items. After the key/values come the tensor
infos (name, u32 n_dims, dims, u32 ggml type, u64 offset), which give the parameter count.
"""

from __future__ import annotations

import logging
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
MAX_STRING_BYTES = 64 * 1024 * 1024  # a chat template is KBs; anything near this is a broken file
MAX_COUNT = 1 << 32

# GGUF value types
_UINT8, _INT8, _UINT16, _INT16, _UINT32, _INT32, _FLOAT32, _BOOL, _STRING, _ARRAY = range(10)
_UINT64, _INT64, _FLOAT64 = 10, 11, 12

_SCALAR_FORMATS = {
    _UINT8: "B",
    _INT8: "b",
    _UINT16: "H",
    _INT16: "h",
    _UINT32: "I",
    _INT32: "i",
    _FLOAT32: "f",
    _BOOL: "?",
    _UINT64: "Q",
    _INT64: "q",
    _FLOAT64: "d",
}


# ggml tensor types (the `type` of a tensor info) by number, named as llama.cpp and Ollama print them
GGML_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS",
    17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS",
    24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16", 34: "TQ1_0",
    35: "TQ2_0", 39: "MXFP4",
}  # fmt: skip


class GGUFError(ValueError):
    """The file is not a readable GGUF file."""


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    type: str  # ggml type name (GGML_TYPES), or its number when unknown
    shape: tuple[int, ...]  # in file order (the fastest-varying dimension first)


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    tensor_count: int
    metadata: dict[str, Any]  # arrays cut to their first items
    array_lengths: dict[str, int] = field(default_factory=dict)
    parameter_count: int = 0  # sum of tensor element counts (0 when the tensor infos could not be read)
    special_tokens: dict[str, str] = field(default_factory=dict)  # "bos"/"eos" -> token text, when known
    tensors: tuple[GGUFTensor, ...] = ()  # only with `tensor_infos`


class _Reader:
    def __init__(self, handle: BinaryIO, endian: str, wide: bool) -> None:
        self.handle = handle
        self.endian = endian
        self.count_format = "Q" if wide else "I"

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize(self.endian + fmt)
        data = self.handle.read(size)
        if len(data) != size:
            raise GGUFError("file ends inside the GGUF header")
        return struct.unpack(self.endian + fmt, data)[0]

    def count(self) -> int:
        value = self.unpack(self.count_format)
        if value > MAX_COUNT:
            raise GGUFError(f"implausible count {value} in the GGUF header")
        return value

    def string(self) -> str:
        length = self.unpack(self.count_format)
        if length > MAX_STRING_BYTES:
            raise GGUFError(f"implausible string length {length} in the GGUF header")
        data = self.handle.read(length)
        if len(data) != length:
            raise GGUFError("file ends inside the GGUF header")
        return data.decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        length = self.unpack(self.count_format)
        if length > MAX_STRING_BYTES:
            raise GGUFError(f"implausible string length {length} in the GGUF header")
        self.handle.seek(length, 1)

    def scalar(self, value_type: int) -> Any:
        if value_type == _STRING:
            return self.string()
        fmt = _SCALAR_FORMATS.get(value_type)
        if fmt is None:
            raise GGUFError(f"unknown GGUF value type {value_type}")
        return self.unpack(fmt)

    def skip_scalars(self, value_type: int, count: int) -> None:
        if value_type == _STRING:
            for _ in range(count):
                self.skip_string()
            return
        fmt = _SCALAR_FORMATS.get(value_type)
        if fmt is None:
            raise GGUFError(f"unknown GGUF array item type {value_type}")
        self.handle.seek(struct.calcsize(self.endian + fmt) * count, 1)


def _detect(handle: BinaryIO) -> tuple[str, int]:
    head = handle.read(8)
    if len(head) < 8 or head[:4] != GGUF_MAGIC:
        raise GGUFError("not a GGUF file (bad magic)")
    little = struct.unpack("<I", head[4:])[0]
    big = struct.unpack(">I", head[4:])[0]
    if 1 <= little <= 0xFFFF:
        return "<", little
    if 1 <= big <= 0xFFFF:
        return ">", big
    raise GGUFError(f"unsupported GGUF version field {little:#x}")


def _read_value(
    reader: _Reader, key: str, value_type: int, max_items: int | None, lengths: dict[str, int], offsets: dict
) -> Any:
    if value_type != _ARRAY:
        return reader.scalar(value_type)
    item_type = reader.unpack("I")
    count = reader.count()
    lengths[key] = count
    offsets[key] = (item_type, reader.handle.tell(), count)
    if item_type == _ARRAY:
        raise GGUFError(f"nested arrays are not supported (key {key!r})")
    kept = count if max_items is None else min(count, max_items)
    items = [reader.scalar(item_type) for _ in range(kept)]
    reader.skip_scalars(item_type, count - kept)
    return items


def _tensor_parameters(reader: _Reader, tensor_count: int, infos: list[GGUFTensor] | None = None) -> int:
    """The parameter count (sum of element counts); the tensor infos go to `infos` when given."""
    total = 0
    for _ in range(tensor_count):
        name = ""
        if infos is not None:
            name = reader.string()
        else:
            reader.skip_string()
        n_dims = reader.unpack("I")
        if n_dims > 8:
            raise GGUFError(f"implausible tensor rank {n_dims}")
        shape = tuple(reader.count() for _ in range(n_dims))
        ggml_type = reader.unpack("I")
        reader.unpack("Q")  # data offset
        total += math.prod(shape)
        if infos is not None:
            infos.append(GGUFTensor(name, GGML_TYPES.get(ggml_type, str(ggml_type)), shape))
    return total


def _token_text(reader: _Reader, where: tuple[int, int, int], token_id: Any) -> str | None:
    item_type, offset, count = where
    if item_type != _STRING or not isinstance(token_id, int) or not 0 <= token_id < count:
        return None
    reader.handle.seek(offset)
    reader.skip_scalars(_STRING, token_id)
    return reader.string()


def read_gguf(
    path: Path | str,
    *,
    max_array_items: int | None = 5,
    with_tensors: bool = True,
    tensor_infos: bool = False,
) -> GGUFHeader:
    """Read the header of the GGUF file at `path`. Raises GGUFError (or OSError) when it cannot.

    `max_array_items=None` keeps arrays whole; `tensor_infos` keeps every tensor's name, type and shape
    (it implies `with_tensors`)."""
    with open(path, "rb", buffering=1 << 16) as handle:
        endian, version = _detect(handle)
        reader = _Reader(handle, endian, wide=version >= 2)
        tensor_count = reader.count()
        kv_count = reader.count()
        metadata: dict[str, Any] = {}
        lengths: dict[str, int] = {}
        offsets: dict[str, tuple[int, int, int]] = {}
        for _ in range(kv_count):
            key = reader.string()
            value_type = reader.unpack("I")
            metadata[key] = _read_value(reader, key, value_type, max_array_items, lengths, offsets)
        parameter_count = 0
        tensors: list[GGUFTensor] | None = [] if tensor_infos else None
        if with_tensors or tensor_infos:
            try:
                parameter_count = _tensor_parameters(reader, tensor_count, tensors)
            except GGUFError as exc:
                log.warning("gguf tensor infos unreadable path=%s error=%s", path, exc)
        special: dict[str, str] = {}
        tokens = offsets.get("tokenizer.ggml.tokens")
        if tokens is not None:
            try:
                for label in ("bos", "eos"):
                    text = _token_text(reader, tokens, metadata.get(f"tokenizer.ggml.{label}_token_id"))
                    if text is not None:
                        special[label] = text
            except GGUFError as exc:
                log.warning("gguf special tokens unreadable path=%s error=%s", path, exc)
    return GGUFHeader(
        version=version,
        tensor_count=tensor_count,
        metadata=metadata,
        array_lengths=lengths,
        parameter_count=parameter_count,
        special_tokens=special,
        tensors=tuple(tensors or ()),
    )


def read_gguf_metadata(path: Path | str, *, max_array_items: int = 5) -> dict[str, Any]:
    """Only the key/value metadata of a GGUF file (long arrays cut to their first items)."""
    return read_gguf(path, max_array_items=max_array_items, with_tensors=False).metadata
