"""Unit tests of the CLI's text shapes and REPL input handling (no daemon)."""

from __future__ import annotations

import datetime as dt
import io

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rkllama_ollama.cli.formatting import (
    PullProgress,
    human_bytes,
    human_duration,
    human_time,
    parse_time,
    processor_text,
    progress_line,
    short_id,
    show_info,
    table,
)
from rkllama_ollama.cli.repl import (
    ParameterError,
    duration_text,
    parameter_value,
    read_message,
    stats_text,
)

NOW = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0 B"),
        (999, "999 B"),
        (1000, "1 KB"),
        (1500, "1.5 KB"),
        (98_000_000, "98 MB"),
        (98_765_432, "98 MB"),
        (2_019_393_189, "2.0 GB"),
        (1_500_000_000, "1.5 GB"),
        (12_300_000_000_000, "12 TB"),
    ],
)
def test_human_bytes(size: int, text: str) -> None:
    assert human_bytes(size) == text


@given(st.integers(min_value=0, max_value=10**17))
def test_human_bytes_is_close_to_the_size(size: int) -> None:
    number, unit = human_bytes(size).split(" ")
    scale = 1000 ** ["B", "KB", "MB", "GB", "TB", "PB"].index(unit)
    assert (float(number) - 0.05) * scale <= size < (float(number) + 1) * scale
    assert float(number) < 1000 or unit == "PB"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.2, "Less than a second"),
        (1, "1 second"),
        (42, "42 seconds"),
        (90, "About a minute"),
        (125, "2 minutes"),
        (3600, "About an hour"),
        (5 * 3600, "5 hours"),
        (3 * 86400, "3 days"),
        (21 * 86400, "3 weeks"),
        (90 * 86400, "3 months"),
        (3 * 365 * 86400, "3 years"),
    ],
)
def test_human_duration(seconds: float, text: str) -> None:
    assert human_duration(seconds) == text


def test_human_time_past_future_forever_and_never() -> None:
    assert human_time(NOW - dt.timedelta(minutes=2, seconds=5), NOW) == "2 minutes ago"
    assert human_time(NOW + dt.timedelta(minutes=4, seconds=30), NOW) == "4 minutes from now"
    assert human_time(NOW + dt.timedelta(days=365 * 292), NOW) == "Forever"
    assert human_time(None, NOW) == "Never"


def test_parse_time_reads_the_api_forms() -> None:
    assert parse_time("2025-10-26T17:21:21.196249Z") == dt.datetime(
        2025, 10, 26, 17, 21, 21, 196249, tzinfo=dt.UTC
    )
    offset = parse_time("2025-05-10T08:06:48.639712-07:00")
    assert offset is not None and offset.utcoffset() == dt.timedelta(hours=-7)
    assert parse_time("") is None and parse_time("yesterday") is None


def test_short_id_and_processor() -> None:
    assert short_id("sha256:a80c4f17acd55265feec") == "a80c4f17acd5"
    assert short_id("a80c4f17acd55265feec") == "a80c4f17acd5"
    assert processor_text(100, 0) == "100% CPU"
    assert processor_text(100, 100) == "100% NPU"
    assert processor_text(100, 75) == "25%/75% CPU/NPU"


def test_table_is_left_aligned_with_four_space_gaps() -> None:
    text = table(["NAME", "ID"], [["tiny:latest", "abc"], ["x:1", "defghi"]])
    assert text.splitlines() == [
        "NAME           ID",
        "tiny:latest    abc",
        "x:1            defghi",
    ]


def test_progress_line_shape() -> None:
    line = progress_line("pulling 6a0746a1ec1a", 1_010_000_000, 2_019_393_189)
    assert line.startswith("pulling 6a0746a1ec1a:  50% ▕")
    assert line.endswith("▏ 1.0 GB/2.0 GB")


def test_pull_progress_off_a_terminal_prints_a_line_per_tenth_and_statuses() -> None:
    out = io.StringIO()
    progress = PullProgress(out, interactive=False)
    progress.update({"status": "pulling manifest"})
    for done in range(0, 1001, 10):
        event = {"status": "pulling abc", "digest": "sha256:abc", "total": 1000, "completed": done}
        progress.update(event)
    progress.update({"status": "success"})
    progress.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "pulling manifest"
    assert lines[-1] == "success"
    bars = [line for line in lines if line.startswith("pulling abc:")]
    assert len(bars) == 11  # 0%, 10%, ... 100%
    assert "100%" in bars[-1]


def test_pull_progress_on_a_terminal_redraws_in_place() -> None:
    out = io.StringIO()
    progress = PullProgress(out, interactive=True)
    for done in (0, 500, 1000):
        progress.update({"status": "pulling abc", "digest": "sha256:abc", "total": 1000, "completed": done})
    progress.update({"status": "success"})
    text = out.getvalue()
    assert text.count("\r") == 3
    assert text.endswith("100% ▕" + "█" * 25 + "▏ 1 KB/1 KB\nsuccess\n")
    assert "500 B/1 KB" in text


def test_show_info_sections() -> None:
    info = {
        "details": {"family": "llama", "parameter_size": "3.2B", "quantization_level": "Q4_K_M"},
        "model_info": {"general.architecture": "llama", "llama.context_length": 131072},
        "capabilities": ["completion", "tools"],
        "parameters": 'stop                           "<|eot_id|>"',
        "license": "LICENSE TEXT\nline 2\nline 3",
    }
    text = show_info(info)
    assert "  Model\n    architecture      llama\n" in text
    assert "    context length    131072\n" in text
    assert "  Capabilities\n    completion\n    tools\n" in text
    assert '    stop                           "<|eot_id|>"' in text
    assert "LICENSE TEXT" in text and "line 3" not in text
    assert "System" not in text


def lines_from(*typed: str):  # noqa: ANN201 - a fake `input`
    queue = list(typed)
    prompts: list[str] = []

    def read_line(prompt: str) -> str:
        prompts.append(prompt)
        if not queue:
            raise EOFError
        return queue.pop(0)

    return read_line, prompts


def test_read_message_single_line() -> None:
    read_line, prompts = lines_from("hello there")
    assert read_message(read_line) == "hello there"
    assert prompts == [">>> "]


def test_read_message_fenced_block_over_lines() -> None:
    read_line, prompts = lines_from('"""first', "second", 'third"""')
    assert read_message(read_line) == "first\nsecond\nthird"
    assert prompts == [">>> ", "... ", "... "]


def test_read_message_fence_on_one_line_and_bare_fences() -> None:
    assert read_message(lines_from('"""one line"""')[0]) == "one line"
    assert read_message(lines_from('"""', "a", "b", '"""')[0]) == "a\nb"


def test_parameter_values_are_typed_like_options() -> None:
    assert parameter_value("num_predict", ["5"]) == 5
    assert parameter_value("temperature", ["0.2"]) == 0.2
    assert parameter_value("stop", ["<|end|>", "User:"]) == ["<|end|>", "User:"]
    with pytest.raises(ParameterError, match="invalid int value"):
        parameter_value("num_predict", ["five"])
    with pytest.raises(ParameterError, match="unknown parameter"):
        parameter_value("wibble", ["1"])


def test_stats_text() -> None:
    text = stats_text({"total_duration": 1_500_000_000, "eval_count": 10, "eval_duration": 2_000_000_000})
    assert "total duration:       1.5s\n" in text
    assert "eval rate:            5.00 tokens/s\n" in text
    assert duration_text(850) == "850ns" and duration_text(3_275_150) == "3.27515ms"
    assert duration_text(123_500_000_000) == "2m3.5s"
