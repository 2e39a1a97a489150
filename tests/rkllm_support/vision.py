"""Vision helpers for tests: the RKNN simulator's encoder files, pictures, and the answers to expect.

The RKNN simulator's embeddings are a known function of the pixels it receives (native/rknn_sim), and
the RKLLM simulator answers a multimodal input with a hash of each image's embeddings and the offset
of its `<image>` tag. For a picture that needs no resizing or padding (a solid colour at the encoder's
size) the expected answer can be computed here, independently of the daemon's code.
"""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import numpy as np
from PIL import Image

from tests.rkllm_support.sim import BUILD, build_simulators

RKNN_SIM = BUILD / "librknnrt-sim.so"
SIM_ANSWER = re.compile(r"\[(\d+)@(\d+):([0-9a-f]{8})\]")


def rknn_simulator() -> Path:
    build_simulators()  # `make -C native` builds both simulators
    assert RKNN_SIM.is_file(), RKNN_SIM
    return RKNN_SIM


def write_encoder(folder: Path, name: str = "vision_encoder.rknn", **keys: object) -> Path:
    """An RKNN-SIM encoder file (keys: width, height, n_tokens, embed_dim, input_type, ...)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["RKNN-SIM", *(f"{key}={value}" for key, value in keys.items())]
    path = folder / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def solid_png(color: tuple[int, int, int], size: tuple[int, int] = (448, 448), fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def solid_embeddings(color: tuple[int, int, int], n_tokens: int, embed_dim: int) -> np.ndarray:
    """The simulator encoder's output for a solid-colour picture at its input size (uint8 input)."""
    d = np.arange(embed_dim)
    channel = np.asarray(color, dtype=np.float64)[d % 3]
    row = (channel / 256.0 + 0.001 * (d // 3)).astype(np.float32)
    return np.tile(row, (n_tokens, 1))


def fnv1a(data: bytes) -> str:
    value = 2166136261
    for byte in data:
        value = ((value ^ byte) * 16777619) & 0xFFFFFFFF
    return f"{value:08x}"


def expected_hash(color: tuple[int, int, int], n_tokens: int, embed_dim: int) -> str:
    return fnv1a(solid_embeddings(color, n_tokens, embed_dim).astype("<f4").tobytes())


def answer_images(text: str) -> list[tuple[int, int, str]]:
    """(image number, tag offset, embedding hash) for each image the simulator reported, in order."""
    return [(int(n), int(offset), digest) for n, offset, digest in SIM_ANSWER.findall(text)]
