"""model_admin without HTTP: unload before delete / replace, the create flow's sources and statuses.

A real Store on a tiny GGUF; the scheduler is a stand-in with the two members model_admin uses
(`loaded_model` and `unload_if_loaded`), which records what the store held at the moment of each unload.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pytest

from rkllama_ollama.model_admin import (
    BaseModelNotFound,
    BlobNotFound,
    copy_model,
    create_model,
    delete_model,
)
from rkllama_ollama.models.modelfile import Modelfile
from rkllama_ollama.models.names import parse_name
from rkllama_ollama.models.store import ModelNotFound, Store
from rkllama_ollama.scheduler import Scheduler
from tests.conftest import make_gguf_model
from tests.support.tiny_gguf import write_tiny_gguf


@dataclass
class _Loaded:
    key: str


class FakeScheduler:
    def __init__(self, store: Store, loaded: str | None = None) -> None:
        self.store = store
        self.loaded = _Loaded(parse_name(loaded).key) if loaded else None
        self.unloads: list[tuple[str, str | None]] = []  # (key, the model's SYSTEM on disk at that moment)

    def loaded_model(self, key: str) -> _Loaded | None:
        return self.loaded if self.loaded is not None and self.loaded.key == key else None

    async def unload_if_loaded(self, key: str) -> None:
        system = self.store.resolve(key).modelfile.system if self.store.exists(key) else None
        self.unloads.append((key, system))
        if self.loaded is not None and self.loaded.key == key:
            self.loaded = None


def scheduler_of(fake: FakeScheduler) -> Scheduler:
    return cast(Scheduler, fake)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    root = tmp_path / "models"
    make_gguf_model(root, "base", system="You are terse.")
    make_gguf_model(root, "other", system="Old other.")
    return Store(root, offer_embedded=False)


def add_blob(store: Store, seed: int = 7) -> str:
    staged = write_tiny_gguf(store.root.parent / "upload.gguf", seed=seed)
    hex_digest = hashlib.sha256(staged.read_bytes()).hexdigest()
    store.blobs.folder.mkdir(parents=True, exist_ok=True)
    staged.rename(store.blobs.path_of(hex_digest))
    return hex_digest


def key(name: str) -> str:
    return parse_name(name).key


# -- delete ---------------------------------------------------------------------------------------


async def test_delete_unloads_the_loaded_model_then_removes_it(store: Store) -> None:
    fake = FakeScheduler(store, loaded="base")
    entry = await delete_model(store, scheduler_of(fake), "BASE")
    assert entry.name.display == "base:latest"
    assert fake.unloads == [(key("base"), "You are terse.")]  # still on disk when unloaded
    assert fake.loaded is None
    assert not store.exists("base")


async def test_delete_waits_for_the_session_even_when_another_model_is_loaded(store: Store) -> None:
    fake = FakeScheduler(store, loaded="other")
    await delete_model(store, scheduler_of(fake), "base")
    assert fake.unloads == [(key("base"), "You are terse.")]
    assert fake.loaded is not None and fake.loaded.key == key("other")
    assert not store.exists("base") and store.exists("other")


async def test_delete_of_a_missing_model_raises_and_unloads_nothing(store: Store) -> None:
    fake = FakeScheduler(store, loaded="base")
    with pytest.raises(ModelNotFound):
        await delete_model(store, scheduler_of(fake), "missing")
    assert fake.unloads == []


# -- copy -----------------------------------------------------------------------------------------


async def test_copy_onto_the_loaded_destination_unloads_it_first(store: Store) -> None:
    fake = FakeScheduler(store, loaded="other")
    entry = await copy_model(store, scheduler_of(fake), parse_name("base"), parse_name("other"))
    assert entry.name.display == "other:latest"
    assert fake.unloads == [(key("other"), "Old other.")]  # the old copy was still there
    assert store.resolve("other").modelfile.system == "You are terse."


async def test_copy_leaves_an_unrelated_loaded_model_alone(store: Store) -> None:
    fake = FakeScheduler(store, loaded="base")
    await copy_model(store, scheduler_of(fake), parse_name("base"), parse_name("copied:v1"))
    assert fake.unloads == []
    assert store.resolve("copied:v1").modelfile.system == "You are terse."


async def test_copy_of_a_missing_source_raises(store: Store) -> None:
    with pytest.raises(ModelNotFound):
        await copy_model(store, scheduler_of(FakeScheduler(store)), parse_name("missing"), parse_name("x"))
    assert not store.exists("x")


# -- create ---------------------------------------------------------------------------------------


async def test_create_from_a_base_model(store: Store) -> None:
    fake = FakeScheduler(store)
    base_digest = store.resolve("base").digest
    created = await create_model(
        store,
        scheduler_of(fake),
        store.blobs,
        parse_name("derived"),
        Modelfile(system="You are verbose."),
        base="base",
    )
    assert created.entry.name.display == "derived:latest"
    assert created.statuses == [f"using existing layer sha256:{base_digest}", "writing manifest", "success"]
    assert created.weights_name is None
    assert store.resolve("derived").modelfile.system == "You are verbose."
    assert fake.unloads == []


async def test_create_from_a_blob_detects_gguf(store: Store) -> None:
    hex_digest = add_blob(store)
    created = await create_model(
        store,
        scheduler_of(FakeScheduler(store)),
        store.blobs,
        parse_name("imported"),
        Modelfile(),
        blob=(hex_digest, None),
    )
    assert created.statuses == [
        "parsing GGUF",
        f"using existing layer sha256:{hex_digest}",
        "writing manifest",
        "success",
    ]
    assert created.weights_name == "model.gguf"
    assert created.entry.weights.name == "model.gguf"
    assert created.entry.format == "gguf"


async def test_create_from_a_blob_and_a_base_takes_the_blob_weights_and_the_base_fields(store: Store) -> None:
    hex_digest = add_blob(store)
    created = await create_model(
        store,
        scheduler_of(FakeScheduler(store)),
        store.blobs,
        parse_name("mixed"),
        Modelfile(),
        base="base",
        blob=(hex_digest, "weights.gguf"),
    )
    assert created.statuses == [
        "parsing GGUF",
        f"using existing layer sha256:{hex_digest}",
        "writing manifest",
        "success",
    ]
    assert created.entry.weights.name == "weights.gguf"
    assert created.entry.modelfile.system == "You are terse."


async def test_create_over_the_loaded_model_unloads_it_first(store: Store) -> None:
    fake = FakeScheduler(store, loaded="other")
    await create_model(
        store, scheduler_of(fake), store.blobs, parse_name("other"), Modelfile(system="New."), base="base"
    )
    assert fake.unloads == [(key("other"), "Old other.")]
    assert store.resolve("other").modelfile.system == "New."


async def test_create_from_a_missing_blob_raises(store: Store) -> None:
    fake = FakeScheduler(store, loaded="new")
    missing = "0" * 64
    with pytest.raises(BlobNotFound) as caught:
        await create_model(
            store, scheduler_of(fake), store.blobs, parse_name("new"), Modelfile(), blob=(missing, None)
        )
    assert str(caught.value) == f'blob "sha256:{missing}" not found'
    assert fake.unloads == [] and not store.exists("new")


async def test_create_from_a_missing_base_raises(store: Store) -> None:
    fake = FakeScheduler(store, loaded="new")
    with pytest.raises(BaseModelNotFound) as caught:
        await create_model(
            store, scheduler_of(fake), store.blobs, parse_name("new"), Modelfile(), base="Missing"
        )
    assert str(caught.value) == 'model "Missing" not found'
    assert fake.unloads == [] and not store.exists("new")
