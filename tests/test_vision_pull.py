"""Pulling a vision model fetches its .rknn encoder too (catalogue names and Hub paths), against the
fake Hub; the catalogue's vision entries are consistent."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from rkllama_ollama.models.catalogue import load_catalogue
from rkllama_ollama.models.modelfile import parse_modelfile
from rkllama_ollama.models.pull import Puller, PullError, soc_of_file
from rkllama_ollama.models.store import Store
from tests.support.fake_hub import FakeHub

VL_REPO = "happyme531/Qwen2.5-VL-3B-Instruct-RKLLM"
ENCODER = b"RKNN-SIM\nn_tokens=4\n"


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    server = FakeHub()
    server.add(
        VL_REPO,
        {
            "language_model_w8a8.rkllm": b"RKLLM-SIM\nreply=hi\n",
            "vision_encoder.rknn": ENCODER,
            "README.md": b"#",
        },
    )
    server.add("Qwen/Qwen2.5-VL-3B-Instruct", {"tokenizer.json": b"{}", "tokenizer_config.json": b"{}"})
    server.add(
        "someone/VL-Three-Encoders",
        {
            "m-rk3588.rkllm": b"RKLLM-SIM\n",
            "vision_448_rk3588.rknn": ENCODER,
            "vision_896_rk3588.rknn": ENCODER,
        },
    )
    server.add(
        "someone/VL-No-Key",
        {"lm_rk3588.rkllm": b"RKLLM-SIM\n", "enc_rk3588.rknn": ENCODER, "enc_rk3576.rknn": b"x"},
    )
    server.add("someone/VL-Missing", {"m-rk3588.rkllm": b"RKLLM-SIM\n"})
    server.start()
    yield server
    server.stop()


def _puller(store: Store, hub: FakeHub) -> Puller:
    return Puller(store, endpoint=hub.url, catalogue=load_catalogue(), soc=lambda: "rk3588")


async def _pull(puller: Puller, name: str) -> None:
    events = [event async for event in puller.pull(name)]
    assert events[-1].status == "success"


async def test_a_catalogue_vision_model_comes_with_its_encoder(tmp_path: Path, hub: FakeHub) -> None:
    store = Store(tmp_path / "models", offer_embedded=False)
    await _pull(_puller(store, hub), "qwen2.5vl:3b")
    entry = store.resolve("qwen2.5vl:3b")
    assert entry.vision_encoder is not None and entry.vision_encoder.read_bytes() == ENCODER
    assert "vision" in entry.capabilities
    modelfile = parse_modelfile((entry.folder / "Modelfile").read_text())
    assert (modelfile.from_, modelfile.projector) == ("language_model_w8a8.rkllm", "vision_encoder.rknn")
    assert entry.vision_settings()["family"] == "qwen2-vl"
    assert sorted(p.name for p in (entry.folder / "tokenizer").iterdir()) == [
        "tokenizer.json",
        "tokenizer_config.json",
    ]


async def test_a_hub_pull_takes_the_one_encoder_for_this_chip(tmp_path: Path, hub: FakeHub) -> None:
    store = Store(tmp_path / "models", offer_embedded=False)
    await _pull(_puller(store, hub), "hf.co/someone/VL-No-Key")
    entry = store.resolve("hf.co/someone/VL-No-Key")
    assert entry.vision_encoder is not None and entry.vision_encoder.name == "enc_rk3588.rknn"


async def test_several_encoders_are_not_guessed(tmp_path: Path, hub: FakeHub) -> None:
    store = Store(tmp_path / "models", offer_embedded=False)
    await _pull(_puller(store, hub), "hf.co/someone/VL-Three-Encoders")
    entry = store.resolve("hf.co/someone/VL-Three-Encoders")
    assert entry.vision_encoder is None and "vision" not in entry.capabilities


async def test_a_catalogue_encoder_missing_from_the_repo_is_a_404(tmp_path: Path, hub: FakeHub) -> None:
    hub.repos[VL_REPO].pop("vision_encoder.rknn")
    store = Store(tmp_path / "models", offer_embedded=False)
    with pytest.raises(PullError, match="file does not exist: vision_encoder.rknn in happyme531") as info:
        await _pull(_puller(store, hub), "qwen2.5vl:3b")
    assert info.value.status == 404
    assert store.list() == []


def test_catalogue_vision_entries_are_consistent() -> None:
    catalogue = load_catalogue()
    vision = [
        n for n in catalogue.names() for soc in catalogue.socs_for(n) if catalogue.lookup(n, soc).encoder
    ]
    assert {"qwen2.5vl:3b", "qwen3-vl:2b", "internvl3.5:2b"} <= set(vision)
    for name in vision:
        for soc in catalogue.socs_for(name):
            entry = catalogue.lookup(name, soc)
            assert entry.modelfile.projector == entry.encoder and entry.encoder.endswith(".rknn")
            assert soc_of_file(entry.encoder) in (soc, None)
            assert entry.modelfile.extra.get("VISION_FAMILY")


async def test_a_gguf_pull_fetches_the_projector_beside_the_weights(tmp_path: Path) -> None:
    server = FakeHub()
    weights, projector = b"GGUF-weights", b"GGUF-projector"
    server.add("someone/Tiny-VL-GGUF", {"tiny-Q4_K_M.gguf": weights, "mmproj-tiny-f16.gguf": projector})
    server.add(
        "someone/Tiny-VL-Several",
        {
            "tiny-Q4_K_M.gguf": weights,
            "mmproj-tiny-BF16.gguf": b"bf16",
            "mmproj-tiny-F16.gguf": projector,
            "mmproj-tiny-Q8_0.gguf": b"q8",
        },
    )
    server.add("someone/Tiny-Text-GGUF", {"tiny-Q4_K_M.gguf": weights})
    server.start()
    try:
        store = Store(tmp_path / "models", offer_embedded=False)
        puller = _puller(store, server)
        for repo in ("someone/Tiny-VL-GGUF", "someone/Tiny-VL-Several"):
            await _pull(puller, f"hf.co/{repo}")
            folder = store.resolve(f"hf.co/{repo}").folder
            modelfile = parse_modelfile((folder / "Modelfile").read_text())
            assert modelfile.from_ == "tiny-Q4_K_M.gguf" and modelfile.projector is not None
            assert modelfile.projector.lower().startswith("mmproj-tiny-f16")
            assert (folder / modelfile.projector).read_bytes() == projector
        await _pull(puller, "hf.co/someone/Tiny-Text-GGUF")
        folder = store.resolve("hf.co/someone/Tiny-Text-GGUF").folder
        assert parse_modelfile((folder / "Modelfile").read_text()).projector is None
        assert sorted(p.name for p in folder.iterdir() if p.suffix == ".gguf") == ["tiny-Q4_K_M.gguf"]
    finally:
        server.stop()
