"""Throughput of three simulated boards behind HAProxy against one board behind the same router.

Three daemons on loopback serve the same simulator model at a device-like pace (TOKEN_DELAY_MS per
token, one generation at a time per board, like one NPU). Twelve ollama-python clients stream
REQUESTS_PER_CLIENT chats each through HAProxy (the configuration of docs/scale-out.md: leastconn,
readiness checks, retry-on 503); once with only board a behind the router, once with all three,
alternating A B A B in the same run. The figure is the ratio of completed requests per second.
Goal: >= 2.5 for 12 concurrent clients.

`python -m tests.bench.scale_out` runs it alone; `make bench` runs it with the others.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import ollama

from tests.rkllm_support.sim import add_sim_model, build_simulators
from tests.support.cluster import Haproxy, Unavailable, haproxy_binary
from tests.support.daemon import Daemon

CLIENTS = 12
REQUESTS_PER_CLIENT = 2
TOKENS = 30
TOKEN_DELAY_MS = 20
BOARDS = ("a", "b", "c")


def drive(url: str, round_no: int) -> tuple[float, int]:
    """All clients at once; (seconds until the last reply ended, tokens streamed)."""
    start = threading.Barrier(CLIENTS + 1)
    tokens: list[int] = []
    errors: list[BaseException] = []

    def client(index: int) -> None:
        api = ollama.Client(host=url)
        start.wait()
        try:
            for request in range(REQUESTS_PER_CLIENT):
                content = f"round {round_no} client {index} request {request}"  # distinct: no affinity
                final = None
                for chunk in api.chat(
                    "sim",
                    [{"role": "user", "content": content}],
                    stream=True,
                    options={"num_predict": TOKENS},
                ):
                    final = chunk
                assert final is not None and final.done
                tokens.append(final.eval_count or 0)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    if errors:
        raise errors[0]
    return elapsed, sum(tokens)


def run(workdir: Path, rounds: int = 2) -> dict[str, Any]:
    try:
        haproxy_binary()
    except Unavailable as exc:
        return {"skipped": str(exc)}
    library = str(build_simulators()["F"])
    boards: dict[str, Daemon] = {}
    try:
        for board in BOARDS:
            store = workdir / f"board-{board}" / "models"
            add_sim_model(
                store, "sim", reply=f"[{board}] " + "lorem ipsum " * 50, token_delay_ms=TOKEN_DELAY_MS
            )
            env = {"RKLLAMA_RKLLM_LIB": library, "RKLLAMA_MAX_QUEUE": str(CLIENTS * 2)}
            boards[board] = Daemon(store, env=env, name=board).start()
            ollama.Client(host=boards[board].url).generate("sim", "warm up", options={"num_predict": 1})
        address = {board: f"127.0.0.1:{daemon.port}" for board, daemon in boards.items()}
        one_dir, three_dir = workdir / "one", workdir / "three"
        one_dir.mkdir(parents=True)
        three_dir.mkdir(parents=True)
        one = Haproxy(one_dir, servers=[("a", address["a"])]).start()
        three = Haproxy(three_dir, servers=[(board, address[board]) for board in BOARDS]).start()
        requests = CLIENTS * REQUESTS_PER_CLIENT
        rates: dict[str, list[float]] = {"one": [], "three": []}
        token_rates: dict[str, list[float]] = {"one": [], "three": []}
        try:
            for round_no in range(rounds):  # A B A B
                for label, router in (("one", one), ("three", three)):
                    elapsed, tokens = drive(router.url, round_no)
                    rates[label].append(requests / elapsed)
                    token_rates[label].append(tokens / elapsed)
        finally:
            one.stop()
            three.stop()
    finally:
        for daemon in boards.values():
            daemon.stop()
    ratios = [t / o for t, o in zip(rates["three"], rates["one"], strict=True)]
    return {
        "clients": CLIENTS,
        "requests_per_round": requests,
        "tokens_per_request": TOKENS,
        "token_delay_ms": TOKEN_DELAY_MS,
        "one_board_req_s": [round(x, 2) for x in rates["one"]],
        "three_boards_req_s": [round(x, 2) for x in rates["three"]],
        "one_board_tok_s": [round(x, 1) for x in token_rates["one"]],
        "three_boards_tok_s": [round(x, 1) for x in token_rates["three"]],
        "three_over_one": round(statistics.median(ratios), 2),
    }


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(run(Path(tmp), rounds), indent=2))


if __name__ == "__main__":
    main()
