"""Vision benchmark on the simulators (no board needed): what the daemon adds per image.

For a 448x448 picture (PNG and JPEG, photo-like content) and, as a larger case, a 1280x960 JPEG:
- `check_ms`: the server's check at the door (base64 decode + header read, chat/images.py);
- `decode_prepare_ms`: the runner's full decode and preparation for a Qwen2-VL-style encoder
  (pad to square, resize to 448x448, uint8 NHWC);
- `encoder_call_ms`: inputs_set + run + outputs_get through the ctypes binding, with the RKNN simulator
  at zero delay; `sim_run_ms` is the simulator's own rknn_run (its arithmetic stands in for the NPU),
  so `binding_ms` = encoder_call_ms - sim_run_ms is the binding's cost;
- `daemon_ms` = check + decode/prepare + binding: the per-image overhead. Goal <= 20 ms at 448x448.
Medians over `rounds` x 5 distinct pictures (the embedding cache is bypassed).
"""

from __future__ import annotations

import ctypes
import io
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from rkllama_ollama.chat.images import checked_image
from rkllama_ollama.runtime.vision import RECIPES, picture_for_encoder, prepare
from tests.rkllm_support.vision import b64, rknn_simulator, write_encoder

N_TOKENS, EMBED_DIM = 256, 2048  # Qwen2.5-VL-3B at 448x448: 256 tokens of the LLM's width


# The pictures both vision benches measure: label -> (width, height, format).
PICTURES = {
    "png_448": (448, 448, "PNG"),
    "jpeg_448": (448, 448, "JPEG"),
    "jpeg_1280x960": (1280, 960, "JPEG"),
}


def _picture(width: int, height: int, seed: int, fmt: str) -> bytes:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // width, y * 255 // height, (x + y) * 127 // (width + height)], axis=-1)
    noisy = np.clip(base + rng.integers(-20, 21, size=base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noisy).save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1e3


def run(tmp: Path, rounds: int) -> dict[str, Any]:
    os.environ["RKLLAMA_RKNN_LIB"] = str(rknn_simulator())
    from rkllama_ollama.runtime.rknn.encoder import RknnEncoder

    encoder_path = write_encoder(tmp, n_tokens=N_TOKENS, embed_dim=EMBED_DIM, width=448, height=448)
    encoder = RknnEncoder(str(encoder_path))
    recipe = RECIPES["qwen2-vl"]
    shape = encoder.shape
    results: dict[str, Any] = {"encoder_output": f"{N_TOKENS} x {EMBED_DIM} float32"}
    try:
        for label, (width, height, fmt) in PICTURES.items():
            pictures = [_picture(width, height, seed, fmt) for seed in range(5)]
            texts = [b64(p) for p in pictures]
            rows: dict[str, list[float]] = {
                k: [] for k in ("check", "decode_prepare", "encoder_call", "sim_run")
            }
            for _ in range(rounds):
                for data, text in zip(pictures, texts, strict=True):
                    start = time.perf_counter()
                    checked_image(text, "images[0]")
                    rows["check"].append(_ms(start))
                    start = time.perf_counter()
                    pixels = prepare(
                        picture_for_encoder(data, 0, recipe, shape.width, shape.height),
                        recipe,
                        shape.width,
                        shape.height,
                    )
                    rows["decode_prepare"].append(_ms(start))
                    start = time.perf_counter()
                    encoder.encode(pixels)
                    rows["encoder_call"].append(_ms(start))
                    start = time.perf_counter()
                    encoder._lib.rknn_run(encoder._context, None)  # the simulator's arithmetic alone
                    rows["sim_run"].append(_ms(start))
            medians = {f"{k}_ms": round(statistics.median(v), 2) for k, v in rows.items()}
            binding = max(0.0, medians["encoder_call_ms"] - medians["sim_run_ms"])
            medians["binding_ms"] = round(binding, 2)
            medians["daemon_ms"] = round(medians["check_ms"] + medians["decode_prepare_ms"] + binding, 2)
            medians["bytes"] = statistics.median(len(p) for p in pictures)
            results[label] = medians
    finally:
        encoder.close()
    assert ctypes.sizeof(ctypes.c_void_p) in (4, 8)
    return results


if __name__ == "__main__":
    import json
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        print(json.dumps(run(Path(folder), 5), indent=2))
