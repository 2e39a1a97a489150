"""Pulling models from Hugging Face (huggingface_hub): name forms, Ollama progress events, atomic installs.

Accepted names:

- catalogue short names (``qwen2.5:1.5b``): the file built for this board's SoC (see `catalogue`);
- ``hf.co/<org>/<repo>[:<file or quant>]`` (``huggingface.co/`` too) for ``.gguf`` and ``.rkllm``
  repositories; for GGUF the tag picks the quantisation (``Q4_K_M`` by default, like Ollama), a tag
  ending in ``.gguf``/``.rkllm`` names the file; a GGUF repository's ``mmproj*.gguf`` projector (a
  vision model) comes along, like a ``.rkllm`` repository's ``.rknn`` encoder;
- the seed's ``<org>/<repo>/<path/to/file>.rkllm``, stored under the file's stem as model name.

A pull resolves the name against the Hub (``pulling manifest``), downloads the weights into
``<store>/.pull-<key>/`` with huggingface_hub's `http_get` (``pulling <12 hex>`` with ``digest``/
``total``/``completed``; it retries a dropped connection with a Range request, and the ``.partial``
file survives a cancelled or failed pull, so pulling again resumes where it stopped), fetches the
tokenizer files of ``HUGGINGFACE_PATH`` (so serving never touches the network), verifies the sha256
the Hub reports for the LFS file (``verifying sha256 digest``), assembles the model in a staging
folder of the store and renames it into place (``writing manifest``, ``success``). A half-downloaded
model is never listed.

Pulls are shared: a second request for the same name subscribes to the running job. When the last
subscriber goes away the job is cancelled (the progress hook raises inside the download thread).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
import weakref
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from huggingface_hub import HfApi, hf_hub_url
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import http_get
from huggingface_hub.utils import build_hf_headers

from .catalogue import KNOWN_SOCS, Catalogue, CatalogueError, detect_soc, load_catalogue
from .modelfile import Modelfile
from .names import InvalidModelName, ModelName, parse_name
from .store import MANIFEST_NAME, MANIFEST_VERSION, MODELFILE_NAME, Store, sha256_file

log = logging.getLogger(__name__)

HF_HOSTS = ("hf.co", "huggingface.co")
DEFAULT_GGUF_QUANT = "Q4_K_M"
# Of several projectors in a GGUF repository, the precision pulled (the first one found).
PROJECTOR_PRECISIONS = ("f16", "q8_0", "bf16", "f32")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "config.json",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
)
DISK_MARGIN = 64 << 20  # bytes kept free beyond the download
PROGRESS_INTERVAL = 0.1  # seconds between progress events of one layer
DOWNLOAD_CHUNK = 1 << 20  # huggingface_hub's read size (default 10 MiB) sets the progress granularity
PULL_DIR_PREFIX = ".pull-"
PARTIAL_SUFFIX = ".partial"

if hf_constants.DOWNLOAD_CHUNK_SIZE > DOWNLOAD_CHUNK:
    hf_constants.DOWNLOAD_CHUNK_SIZE = DOWNLOAD_CHUNK


class PullError(Exception):
    """A pull failed; `status` is the HTTP status to answer with when nothing was streamed yet."""

    def __init__(self, message: str, status: int = 500) -> None:
        super().__init__(message)
        self.status = status


class PullCancelled(Exception):
    """Raised inside the download thread when every client of a pull went away."""


@dataclass(frozen=True)
class PullProgress:
    status: str
    digest: str | None = None
    total: int | None = None
    completed: int | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status}
        if self.digest is not None:
            out["digest"] = self.digest
            out["total"] = self.total or 0
            if self.completed:
                out["completed"] = self.completed
        return out


@dataclass(frozen=True)
class RemoteFile:
    repo: str
    path: str  # inside the repository
    revision: str  # commit sha
    size: int
    sha256: str | None  # LFS files only

    @property
    def base_name(self) -> str:
        return PurePosixPath(self.path).name


@dataclass
class PullPlan:
    name: ModelName
    weights: RemoteFile
    support: list[RemoteFile] = field(default_factory=list)  # tokenizer files -> <model>/tokenizer/
    modelfile: Modelfile = field(default_factory=Modelfile)
    encoder: RemoteFile | None = None  # a vision model's .rknn image encoder -> <model>/

    @property
    def files(self) -> list[RemoteFile]:
        """Everything to download: the weights first, then the tokenizer files, then the encoder."""
        return [self.weights, *self.support, *([self.encoder] if self.encoder else [])]


# ------------------------------------------------------------------------------------------------
# Resolving a name into a plan
# ------------------------------------------------------------------------------------------------


def soc_of_file(file_name: str) -> str | None:
    """The SoC an ``.rkllm`` file name says it was built for (``…-rk3588-…``, ``…_RK3576_…``), if any."""
    lowered = file_name.lower()
    for soc in KNOWN_SOCS:
        if re.search(rf"(?<![a-z0-9]){soc}(?![0-9])", lowered):
            return soc
    return None


def _check_repo_path(path: str) -> str:
    parts = PurePosixPath(path).parts
    if not parts or path.startswith("/") or any(p in ("", ".", "..") or "\\" in p for p in parts):
        raise PullError("invalid model name", 400)
    return path


def _invalid() -> PullError:
    return PullError("invalid model name", 400)


def validate_pull_name(text: str) -> None:
    """Reject a pull name that is malformed or could escape the store, without asking the Hub."""
    if not isinstance(text, str):
        raise _invalid()
    text = text.strip()
    if not text or not text.isascii() or any(c.isspace() for c in text) or "\\" in text:
        raise _invalid()
    host, _, rest = text.partition("/")
    try:
        if host.lower() in HF_HOSTS and rest:
            repo_part, _, ref = rest.partition(":")
            if repo_part.count("/") != 1:
                raise _invalid()
            org, repo = repo_part.split("/")
            parse_name(ModelName(model=repo, tag=ref or "latest", namespace=org, host="hf.co").full)
        elif text.lower().endswith(".rkllm") and text.count("/") >= 2:
            org, repo, path = text.split("/", 2)
            _check_repo_path(path)
            parse_name(f"{org}/{repo}")
            parse_name(PurePosixPath(path).name[: -len(".rkllm")])
        else:
            parse_name(text)
    except InvalidModelName as exc:
        raise _invalid() from exc


class Resolver:
    """Turns a pull name into a `PullPlan` (blocking: Hub API calls)."""

    def __init__(self, api: HfApi, catalogue: Catalogue, soc: str | None) -> None:
        self.api = api
        self.catalogue = catalogue
        self.soc = soc

    def resolve(self, text: str) -> PullPlan:
        text = text.strip()
        if not text or not text.isascii() or any(c.isspace() for c in text) or "\\" in text:
            raise _invalid()
        host, _, rest = text.partition("/")
        if host.lower() in HF_HOSTS and rest:
            return self._hf_name(rest)
        if text.lower().endswith(".rkllm") and text.count("/") >= 2:
            return self._seed_path(text)
        return self._short_name(text)

    # --- name forms ------------------------------------------------------------------------------

    def _hf_name(self, rest: str) -> PullPlan:
        repo_part, _, ref = rest.partition(":")
        if repo_part.count("/") != 1:
            raise _invalid()
        org, repo = repo_part.split("/")
        try:
            name = ModelName(model=repo, tag=ref or "latest", namespace=org, host="hf.co")
            name = parse_name(name.full)  # validates every part
        except InvalidModelName as exc:
            raise _invalid() from exc
        repo_id = f"{org}/{repo}"
        info = self._model_info(repo_id)
        weights = [s for s in info.siblings or [] if s.rfilename.lower().endswith((".gguf", ".rkllm"))]
        weights = [s for s in weights if not PurePosixPath(s.rfilename).name.lower().startswith("mmproj")]
        chosen = self._choose(repo_id, weights, ref)
        remote = self._remote(repo_id, info, chosen)
        modelfile = Modelfile(from_=remote.base_name)
        support: list[RemoteFile] = []
        encoder = None
        if remote.path.lower().endswith(".rkllm"):
            self._check_chip(remote.base_name)
            modelfile.huggingface_path = repo_id
            support = self._tokenizer_files(repo_id, info)
            encoder = self._encoder_beside(repo_id, info, remote)
        else:
            encoder = self._projector_beside(repo_id, info)
        return PullPlan(name=name, weights=remote, support=support, modelfile=modelfile, encoder=encoder)

    def _seed_path(self, text: str) -> PullPlan:
        org, repo, path = text.split("/", 2)
        _check_repo_path(path)
        stem = PurePosixPath(path).name[: -len(".rkllm")]
        try:
            name = parse_name(stem)
        except InvalidModelName as exc:
            raise _invalid() from exc
        repo_id = f"{org}/{repo}"
        self._check_chip(PurePosixPath(path).name)
        info = self._model_info(repo_id)
        matches = [s for s in info.siblings or [] if s.rfilename == path]
        if not matches:
            raise PullError(f"pull model manifest: file does not exist: {path} in {repo_id}", 404)
        remote = self._remote(repo_id, info, matches[0])
        modelfile = Modelfile(from_=remote.base_name, huggingface_path=repo_id)
        return PullPlan(
            name=name,
            weights=remote,
            support=self._tokenizer_files(repo_id, info),
            modelfile=modelfile,
            encoder=self._encoder_beside(repo_id, info, remote),
        )

    def _short_name(self, text: str) -> PullPlan:
        try:
            name = parse_name(text)
        except InvalidModelName as exc:
            raise _invalid() from exc
        short = name.display if name.host.lower() == "registry.ollama.ai" else name.full
        if not self.catalogue.knows(short):
            raise PullError("pull model manifest: file does not exist", 404)
        try:
            entry = self.catalogue.lookup(short, self.soc)
        except CatalogueError as exc:
            raise PullError(str(exc), 400) from exc
        info = self._model_info(entry.repo)
        matches = [s for s in info.siblings or [] if PurePosixPath(s.rfilename).name == entry.file]
        if not matches:
            raise PullError(f"pull model manifest: file does not exist: {entry.file} in {entry.repo}", 404)
        remote = self._remote(entry.repo, info, matches[0])
        modelfile = Modelfile.parse(entry.modelfile.to_seed_text())
        modelfile.from_ = remote.base_name
        support: list[RemoteFile] = []
        if modelfile.huggingface_path:
            support = self._tokenizer_files(modelfile.huggingface_path, None)
        encoder = None
        if entry.encoder:
            found = [s for s in info.siblings or [] if PurePosixPath(s.rfilename).name == entry.encoder]
            if not found:
                raise PullError(
                    f"pull model manifest: file does not exist: {entry.encoder} in {entry.repo}", 404
                )
            encoder = self._remote(entry.repo, info, found[0])
        return PullPlan(name=name, weights=remote, support=support, modelfile=modelfile, encoder=encoder)

    # --- helpers ---------------------------------------------------------------------------------

    def _check_chip(self, file_name: str) -> None:
        built_for = soc_of_file(file_name)
        if self.soc is None:
            raise PullError(
                f"{file_name} is an RKLLM model for Rockchip NPUs and this machine has no Rockchip NPU "
                "(set RKLLAMA_SOC to override); pull a GGUF model instead, e.g. hf.co/<org>/<repo>:Q4_K_M",
                400,
            )
        if built_for is not None and built_for != self.soc:
            raise PullError(
                f"{file_name} was built for {built_for} and this board is {self.soc}; "
                "an RKLLM file built for another chip does not load",
                400,
            )

    def _model_info(self, repo_id: str) -> Any:
        try:
            return self.api.model_info(repo_id, files_metadata=True)
        except GatedRepoError as exc:
            raise PullError(
                f"pull model manifest: {repo_id} is gated; accept its licence on the Hub", 403
            ) from exc
        except RepositoryNotFoundError as exc:
            raise PullError("pull model manifest: file does not exist", 404) from exc
        except HfHubHTTPError as exc:
            raise PullError(f"pull model manifest: {exc}", 502) from exc
        except OSError as exc:
            raise PullError(f"pull model manifest: {exc}", 502) from exc

    def _choose(self, repo_id: str, candidates: list[Any], ref: str) -> Any:
        if not candidates:
            raise PullError(f"pull model manifest: no .gguf or .rkllm file in {repo_id}", 404)
        if ref.lower().endswith((".gguf", ".rkllm")):
            found = [s for s in candidates if PurePosixPath(s.rfilename).name.lower() == ref.lower()]
            if not found:
                raise PullError(f"pull model manifest: file does not exist: {ref} in {repo_id}", 404)
            return found[0]
        ggufs = [s for s in candidates if s.rfilename.lower().endswith(".gguf")]
        rkllms = [s for s in candidates if s.rfilename.lower().endswith(".rkllm")]
        if ggufs and (not rkllms or ref):
            quant = ref if ref and ref.lower() != "latest" else DEFAULT_GGUF_QUANT
            pattern = re.compile(rf"(?<![a-z0-9]){re.escape(quant.lower())}(?![a-z0-9])")
            found = [s for s in ggufs if pattern.search(PurePosixPath(s.rfilename).name.lower())]
            if not found and not ref and len(ggufs) == 1:
                found = ggufs
            if not found and len(ggufs) == 1 and ref.lower() == "latest":
                found = ggufs
            if not found:
                raise PullError(f"pull model manifest: no {quant} GGUF in {repo_id}", 404)
            if len(found) > 1:
                raise PullError(f"pull model manifest: several files match {quant} in {repo_id}", 400)
            return found[0]
        mine = [s for s in rkllms if soc_of_file(s.rfilename) in (self.soc, None)]
        if len(mine) == 1:
            return mine[0]
        if not mine and rkllms:
            self._check_chip(PurePosixPath(rkllms[0].rfilename).name)
        names = ", ".join(PurePosixPath(s.rfilename).name for s in rkllms)
        raise PullError(
            f"several .rkllm files in {repo_id}; name one with hf.co/{repo_id}:<file> ({names})", 400
        )

    @staticmethod
    def _remote(repo_id: str, info: Any, sibling: Any) -> RemoteFile:
        _check_repo_path(sibling.rfilename)
        lfs = sibling.lfs
        size = int(lfs.size if lfs is not None else (sibling.size or 0))
        return RemoteFile(
            repo=repo_id,
            path=sibling.rfilename,
            revision=info.sha or "main",
            size=size,
            sha256=lfs.sha256 if lfs is not None else None,
        )

    def _encoder_beside(self, repo_id: str, info: Any, weights: RemoteFile) -> RemoteFile | None:
        """The vision encoder next to a .rkllm file: the one .rknn file of the repo built for this board
        (by its name, like the weights); none when there is none or the choice is ambiguous."""
        encoders = [s for s in info.siblings or [] if s.rfilename.lower().endswith(".rknn")]
        mine = [s for s in encoders if soc_of_file(s.rfilename) in (self.soc, None)]
        if len(mine) == 1:
            return self._remote(repo_id, info, mine[0])
        if mine:
            log.warning(
                "several .rknn encoders in %s for %s; none fetched (add one by hand and name it in the "
                "Modelfile with VISION_ENCODER=)",
                repo_id,
                weights.base_name,
            )
        return None

    def _projector_beside(self, repo_id: str, info: Any) -> RemoteFile | None:
        """A GGUF vision model's projector: the repo's one `mmproj*.gguf`, or of several (one per
        precision) the first of F16, Q8_0, BF16, F32 found in the names; none when that does not decide."""
        projectors = [
            s
            for s in info.siblings or []
            if PurePosixPath(s.rfilename).name.lower().startswith("mmproj")
            and s.rfilename.lower().endswith(".gguf")
        ]
        if len(projectors) > 1:
            for precision in PROJECTOR_PRECISIONS:
                pattern = re.compile(rf"(?<![a-z0-9]){precision}(?![a-z0-9])")
                found = [s for s in projectors if pattern.search(PurePosixPath(s.rfilename).name.lower())]
                if len(found) == 1:
                    projectors = found
                    break
        if len(projectors) == 1:
            return self._remote(repo_id, info, projectors[0])
        if projectors:
            log.warning(
                "several mmproj files in %s; none fetched (add one by hand beside the weights)", repo_id
            )
        return None

    def _tokenizer_files(self, repo_id: str, info: Any | None) -> list[RemoteFile]:
        if info is None:
            try:
                info = self._model_info(repo_id)
            except PullError as exc:
                log.warning("tokenizer files not fetched repo=%s: %s", repo_id, exc)
                return []
        return [self._remote(repo_id, info, s) for s in info.siblings or [] if s.rfilename in TOKENIZER_FILES]


# ------------------------------------------------------------------------------------------------
# Downloading
# ------------------------------------------------------------------------------------------------


def _progress_class(on_bytes: Callable[[int, int | None, int], None], cancelled: threading.Event) -> type:
    """A tqdm stand-in for hf_hub_download that reports bytes and aborts the download when cancelled."""

    class _Progress:
        def __init__(self, *, total: int | None = None, initial: int = 0, **_: Any) -> None:
            self.n = initial
            self.total = total
            on_bytes(0, total, initial)

        def update(self, n: float | None = 1) -> None:
            if cancelled.is_set():
                raise PullCancelled()
            self.n += int(n or 0)
            on_bytes(int(n or 0), self.total, self.n)

        def update_transfer(self, n: int) -> None:
            pass

        def close(self) -> None:
            pass

        def __enter__(self) -> _Progress:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

    return _Progress


def _pull_dir(store: Store, remote: RemoteFile) -> Path:
    key = hashlib.sha256(f"{remote.repo}\n{remote.path}\n{remote.revision}".encode()).hexdigest()[:16]
    return store.root / f"{PULL_DIR_PREFIX}{key}"


def _incomplete_bytes(folder: Path) -> int:
    try:
        return sum(p.stat().st_size for p in folder.rglob(f"*{PARTIAL_SUFFIX}"))
    except OSError:
        return 0


class PullJob:
    """One running pull, shared by every client that asked for the same name."""

    def __init__(self, puller: Puller, text: str) -> None:
        self.puller = puller
        self.text = text
        self.cancelled = threading.Event()
        self.subscribers: set[asyncio.Queue[PullProgress | PullError]] = set()
        self.history: dict[str, PullProgress] = {}  # latest event per status line, for late joiners
        self.finished = False
        self.loop = asyncio.get_running_loop()
        self.task: asyncio.Task[None] | None = None

    def subscribe(self) -> asyncio.Queue[PullProgress | PullError]:
        queue: asyncio.Queue[PullProgress | PullError] = asyncio.Queue()
        for event in self.history.values():
            queue.put_nowait(event)
        self.subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[PullProgress | PullError]) -> None:
        """Drop a client; the last one leaving cancels the pull (the download thread stops at its next
        chunk, keeping what it wrote for a later resume) and a new request starts a new job."""
        self.subscribers.discard(queue)
        if not self.subscribers and not self.finished and not self.cancelled.is_set():
            log.info("pull cancelled: no client waits name=%s", self.text)
            self.cancelled.set()
            self.puller._forget(self)

    def publish(self, item: PullProgress | PullError) -> None:
        if isinstance(item, PullProgress):
            self.history[item.status] = item
        for queue in list(self.subscribers):
            queue.put_nowait(item)

    def publish_threadsafe(self, item: PullProgress) -> None:
        self.loop.call_soon_threadsafe(self.publish, item)

    async def run(self) -> None:
        try:
            await self.puller._run(self)
        except PullCancelled:
            log.info("pull stopped name=%s", self.text)
        except asyncio.CancelledError:
            self.cancelled.set()
            log.info("pull stopped name=%s", self.text)
        except PullError as exc:
            log.warning("pull failed name=%s: %s", self.text, exc)
            self.publish(exc)
        except Exception as exc:  # noqa: BLE001 - any failure must reach the waiting clients
            log.exception("pull failed name=%s", self.text)
            self.publish(PullError(f"pull failed: {exc}", 500))
        finally:
            self.finished = True
            self.puller._forget(self)


class Puller:
    """Runs pulls into a store. One per store (see `puller_for`)."""

    def __init__(
        self,
        store: Store,
        *,
        endpoint: str | None = None,
        catalogue: Catalogue | None = None,
        soc: Callable[[], str | None] = detect_soc,
    ) -> None:
        self.store = store
        self.endpoint = endpoint
        self.catalogue = catalogue
        self.soc = soc
        self._jobs: dict[str, PullJob] = {}
        self._locks_guard = threading.Lock()
        self._file_locks: dict[str, threading.Lock] = {}

    def _forget(self, job: PullJob) -> None:
        if self._jobs.get(job.text.lower()) is job:
            del self._jobs[job.text.lower()]

    def _endpoint(self) -> str:
        return (self.endpoint or os.environ.get("HF_ENDPOINT") or hf_constants.ENDPOINT).rstrip("/")

    async def pull(self, text: str) -> AsyncGenerator[PullProgress, None]:
        """Progress events of pulling `text`, ending with ``success``. Raises `PullError`.

        Closing the iterator (the client went away) cancels the pull unless another client waits on it.
        """
        validate_pull_name(text)
        key = text.strip().lower()
        job = self._jobs.get(key)
        if job is None:
            job = PullJob(self, text.strip())
            self._jobs[key] = job
            job.task = asyncio.create_task(job.run(), name=f"pull {text}")
        queue = job.subscribe()
        try:
            while True:
                item = await queue.get()
                if isinstance(item, PullError):
                    raise item
                yield item
                if item.status == "success":
                    return
        finally:
            job.unsubscribe(queue)

    async def _run(self, job: PullJob) -> None:
        job.publish(PullProgress("pulling manifest"))
        api = HfApi(endpoint=self._endpoint())
        catalogue = self.catalogue or load_catalogue()
        resolver = Resolver(api, catalogue, self.soc())
        plan = await asyncio.to_thread(resolver.resolve, job.text)
        log.info(
            "pull resolved name=%s model=%s repo=%s file=%s",
            job.text,
            plan.name.display,
            plan.weights.repo,
            plan.weights.path,
        )
        folder = _pull_dir(self.store, plan.weights)
        await asyncio.to_thread(self._check_disk, plan, folder)
        local = await asyncio.to_thread(self._download_all, job, plan, folder)
        job.publish(PullProgress("verifying sha256 digest"))
        digest = await asyncio.to_thread(self._verify, plan.weights, local[0], folder)
        if job.cancelled.is_set():
            raise PullCancelled()
        job.publish(PullProgress("writing manifest"))
        await asyncio.to_thread(self._install, plan, local, digest)
        shutil.rmtree(folder, ignore_errors=True)
        job.publish(PullProgress("success"))

    def _check_disk(self, plan: PullPlan, folder: Path) -> None:
        need = sum(f.size for f in plan.files) - _incomplete_bytes(folder)
        self.store.root.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.store.root).free
        if need + DISK_MARGIN > free:
            raise PullError(
                f"not enough disk space to pull {plan.name.display}: need {need + DISK_MARGIN} bytes, "
                f"{free} free in {self.store.root}",
                507,
            )

    def _download_all(self, job: PullJob, plan: PullPlan, folder: Path) -> list[Path]:
        paths = [self._download(job, remote, folder, index) for index, remote in enumerate(plan.files)]
        return paths

    def _download(self, job: PullJob, remote: RemoteFile, folder: Path, index: int) -> Path:
        """Fetch one file into `folder` with huggingface_hub's `http_get`, resuming a ``.partial`` file."""
        target = folder / ("weights" if index == 0 else "support") / remote.base_name
        partial = target.with_name(target.name + PARTIAL_SUFFIX)
        digest_hex = remote.sha256 or hashlib.sha256(f"{remote.repo}/{remote.path}".encode()).hexdigest()
        digest = f"sha256:{digest_hex}"
        status = f"pulling {digest_hex[:12]}"
        last = [0.0]

        def on_bytes(step: int, total: int | None, completed: int) -> None:
            now = time.monotonic()
            size = total or remote.size
            if step and completed < size and now - last[0] < PROGRESS_INTERVAL:
                return
            if step:
                last[0] = now
            job.publish_threadsafe(PullProgress(status, digest, size, completed))

        with self._file_lock(partial):  # a cancelled job's thread may still be writing this file
            if job.cancelled.is_set():
                raise PullCancelled()
            if not (target.is_file() and target.stat().st_size == remote.size):
                target.parent.mkdir(parents=True, exist_ok=True)
                url = hf_hub_url(
                    remote.repo, remote.path, revision=remote.revision, endpoint=self._endpoint()
                )
                try:
                    with open(partial, "ab") as handle:
                        resume = handle.tell()
                        if resume > remote.size:
                            handle.truncate(0)
                            resume = 0
                        if resume:
                            log.info("pull resumes file=%s from=%d", remote.path, resume)
                        http_get(
                            url,
                            handle,
                            resume_size=resume,
                            headers=build_hf_headers(),
                            expected_size=remote.size,
                            tqdm_class=_progress_class(on_bytes, job.cancelled),
                        )
                except PullCancelled:
                    raise
                except (EntryNotFoundError, RevisionNotFoundError, RepositoryNotFoundError) as exc:
                    raise PullError(f"pull model manifest: file does not exist: {remote.path}", 404) from exc
                except Exception as exc:  # noqa: BLE001 - HTTP client errors of huggingface_hub's transport
                    raise PullError(f"download of {remote.path} failed: {exc}", 502) from exc
                os.replace(partial, target)
        job.publish_threadsafe(PullProgress(status, digest, remote.size, remote.size))
        return target

    def _file_lock(self, path: Path) -> threading.Lock:
        with self._locks_guard:
            return self._file_locks.setdefault(str(path), threading.Lock())

    @staticmethod
    def _verify(remote: RemoteFile, local: Path, folder: Path) -> str:
        actual = sha256_file(local)
        if remote.sha256 is not None and actual != remote.sha256.lower():
            shutil.rmtree(folder, ignore_errors=True)
            raise PullError(
                "digest mismatch, file must be downloaded again: "
                f"want sha256:{remote.sha256}, got sha256:{actual}",
                500,
            )
        return actual

    def _install(self, plan: PullPlan, local: list[Path], digest: str) -> None:
        staging = self.store.stage()
        try:
            weights = staging / plan.weights.base_name
            if _same_device(local[0], staging):
                os.link(local[0], weights)
            else:
                shutil.copy2(local[0], weights)
            support = local[1 : 1 + len(plan.support)]
            if support:
                tokenizer = staging / "tokenizer"
                tokenizer.mkdir()
                for remote, path in zip(plan.support, support, strict=True):
                    shutil.copy2(path, tokenizer / remote.base_name)
            modelfile = plan.modelfile
            modelfile.from_ = weights.name
            if plan.encoder is not None:
                encoder = staging / plan.encoder.base_name
                if _same_device(local[-1], staging):
                    os.link(local[-1], encoder)
                else:
                    shutil.copy2(local[-1], encoder)
                modelfile.projector = encoder.name
            (staging / MODELFILE_NAME).write_text(modelfile.to_seed_text(), encoding="utf-8")
            stat = weights.stat()
            manifest = {
                "version": MANIFEST_VERSION,
                "weights": weights.name,
                "size": stat.st_size,
                "mtime_ns": stat.st_mtime_ns,
                "sha256": digest,
            }
            (staging / MANIFEST_NAME).write_text(json.dumps(manifest), encoding="utf-8")
            self.store.commit(staging, plan.name)
        except BaseException:
            self.store.discard(staging)
            raise


def _same_device(a: Path, b: Path) -> bool:
    try:
        return a.stat().st_dev == b.stat().st_dev
    except OSError:
        return False


_PULLERS: weakref.WeakKeyDictionary[Store, Puller] = weakref.WeakKeyDictionary()


def puller_for(store: Store) -> Puller:
    """The store's shared Puller (created on first use), so concurrent pulls of one model share a job."""
    puller = _PULLERS.get(store)
    if puller is None:
        puller = _PULLERS[store] = Puller(store)
    return puller
