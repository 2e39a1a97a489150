"""`/api/create` request bodies -> a CreatePlan: the new model's name, its Modelfile and where it comes from.

Accepts Ollama's current JSON fields (`from`, `files`, `parameters`, `system`, ...) and the legacy
`modelfile` text. Every problem is a BadRequest (400) naming the field; api/ollama.py carries the plan
out through model_admin.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import orjson

from rkllama_ollama.api.ollama_fields import VALID_ROLES, digest_of, model_field
from rkllama_ollama.api.wire import BadRequest, field_of
from rkllama_ollama.models.modelfile import Modelfile, ModelfileError, parse_modelfile
from rkllama_ollama.models.names import ModelName, parse_name
from rkllama_ollama.models.store import (
    ENCODER_SUFFIX,
    PROJECTOR_PREFIX,
    WEIGHT_SUFFIXES,
    encoder_suffix_for,
)
from rkllama_ollama.options import KNOWN_OPTIONS, OptionError, validate_options


@dataclass
class CreatePlan:
    """A validated `/api/create` request."""

    name: ModelName
    modelfile: Modelfile  # fields that override the base model's (FROM left empty)
    base: str | None = None  # an existing model to derive from
    blob: tuple[str, str | None] | None = None  # (sha256 hex, weights file name or None = detect)
    # (sha256 hex, file name): a vision model's image encoder (*.rknn) or projector (*.gguf)
    encoder: tuple[str, str] | None = None


def _create_blob_from_files(files: dict[str, Any]) -> tuple[tuple[str, str | None], tuple[str, str] | None]:
    """(the weights blob, the vision encoder blob or None) named in `files`: a *.rknn encoder with
    *.rkllm weights, or a second *.gguf (the projector; the store tells it by its architecture)."""
    weights: list[tuple[str, str]] = []
    encoders: list[tuple[str, str]] = []
    for file_name, digest in files.items():
        path = PurePosixPath(file_name.replace("\\", "/"))
        if not file_name or path.is_absolute() or ".." in path.parts:
            raise BadRequest("file path must be relative")
        if not isinstance(digest, str):
            raise BadRequest("invalid digest format")
        hex_digest = digest_of(digest)
        name = path.name.lower()
        if name.endswith(ENCODER_SUFFIX) or (name.startswith(PROJECTOR_PREFIX) and name.endswith(".gguf")):
            encoders.append((hex_digest, path.name))
            continue
        if not name.endswith(WEIGHT_SUFFIXES):
            raise BadRequest(
                f"unsupported file {file_name!r}: only *.gguf and *.rkllm weights (and a *.rknn vision "
                "encoder or a GGUF projector) can be imported"
            )
        weights.append((hex_digest, path.name))
    if len(weights) == 2 and not encoders and all(w[1].lower().endswith(".gguf") for w in weights):
        encoders.append(weights.pop())  # two GGUF files: one is the projector
    if len(weights) != 1:
        raise BadRequest("exactly one weights file (*.gguf or *.rkllm) must be given in 'files'")
    if len(encoders) > 1:
        raise BadRequest("at most one vision encoder (*.rknn or projector *.gguf) may be given in 'files'")
    if encoders:
        suffix = encoder_suffix_for(weights[0][1])
        if not encoders[0][1].lower().endswith(suffix):
            if suffix == ENCODER_SUFFIX:
                raise BadRequest("a *.gguf projector goes with *.gguf weights")
            raise BadRequest("a *.rknn vision encoder goes with *.rkllm weights")
    return weights[0], encoders[0] if encoders else None


def _create_parameters(raw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Known options typed and checked; unknown keys kept as text (Ollama passes them through)."""
    known = {key: value for key, value in raw.items() if key in KNOWN_OPTIONS}
    extra = {
        str(key): value if isinstance(value, str) else orjson.dumps(value).decode()
        for key, value in raw.items()
        if key not in KNOWN_OPTIONS and value is not None
    }
    try:
        return validate_options(known), extra
    except OptionError as exc:
        raise BadRequest(str(exc)) from None


def _create_messages(raw: list[Any]) -> list[dict[str, str]]:
    messages = []
    for index, message in enumerate(raw):
        if not isinstance(message, dict):
            raise BadRequest(f"messages[{index}] must be an object")
        role = message.get("role")
        content = message.get("content") or ""
        if not isinstance(role, str) or role.lower() not in VALID_ROLES:
            raise BadRequest(f'messages[{index}].role must be one of "system", "user", "assistant", "tool"')
        if not isinstance(content, str):
            raise BadRequest(f"messages[{index}].content must be a string")
        messages.append({"role": role.lower(), "content": content})
    return messages


def parse_create(body: dict[str, Any]) -> CreatePlan:
    """Validate an `/api/create` body (current JSON fields, or the legacy `modelfile` text)."""
    label = model_field(body)
    if not label:
        raise BadRequest("model is required")
    name = parse_name(label)
    if body.get("quantize") or body.get("quantization"):
        raise BadRequest("quantization is not supported")
    if body.get("adapters"):
        raise BadRequest("adapters are not supported")
    text = field_of(body, "modelfile", str, "a string")
    try:
        modelfile = parse_modelfile(text) if text else Modelfile()
    except ModelfileError as exc:
        raise BadRequest(str(exc)) from None
    legacy_from, modelfile.from_ = modelfile.from_, ""
    if modelfile.adapters:
        raise BadRequest("adapters are not supported")
    for key in ("system", "template"):
        value = field_of(body, key, str, "a string")
        if value is not None:
            setattr(modelfile, key, value)
    license_text = body.get("license")
    if isinstance(license_text, list) and all(isinstance(item, str) for item in license_text):
        license_text = "\n".join(license_text)
    if license_text is not None and not isinstance(license_text, str):
        raise BadRequest('"license" must be a string or an array of strings')
    if license_text:
        modelfile.license = license_text
    parameters = field_of(body, "parameters", dict, "an object")
    if parameters:
        known, extra = _create_parameters(parameters)
        modelfile.parameters.update(known)
        modelfile.extra.update(extra)
    messages = field_of(body, "messages", list, "an array of messages")
    if messages:
        modelfile.messages = _create_messages(messages)
    base = field_of(body, "from", str, "a string") or None
    files = field_of(body, "files", dict, "an object mapping file names to digests")
    plan = CreatePlan(name=name, modelfile=modelfile, base=base)
    modelfile.projector = None  # a FROM line's file name: the encoder comes from 'files' or the base
    if files:
        plan.blob, plan.encoder = _create_blob_from_files(files)
    elif base is None and legacy_from:
        digest = legacy_from.lstrip("@")
        if digest.startswith("sha256"):
            plan.blob = (digest_of(digest), None)
        else:
            plan.base = legacy_from
    if plan.blob is None and plan.base is None:
        raise BadRequest("neither 'from' or 'files' was specified")
    return plan
