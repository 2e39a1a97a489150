"""Text shapes of the CLI's output: human sizes and times, plain tables, a download progress bar."""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

SIZE_UNITS = ("B", "KB", "MB", "GB", "TB", "PB")
FOREVER_AFTER_YEARS = 20  # an expiry further away than this is a "forever" keep_alive
TABLE_GAP = "    "
BAR_WIDTH = 25


def human_bytes(size: int | float) -> str:
    """Decimal units like Ollama: `512 B`, `98 MB`, `2.0 GB`, `1.5 GB`."""
    value = float(size)
    unit = SIZE_UNITS[0]
    for unit in SIZE_UNITS:
        if abs(value) < 1000 or unit == SIZE_UNITS[-1]:
            break
        value /= 1000
    if unit == "B" or abs(value) >= 10 or value == int(value):
        return f"{int(value)} {unit}"
    return f"{value:.1f} {unit}"


def human_duration(seconds: float) -> str:
    """A rough span: `Less than a second`, `5 seconds`, `About a minute`, `3 hours`, `2 weeks`."""
    whole = int(seconds)
    if whole < 1:
        return "Less than a second"
    if whole < 60:
        return "1 second" if whole == 1 else f"{whole} seconds"
    minutes = whole // 60
    if minutes < 60:
        return "About a minute" if minutes == 1 else f"{minutes} minutes"
    hours = round(seconds / 3600)
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    days = hours // 24
    if days < 14:
        return f"{days} days"
    if days < 60:
        return f"{days // 7} weeks"
    if days < 730:
        return f"{days // 30} months"
    return f"{days // 365} years"


def parse_time(text: str | None) -> dt.datetime | None:
    """An RFC 3339 time from the API (`Z` or an offset, up to 9 fractional digits), or None."""
    if not text:
        return None
    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def human_time(when: dt.datetime | None, now: dt.datetime | None = None, never: str = "Never") -> str:
    """`2 minutes ago`, `4 minutes from now`, `Forever` (far future), or `never` for no time."""
    if when is None:
        return never
    now = now or dt.datetime.now(dt.UTC)
    delta = (now - when).total_seconds()
    if -delta > FOREVER_AFTER_YEARS * 365 * 86400:
        return "Forever"
    if delta < 0:
        return f"{human_duration(-delta)} from now"
    return f"{human_duration(delta)} ago"


def short_id(digest: str | None) -> str:
    """The ID column: the first 12 hex digits of the digest (any `sha256:` prefix dropped)."""
    return (digest or "").removeprefix("sha256:")[:12]


def table(header: list[str], rows: list[list[str]]) -> str:
    """Left-aligned columns separated by four spaces, no borders (the shape of `ollama list`)."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)]
        lines.append(TABLE_GAP.join(cells).rstrip())
    return "\n".join(lines) + "\n"


def processor_text(size: int, size_vram: int, accelerator: str = "NPU") -> str:
    """`100% CPU`, `100% NPU` or `25%/75% CPU/NPU` from the memory split of /api/ps."""
    if size <= 0 or size_vram <= 0:
        return "100% CPU"
    if size_vram >= size:
        return f"100% {accelerator}"
    accel = round(100 * size_vram / size)
    return f"{100 - accel}%/{accel}% CPU/{accelerator}"


def progress_bar(completed: int, total: int, width: int = BAR_WIDTH) -> str:
    """`▕████████▏` filled by completed/total."""
    fraction = 0.0 if total <= 0 else min(1.0, max(0.0, completed / total))
    filled = int(fraction * width)
    return "▕" + "█" * filled + " " * (width - filled) + "▏"


def progress_line(status: str, completed: int, total: int, rate: float | None = None) -> str:
    """`pulling 6a0746a1ec1a:  45% ▕█████     ▏ 912 MB/2.0 GB  12 MB/s`."""
    percent = 0 if total <= 0 else int(100 * min(completed, total) / total)
    line = (
        f"{status}: {percent:3d}% {progress_bar(completed, total)} "
        f"{human_bytes(completed)}/{human_bytes(total)}"
    )
    if rate and completed < total:
        line += f"  {human_bytes(rate)}/s"
    return line


@dataclass
class PullProgress:
    """Draws Ollama's pull/create events: one bar per layer (`digest`), one line per other status.

    On a terminal the current bar is redrawn in place; elsewhere (logs, pipes) a bar line is printed
    at every tenth of the way, so the output stays short.
    """

    out: TextIO
    interactive: bool
    _status: str | None = None
    _open_bar: bool = False
    _last_decile: int = -1
    _started: dict[str, tuple[float, int]] = field(default_factory=dict)

    def update(self, event: dict[str, object]) -> None:
        status = str(event.get("status") or "")
        digest = event.get("digest")
        total = _int(event.get("total"))
        if digest and total > 0:
            self._bar(status, str(digest), _int(event.get("completed")), total)
            return
        if status and status != self._status:
            self._end_bar()
            self.out.write(status + "\n")
            self.out.flush()
            self._status = status

    def _bar(self, status: str, digest: str, completed: int, total: int) -> None:
        if status != self._status:
            self._end_bar()
            self._status = status
            self._last_decile = -1
            self._started[digest] = (time.monotonic(), completed)
        begin, first = self._started.get(digest, (time.monotonic(), completed))
        elapsed = time.monotonic() - begin
        rate = (completed - first) / elapsed if elapsed > 0.5 else None
        line = progress_line(status, completed, total, rate)
        if self.interactive:
            self.out.write("\r\x1b[K" + line)
            self._open_bar = True
        else:
            decile = 10 * min(completed, total) // total
            if decile == self._last_decile:
                return
            self._last_decile = decile
            self.out.write(line + "\n")
        self.out.flush()

    def _end_bar(self) -> None:
        if self._open_bar:
            self.out.write("\n")
            self._open_bar = False

    def close(self) -> None:
        self._end_bar()
        self.out.flush()


def _int(value: object) -> int:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0


def _rows_section(title: str, rows: list[tuple[str, str]]) -> str:
    if not rows:
        return ""
    width = max(len(key) for key, _ in rows) + 4
    lines = [f"  {title}", *(f"    {key:<{width}}{value}".rstrip() for key, value in rows)]
    return "\n".join(lines) + "\n\n"


def _lines_section(title: str, lines: list[str]) -> str:
    if not lines:
        return ""
    return "\n".join([f"  {title}", *(f"    {line}" for line in lines)]) + "\n\n"


def _mapping(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _first_lines(text: object, count: int) -> list[str]:
    return [line for line in str(text or "").splitlines()[:count] if line.strip()]


def show_info(info: dict[str, Any]) -> str:
    """`show MODEL` / `/show info`: Model, Capabilities, Parameters, System and License sections."""
    details = _mapping(info.get("details"))
    model_info = _mapping(info.get("model_info"))
    arch = str(model_info.get("general.architecture") or details.get("family") or "")
    model_rows = [
        ("architecture", arch),
        ("parameters", str(details.get("parameter_size") or "")),
        ("context length", str(model_info.get(f"{arch}.context_length") or "")),
        ("embedding length", str(model_info.get(f"{arch}.embedding_length") or "")),
        ("quantization", str(details.get("quantization_level") or "")),
    ]
    capabilities = [str(c) for c in info.get("capabilities") or []]
    parameters = [line for line in str(info.get("parameters") or "").splitlines() if line.strip()]
    text = (
        _rows_section("Model", [(key, value) for key, value in model_rows if value])
        + _lines_section("Capabilities", capabilities)
        + _lines_section("Parameters", parameters)
        + _lines_section("System", _first_lines(info.get("system"), 2))
        + _lines_section("License", _first_lines(info.get("license"), 2))
    )
    return text or "\n"
