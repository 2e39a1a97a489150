"""The aiohttp application: routes of every face, error middleware, start-up and shutdown."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from rkllama_ollama.api import wire
from rkllama_ollama.api.context import CONTEXT_KEY, AppContext
from rkllama_ollama.api.metrics import (
    METRICS_KEY,
    Metrics,
    MetricsObserver,
    add_request_id_header,
    observe_middleware,
)
from rkllama_ollama.api.native import NativeApi
from rkllama_ollama.api.ollama import OllamaApi
from rkllama_ollama.api.openai import OpenAiApi
from rkllama_ollama.api.openai_responses import OpenAiResponsesApi
from rkllama_ollama.api.readiness import Readiness
from rkllama_ollama.api.security import install_security, security_middlewares
from rkllama_ollama.api.shutdown import InFlightRequests
from rkllama_ollama.config import Settings
from rkllama_ollama.generation import Generator, KvCacheSettings
from rkllama_ollama.models.names import InvalidModelName
from rkllama_ollama.models.store import Store, kv_cache_root
from rkllama_ollama.models.tokenizer_fetch import TokenizerFetcher
from rkllama_ollama.request_checks import RequestRefused
from rkllama_ollama.runtime.base import InvalidInput, RuntimeFailure
from rkllama_ollama.runtime.runner.process import process_runner_factory
from rkllama_ollama.runtime.runner.protocol import RunnerFactory
from rkllama_ollama.scheduler import QueueFull, Scheduler, runner_environment

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(
    request: web.Request, status: int, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    if request.path.startswith("/v1/"):
        return wire.openai_error_response(status, message, headers)
    return wire.error_response(status, message, headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Exceptions -> error bodies in the face's shape (`/v1` OpenAI's, everything else Ollama's).

    Raised before a response was prepared: once a stream has started, only the face can end it with an
    error line. The request log line is written by api/metrics.observe_middleware."""
    try:
        return await handler(request)
    except wire.BadRequest as exc:
        return _error(request, exc.status, exc.message)
    except RequestRefused as exc:  # request_checks.py: unknown model, a capability it lacks
        return _error(request, exc.status, exc.message)
    except InvalidModelName as exc:
        return _error(request, 400, str(exc) or "invalid model name")
    except QueueFull as exc:
        return _error(request, 503, str(exc), {"Retry-After": "1"})
    except InvalidInput as exc:  # unusable input (too long for the context, ...): the client's to fix
        return _error(request, 400, str(exc))
    except RuntimeFailure as exc:  # before any byte was written; mid-stream failures are the face's
        return _error(request, 500, str(exc))
    except web.HTTPNotFound:
        return web.Response(status=404, text="404 page not found", content_type="text/plain")
    except web.HTTPMethodNotAllowed:
        return web.Response(status=405, text="405 method not allowed", content_type="text/plain")
    except web.HTTPRequestEntityTooLarge as exc:
        return _error(request, 413, f"request body too large: {exc.text}")
    except web.HTTPException as exc:
        return _error(request, exc.status, exc.reason)
    except (asyncio.CancelledError, ConnectionResetError):
        raise  # the client went away; nothing more to send
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return _error(request, 500, "internal server error")


def build_context(settings: Settings, runner_factory: RunnerFactory | None = None) -> AppContext:
    """The server's parts. Runners are child processes unless `runner_factory` says otherwise."""
    store = Store(settings.models_dir, offer_embedded=settings.offer_embedded)
    if runner_factory is None:
        env = runner_environment(settings.rkllm_lib, settings.rkllm_version, settings.log_level)
        runner_factory = process_runner_factory(env)
    scheduler = Scheduler(
        runner_factory=runner_factory,
        keep_alive_s=settings.keep_alive_s,
        max_queue=settings.max_queue,
        max_loaded=settings.max_loaded_models,
    )
    generator = Generator(
        scheduler,
        default_num_ctx=settings.default_num_ctx,
        num_threads=settings.num_threads,
        cpus=settings.cpus,
        kv_cache=KvCacheSettings(
            root=kv_cache_root(settings.models_dir),
            slots=settings.kv_cache_slots,
            ram_mb=settings.kv_cache_ram_mb,
        ),
        num_parallel=settings.num_parallel,
        rkllm_multi_batch=settings.rkllm_multi_batch,
    )
    generator.tokenizers = TokenizerFetcher(store)
    return AppContext(settings=settings, store=store, scheduler=scheduler, generator=generator)


def create_app(settings: Settings, ctx: AppContext | None = None) -> web.Application:
    ctx = ctx or build_context(settings)
    readiness = Readiness(ctx.scheduler)
    metrics = Metrics(ctx.scheduler, in_flight=lambda: readiness.in_flight)
    ctx.generator.observer = MetricsObserver(metrics)
    in_flight = InFlightRequests()
    middlewares = [
        observe_middleware(metrics),  # outermost: sees the final status of every request
        readiness.middleware,  # counts the requests in flight
        error_middleware,
        *security_middlewares(settings),
        in_flight.middleware,  # innermost: a shutdown ends the handler with a last word
    ]
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=middlewares)
    app[CONTEXT_KEY] = ctx
    app[METRICS_KEY] = metrics
    app.add_routes(metrics.routes())
    app.on_response_prepare.append(add_request_id_header)
    install_security(app)
    readiness.install(app)
    in_flight.install(app)
    app.add_routes(OllamaApi(ctx).routes())
    app.add_routes(OpenAiApi(ctx).routes())
    app.add_routes(OpenAiResponsesApi(ctx).routes())
    app.add_routes(NativeApi(ctx).routes())

    async def on_startup(app: web.Application) -> None:
        await asyncio.to_thread(ctx.store.remove_leftovers)  # staging/trash of an interrupted process
        ctx.store.hash_pending_in_background()

    async def on_cleanup(app: web.Application) -> None:
        await ctx.scheduler.close()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app
