"""The aiohttp application: routes of every face, error middleware, start-up and shutdown."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from rkllama_ollama.api import wire
from rkllama_ollama.api.context import CONTEXT_KEY, AppContext
from rkllama_ollama.api.ollama import OllamaApi
from rkllama_ollama.config import Settings
from rkllama_ollama.generation import Generator
from rkllama_ollama.models.names import InvalidModelName
from rkllama_ollama.models.store import Store
from rkllama_ollama.scheduler import Scheduler, runner_environment

log = logging.getLogger(__name__)
access_log = logging.getLogger("rkllama_ollama.access")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(
    request: web.Request, status: int, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    if request.path.startswith("/v1/"):
        return wire.openai_error_response(status, message, headers)
    return wire.error_response(status, message, headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except wire.BadRequest as exc:
        status = exc.status
        return _error(request, exc.status, exc.message)
    except InvalidModelName as exc:
        status = 400
        return _error(request, 400, str(exc) or "invalid model name")
    except web.HTTPNotFound:
        status = 404
        return web.Response(status=404, text="404 page not found", content_type="text/plain")
    except web.HTTPMethodNotAllowed:
        status = 405
        return web.Response(status=405, text="405 method not allowed", content_type="text/plain")
    except web.HTTPRequestEntityTooLarge as exc:
        status = 413
        return _error(request, 413, f"request body too large: {exc.text}")
    except web.HTTPException as exc:
        status = exc.status
        return _error(request, exc.status, exc.reason)
    except (asyncio.CancelledError, ConnectionResetError):
        status = 499  # the client went away; nothing more to send
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return _error(request, 500, "internal server error")
    finally:
        access_log.info(
            "%s %s %d %.1fms", request.method, request.path, status, (time.perf_counter() - started) * 1000
        )


def build_context(settings: Settings) -> AppContext:
    store = Store(settings.models_dir, offer_embedded=settings.offer_embedded)
    scheduler = Scheduler(
        keep_alive_s=settings.keep_alive_s,
        max_queue=settings.max_queue,
        runner_env=runner_environment(settings.rkllm_lib, settings.rkllm_version, settings.log_level),
    )
    generator = Generator(
        scheduler, default_num_ctx=settings.default_num_ctx, num_threads=settings.num_threads
    )
    return AppContext(settings=settings, store=store, scheduler=scheduler, generator=generator)


def create_app(settings: Settings, ctx: AppContext | None = None) -> web.Application:
    ctx = ctx or build_context(settings)
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[error_middleware])
    app[CONTEXT_KEY] = ctx
    app.add_routes(OllamaApi(ctx).routes())

    async def on_startup(app: web.Application) -> None:
        ctx.store.hash_pending_in_background()

    async def on_cleanup(app: web.Application) -> None:
        await ctx.scheduler.close()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app
