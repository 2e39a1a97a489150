"""Which models may stay loaded together: memory estimates and the eviction plan.

Several models may be resident at once (RKLLAMA_MAX_LOADED_MODELS), each in its own runner process:
typically one `.rkllm` model on the NPU next to GGUF models on the CPU (an embedding model for RAG, a
small model for titles). The rules, applied when a model must be loaded:

- at most one `.rkllm` model is resident: a second NPU session in another process risks a kernel
  panic on the board, so loading an `.rkllm` model first unloads the other one (waiting for its turn);
- at most `max_loaded` models are resident;
- the new model must fit in the memory the kernel reports available (MemAvailable, less a reserve)
  plus what the evicted models give back; its size is estimated from its weights and its KV cache;
- the evicted models are the least recently used idle ones; a model in use is never evicted: when only
  busy models could make room, the load waits for one of them to become idle;
- when nothing more can be evicted and the estimate still does not fit, the model is loaded anyway
  (the estimate is an estimate; the engine reports a real failure).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rkllama_ollama.models.store import ModelEntry
from rkllama_ollama.runtime.base import Engine, LoadSpec

RESERVE_BYTES = 256 * 2**20  # left to the system and the server when deciding what fits
_KV_BYTES_PER_VALUE = 2  # F16 KV cache (llama.cpp's default; the RKLLM runtime's too)


def mem_available_bytes(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """MemAvailable from the kernel, in bytes; None where it cannot be read (not Linux)."""
    try:
        text = meminfo.read_text(encoding="ascii")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            fields = line.split()
            if len(fields) >= 2 and fields[1].isdigit():
                return int(fields[1]) * 1024
    return None


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def kv_cache_bytes(model_info: dict[str, Any], num_ctx: int) -> int:
    """The KV cache of `num_ctx` tokens from the model's metadata (0 when it does not say enough)."""
    arch = str(model_info.get("general.architecture") or "")
    layers = _int(model_info.get(f"{arch}.block_count"))
    width = _int(model_info.get(f"{arch}.embedding_length"))
    heads = _int(model_info.get(f"{arch}.attention.head_count"))
    kv_heads = _int(model_info.get(f"{arch}.attention.head_count_kv")) or heads
    if not (layers and width and heads and num_ctx > 0):
        return 0
    key_length = _int(model_info.get(f"{arch}.attention.key_length")) or width // heads
    value_length = _int(model_info.get(f"{arch}.attention.value_length")) or key_length
    return layers * num_ctx * kv_heads * (key_length + value_length) * _KV_BYTES_PER_VALUE


def estimated_bytes(entry: ModelEntry, spec: LoadSpec) -> int:
    """What loading `entry` with `spec` will take: the weights plus the KV cache of every parallel
    sequence (or, when the metadata does not describe the attention, a tenth of the weights for each)."""
    weights = entry.size
    kv = kv_cache_bytes(entry.model_info, spec.num_ctx)
    return weights + (kv or weights // 10) * max(1, spec.parallel)


@dataclass(frozen=True)
class Resident:
    """A loaded model as the plan sees it."""

    key: str
    engine: Engine
    size: int  # bytes it holds (reported by the engine, else estimated)
    last_used: float  # monotonic seconds of its last turn
    busy: bool  # a request (or background work) holds it


@dataclass(frozen=True)
class Plan:
    """Either unload `evict` (in that order) and load, or wait until one of `wait_for` is idle."""

    evict: tuple[str, ...] = ()
    wait_for: frozenset[str] = frozenset()

    @property
    def ready(self) -> bool:
        return not self.wait_for


def plan_load(
    residents: Sequence[Resident],
    *,
    engine: Engine,
    size: int,
    available: int | None,
    max_loaded: int,
) -> Plan:
    """What to unload so that a model of `engine` and `size` bytes can be loaded next to `residents`
    (which must not include the model itself). See the module docstring for the rules."""
    must = [r for r in residents if engine == Engine.RKLLM and r.engine == Engine.RKLLM]
    busy_must = frozenset(r.key for r in must if r.busy)
    if busy_must:
        return Plan(wait_for=busy_must)
    evict = list(must)
    others = sorted((r for r in residents if r not in must), key=lambda r: r.last_used)

    def fits() -> bool:
        if len(residents) - len(evict) + 1 > max(1, max_loaded):
            return False
        if available is None:
            return True
        return size <= available - RESERVE_BYTES + sum(r.size for r in evict)

    for resident in others:
        if fits():
            break
        if not resident.busy:
            evict.append(resident)
    if fits():
        return Plan(evict=tuple(r.key for r in evict))
    busy = frozenset(r.key for r in others if r.busy)
    if busy:
        return Plan(wait_for=busy)
    return Plan(evict=tuple(r.key for r in evict))  # everything idle goes; the load is tried anyway
