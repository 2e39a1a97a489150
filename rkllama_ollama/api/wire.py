"""Wire helpers shared by the HTTP faces: JSON bodies, NDJSON and SSE streams, error bodies, times."""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import orjson
from aiohttp import web

from rkllama_ollama.generation_events import Done, Event
from rkllama_ollama.runtime.base import RuntimeFailure

log = logging.getLogger(__name__)

JSON_UTF8 = "application/json; charset=utf-8"
NDJSON = "application/x-ndjson"
SSE = "text/event-stream"


def dumps(obj: Any) -> bytes:
    return orjson.dumps(obj)


def json_response(
    obj: Any, status: int = 200, *, charset: bool = True, headers: dict[str, str] | None = None
) -> web.Response:
    response = web.Response(body=orjson.dumps(obj), status=status, headers=headers)
    response.headers["Content-Type"] = JSON_UTF8 if charset else "application/json"
    return response


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """Ollama's error body: {"error": "<message>"}."""
    return json_response({"error": message}, status, headers=headers)


def openai_error_type(status: int) -> str:
    if status == 400:
        return "invalid_request_error"
    if status == 404:
        return "not_found_error"
    return "api_error"


def openai_error_body(message: str, status: int = 500) -> dict[str, Any]:
    """OpenAI's error envelope (also the last event of an SSE stream that failed midway)."""
    return {"error": {"message": message, "type": openai_error_type(status), "param": None, "code": None}}


def openai_error_response(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return json_response(openai_error_body(message, status), status, charset=False, headers=headers)


def empty_response(status: int = 200) -> web.Response:
    return web.Response(status=status)


class _UtcClock:
    """`created_at` for now, as cheaply as possible: it is stamped on every streamed chunk.

    The text up to the seconds changes once a second, so it is formatted once a second."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def now(self) -> str:
        return self.at(time.time_ns())

    def at(self, unix_ns: int) -> str:
        second, micro = divmod(unix_ns // 1000, 1_000_000)
        if second != self._second:
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        if micro:
            return f"{self._prefix}.{micro:06d}".rstrip("0") + "Z"
        return self._prefix + "Z"


_utc_clock = _UtcClock()


def rfc3339_utc() -> str:
    """`created_at` now: UTC with Z, microseconds with trailing zeros trimmed (Go's marshaller shape)."""
    return _utc_clock.now()


def rfc3339_local(moment: dt.datetime) -> str:
    """`modified_at` / `expires_at`: local time with an explicit offset."""
    if moment.tzinfo is None:
        moment = moment.astimezone()
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if moment.microsecond:
        text += f".{moment.microsecond:06d}".rstrip("0")
    offset = moment.strftime("%z")
    return text + (offset[:3] + ":" + offset[3:] if offset else "Z")


class JsonStream:
    """A streamed response of JSON objects written as events arrive (no buffering, no compression).

    Each object is framed as `prefix + json + suffix`; `trailer` is written once at the end. The headers
    go out with the first object, so a handler can still answer with a plain error until then.
    """

    def __init__(
        self,
        request: web.Request,
        content_type: str,
        *,
        prefix: bytes = b"",
        suffix: bytes = b"\n",
        trailer: bytes = b"",
        headers: dict[str, str] | None = None,
    ) -> None:
        self._request = request
        self._prefix = prefix
        self._suffix = suffix
        self._trailer = trailer
        # X-Accel-Buffering: a reverse proxy in front (nginx and the like) must pass each piece on
        # as it comes instead of buffering the response.
        self.response = web.StreamResponse(
            status=200,
            headers={"Content-Type": content_type, "X-Accel-Buffering": "no", **(headers or {})},
        )

    async def _start(self) -> None:
        if not self.response.prepared:
            await self.response.prepare(self._request)

    async def send(self, obj: Any) -> None:
        await self._start()
        await self.response.write(self._prefix + orjson.dumps(obj) + self._suffix)

    async def finish(self) -> web.StreamResponse:
        await self._start()
        if self._trailer:
            await self.response.write(self._trailer)
        await self.response.write_eof()
        return self.response


async def relay_events(
    out: JsonStream,
    first: Event,
    events: AsyncIterator[Event],
    frames: Callable[[Event], Iterable[Any]],
    error: Callable[[str], Any],
    model: str,
) -> web.StreamResponse:
    """Write a run's events (from its `first_event`) as they come: each event becomes the `frames` the
    face makes of it, the stream ends after Done; a failure mid-stream becomes the face's `error` object."""
    try:
        event: Event | None = first
        while event is not None:
            for frame in frames(event):
                await out.send(frame)
            if isinstance(event, Done):
                break
            event = await anext(events, None)
    except RuntimeFailure as exc:
        log.warning("generation failed mid-stream model=%s: %s", model, exc)
        await out.send(error(str(exc)))
    return await out.finish()


def ndjson_stream(request: web.Request) -> JsonStream:
    """Ollama's `/api/*` stream: one compact object per line, never a blank line."""
    return JsonStream(request, NDJSON)


def sse_stream(request: web.Request) -> JsonStream:
    """OpenAI's `/v1/*` stream: `data: <json>` events, ending with `data: [DONE]`."""
    return JsonStream(
        request,
        SSE,
        prefix=b"data: ",
        suffix=b"\n\n",
        trailer=b"data: [DONE]\n\n",
        headers={"Cache-Control": "no-cache"},
    )


class BadRequest(Exception):
    """A request body that cannot be served; `status` and `message` go to the client."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


async def read_json_body(request: web.Request, *, allow_empty: bool = False) -> dict[str, Any]:
    """Read a JSON object body. Empty -> 400 `missing request body`; `null` -> {}; non-object -> 400."""
    raw = await request.read()
    if not raw.strip():
        if allow_empty:
            return {}
        raise BadRequest("missing request body")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"invalid JSON in request body: {exc}") from None
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise BadRequest(f"request body must be a JSON object, not {type(body).__name__}")
    return body


def field_of(body: dict[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    """Optional typed field: None when absent or null, 400 naming the field when of the wrong type."""
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise BadRequest(f'"{key}" must be {what}')
    if not isinstance(value, kind):
        raise BadRequest(f'"{key}" must be {what}')
    return value
