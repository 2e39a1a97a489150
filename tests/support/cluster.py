"""Several daemons ("boards") behind HAProxy on this machine, for the scale-out test and benchmark.

- `Namespaces` makes one network namespace per board, each joined to the root namespace by a veth
  pair with a private /30 of its own (addresses that exist only inside this machine), and removes them
  all again, even after a failure.
- `Haproxy` writes a configuration (the one docs/scale-out.md explains, with test timings), runs
  Debian's `haproxy` in the foreground on loopback, and reads its CSV statistics.

Everything is reached over loopback or those veth pairs; nothing is sent anywhere else.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.support.daemon import Daemon, free_port

NS_PREFIX = "rkls"  # rkls<pid>x: namespaces of the test process <pid>
BOARD_PORT = 11434  # each board in its own namespace: all of them on the usual port


class Unavailable(Exception):
    """What the test needs cannot be had here (the message says why)."""


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=False)


def haproxy_binary() -> str:
    path = shutil.which("haproxy") or next(
        (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.access(p, os.X_OK)), None
    )
    if path is None:
        raise Unavailable("haproxy is not installed (Debian: apt-get install haproxy)")
    return path


# ------------------------------------------------------------------------------------------------
# Network namespaces
# ------------------------------------------------------------------------------------------------


@dataclass
class Namespace:
    name: str
    veth: str  # the root side of the pair
    address: str  # the board's address (inside the namespace)
    gateway: str  # the root side's address

    @property
    def wrapper(self) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.name)


@dataclass
class Namespaces:
    count: int
    made: list[Namespace] = field(default_factory=list)

    def __enter__(self) -> list[Namespace]:
        if os.geteuid() != 0:
            raise Unavailable("network namespaces need root")
        if shutil.which("ip") is None:
            raise Unavailable("the `ip` command (iproute2) is missing")
        remove_stale_namespaces()
        try:
            base = self._free_prefix()
            for index in range(self.count):
                self.made.append(self._make(index, base))
        except BaseException:
            self.remove()
            raise
        return self.made

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def _make(self, index: int, base: str) -> Namespace:
        pid = os.getpid()
        name = f"{NS_PREFIX}{pid}{'abcdefgh'[index]}"
        veth, inner = f"rkv{pid % 10**7}{index}h", f"rkv{pid % 10**7}{index}n"
        gateway, address = f"{base}.{4 * index + 1}", f"{base}.{4 * index + 2}"
        steps = [
            ("ip", "netns", "add", name),
            ("ip", "link", "add", veth, "type", "veth", "peer", "name", inner),
            ("ip", "link", "set", inner, "netns", name),
            ("ip", "addr", "add", f"{gateway}/30", "dev", veth),
            ("ip", "link", "set", veth, "up"),
            ("ip", "netns", "exec", name, "ip", "addr", "add", f"{address}/30", "dev", inner),
            ("ip", "netns", "exec", name, "ip", "link", "set", inner, "up"),
            ("ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"),
        ]
        namespace = Namespace(name, veth, address, gateway)
        for step in steps:
            done = _run(*step)
            if done.returncode != 0:
                if step[2] == "add" and step[1] == "netns":
                    raise Unavailable(f"cannot create a network namespace: {done.stderr.strip()}")
                self.made.append(namespace)  # half made: removed with the others
                raise Unavailable(f"`{' '.join(step)}` failed: {done.stderr.strip()}")
        return namespace

    @staticmethod
    def _free_prefix() -> str:
        """A 10.x.y.0/24 no interface of this machine uses yet (several test runs may overlap)."""
        used = _run("ip", "-o", "-4", "addr", "show").stdout
        pid = os.getpid()
        for attempt in range(64):
            candidate = f"10.{200 + (pid + attempt) % 50}.{(pid // 50 + attempt) % 256}"
            if f" {candidate}." not in used:
                return candidate
        raise Unavailable("no free private /24 for the test namespaces")

    def remove(self) -> None:
        for namespace in self.made:
            _run("ip", "link", "del", namespace.veth)  # removes both ends of the pair
            _run("ip", "netns", "del", namespace.name)
        self.made.clear()


def remove_stale_namespaces() -> None:
    """Namespaces left by a test process that no longer exists (killed before its cleanup ran)."""
    for line in _run("ip", "netns", "list").stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        digits = name[len(NS_PREFIX) : -1]
        if name.startswith(NS_PREFIX) and digits.isdigit() and not Path(f"/proc/{digits}").exists():
            _run("ip", "netns", "del", name)


# ------------------------------------------------------------------------------------------------
# Boards
# ------------------------------------------------------------------------------------------------


def requests_503(board: Daemon) -> float:
    """How many requests the board has answered with 503 (from its /metrics)."""
    with urllib.request.urlopen(board.url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "rkllama_requests_total" and sample.labels.get("status") == "503"
    )


def kill_board(board: Daemon) -> None:
    """A board that dies at once (power cut, kernel panic): SIGKILL, no last word, then its runner."""
    if board.process is None or board.process.poll() is not None:
        return
    runners = board.runner_pids()
    board.process.kill()
    board.process.wait()
    for pid in runners:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ------------------------------------------------------------------------------------------------
# HAProxy
# ------------------------------------------------------------------------------------------------


def haproxy_config(
    port: int,
    stats_port: int,
    servers: Sequence[tuple[str, str]],
    *,
    solo_servers: Sequence[tuple[str, str]] = (),
    solo_model: str = "",
    check_interval: str = "500ms",
) -> str:
    """The configuration of docs/scale-out.md with short timers (a test, not a home lab)."""
    lines = [
        "global",
        "    maxconn 512",
        "    tune.bufsize 131072",
        "",
        "defaults",
        "    mode http",
        "    timeout connect 2s",
        "    timeout client 120s",
        "    timeout server 120s",
        "    timeout queue 60s",
        "    timeout check 2s",
        "    option http-buffer-request",
        "    retries 2",
        "    option redispatch 1",
        "    retry-on conn-failure empty-response 503",
        "",
        "frontend ollama",
        f"    bind 127.0.0.1:{port}",
        "    http-request set-var(txn.model) req.body,json_query('$.model')",
        "    http-request set-var(txn.first_role) req.body,json_query('$.messages[0].role')",
        "    http-request set-var(txn.first) req.body,json_query('$.messages[0].content')"
        " unless { var(txn.first_role) -m str system }",
        "    http-request set-var(txn.first) req.body,json_query('$.messages[1].content')"
        " if { var(txn.first_role) -m str system }",
        "    http-request set-header X-Session-Id %[var(txn.first),xxh3]"
        " if !{ req.hdr(X-Session-Id) -m found } { var(txn.first) -m found }",
    ]
    if solo_model:
        lines.append(f"    use_backend solo if {{ var(txn.model) -m str {solo_model} {solo_model}:latest }}")
    lines += ["    default_backend boards", ""]

    def backend(name: str, members: Sequence[tuple[str, str]]) -> list[str]:
        return [
            f"backend {name}",
            "    balance leastconn",
            "    option httpchk GET /api/ready",
            "    http-check expect status 200",
            f"    default-server check inter {check_interval} fall 2 rise 1",
            "    stick-table type string len 64 size 10k expire 30m",
            "    stick on req.hdr(X-Session-Id)",
            *(f"    server {server} {address}" for server, address in members),
            "",
        ]

    lines += backend("boards", servers)
    if solo_servers:
        lines += backend("solo", solo_servers)
    lines += [
        "listen stats",
        f"    bind 127.0.0.1:{stats_port}",
        "    stats enable",
        "    stats uri /stats",
        "",
    ]
    return "\n".join(lines)


@dataclass
class Haproxy:
    workdir: Path
    servers: Sequence[tuple[str, str]]
    solo_servers: Sequence[tuple[str, str]] = ()
    solo_model: str = ""
    port: int = 0
    stats_port: int = 0
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> Haproxy:
        binary = haproxy_binary()
        self.port, self.stats_port = free_port(), free_port()
        config = self.workdir / "haproxy.cfg"
        config.write_text(
            haproxy_config(
                self.port,
                self.stats_port,
                self.servers,
                solo_servers=self.solo_servers,
                solo_model=self.solo_model,
            )
        )
        checked = _run(binary, "-c", "-f", str(config))
        if checked.returncode != 0:
            raise RuntimeError(f"haproxy refused the configuration:\n{checked.stdout}{checked.stderr}")
        log = open(self.workdir / "haproxy.log", "wb")  # noqa: SIM115 - kept open for the child
        self.process = subprocess.Popen(
            [binary, "-db", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"haproxy exited:\n{(self.workdir / 'haproxy.log').read_text()}")
            try:
                states = self.server_states()
            except OSError:
                states = {}
            if states and all(state == "UP" for state in states.values()):
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the boards did not all come UP behind haproxy: {states}")

    def stats(self) -> list[dict[str, str]]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.stats_port}/stats;csv", timeout=5) as reply:
            text = reply.read().decode()
        return list(csv.DictReader(io.StringIO(text.lstrip("# "))))

    def server_states(self) -> dict[str, str]:
        """`backend/server` -> UP, DOWN, ... (the state its health checks gave it)."""
        return {
            f"{row['pxname']}/{row['svname']}": row["status"].split()[0]
            for row in self.stats()
            if row["svname"] not in ("FRONTEND", "BACKEND")
        }

    def wait_state(self, server: str, state: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.server_states().get(server) == state:
                return
            time.sleep(0.05)
        raise AssertionError(f"{server} never became {state}: {self.server_states()}")

    def __enter__(self) -> Haproxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
