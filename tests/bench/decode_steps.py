"""What one llama.cpp decode step of k sequences costs against a step of one (`--only decode-steps`).

The ceiling of RKLLAMA_NUM_PARALLEL on a machine: batching k streams can raise the total rate at most
k ÷ (cost of a k-sequence step ÷ cost of a one-sequence step). The step is measured in the engine alone:
a context of four separate sequences (the layout runtime/batched.py uses), each first fed a 16-token
prompt, then `llama_decode` of one token for 1, 2 and 4 of them, interleaved, `samples` times; the KV
cache is trimmed back to the prompts now and then so every step sees about the same context length.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

SEQUENCES = 4
PROMPT = 16


def _decode(
    llama_cpp: Any, ctx: Any, batch: Any, positions: list[int], sequences: list[int], each: int
) -> float:
    n = 0
    for seq in sequences:
        for _ in range(each):
            batch.token[n] = 100 + seq
            batch.pos[n] = positions[seq]
            batch.n_seq_id[n] = 1
            batch.seq_id[n][0] = seq
            batch.logits[n] = True
            positions[seq] += 1
            n += 1
    batch.n_tokens = n
    started = time.perf_counter()
    if llama_cpp.llama_decode(ctx, batch) != 0:
        raise RuntimeError("llama_decode failed")
    return time.perf_counter() - started


def run(model: Path, threads: int, samples: int = 60) -> dict[str, Any]:
    import llama_cpp

    llama_cpp.llama_backend_init()
    model_params = llama_cpp.llama_model_default_params()
    loaded = llama_cpp.llama_model_load_from_file(str(model).encode(), model_params)
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = 512 * SEQUENCES
    params.n_seq_max = SEQUENCES
    params.kv_unified = False
    params.n_threads = params.n_threads_batch = threads
    ctx = llama_cpp.llama_init_from_model(loaded, params)
    memory = llama_cpp.llama_get_memory(ctx)
    batch = llama_cpp.llama_batch_init(PROMPT * SEQUENCES, 0, 1)
    positions = [0] * SEQUENCES
    times: dict[int, list[float]] = {1: [], 2: [], 4: []}
    try:
        for seq in range(SEQUENCES):
            _decode(llama_cpp, ctx, batch, positions, [seq], PROMPT)
        for _ in range(samples):
            for k in times:
                times[k].append(_decode(llama_cpp, ctx, batch, positions, list(range(k)), 1))
            if positions[0] > 400:
                for seq in range(SEQUENCES):
                    llama_cpp.llama_memory_seq_rm(memory, seq, PROMPT, -1)
                    positions[seq] = PROMPT
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(loaded)
    one = statistics.median(times[1])
    return {
        "model": model.name,
        "threads": threads,
        "step_ms_median": {k: round(statistics.median(v) * 1e3, 2) for k, v in times.items()},
        "step_ms_min": {k: round(min(v) * 1e3, 2) for k, v in times.items()},
        "cost_of_k_over_one": {k: round(statistics.median(v) / one, 2) for k, v in times.items()},
        "ceiling_for_4_streams": round(4 * one / statistics.median(times[4]), 2),
    }
