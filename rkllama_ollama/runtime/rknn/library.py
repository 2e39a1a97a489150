"""Find and open librknnrt.so (the RKNN runtime that runs vision encoders).

`RKLLAMA_RKNN_LIB` names it explicitly; otherwise /usr/lib, /usr/local/lib and ./lib are searched.
Load it only inside the runner child process.
"""

from __future__ import annotations

import ctypes
import os
from functools import cache
from pathlib import Path

from rkllama_ollama.runtime.base import RuntimeFailure
from rkllama_ollama.runtime.rknn.abi import declare_functions

LIBRARY_NAME = "librknnrt.so"
LIBRARY_ENV = "RKLLAMA_RKNN_LIB"
SEARCH_DIRS = ("/usr/lib", "/usr/local/lib", "./lib")


class RknnLibraryError(RuntimeFailure):
    """librknnrt is missing or cannot be opened."""


def find_library(environ: dict[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    explicit = env.get(LIBRARY_ENV)
    if explicit:
        if not Path(explicit).is_file():
            raise RknnLibraryError(f"{LIBRARY_ENV}={explicit} does not name a file")
        return str(Path(explicit).resolve())
    for directory in SEARCH_DIRS:
        candidate = Path(directory) / LIBRARY_NAME
        if candidate.is_file():
            return str(candidate.resolve())
    raise RknnLibraryError(
        f"{LIBRARY_NAME} (the RKNN runtime, needed for the vision encoder) not found: set {LIBRARY_ENV} "
        f"to its path or install it in one of {', '.join(SEARCH_DIRS)}"
    )


@cache
def _open(path: str) -> ctypes.CDLL:
    try:
        cdll = ctypes.CDLL(path)
    except OSError as exc:
        raise RknnLibraryError(f"cannot open the RKNN runtime {path}: {exc}") from exc
    missing = [name for name in ("rknn_init", "rknn_run", "rknn_outputs_get") if not hasattr(cdll, name)]
    if missing:
        raise RknnLibraryError(f"{path} is not an RKNN runtime (missing {', '.join(missing)})")
    declare_functions(cdll)
    return cdll


def open_library(path: str | None = None) -> ctypes.CDLL:
    """The opened librknnrt with its signatures declared (one handle per process and path)."""
    return _open(path or find_library())
