"""Ollama model names and their folders inside the model store.

Names follow Ollama: ``[host/][namespace/]model[:tag]`` with the defaults host ``registry.ollama.ai``,
namespace ``library`` and tag ``latest``. Every part starts with an ASCII letter, digit or ``_``; the rest
may also hold ``-`` and ``.`` (no ``.`` in a namespace; a host may also hold ``:`` for a port). Lengths:
host 1-350, namespace/model/tag 1-80 characters. Only ASCII is accepted, so unicode look-alikes
(fullwidth ``／``, ``∕``, ...) are invalid names rather than paths.

Folder scheme (one flat directory level, reversible, seed compatible):

=========================================  ==================================
name                                       folder inside the store
=========================================  ==================================
``deepseek-1.5b:latest``                   ``deepseek-1.5b``   (the seed's plain folders)
``qwen2.5:1.5b``                           ``qwen2.5:1.5b``    (what newer RKLLama writes)
``user/m:t``                               ``user+m:t``
``example.com:5000/user/m:latest``         ``example.com:5000+user+m``
=========================================  ==================================

``+`` can never occur in a name part, so it separates host, namespace and model unambiguously; a
folder ``x:latest`` is also read as ``x:latest`` (the canonical folder written for it is ``x``). A
folder name built this way always starts with a letter, digit or ``_`` and holds only
``[A-Za-z0-9_.:+-]``: it is a single path component that is never ``.``/``..`` and never hidden, so
it cannot escape the store. Folders whose names do not parse (``My Model``, ``.staging-x``) are not
models.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"

HOST_MAX_LEN = 350
PART_MAX_LEN = 80
FOLDER_SEPARATOR = "+"

_HOST_RE = re.compile(rf"[A-Za-z0-9_][A-Za-z0-9_.:-]{{0,{HOST_MAX_LEN - 1}}}")
_NAMESPACE_RE = re.compile(rf"[A-Za-z0-9_][A-Za-z0-9_-]{{0,{PART_MAX_LEN - 1}}}")
_PART_RE = re.compile(rf"[A-Za-z0-9_][A-Za-z0-9_.-]{{0,{PART_MAX_LEN - 1}}}")


class InvalidModelName(ValueError):
    """The text is not a valid model name (or a folder name that maps to one)."""

    def __init__(self, message: str = "invalid model name") -> None:
        super().__init__(message)


@dataclass(frozen=True)
class ModelName:
    """A parsed, validated model name. Parts keep the case the user gave; compare with `key`."""

    model: str
    tag: str = DEFAULT_TAG
    namespace: str = DEFAULT_NAMESPACE
    host: str = DEFAULT_HOST

    @property
    def display(self) -> str:
        """Shortest form, always with the tag: ``llama3.2:latest``, ``user/m:tag``, ``host/ns/m:tag``."""
        return f"{self._prefix('/')}{self.model}:{self.tag}"

    @property
    def full(self) -> str:
        """Fully qualified form ``host/namespace/model:tag``."""
        return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"

    @property
    def key(self) -> str:
        """Case-folded canonical key: two names are the same model when their keys are equal."""
        return self.full.lower()

    @property
    def folder_name(self) -> str:
        """The name of this model's folder inside the store (see the module docstring)."""
        suffix = "" if self.tag.lower() == DEFAULT_TAG else f":{self.tag}"
        return f"{self._prefix(FOLDER_SEPARATOR)}{self.model}{suffix}"

    def _prefix(self, separator: str) -> str:
        default_host = self.host.lower() == DEFAULT_HOST
        if default_host and self.namespace.lower() == DEFAULT_NAMESPACE:
            return ""
        if default_host:
            return f"{self.namespace}{separator}"
        return f"{self.host}{separator}{self.namespace}{separator}"

    def __str__(self) -> str:
        return self.display


def _check(pattern: re.Pattern[str], part: str) -> str:
    if not part.isascii() or pattern.fullmatch(part) is None:
        raise InvalidModelName()
    return part


def _split_tag(last: str) -> tuple[str, str]:
    model, sep, tag = last.partition(":")
    if not sep:
        return model, DEFAULT_TAG
    return model, tag


def _from_parts(parts: list[str]) -> ModelName:
    if not 1 <= len(parts) <= 3:
        raise InvalidModelName()
    model, tag = _split_tag(parts[-1])
    namespace = parts[-2] if len(parts) >= 2 else DEFAULT_NAMESPACE
    host = parts[-3] if len(parts) == 3 else DEFAULT_HOST
    return ModelName(
        model=_check(_PART_RE, model),
        tag=_check(_PART_RE, tag),
        namespace=_check(_NAMESPACE_RE, namespace),
        host=_check(_HOST_RE, host),
    )


def parse_name(text: str) -> ModelName:
    """Parse ``[host/][namespace/]model[:tag]``. Raises `InvalidModelName("invalid model name")`."""
    if not isinstance(text, str) or not text or len(text) > HOST_MAX_LEN + 3 * PART_MAX_LEN + 4:
        raise InvalidModelName()
    return _from_parts(text.split("/"))


def name_from_folder(folder_name: str) -> ModelName:
    """The model name a store folder stands for. Raises `InvalidModelName` when it is not a model folder."""
    if not isinstance(folder_name, str) or not folder_name or "/" in folder_name:
        raise InvalidModelName()
    return _from_parts(folder_name.split(FOLDER_SEPARATOR))


def folder_in_store(root: Path, name: ModelName) -> Path:
    """The folder of `name` directly inside `root`. Always a direct child of `root`."""
    folder = root / name.folder_name
    if folder.parent != root:  # defence in depth; the folder scheme makes this impossible
        raise InvalidModelName()
    return folder
