"""Find librkllmrt.so, tell which ABI family it is, and open it with that family's signatures.

Detection (docs/board-startup.md, docs/rkllm-runtime.md): exported symbols tell 1.0.x / C / D /
E-or-F apart; the exact version comes, in this order, from `RKLLAMA_RKLLM_VERSION` (always wins), from
the version literal the library file carries in its read-only data (no code runs), and from the
`rkllm-runtime version: X` line that rkllm_init prints. That last probe runs in a throw-away child
process (a wrong layout may crash it) and passes a model path that does not exist; it only works when
the NPU can be opened, because from 1.2.0 the banner (which carries the driver version) is printed
after the device is opened.

This module loads the vendor library into the current process; call it only inside the runner
child process, never in the daemon (except `version_without_loading` and `has_multi_batch`, which read
the file and never load it).
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from rkllama_ollama.runtime.base import RuntimeFailure
from rkllama_ollama.runtime.rkllm.abi import Family, Layout, declare_functions, layout_for
from rkllama_ollama.runtime.rkllm.startup import Cause, diagnose

log = logging.getLogger(__name__)

LIBRARY_NAME = "librkllmrt.so"
LIBRARY_ENV = "RKLLAMA_RKLLM_LIB"
VERSION_ENV = "RKLLAMA_RKLLM_VERSION"
SEARCH_DIRS = ("/usr/lib", "/usr/local/lib", "./lib")
SUPPORTED_VERSIONS = "1.1.x, 1.2.0, 1.2.1b1, 1.2.1-1.2.3, 1.3.0"
PROBE_TIMEOUT_S = 60.0

_BANNER = re.compile(r"rkllm-runtime version:\s*([0-9][0-9A-Za-z.\-+]*?)(?:,|\s|$)")
_VERSION_FAMILIES: dict[str, Family] = {
    "1.2.0": Family.D,
    "1.2.1b1": Family.D_PRIME,
    "1.2.1": Family.E,
    "1.2.2": Family.E,
    "1.2.3": Family.E,
    "1.3.0": Family.F,
}


class SymbolClass:
    """What the exported symbols alone can tell (docs/rkllm-runtime.md, "Telling the release")."""

    PRE_1_1 = "1.0.x"
    C = "C"
    D = "D"
    E_OR_F = "E-or-F"


_SYMBOL_CLASS_OF_FAMILY = {
    Family.C: SymbolClass.C,
    Family.D: SymbolClass.D,
    Family.D_PRIME: SymbolClass.D,
    Family.E: SymbolClass.E_OR_F,
    Family.F: SymbolClass.E_OR_F,
}
_SYMBOL_CLASS_RELEASES = {
    SymbolClass.PRE_1_1: "1.0.x",
    SymbolClass.C: "1.1.x",
    SymbolClass.D: "1.2.0 / 1.2.1b1",
    SymbolClass.E_OR_F: "1.2.1+",
}


class RkllmLibraryError(RuntimeFailure):
    """The runtime library is missing, unsupported, or its version cannot be determined."""


@dataclass(frozen=True)
class RuntimeIdentity:
    path: str
    version: str  # e.g. "1.2.1"; "1.1.x"-style when only the symbols were available
    family: Family
    source: str  # "override", "file" (the version literal in the .so), "probe" (banner) or "symbols"


@dataclass(frozen=True)
class RkllmLibrary:
    """An opened librkllmrt with the signatures of its family declared."""

    identity: RuntimeIdentity
    cdll: ctypes.CDLL
    layout: Layout


def find_library(environ: dict[str, str] | None = None) -> str:
    """Path of librkllmrt.so: $RKLLAMA_RKLLM_LIB, then /usr/lib, /usr/local/lib, ./lib."""
    env = os.environ if environ is None else environ
    explicit = env.get(LIBRARY_ENV)
    if explicit:
        if not Path(explicit).is_file():
            raise RkllmLibraryError(f"{LIBRARY_ENV}={explicit} does not name a file")
        return str(Path(explicit).resolve())
    for directory in SEARCH_DIRS:
        candidate = Path(directory) / LIBRARY_NAME
        if candidate.is_file():
            return str(candidate.resolve())
    raise RkllmLibraryError(
        f"{LIBRARY_NAME} not found: set {LIBRARY_ENV} to its path or install it in one of "
        f"{', '.join(SEARCH_DIRS)} (supported runtime versions: {SUPPORTED_VERSIONS})"
    )


def family_for_version(version: str) -> Family:
    """The ABI family of a runtime version string; RkllmLibraryError for unsupported ones."""
    version = version.strip()
    if re.fullmatch(r"1\.1\.\d+", version):
        return Family.C
    if version in _VERSION_FAMILIES:
        return _VERSION_FAMILIES[version]
    if re.match(r"1\.0(\.|$)", version):
        raise RkllmLibraryError(
            f"RKLLM runtime {version} is not supported (1.0.x has a different API and model format); "
            f"supported versions: {SUPPORTED_VERSIONS}"
        )
    raise RkllmLibraryError(
        f"RKLLM runtime version {version!r} is not supported; supported versions: {SUPPORTED_VERSIONS}. "
        f"If it is ABI-compatible with one of them, set {VERSION_ENV} to that version."
    )


def symbol_class(cdll: ctypes.CDLL) -> str:
    """Which generation the exported symbols say the library is."""

    def exports(name: str) -> bool:
        return hasattr(cdll, name)

    if not exports("rkllm_run_async"):
        return SymbolClass.PRE_1_1
    if not exports("rkllm_set_chat_template"):
        return SymbolClass.C
    if not exports("rkllm_set_function_tools"):
        return SymbolClass.D
    return SymbolClass.E_OR_F


# A runtime version literal on its own in the read-only data: NUL, "1.<minor>.<patch>[b<n>]", NUL.
_VERSION_LITERAL = re.compile(rb"(?<=\x00)(1\.\d{1,2}\.\d{1,2}(?:b\d{1,2})?)(?=\x00)")
_ELF_MAGIC = b"\x7fELF"


def _elf_rodata(data: bytes) -> bytes | None:
    """The bytes of the ELF file's .rodata* sections; None when `data` is not a readable ELF file."""
    if len(data) < 64 or data[:4] != _ELF_MAGIC or data[4] not in (1, 2) or data[5] not in (1, 2):
        return None
    is64 = data[4] == 2
    order = "<" if data[5] == 1 else ">"
    try:
        if is64:
            (shoff,) = struct.unpack_from(order + "Q", data, 0x28)
            shentsize, shnum, shstrndx = struct.unpack_from(order + "HHH", data, 0x3A)
            header = order + "IIQQQQ"
        else:
            (shoff,) = struct.unpack_from(order + "I", data, 0x20)
            shentsize, shnum, shstrndx = struct.unpack_from(order + "HHH", data, 0x2E)
            header = order + "IIIIII"
        sections = [struct.unpack_from(header, data, shoff + i * shentsize) for i in range(shnum)]
        names_offset, names_size = sections[shstrndx][4], sections[shstrndx][5]
        names = data[names_offset : names_offset + names_size]
    except (struct.error, IndexError):
        return None
    chunks = []
    for name_index, _type, _flags, _addr, offset, size in sections:
        name = names[name_index : names.find(b"\x00", name_index)]
        if name.startswith(b".rodata"):
            chunks.append(data[offset : offset + size])
    return b"\x00" + b"\x00".join(chunks) + b"\x00" if chunks else None


def version_literals(path: str) -> list[str]:
    """Distinct runtime-version-shaped literals in the library's read-only data, in file order."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return []
    rodata = _elf_rodata(data)
    haystack = rodata if rodata is not None else b"\x00" + data
    found = [m.group(1).decode("ascii") for m in _VERSION_LITERAL.finditer(haystack)]
    return list(dict.fromkeys(found))


def embedded_version(path: str, symbols: str | None = None) -> str | None:
    """The runtime version the library file carries, or None when it carries none or several.

    With `symbols` (what the exported functions say), literals of another generation are discarded:
    a library may also carry the version of a component or of the minimum model format.
    """
    candidates = version_literals(path)
    if symbols is not None and len(candidates) > 1:
        consistent = []
        for candidate in candidates:
            try:
                family = family_for_version(candidate)
            except RkllmLibraryError:
                continue
            if _SYMBOL_CLASS_OF_FAMILY[family] == symbols:
                consistent.append(candidate)
        candidates = consistent
    if len(candidates) == 1:
        return candidates[0]
    if candidates:
        log.info("rkllm library %s carries several version literals %s: not choosing", path, candidates)
    return None


# The child process: load the library, call rkllm_init with a zeroed oversized parameter block whose
# first field (model_path, offset 0 in every version) names a file that does not exist, and a zeroed
# block as third argument. rkllm_init prints its version banner first, then fails on the missing file.
_PROBE_SCRIPT = r"""
import ctypes, sys
lib = ctypes.CDLL(sys.argv[1])
param = ctypes.create_string_buffer(1024)
path = ctypes.create_string_buffer(sys.argv[2].encode())
ctypes.c_void_p.from_buffer(param, 0).value = ctypes.addressof(path)
third = ctypes.create_string_buffer(64)
handle = ctypes.c_void_p()
lib.rkllm_init.restype = ctypes.c_int
lib.rkllm_init.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p, ctypes.c_void_p]
rc = lib.rkllm_init(ctypes.byref(handle), ctypes.addressof(param), ctypes.addressof(third))
libc = ctypes.CDLL(None)
libc.fflush(None)
sys.stdout.write("\nprobe-rc: %d\n" % rc)
sys.stdout.flush()
"""


def parse_banner(output: str) -> str | None:
    match = _BANNER.search(output)
    return match.group(1) if match else None


@dataclass(frozen=True)
class ProbeResult:
    version: str | None  # from the banner; None when none was printed
    output: str  # everything the child printed (the runtime's own lines)


def probe_version(path: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Run rkllm_init in a child process and read the version banner; None if none was printed."""
    return probe(path, timeout).version


def probe(path: str, timeout: float = PROBE_TIMEOUT_S, environ: dict[str, str] | None = None) -> ProbeResult:
    """Run rkllm_init in a child process with a model that does not exist; its banner and messages."""
    with tempfile.TemporaryDirectory(prefix="rkllm-probe-") as scratch:
        missing_model = str(Path(scratch) / "no-such-model.rkllm")
        try:
            completed = subprocess.run(
                [sys.executable, "-c", _PROBE_SCRIPT, path, missing_model],
                capture_output=True,
                timeout=timeout,
                cwd=scratch,
                env=environ,
                check=False,
            )
        except subprocess.TimeoutExpired:
            log.warning("rkllm version probe of %s timed out after %.0fs", path, timeout)
            return ProbeResult(version=None, output="")
    output = completed.stdout.decode("utf-8", "replace") + "\n" + completed.stderr.decode("utf-8", "replace")
    version = parse_banner(output)
    log.info("rkllm version probe of %s: version=%s exit=%s", path, version, completed.returncode)
    return ProbeResult(version=version, output=output)


_identity_cache: dict[tuple[str, int, int], RuntimeIdentity] = {}


def version_without_loading(environ: dict[str, str] | None = None) -> tuple[str, str] | None:
    """(path, version) of the runtime the runner would load, told without loading it: the library's
    path as the runner finds it, and `RKLLAMA_RKLLM_VERSION` or the one version literal its file
    carries. None when there is no library here or its file does not say. Safe in the daemon: it reads
    the file, it never maps it."""
    env = dict(os.environ) if environ is None else environ
    try:
        path = find_library(env)
    except RkllmLibraryError:
        return None
    version = env.get(VERSION_ENV, "").strip() or embedded_version(path)
    return (path, version) if version else None


def has_multi_batch(version: str) -> bool | None:
    """Whether runtime `version` runs several inputs per rkllm_run (`extend_param.n_batch`, E and F);
    None for a version the binding does not know."""
    try:
        return family_for_version(version) >= Family.E
    except RkllmLibraryError:
        return None


def identify(path: str, environ: dict[str, str] | None = None) -> RuntimeIdentity:
    """Detect the runtime version and ABI family of the library at `path`.

    Loads the library into this process (for the symbol check): call only in the runner.
    """
    env = os.environ if environ is None else environ
    override = env.get(VERSION_ENV, "").strip()
    path = str(Path(path).resolve())
    stat = Path(path).stat()
    cache_key = (path, stat.st_mtime_ns, stat.st_size)
    if not override and cache_key in _identity_cache:
        return _identity_cache[cache_key]
    try:
        cdll = ctypes.CDLL(path)
    except OSError as exc:
        raise RkllmLibraryError(f"cannot load the RKLLM runtime {path}: {exc}") from exc
    symbols = symbol_class(cdll)
    if symbols == SymbolClass.PRE_1_1:
        raise RkllmLibraryError(
            f"{path} is an RKLLM 1.0.x runtime (no rkllm_run_async); it is not supported. "
            f"Supported versions: {SUPPORTED_VERSIONS}"
        )
    if override:
        family = family_for_version(override)
        _check_symbols(path, override, family, symbols, f"{VERSION_ENV}={override}")
        identity = RuntimeIdentity(path=path, version=override, family=family, source="override")
        log.info("rkllm runtime %s: version %s forced by %s", path, override, VERSION_ENV)
        return identity
    version = embedded_version(path, symbols)
    probed: ProbeResult | None = None
    if version is not None:
        family = family_for_version(version)
        _check_symbols(path, version, family, symbols, "the version string in the library file")
        identity = RuntimeIdentity(path=path, version=version, family=family, source="file")
    else:
        probed = probe(path)
    if probed is not None and probed.version is not None:
        family = family_for_version(probed.version)
        _check_symbols(path, probed.version, family, symbols, "its version banner")
        identity = RuntimeIdentity(path=path, version=probed.version, family=family, source="probe")
    elif probed is None:
        pass
    elif symbols == SymbolClass.C:
        identity = RuntimeIdentity(path=path, version="1.1.x", family=Family.C, source="symbols")
    elif symbols == SymbolClass.D:
        # Without the banner, D and D' are indistinguishable; they differ only in multimodal input.
        identity = RuntimeIdentity(path=path, version="1.2.0", family=Family.D, source="symbols")
    else:
        problem = diagnose(probed.output.splitlines())
        if problem is not None and problem.cause is Cause.NO_DEVICE:
            raise RkllmLibraryError(f"the RKLLM runtime {path} cannot start: {problem.message()}")
        raise RkllmLibraryError(
            f"cannot tell whether {path} is RKLLM 1.2.1-1.2.3 or 1.3.0: the file carries no version "
            f"string and rkllm_init printed no 'rkllm-runtime version' line. Set {VERSION_ENV} "
            "(e.g. 1.2.3 or 1.3.0)."
        )
    log.info(
        "rkllm runtime %s: version %s, ABI family %s (%s)",
        path,
        identity.version,
        identity.family.name,
        identity.source,
    )
    _identity_cache[cache_key] = identity
    return identity


def _check_symbols(path: str, version: str, family: Family, symbols: str, claimed_by: str) -> None:
    expected = _SYMBOL_CLASS_OF_FAMILY[family]
    if expected != symbols:
        raise RkllmLibraryError(
            f"{claimed_by} says RKLLM runtime {version}, but {path} exports the functions of "
            f"{_SYMBOL_CLASS_RELEASES[symbols]}; refusing to guess a layout"
        )


def open_library(path: str | None = None, environ: dict[str, str] | None = None) -> RkllmLibrary:
    """Find, identify and open librkllmrt with its family's function signatures declared."""
    resolved = path or find_library(environ)
    identity = identify(resolved, environ)
    cdll = ctypes.CDLL(resolved)
    layout = layout_for(identity.family)
    declare_functions(cdll, layout)
    return RkllmLibrary(identity=identity, cdll=cdll, layout=layout)


def _identify_main(argv: list[str]) -> int:
    """`python -m rkllama_ollama.runtime.rkllm.library PATH`: the identity as one JSON line (for callers
    that must not load the vendor library into their own process, like `rkllama-ollama doctor`)."""
    import json

    try:
        identity = identify(argv[0])
    except RkllmLibraryError as exc:
        print(json.dumps({"error": str(exc)}))
        return 1
    print(
        json.dumps(
            {
                "path": identity.path,
                "version": identity.version,
                "family": identity.family.name,
                "source": identity.source,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(_identify_main(sys.argv[1:]))
