"""Model management through Ollama's API: copy, delete, create, blobs, push — on a test-local store.

Driven by the real `ollama` client where it has the call (copy, delete, create, create_blob), raw HTTP
for the status codes and content types the client hides.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ollama
import pytest

from tests.conftest import make_gguf_model
from tests.support.daemon import Daemon, error_of
from tests.support.inprocess_daemon import InProcessDaemon
from tests.support.tiny_gguf import write_tiny_gguf


def listed(client: ollama.Client) -> set[str]:
    return {(model.model or "").lower() for model in client.list().models}


def show(daemon: Daemon, name: str) -> dict[str, Any]:
    """`/api/show` as raw JSON (ollama-python's ShowResponse has no `system`)."""
    status, _, payload = daemon.request("POST", "/api/show", {"model": name})
    assert status == 200, payload
    return dict(json.loads(payload))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models-api") / "models"
    make_gguf_model(root, "base", system="You are terse.")
    return root


@pytest.fixture(scope="module")
def daemon(store: Path) -> Iterator[Daemon]:
    with InProcessDaemon(store).start() as server:
        yield server


@pytest.fixture(scope="module")
def client(daemon: Daemon) -> ollama.Client:
    return ollama.Client(host=daemon.url)


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("upload") / "upload.gguf", seed=7)


# -- copy -----------------------------------------------------------------------------------------


def test_copy_makes_a_second_listed_model(client: ollama.Client, daemon: Daemon) -> None:
    """Checklist 15 and 18: copy answers 200 with an empty body; names are case-insensitive."""
    status, _, body = daemon.request("POST", "/api/copy", {"source": "BASE", "destination": "Copied:v1"})
    assert (status, body) == (200, b"")
    assert "copied:v1" in listed(client)
    assert show(daemon, "copied:v1")["system"] == "You are terse."


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        ({"source": "missing", "destination": "x"}, 404, 'model "missing" not found'),
        ({"source": "base", "destination": "bad/../name"}, 400, 'destination "bad/../name" is invalid'),
        ({"source": "", "destination": "x"}, 400, 'source "" is invalid'),
    ],
)
def test_copy_errors(daemon: Daemon, body: dict[str, str], status: int, error: str) -> None:
    got_status, _, payload = daemon.request("POST", "/api/copy", body)
    assert (got_status, error_of(payload)) == (status, error)


# -- delete ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["model", "name"])
def test_delete_removes_the_model(client: ollama.Client, daemon: Daemon, field: str) -> None:
    """Checklist 16: both the current and the legacy field; 200 with an empty body; gone everywhere."""
    client.copy("base", f"doomed-{field}")
    status, _, body = daemon.request("DELETE", "/api/delete", {"model": "", field: f"doomed-{field}"})
    assert (status, body) == (200, b"")
    assert f"doomed-{field}:latest" not in listed(client)
    with pytest.raises(ollama.ResponseError) as info:
        client.chat(model=f"doomed-{field}", messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 404


def test_delete_errors(daemon: Daemon) -> None:
    """Checklist 17: a missing model is a 404 naming it; no name is a 400."""
    status, ctype, payload = daemon.request("DELETE", "/api/delete", {"model": "ghost"})
    assert (status, error_of(payload)) == (404, "model 'ghost' not found")
    assert ctype.startswith("application/json")
    status, _, payload = daemon.request("DELETE", "/api/delete", {})
    assert (status, error_of(payload)) == (400, "model is required")


def test_delete_of_the_loaded_model_unloads_it_first(client: ollama.Client, daemon: Daemon) -> None:
    client.copy("base", "loaded-then-deleted")
    client.generate(model="loaded-then-deleted", prompt="")  # load only
    assert [m.model for m in client.ps().models] == ["loaded-then-deleted:latest"]
    assert daemon.runner_pids()
    client.delete("loaded-then-deleted")
    assert client.ps().models == []
    deadline = time.monotonic() + 10
    while daemon.runner_pids() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert daemon.runner_pids() == []


# -- blobs ----------------------------------------------------------------------------------------


def test_blob_upload_head_and_reupload(daemon: Daemon) -> None:
    """Checklist 19: HEAD 404 then 200; POST 201 new, 200 existing; both digest spellings."""
    data = b"blob payload " * 1000
    hex_digest = hashlib.sha256(data).hexdigest()
    assert daemon.request("HEAD", f"/api/blobs/sha256:{hex_digest}")[0] == 404
    assert daemon.request("POST", f"/api/blobs/sha256:{hex_digest}", raw=data)[0] == 201
    assert daemon.request("HEAD", f"/api/blobs/sha256-{hex_digest}")[0] == 200
    assert daemon.request("POST", f"/api/blobs/sha256-{hex_digest.upper()}", raw=data)[0] == 200


def test_blob_digest_mismatch_leaves_nothing_behind(daemon: Daemon, store: Path) -> None:
    wrong = "0" * 64
    status, _, payload = daemon.request("POST", f"/api/blobs/sha256:{wrong}", raw=b"something else")
    got = hashlib.sha256(b"something else").hexdigest()
    assert (status, error_of(payload)) == (
        400,
        f'digest mismatch, expected "sha256:{wrong}", got "sha256:{got}"',
    )
    assert daemon.request("HEAD", f"/api/blobs/sha256:{wrong}")[0] == 404
    assert not [p for p in (store / ".blobs").iterdir() if p.name.startswith(".partial")]


@pytest.mark.parametrize("digest", ["sha256:abc", "md5:" + "0" * 64, "sha256_" + "0" * 64])
def test_blob_bad_digest_format(daemon: Daemon, digest: str) -> None:
    for method in ("POST", "HEAD"):
        status, _, payload = daemon.request(method, f"/api/blobs/{digest}", raw=b"x")
        assert status == 400
        if method == "POST":
            assert error_of(payload) == "invalid digest format"


# -- create ---------------------------------------------------------------------------------------


def test_create_from_files_after_create_blob(client: ollama.Client, daemon: Daemon, gguf_file: Path) -> None:
    """Open WebUI's and ollama-python's path: upload the GGUF as a blob, then create from `files`."""
    digest = client.create_blob(gguf_file)
    result = client.create(model="uploaded", files={"upload.gguf": digest}, system="Be brief.", stream=False)
    assert result.status == "success"
    shown = show(daemon, "uploaded")
    assert shown["system"] == "Be brief."
    assert shown["details"]["format"] == "gguf"
    reply = client.generate(model="uploaded", prompt="hello", options={"num_predict": 3, "temperature": 0})
    assert reply.done


def test_create_from_a_model_derives_it(client: ollama.Client, daemon: Daemon) -> None:
    """Checklist 14: stream:false is one `{"status":"success"}` labelled application/json."""
    body = {
        "model": "T-Bone",
        "from": "base",
        "system": "You are a steak.",
        "parameters": {"temperature": 0.3, "stop": ["foo", "bar"], "pi": 3.14},
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "moo"}],
        "license": ["MIT", "no warranty"],
        "stream": False,
    }
    status, ctype, payload = daemon.request("POST", "/api/create", body)
    assert (status, ctype, json.loads(payload)) == (200, "application/json", {"status": "success"})
    shown = show(daemon, "t-bone")
    assert shown["system"] == "You are a steak."
    assert 'stop                           "foo"' in shown["parameters"]
    assert "temperature                    0.3" in shown["parameters"]
    assert shown["license"] == "MIT\nno warranty"
    assert "MESSAGE assistant moo" in shown["modelfile"]
    assert "t-bone:latest" in listed(client)


def test_create_streams_statuses_ending_in_success(client: ollama.Client) -> None:
    statuses = [progress.status for progress in client.create(model="streamed", from_="base", stream=True)]
    assert statuses[-1] == "success"
    assert "writing manifest" in statuses
    assert any(status and status.startswith("using existing layer sha256:") for status in statuses)


def test_create_from_a_legacy_modelfile(client: ollama.Client, daemon: Daemon) -> None:
    text = 'FROM base\nPARAMETER num_ctx 1024\nSYSTEM """Legacy system."""\n'
    status, _, _ = daemon.request(
        "POST", "/api/create", {"name": "legacy", "modelfile": text, "stream": False}
    )
    assert status == 200
    shown = show(daemon, "legacy")
    assert shown["system"] == "Legacy system."
    assert "num_ctx                        1024" in shown["parameters"]


def test_create_from_a_legacy_modelfile_naming_a_blob(
    daemon: Daemon, gguf_file: Path, client: ollama.Client
) -> None:
    digest = client.create_blob(gguf_file)
    body = {"model": "legacy-blob", "modelfile": f"FROM @{digest}\n", "stream": False}
    assert daemon.request("POST", "/api/create", body)[0] == 200
    assert show(daemon, "legacy-blob")["details"]["format"] == "gguf"


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        ({"model": "x", "from": "base", "quantize": "q4_K_M"}, 400, "quantization is not supported"),
        ({"model": "x"}, 400, "neither 'from' or 'files' was specified"),
        ({"model": "x", "from": "ghost"}, 404, 'model "ghost" not found'),
        ({"model": "x", "files": {"/etc/x.gguf": "sha256:" + "0" * 64}}, 400, "file path must be relative"),
        ({"model": "x", "files": {"../x.gguf": "sha256:" + "0" * 64}}, 400, "file path must be relative"),
        ({"model": "x", "files": {"x.gguf": ""}}, 400, "invalid digest format"),
        (
            {"model": "x", "files": {"x.gguf": "sha256:" + "0" * 64}},
            400,
            f'blob "sha256:{"0" * 64}" not found',
        ),
        ({"model": "x", "from": "base", "parameters": {"temperature": "hot"}}, 400, None),
        ({"model": "bad name", "from": "base"}, 400, None),
        ({"from": "base"}, 400, "model is required"),
    ],
)
def test_create_errors(daemon: Daemon, body: dict[str, Any], status: int, error: str | None) -> None:
    got_status, ctype, payload = daemon.request("POST", "/api/create", body)
    assert got_status == status
    assert ctype.startswith("application/json")
    if error is not None:
        assert error_of(payload) == error


# -- push -----------------------------------------------------------------------------------------


def test_push_is_a_clear_error(daemon: Daemon) -> None:
    status, _, payload = daemon.request("POST", "/api/push", {"model": "base"})
    assert (status, error_of(payload)) == (400, "push is not supported")
    status, _, payload = daemon.request("POST", "/api/push", {})
    assert (status, error_of(payload)) == (400, "model is required")


def test_leftovers_of_an_interrupted_process_are_removed_at_start(tmp_path: Path) -> None:
    """A crash mid-create or mid-upload leaves hidden leftovers: the next start removes them, nothing else."""
    store = tmp_path / "models"
    make_gguf_model(store, "kept")
    for leftover in (".staging-abc", ".trash-def"):
        (store / leftover).mkdir()
        (store / leftover / "half.gguf").write_bytes(b"GGUF partial")
    (store / ".blobs").mkdir()
    (store / ".blobs" / ".partial-123").write_bytes(b"half an upload")
    with InProcessDaemon(store).start() as server:
        assert not (store / ".staging-abc").exists() and not (store / ".trash-def").exists()
        assert list((store / ".blobs").iterdir()) == []
        assert (store / "kept" / "tiny.gguf").is_file()
        assert [m["model"] for m in server.request("GET", "/api/tags").json()["models"]] == ["kept:latest"]
