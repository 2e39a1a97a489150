"""Several models resident at once (RKLLAMA_MAX_LOADED_MODELS): a chat model next to an embedding
model, one `.rkllm` model on the NPU at most, each model with its own runner and turn lock (live daemon,
tiny GGUF models and the RKLLM simulator)."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from pathlib import Path

import ollama
import pytest

from tests.conftest import make_gguf_model
from tests.rkllm_support.sim import add_sim_model, build_simulators
from tests.support.daemon import Daemon
from tests.support.tiny_gguf import write_tiny_gguf

OPTIONS = {"num_predict": 4, "temperature": 0, "seed": 1}
LOADED = re.compile(r"loaded model=(\S+) engine")
UNLOADED = re.compile(r"unloading model=(\S+) \(([^)]*)\)")
SLOW_REPLY = "lorem ipsum " * 100  # 1200 bytes at 5 ms each: about 6 s unless stopped


def make_store(root: Path) -> Path:
    store = root / "models"
    make_gguf_model(store, "tiny")
    (store / "emb").mkdir(parents=True)
    write_tiny_gguf(store / "emb" / "emb.gguf", embedding=True)
    add_sim_model(store, "npu", reply="from the npu")
    add_sim_model(store, "npu2", reply="from the other npu model")
    add_sim_model(store, "slow", reply=SLOW_REPLY, token_delay_ms=5)
    add_sim_model(store, "crash", reply=SLOW_REPLY, crash_after_tokens=3)
    return store


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_store(tmp_path_factory.mktemp("resident"))


@pytest.fixture(scope="module")
def library() -> str:
    return str(build_simulators()["F"])


def ps_names(client: ollama.Client) -> list[str]:
    return sorted(m.model or "" for m in client.ps().models)


@pytest.fixture
def daemon(store: Path, library: str) -> Iterator[Daemon]:
    with Daemon(store, env={"RKLLAMA_RKLLM_LIB": library}).start() as server:
        yield server


def test_a_chat_model_and_an_embedding_model_in_turn_load_once_each(daemon: Daemon) -> None:
    client = ollama.Client(host=daemon.url)
    for round_ in range(3):  # Open WebUI's RAG: embed the question, then chat with what was found
        assert len(client.embed("emb", input=[f"question {round_}"]).embeddings) == 1
        reply = client.chat("tiny", messages=[{"role": "user", "content": f"hi {round_}"}], options=OPTIONS)
        assert reply.done
    assert LOADED.findall(daemon.log()) == ["emb:latest", "tiny:latest"]
    assert UNLOADED.findall(daemon.log()) == []
    assert ps_names(client) == ["emb:latest", "tiny:latest"]
    assert len(daemon.runner_pids()) == 2


def test_one_rkllm_model_at_a_time_next_to_the_cpu_models(daemon: Daemon) -> None:
    client = ollama.Client(host=daemon.url)
    assert client.generate("npu", prompt="a").response == "from the npu"
    client.embed("emb", input=["x"])
    assert client.generate("npu2", prompt="b").response == "from the other npu model"
    assert ps_names(client) == ["emb:latest", "npu2:latest"]
    log = daemon.log()
    # The first NPU runner is gone before the second one starts.
    assert ("npu:latest", "making room for npu2:latest") in UNLOADED.findall(log)
    assert log.index("unloading model=npu:latest") < log.index("loaded model=npu2:latest")
    assert LOADED.findall(log) == ["npu:latest", "emb:latest", "npu2:latest"]


def test_an_embedding_request_does_not_wait_for_a_stream_on_the_npu(daemon: Daemon) -> None:
    client = ollama.Client(host=daemon.url)
    client.embed("emb", input=["warm up"])
    sock, _ = daemon.open_stream("/api/generate", {"model": "slow", "prompt": "go"})
    try:
        # The stream runs for seconds; the embedding model has its own runner and its own turn.
        result: list[int] = []
        worker = threading.Thread(
            target=lambda: result.append(len(client.embed("emb", input=["y"]).embeddings))
        )
        worker.start()
        worker.join(timeout=60)
        assert result == [1]
        assert not re.search(
            r"generate id=\d+ ended: stop, \d+ prompt tokens fed, 1\d\d\d generated", daemon.log()
        )
    finally:
        sock.close()
    assert "slow:latest" in ps_names(client)


def test_keep_alive_zero_unloads_only_that_model(daemon: Daemon) -> None:
    client = ollama.Client(host=daemon.url)
    client.embed("emb", input=["x"])
    client.generate("tiny", prompt="hello", options=OPTIONS)
    client.generate("tiny", prompt="", keep_alive=0)
    assert ps_names(client) == ["emb:latest"]


def test_a_crashing_runner_fails_its_request_and_leaves_the_other_models_loaded(daemon: Daemon) -> None:
    client = ollama.Client(host=daemon.url)
    client.embed("emb", input=["x"])
    with pytest.raises(ollama.ResponseError):
        list(client.generate("crash", prompt="boom", stream=True))
    assert ps_names(client) == ["emb:latest"]
    assert client.generate("npu", prompt="again").response == "from the npu"  # the NPU is free again
    assert ps_names(client) == ["emb:latest", "npu:latest"]


def test_max_loaded_models_one_switches_like_a_single_session(store: Path, library: str) -> None:
    env = {"RKLLAMA_RKLLM_LIB": library, "OLLAMA_MAX_LOADED_MODELS": "1"}
    with Daemon(store, env=env).start() as daemon:
        client = ollama.Client(host=daemon.url)
        client.embed("emb", input=["x"])
        client.generate("tiny", prompt="hello", options=OPTIONS)
        assert ps_names(client) == ["tiny:latest"]
        assert ("emb:latest", "making room for tiny:latest") in UNLOADED.findall(daemon.log())


def test_the_least_recently_used_model_makes_room(store: Path, library: str) -> None:
    with Daemon(
        store, env={"RKLLAMA_RKLLM_LIB": library, "RKLLAMA_MAX_LOADED_MODELS": "2"}
    ).start() as daemon:
        client = ollama.Client(host=daemon.url)
        client.generate("npu", prompt="a")
        client.embed("emb", input=["x"])
        client.generate("npu", prompt="b")  # npu is now the most recently used
        client.generate("tiny", prompt="hello", options=OPTIONS)
        assert ps_names(client) == ["npu:latest", "tiny:latest"]
        assert ("emb:latest", "making room for tiny:latest") in UNLOADED.findall(daemon.log())


def test_the_seed_unload_model_unloads_every_resident_model(daemon: Daemon) -> None:
    client = ollama.Client(host=daemon.url)
    client.embed("emb", input=["x"])
    client.generate("npu", prompt="a")
    reply = daemon.request("POST", "/unload_model")
    assert reply.status == 200 and reply.json()["model_name"] == "npu"
    assert ps_names(client) == []
    assert daemon.request("GET", "/current_model").status == 404
