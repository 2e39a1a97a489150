"""The conformance checklist of docs/ollama-conformance.md, where the other test files leave an
item open or only partly covered: one test per item, named after it (each docstring starts with the
item's number), against live daemons driven by the real `ollama`, `openai` and aiohttp clients.

Models: `sys` and `ctx` are tiny random GGUFs (chatml template; `sys` has a Modelfile SYSTEM, `ctx` a
Modelfile NUM_CTX); `plain`, `thinker`, `caller`, `broken` and `crash` are RKLLM simulator models whose
output is scripted, for exact texts. A rendered prompt is checked without a debug endpoint: after a
generation, sending the expected prompt text raw finds every token already in the KV cache, so exactly one
token is evaluated (`prompt_eval_count == 1`) if and only if the rendering was exactly that text.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import ollama
import openai
import pytest

from rkllama_ollama.api.openai_request import format_of, options_of
from rkllama_ollama.durations import parse_keep_alive
from tests.conftest import make_gguf_model
from tests.rkllm_support.sim import add_sim_model, build_simulators
from tests.support.daemon import Daemon, Reply
from tests.support.fake_hub import FakeHub
from tests.support.inprocess_daemon import InProcessDaemon
from tests.support.tiny_gguf import write_tiny_gguf
from tests.test_tools_thinking_live import THINK_REPLY, TOOL_REPLY, WEATHER_TOOL
from tests.test_tools_thinking_live import add_model as add_template_model

JSON_UTF8 = "application/json; charset=utf-8"
PLAIN = "Hello there, friend."
THINK_TEXT = "The user greets me; be brief."  # THINK_REPLY's thinking part
GREEDY_ONE = {"num_predict": 1, "temperature": 0}
METRICS = (
    "total_duration",
    "load_duration",
    "prompt_eval_count",
    "prompt_eval_duration",
    "eval_count",
    "eval_duration",
)
HI = [{"role": "user", "content": "hi"}]


def chatml(*turns: tuple[str, str]) -> str:
    """The tiny GGUF's chatml rendering of `turns` plus the generation prompt."""
    return (
        "".join(f"<|im_start|>{role}\n{text}<|im_end|>\n" for role, text in turns) + "<|im_start|>assistant\n"
    )


def post(served: Daemon, path: str, body: Any) -> Reply:
    return served.request("POST", path, body)


def ndjson(payload: bytes) -> list[dict[str, Any]]:
    lines = payload.split(b"\n")
    assert lines[-1] == b"" and all(lines[:-1]), "newline-terminated, no blank line"
    return [json.loads(line) for line in lines[:-1]]


# -- daemons ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def empty_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    store = tmp_path_factory.mktemp("checklist-empty") / "models"
    store.mkdir()
    with InProcessDaemon(store).start() as server:
        yield server


MTIMES = {"sys": 1_700_000_300, "ctx": 1_700_000_100, "plain": 1_700_000_200}  # not alphabetical


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("checklist") / "models"
    make_gguf_model(root, "sys", context_length=8192, system="You are terse.")
    ctx = make_gguf_model(root, "ctx", context_length=8192)
    with (ctx / "Modelfile").open("a") as modelfile:
        modelfile.write("NUM_CTX=3072\n")
    sim = {"token_delay_ms": 1, "prefill_us_per_token": 20}
    add_sim_model(root, "plain", reply=PLAIN, tokenizer=True, **sim)
    add_template_model(root, "thinker", THINK_REPLY)
    add_template_model(root, "caller", TOOL_REPLY)
    add_sim_model(root, "broken", fail_init=1)
    add_sim_model(root, "crash", reply="lorem ipsum " * 50, crash_after_tokens=3)
    for name, when in MTIMES.items():
        for path in [root / name, *(root / name).rglob("*")]:
            os.utime(path, (when, when))
    return root


@pytest.fixture(scope="module")
def live(store: Path) -> Iterator[Daemon]:
    env = {"RKLLAMA_RKLLM_LIB": str(build_simulators()["F"]), "RKLLAMA_CONTEXT_LENGTH": "2048"}
    with Daemon(store, env=env).start() as server:
        yield server


@pytest.fixture(scope="module")
def client(live: Daemon) -> ollama.Client:
    return ollama.Client(host=live.url)


def unload_everything(served: Daemon) -> None:
    for model in served.request("GET", "/api/ps").json()["models"]:
        post(served, "/api/generate", {"model": model["model"], "keep_alive": 0})
    assert served.request("GET", "/api/ps").json() == {"models": []}


def ps_context_length(served: Daemon, name: str) -> int:
    """The context length of the loaded model `name` (other models may be resident beside it)."""
    models = served.request("GET", "/api/ps").json()["models"]
    (model,) = [model for model in models if model["name"].partition(":")[0] == name]
    return int(model["context_length"])


def expires_at(served: Daemon) -> dt.datetime:
    (model,) = served.request("GET", "/api/ps").json()["models"]
    return dt.datetime.fromisoformat(model["expires_at"])


# -- service and listing -----------------------------------------------------------------------------------


def test_item_03_tags_of_an_empty_store_is_an_empty_list(empty_daemon: Daemon) -> None:
    """#3: no models -> 200 JSON whose `models` is [] (never null, never missing)."""
    reply = empty_daemon.request("GET", "/api/tags")
    assert (reply.status, reply.content_type, reply.json()) == (200, JSON_UTF8, {"models": []})
    assert ollama.Client(host=empty_daemon.url).list().models == []


NAMES = ["mistral:7b-instruct-q4_0", "apple/OpenELM:latest", "mynamespace/apeliotes:latest"]
NAMES += ["myhost/mynamespace/lips:code"]


def test_item_05_names_list_as_given_in_shortest_form(live: Daemon) -> None:
    """#5: tags, namespaces and hosts list as given; the default host and namespace are left out."""
    for name in [*NAMES, "registry.ollama.ai/library/longhand:v1"]:
        assert post(live, "/api/copy", {"source": "sys", "destination": name}).status == 200
    listed = {m["name"]: m["model"] for m in live.request("GET", "/api/tags").json()["models"]}
    for name in [*NAMES, "longhand:v1"]:
        assert listed.get(name) == name, sorted(listed)
    assert "registry.ollama.ai/library/longhand:v1" not in listed


def test_item_06_every_listed_model_has_the_full_entry(live: Daemon, client: ollama.Client) -> None:
    """#6: every entry (GGUF and .rkllm) has name, model, modified_at, size, a 64-hex digest, string
    details and `completion` in its capabilities; ollama-python parses the list."""
    models = live.request("GET", "/api/tags").json()["models"]
    assert {"sys:latest", "plain:latest", "caller:latest"} <= {m["model"] for m in models}
    for model in models:
        assert model["name"] == model["model"] and model["model"].count(":") >= 1
        assert dt.datetime.fromisoformat(model["modified_at"]).utcoffset() is not None
        assert isinstance(model["size"], int) and model["size"] > 0
        assert re.fullmatch(r"[0-9a-f]{64}", model["digest"]), model
        for key in ("parent_model", "format", "family", "parameter_size", "quantization_level"):
            assert isinstance(model["details"][key], str), (model["model"], key)
        assert "completion" in model["capabilities"], model["model"]
    assert len(client.list().models) == len(models)


def test_item_07_tags_newest_first_and_v1_models_in_the_same_order(live: Daemon) -> None:
    """#7: /api/tags sorted by modified_at, newest first; /v1/models in the same order, id == model,
    created == modified_at as unix seconds."""
    tags = live.request("GET", "/api/tags").json()["models"]
    times = [dt.datetime.fromisoformat(m["modified_at"]) for m in tags]
    assert times == sorted(times, reverse=True)
    fixed = [m["model"] for m in tags if m["model"].split(":")[0] in MTIMES]
    assert fixed == ["sys:latest", "plain:latest", "ctx:latest"]  # the fixture's mtimes, not the names
    data = live.request("GET", "/v1/models").json()["data"]
    assert [d["id"] for d in data] == [m["model"] for m in tags]
    assert [d["created"] for d in data] == [int(t.timestamp()) for t in times]
    assert {d["created"] for d in data if d["id"] == "sys:latest"} == {MTIMES["sys"]}


def test_item_08_v1_models_shape_owner_and_empty_list(empty_daemon: Daemon, live: Daemon) -> None:
    """#8: application/json, {"object":"list","data":[...]}, owned_by the namespace (`library` when
    there is none); an empty store gives `data: []` (Ollama's null is the quirk not to copy)."""
    empty = empty_daemon.request("GET", "/v1/models")
    assert (empty.status, empty.content_type, empty.json()) == (
        200,
        "application/json",
        {"object": "list", "data": []},
    )
    assert post(live, "/api/copy", {"source": "sys", "destination": "someone/owned"}).status == 200
    listing = live.request("GET", "/v1/models")
    assert listing.content_type == "application/json" and listing.json()["object"] == "list"
    owners = {d["id"]: d["owned_by"] for d in listing.json()["data"]}
    assert owners["sys:latest"] == "library" and owners["someone/owned:latest"] == "someone"
    assert all(d["object"] == "model" for d in listing.json()["data"])


# -- show ----------------------------------------------------------------------------------------------------


def test_item_11_show_parameters_one_line_per_value(
    live: Daemon, client: ollama.Client, tmp_path: Path
) -> None:
    """#11: Ollama's test model (seed 42, top_p 0.9, stop foo and bar) shows exactly these lines."""
    digest = client.create_blob(write_tiny_gguf(tmp_path / "show.gguf"))
    body = {
        "model": "show-model",
        "files": {"show.gguf": digest},
        "parameters": {"seed": 42, "top_p": 0.9, "stop": ["foo", "bar"]},
        "stream": False,
    }
    assert post(live, "/api/create", body).status == 200
    reply = post(live, "/api/show", {"model": "show-model"})
    assert (reply.status, reply.content_type) == (200, JSON_UTF8)
    assert sorted(reply.json()["parameters"].strip().split("\n")) == [
        "seed                           42",
        'stop                           "bar"',
        'stop                           "foo"',
        "top_p                          0.9",
    ]


def test_item_12_show_always_has_model_info(live: Daemon, client: ollama.Client) -> None:
    """#12: `model_info` is an object for every model, .rkllm ones included (ollama-python requires
    the key); GGUF models name their `general.architecture`."""
    for name in ("sys", "plain", "caller"):
        shown = post(live, "/api/show", {"name": name}).json()
        assert isinstance(shown["model_info"], dict), name
        assert client.show(name).modelinfo is not None
    assert post(live, "/api/show", {"model": "sys"}).json()["model_info"]["general.architecture"] == "llama"


# -- create, copy, delete, pull --------------------------------------------------------------------------


def test_item_16_a_deleted_model_is_gone_from_tags_show_and_chat(live: Daemon) -> None:
    """#16: after delete (legacy `name`), tags, show, chat and generate all say the model is gone."""
    assert post(live, "/api/copy", {"source": "sys", "destination": "gone"}).status == 200
    assert live.request("DELETE", "/api/delete", {"name": "gone"})[::2] == (200, b"")
    assert "gone:latest" not in {m["model"] for m in live.request("GET", "/api/tags").json()["models"]}
    assert post(live, "/api/show", {"model": "gone"})[::2] == (
        404,
        b'{"error":"model \'gone:latest\' not found"}',
    )
    chat = post(live, "/api/chat", {"model": "gone", "messages": HI})
    assert (chat.status, chat.json()) == (404, {"error": "model 'gone' not found"})
    generate = post(live, "/api/generate", {"model": "gone", "prompt": "x"})
    assert (generate.status, generate.json()) == (404, {"error": "model 'gone' not found"})


def test_item_18_create_with_differently_cased_names_is_one_model(live: Daemon) -> None:
    """#18: `Case-Model` then `CASE-MODEL` is one model (the second create replaces the first);
    copy with another case is tested in test_api_models."""
    for name, system in (("Case-Model", "first"), ("CASE-MODEL", "second")):
        body = {"model": name, "from": "sys", "system": system, "stream": False}
        assert post(live, "/api/create", body).status == 200
    listed = [m["model"] for m in live.request("GET", "/api/tags").json()["models"]]
    assert len([m for m in listed if "case" in m.lower()]) == 1, listed
    assert post(live, "/api/show", {"model": "case-model"}).json()["system"] == "second"


@pytest.fixture(scope="module")
def pull_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    root = tmp_path_factory.mktemp("checklist-pull")
    hub = FakeHub()
    hub.add("someone/Tiny-GGUF", {"tiny.Q4_K_M.gguf": write_tiny_gguf(root / "tiny.gguf").read_bytes()})
    hub.add("someone/Liar-GGUF", {"liar.Q4_K_M.gguf": write_tiny_gguf(root / "liar.gguf").read_bytes()})
    hub.lie_sha256.add("someone/Liar-GGUF/liar.Q4_K_M.gguf")
    hub.start()
    env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(root / "hf-home"), "HF_HUB_OFFLINE": "0"}
    try:
        with Daemon(root / "models", env=env).start() as server:
            yield server
    finally:
        hub.stop()


def test_item_20_pull_stream_false_is_the_last_status_alone(pull_daemon: Daemon) -> None:
    """#20: with stream:false only the last progress object comes back, `{"status":"success"}`,
    labelled application/json (no charset, like Ollama); the streamed sequence is in test_pull_daemon."""
    reply = post(pull_daemon, "/api/pull", {"model": "hf.co/someone/Tiny-GGUF", "stream": False})
    assert (reply.status, reply.content_type, reply.json()) == (
        200,
        "application/json",
        {"status": "success"},
    )
    assert "hf.co/someone/Tiny-GGUF:latest" in {
        m.model for m in ollama.Client(host=pull_daemon.url).list().models
    }


def test_item_21_a_collapsed_pull_stream_keeps_the_error_and_its_status(pull_daemon: Daemon) -> None:
    """#21: stream:false turns a failure into its own status and `{"error": ...}` (the same text a
    stream ends with); a success is 200 with the last object. Go's "unknown message type" cannot happen."""
    missing = post(pull_daemon, "/api/pull", {"model": "hf.co/someone/Nothing-GGUF", "stream": False})
    assert (missing.status, missing.json()) == (404, {"error": "pull model manifest: file does not exist"})
    body = {"model": "hf.co/someone/Liar-GGUF"}
    whole = post(pull_daemon, "/api/pull", {**body, "stream": False})
    assert whole.status >= 400 and set(whole.json()) == {"error"} and "digest mismatch" in whole.error
    streamed = post(pull_daemon, "/api/pull", body)
    assert streamed.status == 200 and ndjson(streamed.body)[-1] == whole.json()


# -- chat request handling ----------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [b"null", b"{}"])
@pytest.mark.parametrize(
    ("path", "status", "error"),
    [("/api/chat", 400, "model is required"), ("/api/generate", 404, "model '' not found")],
    ids=["item_22_chat", "item_23_generate"],
)
def test_items_22_23_a_body_without_a_model(
    live: Daemon, raw: bytes, path: str, status: int, error: str
) -> None:
    """#22: chat is 400 `model is required`; #23: generate is Ollama's quirky 404 — exact bodies."""
    reply = live.request("POST", path, raw=raw)
    assert (reply.status, reply.content_type, reply.json()) == (status, JSON_UTF8, {"error": error})


@pytest.mark.parametrize("path", ["/api/chat", "/api/generate"])
def test_item_24_think_on_a_model_without_thinking(live: Daemon, path: str) -> None:
    """#24: think:true is 400 naming the model as sent; think:false is served."""
    body = {"model": "sys", "messages": HI, "prompt": "hi", "stream": False, "options": GREEDY_ONE}
    refused = post(live, path, {**body, "think": True})
    assert (refused.status, refused.json()) == (400, {"error": '"sys" does not support thinking'})
    served = post(live, path, {**body, "think": False})
    assert served.status == 200 and served.json()["done"] is True


def test_item_26_suffix_on_a_model_without_insert(live: Daemon) -> None:
    """#26: 400 `<full name> does not support insert`, exact body."""
    reply = post(live, "/api/generate", {"model": "sys", "prompt": "def f(", "suffix": "return 1"})
    assert (reply.status, reply.json()) == (
        400,
        {"error": "registry.ollama.ai/library/sys:latest does not support insert"},
    )


@pytest.mark.parametrize(
    ("path", "body", "empty"),
    [
        ("/api/chat", {}, {"message": {"role": "assistant", "content": ""}}),
        ("/api/chat", {"messages": []}, {"message": {"role": "assistant", "content": ""}}),
        ("/api/generate", {}, {"response": ""}),
        ("/api/generate", {"prompt": ""}, {"response": ""}),
    ],
)
def test_item_27_load_only_is_one_json_object_even_when_streaming(
    live: Daemon, path: str, body: dict[str, Any], empty: dict[str, Any]
) -> None:
    """#27: no messages / no prompt, `stream` left at its default (true): one JSON object, the model
    echoed as sent, done:true, done_reason "load"."""
    reply = post(live, path, {"model": "SYS:latest", **body})
    assert (reply.status, reply.content_type) == (200, JSON_UTF8)
    got = reply.json()
    assert isinstance(got.pop("created_at"), str)
    assert got == {"model": "SYS:latest", **empty, "done": True, "done_reason": "load"}
    assert [m["model"] for m in live.request("GET", "/api/ps").json()["models"]] == ["sys:latest"]


@pytest.mark.parametrize("path", ["/api/chat", "/api/generate"])
def test_item_28_unload_does_not_load_the_model(live: Daemon, path: str) -> None:
    """#28: keep_alive 0 with nothing to generate answers done_reason "unload" without loading."""
    unload_everything(live)
    loads_before = live.log().count("loaded model=sys:latest")
    reply = post(live, path, {"model": "sys", "keep_alive": 0})
    assert (reply.status, reply.content_type) == (200, JSON_UTF8)
    got = reply.json()
    assert (got["model"], got["done"], got["done_reason"]) == ("sys", True, "unload")
    assert live.request("GET", "/api/ps").json() == {"models": []}
    assert live.log().count("loaded model=sys:latest") == loads_before


def test_item_29_chat_not_streamed_is_one_complete_object(live: Daemon) -> None:
    """#29: model echoed, done_reason "stop", message exactly {role, content}, six metrics > 0."""
    reply = post(live, "/api/chat", {"model": "plain", "messages": HI, "stream": False})
    assert (reply.status, reply.content_type) == (200, JSON_UTF8)
    got = reply.json()
    assert (got["model"], got["done"], got["done_reason"]) == ("plain", True, "stop")
    assert got["message"] == {"role": "assistant", "content": PLAIN}
    for key in METRICS:
        assert isinstance(got[key], int) and got[key] > 0, key


def test_item_30_generate_not_streamed_is_one_complete_object(live: Daemon) -> None:
    """#30: as #29, with `response` the full text and a non-empty `context` of token ids."""
    got = post(live, "/api/generate", {"model": "plain", "prompt": "hi", "stream": False}).json()
    assert (got["model"], got["done"], got["done_reason"], got["response"]) == ("plain", True, "stop", PLAIN)
    assert got["context"] and all(isinstance(token, int) for token in got["context"])
    for key in METRICS:
        assert isinstance(got[key], int) and got[key] > 0, key


def rendered_exactly(client: ollama.Client, text: str) -> bool:
    """Whether the previous generation on `sys` rendered exactly `text` (see the module docstring)."""
    return client.generate("sys", prompt=text, raw=True, options=GREEDY_ONE).prompt_eval_count == 1


def test_item_31_prompt_assembly(client: ollama.Client) -> None:
    """#31: the Modelfile system prompt when the request has none; a request system (chat's first
    message, generate's `system`) replaces it; interleaved system turns stay in order; raw is verbatim
    (proven by the raw replays themselves). The request `template` override is not honoured: it is a Go
    template, which a Python clone may ignore, and this project does (docs/ollama-parity.md)."""
    client.chat("sys", messages=HI, options=GREEDY_ONE)
    assert rendered_exactly(client, chatml(("system", "You are terse."), ("user", "hi")))
    client.chat("sys", messages=[{"role": "system", "content": "Be loud."}, *HI], options=GREEDY_ONE)
    assert rendered_exactly(client, chatml(("system", "Be loud."), ("user", "hi")))
    client.generate("sys", prompt="hi", system="Be loud.", options=GREEDY_ONE)
    assert rendered_exactly(client, chatml(("system", "Be loud."), ("user", "hi")))
    client.generate("sys", prompt="hi", options=GREEDY_ONE)
    assert rendered_exactly(client, chatml(("system", "You are terse."), ("user", "hi")))
    interleaved = [
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "I can help you with that."},
        {"role": "system", "content": "You can perform magic tricks."},
        {"role": "user", "content": "Help me write tests."},
    ]
    client.chat("sys", messages=interleaved, options=GREEDY_ONE)
    assert rendered_exactly(
        client, chatml(("system", "You are terse."), *((m["role"], m["content"]) for m in interleaved))
    )
    assert not rendered_exactly(client, chatml(("user", "something else")))  # the check can fail


def test_item_32_roles_are_lower_cased(client: ollama.Client) -> None:
    """#32: `SYSTEM`, `USER`, `ASSISTANT`, `TOOl` reach the template as lower-case roles."""
    messages = [
        {"role": "SYSTEM", "content": "s"},
        {"role": "USER", "content": "weather?"},
        {"role": "ASSISTANT", "content": "checking"},
        {"role": "TOOl", "content": "11 degrees"},
    ]
    client.chat("sys", messages=messages, options=GREEDY_ONE)
    assert rendered_exactly(
        client,
        chatml(("system", "s"), ("user", "weather?"), ("assistant", "checking"), ("tool", "11 degrees")),
    )


def test_item_33_keep_alive_parsing(live: Daemon, client: ollama.Client) -> None:
    """#33: 42 -> 42 s, 42.5 -> 42.5 s, "42m" -> 42 min, negative number or duration -> forever,
    unset at load -> the server default (5m); a bare numeric string is a 400."""
    assert parse_keep_alive(42) == 42.0 and parse_keep_alive(42.5) == 42.5
    assert parse_keep_alive("42m") == 2520.0 and parse_keep_alive("1h30m") == 5400.0
    assert parse_keep_alive(-1) < 0 and parse_keep_alive("-5m") < 0 and parse_keep_alive("0") == 0
    for value, seconds in ((42, 42.0), (42.5, 42.5), ("42m", 2520.0), (None, 300.0)):
        unload_everything(live)
        before = dt.datetime.now().astimezone()
        client.generate("sys", prompt="", keep_alive=value)
        after = dt.datetime.now().astimezone()
        delta = dt.timedelta(seconds=seconds)
        slack = dt.timedelta(milliseconds=1)
        assert before + delta - slack <= expires_at(live) <= after + delta + slack, value
    for forever in (-1, "-5m"):
        client.generate("sys", prompt="", keep_alive=forever)
        assert expires_at(live).year > 2200, forever
    reply = post(live, "/api/generate", {"model": "sys", "keep_alive": "300"})
    assert (reply.status, reply.json()) == (400, {"error": 'time: missing unit in duration "300"'})


@pytest.mark.parametrize("think", [True, False, "low", "medium", "high", "max"])
def test_item_34_think_values_accepted(live: Daemon, think: bool | str) -> None:
    """#34: true/false and the four levels are accepted on a thinking model (with false, the scripted
    model's own <think> block is left in the content: nothing asked for a split)."""
    reply = post(live, "/api/chat", {"model": "thinker", "messages": HI, "think": think, "stream": False})
    assert reply.status == 200, reply.body
    message = reply.json()["message"]
    if think is False:
        assert message == {"role": "assistant", "content": THINK_REPLY}
    else:
        assert message == {"role": "assistant", "content": "Hello there!", "thinking": THINK_TEXT}


def test_item_34_think_other_strings_and_unset(live: Daemon) -> None:
    """#34: any other string is a 400 with Ollama's text; unset on a thinking model means on."""
    reply = post(live, "/api/chat", {"model": "thinker", "messages": HI, "think": "x"})
    assert (reply.status, reply.json()) == (
        400,
        {"error": 'invalid think value: "x" (must be "high", "medium", "low", true, or false)'},
    )
    unset = post(live, "/api/chat", {"model": "thinker", "messages": HI, "stream": False}).json()
    assert unset["message"] == {
        "role": "assistant",
        "content": "Hello there!",
        "thinking": THINK_TEXT,
    }


def test_item_35_unknown_options_and_num_ctx_precedence(live: Daemon, served: Daemon) -> None:
    """#35: removed and unknown option keys are ignored; num_ctx is request > Modelfile > environment
    (RKLLAMA_CONTEXT_LENGTH=2048 here) > default (4096, the session daemon without the variable)."""
    stale = {"mirostat": 1, "mirostat_eta": 0.1, "tfs_z": 1.0, "penalize_newline": True, "numa": "x"}
    options = {**stale, "num_predict": 8}  # bounded: a random model may not end on its own (context shift)
    reply = post(live, "/api/generate", {"model": "sys", "prompt": "hi", "stream": False, "options": options})
    assert reply.status == 200, reply.body
    assert post(live, "/api/generate", {"model": "sys"}).status == 200
    assert ps_context_length(live, "sys") == 2048
    assert post(live, "/api/generate", {"model": "ctx"}).status == 200
    assert ps_context_length(live, "ctx") == 3072
    assert post(live, "/api/generate", {"model": "ctx", "options": {"num_ctx": 1024}}).status == 200
    assert ps_context_length(live, "ctx") == 1024
    assert post(served, "/api/generate", {"model": "tiny"}).status == 200
    assert ps_context_length(served, "tiny") == 4096


# -- chat output --------------------------------------------------------------------------------------------


def test_item_37_streamed_tool_call_is_whole_with_a_call_id(live: Daemon) -> None:
    """#37: streamed byte by byte, exactly one complete call comes out, with a `call_` id, index 0
    and object arguments; no raw tool-call text leaks into content. The call rides on a done:false chunk
    followed by the final chunk (Ollama's documented shape; clients accept both)."""
    body = {"model": "caller", "messages": HI, "tools": [WEATHER_TOOL], "think": False}
    reply = post(live, "/api/chat", body)
    assert (reply.status, reply.content_type) == (200, "application/x-ndjson")
    chunks = ndjson(reply.body)
    assert chunks[-1]["done"] is True and all(c["done"] is False for c in chunks[:-1])
    assert all(
        c["message"]["role"] == "assistant" and isinstance(c["message"]["content"], str) for c in chunks
    )
    calls = [call for c in chunks for call in c["message"].get("tool_calls", [])]
    assert len(calls) == 1
    (call,) = calls
    assert re.fullmatch(r"call_[a-z0-9]{8}", call["id"]), call["id"]
    assert call["function"] == {"index": 0, "name": "get_weather", "arguments": {"city": "Tokyo", "days": 2}}
    assert "".join(c["message"]["content"] for c in chunks).strip() == ""
    assert chunks[-1]["done_reason"] == "stop"


def test_item_39_an_error_before_any_output_keeps_its_status_streamed_or_not(live: Daemon) -> None:
    """#39: a load failure is the same status and the same single JSON error body whether the request
    streams or not (nothing was written before it). Mid-stream errors: test_reliability (runner killed)."""
    streamed = post(live, "/api/chat", {"model": "broken", "messages": HI})
    whole = post(live, "/api/chat", {"model": "broken", "messages": HI, "stream": False})
    assert streamed == whole
    assert (whole.status, whole.content_type) == (500, JSON_UTF8)
    assert set(whole.json()) == {"error"} and whole.error.startswith("could not load")
    assert post(live, "/api/chat", {"model": "plain", "messages": HI, "stream": False}).status == 200


def test_item_40_a_model_failure_mid_generation_answers_and_does_not_hang(live: Daemon) -> None:
    """#40: the runtime crashes after a few tokens; stream:false answers a 500 JSON error (not a hang),
    the stream ends with an error line; the daemon serves on. Disconnects: test_reliability."""
    whole = post(live, "/api/chat", {"model": "crash", "messages": HI, "stream": False})
    assert (whole.status, whole.content_type) == (500, JSON_UTF8)
    assert set(whole.json()) == {"error"} and "SIGSEGV" in whole.error
    streamed = post(live, "/api/chat", {"model": "crash", "messages": HI})
    lines = ndjson(streamed.body)
    assert streamed.status == 200 and set(lines[-1]) == {"error"} and "SIGSEGV" in lines[-1]["error"]
    assert post(live, "/api/chat", {"model": "plain", "messages": HI, "stream": False}).json()["done"]


# -- OpenAI compatibility -----------------------------------------------------------------------------------


def test_item_43_openai_chat_options_and_response_format(live: Daemon) -> None:
    """#43: max_tokens -> num_predict, seed, stop, temperature and top_p (1.0 when absent, overriding the
    Modelfile's 0.7), penalties; json_object -> format "json", which constrains the answer."""
    full = {
        "max_tokens": 7,
        "seed": 3,
        "stop": ["a", "b"],
        "temperature": 0.2,
        "top_p": 0.5,
        "frequency_penalty": 0.1,
        "presence_penalty": 0.2,
    }
    assert options_of(full) == {
        "num_predict": 7,
        "seed": 3,
        "stop": ["a", "b"],
        "temperature": 0.2,
        "top_p": 0.5,
        "frequency_penalty": 0.1,
        "presence_penalty": 0.2,
    }
    assert options_of({}) == {"temperature": 1.0, "top_p": 1.0}
    assert format_of({"response_format": {"type": "json_object"}}) == "json"
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0)
    reply = client.chat.completions.create(
        model="sys",
        messages=HI,  # type: ignore[arg-type]
        max_tokens=300,
        seed=1,
        response_format={"type": "json_object"},
    )
    content = (reply.choices[0].message.content or "").strip()
    if reply.choices[0].finish_reason == "stop":
        json.loads(content)
    else:  # random weights may nest past max_tokens; a cut answer still starts as JSON
        assert content[:1] in ("{", "["), content[:80]


# -- wire-level client requirements --------------------------------------------------------------------------


async def _aiohttp_lines(url: str, body: dict[str, Any]) -> list[bytes]:
    async with aiohttp.ClientSession() as session, session.post(url, json=body) as response:
        assert response.status == 200 and response.content_type == "application/x-ndjson"
        return [line async for line in response.content]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/chat", {"model": "sys", "messages": HI, "options": {"num_predict": 40, "seed": 2}}),
        ("/api/generate", {"model": "sys", "prompt": "hi " * 300, "options": {"num_predict": 40, "seed": 2}}),
    ],
)
def test_item_47_ndjson_lines_for_aiohttp_line_iteration(
    live: Daemon, path: str, body: dict[str, Any]
) -> None:
    """#47: read with aiohttp's line iteration (Open WebUI's proxy): every line ends in \\n, is one
    JSON object, none is blank and none is near aiohttp's limits (128 KiB for older versions)."""
    lines = asyncio.run(_aiohttp_lines(live.url + path, body))
    assert len(lines) > 2
    assert all(line.endswith(b"\n") and line.strip() and len(line) <= 128 * 1024 for line in lines)
    objects = [json.loads(line) for line in lines]
    assert objects[-1]["done"] is True and all(o["done"] is False for o in objects[:-1])


async def _aiohttp_json_replies(base: str) -> list[tuple[str, int, Any]]:
    calls: list[tuple[str, str, Any]] = [
        ("GET", "/api/version", None),
        ("GET", "/api/tags", None),
        ("GET", "/api/ps", None),
        ("POST", "/api/show", {"model": "sys"}),
        (
            "POST",
            "/api/generate",
            {"model": "sys:latest", "keep_alive": 0, "prompt": ""},
        ),  # Open WebUI's unload
        ("POST", "/api/generate", {"model": "sys", "prompt": ""}),  # load, stream left at its default
        ("POST", "/api/chat", {"model": "sys", "messages": HI, "stream": False, "options": GREEDY_ONE}),
        ("POST", "/api/generate", {"model": "sys", "prompt": "hi", "stream": False, "options": GREEDY_ONE}),
        ("POST", "/api/create", {"model": "labelled", "from": "sys", "stream": False}),
        ("POST", "/api/chat", {"model": "nope", "messages": HI}),
        ("POST", "/api/show", {"model": "nope"}),
    ]
    replies = []
    async with aiohttp.ClientSession() as session:
        for method, path, body in calls:
            async with session.request(method, base + path, json=body) as response:
                replies.append((path, response.status, await response.json()))  # raises unless */json
    return replies


def test_item_48_every_single_json_reply_parses_with_aiohttp_json(live: Daemon) -> None:
    """#48: aiohttp's `response.json()` (Open WebUI, LangChain tools) accepts every non-streamed reply,
    load and unload included: they are labelled application/json."""
    replies = asyncio.run(_aiohttp_json_replies(live.url))
    statuses = [status for _, status, _ in replies]
    assert statuses == [200] * 9 + [404, 404]
    assert replies[4][2]["done_reason"] == "unload" and replies[5][2]["done_reason"] == "load"
    assert replies[8][2] == {"status": "success"}


def test_item_50_a_body_of_several_mib_is_accepted(live: Daemon) -> None:
    """#50: a 5 MiB body (Open WebUI's base64 images, or here an ignored extra field) is read, not 413."""
    body = {"model": "sys", "messages": [], "metadata": {"blob": "A" * (5 << 20)}}
    reply = post(live, "/api/chat", body)
    assert (reply.status, reply.json()["done_reason"]) == (200, "load")
