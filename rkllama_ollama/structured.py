"""Structured output: `format: "json"` or a JSON schema, on both engines.

GGUF models get real constrained decoding: the schema travels as JSON text in
`SamplingOptions.json_schema` and the llama.cpp engine turns it into a grammar inside the runner child
(the server process never imports llama_cpp). `.rkllm` models cannot be constrained, so the prompt asks
for the schema and the answer is checked afterwards: an answer that is not JSON, or does not match the
schema, is an error and is never returned as if it were valid.

Not done yet: on GGUF the grammar applies from the first token, so a thinking model cannot think
before answering (Ollama constrains only the answer); that needs a grammar switched on in the runner
once the parser sees the end of the thinking block.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import jsonschema
import orjson

log = logging.getLogger(__name__)

# `format`: any JSON value ("json") or a JSON schema, already checked by check_format.
Format = Literal["json"] | dict[str, Any]

ANY_JSON_OBJECT = "{}"  # the schema text meaning `format: "json"` (llama.cpp's JSON grammar: one object)


class FormatError(ValueError):
    """The requested format is not "json" or a valid JSON schema (a 400)."""


class InvalidStructuredAnswer(ValueError):
    """The model's answer is not JSON matching the requested format."""


def check_format(value: Any) -> Format | None:
    """Validate a request's `format`: None/"" -> None, "json", or a JSON schema object."""
    if value is None or value == "":
        return None
    if value == "json":
        return "json"
    if isinstance(value, dict):
        try:
            jsonschema.validators.validator_for(value).check_schema(value)
        except jsonschema.SchemaError as exc:
            raise FormatError(f"invalid JSON schema in format: {exc.message}") from None
        return value
    raise FormatError(
        f'invalid format {orjson.dumps(value).decode()}; expected "json" or a valid JSON Schema object'
    )


def schema_text(fmt: Format) -> str:
    """What goes into `SamplingOptions.json_schema`."""
    if not isinstance(fmt, dict):  # "json"
        return ANY_JSON_OBJECT
    return orjson.dumps(fmt).decode()


def guidance(fmt: Format) -> str:
    """The instruction added to the prompt of models that cannot be constrained."""
    if isinstance(fmt, dict):
        return (
            "Respond only with a JSON value that matches this JSON schema, with no other text: "
            + orjson.dumps(fmt).decode()
        )
    return "Respond only with a JSON object, with no other text."


def guided_system(system: str | None, fmt: Format) -> str:
    """A system prompt with the format instruction appended."""
    return f"{system or ''}\n\n{guidance(fmt)}".lstrip()


def guided_messages(messages: list[dict[str, Any]], fmt: Format) -> list[dict[str, Any]]:
    """The chat with the format instruction appended to the system message (or a new one first)."""
    result = [dict(m) for m in messages]
    if result and result[0].get("role") == "system":
        result[0]["content"] = guided_system(result[0].get("content"), fmt)
    else:
        result.insert(0, {"role": "system", "content": guided_system(None, fmt)})
    return result


def _without_code_fence(text: str) -> str:
    """Models often wrap JSON in a Markdown code fence; the JSON inside is what was asked for."""
    stripped = text.strip()
    if stripped.startswith("```") and stripped.endswith("```") and len(stripped) >= 6:
        body = stripped[3:-3]
        first_line, _, rest = body.partition("\n")
        if first_line.strip().isalpha() or not first_line.strip():
            body = rest
        return body.strip()
    return stripped


def validated_answer(text: str, fmt: Format) -> str:
    """The answer as JSON text when it matches `fmt`; raises InvalidStructuredAnswer otherwise."""
    candidate = _without_code_fence(text)
    try:
        value = orjson.loads(candidate)
    except orjson.JSONDecodeError:
        raise InvalidStructuredAnswer("the model's answer is not valid JSON") from None
    if fmt == "json":
        if not isinstance(value, dict):
            raise InvalidStructuredAnswer("the model's answer is not a JSON object")
        return candidate
    assert isinstance(fmt, dict)
    validator = jsonschema.validators.validator_for(fmt)(fmt)
    error = jsonschema.exceptions.best_match(validator.iter_errors(value))
    if error is not None:
        where = "/".join(str(part) for part in error.absolute_path) or "(root)"
        raise InvalidStructuredAnswer(
            f"the model's answer does not match the JSON schema at {where}: {error.message}"
        )
    return candidate
