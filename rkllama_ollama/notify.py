"""systemd's notify protocol (sd_notify(3)): one datagram of `KEY=value` lines to $NOTIFY_SOCKET.

A path starting with `@` names a socket in the abstract namespace. Without NOTIFY_SOCKET (not started
by systemd with Type=notify) every call is a no-op, so the daemon can always call it.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self._address = _socket_address(env.get("NOTIFY_SOCKET", ""))
        self._watchdog_s = _watchdog_interval(env)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to send WATCHDOG=1 (half of WatchdogSec), or None when no watchdog is armed."""
        return self._watchdog_s if self.enabled else None

    def send(self, *assignments: str) -> bool:
        """Send `KEY=value` lines in one datagram; False (and one log line) if it could not be sent."""
        if self._address is None:
            return False
        message = "\n".join(assignments).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self._address)
                sock.sendall(message)
        except OSError as exc:
            log.warning("sd_notify %s failed: %s", assignments[0] if assignments else "", exc)
            return False
        return True

    def ready(self, status: str = "") -> bool:
        lines = ["READY=1", f"MAINPID={os.getpid()}"]
        return self.send(*lines, *([f"STATUS={status}"] if status else []))

    def stopping(self, status: str = "") -> bool:
        return self.send("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")


def _socket_address(path: str) -> str | bytes | None:
    if not path:
        return None
    if path.startswith("@"):
        return b"\0" + path[1:].encode()  # abstract namespace
    if path.startswith("/"):
        return path
    log.warning("ignoring NOTIFY_SOCKET=%r: neither a path nor an abstract socket name", path)
    return None


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Half of WATCHDOG_USEC, when it is set for this process (WATCHDOG_PID absent or ours)."""
    raw_usec = env.get("WATCHDOG_USEC", "").strip()
    raw_pid = env.get("WATCHDOG_PID", "").strip()
    if not raw_usec:
        return None
    try:
        usec = int(raw_usec)
        if raw_pid and int(raw_pid) != os.getpid():
            return None
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r / WATCHDOG_PID=%r: not integers", raw_usec, raw_pid)
        return None
    return usec / 2_000_000 if usec > 0 else None
