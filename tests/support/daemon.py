"""Start a real `rkllama-ollama serve` in a child process on a free port, for tests and benchmarks."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

ENDED_RE = re.compile(r"ended: (\w+), \d+ prompt tokens fed, (\d+) generated")


class Reply(NamedTuple):
    """One HTTP answer, whatever its status (unpacks as `status, content_type, body`)."""

    status: int
    content_type: str
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error(self) -> str:
        return self.json()["error"]


def error_of(payload: bytes) -> str:
    """The `error` of an Ollama error body."""
    return json.loads(payload)["error"]


def http_request(
    url: str,
    method: str = "POST",
    body: Any = None,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    """A plain HTTP request (JSON `body` or `raw` bytes); error statuses are answers, not exceptions."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return Reply(response.status, response.headers.get("Content-Type", ""), response.read())
    except urllib.error.HTTPError as exc:
        return Reply(exc.code, exc.headers.get("Content-Type", ""), exc.read())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def child_pids(pid: int) -> list[int]:
    """Direct children of `pid` (from /proc; no psutil needed)."""
    children: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                children += [int(p) for p in handle.read().split()]
    except FileNotFoundError:
        pass
    return children


@dataclass
class Daemon:
    models_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    host: str = "127.0.0.1"  # the address it binds and is reached at
    wrapper: tuple[str, ...] = ()  # a command the daemon runs under (`ip netns exec <ns>`)
    name: str = ""  # for its log file

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> Daemon:
        self.port = self.port or free_port()
        env = {**os.environ, "RKLLAMA_EMBEDDED_MODEL": "0", **self.env}
        env.pop("OLLAMA_HOST", None)
        env["RKLLAMA_HOST"] = f"{self.host}:{self.port}"
        env["RKLLAMA_MODELS"] = str(self.models_dir)
        self.log_path = self.models_dir.parent / f"daemon-{self.name or self.port}.log"
        log = open(self.log_path, "wb")  # noqa: SIM115 - kept open for the child's lifetime
        self.process = subprocess.Popen(
            [*self.wrapper, sys.executable, "-m", "rkllama_ollama.cli", "serve"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"daemon exited early:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/", timeout=1) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()  # never leave a daemon running behind a failed start
        raise RuntimeError(f"daemon did not answer in {timeout}s:\n{self.log()}")

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        return http_request(self.url + path, method, body, raw, headers)

    def open_stream(
        self, path: str, body: dict[str, Any], until: bytes = b'"done":false'
    ) -> tuple[socket.socket, bytes]:
        """Send a streaming request by hand and read until `until` (by default the first NDJSON chunk)."""
        sock = socket.create_connection((self.host, self.port), timeout=60)
        payload = json.dumps(body).encode()
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n".encode()
            + f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        received = b""
        while until not in received:
            chunk = sock.recv(65536)
            assert chunk, "connection closed before the first token"
            received += chunk
        return sock, received

    def ended_generations(self) -> list[tuple[str, int]]:
        """(done_reason, tokens generated) of every generation the runner logged, in order."""
        return [(reason, int(count)) for reason, count in ENDED_RE.findall(self.log())]

    def runner_pids(self) -> list[int]:
        return child_pids(self.process.pid) if self.process else []

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
