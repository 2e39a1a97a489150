"""The daemon's HTTP server in the test process: a real aiohttp server on a free port, served by an
event loop in a thread, with runners that host their model in-process (inprocess_runner.py).

It has the live Daemon's interface (url, request, open_stream, log, ended_generations), so a test
written against one runs against the other. What it leaves out is the process: the `serve` command,
signals and shutdown, child runner processes (crashes, kills, pinning, native output), systemd.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import count

from aiohttp import web

from rkllama_ollama.api.app import build_context, create_app
from rkllama_ollama.config import Settings, settings_from_env
from tests.support.daemon import Daemon, free_port
from tests.support.inprocess_runner import inprocess_runner_factory

_serial = count(1)
_level_lock = threading.Lock()
_level_holders: list[int] = [0, logging.NOTSET]  # daemons keeping a log, the package logger's own level
# What only a process can be given: the runner's native library, the Hugging Face hub's settings, core
# pinning. The in-process daemon refuses them rather than silently run without (use a live Daemon).
PROCESS_ONLY = ("RKLLAMA_RKLLM_LIB", "RKLLAMA_RKLLM_VERSION", "RKLLAMA_CPUS", "HF_")
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


def _hold_info_level() -> None:
    """The package logs at INFO while some in-process daemon keeps its log (then back as it was: a test
    that counts records with caplog must not see another test's daemon's level)."""
    package = logging.getLogger("rkllama_ollama")
    with _level_lock:
        if _level_holders[0] == 0:
            _level_holders[1] = package.level
            if package.getEffectiveLevel() > logging.INFO:
                package.setLevel(logging.INFO)
        _level_holders[0] += 1


def _release_info_level() -> None:
    with _level_lock:
        _level_holders[0] -= 1
        if _level_holders[0] == 0:
            logging.getLogger("rkllama_ollama").setLevel(_level_holders[1])


class _ThreadLog(logging.Handler):
    """The log lines of one in-process daemon: records from the threads whose names start with `prefix`."""

    def __init__(self, prefix: str) -> None:
        super().__init__(logging.INFO)
        self.prefix = prefix
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter(LOG_FORMAT))

    def emit(self, record: logging.LogRecord) -> None:
        if record.threadName and record.threadName.startswith(self.prefix):
            self.lines.append(self.format(record))


@dataclass
class InProcessDaemon(Daemon):
    """`keep_log=False` for a long-lived daemon whose log no test reads: the package's log level is then
    left alone (keeping a log raises it to INFO while the daemon runs)."""

    keep_log: bool = True
    settings: Settings | None = None
    _loop: asyncio.AbstractEventLoop | None = field(default=None, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)
    _app_runner: web.AppRunner | None = field(default=None, repr=False)
    _log: _ThreadLog | None = field(default=None, repr=False)

    def start(self, timeout: float = 30.0) -> InProcessDaemon:
        refused = sorted(key for key in self.env if key.startswith(PROCESS_ONLY))
        if refused:
            raise ValueError(f"an in-process daemon cannot honour {refused}: use a live Daemon")
        self.port = self.port or free_port()
        env = {**os.environ, "RKLLAMA_EMBEDDED_MODEL": "0", **self.env}
        env.pop("OLLAMA_HOST", None)
        env["RKLLAMA_HOST"] = f"{self.host}:{self.port}"
        env["RKLLAMA_MODELS"] = str(self.models_dir)
        self.settings = settings_from_env(env)
        self.models_dir.mkdir(parents=True, exist_ok=True)
        prefix = f"inproc{next(_serial)}-{self.name or self.port}"
        self._log = _ThreadLog(prefix)
        if self.keep_log:
            logging.getLogger("rkllama_ollama").addHandler(self._log)
            _hold_info_level()
        loop = self._loop = asyncio.new_event_loop()
        loop.set_default_executor(ThreadPoolExecutor(thread_name_prefix=f"{prefix}-worker"))
        self._thread = threading.Thread(target=loop.run_forever, name=f"{prefix}-loop", daemon=True)
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._serve(self.settings, prefix), loop).result(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    async def _serve(self, settings: Settings, prefix: str) -> None:
        factory = inprocess_runner_factory(f"{prefix}-runner")
        app = create_app(settings, build_context(settings, runner_factory=factory))
        runner = self._app_runner = web.AppRunner(
            app, handle_signals=False, access_log=None, handler_cancellation=True, shutdown_timeout=1.0
        )
        await runner.setup()
        await web.TCPSite(runner, settings.host, settings.port).start()

    def log(self) -> str:
        if not self.keep_log:
            raise RuntimeError("this in-process daemon keeps no log: start it with keep_log=True")
        return "\n".join(self._log.lines) if self._log is not None else ""

    def runner_pids(self) -> list[int]:
        """The runners alive: here threads of this process, by native thread id."""
        prefix = f"{self._log.prefix}-runner" if self._log is not None else None
        return [
            thread.native_id
            for thread in threading.enumerate()
            if thread.name == prefix and thread.is_alive() and thread.native_id is not None
        ]

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self._loop = self._thread = None
        if self._app_runner is not None:
            try:
                asyncio.run_coroutine_threadsafe(self._app_runner.cleanup(), loop).result(30)
            finally:
                self._app_runner = None
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()
        if self._log is not None and self.keep_log:
            logging.getLogger("rkllama_ollama").removeHandler(self._log)
            _release_info_level()

    def __enter__(self) -> InProcessDaemon:
        return self
