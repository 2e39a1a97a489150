"""OpenAI's API (`/v1/*`): wire format only; the work is done by the store and the Generator.

Shapes follow Ollama's compatibility layer (docs/ollama-conformance.md #43-46): SSE streams with the role in
the first delta only, one shared `id` and `created`, a finish chunk with an empty delta, an optional
usage chunk, then `data: [DONE]`; errors in OpenAI's envelope (the app's middleware and `_error`).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import random
import struct
import time
from collections.abc import Callable
from contextlib import aclosing
from typing import Any

import orjson
from aiohttp import web

from rkllama_ollama.api import wire
from rkllama_ollama.api.context import AppContext
from rkllama_ollama.api.openai_request import (
    chat_logprobs_of,
    completion_logprobs_of,
    format_of,
    go_type,
    messages_of,
    model_of,
    options_of,
    stream_of,
    think_of,
    tools_of,
)
from rkllama_ollama.api.wire import BadRequest, field_of
from rkllama_ollama.chat.images import ImageError, checked_message_images
from rkllama_ollama.generation import l2_normalised
from rkllama_ollama.generation_events import (
    Answer,
    Content,
    Done,
    Event,
    Thinking,
    ToolCallEvent,
    collect_answer,
    first_event,
)
from rkllama_ollama.generation_plan import GenerationRequest
from rkllama_ollama.models.store import ModelEntry, ModelNotFound
from rkllama_ollama.request_checks import NOT_FOUND_PULL, RequestChecks
from rkllama_ollama.runtime.base import DoneReason, TokenLogprob

log = logging.getLogger(__name__)

FINGERPRINT = "fp_ollama"
ENCODING_FORMATS = ("float", "base64")


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return wire.openai_error_response(status, message, headers)


def _usage(done: Done) -> dict[str, int]:
    prompt = done.stats.prompt_tokens or done.stats.prompt_eval_count
    completion = done.stats.eval_count
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _finish_reason(done: Done, had_tool_calls: bool) -> str:
    if had_tool_calls and done.done_reason == DoneReason.STOP:
        return "tool_calls"
    return "length" if done.done_reason == DoneReason.LENGTH else "stop"


def _tool_call(event: ToolCallEvent) -> dict[str, Any]:
    call = event.call
    return {
        "id": call.id,
        "index": call.index,
        "type": "function",
        "function": {"name": call.name, "arguments": orjson.dumps(call.arguments).decode()},
    }


def model_object(entry: ModelEntry, model_id: str | None = None) -> dict[str, Any]:
    return {
        "id": model_id or entry.name.display,
        "object": "model",
        "created": int(entry.modified_at.timestamp()),
        "owned_by": entry.name.namespace,
    }


def _token_json(entry: TokenLogprob) -> dict[str, Any]:
    return {"token": entry.text, "logprob": entry.logprob, "bytes": list(entry.raw)}


def _chat_logprobs(entries: list[TokenLogprob]) -> dict[str, Any]:
    """Chat's `logprobs` object: one entry per token, `top_logprobs` always present as OpenAI's are."""
    return {
        "content": [
            {**_token_json(entry), "top_logprobs": [_token_json(top) for top in entry.top]}
            for entry in entries
        ]
    }


class _LegacyLogprobs:
    """`/v1/completions` logprobs (tokens, token_logprobs, top_logprobs, text_offset), offsets counted
    in characters from the start of the completion across streamed chunks."""

    def __init__(self) -> None:
        self.offset = 0

    def of(self, entries: list[TokenLogprob]) -> dict[str, Any]:
        tokens, offsets = [], []
        for entry in entries:
            tokens.append(entry.text)
            offsets.append(self.offset)
            self.offset += len(entry.text)
        return {
            "tokens": tokens,
            "token_logprobs": [entry.logprob for entry in entries],
            "top_logprobs": [{top.text: top.logprob for top in entry.top} for entry in entries],
            "text_offset": offsets,
        }


class OpenAiApi:
    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx
        self.checks = RequestChecks(ctx.store)

    def routes(self) -> list[web.AbstractRouteDef]:
        return [
            web.post("/v1/chat/completions", self.chat_completions),
            web.post("/v1/completions", self.completions),
            web.get("/v1/models", self.models),
            web.get("/v1/models/{model:.+}", self.model),
            web.post("/v1/embeddings", self.embeddings),
        ]

    # -- models ---------------------------------------------------------------------------------

    async def models(self, request: web.Request) -> web.Response:
        entries = await asyncio.to_thread(self.ctx.store.list)
        return wire.json_response(
            {"object": "list", "data": [model_object(e) for e in entries]}, charset=False
        )

    async def model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        try:
            entry = await asyncio.to_thread(self.ctx.store.resolve, name)
        except ModelNotFound:
            return _error(404, f"model '{name}' not found")
        return wire.json_response(model_object(entry, name), charset=False)

    # -- chat -----------------------------------------------------------------------------------

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await wire.read_json_body(request)
        label = model_of(body)
        messages = messages_of(body)
        options = options_of(body)
        stream, include_usage = stream_of(body)
        think = think_of(body)
        fmt = format_of(body)
        tools = tools_of(body)
        top_logprobs = chat_logprobs_of(body)
        has_images = any(m.get("images") for m in messages)
        entry = await self.checks.model_for(label, kind="chat", think=think, images=has_images)
        if has_images:
            try:
                messages = checked_message_images(messages)
            except ImageError as exc:
                raise BadRequest(str(exc)) from None
        gen = GenerationRequest(
            entry=entry,
            messages=messages,
            tools=tools,
            think=think,
            options=options,
            interactive=stream,
            format=fmt,
            top_logprobs=top_logprobs,
        )
        completion_id = f"chatcmpl-{random.randrange(999)}"
        created = int(time.time())

        def envelope(**fields: Any) -> dict[str, Any]:
            return {
                "id": completion_id,
                "object": "chat.completion.chunk" if stream else "chat.completion",
                "created": created,
                "model": label,
                "system_fingerprint": FINGERPRINT,
                **fields,
            }

        if not stream:

            def whole(done: Done, answer: Answer) -> dict[str, Any]:
                message: dict[str, Any] = {"role": "assistant", "content": answer.content}
                if answer.thinking:
                    message["reasoning"] = answer.thinking
                if answer.tool_calls:
                    message["tool_calls"] = [_tool_call(call) for call in answer.tool_calls]
                choice = {
                    "index": 0,
                    "message": message,
                    "finish_reason": _finish_reason(done, bool(answer.tool_calls)),
                }
                if top_logprobs >= 0:
                    choice["logprobs"] = _chat_logprobs(answer.logprobs)
                return envelope(choices=[choice], usage=_usage(done))

            return await self._whole(gen, whole)

        role_sent = False
        tool_calls_sent = False

        def chunks(event: Event) -> list[dict[str, Any]]:
            nonlocal role_sent, tool_calls_sent
            if isinstance(event, Done):
                finish = {"index": 0, "delta": {}, "finish_reason": _finish_reason(event, tool_calls_sent)}
                out = [envelope(choices=[finish])]
                if include_usage:
                    out.append(envelope(choices=[], usage=_usage(event)))
                return out
            delta: dict[str, Any] = {}
            if not role_sent:
                delta["role"] = "assistant"
                role_sent = True
            if isinstance(event, Thinking):
                delta["reasoning"] = event.text
            elif isinstance(event, Content):
                delta["content"] = event.text
            elif isinstance(event, ToolCallEvent):
                delta["tool_calls"] = [_tool_call(event)]
                tool_calls_sent = True
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": None}
            if event.logprobs is not None:
                choice["logprobs"] = _chat_logprobs(event.logprobs)
            return [envelope(choices=[choice])]

        return await self._stream(request, gen, chunks)

    # -- completions ----------------------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await wire.read_json_body(request)
        label = model_of(body)
        prompt = body.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise BadRequest(f"invalid type for 'prompt' field: {go_type(prompt)}")
        suffix = field_of(body, "suffix", str, "a string")
        options = options_of(body, top_p_zero_is_default=True)
        options.setdefault("frequency_penalty", 0.0)
        options.setdefault("presence_penalty", 0.0)
        stream, include_usage = stream_of(body)
        top_logprobs = completion_logprobs_of(body)
        entry = await self.checks.model_for(label, kind="generate", insert=bool(suffix))
        gen = GenerationRequest(
            entry=entry,
            prompt=prompt or "",
            suffix=suffix,
            options=options,
            interactive=stream,
            think=False,
            top_logprobs=top_logprobs,
        )
        legacy = _LegacyLogprobs()
        completion_id = f"cmpl-{random.randrange(999)}"
        created = int(time.time())
        zero_usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}

        def envelope(choices: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
            return {
                "id": completion_id,
                "object": "text_completion",
                "created": created,
                "model": label,
                "system_fingerprint": FINGERPRINT,
                "choices": choices,
                **fields,
            }

        if not stream:

            def whole(done: Done, answer: Answer) -> dict[str, Any]:
                choice: dict[str, Any] = {
                    "text": answer.content,
                    "index": 0,
                    "finish_reason": _finish_reason(done, False),
                }
                if top_logprobs >= 0:
                    choice["logprobs"] = legacy.of(answer.logprobs)
                return envelope([choice], usage=_usage(done))

            return await self._whole(gen, whole)

        def chunks(event: Event) -> list[dict[str, Any]]:
            extra = {"usage": zero_usage} if include_usage else {}
            if isinstance(event, Done):
                finish = {"text": "", "index": 0, "finish_reason": _finish_reason(event, False)}
                out = [envelope([finish], **extra)]
                if include_usage:
                    out.append(envelope([], usage=_usage(event)))
                return out
            if not isinstance(event, Content):
                return []
            choice: dict[str, Any] = {"text": event.text, "index": 0, "finish_reason": None}
            if event.logprobs is not None:
                choice["logprobs"] = legacy.of(event.logprobs)
            return [envelope([choice], **extra)]

        return await self._stream(request, gen, chunks)

    # -- embeddings -----------------------------------------------------------------------------

    async def embeddings(self, request: web.Request) -> web.Response:
        body = await wire.read_json_body(request)
        label = model_of(body)
        raw = body.get("input")
        inputs = [raw] if isinstance(raw, str) else raw
        if not isinstance(inputs, list) or not inputs or not all(isinstance(i, str) for i in inputs):
            raise BadRequest("invalid input")
        dimensions = field_of(body, "dimensions", int, "an integer")
        if dimensions is not None and dimensions <= 0:
            raise BadRequest("dimensions must be greater than 0")
        encoding = body.get("encoding_format") or "float"
        if encoding not in ENCODING_FORMATS:
            raise BadRequest(
                f'invalid encoding_format {orjson.dumps(encoding).decode()}: use "float" or "base64"'
            )
        entry = await self.checks.resolve(label, not_found=NOT_FOUND_PULL)
        result = await self.ctx.generator.embed(entry, inputs, truncate=True)
        vectors = [l2_normalised(vector, dimensions) for vector in result.vectors]
        data = [
            {"object": "embedding", "embedding": _encoded(vector, encoding), "index": index}
            for index, vector in enumerate(vectors)
        ]
        usage = {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}
        return wire.json_response(
            {"object": "list", "data": data, "model": label, "usage": usage}, charset=False
        )

    # -- shared ---------------------------------------------------------------------------------

    async def _whole(
        self, gen: GenerationRequest, whole: Callable[[Done, Answer], dict[str, Any]]
    ) -> web.Response:
        async with aclosing(self.ctx.generator.run(gen)) as events:
            answer, done = await collect_answer(await first_event(events), events)
        return wire.json_response(whole(done, answer), charset=False)

    async def _stream(
        self,
        request: web.Request,
        gen: GenerationRequest,
        chunks: Callable[[Event], list[dict[str, Any]]],
    ) -> web.StreamResponse:
        async with aclosing(self.ctx.generator.run(gen)) as events:
            first = await first_event(events)
            return await wire.relay_events(
                wire.sse_stream(request),
                first,
                events,
                chunks,
                wire.openai_error_body,
                gen.entry.name.display,
            )


def _encoded(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return vector
