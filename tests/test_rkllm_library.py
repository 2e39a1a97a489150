"""Finding librkllmrt, telling its version/family apart, refusing what is not supported."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rkllama_ollama.runtime.rkllm import library
from rkllama_ollama.runtime.rkllm.abi import Family
from rkllama_ollama.runtime.rkllm.library import (
    RkllmLibraryError,
    family_for_version,
    find_library,
    identify,
    open_library,
    parse_banner,
)
from tests.rkllm_support.sim import NATIVE, REPO, SIM_VERSIONS, build_simulators, write_model

EXPECTED_FAMILY = {"C": Family.C, "D": Family.D, "E": Family.E, "F": Family.F}


@pytest.fixture(scope="session")
def sims() -> dict[str, Path]:
    return build_simulators()


def _compile_sim(tmp_path: Path, family_letter: str, version: str, *, hide_version: bool = False) -> Path:
    out = tmp_path / f"librkllmrt-{version}{'-hidden' if hide_version else ''}.so"
    extra = ["-DRKLLM_SIM_HIDE_VERSION"] if hide_version else []
    subprocess.run(
        [
            "gcc",
            "-O1",
            "-shared",
            "-fPIC",
            "-pthread",
            "-fvisibility=hidden",
            f"-DRKLLM_SIM_FAMILY=RKLLM_SIM_FAMILY_{family_letter}",
            f'-DRKLLM_SIM_VERSION="{version}"',
            *extra,
            "-o",
            str(out),
            str(NATIVE / "rkllm_sim" / "rkllm_sim.c"),
        ],
        check=True,
    )
    return out


@pytest.mark.parametrize("letter", list(SIM_VERSIONS))
def test_each_simulator_is_identified_by_the_version_its_file_carries(
    sims: dict[str, Path], letter: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RKLLM_SIM_NPU", "absent")  # no banner: the file alone must tell
    identity = identify(str(sims[letter]), environ={})
    assert identity.version == SIM_VERSIONS[letter]
    assert identity.family == EXPECTED_FAMILY[letter]
    assert identity.source == "file"
    assert library.version_literals(str(sims[letter])) == [SIM_VERSIONS[letter]]


@pytest.mark.parametrize("letter", ["C", "E", "F"])
def test_without_a_version_literal_the_banner_tells(tmp_path: Path, letter: str) -> None:
    lib = _compile_sim(tmp_path, letter, SIM_VERSIONS[letter], hide_version=True)
    assert library.version_literals(str(lib)) == []
    identity = identify(str(lib), environ={})
    assert (identity.version, identity.family, identity.source) == (
        SIM_VERSIONS[letter],
        EXPECTED_FAMILY[letter],
        "probe",
    )


def test_no_literal_and_no_device_names_the_device_and_its_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1.2.0+ print no banner without the NPU: the error is about the device, not the version."""
    lib = _compile_sim(tmp_path, "E", "1.2.1", hide_version=True)
    monkeypatch.setenv("RKLLM_SIM_NPU", "absent")
    with pytest.raises(RkllmLibraryError) as info:
        identify(str(lib), environ={})
    message = str(info.value)
    assert "NPU device could not be opened" in message and "failed to open rknpu module" in message
    assert "/dev/rknpu" in message and "driver" in message
    assert "cannot tell" not in message


def test_the_override_wins_over_the_file(sims: dict[str, Path]) -> None:
    identity = identify(str(sims["E"]), environ={"RKLLAMA_RKLLM_VERSION": "1.2.2"})
    assert (identity.version, identity.source) == ("1.2.2", "override")


def test_literals_of_another_generation_are_discarded(tmp_path: Path) -> None:
    blob = tmp_path / "librkllmrt.so"
    blob.write_bytes(b"junk\x001.2.3\x00I rkllm: %s\x000.9.7\x001.1.0\x00v1.9.9\x001.2.3\x00")
    assert library.version_literals(str(blob)) == ["1.2.3", "1.1.0"]
    assert library.embedded_version(str(blob), library.SymbolClass.E_OR_F) == "1.2.3"
    assert library.embedded_version(str(blob), library.SymbolClass.C) == "1.1.0"
    assert library.embedded_version(str(blob)) is None  # two candidates, nothing to choose by


@given(st.binary(max_size=512))
def test_version_scan_never_fails_on_arbitrary_bytes(data: bytes) -> None:
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".so") as handle:
        handle.write(b"\x7fELF" + data)
        handle.flush()
        found = library.version_literals(handle.name)
    assert all(re.fullmatch(r"1\.\d+\.\d+(b\d+)?", item) for item in found)


@pytest.mark.parametrize("letter", list(SIM_VERSIONS))
def test_symbols_alone_tell_the_generation(sims: dict[str, Path], letter: str) -> None:
    import ctypes

    expected = {"C": "C", "D": "D", "E": "E-or-F", "F": "E-or-F"}[letter]
    assert library.symbol_class(ctypes.CDLL(str(sims[letter]))) == expected


def test_version_override_is_trusted_within_the_symbol_generation(sims: dict[str, Path]) -> None:
    identity = identify(str(sims["E"]), environ={"RKLLAMA_RKLLM_VERSION": "1.2.3"})
    assert (identity.version, identity.family, identity.source) == ("1.2.3", Family.E, "override")


def test_version_override_contradicting_the_symbols_is_refused(sims: dict[str, Path]) -> None:
    with pytest.raises(RkllmLibraryError, match=r"RKLLAMA_RKLLM_VERSION=1\.1\.4.*1\.2\.1\+"):
        identify(str(sims["E"]), environ={"RKLLAMA_RKLLM_VERSION": "1.1.4"})


@pytest.mark.parametrize("version", ["1.0.1", "1.0.2"])
def test_1_0_versions_are_refused_naming_the_supported_ones(version: str) -> None:
    with pytest.raises(RkllmLibraryError) as info:
        family_for_version(version)
    message = str(info.value)
    assert version in message and "1.1.x" in message and "1.3.0" in message


@pytest.mark.parametrize("version", ["1.4.0", "1.3.1", "2.0.0", "banana"])
def test_unknown_versions_are_refused(version: str) -> None:
    with pytest.raises(RkllmLibraryError, match="not supported") as info:
        family_for_version(version)
    assert version in str(info.value) and "1.2.1-1.2.3" in str(info.value)


@pytest.mark.parametrize(
    ("version", "family"),
    [("1.1.0", Family.C), ("1.1.4", Family.C), ("1.2.0", Family.D), ("1.2.1b1", Family.D_PRIME)]
    + [(v, Family.E) for v in ("1.2.1", "1.2.2", "1.2.3")]
    + [("1.3.0", Family.F)],
)
def test_supported_versions_map_to_their_family(version: str, family: Family) -> None:
    assert family_for_version(version) == family


def test_a_library_reporting_an_unknown_version_is_refused(tmp_path: Path) -> None:
    lib = _compile_sim(tmp_path, "E", "1.4.0")
    with pytest.raises(RkllmLibraryError, match=r"'1\.4\.0' is not supported"):
        identify(str(lib), environ={})


def test_a_1_0_library_is_refused_by_its_symbols(tmp_path: Path) -> None:
    source = tmp_path / "old.c"
    source.write_text("int rkllm_init(void) { return -1; }\nint rkllm_run(void) { return -1; }\n")
    lib = tmp_path / "librkllmrt-old.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(lib), str(source)], check=True)
    with pytest.raises(RkllmLibraryError, match=r"1\.0\.x.*not supported.*1\.1\.x"):
        identify(str(lib), environ={})


def test_banner_parsing() -> None:
    line = "I rkllm: rkllm-runtime version: 1.2.3, rknpu driver version: 0.9.8, platform: RK3576\n"
    assert parse_banner("noise\n" + line) == "1.2.3"
    assert parse_banner("rkllm-runtime version: 1.0.1, rknpu driver version: 0.9.6") == "1.0.1"
    assert parse_banner("rkllm-runtime version: 1.2.1b1") == "1.2.1b1"
    assert parse_banner("nothing here") is None


def test_missing_library_from_env_names_the_path() -> None:
    with pytest.raises(RkllmLibraryError, match="RKLLAMA_RKLLM_LIB=/no/such/librkllmrt.so"):
        find_library({"RKLLAMA_RKLLM_LIB": "/no/such/librkllmrt.so"})


def test_missing_library_message_lists_the_search_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(library, "SEARCH_DIRS", (str(tmp_path / "a"), str(tmp_path / "b")))
    with pytest.raises(RkllmLibraryError, match="librkllmrt.so not found.*RKLLAMA_RKLLM_LIB") as info:
        find_library({})
    assert str(tmp_path / "a") in str(info.value)


def test_search_path_finds_the_library(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "librkllmrt.so").write_bytes(b"")
    monkeypatch.setattr(library, "SEARCH_DIRS", (str(tmp_path / "none"), str(tmp_path / "lib")))
    assert find_library({}) == str((tmp_path / "lib" / "librkllmrt.so").resolve())


def test_open_library_declares_the_family_signatures(sims: dict[str, Path]) -> None:
    opened = open_library(str(sims["F"]), environ={})
    assert opened.layout.family == Family.F
    assert opened.cdll.rkllm_init.argtypes[2]._type_ is opened.layout.Callback


def test_wrong_forced_version_fails_in_the_child_only(sims: dict[str, Path], tmp_path: Path) -> None:
    """1.3.0 layouts on a 1.2.1 library: the runner fails (clean error or crash), the parent is untouched."""
    model = write_model(tmp_path, reply="hello")
    script = textwrap.dedent(
        f"""
        from rkllama_ollama.runtime.base import LoadSpec, SamplingOptions
        from rkllama_ollama.runtime.rkllm.session import RkllmRuntime
        session = RkllmRuntime().load(LoadSpec(engine="rkllm", model_path={str(model)!r}, num_ctx=256))
        session.generate("hi", SamplingOptions(), lambda piece: None)
        """
    )
    env = {"RKLLAMA_RKLLM_LIB": str(sims["E"]), "RKLLAMA_RKLLM_VERSION": "1.3.0", "PATH": "/usr/bin:/bin"}
    child = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, timeout=60)
    assert child.returncode != 0
    assert child.returncode in (-signal.SIGSEGV, -signal.SIGBUS, -signal.SIGILL, 1)
