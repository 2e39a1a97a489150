"""The eviction plan for resident models: one `.rkllm` at most, a count limit, memory, least recently
used first, never a busy model (properties over many mixes of resident models)."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from rkllama_ollama.residency import (
    RESERVE_BYTES,
    Resident,
    kv_cache_bytes,
    mem_available_bytes,
    plan_load,
)

GB = 2**30


def resident(key: str, engine: str = "llamacpp", size: int = GB, last_used: float = 0.0, busy: bool = False):
    return Resident(key, engine, size, last_used, busy)


def test_an_rkllm_model_replaces_the_other_one_and_keeps_the_cpu_models() -> None:
    residents = [resident("npu", "rkllm", last_used=5), resident("emb", last_used=1)]
    plan = plan_load(residents, engine="rkllm", size=GB, available=8 * GB, max_loaded=3)
    assert plan.ready and plan.evict == ("npu",)


def test_a_busy_rkllm_model_is_waited_for_never_evicted() -> None:
    residents = [resident("npu", "rkllm", busy=True), resident("emb")]
    plan = plan_load(residents, engine="rkllm", size=GB, available=8 * GB, max_loaded=3)
    assert not plan.ready and plan.wait_for == {"npu"} and plan.evict == ()


def test_a_gguf_model_joins_the_npu_model_when_memory_allows() -> None:
    residents = [resident("npu", "rkllm", busy=True)]
    plan = plan_load(residents, engine="llamacpp", size=GB, available=4 * GB, max_loaded=3)
    assert plan.ready and plan.evict == ()


def test_the_least_recently_used_idle_model_goes_when_the_count_is_reached() -> None:
    residents = [resident("old", last_used=1), resident("busy-older", last_used=0, busy=True)]
    residents.append(resident("recent", last_used=9))
    plan = plan_load(residents, engine="llamacpp", size=GB, available=64 * GB, max_loaded=3)
    assert plan.ready and plan.evict == ("old",)


def test_memory_decides_how_many_go() -> None:
    residents = [resident("a", last_used=1), resident("b", last_used=2), resident("c", last_used=3)]
    # 0.5 GB free beyond the reserve: a 2 GB model needs two of the 1 GB ones gone, the oldest two.
    plan = plan_load(
        residents, engine="llamacpp", size=2 * GB, available=GB // 2 + RESERVE_BYTES, max_loaded=9
    )
    assert plan.ready and plan.evict == ("a", "b")


def test_a_model_that_fits_nowhere_is_loaded_after_evicting_every_idle_one() -> None:
    plan = plan_load([resident("a")], engine="llamacpp", size=100 * GB, available=GB, max_loaded=3)
    assert plan.ready and plan.evict == ("a",)
    plan = plan_load([resident("a", busy=True)], engine="llamacpp", size=100 * GB, available=GB, max_loaded=3)
    assert not plan.ready and plan.wait_for == {"a"}


residents_strategy = st.lists(
    st.builds(
        Resident,
        key=st.text("abcdefgh", min_size=1, max_size=3),
        engine=st.sampled_from(["rkllm", "llamacpp"]),
        size=st.integers(0, 8 * GB),
        last_used=st.floats(0, 1000),
        busy=st.booleans(),
    ),
    max_size=6,
    unique_by=lambda r: r.key,
)


@given(
    residents_strategy,
    st.sampled_from(["rkllm", "llamacpp"]),
    st.integers(0, 8 * GB),
    st.none() | st.integers(0, 16 * GB),
    st.integers(1, 5),
)
def test_plans_keep_the_rules(
    residents: list[Resident], engine: str, size: int, available: int | None, max_loaded: int
) -> None:
    plan = plan_load(residents, engine=engine, size=size, available=available, max_loaded=max_loaded)
    by_key = {r.key: r for r in residents}
    assert not (plan.evict and plan.wait_for)
    assert all(not by_key[key].busy for key in plan.evict)  # a model in use is never evicted
    assert plan.wait_for <= {r.key for r in residents if r.busy}
    if not plan.ready:
        return
    staying = [r for r in residents if r.key not in plan.evict]
    if engine == "rkllm":
        assert all(r.engine != "rkllm" for r in staying)  # never two NPU sessions
    # The count limit holds unless only busy models could have made room (then the plan waits).
    assert len(staying) + 1 <= max_loaded
    # Idle models go least recently used first (the rkllm one aside, which must go whatever its age).
    optional = [
        by_key[key] for key in plan.evict if not (engine == "rkllm" and by_key[key].engine == "rkllm")
    ]
    kept_idle = [r for r in staying if not r.busy]
    if optional and kept_idle:
        assert max(r.last_used for r in optional) <= min(r.last_used for r in kept_idle)


def test_kv_cache_from_gguf_metadata() -> None:
    info = {
        "general.architecture": "llama",
        "llama.block_count": 30,
        "llama.embedding_length": 576,
        "llama.attention.head_count": 9,
        "llama.attention.head_count_kv": 3,
    }
    assert kv_cache_bytes(info, 2048) == 30 * 2048 * 3 * (64 + 64) * 2
    assert kv_cache_bytes({"general.architecture": "rkllm"}, 2048) == 0


def test_mem_available_is_read_from_meminfo(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16000000 kB\nMemAvailable:    8000000 kB\n")
    assert mem_available_bytes(meminfo) == 8000000 * 1024
    assert mem_available_bytes(tmp_path / "missing") is None


def test_the_estimate_counts_the_kv_cache_of_every_parallel_sequence(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from rkllama_ollama.residency import estimated_bytes
    from rkllama_ollama.runtime.base import LoadSpec

    info = {
        "general.architecture": "llama",
        "llama.block_count": 2,
        "llama.embedding_length": 64,
        "llama.attention.head_count": 4,
    }
    entry = SimpleNamespace(size=1000, model_info=info)
    one = estimated_bytes(entry, LoadSpec("llamacpp", "m", num_ctx=100))  # type: ignore[arg-type]
    four = estimated_bytes(entry, LoadSpec("llamacpp", "m", num_ctx=100, parallel=4))  # type: ignore[arg-type]
    kv = 2 * 100 * 4 * (16 + 16) * 2
    assert (one, four) == (1000 + kv, 1000 + 4 * kv)
    bare = SimpleNamespace(size=1000, model_info={})
    assert estimated_bytes(bare, LoadSpec("rkllm", "m")) == 1100  # type: ignore[arg-type]
