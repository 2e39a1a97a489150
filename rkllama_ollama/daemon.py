"""Run the server process: bind, serve until a signal, shut down cleanly."""

from __future__ import annotations

import logging

from aiohttp import web

from rkllama_ollama import __version__
from rkllama_ollama.api.app import create_app
from rkllama_ollama.config import Settings

log = logging.getLogger(__name__)


def run_daemon(settings: Settings) -> int:
    settings.models_dir.mkdir(parents=True, exist_ok=True)
    app = create_app(settings)
    log.info(
        "rkllama-ollama %s listening on %s:%d, models in %s",
        __version__,
        settings.host,
        settings.port,
        settings.models_dir,
    )
    web.run_app(
        app,
        host=settings.host,
        port=settings.port,
        print=None,
        access_log=None,
        handler_cancellation=True,
        shutdown_timeout=3.0,
    )
    return 0
