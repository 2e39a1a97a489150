"""Where a ``.rkllm`` model's Hugging Face tokenizer files are: its own folder, or the Hugging Face cache.

An ``.rkllm`` file carries no usable tokenizer or chat template, so the server needs the Hugging Face
files of the original model (``tokenizer.json``, ``tokenizer_config.json``, ...). They are looked for in
this order, offline:

1. ``<model folder>/tokenizer/`` (what ``pull`` writes);
2. the folder named by the Modelfile's ``TOKENIZER`` key (an early RKLLama way to work offline);
3. the Hugging Face cache, for the repository named by the Modelfile's ``HUGGINGFACE_PATH`` (where an
   RKLLama install keeps them: RKLLama loads its tokenizer with ``AutoTokenizer.from_pretrained`` of
   that repository). The cache location follows huggingface_hub's environment: ``HF_HUB_CACHE``, else
   ``HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``.

The cache is read through huggingface_hub's `try_to_load_from_cache` (no network, no lock files written);
it is imported on the first lookup only, so stores without ``HUGGINGFACE_PATH``-only models never pay for it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

TOKENIZER_FOLDER = "tokenizer"
# Any of these makes a folder a tokenizer folder; the first one found in the cache names the snapshot.
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "chat_template.jinja")

FROM_FOLDER = "folder"
FROM_HF_CACHE = "hf-cache"
FROM_TOKENIZER_KEY = "modelfile-tokenizer"


@dataclass(frozen=True)
class TokenizerFiles:
    """A folder of Hugging Face tokenizer files and where it was found (`FROM_FOLDER` / `FROM_HF_CACHE`)."""

    directory: Path
    origin: str
    repo: str | None = None


_warned: set[str] = set()  # the store is listed often: each problem is logged once per process


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning("%s", message)


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache of this process's environment (read now, not at import time)."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    home = os.environ.get("HF_HOME")
    if home:
        return Path(home).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def has_tokenizer_files(directory: Path) -> bool:
    return any((directory / name).is_file() for name in TOKENIZER_MARKERS)


def find_in_hf_cache(repo_id: str, cache_dir: Path | None = None) -> Path | None:
    """The cached snapshot folder of `repo_id` holding its tokenizer files, or None (never downloads)."""
    cache = cache_dir if cache_dir is not None else hf_hub_cache()
    if not cache.is_dir():
        return None
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    for name in TOKENIZER_MARKERS:
        try:
            found = try_to_load_from_cache(repo_id, name, cache_dir=cache)
        except HFValidationError as exc:
            _warn_once(f"HUGGINGFACE_PATH {repo_id!r} is not a Hugging Face repository id: {exc}")
            return None
        if isinstance(found, str):  # a path; None = unknown, a sentinel object = known to be absent
            return Path(found).parent
    return None


def find_tokenizer_files(
    folder: Path, huggingface_path: str | None, tokenizer_path: str | None = None
) -> TokenizerFiles | None:
    """The tokenizer files of the model in `folder`: its ``tokenizer/`` folder, else the folder named by
    the Modelfile's legacy ``TOKENIZER`` key (absolute, or relative to the model folder), else the HF cache.
    """
    own = folder / TOKENIZER_FOLDER
    if own.is_dir() and has_tokenizer_files(own):
        return TokenizerFiles(own, FROM_FOLDER)
    if tokenizer_path:
        named = (folder / Path(tokenizer_path).expanduser()).absolute()
        if named.is_dir() and has_tokenizer_files(named):
            return TokenizerFiles(named, FROM_TOKENIZER_KEY)
        _warn_once(f"Modelfile TOKENIZER={tokenizer_path} in {folder} is not a folder of tokenizer files")
    repo = (huggingface_path or "").strip()
    if repo:
        cached = find_in_hf_cache(repo)
        if cached is not None:
            return TokenizerFiles(cached, FROM_HF_CACHE, repo)
    if own.is_dir():  # an empty or foreign tokenizer/ folder: still the model's own, as before
        return TokenizerFiles(own, FROM_FOLDER)
    return None
