"""The scheduler's runner seam: runners come from the factory it is given, and it notices by itself
when one dies (no caller has to tell it). In-process runners: the real dispatcher and llama.cpp engine."""

from __future__ import annotations

import asyncio
import logging

import pytest
from aiohttp.test_utils import TestClient

from rkllama_ollama.api.context import CONTEXT_KEY
from rkllama_ollama.runtime.runner.protocol import RunnerDied
from tests.conftest import TINY
from tests.support.inprocess_runner import KILLED

SHORT = {"num_predict": 3, "temperature": 0}


async def generate(client: TestClient) -> dict[str, object]:
    response = await client.post(
        "/api/generate", json={"model": TINY, "prompt": "hi", "stream": False, "options": SHORT}
    )
    assert response.status == 200, await response.text()
    body: dict[str, object] = await response.json()
    return body


async def test_a_dead_runner_is_forgotten_by_the_scheduler_and_the_next_request_reloads(
    app_client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    scheduler = app_client.app[CONTEXT_KEY].scheduler
    first = await generate(app_client)
    assert first["load_duration"] > 0  # type: ignore[operator]
    (loaded,) = scheduler.loaded_models
    with caplog.at_level(logging.WARNING, logger="rkllama_ollama.scheduler"):
        loaded.runner.kill()
        await asyncio.sleep(0)  # the runner's `died` callback runs on the loop
    assert scheduler.loaded_models == []
    assert f"model={TINY}:latest lost its runner" in caplog.text
    with pytest.raises(RunnerDied, match=KILLED):
        await loaded.runner.tokenize("hi")
    second = await generate(app_client)
    assert second["load_duration"] > 0  # type: ignore[operator]  # a new runner loaded the model
    assert [model.runner for model in scheduler.loaded_models] != [loaded.runner]


async def test_a_runner_the_scheduler_stops_is_not_reported_lost(
    app_client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    await generate(app_client)
    with caplog.at_level(logging.WARNING, logger="rkllama_ollama.scheduler"):
        response = await app_client.post("/api/generate", json={"model": TINY, "keep_alive": 0})
        assert response.status == 200
        await asyncio.sleep(0)
    assert app_client.app[CONTEXT_KEY].scheduler.loaded_models == []
    assert "lost its runner" not in caplog.text


async def test_a_runner_killed_mid_generation_fails_the_stream_with_its_reason(
    app_client: TestClient,
) -> None:
    scheduler = app_client.app[CONTEXT_KEY].scheduler
    await generate(app_client)
    response = await app_client.post(
        "/api/generate", json={"model": TINY, "prompt": "hi", "options": {"num_predict": 100000}}
    )
    assert response.status == 200
    await response.content.readline()  # the first token: the generation runs
    (loaded,) = scheduler.loaded_models
    loaded.runner.kill()
    lines = [line async for line in response.content if line.strip()]
    assert KILLED in lines[-1].decode()
    assert scheduler.loaded_models == []
