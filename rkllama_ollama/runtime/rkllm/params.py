"""Modelfile / Ollama options -> RKLLMParam and RKLLMSamplingParam field values.

Accepts Ollama option names (temperature, top_k, num_predict, num_ctx, num_keep, ...) and the
seed's Modelfile keys (TEMPERATURE, MAX_NEW_TOKENS, NUM_CTX, N_KEEP, ...) in any case.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, fields, replace
from typing import Any

from rkllama_ollama.runtime.base import SamplingOptions

log = logging.getLogger(__name__)

_ALIASES = {
    "max_new_tokens": "num_predict",
    "n_keep": "num_keep",
    "enabled_cpus_mask": "cpu_mask",
    "max_context_len": "num_ctx",
}
BIG_CORES_MASK = 0xF0  # CPU4..CPU7: the big cores of RK3588/RK3576 (what the vendor demos use)
LITTLE_SOC_MASK = 0x0F  # CPU0..CPU3 on 4-core SoCs (RK3562, RV1126B)


@dataclass(frozen=True)
class LoadParams:
    """Load-time RKLLMParam values (everything but per-request sampling)."""

    num_ctx: int
    max_new_tokens: int  # Modelfile limit; <= 0 = none (the context bounds generation)
    n_keep: int
    mirostat: int
    mirostat_tau: float
    mirostat_eta: float
    embed_flash: int
    cpu_mask: int
    base_domain_id: int
    sampling: SamplingOptions  # Modelfile sampling over SamplingOptions defaults


def normalise_params(params: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in params.items():
        name = str(key).strip().lower()
        out[_ALIASES.get(name, name)] = value
    return out


def _number(value: Any, kind: type) -> Any:
    if isinstance(value, str):
        text = value.strip().strip('"').strip("'")
        if kind is int:
            return int(float(text)) if "." in text else int(text, 0)
        return float(text)
    return kind(value)


def parse_cpu_mask(value: Any) -> int:
    """An int/hex mask, or a list of core numbers ("4,5,6,7" or [4, 5, 6, 7])."""
    if isinstance(value, (list, tuple)):
        cores = [int(v) for v in value]
    elif isinstance(value, str) and ("," in value or value.strip().isdigit() and int(value) < 8):
        cores = [int(v) for v in value.replace(" ", "").split(",") if v]
    else:
        return _number(value, int)
    mask = 0
    for core in cores:
        mask |= 1 << core
    return mask


def default_cpu_mask(cpu_count: int | None = None) -> int:
    """The cores the vendor's demos give the runtime: the big cores CPU4-7 (0xF0) on the 8-core RK3588 and
    RK3576, CPU0-3 (0x0F) on 4-core SoCs (RK3562, RV1126B); every core of a smaller machine."""
    count = (os.cpu_count() or 1) if cpu_count is None else cpu_count
    if count >= 8:
        return BIG_CORES_MASK
    return (1 << max(1, min(count, 4))) - 1


def sampling_from_params(params: dict[str, Any], base: SamplingOptions | None = None) -> SamplingOptions:
    base = base or SamplingOptions()
    updates: dict[str, Any] = {}
    for f in fields(SamplingOptions):
        if f.name in params and params[f.name] is not None and f.name != "grammar":
            kind = int if f.type in ("int", int) else float
            updates[f.name] = _number(params[f.name], kind)
    return replace(base, **updates)


def load_params(params: dict[str, Any], num_ctx: int) -> LoadParams:
    p = normalise_params(params)

    def get(name: str, kind: type, default: Any) -> Any:
        value = p.get(name)
        if value is None or value == "":
            return default
        try:
            return _number(value, kind)
        except (TypeError, ValueError):
            log.warning("ignoring Modelfile parameter %s=%r: not a number", name, value)
            return default

    cpu_mask = default_cpu_mask()
    if p.get("cpu_mask") not in (None, ""):
        try:
            cpu_mask = parse_cpu_mask(p["cpu_mask"])
        except (TypeError, ValueError):
            log.warning("ignoring cpu_mask=%r", p["cpu_mask"])
    return LoadParams(
        num_ctx=num_ctx,  # LoadSpec.num_ctx is already layered by the scheduler
        max_new_tokens=get("num_predict", int, -1),
        n_keep=get("num_keep", int, -1),
        mirostat=get("mirostat", int, 0),
        mirostat_tau=get("mirostat_tau", float, 5.0),
        mirostat_eta=get("mirostat_eta", float, 0.1),
        embed_flash=get("embed_flash", int, 1),
        cpu_mask=cpu_mask & 0xFF,
        base_domain_id=get("base_domain_id", int, 0),
        sampling=sampling_from_params(p),
    )


def sampling_key(options: SamplingOptions) -> tuple[float, ...]:
    """The sampling values RKLLMParam holds, rounded to float32-ish precision, for comparison."""
    return (
        round(float(options.temperature), 5),
        float(int(options.top_k)),
        round(float(options.top_p), 5),
        round(float(options.repeat_penalty), 5),
        round(float(options.frequency_penalty), 5),
        round(float(options.presence_penalty), 5),
    )
