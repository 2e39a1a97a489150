"""`GET /metrics` (Prometheus text format) and the one-line-per-request log."""

from __future__ import annotations

import logging
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ollama
import pytest
from prometheus_client.parser import text_string_to_metric_families

from rkllama_ollama.api.app import create_app
from rkllama_ollama.api.metrics import METRICS_KEY, MetricsObserver, RequestRecord, _current_record
from rkllama_ollama.config import Settings
from rkllama_ollama.runtime.base import GenerationStats
from tests.rkllm_support.sim import add_sim_model, build_simulators
from tests.support.daemon import Daemon

PROMPT = "tell me the secret word xyzzy-prompt"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value, parsed by prometheus_client's own parser."""
    parsed = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            parsed[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return parsed


def value(parsed: dict[Any, float], name: str, **labels: str) -> float:
    return parsed.get((name, tuple(sorted(labels.items()))), 0.0)


# -- in process -------------------------------------------------------------------------------


async def test_metrics_parse_and_request_counters_move(aiohttp_client: Any, tmp_path: Path) -> None:
    settings = Settings(models_dir=tmp_path, offer_embedded=False)
    client = await aiohttp_client(create_app(settings))
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    before = samples(await response.text())
    assert value(before, "rkllama_queue_depth") == 0
    for _ in range(3):
        assert (await client.get("/api/tags")).status == 200
    assert (await client.post("/api/show", json={"model": "nope"})).status == 404
    assert (await client.get("/no/such/thing")).status == 404
    after = samples(await (await client.get("/metrics")).text())
    tags = {"route": "/api/tags", "method": "GET", "status": "200"}
    assert (
        value(after, "rkllama_requests_total", **tags) == value(before, "rkllama_requests_total", **tags) + 3
    )
    assert value(after, "rkllama_requests_total", route="/api/show", method="POST", status="404") == 1
    assert value(after, "rkllama_requests_total", route="unmatched", method="GET", status="404") == 1
    assert value(after, "rkllama_request_duration_seconds_count", route="/api/tags") == 3


async def test_one_log_line_per_request_with_an_id(
    aiohttp_client: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client = await aiohttp_client(create_app(Settings(models_dir=tmp_path, offer_embedded=False)))
    with caplog.at_level(logging.INFO, logger="rkllama_ollama.access"):
        response = await client.get("/api/tags", headers={"X-Request-Id": "abc-123"})
        other = await client.get("/api/version")
    assert response.headers["X-Request-Id"] == "abc-123"
    assert len(other.headers["X-Request-Id"]) >= 8
    lines = [r.getMessage() for r in caplog.records if r.name == "rkllama_ollama.access"]
    assert len(lines) == 2
    assert lines[0].startswith("id=abc-123 GET /api/tags 200")
    assert "took=" in lines[0]


def test_observer_feeds_counters_and_the_request_record(tmp_path: Path) -> None:
    app = create_app(Settings(models_dir=tmp_path, offer_embedded=False))
    metrics = app[METRICS_KEY]
    observer = MetricsObserver(metrics)
    record = RequestRecord(id="r1")
    token = _current_record.set(record)
    try:
        observer.generation_started("m:latest")
        observer.model_loaded("m:latest", "llamacpp", 2_000_000_000)
        observer.first_piece("m:latest", 300_000_000)
        for _ in range(4):
            observer.next_piece("m:latest", 20_000_000)
        stats = GenerationStats("stop", 10, 7, 1_000_000, 5, 250_000_000)
        observer.generation_finished("m:latest", stats)
    finally:
        _current_record.reset(token)
    parsed = samples(metrics.exposition().decode())
    assert value(parsed, "rkllama_generated_tokens_total", model="m:latest") == 5
    assert value(parsed, "rkllama_prompt_tokens_total", model="m:latest") == 7
    assert value(parsed, "rkllama_time_to_first_token_seconds_count", model="m:latest") == 1
    assert value(parsed, "rkllama_inter_token_latency_seconds_count", model="m:latest") == 4
    assert value(parsed, "rkllama_model_load_seconds_sum", model="m:latest", engine="llamacpp") == 2.0
    assert record.model == "m:latest" and record.generated_tokens == 5 and record.prompt_tokens == 7
    assert record.tokens_per_second == pytest.approx(20.0)
    assert "ttft=0.300s" in record.log_fields() and "tok/s=20.0" in record.log_fields()


# -- a live daemon serving the RKLLM simulator ------------------------------------------------


@pytest.fixture(scope="module")
def sim_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    library = build_simulators()["F"]
    store = tmp_path_factory.mktemp("ops-metrics") / "models"
    add_sim_model(store, "sim", reply="one two three four five", token_delay_ms=1)
    with Daemon(store, env={"RKLLAMA_RKLLM_LIB": str(library)}).start() as server:
        yield server


def scrape(daemon: Daemon) -> dict[Any, float]:
    with urllib.request.urlopen(daemon.url + "/metrics", timeout=10) as response:
        return samples(response.read().decode())


def test_generation_moves_token_latency_and_model_metrics(sim_daemon: Daemon) -> None:
    before = scrape(sim_daemon)
    client = ollama.Client(host=sim_daemon.url)
    reply = client.chat("sim", messages=[{"role": "user", "content": PROMPT}], stream=True)
    chunks = list(reply)
    final = chunks[-1]
    assert final.done and final.eval_count
    after = scrape(sim_daemon)
    model = "sim:latest"
    generated = value(after, "rkllama_generated_tokens_total", model=model)
    assert generated - value(before, "rkllama_generated_tokens_total", model=model) == final.eval_count
    assert value(after, "rkllama_prompt_tokens_total", model=model) > 0
    assert value(after, "rkllama_time_to_first_token_seconds_count", model=model) >= 1
    assert value(after, "rkllama_inter_token_latency_seconds_count", model=model) >= 1
    assert value(after, "rkllama_model_load_seconds_count", model=model, engine="rkllm") >= 1
    assert value(after, "rkllama_loaded_model", model=model, engine="rkllm") == 1
    assert value(after, "rkllama_requests_total", route="/api/chat", method="POST", status="200") >= 1
    assert ("rkllama_queue_depth", ()) in after


def test_request_log_line_has_tokens_and_never_the_prompt(sim_daemon: Daemon) -> None:
    client = ollama.Client(host=sim_daemon.url)
    client.generate("sim", prompt=PROMPT, stream=False)
    lines = [line for line in sim_daemon.log().splitlines() if "rkllama_ollama.access" in line]
    generate = [line for line in lines if "POST /api/generate 200" in line]
    assert generate, lines
    line = generate[-1]
    for field in ("id=", "model=sim:latest", "prompt_tokens=", "tokens=", "ttft=", "tok/s=", "took="):
        assert field in line, line
    assert "xyzzy" not in sim_daemon.log()
