"""Which CPU cores llama.cpp should run on when the user has not said.

On big.LITTLE boards (RK3588: four Cortex-A76 and four Cortex-A55; RK3576: A72 + A53) a llama.cpp
graph is as slow as its slowest thread, because every operation ends at a barrier: threads on the
little cores hold the big ones back. The vendor demos and the original RKLLama server run on the big
cores only (`CPU4..CPU7`, `taskset 4-7`). So the default is one thread per *fastest* core the
process may use, and the runner is pinned to those cores; the little cores are left to the HTTP
server and its clients, which then never preempt a compute thread. On a machine whose cores are all
alike this is simply every usable core, as llama.cpp and Ollama do.

An operator can name the cores instead (`RKLLAMA_CPUS=4-7`, Linux's cpu-list syntax): the runner is
pinned to them and runs one thread per core unless `num_thread` says otherwise.

"Usable" is the process's affinity mask (a container or `taskset` may allow fewer cores than
`os.cpu_count()` reports). "Fastest" is the kernel's `cpu_capacity` (arm64 and others with energy-
aware scheduling), else the highest `cpufreq/cpuinfo_max_freq`, else all usable cores.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

SYSFS_CPUS = Path("/sys/devices/system/cpu")


@dataclass(frozen=True)
class ThreadPlan:
    threads: int
    cores: tuple[int, ...]  # the cores to pin to; empty = leave the affinity alone
    reason: str


MAX_CORE = 1023


def parse_cpu_list(text: str) -> tuple[int, ...]:
    """Linux cpu-list syntax: "4-7", "0,2,4-5". Raises ValueError naming what is wrong."""
    cores: set[int] = set()
    for item in text.replace(" ", "").split(","):
        if not item:
            continue
        first, dash, last = item.partition("-")
        if not (first.isdigit() and (not dash or last.isdigit())):
            raise ValueError(f"{item!r} is not a core number or a range like 4-7")
        low, high = int(first), int(last) if dash else int(first)
        if low > high or high > MAX_CORE:
            raise ValueError(f"{item!r} is not a valid range of cores")
        cores.update(range(low, high + 1))
    if not cores:
        raise ValueError("no cores are named")
    return tuple(sorted(cores))


def usable_cores() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not on Linux
        return list(range(os.cpu_count() or 1))


def _read_number(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def fastest_cores(cores: list[int], sysfs: Path = SYSFS_CPUS) -> list[int]:
    """The subset of `cores` with the highest capacity (all of them when nothing tells them apart)."""
    for probe in ("cpu_capacity", "cpufreq/cpuinfo_max_freq"):
        ratings = {core: _read_number(sysfs / f"cpu{core}" / probe) for core in cores}
        known = {core: rating for core, rating in ratings.items() if rating}
        if len(known) == len(cores) and cores:
            best = max(known.values())
            return [core for core in cores if known[core] == best]
    return list(cores)


def plan_threads(
    requested: int,
    chosen: tuple[int, ...] = (),
    sysfs: Path = SYSFS_CPUS,
    cores: list[int] | None = None,
) -> ThreadPlan:
    """Cores `chosen` by the operator are pinned (one thread each unless `requested` > 0); otherwise
    `requested` > 0 is obeyed unpinned; otherwise one thread per fastest usable core."""
    if chosen:
        return ThreadPlan(requested if requested > 0 else len(chosen), tuple(chosen), "configured cores")
    usable = usable_cores() if cores is None else cores
    if requested > 0:
        return ThreadPlan(requested, (), "as configured")
    fast = fastest_cores(usable, sysfs)
    if len(fast) < len(usable):
        return ThreadPlan(len(fast), tuple(fast), f"the {len(fast)} fastest of {len(usable)} cores")
    return ThreadPlan(max(1, len(usable)), (), f"all {len(usable)} usable cores")


class Pinning:
    """The process's CPU affinity: pinned for one model, given back whole for the next."""

    def __init__(self) -> None:
        self.original = usable_cores()

    def apply(self, plan: ThreadPlan) -> None:
        """Raises OSError when the cores do not exist or this process may not use them."""
        os.sched_setaffinity(0, plan.cores or self.original)


_pinning: Pinning | None = None


def process_pinning() -> Pinning:
    """This process's Pinning, made on first use (before any pinning, so it sees the full mask)."""
    global _pinning
    if _pinning is None:
        _pinning = Pinning()
    return _pinning
