"""keep_alive values as Ollama accepts them: seconds as a number, or a Go duration string."""

from __future__ import annotations

import math
import re

_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
FOREVER = math.inf


def parse_go_duration(text: str) -> float:
    """Parse a Go `time.ParseDuration` string into seconds. Raises ValueError with Go's wording."""
    original = text
    text = text.strip()
    sign = 1.0
    if text[:1] in ("+", "-"):
        sign = -1.0 if text[0] == "-" else 1.0
        text = text[1:]
    if text == "0":
        return 0.0
    if not text:
        raise ValueError(f'time: invalid duration "{original}"')
    total = 0.0
    pos = 0
    while pos < len(text):
        match = _PART.match(text, pos)
        if match is None:
            if re.fullmatch(r"\d+(?:\.\d*)?", text[pos:]):
                raise ValueError(f'time: missing unit in duration "{original}"')
            raise ValueError(f'time: invalid duration "{original}"')
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    return sign * total


def parse_keep_alive(value: object) -> float:
    """Seconds to keep a model loaded; negative means forever. Raises ValueError on a bad value."""
    if isinstance(value, bool):
        raise ValueError("keep_alive must be a number or a duration string")
    if isinstance(value, (int, float)):
        if math.isnan(value):
            raise ValueError("keep_alive must be a number or a duration string")
        return float(value)
    if isinstance(value, str):
        return parse_go_duration(value)
    raise ValueError("keep_alive must be a number or a duration string")
