"""Observability: `GET /metrics` (Prometheus text format) and one log line per request.

- `observe_middleware` (outermost) gives each request an id (`X-Request-Id`, echoed back), counts it by
  route and status, and writes one `rkllama_ollama.access` line when it ends: id, method, path, status,
  model, prompt and generated tokens, time to first token, tokens per second, duration. Prompts are
  never logged.
- `MetricsObserver` is the Generator's observer: it feeds the token counters and latency histograms,
  and fills the current request's record (found through a context variable set by the middleware).
- Queue depth, the queue limit, whether the session is in use, the loaded model and the requests in
  flight (api/readiness counts them) are read at scrape time.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from aiohttp import typedefs, web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from rkllama_ollama.runtime.base import Engine, GenerationStats
from rkllama_ollama.scheduler import Scheduler

log = logging.getLogger(__name__)
access_log = logging.getLogger("rkllama_ollama.access")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

REQUEST_ID_HEADER = "X-Request-Id"
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
INTER_TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0)
LOAD_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
DURATION_BUCKETS = (0.005, 0.025, 0.1, 0.25, 1.0, 2.5, 10.0, 30.0, 60.0, 300.0)


@dataclass
class RequestRecord:
    """What the request log line says about one request."""

    id: str
    model: str = ""
    prompt_tokens: int | None = None
    generated_tokens: int | None = None
    eval_ns: int = 0
    ttft_ns: int | None = None

    @property
    def tokens_per_second(self) -> float | None:
        if not self.generated_tokens or not self.eval_ns:
            return None
        return self.generated_tokens / (self.eval_ns / 1e9)

    def log_fields(self) -> str:
        parts = []
        if self.model:
            parts.append(f"model={self.model}")
        if self.prompt_tokens is not None:
            parts.append(f"prompt_tokens={self.prompt_tokens}")
        if self.generated_tokens is not None:
            parts.append(f"tokens={self.generated_tokens}")
        if self.ttft_ns is not None:
            parts.append(f"ttft={self.ttft_ns / 1e9:.3f}s")
        rate = self.tokens_per_second
        if rate is not None:
            parts.append(f"tok/s={rate:.1f}")
        return " ".join(parts)


_current_record: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar(
    "rkllama_request_record", default=None
)
RECORD_KEY = web.RequestKey("request_record", RequestRecord)


def current_record() -> RequestRecord | None:
    return _current_record.get()


class _SchedulerCollector(Collector):
    """Gauges read from the scheduler (and the in-flight count) when Prometheus scrapes."""

    def __init__(self, scheduler: Scheduler, in_flight: Callable[[], int] | None) -> None:
        self._scheduler = scheduler
        self._in_flight = in_flight

    def describe(self) -> list[Metric]:
        return list(self._gauges(0, 0, 0, 0)) + [self._loaded([])]

    def collect(self) -> Iterator[Metric]:
        scheduler = self._scheduler
        in_flight = self._in_flight() if self._in_flight is not None else 0
        yield from self._gauges(scheduler.queue_depth, scheduler.max_queue, int(scheduler.busy), in_flight)
        yield self._loaded([(m.entry.name.display, m.spec.engine) for m in scheduler.loaded_models])

    def _gauges(self, queue: int, max_queue: int, busy: int, in_flight: int) -> Iterator[Metric]:
        yield self._queue_depth(queue)
        yield GaugeMetricFamily(
            "rkllama_queue_limit",
            "Requests allowed to wait; more get 503 (RKLLAMA_MAX_QUEUE).",
            value=max_queue,
        )
        yield GaugeMetricFamily(
            "rkllama_session_busy", "1 while a request (or a load) holds the model session.", value=busy
        )
        if self._in_flight is not None:
            yield GaugeMetricFamily(
                "rkllama_in_flight_requests",
                "HTTP requests being served now (health probes and scrapes excluded).",
                value=in_flight,
            )

    @staticmethod
    def _queue_depth(value: int) -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "rkllama_queue_depth", "Requests waiting for the model session.", value=value
        )

    @staticmethod
    def _loaded(models: list[tuple[str, str]]) -> GaugeMetricFamily:
        family = GaugeMetricFamily(
            "rkllama_loaded_model",
            "The models loaded in runners (1 while loaded).",
            labels=["model", "engine"],
        )
        for model, engine in models:
            family.add_metric([model, engine], 1)
        return family


class Metrics:
    """One registry per application, so several apps (tests) never share counters."""

    def __init__(self, scheduler: Scheduler, in_flight: Callable[[], int] | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "rkllama_requests",
            "HTTP requests by route, method and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "rkllama_request_duration_seconds",
            "Time from request to the end of the response.",
            ["route"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.generations = Counter(
            "rkllama_generations", "Generations that ran to the end, by model.", ["model"], registry=r
        )
        self.prompt_tokens = Counter(
            "rkllama_prompt_tokens",
            "Prompt tokens fed to the model (after KV-cache reuse).",
            ["model"],
            registry=r,
        )
        self.generated_tokens = Counter(
            "rkllama_generated_tokens", "Tokens generated.", ["model"], registry=r
        )
        self.ttft = Histogram(
            "rkllama_time_to_first_token_seconds",
            "From the request reaching the generator (queue and load included) to the first output.",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.inter_token = Histogram(
            "rkllama_inter_token_latency_seconds",
            "Time between consecutive output pieces.",
            ["model"],
            buckets=INTER_TOKEN_BUCKETS,
            registry=r,
        )
        self.model_load = Histogram(
            "rkllama_model_load_seconds",
            "Time to load (or re-initialise) a model.",
            ["model", "engine"],
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        r.register(_SchedulerCollector(scheduler, in_flight))
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    async def handle_metrics(self, request: web.Request) -> web.Response:
        response = web.Response(body=self.exposition())
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    def routes(self) -> list[web.AbstractRouteDef]:
        return [web.get("/metrics", self.handle_metrics)]


class MetricsObserver:
    """The Generator's observer (see generation.GenerationObserver)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._engine_of: dict[str, str] = {}
        self._inter_token: dict[str, Any] = {}  # model -> its histogram child (observed every token)

    def generation_started(self, model: str) -> None:
        record = current_record()
        if record is not None:
            record.model = model

    def model_loaded(self, model: str, engine: str, load_ns: int) -> None:
        self._engine_of[model] = engine
        self._metrics.model_load.labels(model, engine).observe(load_ns / 1e9)

    def first_piece(self, model: str, ttft_ns: int) -> None:
        self._metrics.ttft.labels(model).observe(ttft_ns / 1e9)
        record = current_record()
        if record is not None:
            record.ttft_ns = ttft_ns

    def next_piece(self, model: str, gap_ns: int) -> None:
        child = self._inter_token.get(model)
        if child is None:
            child = self._inter_token[model] = self._metrics.inter_token.labels(model)
        child.observe(gap_ns / 1e9)

    def generation_finished(self, model: str, stats: GenerationStats) -> None:
        m = self._metrics
        m.generations.labels(model).inc()
        m.prompt_tokens.labels(model).inc(stats.prompt_eval_count)
        m.generated_tokens.labels(model).inc(stats.eval_count)
        if stats.reload_ns:
            m.model_load.labels(model, self._engine_of.get(model, Engine.RKLLM)).observe(
                stats.reload_ns / 1e9
            )
        record = current_record()
        if record is not None:
            record.model = model
            record.prompt_tokens = (record.prompt_tokens or 0) + stats.prompt_eval_count
            record.generated_tokens = (record.generated_tokens or 0) + stats.eval_count
            record.eval_ns += stats.eval_ns


def route_label(request: web.Request) -> str:
    """The route pattern (`/api/chat`), never the raw path, so unknown paths cannot explode the labels."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def request_id_of(request: web.Request) -> str:
    sent = request.headers.get(REQUEST_ID_HEADER, "")
    return sent if _CLIENT_REQUEST_ID.fullmatch(sent) else uuid.uuid4().hex[:16]


def observe_middleware(metrics: Metrics) -> typedefs.Middleware:
    @web.middleware
    async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        record = RequestRecord(id=request_id_of(request))
        request[RECORD_KEY] = record
        token = _current_record.set(record)
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except (asyncio.CancelledError, ConnectionResetError):
            status = 499  # the client went away: nothing was answered
            raise
        finally:
            _current_record.reset(token)
            elapsed = time.perf_counter() - started
            route = route_label(request)
            metrics.requests.labels(route, request.method, str(status)).inc()
            metrics.request_duration.labels(route).observe(elapsed)
            fields = record.log_fields()
            access_log.info(
                "id=%s %s %s %d%s took=%.3fs",
                record.id,
                request.method,
                request.path,
                status,
                f" {fields}" if fields else "",
                elapsed,
            )

    return observe


async def add_request_id_header(request: web.Request, response: web.StreamResponse) -> None:
    record = request.get(RECORD_KEY)
    if record is not None:
        response.headers[REQUEST_ID_HEADER] = record.id


METRICS_KEY = web.AppKey("metrics", Metrics)
