"""Pulling through a live daemon with ollama-python, every name form served by the fake Hub, then chatting."""

from __future__ import annotations

import http.client
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import ollama
import pytest

from tests.rkllm_support.sim import build_simulators, write_byte_tokenizer, write_model
from tests.support.daemon import Daemon
from tests.support.fake_hub import FakeHub
from tests.support.tiny_gguf import write_tiny_gguf

GGUF_REPO = "someone/Tiny-GGUF"
SEED_REPO = "someone/Sim-RKLLM"
SEED_FILE = "sim-rk3588-w8a8.rkllm"
CATALOGUE_REPO = "c01zaut/Qwen2.5-1.5B-Instruct-rk3588-1.1.1"
CATALOGUE_FILE = "Qwen2.5-1.5B-Instruct-rk3588-w8a8-opt-1-hybrid-ratio-1.0.rkllm"
BIG_REPO = "someone/Big-RKLLM"
BIG = os.urandom(3 << 20)


def tokenizer_files(tmp: Path) -> dict[str, bytes]:
    folder = write_byte_tokenizer(tmp / "tokenizer")
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def sim_model(tmp: Path, reply: str) -> bytes:
    return write_model(tmp / reply.replace(" ", "_"), reply=reply).read_bytes()


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    tmp = tmp_path_factory.mktemp("hub-files")
    tokenizer = tokenizer_files(tmp)
    server = FakeHub()
    server.add(GGUF_REPO, {"tiny.Q4_K_M.gguf": write_tiny_gguf(tmp / "tiny.gguf").read_bytes()})
    server.add(SEED_REPO, {SEED_FILE: sim_model(tmp, "seed reply"), **tokenizer})
    server.add(CATALOGUE_REPO, {CATALOGUE_FILE: sim_model(tmp, "catalogue reply")})
    server.add("Qwen/Qwen2.5-1.5B-Instruct", tokenizer)
    server.add(BIG_REPO, {"big-rk3588.rkllm": BIG})
    server.add("someone/Other-Chip", {"m_RK3576_w4a16.rkllm": b"RKLLM-SIM\n"})
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def pull_daemon(hub: FakeHub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    root = tmp_path_factory.mktemp("pull-daemon")
    env = {
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(root / "hf-home"),
        "HF_HUB_OFFLINE": "0",
        "RKLLAMA_SOC": "rk3588",
        "RKLLAMA_RKLLM_LIB": str(build_simulators()["E"]),
    }
    with Daemon(root / "models", env=env).start() as server:
        yield server


def pull_events(daemon: Daemon, name: str) -> list[ollama.ProgressResponse]:
    return list(ollama.Client(host=daemon.url).pull(name, stream=True))


def assert_ollama_sequence(events: list[ollama.ProgressResponse]) -> None:
    statuses = [e.status for e in events]
    assert statuses[0] == "pulling manifest"
    assert statuses[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
    layers = [e for e in events if e.digest]
    assert layers, statuses
    for event in layers:
        assert re.fullmatch(r"sha256:[0-9a-f]{64}", event.digest or "")
        assert event.status == f"pulling {event.digest[7:19]}"  # type: ignore[index]
        assert event.total and (event.completed or 0) <= event.total
    last_per_layer = {event.digest: event for event in layers}
    assert all(event.completed == event.total for event in last_per_layer.values())


def tags(daemon: Daemon) -> set[str]:
    return {m.model or "" for m in ollama.Client(host=daemon.url).list().models}


def post(daemon: Daemon, path: str, body: dict[str, object]) -> tuple[int, list[dict[str, object]]]:
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=60)
    conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    lines = [json.loads(line) for line in response.read().splitlines() if line.strip()]
    conn.close()
    return response.status, lines


def test_pull_hf_gguf_then_chat(pull_daemon: Daemon) -> None:
    events = pull_events(pull_daemon, "hf.co/someone/Tiny-GGUF")
    assert_ollama_sequence(events)
    assert "hf.co/someone/Tiny-GGUF:latest" in tags(pull_daemon)
    reply = ollama.Client(host=pull_daemon.url).chat(
        "hf.co/someone/Tiny-GGUF", messages=[{"role": "user", "content": "hi"}], options={"num_predict": 4}
    )
    assert reply.done


def test_pull_seed_form_then_chat(pull_daemon: Daemon) -> None:
    assert_ollama_sequence(pull_events(pull_daemon, f"{SEED_REPO}/{SEED_FILE}"))
    assert "sim-rk3588-w8a8:latest" in tags(pull_daemon)
    reply = ollama.Client(host=pull_daemon.url).chat(
        "sim-rk3588-w8a8", messages=[{"role": "user", "content": "hi"}]
    )
    assert reply.message.content == "seed reply"


def test_pull_catalogue_short_name_then_chat(pull_daemon: Daemon) -> None:
    assert_ollama_sequence(pull_events(pull_daemon, "qwen2.5:1.5b"))
    assert "qwen2.5:1.5b" in tags(pull_daemon)
    client = ollama.Client(host=pull_daemon.url)
    reply = client.chat("qwen2.5:1.5b", messages=[{"role": "user", "content": "hi"}])
    assert reply.message.content == "catalogue reply"
    shown = client.show("qwen2.5:1.5b")
    assert "num_ctx" in (shown.parameters or "") and "4096" in (shown.parameters or "")


def test_native_pull_and_stream_false(pull_daemon: Daemon) -> None:
    status, lines = post(pull_daemon, "/pull", {"model": f"{SEED_REPO}/{SEED_FILE}", "stream": False})
    assert (status, lines) == (200, [{"status": "success"}])
    status, lines = post(pull_daemon, "/api/pull", {"model": "../../etc/passwd", "stream": False})
    assert status == 400 and lines == [{"error": "invalid model name"}]
    status, lines = post(pull_daemon, "/api/pull", {"name": "", "insecure": True})
    assert status == 400


def test_chip_mismatch_is_refused_and_store_unchanged(pull_daemon: Daemon) -> None:
    before = tags(pull_daemon)
    with pytest.raises(ollama.ResponseError, match="built for rk3576"):
        pull_events(pull_daemon, "hf.co/someone/Other-Chip:m_RK3576_w4a16.rkllm")
    status, lines = post(
        pull_daemon, "/api/pull", {"model": "hf.co/someone/Other-Chip:m_RK3576_w4a16.rkllm", "stream": False}
    )
    assert status == 400 and "built for rk3576" in str(lines[0]["error"])
    assert tags(pull_daemon) == before


def test_checksum_mismatch_leaves_nothing(pull_daemon: Daemon, hub: FakeHub) -> None:
    hub.add("someone/Liar", {"liar-rk3588.rkllm": b"RKLLM-SIM\nreply=x\n"})
    hub.lie_sha256.add("someone/Liar/liar-rk3588.rkllm")
    with pytest.raises(ollama.ResponseError, match="digest mismatch"):
        pull_events(pull_daemon, "someone/Liar/liar-rk3588.rkllm")
    assert "liar-rk3588:latest" not in tags(pull_daemon)
    assert not [p for p in pull_daemon.models_dir.iterdir() if p.name.startswith((".pull-", ".staging-"))]


def test_killed_connection_leaves_no_model_and_pull_resumes(pull_daemon: Daemon, hub: FakeHub) -> None:
    name = f"{BIG_REPO}/big-rk3588.rkllm"
    hub.hold_after[f"{BIG_REPO}/big-rk3588.rkllm"] = 2 << 20
    conn = http.client.HTTPConnection("127.0.0.1", pull_daemon.port, timeout=60)
    conn.request("POST", "/api/pull", body=json.dumps({"model": name}))
    response = conn.getresponse()
    while True:  # read progress until the first MiB has arrived, then cut the connection
        event = json.loads(response.readline())
        if event.get("completed"):
            break
    conn.sock.close()  # type: ignore[union-attr]
    conn.close()
    deadline = time.monotonic() + 30
    # Let the Hub go on only once the daemon has seen the client leave: otherwise, on a busy machine, the
    # download can finish its last MiB before the cancellation lands and there is nothing to resume.
    while time.monotonic() < deadline and "pull cancelled: no client waits" not in pull_daemon.log():
        time.sleep(0.05)
    hub.release()
    partial: list[Path] = []
    while time.monotonic() < deadline and not partial:
        partial = list(pull_daemon.models_dir.glob(".pull-*/**/*.partial"))
        time.sleep(0.05)
    assert partial and "big-rk3588:latest" not in tags(pull_daemon)
    assert_ollama_sequence(pull_events(pull_daemon, name))
    assert "big-rk3588:latest" in tags(pull_daemon)
    ranges = [r[2] for r in hub.file_requests("big-rk3588.rkllm")]
    assert ranges[0] is None and ranges[-1] not in (None, "bytes=0-")
