"""The native API of the original RKLLama server (the seed), as its CLI and exo-rkllama use it.

`GET /models`, `POST /load_model`, `POST /unload_model`, `GET /current_model`, `POST /generate` and
`DELETE /rm` (`GET /` is answered by the Ollama face; `POST /pull` by the pull code). A model's native
name is its folder name in the store, as in the seed. `/generate` streams one JSON object per event,
each followed by a blank line, in the seed's shape (`token`, `thinking`, then `finish` with
`tokens_per_second`) plus the `choices` list exo-rkllama reads. Unknown request fields are ignored.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from aiohttp import web

from rkllama_ollama.api import wire
from rkllama_ollama.api.context import AppContext
from rkllama_ollama.api.ollama import checked_messages, parse_messages
from rkllama_ollama.api.pulling import pull_request_fields, respond_pull
from rkllama_ollama.api.wire import BadRequest, field_of
from rkllama_ollama.generation_events import Content, Done, Event, Thinking, collect_answer, first_event
from rkllama_ollama.generation_plan import GenerationRequest
from rkllama_ollama.model_admin import delete_model
from rkllama_ollama.models.store import ModelEntry, ModelNotFound, StoreError
from rkllama_ollama.request_checks import RequestChecks
from rkllama_ollama.runtime.base import RuntimeFailure

log = logging.getLogger(__name__)

STREAM_CONTENT_TYPE = "application/json"  # the seed streams JSON objects separated by blank lines
LOAD_KEEP_ALIVE_S = -1.0  # the seed keeps a loaded model until /unload_model


def native_name(entry: ModelEntry) -> str:
    """The seed names a model by its folder; the packaged default has none of its own."""
    return entry.name.display if entry.embedded else entry.folder.name


def tokens_per_second(done: Done) -> float:
    stats = done.stats
    return round(stats.eval_count / (stats.eval_ns / 1e9), 2) if stats.eval_ns > 0 else 0.0


def choice(content: str, finish_reason: str | None) -> list[dict[str, Any]]:
    return [{"role": "assistant", "content": content, "finish_reason": finish_reason}]


class NativeApi:
    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx
        self.checks = RequestChecks(ctx.store, folder_names=True)

    def routes(self) -> list[web.AbstractRouteDef]:
        return [
            web.get("/models", self.models),
            web.post("/load_model", self.load_model),
            web.post("/unload_model", self.unload_model),
            web.get("/current_model", self.current_model),
            web.post("/generate", self.generate),
            web.delete("/rm", self.remove),
            web.post("/pull", self.pull),
        ]

    # -- models ---------------------------------------------------------------------------------

    async def resolve(self, name: str) -> ModelEntry:
        return await self.checks.resolve(name)

    @staticmethod
    def _name_field(body: dict[str, Any], *keys: str) -> str:
        for key in keys:
            value = field_of(body, key, str, "a string")
            if value:
                return value
        return ""

    async def models(self, request: web.Request) -> web.Response:
        entries = await asyncio.to_thread(self.ctx.store.list)
        return wire.json_response({"models": [native_name(entry) for entry in entries]})

    async def load_model(self, request: web.Request) -> web.Response:
        body = await wire.read_json_body(request, allow_empty=True)
        name = self._name_field(body, "model_name", "model", "name")
        if not name:
            raise BadRequest('"model_name" is required')
        entry = await self.resolve(name)
        try:
            await self.ctx.generator.load(entry, {}, LOAD_KEEP_ALIVE_S)
        except RuntimeFailure as exc:
            raise RuntimeFailure(f"failed to load model '{name}': {exc}") from exc
        return wire.json_response(
            {"status": "loaded", "model_name": native_name(entry), "message": f"Model {name} loaded"}
        )

    async def unload_model(self, request: web.Request) -> web.Response:
        # The seed knows one loaded model; with several resident, "the model" is all of them.
        models = self.ctx.scheduler.loaded_models
        if not models:
            return wire.json_response({"status": "not loaded", "message": "No model is loaded"})
        name = native_name(models[0].entry)
        for loaded in models:
            await self.ctx.scheduler.unload(loaded.entry)
        return wire.json_response(
            {"status": "unloaded", "model_name": name, "message": f"Model {name} unloaded"}
        )

    async def current_model(self, request: web.Request) -> web.Response:
        loaded = self.ctx.scheduler.loaded
        if loaded is None:
            return wire.error_response(404, "no model is currently loaded")
        return wire.json_response({"model_name": native_name(loaded.entry)})

    async def pull(self, request: web.Request) -> web.StreamResponse:
        """The seed's pull (``{"model": "<org>/<repo>/<file>.rkllm"}``), answered with Ollama's progress."""
        name, stream = pull_request_fields(await wire.read_json_body(request, allow_empty=True))
        return await respond_pull(request, self.ctx.store, name, stream)

    async def remove(self, request: web.Request) -> web.Response:
        body = await wire.read_json_body(request, allow_empty=True)
        name = self._name_field(body, "model", "model_name", "name")
        if not name:
            raise BadRequest('"model" is required')
        entry = await self.resolve(name)
        try:
            await delete_model(self.ctx.store, self.ctx.scheduler, entry.name.display)
        except ModelNotFound:
            return wire.error_response(404, f"model '{name}' not found")
        except StoreError as exc:
            return wire.error_response(500, str(exc))
        return wire.json_response({"message": f"Model {name} deleted"})

    # -- generation -----------------------------------------------------------------------------

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await wire.read_json_body(request)
        messages = parse_messages(body)
        if not messages:
            raise BadRequest('"messages" must hold at least one message')
        stream = field_of(body, "stream", bool, "a boolean")
        name = self._name_field(body, "model", "model_name")
        if name:
            entry = await self.resolve(name)
        else:
            loaded = self.ctx.scheduler.loaded
            if loaded is None:
                raise BadRequest('no model is loaded: send "model" or call /load_model first')
            entry = loaded.entry
        has_images = any(m.get("images") for m in messages)  # the Ollama message shape, images included
        self.checks.check(entry, native_name(entry), kind="chat", images=has_images)
        if has_images:
            messages = checked_messages(messages)
        gen = GenerationRequest(entry=entry, messages=messages, interactive=stream is not False)
        async with aclosing(self.ctx.generator.run(gen)) as events:
            first = await first_event(events)
            if stream is False:
                return await self._collect(entry, first, events)
            return await self._stream(request, entry, first, events)

    async def _stream(
        self, request: web.Request, entry: ModelEntry, first: Event, events: AsyncIterator[Event]
    ) -> web.StreamResponse:
        def frames(event: Event) -> list[dict[str, Any]]:
            if isinstance(event, Done):
                return [
                    {
                        "token": "",
                        "finish": True,
                        "tokens_per_second": tokens_per_second(event),
                        "tokens_generated": event.stats.eval_count,
                        "choices": choice("", "stop"),
                    }
                ]
            if isinstance(event, Thinking):
                return [{"token": event.text, "thinking": True, "choices": choice("", None)}]
            if isinstance(event, Content):
                return [{"token": event.text, "thinking": False, "choices": choice(event.text, None)}]
            return []

        out = wire.JsonStream(request, STREAM_CONTENT_TYPE, suffix=b"\n\n")  # the seed's framing
        return await wire.relay_events(
            out, first, events, frames, lambda message: {"error": message}, entry.name.display
        )

    async def _collect(self, entry: ModelEntry, first: Event, events: AsyncIterator[Event]) -> web.Response:
        answer, done = await collect_answer(first, events)
        stats = done.stats
        return wire.json_response(
            {
                "model": native_name(entry),
                "response": answer.content,
                "tokens_generated": stats.eval_count,
                "tokens_per_second": tokens_per_second(done),
                "choices": choice(answer.content, "stop"),
                "usage": {
                    "prompt_tokens": stats.prompt_tokens,
                    "completion_tokens": stats.eval_count,
                    "total_tokens": stats.prompt_tokens + stats.eval_count,
                },
            }
        )
