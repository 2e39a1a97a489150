"""The runner process handle's own resources: a start that fails leaves no descriptor or file behind."""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest

from rkllama_ollama.runtime.runner.process import RunnerProcess


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def runner_logs() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("rkllama-runner-*.log"))


@pytest.mark.parametrize("failure", [OSError(24, "Too many open files"), asyncio.CancelledError()])
async def test_a_runner_that_cannot_be_spawned_leaves_no_pipe_open(
    monkeypatch: pytest.MonkeyPatch, failure: BaseException
) -> None:
    async def refuse(*args: Any, **kwargs: Any) -> Any:
        raise failure

    monkeypatch.setattr(asyncio, "create_subprocess_exec", refuse)
    fds_before, logs_before = open_fds(), runner_logs()
    with pytest.raises(type(failure)):
        await RunnerProcess.start()
    assert open_fds() == fds_before  # both ends of the event pipe are closed
    assert runner_logs() == logs_before
