"""Uploaded blobs (`/api/blobs/:digest`): files named by their sha256, kept in ``<store>/.blobs/``.

A body is streamed to a hidden partial file in the same folder while it is hashed, and renamed to
``sha256-<hex>`` only when the digest matches, so a blob that is visible is always complete and
correct. Nothing is ever read into memory whole. `/api/create` links blobs into new model folders.
Partial files left by an interrupted process are removed at start-up (`Store.remove_leftovers`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import uuid
from collections.abc import AsyncIterable
from pathlib import Path

log = logging.getLogger(__name__)

BLOBS_FOLDER = ".blobs"
PARTIAL_PREFIX = ".partial-"
_DIGEST_RE = re.compile(r"sha256[:-]([0-9a-fA-F]{64})")


class BlobError(ValueError):
    """A digest that is malformed, or that the received bytes do not match (the client's mistake)."""


def parse_digest(text: str) -> str:
    """`sha256:<hex>` or `sha256-<hex>` -> the lower-case hex; BlobError otherwise."""
    match = _DIGEST_RE.fullmatch(text or "")
    if match is None:
        raise BlobError("invalid digest format")
    return match.group(1).lower()


class BlobStore:
    def __init__(self, store_root: Path) -> None:
        self.folder = Path(store_root) / BLOBS_FOLDER

    def path_of(self, hex_digest: str) -> Path:
        return self.folder / f"sha256-{hex_digest}"

    def exists(self, hex_digest: str) -> bool:
        return self.path_of(hex_digest).is_file()

    async def receive(self, hex_digest: str, chunks: AsyncIterable[bytes]) -> Path:
        """Stream `chunks` into the blob `hex_digest`; BlobError (and no file) when the digest differs."""
        self.folder.mkdir(parents=True, exist_ok=True)
        partial = self.folder / f"{PARTIAL_PREFIX}{uuid.uuid4().hex}"
        hasher = hashlib.sha256()
        size = 0
        try:
            with open(partial, "wb") as handle:
                async for chunk in chunks:
                    hasher.update(chunk)
                    size += len(chunk)
                    await asyncio.to_thread(handle.write, chunk)
            got = hasher.hexdigest()
            if got != hex_digest:
                raise BlobError(f'digest mismatch, expected "sha256:{hex_digest}", got "sha256:{got}"')
            os.replace(partial, self.path_of(hex_digest))
        finally:
            partial.unlink(missing_ok=True)
        log.info("blob stored sha256=%s size=%d", hex_digest, size)
        return self.path_of(hex_digest)

    def weights_suffix(self, hex_digest: str) -> str:
        """`.gguf` when the blob starts with the GGUF magic, else `.rkllm`."""
        with open(self.path_of(hex_digest), "rb") as handle:
            return ".gguf" if handle.read(4) == b"GGUF" else ".rkllm"

    def remove_partials(self) -> None:
        """Remove uploads that an interrupted process left half-written."""
        for partial in self.folder.glob(f"{PARTIAL_PREFIX}*"):
            log.info("removing leftover partial blob=%s", partial.name)
            partial.unlink(missing_ok=True)
