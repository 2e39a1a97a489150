"""The one-time download of a model's tokenizer files into ``<model folder>/tokenizer/``.

For an ``.rkllm`` model whose tokenizer is neither in its folder nor in the Hugging Face cache (see
`tokenizer_files`) but whose Modelfile names ``HUGGINGFACE_PATH``, the first request that needs the
model downloads the repository's tokenizer files (the same set ``pull`` fetches) into its folder, when
the machine is online (``HF_HUB_OFFLINE`` unset or false). Afterwards serving is offline again.

- The download runs in a worker thread and is shared: concurrent requests for the model wait on the
  same download, a request whose client goes away does not cancel it, and requests for other models
  are not held up. A request waits no longer than the download itself.
- Progress goes to the log, one line per file started and at most one line per second while it runs.
- Files are assembled in a hidden staging folder and renamed to ``tokenizer/`` in one step.
- A failed download (offline, repository not found, read-only folder) is logged once and not retried
  until the daemon restarts; the model then uses the next template source.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from .store import ModelEntry, Store, WeightsFormat
from .tokenizer_files import TOKENIZER_FOLDER

log = logging.getLogger(__name__)

PROGRESS_LOG_INTERVAL = 1.0  # seconds between progress lines of one file
_TRUE = ("1", "on", "yes", "true")


def hub_offline() -> bool:
    """huggingface_hub's offline switch, read now (HF_HUB_OFFLINE, or the older TRANSFORMERS_OFFLINE)."""
    return any(
        os.environ.get(name, "").strip().lower() in _TRUE
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


class _LogProgress:
    """A tqdm stand-in for huggingface_hub's `http_get`: progress as log lines (see `_progress_for`)."""

    label = ""

    def __init__(self, *, total: int | None = None, initial: int = 0, **_: Any) -> None:
        self.total = total
        self.n = initial
        self._last = time.monotonic()

    def update(self, n: float | None = 1) -> None:
        self.n += int(n or 0)
        now = time.monotonic()
        if now - self._last >= PROGRESS_LOG_INTERVAL:
            self._last = now
            total = self.total or 0
            share = f"{100 * self.n // total}%" if total else "?%"
            log.info("tokenizer download %s %s (%d/%d bytes)", self.label, share, self.n, total)

    def update_transfer(self, n: int) -> None:
        self.update(n)

    def close(self) -> None:
        pass

    def __enter__(self) -> _LogProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _progress_for(label: str) -> type[_LogProgress]:
    return type("_FileProgress", (_LogProgress,), {"label": label})


class TokenizerFetcher:
    """Downloads missing tokenizer files once per model folder. One per store; used from the event loop."""

    def __init__(self, store: Store, *, endpoint: str | None = None) -> None:
        self.store = store
        self.endpoint = endpoint
        self._running: dict[Path, asyncio.Task[bool]] = {}
        self._failed: set[Path] = set()

    @staticmethod
    def wants(entry: ModelEntry) -> bool:
        """Whether `entry` is an .rkllm model with no tokenizer files but a repository to get them from."""
        return (
            entry.format == WeightsFormat.RKLLM
            and not entry.embedded
            and entry.tokenizer_dir is None
            and bool((entry.modelfile.huggingface_path or "").strip())
        )

    async def complete(self, entry: ModelEntry) -> ModelEntry:
        """`entry`, or when its tokenizer files were just downloaded, the entry read again from the store."""
        if not self.wants(entry) or entry.folder in self._failed or hub_offline():
            return entry
        task = self._running.get(entry.folder)
        if task is None:
            repo = (entry.modelfile.huggingface_path or "").strip()
            task = asyncio.create_task(asyncio.to_thread(self._fetch, entry.name.display, repo, entry.folder))
            self._running[entry.folder] = task
            task.add_done_callback(lambda _: self._running.pop(entry.folder, None))
        if not await asyncio.shield(task):
            self._failed.add(entry.folder)
            return entry
        return await asyncio.to_thread(self.store.resolve, entry.name)

    def _endpoint(self) -> str:
        from huggingface_hub import constants

        return (self.endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")

    def _fetch(self, model: str, repo: str, folder: Path) -> bool:
        """Download `repo`'s tokenizer files into `folder`/tokenizer. False (logged) when it cannot."""
        from huggingface_hub import HfApi, hf_hub_url
        from huggingface_hub.file_download import http_get
        from huggingface_hub.utils import build_hf_headers

        from .pull import TOKENIZER_FILES

        target = folder / TOKENIZER_FOLDER
        staging = folder / f".tokenizer-{uuid.uuid4().hex}"
        started = time.monotonic()
        try:
            info = HfApi(endpoint=self._endpoint()).model_info(repo, files_metadata=True)
            names = [s.rfilename for s in info.siblings or [] if s.rfilename in TOKENIZER_FILES]
            if not names:
                log.warning(
                    "tokenizer download model=%s repo=%s: the repository has no tokenizer files", model, repo
                )
                return False
            log.info(
                "tokenizer download model=%s repo=%s files=%s into %s", model, repo, ",".join(names), target
            )
            staging.mkdir()
            for name in names:
                url = hf_hub_url(repo, name, revision=info.sha or "main", endpoint=self._endpoint())
                with open(staging / name, "wb") as handle:
                    log.info("tokenizer download %s/%s started", repo, name)
                    http_get(
                        url,
                        handle,
                        headers=build_hf_headers(),
                        tqdm_class=_progress_for(f"{repo}/{name}"),
                    )
            if target.exists():  # someone else put files there meanwhile: theirs win
                log.info("tokenizer download model=%s: %s appeared meanwhile; keeping it", model, target)
            else:
                os.rename(staging, target)
            log.info(
                "tokenizer download model=%s done in %.1f s (%d files)",
                model,
                time.monotonic() - started,
                len(names),
            )
            return True
        except Exception as exc:  # noqa: BLE001 - HTTP, hub and file-system errors all mean "not now"
            log.warning(
                "tokenizer download model=%s repo=%s failed (%s: %s); not retried until restart",
                model,
                repo,
                type(exc).__name__,
                exc,
            )
            return False
        finally:
            shutil.rmtree(staging, ignore_errors=True)
