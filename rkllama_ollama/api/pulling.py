"""The pull endpoints' wire format (Ollama's `/api/pull` and the seed's `POST /pull` share it).

Streaming: one NDJSON progress object per event, ending with ``{"status":"success"}``; a failure after
the stream started is an ``{"error": ...}`` line. A malformed name is a 400 before any byte.
``stream:false``: one object at the end, the last progress (``{"status":"success"}``) or the error with
its status. A client that goes away cancels its pull (unless another client waits on the same one).
"""

from __future__ import annotations

import logging
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

from aiohttp import web

from rkllama_ollama.api import wire
from rkllama_ollama.models.store import Store

if TYPE_CHECKING:
    from rkllama_ollama.models.pull import PullProgress

log = logging.getLogger(__name__)


def pull_request_fields(body: dict[str, Any]) -> tuple[str, bool]:
    """(`model` or legacy `name`, stream flag); stream defaults to true."""
    name = body.get("model") or body.get("name") or ""
    if not isinstance(name, str) or not name.strip():
        raise wire.BadRequest("invalid model name")
    stream = body.get("stream", True)
    return name, stream is not False


async def respond_pull(request: web.Request, store: Store, name: str, stream: bool) -> web.StreamResponse:
    # Imported on the first pull: huggingface_hub's HTTP stack costs the idle daemon ~150 ms and ~10 MiB.
    from rkllama_ollama.models.pull import PullError, puller_for

    async with aclosing(puller_for(store).pull(name)) as events:
        try:
            first = await anext(events)
        except PullError as exc:
            return wire.error_response(exc.status, str(exc))
        if not stream:
            last: PullProgress = first
            try:
                async for event in events:
                    last = event
            except PullError as exc:
                return wire.error_response(exc.status, str(exc))
            # Like Ollama (and /api/create): a collapsed progress stream is `application/json`, no charset.
            return wire.json_response(last.to_json(), charset=False)
        out = wire.ndjson_stream(request)
        try:
            await out.send(first.to_json())
            async for event in events:
                await out.send(event.to_json())
        except PullError as exc:
            await out.send({"error": str(exc)})
        return await out.finish()
