"""OpenAI Responses API request bodies (`POST /v1/responses`) -> the daemon's own inputs.

What is read, as Ollama reads it (docs/ollama-parity.md): `instructions` (a system message first),
`input` (a string, or an array of items: messages, `function_call`, `function_call_output` and
`reasoning`), function `tools`, `max_output_tokens` (-> num_predict), `temperature` (default 1.0),
`top_p`, `reasoning.effort` (-> think), `text.format` (json_object / json_schema) and `stream`.
Nothing is stored, so `previous_response_id`, `conversation` and `background` are refused by name.
Every problem is a BadRequest (400 in OpenAI's envelope) naming the field or the input item.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import orjson

from rkllama_ollama.api.openai_request import _image_of, go_type, model_of, think_of
from rkllama_ollama.api.wire import BadRequest, field_of
from rkllama_ollama.structured import Format, FormatError, check_format

MESSAGE_ROLES = ("user", "system", "developer", "assistant")
TEXT_PARTS = ("input_text", "output_text")
UNSTORED = ("previous_response_id", "conversation")


@dataclass(frozen=True)
class ResponsesRequest:
    """A checked `/v1/responses` body: chat messages and tools in Ollama's shapes, plus what the
    response object echoes back."""

    model: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    options: dict[str, Any]
    think: bool | str | None
    format: Format | None
    stream: bool
    echo: dict[str, Any]  # request fields the response object repeats (instructions, tools, ...)


def _json_text(value: Any) -> str:
    """A value as JSON in an error message (any Python value a body can hold, big integers included)."""
    return json.dumps(value, ensure_ascii=False, default=str)


def _text_of(content: Any, where: str) -> tuple[str, list[str]]:
    """Text and base64 images of a message's content (the field at `where`): a string or an array of
    content parts."""
    if content is None or isinstance(content, str):
        return content or "", []
    if not isinstance(content, list):
        raise BadRequest(f"{where} must be a string or an array, not {go_type(content)}")
    texts: list[str] = []
    images: list[str] = []
    for index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in TEXT_PARTS:
            assert isinstance(part, dict)
            if not isinstance(part.get("text"), str):
                raise BadRequest(f"{where}[{index}].text must be a string")
            texts.append(part["text"])
        elif kind == "input_image":
            assert isinstance(part, dict)
            if part.get("image_url") is None:
                raise BadRequest(f"{where}[{index}]: only image_url images are supported")
            images.append(_image_of(part))
        elif kind == "input_file":
            raise BadRequest(f"{where}[{index}]: file inputs are not supported")
        else:
            raise BadRequest(f"{where}[{index}]: unknown content type: {_json_text(kind)}")
    return "".join(texts), images


def _reasoning_text(item: dict[str, Any]) -> str:
    """The thinking of a `reasoning` item sent back: its summary, its content, or Ollama's plain
    `encrypted_content`."""
    for key in ("summary", "content"):
        parts = item.get(key)
        if isinstance(parts, list):
            text = "".join(p["text"] for p in parts if isinstance(p, dict) and isinstance(p.get("text"), str))
            if text:
                return text
    encrypted = item.get("encrypted_content")
    return encrypted if isinstance(encrypted, str) else ""


def _call_of(item: dict[str, Any], where: str) -> dict[str, Any]:
    """A `function_call` item -> an assistant tool call in Ollama's shape (arguments as an object)."""
    name = item.get("name")
    call_id = item.get("call_id")
    if not isinstance(name, str) or not name:
        raise BadRequest(f"{where}.name must be a non-empty string")
    if not isinstance(call_id, str) or not call_id:
        raise BadRequest(f"{where}.call_id must be a non-empty string")
    raw = item.get("arguments")
    if raw is None or raw == "":
        arguments: Any = {}
    elif not isinstance(raw, str):
        raise BadRequest(f"{where}.arguments must be a JSON string")
    else:
        try:
            arguments = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise BadRequest(f"{where}.arguments is not valid JSON") from None
    if not isinstance(arguments, dict):
        raise BadRequest(f"{where}.arguments must be a JSON object")
    return {"id": call_id, "function": {"name": name, "arguments": arguments}}


def messages_of(body: dict[str, Any]) -> list[dict[str, Any]]:
    """`instructions` and `input` as chat messages: function calls join the assistant turn before them
    (or open one), a `reasoning` item becomes the thinking of the next assistant turn."""
    messages: list[dict[str, Any]] = []
    instructions = field_of(body, "instructions", str, "a string")
    if instructions:
        messages.append({"role": "system", "content": instructions})
    raw = body.get("input")
    if isinstance(raw, str):
        if raw:
            messages.append({"role": "user", "content": raw})
        raw = []
    if raw is not None and not isinstance(raw, list):
        raise BadRequest(f'"input" must be a string or an array of input items, not {go_type(raw)}')
    call_names: dict[str, str] = {}
    thinking = ""
    for index, item in enumerate(raw or []):
        where = f"input[{index}]"
        if not isinstance(item, dict):
            raise BadRequest(f"{where} must be an object")
        kind = item.get("type") or ("message" if item.get("role") else None)
        if kind == "message":
            role = item.get("role")
            if role not in MESSAGE_ROLES:
                raise BadRequest(f'{where}.role must be one of "user", "system", "developer", "assistant"')
            text, images = _text_of(item.get("content"), f"{where}.content")
            message: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": text}
            if images:
                message["images"] = images
            if role == "assistant" and thinking:
                message["thinking"], thinking = thinking, ""
            messages.append(message)
        elif kind == "function_call":
            call = _call_of(item, where)
            call_names[call["id"]] = call["function"]["name"]
            last = messages[-1] if messages else None
            if last is None or last["role"] != "assistant":
                last = {"role": "assistant", "content": ""}
                messages.append(last)
            calls = last.setdefault("tool_calls", [])
            call["function"]["index"] = len(calls)
            calls.append(call)
            if thinking:
                last["thinking"], thinking = thinking, ""
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if not isinstance(call_id, str) or not call_id:
                raise BadRequest(f"{where}.call_id must be a non-empty string")
            text, images = _text_of(item.get("output"), f"{where}.output")
            result: dict[str, Any] = {"role": "tool", "content": text, "tool_call_id": call_id}
            if call_id in call_names:
                result["tool_name"] = call_names[call_id]
            if images:
                result["images"] = images
            messages.append(result)
        elif kind == "reasoning":
            thinking = _reasoning_text(item)
        elif kind is None:
            raise BadRequest(f"{where} needs a 'type' (or a 'role' for a message)")
        else:
            raise BadRequest(f"{where}: unknown input item type: {_json_text(kind)}")
    if thinking:
        messages.append({"role": "assistant", "content": "", "thinking": thinking})
    if not any(m["role"] != "system" for m in messages):
        raise BadRequest('"input" is required: a string or a non-empty array of input items')
    return messages


def tools_of(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Function tools (flat in the Responses API) -> chat tools (`{"type", "function": {...}}`);
    `tool_choice: "none"` sends none."""
    tools = field_of(body, "tools", list, "an array of tools")
    if not tools or body.get("tool_choice") == "none":
        return None
    converted: list[dict[str, Any]] = []
    for index, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise BadRequest(f"tools[{index}] must be an object")
        if tool.get("type") != "function":
            raise BadRequest(
                f"tools[{index}]: unsupported tool type {_json_text(tool.get('type'))} "
                '(only "function" tools are supported)'
            )
        name = tool.get("name")
        if not isinstance(name, str) or not name:
            raise BadRequest(f"tools[{index}].name must be a non-empty string")
        parameters = tool.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise BadRequest(f"tools[{index}].parameters must be an object")
        function: dict[str, Any] = {"name": name, "parameters": parameters or {"type": "object"}}
        if isinstance(tool.get("description"), str):
            function["description"] = tool["description"]
        converted.append({"type": "function", "function": function})
    return converted


def _number(body: dict[str, Any], key: str) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRequest(f'"{key}" must be a number')
    return float(value)


def options_of(body: dict[str, Any]) -> dict[str, Any]:
    """Sampling options in Ollama's names; temperature defaults to 1.0 (OpenAI's), top_p only when sent."""
    options: dict[str, Any] = {}
    max_output = field_of(body, "max_output_tokens", int, "an integer")
    if max_output is not None:
        if max_output <= 0:
            raise BadRequest('"max_output_tokens" must be greater than 0')
        options["num_predict"] = max_output
    temperature = _number(body, "temperature")
    options["temperature"] = 1.0 if temperature is None else temperature
    top_p = _number(body, "top_p")
    if top_p is not None:
        options["top_p"] = top_p
    return options


def format_of(body: dict[str, Any]) -> Format | None:
    """`text.format`: text -> none, json_object -> "json", json_schema -> its `schema`."""
    text = field_of(body, "text", dict, "an object")
    spec = (text or {}).get("format")
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise BadRequest('"text.format" must be an object')
    kind = spec.get("type")
    try:
        if kind == "json_object":
            return check_format("json")
        if kind == "json_schema":
            if not isinstance(spec.get("schema"), dict):
                raise BadRequest('"text.format" of type json_schema needs a "schema" object')
            return check_format(spec["schema"])
    except FormatError as exc:
        raise BadRequest(str(exc)) from None
    if kind == "text":
        return None
    raise BadRequest(f'invalid "text.format" type: {_json_text(kind)}')


def parse_request(body: dict[str, Any]) -> ResponsesRequest:
    model = model_of(body)
    for key in UNSTORED:
        if body.get(key) is not None:
            raise BadRequest(
                f'"{key}" is not supported: responses are not stored; send the whole conversation'
            )
    if field_of(body, "background", bool, "a boolean"):
        raise BadRequest('"background" is not supported: responses are not stored')
    reasoning = field_of(body, "reasoning", dict, "an object")
    stream = field_of(body, "stream", bool, "a boolean") is True
    messages = messages_of(body)
    tools = tools_of(body)
    options = options_of(body)
    fmt = format_of(body)  # checks `text` before it is echoed
    echo = {
        "instructions": body.get("instructions") or None,
        "tools": [tool for tool in body.get("tools") or []],
        "text": {"format": (body.get("text") or {}).get("format") or {"type": "text"}},
        "temperature": options["temperature"],
        "top_p": options.get("top_p", 1.0),
        "max_output_tokens": options.get("num_predict"),
        "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")}
        if reasoning
        else None,
        "truncation": body.get("truncation") or "disabled",
        "tool_choice": body.get("tool_choice") or "auto",
        "metadata": body.get("metadata") if isinstance(body.get("metadata"), dict) else {},
    }
    return ResponsesRequest(
        model=model,
        messages=messages,
        tools=tools,
        options=options,
        think=think_of(body),
        format=fmt,
        stream=stream,
        echo=echo,
    )
