"""RKLLM benchmarks on the simulator (no board needed).

(a) The daemon's own CPU time per streamed token: server + runner CPU (from /proc) during one long
    streamed reply on the simulator with zero delay, divided by eval_count. Goal <= 50 us/token.
(a') The server's CPU per streamed token at a device-like pace (one token every 10 ms, so every token
    is its own wake-up, nothing is batched), against the CPU of one bare asyncio wake-up on a pipe
    measured A B A B in the same run: what the daemon costs on top of the platform's floor.
(b) Time to first token added by the daemon on a device-like profile (token_delay_ms=60,
    prefill_us_per_token=2000): client-side TTFT through HTTP minus the TTFT of the same session called
    directly in-process, same prompt, measured A B A B. Goal <= 10 ms.
(c) Tokens prefilled over a 10-turn chat on 1.2.1 (prefix reuse) vs 1.1.4 (no keep_history: the
    whole prompt every turn).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from pathlib import Path
from typing import Any

import ollama

from rkllama_ollama.runtime.base import LoadSpec, SamplingOptions
from tests.rkllm_support.sim import add_sim_model, build_simulators
from tests.support.daemon import Daemon

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def _model(store: Path, name: str, *, tokenizer: bool = False, **keys: object) -> Path:
    return add_sim_model(store, name, tokenizer=tokenizer, **keys)


def cpu_per_token(store: Path, tokens: int) -> dict[str, Any]:
    _model(store, "fast", reply="x" * tokens, token_delay_ms=0)
    with Daemon(store, env={"RKLLAMA_RKLLM_LIB": str(build_simulators()["E"])}).start() as daemon:
        client = ollama.Client(host=daemon.url)
        client.chat("fast", messages=[])  # load
        assert daemon.process is not None
        pids = [daemon.process.pid, *daemon.runner_pids()]
        per_token: list[float] = []
        for _ in range(3):
            before = sum(cpu_seconds(pid) for pid in pids)
            final = None
            for chunk in client.chat("fast", messages=[{"role": "user", "content": "go"}], stream=True):
                final = chunk
            after = sum(cpu_seconds(pid) for pid in pids)
            assert final is not None and final.eval_count
            per_token.append((after - before) / final.eval_count * 1e6)
    return {
        "tokens": tokens,
        "cpu_us_per_token": [round(x, 1) for x in per_token],
        "median": statistics.median(per_token),
    }


def task_cpu_ns(pid: int) -> int:
    """CPU time of every thread of `pid`, in ns (schedstat: precise, unlike the tick counters)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/schedstat") as handle:
            total += int(handle.read().split()[0])
    return total


def bare_wakeup_cpu_us(wakes: int, interval_s: float) -> float:
    """CPU per wake-up of an asyncio loop that only reads a pipe a child writes every `interval_s`."""
    read_fd, write_fd = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the writer child
        os.close(read_fd)
        for _ in range(wakes):
            time.sleep(interval_s)
            os.write(write_fd, b"x" * 48)
        os._exit(0)
    os.close(write_fd)

    async def listen() -> float:
        loop = asyncio.get_running_loop()
        finished = loop.create_future()
        count = 0

        def readable() -> None:
            nonlocal count
            count += 1
            if not os.read(read_fd, 4096):
                loop.remove_reader(read_fd)
                finished.set_result(None)

        loop.add_reader(read_fd, readable)
        before = task_cpu_ns(os.getpid())
        await finished
        return (task_cpu_ns(os.getpid()) - before) / count / 1e3

    try:
        return asyncio.run(listen())
    finally:
        os.close(read_fd)
        os.waitpid(child, 0)


def cpu_per_token_paced(store: Path, rounds: int, tokens: int = 500) -> dict[str, Any]:
    _model(store, "paced", reply="x" * tokens, token_delay_ms=10)
    server_us: list[float] = []
    bare_us: list[float] = []
    with Daemon(store, env={"RKLLAMA_RKLLM_LIB": str(build_simulators()["E"])}).start() as daemon:
        client = ollama.Client(host=daemon.url)
        client.chat("paced", messages=[])  # load
        assert daemon.process is not None
        for _ in range(rounds):  # A B A B
            bare_us.append(bare_wakeup_cpu_us(tokens, 0.01))
            before = task_cpu_ns(daemon.process.pid)
            final = None
            for chunk in client.chat("paced", messages=[{"role": "user", "content": "go"}], stream=True):
                final = chunk
            assert final is not None and final.eval_count
            server_us.append((task_cpu_ns(daemon.process.pid) - before) / final.eval_count / 1e3)
    return {
        "tokens": tokens,
        "server_cpu_us_per_token": [round(x, 1) for x in server_us],
        "bare_wakeup_cpu_us": [round(x, 1) for x in bare_us],
        "server_over_bare_wakeup": round(
            statistics.median(s / b for s, b in zip(server_us, bare_us, strict=True)), 2
        ),
    }


def ttft_added(store: Path, rounds: int) -> dict[str, Any]:
    from rkllama_ollama.chat.template import ChatTemplate
    from rkllama_ollama.runtime.rkllm.session import RkllmRuntime

    library = build_simulators()["E"]
    path = _model(
        store, "device", reply="Hello there, how can I help?", token_delay_ms=60, prefill_us_per_token=2000
    )
    messages = [{"role": "user", "content": "Tell me about the weather in a few words. " * 3}]
    prompt = ChatTemplate("").render(messages)
    daemon = Daemon(store, env={"RKLLAMA_RKLLM_LIB": str(library)}).start()
    direct: list[float] = []
    http: list[float] = []
    try:
        client = ollama.Client(host=daemon.url)
        for _ in range(rounds):
            session = RkllmRuntime(str(library)).load(
                LoadSpec(engine="rkllm", model_path=str(path), num_ctx=4096)
            )
            first: list[int] = []
            started = time.perf_counter_ns()
            session.generate(
                prompt,
                SamplingOptions(num_predict=1),
                lambda _t, out=first: out.append(time.perf_counter_ns()),
            )
            direct.append((first[0] - started) / 1e6)
            session.close()
            client.chat("device", messages=[], keep_alive=0)  # unload so the next chat starts cold on KV
            client.chat("device", messages=[])  # load (not timed)
            started = time.perf_counter_ns()
            for chunk in client.chat("device", messages=messages, stream=True, options={"num_predict": 1}):
                if chunk.message.content:
                    http.append((time.perf_counter_ns() - started) / 1e6)
                    break
    finally:
        daemon.stop()
    added = [h - d for h, d in zip(http, direct, strict=True)]
    return {
        "direct_ttft_ms": [round(x, 1) for x in direct],
        "http_ttft_ms": [round(x, 1) for x in http],
        "added_ms_median": round(statistics.median(added), 1),
    }


def prefill_over_turns(store: Path, turns: int) -> dict[str, Any]:
    _model(store, "chat", tokenizer=True, reply="Sure, here it is.")
    result: dict[str, Any] = {}
    for family, label in (("E", "prefix_reuse_1.2.1"), ("C", "no_reuse_1.1.4")):
        # In-place reuse only: the conversation caches (which give 1.1.4 reuse too) are measured apart.
        env = {"RKLLAMA_RKLLM_LIB": str(build_simulators()[family]), "RKLLAMA_KV_CACHE_SLOTS": "0"}
        with Daemon(store, env=env).start() as daemon:
            client = ollama.Client(host=daemon.url)
            messages: list[dict[str, str]] = []
            fed = 0
            for turn in range(turns):
                messages.append({"role": "user", "content": f"Question {turn}: tell me more about it."})
                reply = client.chat("chat", messages=messages)
                messages.append({"role": "assistant", "content": reply.message.content})
                fed += reply.prompt_eval_count or 0
        result[label] = fed
    result["ratio"] = round(result["prefix_reuse_1.2.1"] / result["no_reuse_1.1.4"], 3)
    return result


def run(store: Path, rounds: int) -> dict[str, Any]:
    return {
        "cpu_per_token": cpu_per_token(store, 20000),
        "cpu_per_token_paced": cpu_per_token_paced(store, rounds),
        "ttft_added": ttft_added(store, rounds),
        "prefill_10_turns": prefill_over_turns(store, 10),
    }
