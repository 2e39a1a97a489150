"""models/pull.py and models/catalogue.py in process, against the fake Hub (tests/support/fake_hub.py)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from rkllama_ollama.models.catalogue import Catalogue, CatalogueError, detect_soc, load_catalogue
from rkllama_ollama.models.modelfile import parse_modelfile
from rkllama_ollama.models.pull import (
    Puller,
    PullError,
    PullProgress,
    soc_of_file,
    validate_pull_name,
)
from rkllama_ollama.models.store import Store
from tests.support.fake_hub import FakeHub
from tests.support.tiny_gguf import write_tiny_gguf

GGUF_REPO = "someone/Tiny-GGUF"
RKLLM_REPO = "c01zaut/Qwen2.5-1.5B-Instruct-rk3588-1.1.1"
CATALOGUE_FILE = "Qwen2.5-1.5B-Instruct-rk3588-w8a8-opt-1-hybrid-ratio-1.0.rkllm"
BIG = os.urandom(3 << 20)  # spans several 1 MiB download chunks


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    return path.read_bytes()


@pytest.fixture
def hub(gguf_bytes: bytes) -> Iterator[FakeHub]:
    server = FakeHub()
    server.add(
        GGUF_REPO,
        {
            "tiny.Q4_K_M.gguf": gguf_bytes,
            "tiny.Q8_0.gguf": gguf_bytes + b"",
            "mmproj-tiny-f16.gguf": b"projector",
            "README.md": b"# tiny",
        },
    )
    server.add(
        RKLLM_REPO,
        {
            CATALOGUE_FILE: b"RKLLM-SIM\nreply=hi\n",
            "Qwen2.5-1.5B-Instruct-rk3588-w8a8_g128-opt-0-hybrid-ratio-0.0.rkllm": b"RKLLM-SIM\nreply=g\n",
        },
    )
    server.add("Qwen/Qwen2.5-1.5B-Instruct", {"tokenizer.json": b"{}", "tokenizer_config.json": b"{}"})
    server.add("someone/Big-RKLLM", {"big-rk3588.rkllm": BIG, "tokenizer.json": b"{}"})
    server.add("someone/Other-Chip", {"m_RK3576_w4a16.rkllm": b"RKLLM-SIM\n"})
    server.start()
    yield server
    server.stop()


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "models", offer_embedded=False)


def make_puller(store: Store, hub: FakeHub, soc: str | None = "rk3588") -> Puller:
    return Puller(store, endpoint=hub.url, catalogue=load_catalogue(), soc=lambda: soc)


async def collect(puller: Puller, name: str) -> list[PullProgress]:
    return [event async for event in puller.pull(name)]


def store_children(store: Store) -> list[str]:
    return sorted(p.name for p in store.root.iterdir()) if store.root.exists() else []


async def test_hf_gguf_pull_emits_ollama_progress_and_installs(
    store: Store, hub: FakeHub, gguf_bytes: bytes
) -> None:
    events = await collect(make_puller(store, hub), "hf.co/someone/Tiny-GGUF")
    statuses = [e.status for e in events]
    digest = hashlib.sha256(gguf_bytes).hexdigest()
    assert statuses[0] == "pulling manifest"
    assert statuses[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
    layer = [e for e in events if e.status == f"pulling {digest[:12]}"]
    assert layer and layer[-1].digest == f"sha256:{digest}"
    assert layer[-1].total == layer[-1].completed == len(gguf_bytes)
    entry = store.resolve("hf.co/someone/Tiny-GGUF:latest")
    assert entry.weights.name == "tiny.Q4_K_M.gguf"
    assert entry.digest == digest and not entry.digest_provisional
    assert [p for p in store_children(store) if p.startswith(".")] == []


async def test_gguf_quant_from_tag_and_missing_quant(store: Store, hub: FakeHub) -> None:
    await collect(make_puller(store, hub), "hf.co/someone/Tiny-GGUF:Q8_0")
    assert store.resolve("hf.co/someone/Tiny-GGUF:Q8_0").weights.name == "tiny.Q8_0.gguf"
    with pytest.raises(PullError, match="no Q2_K GGUF") as info:
        await collect(make_puller(store, hub), "hf.co/someone/Tiny-GGUF:Q2_K")
    assert info.value.status == 404


async def test_checksum_mismatch_leaves_store_as_it_was(store: Store, hub: FakeHub) -> None:
    hub.lie_sha256.add(f"{GGUF_REPO}/tiny.Q4_K_M.gguf")
    with pytest.raises(PullError, match="digest mismatch"):
        await collect(make_puller(store, hub), "hf.co/someone/Tiny-GGUF:Q4_K_M")
    assert store.list() == []
    assert store_children(store) == []


async def test_seed_form_writes_modelfile_and_tokenizer(store: Store, hub: FakeHub) -> None:
    events = await collect(make_puller(store, hub), f"{RKLLM_REPO}/{CATALOGUE_FILE}")
    assert events[-1].status == "success"
    entry = store.resolve(CATALOGUE_FILE.removesuffix(".rkllm"))
    assert entry.format == "rkllm"
    assert (entry.folder / "tokenizer").is_dir() is False  # this repo ships no tokenizer files
    modelfile = parse_modelfile((entry.folder / "Modelfile").read_text())
    assert modelfile.from_ == CATALOGUE_FILE and modelfile.huggingface_path == RKLLM_REPO


async def test_short_name_uses_catalogue_defaults_and_fetches_tokenizer(store: Store, hub: FakeHub) -> None:
    await collect(make_puller(store, hub), "qwen2.5:1.5b")
    entry = store.resolve("qwen2.5:1.5b")
    assert entry.weights.name == CATALOGUE_FILE
    assert sorted(p.name for p in (entry.folder / "tokenizer").iterdir()) == [
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    modelfile = parse_modelfile((entry.folder / "Modelfile").read_text())
    assert modelfile.huggingface_path == "Qwen/Qwen2.5-1.5B-Instruct"
    assert modelfile.parameters["num_ctx"] == 4096
    assert modelfile.parameters["temperature"] == 0.7


async def test_chip_mismatch_and_no_rockchip_are_refused(store: Store, hub: FakeHub) -> None:
    with pytest.raises(PullError, match="built for rk3576 and this board is rk3588"):
        await collect(make_puller(store, hub), "hf.co/someone/Other-Chip:m_RK3576_w4a16.rkllm")
    with pytest.raises(PullError, match="no Rockchip NPU.*hf.co/<org>/<repo>:Q4_K_M") as info:
        await collect(make_puller(store, hub, soc=None), "qwen2.5:1.5b")
    assert info.value.status == 400
    with pytest.raises(PullError, match="no build for rk3576"):
        await collect(make_puller(store, hub, soc="rk3576"), "tinyllama:1.1b")
    assert store.list() == [] and store_children(store) == []


@pytest.mark.parametrize(
    "name",
    [
        "../../etc/passwd",
        "hf.co/../etc:x",
        "hf.co/a/b/c",
        "org/repo/../../x.rkllm",
        "org/repo//x.rkllm",
        "org/repo/sub/../x.rkllm",
        "",
        "a b",
        "ｑwen",
        "/abs/x.rkllm/y.rkllm",
    ],
)
def test_names_that_could_escape_are_400(name: str) -> None:
    with pytest.raises(PullError) as info:
        validate_pull_name(name)
    assert info.value.status == 400


async def test_unknown_names_are_404(store: Store, hub: FakeHub) -> None:
    with pytest.raises(PullError, match="file does not exist") as info:
        await collect(make_puller(store, hub), "nosuchmodel:7b")
    assert info.value.status == 404
    with pytest.raises(PullError, match="file does not exist") as info:
        await collect(make_puller(store, hub), "hf.co/nobody/nothing")
    assert info.value.status == 404


async def test_concurrent_pulls_share_one_download(store: Store, hub: FakeHub) -> None:
    hub.hold_after["someone/Big-RKLLM/big-rk3588.rkllm"] = 1 << 20
    puller = make_puller(store, hub)
    first = asyncio.create_task(collect(puller, "someone/Big-RKLLM/big-rk3588.rkllm"))
    await asyncio.to_thread(hub.holding.wait, 10)
    second = asyncio.create_task(collect(puller, "someone/Big-RKLLM/big-rk3588.rkllm"))
    await asyncio.sleep(0)
    hub.release()
    one, two = await asyncio.gather(first, second)
    assert one[-1].status == two[-1].status == "success"
    assert len(hub.file_requests("big-rk3588.rkllm")) == 1


async def test_cancelled_pull_is_not_listed_and_resumes(store: Store, hub: FakeHub) -> None:
    hub.hold_after["someone/Big-RKLLM/big-rk3588.rkllm"] = 2 << 20
    puller = make_puller(store, hub)
    events = puller.pull("someone/Big-RKLLM/big-rk3588.rkllm")
    async for event in events:
        if event.completed:  # the first 1 MiB chunk arrived: the client goes away
            break
    await events.aclose()
    hub.release()
    for _ in range(200):  # the download thread notices the cancel at its next chunk
        if not puller._jobs and any(store.root.glob(".pull-*/**/*.partial")):
            break
        await asyncio.sleep(0.05)
    assert store.list() == []
    assert any(store.root.glob(".pull-*/**/*.partial"))
    done = await collect(puller, "someone/Big-RKLLM/big-rk3588.rkllm")
    assert done[-1].status == "success"
    ranges = [r[2] for r in hub.file_requests("big-rk3588.rkllm")]
    assert ranges[0] is None and ranges[-1] is not None and ranges[-1] != "bytes=0-"
    assert store.resolve("big-rk3588").weights.read_bytes() == BIG


async def test_cut_connection_is_resumed_within_a_pull(store: Store, hub: FakeHub) -> None:
    hub.cut_once_after["someone/Big-RKLLM/big-rk3588.rkllm"] = (1 << 20) + 100
    done = await collect(make_puller(store, hub), "someone/Big-RKLLM/big-rk3588.rkllm")
    assert done[-1].status == "success"
    ranges = [r[2] for r in hub.file_requests("big-rk3588.rkllm")]
    assert len(ranges) == 2 and ranges[1] is not None
    assert store.resolve("big-rk3588").weights.read_bytes() == BIG


def test_soc_detection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RKLLAMA_SOC", raising=False)
    compatible = tmp_path / "compatible"
    compatible.write_bytes(b"radxa,rock-5b\0rockchip,rk3588\0")
    assert detect_soc(compatible) == "rk3588"
    compatible.write_bytes(b"friendlyarm,nanopi\0rockchip,rk3588s\0")
    assert detect_soc(compatible) == "rk3588"
    assert detect_soc(tmp_path / "missing") is None
    compatible.write_bytes(b"raspberrypi,5-model-b\0brcm,bcm2712\0")
    assert detect_soc(compatible) is None
    monkeypatch.setenv("RKLLAMA_SOC", "RK3576")
    assert detect_soc(compatible) == "rk3576"


def test_soc_of_file_names() -> None:
    assert soc_of_file("Qwen2.5-1.5B-Instruct_w4a16_RK3576.rkllm") == "rk3576"
    assert soc_of_file("gemma-2-2b-it-rk3588-w8a8-opt-0-hybrid-ratio-0.0.rkllm") == "rk3588"
    assert soc_of_file("Qwen2.5-Coder-3B-Instruct.rkllm") is None


def test_catalogue_entries_are_consistent() -> None:
    catalogue = load_catalogue()
    assert {"qwen2.5:1.5b", "qwen3:1.7b", "deepseek-r1:1.5b"} <= set(catalogue.names())
    for name in catalogue.names():
        for soc in catalogue.socs_for(name):
            entry = catalogue.lookup(name, soc)
            assert entry.modelfile.from_ == entry.file
            assert entry.modelfile.huggingface_path
            assert 0 < entry.modelfile.parameters["num_ctx"] <= entry.max_context
            assert soc_of_file(entry.file) in (soc, None)
    with pytest.raises(CatalogueError, match="no Rockchip NPU"):
        catalogue.lookup("qwen3:1.7b", None)


def test_catalogue_skips_broken_entries(tmp_path: Path) -> None:
    (tmp_path / "index.json").write_text('{"models": {"x:1b": {"rk3588": {"repo": "a/b"}}}}')
    assert Catalogue(tmp_path).names() == []


async def test_not_enough_disk_is_refused_before_download(
    store: Store, hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=1000))
    with pytest.raises(PullError, match="not enough disk space") as info:
        await collect(make_puller(store, hub), "someone/Big-RKLLM/big-rk3588.rkllm")
    assert info.value.status == 507
    assert hub.file_requests("big-rk3588.rkllm") == []


def test_a_wheel_install_finds_the_catalogue_in_its_data_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import configparser
    import sysconfig

    from rkllama_ollama.models import catalogue as catalogue_module

    # setup.cfg ships modelfiles/ to exactly the folder the lookup searches.
    config = configparser.ConfigParser()
    config.read(Path(__file__).resolve().parents[1] / "setup.cfg")
    assert config["options.data_files"][str(catalogue_module.INSTALLED_SUBDIR)].strip() == "modelfiles/*"
    installed = Path(sysconfig.get_path("data")) / catalogue_module.INSTALLED_SUBDIR
    assert installed in catalogue_module.catalogue_candidates()
    # The first candidate holding an index wins; the source tree comes first.
    source, wheel = tmp_path / "source", tmp_path / "wheel"
    wheel.mkdir()
    (wheel / "index.json").write_text("{}")
    monkeypatch.delenv(catalogue_module.CATALOGUE_ENV, raising=False)
    monkeypatch.setattr(catalogue_module, "catalogue_candidates", lambda: [source, wheel])
    assert catalogue_module.default_catalogue_dir() == wheel
    source.mkdir()
    (source / "index.json").write_text("{}")
    assert catalogue_module.default_catalogue_dir() == source
