"""Environment variables with an Ollama twin: ours wins, Ollama's is honoured when ours is unset."""

from __future__ import annotations

import pytest

from rkllama_ollama.config import ConfigError, settings_from_env


@pytest.mark.parametrize(
    ("env", "num_ctx"),
    [
        ({}, 4096),
        ({"OLLAMA_CONTEXT_LENGTH": "8192"}, 8192),
        ({"RKLLAMA_CONTEXT_LENGTH": "2048", "OLLAMA_CONTEXT_LENGTH": "8192"}, 2048),
        ({"RKLLAMA_CONTEXT_LENGTH": "", "OLLAMA_CONTEXT_LENGTH": "1024"}, 1024),
    ],
)
def test_context_length(env: dict[str, str], num_ctx: int) -> None:
    assert settings_from_env(env).default_num_ctx == num_ctx


def test_a_bad_context_length_names_the_variable_it_came_from() -> None:
    with pytest.raises(ConfigError, match="OLLAMA_CONTEXT_LENGTH must be an integer, got 'big'"):
        settings_from_env({"OLLAMA_CONTEXT_LENGTH": "big"})


def test_keep_alive_and_host_twins() -> None:
    assert settings_from_env({"OLLAMA_KEEP_ALIVE": "1m"}).keep_alive_s == 60
    assert settings_from_env({"RKLLAMA_KEEP_ALIVE": "2m", "OLLAMA_KEEP_ALIVE": "1m"}).keep_alive_s == 120
    assert settings_from_env({"OLLAMA_HOST": "0.0.0.0:9999"}).port == 9999


def test_kv_cache_settings() -> None:
    assert settings_from_env({}).kv_cache_slots == -1  # sized from free memory
    assert settings_from_env({"RKLLAMA_KV_CACHE_SLOTS": "auto"}).kv_cache_slots == -1
    assert settings_from_env({"RKLLAMA_KV_CACHE_SLOTS": "0"}).kv_cache_slots == 0
    assert settings_from_env({"RKLLAMA_KV_CACHE_SLOTS": "6"}).kv_cache_slots == 6
    assert settings_from_env({"RKLLAMA_KV_CACHE_RAM_MB": "512"}).kv_cache_ram_mb == 512
    with pytest.raises(ConfigError, match="RKLLAMA_KV_CACHE_SLOTS must be auto or a number"):
        settings_from_env({"RKLLAMA_KV_CACHE_SLOTS": "-2"})
    with pytest.raises(ConfigError, match="RKLLAMA_KV_CACHE_RAM_MB must be 0 or more, got -1"):
        settings_from_env({"RKLLAMA_KV_CACHE_RAM_MB": "-1"})


@pytest.mark.parametrize(
    "suffix, field", [("MAX_LOADED_MODELS", "max_loaded_models"), ("NUM_PARALLEL", "num_parallel")]
)
def test_resident_models_and_parallel_slots_with_their_ollama_twins(suffix: str, field: str) -> None:
    assert getattr(settings_from_env({}), field) == (3 if suffix == "MAX_LOADED_MODELS" else 1)
    assert getattr(settings_from_env({f"OLLAMA_{suffix}": "2"}), field) == 2
    assert getattr(settings_from_env({f"OLLAMA_{suffix}": "2", f"RKLLAMA_{suffix}": "4"}), field) == 4
    with pytest.raises(ConfigError, match=f"RKLLAMA_{suffix} must be at least 1, got 0"):
        settings_from_env({f"RKLLAMA_{suffix}": "0"})
    with pytest.raises(ConfigError, match=f"OLLAMA_{suffix} must be an integer, got 'x'"):
        settings_from_env({f"OLLAMA_{suffix}": "x"})


def test_rkllm_multi_batch_is_off_unless_switched_on() -> None:
    assert settings_from_env({}).rkllm_multi_batch is False
    assert settings_from_env({"RKLLAMA_RKLLM_MULTI_BATCH": "on"}).rkllm_multi_batch is True
    assert settings_from_env({"RKLLAMA_RKLLM_MULTI_BATCH": "0"}).rkllm_multi_batch is False
    with pytest.raises(ConfigError, match="RKLLAMA_RKLLM_MULTI_BATCH must be true or false, got 'maybe'"):
        settings_from_env({"RKLLAMA_RKLLM_MULTI_BATCH": "maybe"})
