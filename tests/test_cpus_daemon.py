"""RKLLAMA_CPUS on a live daemon: the llama.cpp runner is pinned to the named cores, and cores it may
not use are a clear 500 for that request, not a dead daemon."""

from __future__ import annotations

import os
from pathlib import Path

import ollama
import pytest

from tests.conftest import make_gguf_model
from tests.support.daemon import Daemon

SHORT = {"num_predict": 3, "temperature": 0.0}


def allowed_cores(pid: int) -> str:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("Cpus_allowed_list:"):
                return line.split(":", 1)[1].strip()
    raise AssertionError("no Cpus_allowed_list")


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="needs Linux affinity calls")
def test_the_runner_runs_on_the_configured_core_and_the_server_does_not(tmp_path: Path) -> None:
    core = max(os.sched_getaffinity(0))
    make_gguf_model(tmp_path / "models", "tiny")
    with Daemon(tmp_path / "models", env={"RKLLAMA_CPUS": str(core)}).start() as daemon:
        reply = ollama.Client(host=daemon.url).chat(
            "tiny", messages=[{"role": "user", "content": "hi"}], options=SHORT
        )
        assert reply.done and reply.eval_count == 3
        assert daemon.process is not None
        (runner,) = daemon.runner_pids()
        assert allowed_cores(runner) == str(core)
        assert allowed_cores(daemon.process.pid) == allowed_cores(os.getpid())  # the server is not pinned
        assert f"threads=1 (configured cores, pinned to cores [{core}])" in daemon.log()


def test_cores_that_do_not_exist_fail_the_request_not_the_daemon(tmp_path: Path) -> None:
    make_gguf_model(tmp_path / "models", "tiny")
    with Daemon(tmp_path / "models", env={"RKLLAMA_CPUS": "1000-1001"}).start() as daemon:
        client = ollama.Client(host=daemon.url)
        with pytest.raises(ollama.ResponseError) as failure:
            client.chat("tiny", messages=[{"role": "user", "content": "hi"}], options=SHORT)
        assert failure.value.status_code == 500
        assert "cannot run on cores [1000, 1001] (RKLLAMA_CPUS)" in failure.value.error
        assert client.list().models  # still serving


def test_a_malformed_cpu_list_stops_the_daemon_at_start_with_the_reason(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path / "models", env={"RKLLAMA_CPUS": "4-"})
    with pytest.raises(RuntimeError, match="RKLLAMA_CPUS: '4-' is not a core number or a range like 4-7"):
        daemon.start(timeout=20)
