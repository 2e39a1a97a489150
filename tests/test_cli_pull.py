"""`pull` (and `run`'s pull of a missing model) against a fake daemon that streams Ollama's pull events."""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from rkllama_ollama.cli.commands import main

DIGEST = "sha256:6a0746a1ec1aef3e7ec53868f220ff6e389f6f8ef87a01d77c96807de94ca2aa"
TOTAL = 2_019_377_376
STEPS = 20


def pull_events() -> list[dict[str, Any]]:
    """Ollama's sequence (checklist #20, docs/ollama-conformance.md): manifest, one layer's progress,
    verify, manifest, success."""
    layer = {"status": "pulling 6a0746a1ec1a", "digest": DIGEST, "total": TOTAL}
    events: list[dict[str, Any]] = [{"status": "pulling manifest"}, dict(layer)]  # no `completed` at 0
    events += [{**layer, "completed": TOTAL * step // STEPS} for step in range(1, STEPS + 1)]
    events += [{"status": s} for s in ("verifying sha256 digest", "writing manifest", "success")]
    return events


class FakeDaemon:
    def __init__(self, events: list[dict[str, Any]]) -> None:
        self.events = events
        self.pull_bodies: list[dict[str, Any]] = []
        self.pulled = False
        self.chats: list[dict[str, Any]] = []

    async def pull(self, request: web.Request) -> web.StreamResponse:
        self.pull_bodies.append(await request.json())
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        for event in self.events:
            await response.write(json.dumps(event).encode() + b"\n")
            await asyncio.sleep(0)
        self.pulled = not any("error" in e for e in self.events)
        await response.write_eof()
        return response

    async def show(self, request: web.Request) -> web.Response:
        body = await request.json()
        if not self.pulled:
            return web.json_response({"error": f"model '{body['model']}' not found"}, status=404)
        return web.json_response({"modelfile": "", "details": {}, "model_info": {}})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        self.chats.append(await request.json())
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        for piece in ("Hello", " from", " the NPU"):
            line = {"model": "m", "message": {"role": "assistant", "content": piece}, "done": False}
            await response.write(json.dumps(line).encode() + b"\n")
        await response.write(json.dumps({"model": "m", "message": {"content": ""}, "done": True}).encode())
        await response.write_eof()
        return response

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/api/pull", self.pull)
        app.router.add_post("/api/show", self.show)
        app.router.add_post("/api/chat", self.chat)
        return app


async def run_cli(fake: FakeDaemon, monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[int, TestServer]:
    server = TestServer(fake.app(), host="127.0.0.1")
    await server.start_server()
    monkeypatch.setenv("RKLLAMA_HOST", f"127.0.0.1:{server.port}")
    monkeypatch.delenv("RKLLAMA_API_KEY", raising=False)
    try:
        code = await asyncio.to_thread(main, list(args))
    finally:
        await server.close()
    return code, server


async def test_pull_draws_a_progress_bar_from_the_events(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = FakeDaemon(pull_events())
    code, _ = await run_cli(fake, monkeypatch, "pull", "qwen2.5:1.5b")
    out = capsys.readouterr().out
    assert code == 0
    assert fake.pull_bodies == [{"model": "qwen2.5:1.5b", "stream": True}]
    lines = out.splitlines()
    assert lines[0] == "pulling manifest"
    bars = [line for line in lines if line.startswith("pulling 6a0746a1ec1a:")]
    assert len(bars) == 11  # output is not a terminal: one line per tenth
    assert bars[0].startswith("pulling 6a0746a1ec1a:   0% ▕ ")
    assert bars[5].startswith("pulling 6a0746a1ec1a:  50% ▕████████████ ")
    assert bars[-1] == "pulling 6a0746a1ec1a: 100% ▕" + "█" * 25 + "▏ 2.0 GB/2.0 GB"
    assert lines[-3:] == ["verifying sha256 digest", "writing manifest", "success"]


async def test_pull_on_a_terminal_redraws_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr("sys.stdout", terminal)
    code, _ = await run_cli(FakeDaemon(pull_events()), monkeypatch, "pull", "m")
    text = terminal.getvalue()
    assert code == 0
    assert text.count("\r\x1b[K") == STEPS + 1  # every event redraws the bar in place
    assert "100% ▕" + "█" * 25 + "▏ 2.0 GB/2.0 GB\nverifying sha256 digest\n" in text


async def test_pull_error_line_is_one_error_message(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    events = [*pull_events()[:5], {"error": "pull model manifest: file does not exist"}]
    code, _ = await run_cli(FakeDaemon(events), monkeypatch, "pull", "m")
    captured = capsys.readouterr()
    assert code == 1
    assert captured.err == "Error: pull model manifest: file does not exist\n"
    assert "pulling manifest" in captured.out


async def test_run_pulls_a_missing_model_then_answers(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    fake = FakeDaemon(pull_events())
    code, _ = await run_cli(fake, monkeypatch, "run", "m", "Say", "hi")
    captured = capsys.readouterr()
    assert code == 0
    assert "success" in captured.err  # pull progress goes to stderr, the answer to stdout
    assert captured.out == "Hello from the NPU\n\n"
    assert fake.chats[0]["messages"] == [{"role": "user", "content": "Say hi"}]
