"""The catalogue: Ollama-style short names (``qwen2.5:1.5b``) -> Hugging Face repository + file per SoC.

The data lives in ``modelfiles/`` at the project root, which a wheel installs as
``<prefix>/share/rkllama-ollama/modelfiles`` (``RKLLAMA_CATALOGUE`` overrides the folder):
``index.json`` maps ``{"models": {short name: {soc: {repo, file, toolkit, max_context, modelfile, ...}}}}``
(vision models add ``encoder``: the ``.rknn`` image encoder in the same repository, pulled with the model)
and each entry's Modelfile (seed format) carries ``FROM``, ``HUGGINGFACE_PATH``, ``NUM_CTX`` and the
recommended sampling defaults. Only conversions whose file name was seen in a Hub listing are listed
(never a file name guessed from a naming pattern).

The board's SoC comes from ``/proc/device-tree/compatible`` (``rockchip,rk3588`` ...); ``RKLLAMA_SOC``
overrides it. ``rk3588s`` is an RK3588 for the runtime.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import sysconfig
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .modelfile import Modelfile, ModelfileError, parse_modelfile

log = logging.getLogger(__name__)

SOC_ENV = "RKLLAMA_SOC"
CATALOGUE_ENV = "RKLLAMA_CATALOGUE"
DEVICE_TREE_COMPATIBLE = Path("/proc/device-tree/compatible")
KNOWN_SOCS = ("rk3588", "rk3576")
SOC_ALIASES = {"rk3588s": "rk3588"}


class CatalogueError(LookupError):
    """A short name could not be resolved for this board."""


@dataclass(frozen=True)
class CatalogueEntry:
    short_name: str
    soc: str
    repo: str
    file: str  # base name of the .rkllm file (it may sit in a subfolder of the repo)
    toolkit: str
    max_context: int
    modelfile: Modelfile  # FROM, HUGGINGFACE_PATH, NUM_CTX, sampling defaults
    encoder: str = ""  # a vision model's .rknn image encoder in the same repository (base name)


INSTALLED_SUBDIR = Path("share") / "rkllama-ollama" / "modelfiles"  # setup.cfg's data_files


def catalogue_candidates() -> list[Path]:
    """Where the catalogue may be, in order: the source tree (a checkout or an editable install), then
    the data folder a wheel install puts it in (system, venv or `--user` scheme)."""
    candidates = [Path(__file__).resolve().parents[2] / "modelfiles"]
    schemes = [None, f"{os.name}_user"]
    for scheme in schemes:
        try:
            data = sysconfig.get_path("data", scheme) if scheme else sysconfig.get_path("data")
        except KeyError:
            continue
        candidates.append(Path(data) / INSTALLED_SUBDIR)
    candidates.append(Path(sys.prefix) / INSTALLED_SUBDIR)
    return list(dict.fromkeys(candidates))


def default_catalogue_dir() -> Path:
    override = os.environ.get(CATALOGUE_ENV)
    if override:
        return Path(override)
    candidates = catalogue_candidates()
    for folder in candidates:
        if (folder / "index.json").is_file():
            return folder
    return candidates[0]


def normalise_soc(text: str) -> str | None:
    value = text.strip().lower()
    value = SOC_ALIASES.get(value, value)
    return value if value in KNOWN_SOCS else None


def detect_soc(compatible_path: Path = DEVICE_TREE_COMPATIBLE) -> str | None:
    """This board's SoC (``rk3588``/``rk3576``), ``RKLLAMA_SOC`` first; None off Rockchip boards."""
    override = os.environ.get(SOC_ENV)
    if override:
        return normalise_soc(override) or override.strip().lower()
    try:
        raw = compatible_path.read_bytes()
    except OSError:
        return None
    for item in raw.split(b"\0"):
        vendor, _, chip = item.decode("ascii", errors="replace").partition(",")
        if vendor == "rockchip" and (soc := normalise_soc(chip)):
            return soc
    return None


class Catalogue:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._entries: dict[str, dict[str, CatalogueEntry]] = {}
        try:
            data = json.loads((folder / "index.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            log.warning("catalogue unreadable folder=%s error=%s", folder, exc)
            return
        for short_name, per_soc in (data.get("models") or {}).items():
            for soc, item in per_soc.items():
                try:
                    modelfile = parse_modelfile((folder / item["modelfile"]).read_text(encoding="utf-8"))
                    entry = CatalogueEntry(
                        short_name=short_name.lower(),
                        soc=soc,
                        repo=item["repo"],
                        file=item["file"],
                        toolkit=str(item.get("toolkit", "")),
                        max_context=int(item.get("max_context") or 0),
                        modelfile=modelfile,
                        encoder=str(item.get("encoder") or ""),
                    )
                except (OSError, KeyError, ValueError, ModelfileError) as exc:
                    log.warning("catalogue entry skipped name=%s soc=%s error=%s", short_name, soc, exc)
                    continue
                self._entries.setdefault(entry.short_name, {})[soc] = entry

    def names(self) -> list[str]:
        return sorted(self._entries)

    def socs_for(self, short_name: str) -> list[str]:
        return sorted(self._entries.get(self._key(short_name), {}))

    def knows(self, short_name: str) -> bool:
        return self._key(short_name) in self._entries

    def lookup(self, short_name: str, soc: str | None) -> CatalogueEntry:
        """The entry of `short_name` built for `soc`. Raises CatalogueError with a message for the user."""
        key = self._key(short_name)
        per_soc = self._entries.get(key)
        if not per_soc:
            raise CatalogueError(f"model '{short_name}' is not in the catalogue")
        if soc is None:
            raise CatalogueError(
                f"'{short_name}' is an RKLLM model for Rockchip NPUs ({', '.join(sorted(per_soc))}) and this "
                f"machine has no Rockchip NPU (set {SOC_ENV} to override); pull a GGUF model instead, "
                "e.g. hf.co/<org>/<repo>:Q4_K_M"
            )
        entry = per_soc.get(soc)
        if entry is None:
            raise CatalogueError(
                f"'{short_name}' has no build for {soc} (only {', '.join(sorted(per_soc))}); "
                "an RKLLM file built for another chip does not load on this one"
            )
        return entry

    @staticmethod
    def _key(short_name: str) -> str:
        name = short_name.strip().lower()
        return name if ":" in name else f"{name}:latest"


@lru_cache(maxsize=4)
def load_catalogue(folder: Path | None = None) -> Catalogue:
    return Catalogue(folder or default_catalogue_dir())
