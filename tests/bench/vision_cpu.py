"""Vision on the CPU (llama.cpp's multimodal library), in the runner's session, with the tiny model and
its tiny LLaVA-style projector (tests/support/tiny_gguf.py): what the daemon adds per picture, next to
what the library does, and what prefix reuse saves on a repeated picture.

For 448x448 PNG and JPEG pictures and a 1280x960 JPEG (medians over `rounds` x 5 distinct pictures):
- `check_ms`: the server's check at the door (chat/images.py);
- `decode_ms`: the session's Pillow decode to RGB (it never lets the library decode a file);
- `mtmd_prepare_ms`: the library's own work in `mtmd_tokenize_from_parts` (bitmap copy, resize to the
  projector's 32x32 input, normalisation, tokenizing the text), measured as the whole `_tokenize` call
  minus `decode_ms`;
- `daemon_ms` = check + decode: the per-picture overhead the daemon adds;
- `first_request_ms` / `repeat_request_ms`: a whole one-token generation with a new picture, then the
  same prompt again (the picture's cells are kept in the KV cache: nothing is encoded), and their ratio.
The projector is tiny, so the encoder itself costs next to nothing here; on a real model (a 300M-400M
parameter CLIP) the encode dominates and the daemon's share is smaller still.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from rkllama_ollama.chat.images import checked_image
from rkllama_ollama.runtime.base import LoadSpec, SamplingOptions
from tests.bench.vision import PICTURES, _picture
from tests.rkllm_support.vision import b64
from tests.support.tiny_gguf import write_tiny_gguf, write_tiny_mmproj


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1e3


def run(tmp: Path, rounds: int) -> dict[str, Any]:
    try:
        from llama_cpp import mtmd_cpp  # noqa: F401
    except (ImportError, OSError) as exc:
        return {"skipped": f"llama-cpp-python has no multimodal library: {exc}"}
    from rkllama_ollama.runtime.llamacpp_vision import LlamaCppVisionSession
    from rkllama_ollama.runtime.vision import decode_rgb

    tmp.mkdir(parents=True, exist_ok=True)
    weights = write_tiny_gguf(tmp / "tiny.gguf", context_length=512, attention=0.5)
    projector = write_tiny_mmproj(tmp / "mmproj-tiny.gguf")
    spec = LoadSpec(
        engine="llamacpp", model_path=str(weights), num_ctx=512, vision={"encoder": str(projector)}
    )
    session = LlamaCppVisionSession(spec)
    one_token = SamplingOptions(temperature=0, num_predict=1)
    results: dict[str, Any] = {"projector": "tiny LLaVA MLP, 32x32 input, 16 tokens"}
    try:
        for label, (width, height, fmt) in PICTURES.items():
            rows: dict[str, list[float]] = {k: [] for k in ("check", "decode", "tokenize", "first", "repeat")}
            for round_ in range(rounds):
                for seed in range(5):
                    data = _picture(width, height, 1000 * round_ + seed, fmt)
                    start = time.perf_counter()
                    checked_image(b64(data), "images[0]")
                    rows["check"].append(_ms(start))
                    start = time.perf_counter()
                    decode_rgb(data, 0).tobytes()
                    rows["decode"].append(_ms(start))
                    start = time.perf_counter()
                    chunks = session._tokenize(["<s>Describe ", " in one word."], [data])
                    rows["tokenize"].append(_ms(start))
                    session._mtmd.mtmd_input_chunks_free(chunks)
                    prompt = "<s>Describe <image> in one word."
                    start = time.perf_counter()
                    session.generate_multimodal(prompt, [data], one_token, lambda *_: None)
                    rows["first"].append(_ms(start))
                    start = time.perf_counter()
                    session.generate_multimodal(prompt, [data], one_token, lambda *_: None)
                    rows["repeat"].append(_ms(start))
            medians = {k: statistics.median(v) for k, v in rows.items()}
            results[label] = {
                "check_ms": round(medians["check"], 2),
                "decode_ms": round(medians["decode"], 2),
                "mtmd_prepare_ms": round(max(0.0, medians["tokenize"] - medians["decode"]), 2),
                "daemon_ms": round(medians["check"] + medians["decode"], 2),
                "first_request_ms": round(medians["first"], 2),
                "repeat_request_ms": round(medians["repeat"], 2),
                "repeat_vs_first": round(medians["repeat"] / medians["first"], 3),
            }
    finally:
        session.close()
    return results


if __name__ == "__main__":
    import json
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        print(json.dumps(run(Path(folder), 3), indent=2))
