"""Several models and several users on one machine (part of `make bench`).

1. Parallel streams: four users stream from one llama.cpp model at once. The same four chats (greedy,
   `tokens` tokens each) go one after another to a daemon with RKLLAMA_NUM_PARALLEL=1, then all at once
   to one with RKLLAMA_NUM_PARALLEL=4, A B A B; each round's prompts start with the round number, so no
   cache is reused across rounds. Figure: total generated tokens per second, parallel ÷ serial, and
   whether every parallel stream's text was its serial text.
2. Resident pairs (Open WebUI's RAG pattern): embed a question with an embedding model, then chat with
   the chat model, `rounds` times; with the default RKLLAMA_MAX_LOADED_MODELS and with 1 (a single
   session, which reloads on every switch). Figures: loads counted in the daemon's log, seconds per round.
3. RKLLM multi-batch on the simulator (1.3.0) with a device-like profile (60 ms per decode step, 2 ms per
   prefilled token; each extra element of a batched step adds `BATCH_STEP_PERCENT` % of a step, an
   assumption until measured on a board): four chats one after another on a daemon with
   RKLLAMA_RKLLM_MULTI_BATCH off, then all at once on one with it on (RKLLAMA_NUM_PARALLEL=4), A B A B.
   The simulated answer depends on the prompt, so identical texts prove each answer reached its request.
   Figures: total generated tokens per second, batched ÷ serial, the batch sizes the daemon logged, and
   the time to first token of a request alone, off and on (what gathering costs a lone request).
"""

from __future__ import annotations

import re
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import ollama

from tests.rkllm_support.sim import SIM_VERSIONS, add_sim_model, build_simulators
from tests.support.daemon import Daemon
from tests.support.tiny_gguf import write_tiny_gguf

QUESTIONS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how a bicycle stays upright.",
    "Describe a walk through a forest in autumn.",
    "What should I pack for a week at the sea?",
]


def _chat(client: ollama.Client, model: str, question: str, tokens: int) -> tuple[str, int]:
    parts: list[str] = []
    count = 0
    for chunk in client.chat(
        model,
        messages=[{"role": "user", "content": question}],
        options={"num_predict": tokens, "temperature": 0, "seed": 1},
        stream=True,
    ):
        parts.append(chunk.message.content or "")
        if chunk.done:
            count = chunk.eval_count or 0
    return "".join(parts), count


def _serial(client: ollama.Client, model: str, questions: list[str], tokens: int) -> tuple[float, list[str]]:
    started = time.perf_counter()
    results = [_chat(client, model, question, tokens) for question in questions]
    return sum(count for _, count in results) / (time.perf_counter() - started), [text for text, _ in results]


def _parallel(
    client: ollama.Client, model: str, questions: list[str], tokens: int
) -> tuple[float, list[str]]:
    results: list[tuple[str, int]] = [("", 0)] * len(questions)

    def one(index: int) -> None:
        results[index] = _chat(client, model, questions[index], tokens)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(questions))]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(count for _, count in results) / (time.perf_counter() - started), [text for text, _ in results]


def parallel_streams(store: Path, model: str, rounds: int, tokens: int) -> dict[str, Any]:
    serial_rates: list[float] = []
    parallel_rates: list[float] = []
    identical = True
    with (
        Daemon(store, env={"RKLLAMA_EMBEDDED_MODEL": "1", "RKLLAMA_NUM_PARALLEL": "1"}).start() as one,
        Daemon(store, env={"RKLLAMA_EMBEDDED_MODEL": "1", "RKLLAMA_NUM_PARALLEL": "4"}).start() as four,
    ):
        serial_client, parallel_client = ollama.Client(host=one.url), ollama.Client(host=four.url)
        _chat(serial_client, model, "warm up", 4)
        _chat(parallel_client, model, "warm up", 4)
        for round_ in range(rounds):  # A B A B
            questions = [f"Round {round_}. {question}" for question in QUESTIONS]
            rate, serial_texts = _serial(serial_client, model, questions, tokens)
            serial_rates.append(rate)
            rate, parallel_texts = _parallel(parallel_client, model, questions, tokens)
            parallel_rates.append(rate)
            identical = identical and parallel_texts == serial_texts
    ratios = [p / s for p, s in zip(parallel_rates, serial_rates, strict=True)]
    return {
        "model": model,
        "streams": len(QUESTIONS),
        "tokens_per_stream": tokens,
        "serial_tok_s": serial_rates,
        "parallel_tok_s": parallel_rates,
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "texts_identical": identical,
    }


LOADED = re.compile(r"loaded model=(\S+) engine")


def resident_pairs(store: Path, chat_model: str, rounds: int) -> dict[str, Any]:
    if not (store / "emb").exists():
        (store / "emb").mkdir(parents=True)
        write_tiny_gguf(store / "emb" / "emb.gguf", embedding=True)
    results: dict[str, Any] = {}
    for label, max_loaded in (("resident", "3"), ("single_session", "1")):
        env = {"RKLLAMA_EMBEDDED_MODEL": "1", "RKLLAMA_MAX_LOADED_MODELS": max_loaded}
        with Daemon(store, env=env).start() as daemon:
            client = ollama.Client(host=daemon.url)
            seconds: list[float] = []
            for round_ in range(rounds):
                started = time.perf_counter()
                client.embed("emb", input=[f"What did we say about topic {round_}?"])
                client.chat(
                    chat_model,
                    messages=[{"role": "user", "content": f"Answer from the context, topic {round_}."}],
                    options={"num_predict": 8, "temperature": 0},
                )
                seconds.append(time.perf_counter() - started)
            loads = LOADED.findall(daemon.log())
        results[label] = {
            "loads": len(loads),
            "loads_after_first_round": len(loads) - 2,
            "round_s_first": seconds[0],
            "round_s_median_after_first": statistics.median(seconds[1:]) if rounds > 1 else None,
        }
    return results


BATCH_STEP_PERCENT = 15
BATCH_SIZES = re.compile(r"multi-batch run: (\d+) requests")


def _sim_chat(client: ollama.Client, question: str) -> tuple[str, int]:
    reply = client.chat("device", messages=[{"role": "user", "content": question}], stream=False)
    return reply.message.content or "", reply.eval_count or 0


def _lone_ttft(client: ollama.Client, question: str) -> float:
    started = time.perf_counter()
    for _chunk in client.chat("device", messages=[{"role": "user", "content": question}], stream=True):
        return time.perf_counter() - started
    return float("nan")


def rkllm_multi_batch(root: Path, rounds: int) -> dict[str, Any]:
    store = root / "models"
    add_sim_model(
        store,
        "device",
        tokenizer=True,
        reply="Sure. Here is a short answer of about sixty characters, no more.",
        reply_by_input=1,
        token_delay_ms=60,
        prefill_us_per_token=2000,
        batch_step_percent=BATCH_STEP_PERCENT,
    )
    env = {"RKLLAMA_RKLLM_LIB": str(build_simulators()["F"]), "RKLLAMA_NUM_PARALLEL": "4"}
    serial_rates: list[float] = []
    batched_rates: list[float] = []
    identical = True
    lone_off: list[float] = []
    lone_on: list[float] = []
    with (
        Daemon(store, env=env).start() as off,
        Daemon(store, env={**env, "RKLLAMA_RKLLM_MULTI_BATCH": "1"}).start() as on,
    ):
        serial_client, batched_client = ollama.Client(host=off.url), ollama.Client(host=on.url)
        _sim_chat(serial_client, "warm up")
        _sim_chat(batched_client, "warm up")
        for round_ in range(rounds):  # A B A B
            questions = [f"Round {round_}. {question}" for question in QUESTIONS]
            started = time.perf_counter()
            serial = [_sim_chat(serial_client, question) for question in questions]
            serial_rates.append(sum(n for _, n in serial) / (time.perf_counter() - started))
            batched: list[tuple[str, int]] = [("", 0)] * len(questions)

            def one(index: int, questions: list[str] = questions, batched: list[Any] = batched) -> None:
                batched[index] = _sim_chat(batched_client, questions[index])

            threads = [threading.Thread(target=one, args=(i,)) for i in range(len(questions))]
            started = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            batched_rates.append(sum(n for _, n in batched) / (time.perf_counter() - started))
            identical = identical and [t for t, _ in batched] == [t for t, _ in serial]
            # A request alone: what the gathering window costs its first token.
            lone_off.append(_lone_ttft(serial_client, f"Alone {round_}."))
            lone_on.append(_lone_ttft(batched_client, f"Alone {round_}."))
        sizes = [int(n) for n in BATCH_SIZES.findall(on.log())]
    ratios = [b / s for b, s in zip(batched_rates, serial_rates, strict=True)]
    return {
        "runtime": SIM_VERSIONS["F"],
        "streams": len(QUESTIONS),
        "batch_step_percent": BATCH_STEP_PERCENT,
        "serial_tok_s": [round(rate, 2) for rate in serial_rates],
        "batched_tok_s": [round(rate, 2) for rate in batched_rates],
        "ratio_median": round(statistics.median(ratios), 3),
        "ratio_min": round(min(ratios), 3),
        "batch_sizes_logged": sizes,
        "lone_request_ttft_ms_off": [round(t * 1e3, 1) for t in lone_off],
        "lone_request_ttft_ms_on": [round(t * 1e3, 1) for t in lone_on],
        "texts_identical": identical,
    }
