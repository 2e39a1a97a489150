"""Request fields that several Ollama endpoints read alike: the model name, a blob digest, message roles.

Shared by api/ollama.py and api/create_request.py (which must not import api/ollama.py).
"""

from __future__ import annotations

from typing import Any

from rkllama_ollama.api.wire import BadRequest
from rkllama_ollama.models.blobs import BlobError, parse_digest

VALID_ROLES = ("system", "user", "assistant", "tool")


def model_field(body: dict[str, Any]) -> str:
    """`model`, or the legacy `name` (empty strings count as absent)."""
    for key in ("model", "name"):
        value = body.get(key)
        if value is None or value == "":
            continue
        if not isinstance(value, str):
            raise BadRequest(f'"{key}" must be a string')
        return value
    return ""


def digest_of(text: str) -> str:
    """A blob digest from the request (`sha256:<hex>` / `sha256-<hex>`); 400 when malformed."""
    try:
        return parse_digest(text)
    except BlobError as exc:
        raise BadRequest(str(exc)) from None
