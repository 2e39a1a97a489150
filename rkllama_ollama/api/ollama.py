"""Ollama's API (`/`, `/api/*`): wire format only; the work is done by the store, the Generator and
model_admin (delete, copy, create). `/api/create` bodies are parsed in api/create_request.py.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
from collections.abc import Callable
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from rkllama_ollama.api import wire
from rkllama_ollama.api.context import AppContext
from rkllama_ollama.api.create_request import parse_create
from rkllama_ollama.api.ollama_fields import VALID_ROLES, digest_of, model_field
from rkllama_ollama.api.pulling import pull_request_fields, respond_pull
from rkllama_ollama.api.wire import BadRequest, field_of
from rkllama_ollama.chat.images import ImageError, checked_image, checked_message_images
from rkllama_ollama.durations import parse_keep_alive
from rkllama_ollama.generation import Embeddings, l2_normalised
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
from rkllama_ollama.model_admin import BaseModelNotFound, BlobNotFound, copy_model, create_model, delete_model
from rkllama_ollama.models.blobs import BlobError
from rkllama_ollama.models.facts import gguf_whole_arrays_and_tensors, show_model_info
from rkllama_ollama.models.gguf_meta import GGUFError, read_gguf_metadata
from rkllama_ollama.models.names import InvalidModelName, parse_name
from rkllama_ollama.models.store import ModelEntry, ModelNotFound, StoreError, WeightsFormat
from rkllama_ollama.options import OptionError, validate_options
from rkllama_ollama.request_checks import NOT_FOUND_PULL, RequestChecks
from rkllama_ollama.runtime.base import DoneReason, TokenLogprob
from rkllama_ollama.structured import Format, FormatError, check_format

log = logging.getLogger(__name__)

UPLOAD_CHUNK_BYTES = 1 << 20

THINK_LEVELS = ("low", "medium", "high", "max")
COPILOT_AGENT = "GitHubCopilotChat/"  # /api/show answers it with the model's name as general.basename


# ------------------------------------------------------------------------------------------------
# Request parsing
# ------------------------------------------------------------------------------------------------


def parse_keep_alive_field(body: dict[str, Any]) -> float | None:
    value = body.get("keep_alive")
    if value is None:
        return None
    try:
        return parse_keep_alive(value)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None


def parse_think(body: dict[str, Any]) -> bool | str | None:
    value = body.get("think")
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and value in THINK_LEVELS:
        return value
    if isinstance(value, str):
        raise BadRequest(f'invalid think value: "{value}" (must be "high", "medium", "low", true, or false)')
    raise BadRequest('"think" must be a boolean or one of "low", "medium", "high"')


def parse_format(body: dict[str, Any]) -> Format | None:
    try:
        return check_format(body.get("format"))
    except FormatError as exc:
        raise BadRequest(str(exc)) from None


def parse_options(body: dict[str, Any]) -> dict[str, Any]:
    try:
        return validate_options(body.get("options"))
    except OptionError as exc:
        raise BadRequest(str(exc)) from None


@dataclass(frozen=True)
class GenerationFields:
    """The request fields `/api/generate` and `/api/chat` share, checked."""

    stream: bool
    keep_alive: float | None
    think: bool | str | None
    format: Format | None
    options: dict[str, Any]
    top_logprobs: int  # -1: no logprobs; n >= 0: logprobs with n alternatives per token
    truncate: bool  # chat: drop the oldest messages to fit the context (Ollama's default: true)
    shift: bool  # a reply that fills the context shifts it and goes on (Ollama's default: true)

    def request(self, entry: ModelEntry, **specific: Any) -> GenerationRequest:
        """The GenerationRequest with these shared fields and the endpoint's own (`prompt`, `messages`...)."""
        return GenerationRequest(
            entry=entry,
            think=self.think,
            options=self.options,
            keep_alive_s=self.keep_alive,
            interactive=self.stream,
            format=self.format,
            top_logprobs=self.top_logprobs,
            truncate=self.truncate,
            shift=self.shift,
            **specific,
        )


def parse_generation_fields(body: dict[str, Any]) -> GenerationFields:
    top_logprobs = field_of(body, "top_logprobs", int, "an integer")
    if top_logprobs is not None and not 0 <= top_logprobs <= 20:
        raise BadRequest("top_logprobs must be between 0 and 20")
    return GenerationFields(
        stream=field_of(body, "stream", bool, "a boolean") is not False,
        keep_alive=parse_keep_alive_field(body),
        think=parse_think(body),
        format=parse_format(body),
        options=parse_options(body),
        top_logprobs=(top_logprobs or 0) if field_of(body, "logprobs", bool, "a boolean") else -1,
        truncate=field_of(body, "truncate", bool, "a boolean") is not False,
        shift=field_of(body, "shift", bool, "a boolean") is not False,
    )


def parse_tools(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    tools = field_of(body, "tools", list, "an array of tool definitions")
    if not tools:
        return None
    for tool in tools:
        if not isinstance(tool, dict) or not isinstance(tool.get("function", {}), dict):
            raise BadRequest('"tools" must be an array of {"type": "function", "function": {...}} objects')
    return tools


def parse_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    raw = field_of(body, "messages", list, "an array of messages") or []
    messages: list[dict[str, Any]] = []
    for index, message in enumerate(raw):
        if not isinstance(message, dict):
            raise BadRequest(f"messages[{index}] must be an object")
        role = message.get("role")
        if not isinstance(role, str) or role.lower() not in VALID_ROLES:
            raise BadRequest(f'messages[{index}].role must be one of "system", "user", "assistant", "tool"')
        content = message.get("content")
        if content is not None and not isinstance(content, str):
            raise BadRequest(f"messages[{index}].content must be a string")
        cleaned: dict[str, Any] = {"role": role.lower(), "content": content or ""}
        for key in ("thinking", "tool_name", "tool_call_id"):
            value = message.get(key)
            if value is not None:
                if not isinstance(value, str):
                    raise BadRequest(f"messages[{index}].{key} must be a string")
                cleaned[key] = value
        calls = message.get("tool_calls")
        if calls:
            if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
                raise BadRequest(f"messages[{index}].tool_calls must be an array of objects")
            cleaned["tool_calls"] = calls
        images = message.get("images")
        if images:
            if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
                raise BadRequest(f"messages[{index}].images must be an array of base64 strings")
            cleaned["images"] = images
        messages.append(cleaned)
    return messages


def projector_info(encoder: Path) -> dict[str, Any]:
    """What is known of a vision encoder without loading it: a GGUF projector's metadata (as Ollama
    shows it: `general.architecture` clip, `clip.*`, long arrays cut), else an RKNN encoder's runtime,
    file and size."""
    if encoder.name.lower().endswith(".gguf"):
        try:
            return show_model_info(read_gguf_metadata(encoder, max_array_items=16))
        except (GGUFError, OSError) as exc:
            log.warning("projector unreadable path=%s error=%s", encoder, exc)
            return {}
    try:
        size = encoder.stat().st_size
    except OSError:
        size = 0
    return {"general.architecture": "rknn", "general.file_name": encoder.name, "general.file_size": size}


def checked_images(images: list[str]) -> list[str]:
    """/api/generate's `images`, checked (400 naming the image that cannot be used)."""
    try:
        return [checked_image(image, f"images[{index}]") for index, image in enumerate(images)]
    except ImageError as exc:
        raise BadRequest(str(exc)) from None


def checked_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat messages with their images checked (400 naming the image that cannot be used)."""
    try:
        return checked_message_images(messages)
    except ImageError as exc:
        raise BadRequest(str(exc)) from None


# ------------------------------------------------------------------------------------------------
# Response shapes
# ------------------------------------------------------------------------------------------------


def details_of(entry: ModelEntry) -> dict[str, Any]:
    details = dict(entry.details)
    for key in ("parent_model", "format", "family", "parameter_size", "quantization_level"):
        details[key] = str(details.get(key) or "")
    details["families"] = details.get("families") or ([details["family"]] if details["family"] else None)
    if entry.vision_encoder is not None and entry.vision_encoder.name.lower().endswith(".gguf"):
        # Like Ollama for a model with a projector: its family ("clip") joins the model's.
        details["families"] = [*(details["families"] or []), "clip"]
    return details


def tag_of(entry: ModelEntry) -> dict[str, Any]:
    display = entry.name.display
    item: dict[str, Any] = {
        "name": display,
        "model": display,
        "modified_at": wire.rfc3339_local(entry.modified_at),
        "size": entry.size,
        "digest": entry.digest,
        "details": details_of(entry),
    }
    # Like current Ollama: the context and embedding lengths in the listing's details, omitted when 0.
    for key, value in (
        ("context_length", entry.context_length),
        ("embedding_length", entry.embedding_length),
    ):
        if value:
            item["details"][key] = value
    if entry.capabilities:
        item["capabilities"] = list(entry.capabilities)
    return item


def _go_quote(value: Any) -> str:
    if isinstance(value, str):
        return orjson.dumps(value).decode()
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def parameters_text(parameters: dict[str, Any]) -> str:
    """`/api/show` parameters: key padded to 30 columns, Go-quoted value, one line per list item."""
    lines = []
    for key in sorted(parameters):
        values = parameters[key] if isinstance(parameters[key], list) else [parameters[key]]
        for value in values:
            lines.append(f"{key:<30} {_go_quote(value)}")
    return "\n".join(lines)


def _stats_fields(done: Done) -> dict[str, int]:
    stats = done.stats
    fields = {
        "total_duration": max(1, done.total_ns),
        "load_duration": max(1, done.load_ns),
        "prompt_eval_count": stats.prompt_eval_count,
        "prompt_eval_duration": stats.prompt_eval_ns,
        "eval_count": stats.eval_count,
        "eval_duration": stats.eval_ns,
    }
    # Ollama omits zero metrics; absent means 0 to every client.
    return {key: int(value) for key, value in fields.items() if value}


def _tool_call_json(event: ToolCallEvent) -> dict[str, Any]:
    call = event.call
    return {"id": call.id, "function": {"index": call.index, "name": call.name, "arguments": call.arguments}}


# ------------------------------------------------------------------------------------------------
# Handlers
# ------------------------------------------------------------------------------------------------


class OllamaApi:
    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx
        self.blobs = ctx.store.blobs
        self.checks = RequestChecks(ctx.store)

    def routes(self) -> list[web.AbstractRouteDef]:
        return [
            web.get("/", self.root),  # GET also answers HEAD
            web.get("/api/version", self.version),
            web.get("/api/tags", self.tags),
            web.post("/api/show", self.show),
            web.get("/api/ps", self.ps),
            web.post("/api/generate", self.generate),
            web.post("/api/chat", self.chat),
            web.post("/api/embed", self.embed),
            web.post("/api/embeddings", self.embeddings),
            web.post("/api/copy", self.copy),
            web.delete("/api/delete", self.delete),
            web.post("/api/create", self.create),
            web.head("/api/blobs/{digest}", self.blob_exists),
            web.post("/api/blobs/{digest}", self.blob_upload),
            web.post("/api/push", self.push),
            web.post("/api/pull", self.pull),
        ]

    async def root(self, request: web.Request) -> web.Response:
        return web.Response(text="Ollama is running", content_type="text/plain", charset="utf-8")

    async def version(self, request: web.Request) -> web.Response:
        return wire.json_response({"version": self.ctx.settings.ollama_version})

    async def tags(self, request: web.Request) -> web.Response:
        entries = await asyncio.to_thread(self.ctx.store.list)
        return wire.json_response({"models": [tag_of(e) for e in entries]})

    async def resolve(self, name: str) -> ModelEntry:
        return await asyncio.to_thread(self.ctx.store.resolve, name)

    async def show(self, request: web.Request) -> web.Response:
        body = await wire.read_json_body(request)
        name = model_field(body)
        if not name:
            raise BadRequest("model is required")
        try:
            entry = await self.resolve(name)
        except ModelNotFound:
            return wire.error_response(404, f"model '{self.ctx.display_name(name)}' not found")
        verbose = body.get("verbose") is True
        model_info = {
            k: (v[:0] if isinstance(v, list) and len(v) > 5 and not verbose else v)
            for k, v in entry.model_info.items()
            if k not in ("general.name", "tokenizer.chat_template")
        }
        if request.headers.get("User-Agent", "").startswith(COPILOT_AGENT):  # shows the name it asked for
            model_info["general.basename"] = name
        tensors: list[dict[str, Any]] | None = None
        if (
            verbose and entry.format == WeightsFormat.GGUF
        ):  # whole arrays and tensors: read from the file only now
            try:
                arrays, tensors = await asyncio.to_thread(gguf_whole_arrays_and_tensors, entry.weights)
            except (GGUFError, OSError) as exc:
                log.warning("show verbose: cannot read %s: %s", entry.weights, exc)
            else:
                model_info.update(arrays)
        reply: dict[str, Any] = {
            "license": entry.modelfile.license or "",
            "modelfile": entry.modelfile.to_ollama_text(),
            "parameters": parameters_text(entry.modelfile.parameters),
            "template": entry.modelfile.template or entry.chat_template or "",
            "system": entry.modelfile.system or "",
            "details": details_of(entry),
            "model_info": model_info,
            "capabilities": list(entry.capabilities),
            "modified_at": wire.rfc3339_local(entry.modified_at),
        }
        if tensors is not None:
            reply["tensors"] = tensors
        if entry.vision_encoder is not None:  # like Ollama's projector_info for a model with a projector
            reply["projector_info"] = await asyncio.to_thread(projector_info, entry.vision_encoder)
        return wire.json_response(reply)

    async def ps(self, request: web.Request) -> web.Response:
        models = []
        for loaded in self.ctx.scheduler.loaded_models:  # the most recently used first
            entry = loaded.entry
            expires = loaded.expires_at
            expires_at = (
                dt.datetime.now().astimezone() + dt.timedelta(days=365 * 292)
                if math.isinf(expires)
                else dt.datetime.fromtimestamp(expires).astimezone()
            )
            size = loaded.info.memory_bytes or entry.size
            item = tag_of(entry)
            item.pop("modified_at", None)
            item.pop("capabilities", None)
            item.update(
                {
                    "expires_at": wire.rfc3339_local(expires_at),
                    "size": size,
                    # The NPU shares system RAM; report it as accelerator memory for .rkllm models.
                    "size_vram": size if entry.format == WeightsFormat.RKLLM else 0,
                    "context_length": loaded.info.context_length,
                }
            )
            models.append(item)
        return wire.json_response({"models": models})

    # -- generation ---------------------------------------------------------------------------

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await wire.read_json_body(request, allow_empty=False)
        label = model_field(body)
        prompt = field_of(body, "prompt", str, "a string") or ""
        system = field_of(body, "system", str, "a string")
        suffix = field_of(body, "suffix", str, "a string")
        raw = bool(field_of(body, "raw", bool, "a boolean"))
        context = field_of(body, "context", list, "an array of token ids")
        if context is not None and not all(isinstance(t, int) and not isinstance(t, bool) for t in context):
            raise BadRequest('"context" must be an array of token ids')
        images = field_of(body, "images", list, "an array of base64 strings")
        common = parse_generation_fields(body)
        keep_alive, think, options = common.keep_alive, common.think, common.options
        if not label:  # Ollama's quirk: generate with no model is a 404, chat a 400
            return wire.error_response(404, "model '' not found")
        entry = await self.checks.resolve(label)
        if not prompt and keep_alive == 0:
            await self.ctx.scheduler.unload(entry)
            return wire.json_response(self._final_generate(label, DoneReason.UNLOAD))
        if raw and (body.get("template") or system or context):
            raise BadRequest("raw mode does not support template, system, or context")
        self.checks.check(
            entry, label, kind="generate", think=think, insert=bool(suffix), images=bool(images)
        )
        if images:
            if not all(isinstance(image, str) for image in images):
                raise BadRequest('"images" must be an array of base64 strings')
            images = checked_images(images)
        if not prompt and not context:
            await self.ctx.generator.load(entry, options, keep_alive)
            return wire.json_response(self._final_generate(label, DoneReason.LOAD))
        gen = common.request(
            entry,
            prompt=prompt,
            system=system,
            suffix=suffix,
            raw=raw,
            context=context or None,
            images=images or None,
        )

        def chunk(event: Event) -> dict[str, Any]:
            base = {"model": label, "created_at": wire.rfc3339_utc(), "response": "", "done": False}
            if isinstance(event, Thinking):
                base["thinking"] = event.text
            elif isinstance(event, Content):
                base["response"] = event.text
            return _chunk_with_logprobs(base, event)

        def final(done: Done, answer: Answer | None) -> dict[str, Any]:
            reply = self._final_generate(label, done.done_reason)
            if answer is not None:
                reply["response"] = answer.content
                if answer.thinking:
                    reply["thinking"] = answer.thinking
                if answer.tool_calls:
                    reply["tool_calls"] = [_tool_call_json(call) for call in answer.tool_calls]
                if answer.logprobs:
                    reply["logprobs"] = ollama_logprobs(answer.logprobs)
            if not raw:
                reply["context"] = done.context
            reply.update(_stats_fields(done))
            return reply

        return await self._respond(request, gen, common.stream, chunk, final)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await wire.read_json_body(request, allow_empty=False)
        label = model_field(body)
        if not label:
            raise BadRequest("model is required")
        messages = parse_messages(body)
        tools = parse_tools(body)
        common = parse_generation_fields(body)
        keep_alive, think, options = common.keep_alive, common.think, common.options
        entry = await self.checks.resolve(label)
        if not messages and keep_alive == 0:
            await self.ctx.scheduler.unload(entry)
            return wire.json_response(self._final_chat(label, DoneReason.UNLOAD))
        has_images = any(m.get("images") for m in messages)
        self.checks.check(entry, label, kind="chat", think=think, images=has_images)
        if has_images:
            messages = checked_messages(messages)
        if not messages:
            await self.ctx.generator.load(entry, options, keep_alive)
            return wire.json_response(self._final_chat(label, DoneReason.LOAD))
        gen = common.request(entry, messages=messages, tools=tools)

        def chunk(event: Event) -> dict[str, Any]:
            message: dict[str, Any] = {"role": "assistant", "content": ""}
            if isinstance(event, Thinking):
                message["thinking"] = event.text
            elif isinstance(event, Content):
                message["content"] = event.text
            elif isinstance(event, ToolCallEvent):
                message["tool_calls"] = [_tool_call_json(event)]
            base = {"model": label, "created_at": wire.rfc3339_utc(), "message": message, "done": False}
            return _chunk_with_logprobs(base, event)

        def final(done: Done, answer: Answer | None) -> dict[str, Any]:
            reply = self._final_chat(label, done.done_reason)
            if answer is not None:
                message = reply["message"]
                message["content"] = answer.content
                if answer.thinking:
                    message["thinking"] = answer.thinking
                if answer.tool_calls:
                    message["tool_calls"] = [_tool_call_json(call) for call in answer.tool_calls]
                if answer.logprobs:
                    reply["logprobs"] = ollama_logprobs(answer.logprobs)
            reply.update(_stats_fields(done))
            return reply

        return await self._respond(request, gen, common.stream, chunk, final)

    # -- embeddings -----------------------------------------------------------------------------

    async def _embedding_model(self, label: str) -> ModelEntry:
        if not label:
            raise BadRequest("model is required")
        return await self.checks.resolve(label, not_found=NOT_FOUND_PULL)

    async def _embed(
        self, entry: ModelEntry, inputs: list[str], truncate: bool, body: dict[str, Any]
    ) -> Embeddings:
        options = parse_options(body)
        keep_alive = parse_keep_alive_field(body)
        return await self.ctx.generator.embed(
            entry, inputs, truncate=truncate, options=options, keep_alive_s=keep_alive
        )

    async def embed(self, request: web.Request) -> web.Response:
        body = await wire.read_json_body(request)
        label = model_field(body)
        inputs = embed_inputs(body.get("input"))
        truncate = field_of(body, "truncate", bool, "a boolean")
        dimensions = field_of(body, "dimensions", int, "an integer")
        if dimensions is not None and dimensions <= 0:
            raise BadRequest("dimensions must be greater than 0")
        parse_options(body)
        parse_keep_alive_field(body)
        entry = await self._embedding_model(label)
        result = await self._embed(entry, inputs, truncate is not False, body)
        if not inputs:
            return wire.json_response({"model": label, "embeddings": []})
        vectors = [l2_normalised(vector, dimensions) for vector in result.vectors]
        reply: dict[str, Any] = {
            "model": label,
            "embeddings": vectors,
            "total_duration": max(1, result.total_ns),
            "load_duration": max(1, result.load_ns),
        }
        if result.prompt_tokens:
            reply["prompt_eval_count"] = result.prompt_tokens
        return wire.json_response(reply)

    async def embeddings(self, request: web.Request) -> web.Response:
        """The legacy single embedding: not normalised; an empty prompt only loads the model."""
        body = await wire.read_json_body(request)
        label = model_field(body)
        prompt = field_of(body, "prompt", str, "a string") or ""
        parse_options(body)
        parse_keep_alive_field(body)
        entry = await self._embedding_model(label)
        result = await self._embed(entry, [prompt] if prompt else [], True, body)
        return wire.json_response({"embedding": result.vectors[0] if prompt else []})

    # -- model management -----------------------------------------------------------------------

    async def copy(self, request: web.Request) -> web.Response:
        body = await wire.read_json_body(request)
        source = field_of(body, "source", str, "a string") or ""
        destination = field_of(body, "destination", str, "a string") or ""
        names = {}
        for role, text in (("source", source), ("destination", destination)):
            try:
                names[role] = parse_name(text)
            except InvalidModelName:
                raise BadRequest(f'{role} "{text}" is invalid') from None
        try:
            await copy_model(self.ctx.store, self.ctx.scheduler, names["source"], names["destination"])
        except ModelNotFound:
            return wire.error_response(404, f'model "{source}" not found')
        except StoreError as exc:
            return wire.error_response(500, str(exc))
        log.info("model copied source=%s destination=%s", source, destination)
        return wire.empty_response(200)

    async def delete(self, request: web.Request) -> web.Response:
        body = await wire.read_json_body(request)
        label = model_field(body)
        if not label:
            raise BadRequest("model is required")
        try:
            await delete_model(self.ctx.store, self.ctx.scheduler, label)
        except ModelNotFound:
            return wire.error_response(404, f"model '{label}' not found")
        except StoreError as exc:
            return wire.error_response(500, str(exc))
        return wire.empty_response(200)

    async def create(self, request: web.Request) -> web.StreamResponse:
        body = await wire.read_json_body(request)
        plan = parse_create(body)
        stream = field_of(body, "stream", bool, "a boolean")
        try:
            created = await create_model(
                self.ctx.store,
                self.ctx.scheduler,
                self.blobs,
                plan.name,
                plan.modelfile,
                base=plan.base,
                blob=plan.blob,
                encoder=plan.encoder,
            )
        except BlobNotFound as exc:
            raise BadRequest(str(exc)) from None
        except BaseModelNotFound as exc:
            return wire.error_response(404, str(exc))
        except StoreError as exc:
            raise BadRequest(str(exc)) from None
        log.info(
            "model created name=%s from=%s", created.entry.name.display, plan.base or created.weights_name
        )
        statuses = [{"status": status} for status in created.statuses]
        if stream is False:
            return wire.json_response(statuses[-1], charset=False)
        out = wire.ndjson_stream(request)
        for status in statuses:
            await out.send(status)
        return await out.finish()

    async def blob_exists(self, request: web.Request) -> web.Response:
        hex_digest = digest_of(request.match_info["digest"])
        if await asyncio.to_thread(self.blobs.exists, hex_digest):
            return wire.empty_response(200)
        return wire.error_response(404, f'blob "sha256:{hex_digest}" not found')

    async def blob_upload(self, request: web.Request) -> web.Response:
        hex_digest = digest_of(request.match_info["digest"])
        if await asyncio.to_thread(self.blobs.exists, hex_digest):
            return wire.empty_response(200)
        try:
            await self.blobs.receive(hex_digest, request.content.iter_chunked(UPLOAD_CHUNK_BYTES))
        except BlobError as exc:
            raise BadRequest(str(exc)) from None
        return wire.empty_response(201)

    async def pull(self, request: web.Request) -> web.StreamResponse:
        name, stream = pull_request_fields(await wire.read_json_body(request, allow_empty=True))
        return await respond_pull(request, self.ctx.store, name, stream)

    async def push(self, request: web.Request) -> web.Response:
        body = await wire.read_json_body(request, allow_empty=True)
        if not model_field(body):
            raise BadRequest("model is required")
        raise BadRequest("push is not supported")

    # -- shared ---------------------------------------------------------------------------------

    @staticmethod
    def _final_generate(label: str, reason: DoneReason) -> dict[str, Any]:
        return {
            "model": label,
            "created_at": wire.rfc3339_utc(),
            "response": "",
            "done": True,
            "done_reason": reason,
        }

    @staticmethod
    def _final_chat(label: str, reason: DoneReason) -> dict[str, Any]:
        return {
            "model": label,
            "created_at": wire.rfc3339_utc(),
            "message": {"role": "assistant", "content": ""},
            "done": True,
            "done_reason": reason,
        }

    async def _respond(
        self,
        request: web.Request,
        gen: GenerationRequest,
        stream: bool,
        chunk: Callable[[Event], dict[str, Any]],
        final: Callable[[Done, Answer | None], dict[str, Any]],
    ) -> web.StreamResponse:
        async with aclosing(self.ctx.generator.run(gen)) as events:
            first = await first_event(events)
            if not stream:
                answer, done = await collect_answer(first, events)
                return wire.json_response(final(done, answer))

            def frames(event: Event) -> list[dict[str, Any]]:
                return [final(event, None) if isinstance(event, Done) else chunk(event)]

            return await wire.relay_events(
                wire.ndjson_stream(request),
                first,
                events,
                frames,
                lambda message: {"error": message},
                gen.entry.name.display,
            )


def ollama_logprobs(entries: list[TokenLogprob]) -> list[dict[str, Any]]:
    """Ollama's shape: token, logprob, bytes, and `top_logprobs` when alternatives were asked for."""
    out = []
    for entry in entries:
        item: dict[str, Any] = {"token": entry.text, "logprob": entry.logprob, "bytes": list(entry.raw)}
        if entry.top:
            item["top_logprobs"] = [
                {"token": t.text, "logprob": t.logprob, "bytes": list(t.raw)} for t in entry.top
            ]
        out.append(item)
    return out


def _chunk_with_logprobs(chunk: dict[str, Any], event: Event) -> dict[str, Any]:
    logprobs = getattr(event, "logprobs", None)
    if logprobs is not None:
        chunk["logprobs"] = ollama_logprobs(logprobs)
    return chunk


# ------------------------------------------------------------------------------------------------
# Embeddings: request parsing
# ------------------------------------------------------------------------------------------------


def embed_inputs(value: Any) -> list[str]:
    """`/api/embed` input: a string or an array of strings; "" and [] (and absent) mean none."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return list(value)
    raise BadRequest("invalid input type")
