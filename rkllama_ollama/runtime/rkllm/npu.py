"""What the board says about its NPU: SoC, RKNPU driver version, device nodes and the user's access.

Every reader takes a `root` (default `/`) so tests run them on fake trees: the device tree under
`proc/device-tree`, sysfs/debugfs under `sys`, device nodes under `dev`, kernel logs under `var/log`.
Nothing here loads native code. Facts are in docs/board-startup.md.
"""

from __future__ import annotations

import grp
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

ROOT = Path("/")
SOCS = ("rk3588", "rk3576", "rk3562", "rv1126b")
SOC_ALIASES = {"rk3588s": "rk3588"}
# The runtimes from 1.1.0 on are documented against RKNPU driver 0.9.8; the binaries refuse or
# misbehave below 0.9.7 (docs/board-startup.md).
DRIVER_MINIMUM = "0.9.7"
DRIVER_RECOMMENDED = "0.9.8"
NPU_GROUPS = ("render", "video")

_DRIVER_VERSION = re.compile(r"(?i)rknpu\b[^\n]*?\bv?(\d+\.\d+\.\d+)")


@dataclass(frozen=True)
class DeviceNode:
    path: Path
    accessible: bool  # this process may open it for reading and writing
    group: str | None  # the node's group name
    user_in_group: bool
    is_npu: bool | None  # a render node bound to the RKNPU driver; None when sysfs cannot tell


def device_tree_compatible(root: Path = ROOT) -> list[str]:
    try:
        raw = (root / "proc/device-tree/compatible").read_bytes()
    except OSError:
        return []
    return [item.decode("ascii", "replace") for item in raw.split(b"\0") if item]


def board_model(root: Path = ROOT) -> str | None:
    try:
        return (root / "proc/device-tree/model").read_bytes().rstrip(b"\0").decode("utf-8", "replace")
    except OSError:
        return None


def detect_soc(root: Path = ROOT) -> str | None:
    """rk3588 / rk3576 / rk3562 / rv1126b from the device tree; None off Rockchip boards."""
    for item in device_tree_compatible(root):
        vendor, _, chip = item.partition(",")
        chip = SOC_ALIASES.get(chip.lower(), chip.lower())
        if vendor.lower() == "rockchip" and chip in SOCS:
            return chip
    return None


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


def driver_version(root: Path = ROOT) -> tuple[str | None, str]:
    """(version, where it was read) of the RKNPU kernel driver; (None, why not) when unreadable."""
    unreadable: list[str] = []
    for relative in ("sys/kernel/debug/rknpu/version", "sys/module/rknpu/version", "proc/rknpu/version"):
        path = root / relative
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except PermissionError:
            unreadable.append(f"/{relative} (needs root)")
            continue
        except OSError:
            continue
        match = re.search(r"v?(\d+\.\d+\.\d+)", text)
        if match:
            return match.group(1), f"/{relative}"
    log_text, log_source = kernel_log(root)
    found = _DRIVER_VERSION.findall(log_text)
    if found:
        return found[-1], log_source
    why = "not in sysfs/debugfs" + (f" ({', '.join(unreadable)})" if unreadable else "")
    return None, why + " nor in the kernel log"


def kernel_log(root: Path = ROOT) -> tuple[str, str]:
    """The kernel log: `dmesg` on the real root (may be restricted), else the log files under var/log."""
    if root == ROOT:
        try:
            completed = subprocess.run(["dmesg"], capture_output=True, timeout=10, check=False)
            if completed.returncode == 0 and completed.stdout:
                return completed.stdout.decode("utf-8", "replace"), "the kernel log (dmesg)"
        except (OSError, subprocess.TimeoutExpired):
            pass
    for relative in ("var/log/kern.log", "var/log/dmesg"):
        try:
            return (root / relative).read_text(encoding="utf-8", errors="replace"), f"/{relative}"
        except OSError:
            continue
    return "", "no kernel log"


def _group_name(gid: int) -> str | None:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return None


def _render_node_is_npu(root: Path, name: str) -> bool | None:
    device = root / "sys/class/drm" / name / "device"
    try:
        driver = os.readlink(device / "driver")
        return "rknpu" in Path(driver).name.lower()
    except OSError:
        pass
    try:
        uevent = (device / "uevent").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    return "rknpu" in uevent.lower()


def device_nodes(root: Path = ROOT) -> list[DeviceNode]:
    """/dev/rknpu and the /dev/dri/renderD* nodes, with whether this user may open them."""
    candidates = [root / "dev/rknpu"]
    try:
        candidates += sorted((root / "dev/dri").glob("renderD*"))
    except OSError:
        pass
    groups = set(os.getgroups()) | {os.getegid()}
    nodes = []
    for path in candidates:
        try:
            stat = path.stat()
        except OSError:
            continue
        is_npu = True if path.name == "rknpu" else _render_node_is_npu(root, path.name)
        nodes.append(
            DeviceNode(
                path=path,
                accessible=os.access(path, os.R_OK | os.W_OK),
                group=_group_name(stat.st_gid),
                user_in_group=stat.st_gid in groups,
                is_npu=is_npu,
            )
        )
    return nodes


def npu_nodes(root: Path = ROOT) -> list[DeviceNode]:
    """The nodes that are (or may be) the NPU: render nodes known to belong to another driver are left out."""
    return [node for node in device_nodes(root) if node.is_npu is not False]


def user_name() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError):
        return os.environ.get("USER", "the user")


def device_access_fix(root: Path = ROOT) -> str:
    """What to do when the runtime cannot open the NPU, from what this board shows."""
    nodes = npu_nodes(root)
    version, _ = driver_version(root)
    driver = (
        f"the RKNPU driver is {version}"
        if version is not None
        else "the RKNPU driver version could not be read (sudo cat /sys/kernel/debug/rknpu/version)"
    )
    need = f"the runtimes need {DRIVER_RECOMMENDED} (at least {DRIVER_MINIMUM})"
    if not nodes:
        return (
            "load the RKNPU driver (a Rockchip vendor kernel 5.10/6.1 with rknpu built in; modprobe rknpu) "
            "so that /dev/rknpu or a /dev/dri/renderD* node of the rknpu driver appears (there is none), "
            f"then give {user_name()} access to it (its group, usually 'render' or 'video': "
            f"sudo usermod -aG render {user_name()}); {driver}, {need}"
        )
    blocked = [node for node in nodes if not node.accessible]
    if blocked and len(blocked) == len(nodes):
        node = blocked[0]
        group = node.group if node.group in NPU_GROUPS else (node.group or "render")
        return (
            f"{node.path} exists but {user_name()} may not open it: add the user to the '{group}' group "
            f"(sudo usermod -aG {group} {user_name()}, then log in again; the systemd service needs "
            f"SupplementaryGroups={group}); {driver}, {need}"
        )
    listed = ", ".join(str(node.path) for node in nodes)
    return (
        f"the device node exists and is accessible ({listed}), so the driver itself refused: {driver}, "
        f"{need}; upgrade the kernel's RKNPU driver"
    )
