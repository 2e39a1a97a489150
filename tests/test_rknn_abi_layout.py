"""The ctypes mirror of librknnrt's structs == the C compiler's layout of native/rknn_sim/rknn_api.h."""

from __future__ import annotations

import ctypes
import subprocess

from rkllama_ollama.runtime.rknn.abi import STRUCTS
from tests.rkllm_support.sim import BUILD, NATIVE


def _compiled_layouts() -> dict[str, tuple[int, dict[str, int]]]:
    subprocess.run(["make", "-s", "-C", str(NATIVE), "probes"], check=True, capture_output=True)
    out = subprocess.run([str(BUILD / "rknn_probe")], check=True, capture_output=True, text=True).stdout
    layouts: dict[str, tuple[int, dict[str, int]]] = {}
    for line in out.splitlines():
        head, _, members = line.partition(":")
        name, size = head.split()
        fields = dict(item.split() for item in members.split(","))
        layouts[name] = (int(size), {field: int(offset) for field, offset in fields.items()})
    return layouts


def test_every_struct_matches_the_compiled_header() -> None:
    compiled = _compiled_layouts()
    assert set(compiled) == set(STRUCTS)
    for name, cls in STRUCTS.items():
        size, offsets = compiled[name]
        mirror = {field: getattr(cls, field).offset for field, _ in cls._fields_}
        assert (ctypes.sizeof(cls), mirror) == (size, offsets), name
