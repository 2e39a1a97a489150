"""The systemd unit passes `systemd-analyze verify`, is notify-type, restarting, non-root and hardened."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SYSTEMD = Path(__file__).resolve().parents[1] / "systemd"
UNIT = SYSTEMD / "rkllama-ollama.service"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze is not installed (apt-get install -y systemd)"
)


def service_section() -> dict[str, list[str]]:
    """Every `Key=value` of [Service], keys that repeat keep all their values."""
    values: dict[str, list[str]] = {}
    section = ""
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


def unit_copy(tmp_path: Path) -> Path:
    """verify needs ExecStart's binary to exist: point it at one that does."""
    text = UNIT.read_text()
    assert "ExecStart=/usr/local/bin/rkllama-ollama serve" in text
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace("/usr/local/bin/rkllama-ollama", "/bin/true"))
    return copy


@needs_analyze
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    unit = unit_copy(tmp_path)
    result = subprocess.run(
        [ANALYZE, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    # verify exits 0 on unknown values too; it only warns. Any line about our file is a mistake.
    assert UNIT.name not in result.stderr, result.stderr


@needs_analyze
def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a unit with a wrong value produces a warning about the file."""
    unit = unit_copy(tmp_path)
    unit.write_text(unit.read_text().replace("Type=notify", "Type=notifyy"))
    result = subprocess.run(
        [ANALYZE, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert UNIT.name in result.stderr


@needs_analyze
def test_unit_exposure_is_low(tmp_path: Path) -> None:
    unit = unit_copy(tmp_path)
    result = subprocess.run(
        [ANALYZE, "security", "--offline=true", "--threshold=30", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr


def test_unit_is_notify_restarting_non_root_and_hardened() -> None:
    service = service_section()
    assert service["Type"] == ["notify"]
    assert service["NotifyAccess"] == ["main"]
    assert service["Restart"] == ["on-failure"]
    assert service["WatchdogSec"] and int(service["WatchdogSec"][0]) > 0
    assert service["User"][0] not in ("", "root", "0")
    assert {"render", "video"} <= set(service["SupplementaryGroups"][0].split())
    assert service["StateDirectory"] == ["rkllama-ollama"]
    for key in (
        "NoNewPrivileges",
        "ProtectHome",
        "PrivateTmp",
        "LockPersonality",
        "RestrictSUIDSGID",
        "ProtectKernelModules",
    ):
        assert service[key] == ["yes"], key
    assert service["ProtectSystem"] == ["strict"]
    assert set(service["RestrictAddressFamilies"][0].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert "PrivateDevices" not in service  # the NPU nodes must stay reachable
    assert service["KillMode"] == ["mixed"]  # SIGTERM to the daemon, which stops its runner itself


def test_env_example_only_names_known_variables() -> None:
    text = (SYSTEMD / "rkllama-ollama.env.example").read_text()
    names = {
        line.lstrip("#").split("=", 1)[0] for line in text.splitlines() if "=" in line and " " not in line
    }
    assert names and all(name.startswith("RKLLAMA_") for name in names), names
    assert {"RKLLAMA_API_KEY", "RKLLAMA_ORIGINS", "RKLLAMA_HOST"} <= names


def test_udev_rule_gives_the_npu_nodes_to_render() -> None:
    rules = [
        line
        for line in (SYSTEMD / "99-rkllama-npu.rules").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert any('KERNEL=="rknpu"' in r and 'GROUP="render"' in r for r in rules)
    assert any('KERNEL=="renderD*"' in r and 'GROUP="render"' in r for r in rules)
    assert all('MODE="0660"' in r for r in rules)
