"""The runner process handle: a start that fails leaves no descriptor or file behind, and says why (over
HTTP too)."""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from rkllama_ollama.api.app import build_context, create_app
from rkllama_ollama.config import settings_from_env
from rkllama_ollama.runtime.base import RuntimeFailure
from rkllama_ollama.runtime.runner.process import RunnerProcess
from tests.conftest import TINY

NO_FDS = OSError(24, "Too many open files")


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def runner_logs() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("rkllama-runner-*.log"))


@pytest.mark.parametrize("failure", [NO_FDS, asyncio.CancelledError()])
async def test_a_runner_that_cannot_be_spawned_leaves_no_pipe_open(
    monkeypatch: pytest.MonkeyPatch, failure: BaseException
) -> None:
    async def refuse(*args: Any, **kwargs: Any) -> Any:
        raise failure

    monkeypatch.setattr(asyncio, "create_subprocess_exec", refuse)
    fds_before, logs_before = open_fds(), runner_logs()
    with pytest.raises(RuntimeFailure if isinstance(failure, OSError) else type(failure)):
        await RunnerProcess.start()
    assert open_fds() == fds_before  # both ends of the event pipe are closed
    assert runner_logs() == logs_before


async def test_a_runner_the_system_refuses_is_a_500_saying_why(
    monkeypatch: pytest.MonkeyPatch, aiohttp_client: Any, tiny_store: Path
) -> None:
    async def refuse(*args: Any, **kwargs: Any) -> Any:
        raise NO_FDS

    monkeypatch.setattr(asyncio, "create_subprocess_exec", refuse)
    settings = settings_from_env({"RKLLAMA_EMBEDDED_MODEL": "0", "RKLLAMA_MODELS": str(tiny_store)})
    client: TestClient = await aiohttp_client(create_app(settings, build_context(settings)))
    for path, body, error in (
        ("/api/generate", {"model": TINY, "prompt": "hi", "stream": False}, lambda b: b["error"]),
        (
            "/v1/chat/completions",
            {"model": TINY, "messages": [{"role": "user", "content": "hi"}]},
            lambda b: b["error"]["message"],
        ),
    ):
        response = await client.post(path, json=body)
        assert response.status == 500
        assert (
            error(await response.json()) == "could not start the model runner: [Errno 24] Too many open files"
        )
