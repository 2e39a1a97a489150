"""Read what the RKLLM runtime printed while starting, and say what went wrong and how to fix it.

The runtime reports most start-up failures only as lines on stdout/stderr, and some releases even
return success from rkllm_init after printing them (docs/board-startup.md). `diagnose` turns those lines
into one StartupProblem: the cause in plain words, the fix, and the runtime's own line as evidence.
Pure Python: the server side uses it too, on what a runner printed before it crashed.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from rkllama_ollama.runtime.rkllm import npu


class Cause(enum.Enum):
    NO_DEVICE = "the NPU device could not be opened"
    BAD_MODEL = "the file is not a model this runtime can read"
    NPU_MEMORY = "the NPU memory is exhausted"
    LOAD_ERROR = "the runtime could not read the model file"
    PLATFORM_MISMATCH = "the model was converted for another SoC"
    DRIVER_TOO_OLD = "the RKNPU kernel driver is too old for this runtime"


@dataclass(frozen=True)
class StartupProblem:
    cause: Cause
    evidence: str  # the runtime's own line
    fix: str

    @property
    def fatal(self) -> bool:
        """A fatal problem means the model did not load, whatever rkllm_init returned."""
        return self.cause is not Cause.DRIVER_TOO_OLD

    def summary(self) -> str:
        return f"{self.cause.value} (the runtime said: {self.evidence.strip()})"

    def message(self) -> str:
        return f"{self.summary()}. Fix: {self.fix}"


def _no_device_fix(root: Path) -> str:
    return npu.device_access_fix(root)


def _fixed(text: str) -> Callable[[Path], str]:
    return lambda _root: text


# In priority order: the first cause whose pattern matches any line wins.
_RULES: list[tuple[Cause, re.Pattern[str], Callable[[Path], str]]] = [
    (
        Cause.NO_DEVICE,
        re.compile(r"failed to open rknpu module|failed to open rknn device|device is not available", re.I),
        _no_device_fix,
    ),
    (
        Cause.PLATFORM_MISMATCH,
        re.compile(r"target_platform does not match", re.I),
        _fixed(
            "use the build of this model for this board's SoC (rkllama-ollama doctor names both); "
            "an .rkllm file converted for another chip never loads"
        ),
    ),
    (
        Cause.BAD_MODEL,
        re.compile(r"invalid rknn llm model magic|invalid rkllm model", re.I),
        _fixed(
            "the download may be incomplete or the model was converted with an rkllm-toolkit this runtime "
            "does not read: pull it again, or use a build converted for this runtime version"
        ),
    ),
    (
        Cause.NPU_MEMORY,
        re.compile(r"failed to malloc npu memory", re.I),
        _fixed(
            "another model or process holds NPU memory (a second rkllama/rkllm server?): stop it, or use a "
            "smaller model or a smaller num_ctx"
        ),
    ),
    (
        Cause.LOAD_ERROR,
        re.compile(r"load model file error", re.I),
        _fixed("check that the .rkllm file is complete and readable (compare its size with the source)"),
    ),
    (
        Cause.DRIVER_TOO_OLD,
        re.compile(r"driver version is too low|mismatch driver version", re.I),
        _fixed(
            f"upgrade the kernel's RKNPU driver to {npu.DRIVER_RECOMMENDED} "
            f"(at least {npu.DRIVER_MINIMUM}); check it with sudo cat /sys/kernel/debug/rknpu/version"
        ),
    ),
]


def diagnose(lines: Iterable[str], root: Path = npu.ROOT) -> StartupProblem | None:
    """The most important problem the runtime's start-up lines show; None when they show none."""
    lines = list(lines)
    for cause, pattern, fix in _RULES:
        for line in lines:
            if pattern.search(line):
                return StartupProblem(cause=cause, evidence=line, fix=fix(root))
    return None


def error_lines(lines: Iterable[str], limit: int = 3) -> list[str]:
    """The runtime's last `limit` error lines (`E ...`), the most useful detail when nothing matched."""
    errors = [line.strip() for line in lines if re.match(r"\s*E\s", line)]
    return errors[-limit:]
