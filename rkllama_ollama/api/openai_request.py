"""OpenAI `/v1` request bodies -> the daemon's own inputs (messages, options, format, think).

Facts and error texts follow Ollama's OpenAI compatibility layer (docs/ollama-conformance.md #43-46).
Every problem is a BadRequest (400 in the OpenAI envelope) naming the field.
"""

from __future__ import annotations

import math
from typing import Any

import orjson

from rkllama_ollama.api.wire import BadRequest, field_of
from rkllama_ollama.structured import Format, FormatError, check_format

VALID_ROLES = ("system", "user", "assistant", "tool", "developer")
DATA_URL_PREFIXES: tuple[str, ...] = (
    "data:image/png;base64,",
    "data:image/jpeg;base64,",
    "data:image/jpg;base64,",
)
DATA_URL_PREFIXES += ("data:image/webp;base64,", "data:;base64,")
REASONING_EFFORTS: dict[str, bool | str] = {
    "none": False,
    "minimal": "low",
    "low": "low",
    "medium": "medium",
    "high": "high",
    "max": "max",
    "xhigh": "max",
    "ultra": "max",
}


def go_type(value: Any) -> str:
    """The Go type name Ollama prints for a decoded JSON value (its error texts quote it)."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "float64"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "[]interface {}"
    if isinstance(value, dict):
        return "map[string]interface {}"
    return "<nil>"


def model_of(body: dict[str, Any]) -> str:
    model = field_of(body, "model", str, "a string")
    if not model:
        raise BadRequest("model is required")
    return str(model)


# -- messages ---------------------------------------------------------------------------------------


def _image_of(part: dict[str, Any]) -> str:
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str):
        raise BadRequest("invalid image input")
    for prefix in DATA_URL_PREFIXES:
        if url.startswith(prefix):
            return url[len(prefix) :]
    if url.startswith(("http://", "https://")):
        raise BadRequest("image URLs are not currently supported, please use base64 encoded data instead")
    raise BadRequest("invalid image input")


def _content_of(content: Any) -> tuple[str, list[str]]:
    """Text and base64 images of a message's `content` (a string or an array of parts)."""
    if content is None or isinstance(content, str):
        return content or "", []
    if not isinstance(content, list):
        raise BadRequest(f"invalid message content type: {go_type(content)}")
    texts: list[str] = []
    images: list[str] = []
    for part in content:
        if not isinstance(part, dict):
            raise BadRequest("invalid message format")
        kind = part.get("type")
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise BadRequest("invalid message format")
            texts.append(text)
        elif kind == "image_url":
            images.append(_image_of(part))
        elif kind == "input_audio":
            raise BadRequest("audio input is not supported")
        else:
            raise BadRequest("invalid message format")
    return "\n".join(texts), images


def _tool_calls_of(calls: Any) -> list[dict[str, Any]]:
    """Assistant `tool_calls` with JSON-string arguments -> Ollama's form (arguments as an object)."""
    if not isinstance(calls, list):
        raise BadRequest("invalid tool call arguments")
    converted: list[dict[str, Any]] = []
    for index, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise BadRequest("invalid tool call arguments")
        arguments = function.get("arguments")
        if not isinstance(arguments, str):
            raise BadRequest("invalid tool call arguments")
        try:
            parsed = orjson.loads(arguments) if arguments.strip() else {}
        except orjson.JSONDecodeError:
            raise BadRequest("invalid tool call arguments") from None
        if not isinstance(parsed, dict):
            raise BadRequest("invalid tool call arguments")
        item: dict[str, Any] = {"function": {"index": index, "name": function["name"], "arguments": parsed}}
        if isinstance(call.get("id"), str):
            item["id"] = call["id"]
        converted.append(item)
    return converted


def messages_of(body: dict[str, Any]) -> list[dict[str, Any]]:
    raw = body.get("messages")
    if raw is None or raw == []:
        raise BadRequest("[] is too short - 'messages'")
    if not isinstance(raw, list):
        raise BadRequest(f"invalid type for 'messages' field: {go_type(raw)}")
    tool_names: dict[str, str] = {}
    messages: list[dict[str, Any]] = []
    for message in raw:
        if not isinstance(message, dict):
            raise BadRequest("invalid message format")
        role = message.get("role")
        if not isinstance(role, str) or role.lower() not in VALID_ROLES:
            raise BadRequest(f"invalid role: {orjson.dumps(role).decode()}")
        role = "system" if role.lower() == "developer" else role.lower()
        text, images = _content_of(message.get("content"))
        cleaned: dict[str, Any] = {"role": role, "content": text}
        if images:
            cleaned["images"] = images
        if isinstance(message.get("reasoning"), str):
            cleaned["thinking"] = message["reasoning"]
        if message.get("tool_calls"):
            cleaned["tool_calls"] = _tool_calls_of(message["tool_calls"])
            for call in cleaned["tool_calls"]:
                if "id" in call:
                    tool_names[call["id"]] = call["function"]["name"]
        call_id = message.get("tool_call_id")
        if role == "tool" and isinstance(call_id, str):
            cleaned["tool_call_id"] = call_id
            if call_id in tool_names:
                cleaned["tool_name"] = tool_names[call_id]
        if isinstance(message.get("name"), str) and role == "tool" and "tool_name" not in cleaned:
            cleaned["tool_name"] = message["name"]
        messages.append(cleaned)
    return messages


def tools_of(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    tools = field_of(body, "tools", list, "an array of tool definitions")
    if not tools:
        return None
    for tool in tools:
        if not isinstance(tool, dict) or not isinstance(tool.get("function"), dict):
            raise BadRequest('"tools" must be an array of {"type": "function", "function": {...}} objects')
    return list(tools)


# -- options ----------------------------------------------------------------------------------------


def _number(body: dict[str, Any], key: str) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRequest(f"invalid type for '{key}' field: {go_type(value)}")
    return float(value)


def stop_of(body: dict[str, Any]) -> list[str] | None:
    value = body.get("stop")
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise BadRequest(f"invalid type for 'stop' field: {go_type(value)}")
    for item in value:
        if not isinstance(item, str):
            raise BadRequest(f"invalid type for 'stop' field: {go_type(item)}")
    return [item for item in value if item]


def options_of(body: dict[str, Any], *, top_p_zero_is_default: bool = False) -> dict[str, Any]:
    """Sampling options in Ollama's names. temperature and top_p default to 1.0 (OpenAI's defaults)."""
    options: dict[str, Any] = {}
    max_tokens = _number(body, "max_tokens")
    if max_tokens is None:
        max_tokens = _number(body, "max_completion_tokens")
    if max_tokens is not None:
        options["num_predict"] = int(max_tokens)
    seed = _number(body, "seed")
    if seed is not None:
        options["seed"] = int(seed)
    stop = stop_of(body)
    if stop is not None:
        options["stop"] = stop
    temperature = _number(body, "temperature")
    options["temperature"] = 1.0 if temperature is None else temperature
    top_p = _number(body, "top_p")
    options["top_p"] = 1.0 if top_p is None or (top_p_zero_is_default and top_p == 0) else top_p
    for key in ("frequency_penalty", "presence_penalty"):
        value = _number(body, key)
        if value is not None:
            options[key] = value
    return options


def stream_of(body: dict[str, Any]) -> tuple[bool, bool]:
    """(`stream`, `stream_options.include_usage`)."""
    stream = field_of(body, "stream", bool, "a boolean") is True
    stream_options = field_of(body, "stream_options", dict, "an object") or {}
    include_usage = stream_options.get("include_usage") is True
    return stream, include_usage


def think_of(body: dict[str, Any]) -> bool | str | None:
    """`reasoning_effort` or `reasoning.effort`: none -> off, minimal -> low, xhigh/ultra -> max."""
    effort = body.get("reasoning_effort")
    reasoning = body.get("reasoning")
    if effort is None and isinstance(reasoning, dict):
        effort = reasoning.get("effort")
    if effort is None:
        return None
    if not isinstance(effort, str) or effort not in REASONING_EFFORTS:
        raise BadRequest(
            f"invalid reasoning value: {orjson.dumps(effort).decode()} "
            "(must be one of none, minimal, low, medium, high, max)"
        )
    return REASONING_EFFORTS[effort]


def format_of(body: dict[str, Any]) -> Format | None:
    """`response_format`: json_object -> "json", json_schema -> its schema, text -> none."""
    value = body.get("response_format")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise BadRequest(f"invalid type for 'response_format' field: {go_type(value)}")
    kind = value.get("type")
    try:
        if kind == "json_object":
            return check_format("json")
        if kind == "json_schema":
            spec = value.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, dict):
                raise BadRequest("response_format json_schema needs a 'json_schema.schema' object")
            return check_format(schema)
    except FormatError as exc:
        raise BadRequest(str(exc)) from None
    if kind == "text" or kind is None:
        return None
    raise BadRequest(f"invalid response_format type: {orjson.dumps(kind).decode()}")


def _checked_top_logprobs(value: int | None) -> int:
    if value is not None and not 0 <= value <= 20:
        raise BadRequest("top_logprobs must be between 0 and 20")
    return value or 0


def chat_logprobs_of(body: dict[str, Any]) -> int:
    """Chat's `logprobs` (bool) and `top_logprobs` (0-20): -1 = none, else the alternatives per token."""
    top = _checked_top_logprobs(field_of(body, "top_logprobs", int, "an integer"))
    return top if field_of(body, "logprobs", bool, "a boolean") else -1


def completion_logprobs_of(body: dict[str, Any]) -> int:
    """Completions' `logprobs` is the number of alternatives per token (absent or null = none)."""
    value = field_of(body, "logprobs", int, "an integer")
    return -1 if value is None else _checked_top_logprobs(value)
