"""Wire helpers: the cheap `created_at` clock formats exactly like the general formatter."""

from __future__ import annotations

import datetime as dt
import re

from hypothesis import given
from hypothesis import strategies as st

from rkllama_ollama.api import wire

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
CREATED_AT = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{0,5}[1-9])?Z$")


def datetime_formatted(moment: dt.datetime) -> str:
    """The slow, obvious formatting, as the reference."""
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if moment.microsecond:
        text += f".{moment.microsecond:06d}".rstrip("0")
    return text + "Z"


@given(st.integers(min_value=0, max_value=4_102_444_800 * 10**9))  # up to 2100
def test_clock_matches_the_datetime_formatter(unix_ns: int) -> None:
    moment = EPOCH + dt.timedelta(microseconds=unix_ns // 1000)
    clock = wire._UtcClock()
    assert clock.at(unix_ns) == datetime_formatted(moment)


def test_clock_reuses_its_second_but_not_across_seconds() -> None:
    clock = wire._UtcClock()
    base = 1_764_095_681 * 10**9  # 2025-11-25T18:34:41Z
    assert clock.at(base) == "2025-11-25T18:34:41Z"
    assert clock.at(base + 196_249_000) == "2025-11-25T18:34:41.196249Z"
    assert clock.at(base + 500_000_000) == "2025-11-25T18:34:41.5Z"
    assert clock.at(base + 10**9 + 1_000) == "2025-11-25T18:34:42.000001Z"
    assert clock.at(base - 10**9) == "2025-11-25T18:34:40Z"  # clocks may step back


def test_now_is_utc_and_go_shaped() -> None:
    before = dt.datetime.now(dt.UTC).replace(microsecond=0)
    text = wire.rfc3339_utc()
    assert CREATED_AT.match(text), text
    parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    assert before <= parsed <= dt.datetime.now(dt.UTC)
