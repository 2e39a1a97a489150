"""`rkllama-ollama doctor` on fake board trees (device tree, sysfs/debugfs, /dev, kernel log, meminfo)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rkllama_ollama.doctor import Level, Report, check_devices, model_origin, run_doctor, version_key
from rkllama_ollama.models.catalogue import load_catalogue
from rkllama_ollama.runtime.rkllm import npu
from tests.rkllm_support.sim import REPO, add_sim_model, build_simulators, write_byte_tokenizer

MEMINFO = "MemTotal:       16000000 kB\nMemFree:         8000000 kB\nMemAvailable:   12000000 kB\n"


def make_board(
    root: Path,
    *,
    soc: str = "rk3588",
    driver: str | None = "0.9.8",
    render_node: bool = True,
    kernel_log: str | None = None,
) -> Path:
    """A board's file system as the doctor reads it."""
    dt = root / "proc/device-tree"
    dt.mkdir(parents=True)
    (dt / "compatible").write_bytes(f"xunlong,orangepi-5\0rockchip,{soc}s\0rockchip,{soc}\0".encode())
    (dt / "model").write_bytes(b"Orange Pi 5\0")
    (root / "proc/meminfo").write_text(MEMINFO)
    if driver is not None:
        debug = root / "sys/kernel/debug/rknpu"
        debug.mkdir(parents=True)
        (debug / "version").write_text(f"RKNPU driver: v{driver}\n")
    if render_node:
        (root / "dev/dri").mkdir(parents=True)
        (root / "dev/dri/renderD128").write_bytes(b"")  # the GPU's
        (root / "dev/dri/renderD129").write_bytes(b"")  # the NPU's
        for name, driver_name in (("renderD128", "panfrost"), ("renderD129", "RKNPU")):
            device = root / "sys/class/drm" / name / "device"
            device.mkdir(parents=True)
            (root / "sys/bus/platform/drivers" / driver_name).mkdir(parents=True, exist_ok=True)
            os.symlink(root / "sys/bus/platform/drivers" / driver_name, device / "driver")
    if kernel_log is not None:
        (root / "var/log").mkdir(parents=True)
        (root / "var/log/kern.log").write_text(kernel_log)
    return root


def environ(tmp_path: Path, family: str = "E") -> dict[str, str]:
    return {
        **os.environ,
        "RKLLAMA_RKLLM_LIB": str(build_simulators()[family]),
        "PYTHONPATH": str(REPO),
        "HOME": str(tmp_path / "home"),
        "HF_HUB_CACHE": str(tmp_path / "hf"),
    }


def problems(report: Report) -> list[str]:
    return [f"{f.topic}: {f.text} / {f.fix}" for f in report.findings if f.level is Level.PROBLEM]


def test_no_npu_is_the_first_problem_with_its_fix_and_exit_1(tmp_path: Path) -> None:
    report = run_doctor(tmp_path / "models", root=tmp_path / "empty", environ=environ(tmp_path))
    first = next(f for f in report.findings if f.level is not Level.OK)
    assert first.level is Level.PROBLEM and first.topic == "soc"
    assert "no Rockchip NPU" in first.text and "GGUF" in first.fix
    assert report.exit_code == 1
    lines = report.render().splitlines()
    assert lines[0].startswith("PROBLEM") and "no Rockchip NPU" in lines[0]
    assert lines[1].strip().startswith("fix: ")


def test_rk3588_with_a_1_2_1_runtime_and_an_rk3576_model_names_the_mismatch(tmp_path: Path) -> None:
    root = make_board(tmp_path / "board")
    store = tmp_path / "models"
    add_sim_model(
        store,
        "qwen-3576",
        file_name="Qwen2.5-1.5B-Instruct_w4a16_RK3576.rkllm",
        tokenizer=True,
        target_platform="rk3576",
    )
    report = run_doctor(store, root=root, environ=environ(tmp_path))
    found = problems(report)
    assert len(found) == 1, report.render()
    assert "RK3576" in found[0] and "RK3588" in found[0] and "cannot load" in found[0]
    assert "model qwen-3576" in found[0]
    texts = report.render()
    assert "RKLLM runtime 1.2.1, ABI family E" in texts
    assert "RK3588 (Orange Pi 5)" in texts
    assert "RKNPU driver 0.9.8" in texts
    assert "/dev/dri/renderD129" in texts and "renderD128" not in texts  # the GPU's node is not the NPU
    assert report.exit_code == 1


def test_a_board_where_everything_fits_exits_0(tmp_path: Path) -> None:
    root = make_board(tmp_path / "board")
    store = tmp_path / "models"
    add_sim_model(
        store,
        "qwen",
        file_name="Qwen2.5-1.5B-Instruct-rk3588-w8a8-opt-1-hybrid-ratio-1.0.rkllm",
        tokenizer=True,
        modelfile=("NUM_CTX=2048",),
    )
    report = run_doctor(store, root=root, environ=environ(tmp_path), catalogue=load_catalogue())
    assert report.exit_code == 0, report.render()
    model_lines = [f.text for f in report.findings if f.topic == "model qwen:latest"]
    assert any("converted for RK3588 (file name" in line for line in model_lines), model_lines
    assert any("converted with RKLLM 1.1.1 (runtime 1.2.1)" in line for line in model_lines), model_lines
    assert any("context 2048 tokens (converted for up to 4096)" in line for line in model_lines)
    assert any("tokenizer and chat template" in line for line in model_lines)


def test_an_old_driver_from_the_kernel_log_is_a_problem(tmp_path: Path) -> None:
    log = "[    5.1] [drm] Initialized rknpu 0.9.6 20240322 for fdab0000.npu on minor 1\n"
    root = make_board(tmp_path / "board", driver=None, kernel_log=log)
    report = run_doctor(tmp_path / "models", root=root, environ=environ(tmp_path))
    found = problems(report)
    assert len(found) == 1 and found[0].startswith("npu driver: RKNPU driver 0.9.6 (from /var/log/kern.log)")
    assert "0.9.8" in found[0]
    assert report.exit_code == 1


def test_no_device_node_is_a_problem_naming_the_node_group_and_driver(tmp_path: Path) -> None:
    root = make_board(tmp_path / "board", render_node=False)
    report = run_doctor(tmp_path / "models", root=root, environ=environ(tmp_path))
    (found,) = problems(report)
    assert "/dev/rknpu" in found and "renderD" in found and "'render'" in found and "0.9.8" in found


def test_a_node_the_user_may_not_open_names_the_group() -> None:
    report = Report()
    node = npu.DeviceNode(
        path=Path("/dev/dri/renderD129"), accessible=False, group="render", user_in_group=False, is_npu=True
    )
    check_devices(report, [node], Path("/"))
    (finding,) = report.findings
    assert finding.level is Level.PROBLEM and "renderD129" in finding.text
    assert "usermod -aG render" in finding.fix and "SupplementaryGroups=render" in finding.fix


def test_a_model_converted_for_1_0_cannot_run(tmp_path: Path) -> None:
    root = make_board(tmp_path / "board")
    store = tmp_path / "models"
    add_sim_model(store, "old", file_name="tinyllama-rk3588-rkllm1.0.1.rkllm", tokenizer=True)
    report = run_doctor(store, root=root, environ=environ(tmp_path))
    (found,) = problems(report)
    assert "1.0.1" in found and "1.1.0" in found
    assert report.exit_code == 1


def test_a_model_newer_than_the_runtime_is_a_warning(tmp_path: Path) -> None:
    root = make_board(tmp_path / "board")
    store = tmp_path / "models"
    add_sim_model(store, "new", file_name="m-rk3588.rkllm", tokenizer=True, toolkit_version="1.2.3")
    report = run_doctor(store, root=root, environ=environ(tmp_path, "D"))
    warnings = [f.text for f in report.findings if f.level is Level.WARN]
    assert any("converted with RKLLM 1.2.3, newer than the installed runtime 1.2.0" in w for w in warnings)
    assert report.exit_code == 0


def test_missing_tokenizer_and_context_over_the_limit_are_warnings(tmp_path: Path) -> None:
    root = make_board(tmp_path / "board")
    store = tmp_path / "models"
    add_sim_model(
        store,
        "bare",
        file_name="m-rk3588-v1.2.1.rkllm",
        modelfile=("NUM_CTX=8192", 'HUGGINGFACE_PATH="Qwen/Qwen2.5-1.5B-Instruct"'),
        max_context_len=4096,
    )
    report = run_doctor(store, root=root, environ=environ(tmp_path))
    warnings = [f"{f.text} / {f.fix}" for f in report.findings if f.level is Level.WARN]
    assert any("context 8192 tokens asked" in w and "NUM_CTX=4096" in w for w in warnings), warnings
    assert any("no tokenizer and chat template" in w and "Qwen/Qwen2.5-1.5B-Instruct" in w for w in warnings)
    # The same tokenizer in the Hugging Face cache is enough.
    write_byte_tokenizer(tmp_path / "hf" / "models--Qwen--Qwen2.5-1.5B-Instruct")
    report = run_doctor(store, root=root, environ=environ(tmp_path))
    assert any("Hugging Face cache" in f.text and f.level is Level.OK for f in report.findings)


def test_the_command_line(tmp_path: Path) -> None:
    env = environ(tmp_path)
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "rkllama_ollama.cli",
            "doctor",
            "--root",
            str(tmp_path),
            "--models",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 1
    assert completed.stdout.startswith("PROBLEM  soc")
    assert completed.stdout.rstrip().endswith("an .rkllm model cannot run here")


def test_model_origin_reads_file_name_and_file(tmp_path: Path) -> None:
    path = tmp_path / "Llama-3.2-1B-Instruct_W8A8_RK3588_v1.2.1b1.rkllm"
    path.write_bytes(b"\0" * 64 + b'{"target_platform": "RK3576", "max_context_len": 4096}')
    origin = model_origin(path, None)
    assert (origin.platform, origin.toolkit, origin.max_context) == ("rk3576", "1.2.1b1", 4096)
    assert origin.source == "file, file name"


@pytest.mark.parametrize(
    ("older", "newer"), [("1.1.4", "1.2.0"), ("1.2.1b1", "1.2.1"), ("1.2.1", "1.2.3"), ("1.2.3", "1.3.0")]
)
def test_version_order(older: str, newer: str) -> None:
    assert version_key(older) < version_key(newer)


@given(st.text(max_size=80))
def test_model_origin_never_fails_on_odd_names(name: str) -> None:
    safe = "".join(c for c in name if c not in "/\0") or "x"
    origin = model_origin(Path("/nonexistent") / (safe + ".rkllm"), None)
    assert origin.platform is None or origin.platform in npu.SOCS or origin.platform.startswith("rk35")


def test_a_runtime_that_cannot_open_the_npu_is_a_problem_in_its_own_words(tmp_path: Path) -> None:
    """The node exists and is accessible, yet rkllm_init says the device is not available."""
    root = make_board(tmp_path / "board")
    env = {**environ(tmp_path), "RKLLM_SIM_NPU": "absent"}
    report = run_doctor(tmp_path / "models", root=root, environ=env)
    (found,) = problems(report)
    assert found.startswith("runtime start: the NPU device could not be opened")
    assert "failed to open rknpu module" in found and "accessible" in found
    assert report.exit_code == 1


def test_the_driver_version_from_the_runtime_banner_when_debugfs_is_unreadable(tmp_path: Path) -> None:
    root = make_board(tmp_path / "board", driver=None)
    env = {**environ(tmp_path), "RKLLM_SIM_DRIVER": "0.9.6"}
    report = run_doctor(tmp_path / "models", root=root, environ=env)
    found = problems(report)
    assert found and found[0].startswith(
        "npu driver: RKNPU driver 0.9.6 (from the runtime's start-up banner)"
    )
    assert any(f.topic == "runtime start" and "too old" in f.text for f in report.findings)
    assert report.exit_code == 1
