"""`.rkllm` models end to end: the daemon serving the RKLLM simulator of each ABI family.

One daemon per family (RKLLAMA_RKLLM_LIB points at that family's simulator), driven with ollama-python.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import ollama
import pytest

from tests.rkllm_support.sim import (
    FAMILIES,
    SIM_VERSIONS,
    add_sim_model,
    build_simulators,
)
from tests.support.daemon import Daemon

REPLY = "Grüße, 世界! 🙂 — ok."
LONG_REPLY = "lorem ipsum " * 400  # 4800 bytes at 2 ms each: ~10 s if nobody stops it


def add_model(store: Path, name: str, *, tokenizer: bool = False, **keys: object) -> None:
    add_sim_model(store, name, tokenizer=tokenizer, modelfile=("TEMPERATURE=0.7",), **keys)


@pytest.fixture(scope="module", params=FAMILIES)
def family_daemon(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Daemon]:
    family = request.param
    library = build_simulators()[family]
    store = tmp_path_factory.mktemp(f"rkllm-{family}") / "models"
    add_model(store, "sim", reply=REPLY)
    add_model(store, "chat", tokenizer=True, reply="Sure, here it is.")
    add_model(store, "slow", reply=LONG_REPLY, token_delay_ms=2)
    add_model(store, "crash", reply=LONG_REPLY, crash_after_tokens=3)
    add_model(store, "broken", fail_init=1)
    add_model(store, "small", reply="ok", max_context_len=64)
    with Daemon(store, env={"RKLLAMA_RKLLM_LIB": str(library)}).start() as server:
        server.family = family  # type: ignore[attr-defined]
        yield server


def test_rkllm_models_are_listed(family_daemon: Daemon) -> None:
    models = {m.model: m for m in ollama.Client(host=family_daemon.url).list().models}
    assert "sim:latest" in models and models["sim:latest"].details.format == "rkllm"


def test_multibyte_reply_arrives_intact_streamed_and_not(family_daemon: Daemon) -> None:
    client = ollama.Client(host=family_daemon.url)
    messages = [{"role": "user", "content": "Say hello in German and Chinese."}]
    chunks = list(client.chat("sim", messages=messages, stream=True))
    assert "".join(c.message.content for c in chunks) == REPLY
    final = chunks[-1]
    assert final.done and final.done_reason == "stop"
    assert final.eval_count and final.eval_count > 0 and final.prompt_eval_count
    assert client.chat("sim", messages=messages, stream=False).message.content == REPLY
    assert client.generate("sim", prompt="hi", stream=False).response == REPLY


def test_abort_on_disconnect_frees_the_session(family_daemon: Daemon) -> None:
    sock, _ = family_daemon.open_stream(
        "/api/chat", {"model": "slow", "messages": [{"role": "user", "content": "go"}]}
    )
    sock.close()
    reply = ollama.Client(host=family_daemon.url).chat(
        "slow", messages=[{"role": "user", "content": "x"}], options={"num_predict": 5}
    )
    assert reply.done and reply.eval_count == 5
    aborted = [n for reason, n in family_daemon.ended_generations() if reason == "abort"]
    assert aborted and aborted[-1] < len(LONG_REPLY.encode())


def test_a_segfault_in_the_runtime_is_an_error_line_and_the_daemon_survives(family_daemon: Daemon) -> None:
    client = ollama.Client(host=family_daemon.url)
    with pytest.raises(ollama.ResponseError) as info:
        for _ in client.chat("crash", messages=[{"role": "user", "content": "x"}], stream=True):
            pass
    assert "SIGSEGV" in info.value.error
    assert client.chat("sim", messages=[{"role": "user", "content": "x"}]).message.content == REPLY


def test_failed_init_is_a_clear_error(family_daemon: Daemon) -> None:
    client = ollama.Client(host=family_daemon.url)
    with pytest.raises(ollama.ResponseError) as info:
        client.chat("broken", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 500 and "could not load" in info.value.error
    assert client.generate("sim", prompt="x").response == REPLY


def test_context_overflow_is_a_clear_error(family_daemon: Daemon) -> None:
    client = ollama.Client(host=family_daemon.url)
    with pytest.raises(ollama.ResponseError) as info:
        client.chat("small", messages=[{"role": "user", "content": "word " * 200}])
    assert "context" in info.value.error
    assert client.chat("small", messages=[{"role": "user", "content": "hi"}]).message.content == "ok"


def test_prefix_reuse_keeps_prompt_evaluation_flat_over_a_conversation(family_daemon: Daemon) -> None:
    client = ollama.Client(host=family_daemon.url)
    messages: list[dict[str, str]] = []
    fed: list[int] = []
    for turn in range(8):
        messages.append({"role": "user", "content": f"Question number {turn}: tell me more."})
        reply = client.chat("chat", messages=messages)
        messages.append({"role": "assistant", "content": reply.message.content})
        fed.append(reply.prompt_eval_count or 0)
    # 1.1.x has no keep_history, but each turn's prompt-cache file (conversation caches) covers the next
    # turn's start: there too only the last reply and the new question are prefilled.
    assert fed[7] <= 1.5 * fed[1]


def test_a_wrong_forced_version_is_a_clean_error(tmp_path: Path) -> None:
    library = build_simulators()["E"]
    store = tmp_path / "models"
    add_model(store, "sim", reply=REPLY)
    env = {"RKLLAMA_RKLLM_LIB": str(library), "RKLLAMA_RKLLM_VERSION": SIM_VERSIONS["F"]}
    with Daemon(store, env=env).start() as server:
        client = ollama.Client(host=server.url)
        with pytest.raises(ollama.ResponseError) as info:
            client.chat("sim", messages=[{"role": "user", "content": "x"}])
        assert info.value.status_code == 500 and info.value.error
        assert client.list().models  # the daemon is alive
