"""The runtime's start-up lines -> cause and fix; the board readers behind the fixes (fake trees)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rkllama_ollama.runtime.base import LoadSpec, RuntimeFailure
from rkllama_ollama.runtime.rkllm import npu
from rkllama_ollama.runtime.rkllm.session import RkllmRuntime
from rkllama_ollama.runtime.rkllm.startup import Cause, diagnose, error_lines
from tests.rkllm_support.sim import build_simulators, write_model

LINES = {
    Cause.NO_DEVICE: "E RKNN: failed to open rknpu module, need to insmod rknpu driver!",
    Cause.BAD_MODEL: "E RKNN: invalid rknn llm model magic",
    Cause.NPU_MEMORY: "E RKNN: failed to malloc npu memory",
    Cause.LOAD_ERROR: "E rkllm: load model file error",
    Cause.PLATFORM_MISMATCH: "E rkllm: The model target_platform does not match!",
    Cause.DRIVER_TOO_OLD: "W rkllm: Warning: Your rknpu driver version is too low, please upgrade to 0.9.7",
}


@pytest.mark.parametrize("cause", list(LINES), ids=lambda c: c.name)
def test_each_vendor_line_has_its_cause(cause: Cause, tmp_path: Path) -> None:
    banner = "I rkllm: rkllm-runtime version: 1.2.1, rknpu driver version: 0.9.8, platform: RK3588"
    problem = diagnose([banner, LINES[cause], "I rkllm: done"], root=tmp_path)
    assert problem is not None and problem.cause is cause
    assert problem.evidence == LINES[cause] and problem.fix
    assert problem.fatal is (cause is not Cause.DRIVER_TOO_OLD)
    assert cause.value in problem.message() and "Fix: " in problem.message()


def test_the_device_failure_outranks_what_follows_it(tmp_path: Path) -> None:
    problem = diagnose([LINES[Cause.NPU_MEMORY], LINES[Cause.NO_DEVICE]], root=tmp_path)
    assert problem is not None and problem.cause is Cause.NO_DEVICE


def test_clean_output_is_no_problem() -> None:
    assert diagnose(["I rkllm: rkllm-runtime version: 1.3.0", "I rkllm: loading rkllm model from x"]) is None
    assert error_lines(["I ok", "E rkllm: a", "E rkllm: b"], limit=1) == ["E rkllm: b"]


@given(st.lists(st.text(max_size=120), max_size=8))
def test_diagnose_takes_any_output(lines: list[str]) -> None:
    problem = diagnose(lines, root=Path("/nonexistent"))
    assert problem is None or problem.evidence in lines


def test_driver_version_sources_in_order(tmp_path: Path) -> None:
    assert npu.driver_version(tmp_path)[0] is None
    (tmp_path / "var/log").mkdir(parents=True)
    (tmp_path / "var/log/kern.log").write_text("[drm] Initialized rknpu 0.9.7 20240601 for fdab0000.npu\n")
    assert npu.driver_version(tmp_path) == ("0.9.7", "/var/log/kern.log")
    (tmp_path / "sys/module/rknpu").mkdir(parents=True)
    (tmp_path / "sys/module/rknpu/version").write_text("0.9.8\n")
    assert npu.driver_version(tmp_path) == ("0.9.8", "/sys/module/rknpu/version")


@pytest.mark.parametrize(
    ("compatible", "soc"),
    [
        (b"radxa,rock-5b\0rockchip,rk3588\0", "rk3588"),
        (b"xunlong,orangepi-5\0rockchip,rk3588s\0", "rk3588"),
        (b"armsom,sige5\0rockchip,rk3576\0", "rk3576"),
        (b"raspberrypi,5-model-b\0brcm,bcm2712\0", None),
    ],
)
def test_soc_from_the_device_tree(tmp_path: Path, compatible: bytes, soc: str | None) -> None:
    (tmp_path / "proc/device-tree").mkdir(parents=True)
    (tmp_path / "proc/device-tree/compatible").write_bytes(compatible)
    assert npu.detect_soc(tmp_path) == soc


def test_render_nodes_of_other_drivers_are_not_the_npu(tmp_path: Path) -> None:
    (tmp_path / "dev/dri").mkdir(parents=True)
    for name in ("renderD128", "renderD129", "renderD130"):
        (tmp_path / "dev/dri" / name).write_bytes(b"")
    for name, driver in (("renderD128", "panfrost"), ("renderD129", "RKNPU")):
        (tmp_path / "sys/class/drm" / name / "device").mkdir(parents=True)
        os.symlink(
            f"../../../bus/platform/drivers/{driver}", tmp_path / "sys/class/drm" / name / "device/driver"
        )
    nodes = {node.path.name: node.is_npu for node in npu.device_nodes(tmp_path)}
    assert nodes == {"renderD128": False, "renderD129": True, "renderD130": None}
    assert [node.path.name for node in npu.npu_nodes(tmp_path)] == ["renderD129", "renderD130"]


@pytest.mark.parametrize("family", ["C", "D", "E", "F"])
@pytest.mark.parametrize("fault", ["bad_magic", "npu_oom", "load_error"])
def test_init_faults_are_load_failures_in_process(family: str, fault: str, tmp_path: Path) -> None:
    if family == "F" and fault == "npu_oom":
        pytest.skip("1.3.0 crashes inside rkllm_init here: covered through the runner (daemon tier)")
    runtime = RkllmRuntime(str(build_simulators()[family]))
    model = write_model(tmp_path, init_fault=fault)
    with pytest.raises(RuntimeFailure, match=r"^could not load .*Fix: ") as info:
        runtime.load(LoadSpec(engine="rkllm", model_path=str(model), num_ctx=256))
    expected = {
        "bad_magic": "invalid rknn llm model magic",
        "npu_oom": "failed to malloc",
        "load_error": "load",
    }
    assert expected[fault] in str(info.value)
