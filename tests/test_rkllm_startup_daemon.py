"""Runtime start-up on a real board, as each vendor release behaves, end to end through a live daemon.

The simulator mimics the reported behaviours (docs/board-startup.md): a missing NPU (no version banner
from 1.2.0 on), 1.1.x init returning 0 for a model it did not load, 1.3.0 crashing in a failing init.
Every path must end in a clear, specific 500 "could not load ..." naming cause and fix, or in a working
load; none may hang and the daemon must survive each.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import ollama
import pytest

from tests.rkllm_support.sim import FAMILIES, add_sim_model, build_simulators
from tests.support.daemon import Daemon

REPLY = "loaded fine"
MESSAGES = [{"role": "user", "content": "hi"}]


def _store(root: Path) -> Path:
    store = root / "models"
    add_sim_model(store, "good", reply=REPLY)
    add_sim_model(store, "bad-magic", init_fault="bad_magic")
    add_sim_model(store, "npu-oom", init_fault="npu_oom")
    add_sim_model(store, "unreadable", init_fault="load_error")
    return store


@pytest.fixture(scope="module", params=FAMILIES)
def board(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    family = request.param
    store = _store(tmp_path_factory.mktemp(f"startup-{family}"))
    with Daemon(store, env={"RKLLAMA_RKLLM_LIB": str(build_simulators()[family])}).start() as server:
        server.family = family  # type: ignore[attr-defined]
        yield server


def _load_error(server: Daemon, model: str) -> ollama.ResponseError:
    client = ollama.Client(host=server.url, timeout=120)
    with pytest.raises(ollama.ResponseError) as info:
        client.chat(model, messages=MESSAGES)
    return info.value


def _still_serves(server: Daemon) -> None:
    client = ollama.Client(host=server.url, timeout=120)
    assert client.chat("good", messages=MESSAGES).message.content == REPLY


def test_a_good_model_loads(board: Daemon) -> None:
    _still_serves(board)


def test_a_model_with_a_bad_magic_is_a_clear_error_not_a_crash_at_the_first_run(board: Daemon) -> None:
    """1.1.x returns 0 from rkllm_init here; the handle would abort the runner at the first rkllm_run."""
    error = _load_error(board, "bad-magic")
    assert error.status_code == 500
    assert error.error.startswith("could not load ")
    assert "bad-magic" in error.error
    assert "not a model this runtime can read" in error.error
    assert "invalid rknn llm model magic" in error.error and "Fix: " in error.error
    assert "SIGABRT" not in error.error
    _still_serves(board)


def test_npu_memory_exhausted_is_a_clear_error_even_when_init_crashes(board: Daemon) -> None:
    """1.3.0 segfaults inside the failing rkllm_init: the runner dies, the request gets the cause."""
    error = _load_error(board, "npu-oom")
    assert error.status_code == 500
    assert error.error.startswith("could not load ") and "npu-oom" in error.error
    assert "the NPU memory is exhausted" in error.error and "failed to malloc npu memory" in error.error
    assert "smaller model" in error.error
    if board.family == "F":  # type: ignore[attr-defined]
        assert "SIGSEGV while loading it" in error.error
    _still_serves(board)


def test_an_unreadable_model_file_is_a_clear_error(board: Daemon) -> None:
    """1.1.x returns 0 and a NULL handle here."""
    error = _load_error(board, "unreadable")
    assert error.status_code == 500 and error.error.startswith("could not load ")
    assert "could not read the model file" in error.error and "load model file error" in error.error
    _still_serves(board)


@pytest.mark.parametrize("family", FAMILIES)
def test_no_npu_device_names_the_device_group_and_driver(family: str, tmp_path: Path) -> None:
    """1.2.0+ print no version banner without the device: the version comes from the file, and the
    error is about the device (node, render/video group, driver version), not about the version."""
    store = _store(tmp_path)
    env = {"RKLLAMA_RKLLM_LIB": str(build_simulators()[family]), "RKLLM_SIM_NPU": "absent"}
    with Daemon(store, env=env).start() as server:
        error = _load_error(server, "good")
        assert error.status_code == 500 and error.error.startswith("could not load ")
        assert "the NPU device could not be opened" in error.error
        assert "failed to open rknpu module" in error.error or "Device is not available" in error.error
        assert "/dev/rknpu" in error.error and "renderD" in error.error and "'render'" in error.error
        assert "driver" in error.error and "0.9.8" in error.error
        assert "cannot tell" not in error.error
        assert ollama.Client(host=server.url).list().models  # the daemon is alive
