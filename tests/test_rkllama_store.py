"""An RKLLama store served as is: models with only ``HUGGINGFACE_PATH`` (tokenizer in the Hugging Face
cache), and every Modelfile key RKLLama writes.

The store is built the way RKLLama lays it out (``models/<name>/Modelfile`` + the ``.rkllm``, no
``tokenizer/`` folder); the Hugging Face cache is a tmp ``HF_HOME`` the test fills itself; the daemon
runs offline (``HF_HUB_OFFLINE=1``) against the RKLLM simulator.

How the template in use is proven: the tokenizer has one id per UTF-8 byte plus the Llama-3 special
tokens as single ids, and the simulator counts the ids it is fed; so ``prompt_eval_count`` of a first
turn is the token length of exactly the prompt that was rendered, which differs between Llama-3 and
ChatML renderings of the same conversation.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jinja2
import ollama
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.rkllm_support.hf_cache import (
    LLAMA3_TEMPLATE,
    llama3_tokenizer_files,
    vocab_merges_tokenizer_files,
    write_cached_repo,
)
from tests.rkllm_support.sim import build_simulators, write_model
from tests.support.daemon import Daemon
from tests.support.fake_hub import FakeHub

LLAMA_REPO = "meta-llama/Llama-3.2-1B-Instruct"
VOCAB_ONLY_REPO = "acme/llama-3-vocab-only"
LLAMA_FILE = "Llama-3.2-1B-Instruct-rk3588-w8a8-opt-0-hybrid-ratio-0.0.rkllm"
SYSTEM = "You are a terse assistant."
REPLY = "Hello from the simulator, a reply long enough to be cut by MAX_NEW_TOKENS."

# What RKLLama's pull writes (its create_modelfile, with its config defaults), key for key.
RKLLAMA_MODELFILE = f"""FROM="{LLAMA_FILE}"

HUGGINGFACE_PATH="{LLAMA_REPO}"

SYSTEM="{SYSTEM}"

TEMPERATURE=0.5

ENABLE_THINKING=False

NUM_CTX=4096

MAX_NEW_TOKENS=12

TOP_K=7

TOP_P=0.5

REPEAT_PENALTY=1.1

FREQUENCY_PENALTY=0.0

PRESENCE_PENALTY=0.0

MIROSTAT=0

MIROSTAT_TAU=3.0

MIROSTAT_ETA=0.1
"""


def write_rkllama_model(models: Path, folder: str, file_name: str, modelfile: str, **sim: object) -> Path:
    """One RKLLama model folder: the (simulator) .rkllm and RKLLama's Modelfile, nothing else."""
    path = write_model(models / folder, **sim)
    path.rename(models / folder / file_name)
    (models / folder / "Modelfile").write_text(modelfile, encoding="utf-8")
    return models / folder


def llama3_prompt(messages: list[dict[str, str]]) -> str:
    """The test's own rendering of the Llama-3-style template (plain jinja2, HF's block settings)."""
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(LLAMA3_TEMPLATE).render(
        messages=messages, add_generation_prompt=True, bos_token="<|begin_of_text|>"
    )


def chatml_prompt(messages: list[dict[str, str]]) -> str:
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return turns + "<|im_start|>assistant\n"


def token_count(snapshot: Path, text: str) -> int:
    from tokenizers import Tokenizer

    return len(
        Tokenizer.from_file(str(snapshot / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    )


@pytest.fixture(scope="module")
def rkllama_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, Path]]:
    root = tmp_path_factory.mktemp("rkllama-store")
    hf_home = root / "hf-home"
    snapshot = write_cached_repo(hf_home, LLAMA_REPO, llama3_tokenizer_files())
    models = root / "RKLLAMA" / "models"
    write_rkllama_model(models, "llama3.2:1b", LLAMA_FILE, RKLLAMA_MODELFILE, reply=REPLY)
    write_cached_repo(hf_home, VOCAB_ONLY_REPO, vocab_merges_tokenizer_files())
    vocab_only = RKLLAMA_MODELFILE.replace(LLAMA_REPO, VOCAB_ONLY_REPO)
    write_rkllama_model(models, "vocab-only", LLAMA_FILE, vocab_only, reply=REPLY)
    uncached = RKLLAMA_MODELFILE.replace(LLAMA_REPO, "someone/not-in-the-cache")
    write_rkllama_model(models, "orphan", LLAMA_FILE, uncached, reply="ok")
    env = {
        "RKLLAMA_RKLLM_LIB": str(build_simulators()["E"]),
        "HF_HOME": str(hf_home),
        "HF_HUB_OFFLINE": "1",
    }
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        env[name] = str(hf_home / "hub")
    with Daemon(models, env=env).start() as daemon:
        yield daemon, snapshot


def test_a_huggingface_path_only_model_renders_its_own_template_offline(
    rkllama_daemon: tuple[Daemon, Path],
) -> None:
    daemon, snapshot = rkllama_daemon
    client = ollama.Client(host=daemon.url)
    reply = client.chat("llama3.2:1b", messages=[{"role": "user", "content": "Hi there"}])
    sent = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi there"}]
    llama3 = token_count(snapshot, llama3_prompt(sent))
    chatml = token_count(snapshot, chatml_prompt(sent))
    assert llama3 != chatml
    assert reply.prompt_eval_count == llama3
    # MAX_NEW_TOKENS from RKLLama's Modelfile bounds the reply
    assert reply.eval_count == 12 and reply.message.content == REPLY.encode()[:12].decode()
    shown = client.show("llama3.2:1b")
    assert shown.template == LLAMA3_TEMPLATE
    assert "tokenizer from the Hugging Face cache" in daemon.log()
    assert not [
        line for line in daemon.log().splitlines() if "model=llama3.2:1b has no chat template" in line
    ]


def test_transformers_apply_chat_template_renders_the_same_prompt(
    rkllama_daemon: tuple[Daemon, Path],
) -> None:
    transformers = pytest.importorskip("transformers", reason="parity check needs the [hf] extra")
    _, snapshot = rkllama_daemon
    from rkllama_ollama.chat.template import ChatTemplate

    messages: list[dict[str, Any]] = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "And now?"},
    ]
    reference = transformers.AutoTokenizer.from_pretrained(str(snapshot), local_files_only=True)
    expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ours = ChatTemplate(LLAMA3_TEMPLATE, bos_token="<|begin_of_text|>").render(messages)
    assert ours == expected


def test_a_cached_tokenizer_without_tokenizer_json_is_used_through_transformers(
    rkllama_daemon: tuple[Daemon, Path],
) -> None:
    pytest.importorskip("transformers", reason="needs the [hf] extra")
    daemon, snapshot = rkllama_daemon
    reply = ollama.Client(host=daemon.url).chat(
        "vocab-only", messages=[{"role": "user", "content": "Hi there"}]
    )
    sent = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi there"}]
    assert reply.prompt_eval_count == token_count(
        snapshot, llama3_prompt(sent)
    )  # the same ids as tokenizer.json


def test_a_model_whose_tokenizer_is_nowhere_uses_the_template_built_into_the_rkllm(
    rkllama_daemon: tuple[Daemon, Path],
) -> None:
    daemon, _ = rkllama_daemon
    reply = ollama.Client(host=daemon.url).chat("orphan", messages=[{"role": "user", "content": "Hi there"}])
    # runtime 1.2.1: the conversation goes as one user turn, the runtime wraps it in its own template
    # (the simulator's: ChatML-like prefix and postfix) and reports what it prefilled
    folded = f"{SYSTEM}\n\nHi there"
    assert reply.prompt_eval_count == len(folded) + len(
        "<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n"
    )
    assert "applies the chat template of the .rkllm file" in daemon.log()
    assert "model=orphan:latest has no chat template" not in daemon.log()


def test_on_runtime_1_1_a_model_whose_tokenizer_is_nowhere_falls_back_to_chatml_with_a_warning(
    tmp_path: Path,
) -> None:
    models = tmp_path / "models"
    uncached = RKLLAMA_MODELFILE.replace(LLAMA_REPO, "someone/not-in-the-cache")
    write_rkllama_model(models, "orphan", LLAMA_FILE, uncached, reply="ok")
    pieces = uncached + 'SYSTEM_PROMPT="<<SYS>>"\nPROMPT_PREFIX="[INST] "\nPROMPT_POSTFIX=" [/INST]"\n'
    write_rkllama_model(models, "pieces", LLAMA_FILE, pieces, reply="ok")
    env = {
        "RKLLAMA_RKLLM_LIB": str(build_simulators()["C"]),
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "1",
    }
    with Daemon(models, env=env).start() as daemon:
        client = ollama.Client(host=daemon.url)
        reply = client.chat("orphan", messages=[{"role": "user", "content": "Hi there"}])
        # 1.1.x applies no template itself: the Modelfile's three pieces are rendered by the daemon
        with_pieces = client.chat("pieces", messages=[{"role": "user", "content": "Hi there"}])
        log = daemon.log()
    sent = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi there"}]
    # no tokenizer: the prompt is fed as text, one token per UTF-8 byte
    assert reply.prompt_eval_count == len(chatml_prompt(sent).encode())
    warnings = [line for line in log.splitlines() if "model=orphan:latest has no chat template" in line]
    assert warnings and warnings[0].startswith("WARNING") and "someone/not-in-the-cache" in warnings[0]
    assert with_pieces.prompt_eval_count == len(f"<<SYS>>[INST] {SYSTEM}\n\nHi there [/INST]")
    assert "model=pieces:latest has no chat template" not in log


# --- where the tokenizer comes from (store level, no daemon) --------------------------------------------


@pytest.fixture
def hf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "hf-home"
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    return home


def test_hf_hub_cache_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rkllama_ollama.models.tokenizer_files import hf_hub_cache

    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert hf_hub_cache() == tmp_path / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hf_hub_cache() == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hf_hub_cache() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert hf_hub_cache() == tmp_path / "cache"


def test_store_resolves_tokenizer_folder_first_then_the_hf_cache(tmp_path: Path, hf_home: Path) -> None:
    from rkllama_ollama.models.store import Store
    from rkllama_ollama.models.tokenizer_files import TOKENIZER_FOLDER

    models = tmp_path / "models"
    folder = write_rkllama_model(models, "llama", LLAMA_FILE, RKLLAMA_MODELFILE)
    store = Store(models, offer_embedded=False)
    entry = store.resolve("llama")
    assert entry.tokenizer_dir is None and entry.chat_template is None  # nothing anywhere yet

    snapshot = write_cached_repo(hf_home, LLAMA_REPO, llama3_tokenizer_files())
    entry = store.resolve("llama")  # the cached facts are refreshed: the cache appeared
    assert entry.tokenizer_dir == snapshot
    assert entry.chat_template == LLAMA3_TEMPLATE and entry.eos_token == "<|eot_id|>"
    assert entry.bos_token == "<|begin_of_text|>"

    own = folder / TOKENIZER_FOLDER
    own.mkdir()
    (own / "tokenizer_config.json").write_text('{"chat_template": "{{ messages }}"}', encoding="utf-8")
    entry = store.resolve("llama")
    assert entry.tokenizer_dir == own and entry.chat_template == "{{ messages }}"


@pytest.mark.parametrize("repo", ["../../etc", "not a repo id", "a/b/c", " "])
def test_a_bad_huggingface_path_is_no_tokenizer_not_an_error(
    tmp_path: Path, hf_home: Path, repo: str
) -> None:
    from rkllama_ollama.models.store import Store

    (hf_home / "hub").mkdir(parents=True)
    models = tmp_path / "models"
    write_rkllama_model(models, "m", LLAMA_FILE, RKLLAMA_MODELFILE.replace(LLAMA_REPO, repo))
    entry = Store(models, offer_embedded=False).resolve("m")
    assert entry.tokenizer_dir is None and entry.chat_template is None


def test_find_tokenizer_files_says_where_it_found_them(tmp_path: Path, hf_home: Path) -> None:
    from rkllama_ollama.models.tokenizer_files import find_tokenizer_files

    write_cached_repo(hf_home, LLAMA_REPO, llama3_tokenizer_files())
    found = find_tokenizer_files(tmp_path, LLAMA_REPO)
    assert found is not None and found.origin == "hf-cache" and found.repo == LLAMA_REPO
    assert find_tokenizer_files(tmp_path, None) is None


# --- tokenizers without tokenizer.json (transformers, the optional [hf] extra) ---------------------------


def test_a_tokenizer_without_tokenizer_json_is_loaded_with_transformers(tmp_path: Path) -> None:
    pytest.importorskip("transformers", reason="needs the [hf] extra")
    from rkllama_ollama.runtime.rkllm.tokens import TransformersTokenizer, load_tokenizer
    from tests.rkllm_support.hf_cache import vocab_merges_tokenizer_files

    folder = tmp_path / "tok"
    folder.mkdir()
    for name, data in vocab_merges_tokenizer_files().items():
        (folder / name).write_bytes(data)
    tokenizer, facts = load_tokenizer(folder)
    assert isinstance(tokenizer, TransformersTokenizer) and tokenizer.feeds_tokens
    assert facts.chat_template == LLAMA3_TEMPLATE and facts.eos_token == "<|eot_id|>"
    ids = tokenizer.encode("<|begin_of_text|>hé")
    assert ids == [256, ord("h"), 0xC3, 0xA9]
    assert tokenizer.decode(ids) == "<|begin_of_text|>hé"
    assert tokenizer.token_id("<|eot_id|>") == 259 and tokenizer.token_id("<|no such token|>") is None


def test_without_transformers_such_a_tokenizer_feeds_text_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import sys

    from rkllama_ollama.runtime.rkllm.tokens import ByteTokenizer, load_tokenizer
    from tests.rkllm_support.hf_cache import vocab_merges_tokenizer_files

    folder = tmp_path / "tok"
    folder.mkdir()
    for name, data in vocab_merges_tokenizer_files().items():
        (folder / name).write_bytes(data)
    monkeypatch.setitem(sys.modules, "transformers", None)  # what a board install without [hf] has
    tokenizer, facts = load_tokenizer(folder)
    assert isinstance(tokenizer, ByteTokenizer) and not tokenizer.feeds_tokens
    assert facts.chat_template == LLAMA3_TEMPLATE  # the template still comes from tokenizer_config.json
    assert "rkllama-ollama[hf]" in caplog.text and str(folder) in caplog.text


# --- the one-time download into tokenizer/ when online (the fake hub, never the network) -----------------


@pytest.fixture(scope="module")
def online_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, FakeHub, Path]]:
    root = tmp_path_factory.mktemp("rkllama-online")
    hub = FakeHub()
    hub.add(LLAMA_REPO, {**llama3_tokenizer_files(), "README.md": b"not a tokenizer file"})
    hub.start()
    models = root / "models"
    write_rkllama_model(models, "llama3.2:1b", LLAMA_FILE, RKLLAMA_MODELFILE, reply=REPLY)
    missing = RKLLAMA_MODELFILE.replace(LLAMA_REPO, "someone/not-on-the-hub")
    write_rkllama_model(models, "orphan", LLAMA_FILE, missing, reply="ok")
    env = {
        "RKLLAMA_RKLLM_LIB": str(build_simulators()["E"]),
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(root / "empty-hf-home"),
        "HF_HUB_CACHE": str(root / "empty-hf-home" / "hub"),
        "HUGGINGFACE_HUB_CACHE": str(root / "empty-hf-home" / "hub"),
        "HF_HUB_OFFLINE": "0",
    }
    try:
        with Daemon(models, env=env).start() as daemon:
            yield daemon, hub, models
    finally:
        hub.stop()


def test_online_the_tokenizer_is_downloaded_once_into_the_model_folder(
    online_daemon: tuple[Daemon, FakeHub, Path],
) -> None:
    daemon, hub, models = online_daemon
    client = ollama.Client(host=daemon.url)
    sent = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi there"}]
    reply = client.chat("llama3.2:1b", messages=[{"role": "user", "content": "Hi there"}])
    tokenizer = models / "llama3.2:1b" / "tokenizer"
    assert sorted(p.name for p in tokenizer.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    assert reply.prompt_eval_count == token_count(tokenizer, llama3_prompt(sent))  # used at once
    assert client.show("llama3.2:1b").template == LLAMA3_TEMPLATE
    assert not [p for p in (models / "llama3.2:1b").iterdir() if p.name.startswith(".tokenizer-")]
    downloads = len(hub.file_requests("tokenizer.json"))
    client.chat("llama3.2:1b", messages=[{"role": "user", "content": "again"}])
    assert len(hub.file_requests("tokenizer.json")) == downloads == 1  # one-time
    log = daemon.log()
    assert f"tokenizer download model=llama3.2:1b repo={LLAMA_REPO}" in log and "done in" in log


def test_online_a_repository_that_is_not_there_is_tried_once_then_chatml(
    online_daemon: tuple[Daemon, FakeHub, Path],
) -> None:
    daemon, hub, models = online_daemon
    client = ollama.Client(host=daemon.url)
    for _ in range(2):
        reply = client.chat("orphan", messages=[{"role": "user", "content": "Hi"}])
        assert reply.message.content == "ok"
    assert not (models / "orphan" / "tokenizer").exists()
    failures = [line for line in daemon.log().splitlines() if "repo=someone/not-on-the-hub failed" in line]
    assert len(failures) == 1 and failures[0].startswith("WARNING")
    assert len([r for r in hub.requests if "someone/not-on-the-hub" in r[1]]) == 1


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(repo=st.text(max_size=60))
def test_any_huggingface_path_is_looked_up_without_raising(tmp_path: Path, hf_home: Path, repo: str) -> None:
    from rkllama_ollama.models.tokenizer_files import find_tokenizer_files

    write_cached_repo(hf_home, LLAMA_REPO, llama3_tokenizer_files())
    found = find_tokenizer_files(tmp_path, repo)
    assert found is None or (found.repo == repo.strip() == LLAMA_REPO)
