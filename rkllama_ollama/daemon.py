"""Run the server process: bind, tell systemd, serve until a signal, shut down within a few seconds.

Start: the socket is bound first, then systemd hears READY=1 (Type=notify), then WATCHDOG=1 every half
WatchdogSec while the event loop is alive.
Stop (SIGTERM or SIGINT): STOPPING=1; the listening socket closes; in-flight requests end with an
`{"error": "server is shutting down"}` line (api/shutdown.py); the runner process exits, which returns
the model's NPU memory. Whatever is still running after SHUTDOWN_DEADLINE_S is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import replace

from aiohttp import web

from rkllama_ollama import __version__
from rkllama_ollama.api.app import create_app
from rkllama_ollama.api.context import CONTEXT_KEY
from rkllama_ollama.config import Settings
from rkllama_ollama.notify import Notifier
from rkllama_ollama.runtime.base import RKLLM_MAX_BATCH

log = logging.getLogger(__name__)

CONNECTION_GRACE_S = 1.0  # aiohttp: how long to wait for connections after in-flight requests ended
SHUTDOWN_DEADLINE_S = 4.0  # all of shutdown; the runner is killed after it (the goal is exit in <= 5 s)


def run_daemon(settings: Settings) -> int:
    settings.models_dir.mkdir(parents=True, exist_ok=True)
    return asyncio.run(serve(settings))


async def serve(settings: Settings, notifier: Notifier | None = None) -> int:
    notifier = notifier or Notifier()
    settings = _checked_multi_batch(settings)
    app = create_app(settings)
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log=None,
        handler_cancellation=True,
        shutdown_timeout=CONNECTION_GRACE_S,
    )
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    try:
        await site.start()
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", settings.host, settings.port, exc.strerror or exc)
        await runner.cleanup()
        return 1
    log.info(
        "rkllama-ollama %s listening on %s:%d, models in %s",
        __version__,
        settings.host,
        settings.port,
        settings.models_dir,
    )
    if settings.rkllm_multi_batch:
        log.warning(
            "RKLLM multi-batch is on (experimental, unproven on a board): .rkllm models on runtime 1.2.1+ "
            "serve up to %d requests per run%s",
            min(settings.num_parallel, RKLLM_MAX_BATCH),
            "; RKLLAMA_NUM_PARALLEL is 1, so it has no effect" if settings.num_parallel < 2 else "",
        )
    notifier.ready(f"listening on {settings.host}:{settings.port}")

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, _on_signal, signum, stop)
    watchdog = _start_watchdog(notifier)
    try:
        await stop.wait()
    finally:
        notifier.stopping("shutting down")
        if watchdog is not None:
            watchdog.cancel()
        await _shut_down(runner, app)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    log.info("rkllama-ollama stopped")
    return 0


def _on_signal(signum: int, stop: asyncio.Event) -> None:
    if stop.is_set():
        log.info("received %s again; still shutting down", signal.Signals(signum).name)
        return
    log.info("received %s: shutting down", signal.Signals(signum).name)
    stop.set()


def _start_watchdog(notifier: Notifier) -> asyncio.Task[None] | None:
    interval = notifier.watchdog_interval_s
    if interval is None:
        return None
    log.info("systemd watchdog: pinging every %.1fs", interval)

    async def ping() -> None:
        while True:
            notifier.watchdog()
            await asyncio.sleep(interval)

    return asyncio.get_running_loop().create_task(ping(), name="systemd-watchdog")


async def _shut_down(runner: web.AppRunner, app: web.Application) -> None:
    """Close the socket, end requests, stop the runner; kill the runner if that takes too long."""
    loaded = app[CONTEXT_KEY].scheduler.loaded_models  # the scheduler forgets them as it starts stopping them
    try:
        await asyncio.wait_for(runner.cleanup(), SHUTDOWN_DEADLINE_S)
    except TimeoutError:
        log.warning("shutdown took longer than %.1fs; killing the runner", SHUTDOWN_DEADLINE_S)
    finally:
        for model in loaded:
            if model.runner.alive:
                with contextlib.suppress(ProcessLookupError):
                    model.runner.kill()


def _checked_multi_batch(settings: Settings) -> Settings:
    """RKLLAMA_RKLLM_MULTI_BATCH on a runtime without multi-batch (before 1.2.1) is switched off here, so
    that loads ask for one sequence and the memory estimate counts one KV cache. When the library's
    version cannot be told without loading it, the runner decides at load (and logs why it serves one
    request at a time)."""
    if not settings.rkllm_multi_batch:
        return settings
    from rkllama_ollama.runtime.rkllm.library import has_multi_batch, version_without_loading

    found = version_without_loading()
    if found is None or has_multi_batch(found[1]) is not False:
        return settings
    path, version = found
    log.warning(
        "RKLLAMA_RKLLM_MULTI_BATCH is ignored: the RKLLM runtime %s is %s and multi-batch needs 1.2.1 or "
        "later; .rkllm models serve one request at a time",
        path,
        version,
    )
    return replace(settings, rkllm_multi_batch=False)
