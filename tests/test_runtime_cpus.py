"""llama.cpp's default threads: one per fastest usable core, pinned there on big.LITTLE boards."""

from __future__ import annotations

import os
from pathlib import Path

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rkllama_ollama.config import ConfigError, settings_from_env
from rkllama_ollama.runtime.base import LoadSpec
from rkllama_ollama.runtime.cpus import Pinning, ThreadPlan, fastest_cores, parse_cpu_list, plan_threads

RK3588_CAPACITY = [414, 414, 414, 414, 1024, 1024, 1024, 1024]  # A55 x4, A76 x4


def sysfs(tmp_path: Path, values: list[int | None], probe: str = "cpu_capacity") -> Path:
    for core, value in enumerate(values):
        folder = tmp_path / f"cpu{core}" / os.path.dirname(probe)
        folder.mkdir(parents=True, exist_ok=True)
        if value is not None:
            (tmp_path / f"cpu{core}" / probe).write_text(f"{value}\n")
    return tmp_path


def test_rk3588_runs_on_its_four_big_cores(tmp_path: Path) -> None:
    root = sysfs(tmp_path, RK3588_CAPACITY)
    plan = plan_threads(0, sysfs=root, cores=list(range(8)))
    assert plan == ThreadPlan(4, (4, 5, 6, 7), "the 4 fastest of 8 cores")


def test_cpufreq_tells_the_cores_apart_when_capacity_is_missing(tmp_path: Path) -> None:
    root = sysfs(tmp_path, [1_800_000] * 4 + [2_304_000] * 2, "cpufreq/cpuinfo_max_freq")
    assert fastest_cores(list(range(6)), root) == [4, 5]


def test_alike_cores_are_all_used_and_nothing_is_pinned(tmp_path: Path) -> None:
    root = sysfs(tmp_path, [1024] * 4)
    assert plan_threads(0, sysfs=root, cores=[0, 1, 2, 3]) == ThreadPlan(4, (), "all 4 usable cores")


def test_no_sysfs_at_all_means_every_usable_core(tmp_path: Path) -> None:
    assert plan_threads(0, sysfs=tmp_path / "absent", cores=[0, 1]) == ThreadPlan(2, (), "all 2 usable cores")


def test_a_partial_reading_is_not_trusted(tmp_path: Path) -> None:
    root = sysfs(tmp_path, [414, 1024, None, 1024])
    assert fastest_cores([0, 1, 2, 3], root) == [0, 1, 2, 3]


def test_the_affinity_mask_bounds_the_choice(tmp_path: Path) -> None:
    root = sysfs(tmp_path, RK3588_CAPACITY)
    assert plan_threads(0, sysfs=root, cores=[0, 1, 6]).cores == (6,)  # e.g. `taskset -c 0,1,6`
    assert plan_threads(0, sysfs=root, cores=[0, 1]) == ThreadPlan(2, (), "all 2 usable cores")


def test_an_explicit_thread_count_is_obeyed_unpinned(tmp_path: Path) -> None:
    root = sysfs(tmp_path, RK3588_CAPACITY)
    assert plan_threads(6, sysfs=root, cores=list(range(8))) == ThreadPlan(6, (), "as configured")


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux affinity calls")
def test_pinning_pins_and_gives_the_whole_mask_back() -> None:
    pinning = Pinning()
    if len(pinning.original) < 2:
        pytest.skip("needs two usable cores")
    try:
        pinning.apply(ThreadPlan(1, (pinning.original[-1],), "test"))
        assert sorted(os.sched_getaffinity(0)) == [pinning.original[-1]]
        pinning.apply(ThreadPlan(2, (), "as configured"))
        assert sorted(os.sched_getaffinity(0)) == pinning.original
    finally:
        os.sched_setaffinity(0, pinning.original)


def test_configured_cores_are_pinned_with_one_thread_each_unless_told(tmp_path: Path) -> None:
    root = sysfs(tmp_path, RK3588_CAPACITY)
    assert plan_threads(0, (2, 3), sysfs=root) == ThreadPlan(2, (2, 3), "configured cores")
    assert plan_threads(3, (2, 3), sysfs=root) == ThreadPlan(3, (2, 3), "configured cores")


@pytest.mark.parametrize(
    ("text", "cores"),
    [("4-7", (4, 5, 6, 7)), ("0,2,4-5", (0, 2, 4, 5)), (" 3 ", (3,)), ("1,1,0-1", (0, 1))],
)
def test_cpu_lists_parse_like_linux(text: str, cores: tuple[int, ...]) -> None:
    assert parse_cpu_list(text) == cores


@pytest.mark.parametrize("text", ["", ",", "a", "4-", "-4", "7-4", "1;2", "2048", "0x3"])
def test_bad_cpu_lists_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_cpu_list(text)


@given(st.sets(st.integers(min_value=0, max_value=127), min_size=1))
def test_any_set_of_cores_survives_its_cpu_list(cores: set[int]) -> None:
    text = ",".join(str(core) for core in sorted(cores))
    assert parse_cpu_list(text) == tuple(sorted(cores))


def test_rkllama_cpus_reaches_the_settings_and_crosses_the_runner_pipe() -> None:
    assert settings_from_env({"RKLLAMA_CPUS": "4-7"}).cpus == (4, 5, 6, 7)
    assert settings_from_env({}).cpus == ()
    with pytest.raises(ConfigError, match="RKLLAMA_CPUS: 'x' is not a core number"):
        settings_from_env({"RKLLAMA_CPUS": "x"})
    spec = LoadSpec(engine="llamacpp", model_path="m.gguf", cores=(4, 5))
    assert LoadSpec.from_wire(orjson.loads(orjson.dumps(spec.to_wire()))) == spec
