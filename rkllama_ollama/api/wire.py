"""Wire helpers shared by the HTTP faces: JSON bodies, NDJSON and SSE streams, error bodies, times."""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

import orjson
from aiohttp import web

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


def openai_error_response(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": {"message": message, "type": openai_error_type(status), "param": None, "code": None}}
    return json_response(body, status, charset=False, headers=headers)


def empty_response(status: int = 200) -> web.Response:
    return web.Response(status=status)


def rfc3339_utc(moment: dt.datetime | None = None) -> str:
    """`created_at`: UTC with Z, microseconds with trailing zeros trimmed (Go's marshaller shape)."""
    moment = (moment or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if moment.microsecond:
        text += f".{moment.microsecond:06d}".rstrip("0")
    return text + "Z"


def rfc3339_local(moment: dt.datetime) -> str:
    """`modified_at` / `expires_at`: local time with an explicit offset."""
    if moment.tzinfo is None:
        moment = moment.astimezone()
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if moment.microsecond:
        text += f".{moment.microsecond:06d}".rstrip("0")
    offset = moment.strftime("%z")
    return text + (offset[:3] + ":" + offset[3:] if offset else "Z")


class NdjsonStream:
    """An NDJSON response written line by line as events arrive. No blank lines, no compression."""

    def __init__(self, request: web.Request, status: int = 200) -> None:
        self._request = request
        self.response = web.StreamResponse(status=status, headers={"Content-Type": NDJSON})
        self.started = False

    async def start(self) -> None:
        if not self.started:
            self.started = True
            await self.response.prepare(self._request)

    async def send(self, obj: Any) -> None:
        if not self.started:
            await self.start()
        await self.response.write(orjson.dumps(obj) + b"\n")

    async def finish(self) -> web.StreamResponse:
        if not self.started:
            await self.start()
        await self.response.write_eof()
        return self.response


class SseStream:
    """A Server-Sent Events response (`data: <json>\\n\\n`, ending with `data: [DONE]`)."""

    def __init__(self, request: web.Request) -> None:
        self._request = request
        self.response = web.StreamResponse(
            status=200, headers={"Content-Type": SSE, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        self.started = False

    async def start(self) -> None:
        if not self.started:
            self.started = True
            await self.response.prepare(self._request)

    async def send(self, obj: Any) -> None:
        if not self.started:
            await self.start()
        await self.response.write(b"data: " + orjson.dumps(obj) + b"\n\n")

    async def finish(self) -> web.StreamResponse:
        if not self.started:
            await self.start()
        await self.response.write(b"data: [DONE]\n\n")
        await self.response.write_eof()
        return self.response


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
