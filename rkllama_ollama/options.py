"""Ollama `options`: names, types, validation and layering (defaults < Modelfile < request).

Choices where Ollama is stricter or odder than its clients:
- a type mismatch is a 400 naming the option (Ollama answers 500 from its scheduler path);
- `stop` may be a single string (Continue and Open WebUI send that) and is wrapped in a list;
- unknown keys are ignored (clients still send removed ones: mirostat, tfs_z, ...) and logged at debug.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from rkllama_ollama.models.modelfile import (  # the one table of Ollama's options and their types
    BOOL_OPTIONS,
    FLOAT_OPTIONS,
    INT_OPTIONS,
    KNOWN_OPTIONS,
    LIST_OPTIONS,
)
from rkllama_ollama.runtime.base import SamplingOptions

__all__ = [
    "BOOL_OPTIONS",
    "FLOAT_OPTIONS",
    "INT_OPTIONS",
    "KNOWN_OPTIONS",
    "LIST_OPTIONS",
    "OptionError",
    "layer_options",
    "sampling_from",
    "validate_options",
]

log = logging.getLogger(__name__)

_SAMPLING_FIELDS = {f.name for f in fields(SamplingOptions)}


class OptionError(ValueError):
    """A request option has the wrong type; the message names it."""


def _number(key: str, value: Any, kind: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise OptionError(f'option "{key}" must be of type {kind}')
    return value


def validate_options(raw: Any) -> dict[str, Any]:
    """Check and normalise a request's `options` object. Nulls are skipped, unknown keys dropped."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise OptionError('"options" must be an object')
    result: dict[str, Any] = {}
    for key, value in raw.items():
        if value is None:
            continue
        if key in INT_OPTIONS:
            result[key] = int(_number(key, value, "integer"))
        elif key in FLOAT_OPTIONS:
            result[key] = float(_number(key, value, "number"))
        elif key in BOOL_OPTIONS:
            if not isinstance(value, bool):
                raise OptionError(f'option "{key}" must be of type boolean')
            result[key] = value
        elif key == "stop":
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
                raise OptionError('option "stop" must be of type array')
            result[key] = [item for item in value if item]
        else:
            log.debug("ignoring unknown option %r", key)
    return result


def layer_options(modelfile_params: Mapping[str, Any], request: Mapping[str, Any]) -> dict[str, Any]:
    """Modelfile parameters, overridden by the request's options. Modelfile values are re-validated."""
    merged = validate_options({k: v for k, v in modelfile_params.items() if k in KNOWN_OPTIONS})
    merged.update(request)
    return merged


def sampling_from(options: Mapping[str, Any], grammar: str | None = None) -> SamplingOptions:
    values = {k: v for k, v in options.items() if k in _SAMPLING_FIELDS}
    if grammar is not None:
        values["grammar"] = grammar
    return SamplingOptions(**values)
