"""Model management that needs both the store and the scheduler: delete, copy and create.

A model that is deleted, or replaced on disk by a copy or a create, must not keep serving its old
weights from the runtime session: these functions unload it first (after a request running on it has
finished) and then change the store. The create flow also resolves where the new model comes from (an
uploaded blob or a base model) and reports Ollama's progress statuses. No HTTP here: failures are the
store's exceptions (ModelNotFound, StoreError) or BlobNotFound / BaseModelNotFound, which the faces
(api/ollama.py, api/native.py) turn into responses.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from rkllama_ollama.models.blobs import BlobStore
from rkllama_ollama.models.modelfile import Modelfile
from rkllama_ollama.models.names import ModelName
from rkllama_ollama.models.store import ModelEntry, ModelNotFound, Store
from rkllama_ollama.scheduler import Scheduler


class BlobNotFound(LookupError):
    """A create names an uploaded blob that the blob store does not hold."""

    def __init__(self, hex_digest: str) -> None:
        super().__init__(f'blob "sha256:{hex_digest}" not found')
        self.hex_digest = hex_digest


class BaseModelNotFound(LookupError):
    """A create derives from a model that the store does not hold."""

    def __init__(self, name: str) -> None:
        super().__init__(f'model "{name}" not found')
        self.name = name


@dataclass(frozen=True)
class CreatedModel:
    entry: ModelEntry
    statuses: list[str]  # Ollama's progress statuses, in order, ending with "success"
    weights_name: str | None  # the weights file taken from a blob; None when they came from the base


async def unload_before_replacing(scheduler: Scheduler, name: ModelName) -> None:
    """A model about to be replaced on disk must not keep serving its old weights."""
    if scheduler.loaded_model(name.key) is not None:
        await scheduler.unload_if_loaded(name.key)


async def delete_model(store: Store, scheduler: Scheduler, name: str | ModelName) -> ModelEntry:
    """Delete a model, unloading it first (after any request running on the session has finished).

    Shared by `DELETE /api/delete` and the seed's `DELETE /rm`. Raises ModelNotFound, StoreError.
    """
    entry = await asyncio.to_thread(store.resolve, name)
    await scheduler.unload_if_loaded(entry.name.key)
    await asyncio.to_thread(store.delete, entry.name)
    return entry


async def copy_model(
    store: Store, scheduler: Scheduler, source: ModelName, destination: ModelName
) -> ModelEntry:
    """Copy `source` to `destination`, unloading the destination first if it is the loaded model.

    Raises ModelNotFound (no source), StoreError.
    """
    await unload_before_replacing(scheduler, destination)
    return await asyncio.to_thread(store.copy, source, destination)


async def create_model(
    store: Store,
    scheduler: Scheduler,
    blobs: BlobStore,
    name: ModelName,
    modelfile: Modelfile,
    *,
    base: str | None = None,
    blob: tuple[str, str | None] | None = None,
    encoder: tuple[str, str] | None = None,
) -> CreatedModel:
    """Create (or replace) model `name` from an uploaded blob and/or a base model.

    `blob` is (sha256 hex, weights file name or None to detect .gguf / .rkllm from the content);
    `modelfile` holds the fields that override the base model's. At least one source must be given.
    Raises BlobNotFound, BaseModelNotFound, StoreError (the store refused the model), InvalidModelName
    (a malformed base name).
    """
    statuses: list[str] = []
    base_entry: ModelEntry | None = None
    blob_path: Path | None = None
    weights_name: str | None = None
    if blob is not None:
        hex_digest, weights_name = blob
        if not blobs.exists(hex_digest):
            raise BlobNotFound(hex_digest)
        blob_path = blobs.path_of(hex_digest)
        if weights_name is None:
            weights_name = "model" + await asyncio.to_thread(blobs.weights_suffix, hex_digest)
        if weights_name.lower().endswith(".gguf"):
            statuses.append("parsing GGUF")
        statuses.append(f"using existing layer sha256:{hex_digest}")
    encoder_path: Path | None = None
    if encoder is not None:  # (sha256 hex, .rknn file name): a vision model's image encoder
        if not blobs.exists(encoder[0]):
            raise BlobNotFound(encoder[0])
        encoder_path = blobs.path_of(encoder[0])
        statuses.append(f"using existing layer sha256:{encoder[0]}")
    if base is not None:
        try:
            base_entry = await asyncio.to_thread(store.resolve, base)
        except ModelNotFound:
            raise BaseModelNotFound(base) from None
        if blob_path is None:
            statuses.append(f"using existing layer sha256:{base_entry.digest}")
    await unload_before_replacing(scheduler, name)
    entry = await asyncio.to_thread(
        store.create_from_modelfile,
        name,
        modelfile,
        base_entry,
        weights_file=blob_path,
        weights_name=weights_name,
        encoder_file=encoder_path,
        encoder_name=encoder[1] if encoder is not None else None,
    )
    statuses += ["writing manifest", "success"]
    return CreatedModel(entry, statuses, weights_name)
