"""OpenAI's Responses API (`POST /v1/responses`), as Ollama serves it since 0.13.3: wire format only.

The request becomes a chat GenerationRequest (api/openai_responses_request.py); the Generator's events
become output items: a `reasoning` item for the thinking, a `message` item with one `output_text` part
for the answer, one `function_call` item per tool call, in the order the model produced them.

Streamed (`stream: true`), every event is an SSE `event: <type>` plus `data: <json>` pair carrying its
`type` and a growing `sequence_number`: response.created, response.in_progress, then per item
response.output_item.added ... response.output_item.done (with content_part / output_text /
reasoning_summary / function_call_arguments events inside), and last response.completed, or
response.incomplete when the reply hit `max_output_tokens` (or the context). A failure after the first
byte is an `error` event. Nothing is stored, and there is no `data: [DONE]` (OpenAI sends none here).
"""

from __future__ import annotations

import secrets
import time
from contextlib import aclosing
from typing import Any

import orjson
from aiohttp import web

from rkllama_ollama.api import wire
from rkllama_ollama.api.context import AppContext
from rkllama_ollama.api.openai_responses_request import ResponsesRequest, parse_request
from rkllama_ollama.generation_events import (
    Content,
    Done,
    Event,
    Thinking,
    ToolCallEvent,
    collect_answer,
    first_event,
)
from rkllama_ollama.generation_plan import GenerationRequest
from rkllama_ollama.request_checks import RequestChecks
from rkllama_ollama.runtime.base import DoneReason


def _id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def _usage(done: Done) -> dict[str, Any]:
    stats = done.stats
    prompt = stats.prompt_tokens or stats.prompt_eval_count
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": max(0, prompt - stats.prompt_eval_count)},
        "output_tokens": stats.eval_count,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + stats.eval_count,
    }


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


class ResponseBuilder:
    """One response's output items, built from a run's events; each call returns the stream events it
    makes (a whole, non-streamed response uses the same path and ignores them)."""

    def __init__(self, request: ResponsesRequest) -> None:
        self.request = request
        self.id = _id("resp")
        self.created_at = int(time.time())
        self.output: list[dict[str, Any]] = []  # finished items, in output order
        self._open: dict[str, Any] | None = None  # the reasoning or message item being streamed
        self._text = ""  # of the open item
        self._sequence = 0

    # -- the response object --------------------------------------------------------------------

    def response(self, status: str, done: Done | None = None) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "completed_at": int(time.time()) if status in ("completed", "incomplete") else None,
            "status": status,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "model": self.request.model,
            "previous_response_id": None,
            "output": list(self.output) if done is not None else [],
            "parallel_tool_calls": True,
            "store": False,
            "background": False,
            "service_tier": "default",
            "top_logprobs": 0,
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
            "max_tool_calls": None,
            "usage": _usage(done) if done is not None else None,
            **self.request.echo,
        }

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return event

    # -- events -> items ------------------------------------------------------------------------

    def start(self) -> list[dict[str, Any]]:
        return [
            self._event("response.created", response=self.response("in_progress")),
            self._event("response.in_progress", response=self.response("in_progress")),
        ]

    def feed(self, event: Event) -> list[dict[str, Any]]:
        if isinstance(event, Thinking) and event.text:
            return self._append("reasoning", event.text)
        if isinstance(event, Content) and event.text:
            return self._append("message", event.text)
        if isinstance(event, ToolCallEvent):
            return self._close("completed") + self._function_call(event)
        if isinstance(event, Done):
            return self.finish(event)
        return []  # an empty Content (logprobs only, not asked for here)

    def finish(self, done: Done) -> list[dict[str, Any]]:
        status = "incomplete" if done.done_reason == DoneReason.LENGTH else "completed"
        events = self._close(status)
        if not self.output:  # no text and no call: an empty message, so the reply still has one
            events += self._open_item("message") + self._close(status)
        kind = "response.incomplete" if status == "incomplete" else "response.completed"
        return [*events, self._event(kind, response=self.response(status, done))]

    def failed(self, message: str) -> dict[str, Any]:
        """The last event of a stream that failed after its first byte."""
        return self._event("error", code="server_error", message=message, param=None)

    def _append(self, kind: str, text: str) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        if self._open is None or self._open["type"] != kind:
            events += self._close("completed") + self._open_item(kind)
        assert self._open is not None
        self._text += text
        where = {"item_id": self._open["id"], "output_index": len(self.output)}
        if kind == "reasoning":
            events.append(
                self._event("response.reasoning_summary_text.delta", **where, summary_index=0, delta=text)
            )
        else:
            events.append(
                self._event("response.output_text.delta", **where, content_index=0, delta=text, logprobs=[])
            )
        return events

    def _open_item(self, kind: str) -> list[dict[str, Any]]:
        index = len(self.output)
        if kind == "reasoning":
            self._open = {"id": _id("rs"), "type": "reasoning", "summary": []}
            part_event = "response.reasoning_summary_part.added"
            part: dict[str, Any] = {"summary_index": 0, "part": {"type": "summary_text", "text": ""}}
        else:
            self._open = {
                "id": _id("msg"),
                "type": "message",
                "status": "in_progress",
                "role": "assistant",
                "content": [],
            }
            part_event = "response.content_part.added"
            part = {"content_index": 0, "part": _text_part("")}
        self._text = ""
        added = self._event("response.output_item.added", output_index=index, item=dict(self._open))
        return [added, self._event(part_event, item_id=self._open["id"], output_index=index, **part)]

    def _close(self, status: str) -> list[dict[str, Any]]:
        item, text = self._open, self._text
        if item is None:
            return []
        self._open, self._text = None, ""
        where = {"item_id": item["id"], "output_index": len(self.output)}
        if item["type"] == "reasoning":
            part = {"type": "summary_text", "text": text}
            item = {**item, "summary": [part]}
            events = [
                self._event("response.reasoning_summary_text.done", **where, summary_index=0, text=text),
                self._event("response.reasoning_summary_part.done", **where, summary_index=0, part=part),
            ]
        else:
            item = {**item, "status": status, "content": [_text_part(text)]}
            events = [
                self._event("response.output_text.done", **where, content_index=0, text=text, logprobs=[]),
                self._event("response.content_part.done", **where, content_index=0, part=_text_part(text)),
            ]
        events.append(self._event("response.output_item.done", output_index=len(self.output), item=item))
        self.output.append(item)
        return events

    def _function_call(self, event: ToolCallEvent) -> list[dict[str, Any]]:
        call = event.call
        arguments = orjson.dumps(call.arguments).decode()
        index = len(self.output)
        item = {
            "id": _id("fc"),
            "type": "function_call",
            "status": "in_progress",
            "call_id": call.id,
            "name": call.name,
            "arguments": "",
        }
        done = {**item, "status": "completed", "arguments": arguments}
        where = {"item_id": item["id"], "output_index": index}
        self.output.append(done)
        return [
            self._event("response.output_item.added", output_index=index, item=item),
            self._event("response.function_call_arguments.delta", **where, delta=arguments),
            self._event(
                "response.function_call_arguments.done", **where, name=call.name, arguments=arguments
            ),
            self._event("response.output_item.done", output_index=index, item=done),
        ]


class SseEventStream(wire.JsonStream):
    """The Responses API's SSE framing: `event: <type>` before each `data:` line, no [DONE] trailer."""

    def __init__(self, request: web.Request) -> None:
        super().__init__(request, wire.SSE, headers={"Cache-Control": "no-cache"})

    async def send(self, obj: Any) -> None:
        await self._start()
        await self.response.write(b"event: %s\ndata: %s\n\n" % (obj["type"].encode(), orjson.dumps(obj)))


class OpenAiResponsesApi:
    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx
        self.checks = RequestChecks(ctx.store)

    def routes(self) -> list[web.AbstractRouteDef]:
        return [web.post("/v1/responses", self.create)]

    async def create(self, request: web.Request) -> web.StreamResponse:
        parsed = parse_request(await wire.read_json_body(request))
        has_images = any(m.get("images") for m in parsed.messages)
        entry = await self.checks.model_for(parsed.model, kind="chat", think=parsed.think, images=has_images)
        gen = GenerationRequest(
            entry=entry,
            messages=parsed.messages,
            tools=parsed.tools,
            think=parsed.think,
            options=parsed.options,
            interactive=parsed.stream,
            format=parsed.format,
        )
        builder = ResponseBuilder(parsed)
        async with aclosing(self.ctx.generator.run(gen)) as events:
            first = await first_event(events)
            if not parsed.stream:
                answer, done = await collect_answer(first, events)
                if answer.thinking:
                    builder.feed(Thinking(answer.thinking))
                builder.feed(Content(answer.content))
                for call in answer.tool_calls:
                    builder.feed(call)
                builder.finish(done)
                status = "incomplete" if done.done_reason == DoneReason.LENGTH else "completed"
                return wire.json_response(builder.response(status, done), charset=False)
            started = False

            def frames(event: Event) -> list[dict[str, Any]]:
                nonlocal started
                opening = [] if started else builder.start()
                started = True
                return opening + builder.feed(event)

            return await wire.relay_events(
                SseEventStream(request), first, events, frames, builder.failed, entry.name.display
            )
