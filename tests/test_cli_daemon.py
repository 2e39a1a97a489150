"""The CLI against a live daemon: tables, the REPL through a pseudo-terminal, one-shot and piped runs,
model management, and the message when nothing is listening."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pexpect
import pytest

from rkllama_ollama.cli.commands import main
from rkllama_ollama.cli.formatting import human_bytes, processor_text
from tests.conftest import TINY, make_gguf_model
from tests.support.daemon import Daemon, free_port
from tests.support.tiny_gguf import write_tiny_gguf

SHORT = "short"  # a tiny model whose Modelfile caps answers at a few tokens
SHORT_TOKENS = 6


def api(daemon: Daemon, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(daemon.url + path, data=data, method=method)
    with urllib.request.urlopen(request, timeout=60) as response:
        raw = response.read()
    return json.loads(raw) if raw.strip() else None


def cli_env(daemon: Daemon) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OLLAMA_HOST", "RKLLAMA_API_KEY")}
    return {**env, "RKLLAMA_HOST": f"127.0.0.1:{daemon.port}"}


def cli(daemon: Daemon, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rkllama_ollama.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=cli_env(daemon),
        timeout=60,
        check=False,
    )


def table_rows(text: str) -> list[list[str]]:
    """Split a CLI table on its 2+-space gaps (cells never hold two spaces in a row here)."""
    import re

    return [re.split(r" {2,}", line.strip()) for line in text.strip().splitlines()]


@pytest.fixture(scope="module")
def own_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A daemon on its own store, so creating and deleting models does not disturb other tests."""
    store = tmp_path_factory.mktemp("cli-store") / "models"
    model_dir = make_gguf_model(store, SHORT, context_length=2048)
    with (model_dir / "Modelfile").open("a") as handle:
        handle.write(f"MAX_NEW_TOKENS={SHORT_TOKENS}\n")
    with Daemon(store, env={"HF_HUB_OFFLINE": "1"}).start() as server:
        yield server


# -- tables -----------------------------------------------------------------------------------------


def test_list_table_matches_api_tags(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RKLLAMA_HOST", f"127.0.0.1:{daemon.port}")
    assert main(["list"]) == 0
    rows = table_rows(capsys.readouterr().out)
    models = api(daemon, "GET", "/api/tags")["models"]
    assert rows[0] == ["NAME", "ID", "SIZE", "MODIFIED"]
    assert [row[:3] for row in rows[1:]] == [
        [m["name"], m["digest"][:12], human_bytes(m["size"])] for m in models
    ]
    assert all(row[3].endswith(" ago") for row in rows[1:])
    assert any(row[0] == f"{TINY}:latest" for row in rows[1:])


def test_ps_table_matches_api_ps(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    api(daemon, "POST", "/api/generate", {"model": TINY, "keep_alive": "10m"})  # load it
    monkeypatch.setenv("RKLLAMA_HOST", f"127.0.0.1:{daemon.port}")
    assert main(["ps"]) == 0
    rows = table_rows(capsys.readouterr().out)
    loaded = api(daemon, "GET", "/api/ps")["models"]
    assert rows[0] == ["NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"]
    assert len(loaded) == 1 and len(rows) == 2
    m = loaded[0]
    assert rows[1][:5] == [
        m["name"],
        m["digest"][:12],
        human_bytes(m["size"]),
        processor_text(m["size"], m["size_vram"]),
        str(m["context_length"]),
    ]
    assert rows[1][5].endswith("from now")


# -- run --------------------------------------------------------------------------------------------


def spawn_run(daemon: Daemon, model: str) -> pexpect.spawn:
    child = pexpect.spawn(
        sys.executable,
        ["-m", "rkllama_ollama.cli", "run", model],
        env=cli_env(daemon),
        encoding="utf-8",
        timeout=60,
        dimensions=(40, 200),
    )
    child.expect_exact(">>> ")
    return child


def test_repl_through_a_pseudo_terminal(daemon: Daemon) -> None:
    child = spawn_run(daemon, TINY)
    try:
        child.sendline("/set parameter num_predict 5")
        child.expect_exact("Set parameter 'num_predict' to '5'")
        child.sendline("/set verbose")
        child.expect_exact("Set 'verbose' mode.")
        child.expect_exact(">>> ")
        child.sendline("Hello there")
        child.expect(r"eval count: +5 token\(s\)")  # the streamed answer obeyed num_predict
        child.expect_exact(">>> ")
        child.sendline('"""First line')
        child.expect_exact("... ")
        child.sendline("second line")
        child.expect_exact("... ")
        child.sendline('end"""')
        child.expect(r"prompt eval count: +\d+ token\(s\)")
        child.expect(r"eval count: +5 token\(s\)")
        child.expect_exact(">>> ")
        child.sendline("/set system You are terse.")
        child.expect_exact("Set system message.")
        child.sendline("/show info")
        child.expect(r"architecture +llama")
        child.sendline("/clear")
        child.expect_exact("Cleared session context")
        child.sendline("/bye")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_repl_ctrl_c_stops_a_long_answer_and_keeps_the_session(daemon: Daemon) -> None:
    child = spawn_run(daemon, TINY)
    try:
        child.sendline("Tell me a very long story")  # the tiny model rambles for thousands of tokens
        child.expect_exact("Tell me a very long story\r\n")  # the terminal's echo of the line
        child.expect(r"\S{3}")  # the answer is streaming
        child.sendintr()
        child.expect_exact(">>> ")
        child.sendline("/set parameter num_predict 3")
        child.expect_exact(">>> ")
        child.sendline("/set verbose")
        child.expect_exact(">>> ")
        child.sendline("Again")
        child.expect(r"eval count: +3 token\(s\)")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_run_with_a_prompt_answers_once(own_daemon: Daemon) -> None:
    result = cli(own_daemon, "run", SHORT, "Say", "hello", "--verbose")
    assert result.returncode == 0, result.stderr
    assert f"eval count:           {SHORT_TOKENS} token(s)" in result.stdout
    assert ">>>" not in result.stdout


def test_run_with_piped_stdin_answers_once_and_exits(own_daemon: Daemon) -> None:
    result = cli(own_daemon, "run", SHORT, "--verbose", stdin="What is a NPU?\n")
    assert result.returncode == 0, result.stderr
    assert f"eval count:           {SHORT_TOKENS} token(s)" in result.stdout
    assert result.stdout.count("total duration:") == 1


def test_run_unknown_model_tries_a_pull_and_reports_its_error(own_daemon: Daemon) -> None:
    result = cli(own_daemon, "run", "no-such-model", "hi")  # not in the catalogue: fails offline
    assert result.returncode == 1
    assert result.stderr.splitlines()[0] == "pulling manifest"
    assert result.stderr.splitlines()[-1].startswith("Error: pull model manifest: ")
    assert "Traceback" not in result.stderr


# -- show, stop, create, cp, rm -----------------------------------------------------------------------


def test_show_and_show_modelfile(own_daemon: Daemon) -> None:
    info = cli(own_daemon, "show", SHORT)
    assert info.returncode == 0, info.stderr
    assert "  Model\n    architecture" in info.stdout
    assert "num_predict" in info.stdout
    modelfile = cli(own_daemon, "show", SHORT, "--modelfile")
    assert modelfile.stdout == api(own_daemon, "POST", "/api/show", {"model": SHORT})["modelfile"]


def test_show_unknown_model_prints_the_daemon_error(own_daemon: Daemon) -> None:
    result = cli(own_daemon, "show", "nosuch")
    assert result.returncode == 1
    assert result.stderr == "Error: model 'nosuch:latest' not found\n"


def test_stop_unloads_the_model(own_daemon: Daemon) -> None:
    api(own_daemon, "POST", "/api/generate", {"model": SHORT, "keep_alive": "10m"})
    assert api(own_daemon, "GET", "/api/ps")["models"]
    result = cli(own_daemon, "stop", SHORT)
    assert result.returncode == 0, result.stderr
    assert api(own_daemon, "GET", "/api/ps")["models"] == []
    missing = cli(own_daemon, "stop", "nosuch")
    assert missing.returncode == 1
    assert missing.stderr == 'Error: couldn\'t find model "nosuch" to stop\n'


def test_create_from_a_local_gguf_then_cp_and_rm(own_daemon: Daemon, tmp_path: Path) -> None:
    write_tiny_gguf(tmp_path / "weights.gguf", context_length=1024)
    (tmp_path / "Modelfile").write_text("FROM ./weights.gguf\nPARAMETER temperature 0.3\nSYSTEM Be brief.\n")
    created = cli(own_daemon, "create", "made", "-f", str(tmp_path / "Modelfile"))
    assert created.returncode == 0, created.stderr
    assert created.stdout.rstrip().endswith("success")
    shown = api(own_daemon, "POST", "/api/show", {"model": "made"})
    assert shown["system"] == "Be brief."
    assert "temperature" in shown["parameters"]

    derived = tmp_path / "Derived"
    derived.write_text("FROM made\nPARAMETER top_k 7\n")
    assert cli(own_daemon, "create", "derived", "-f", str(derived)).returncode == 0

    copied = cli(own_daemon, "cp", "made", "made-copy")
    assert copied.returncode == 0, copied.stderr
    assert copied.stdout == "copied 'made' to 'made-copy'\n"
    names = {m["name"] for m in api(own_daemon, "GET", "/api/tags")["models"]}
    assert {"made:latest", "made-copy:latest", "derived:latest"} <= names

    removed = cli(own_daemon, "rm", "made", "made-copy", "derived")
    assert removed.returncode == 0, removed.stderr
    assert removed.stdout.splitlines() == ["deleted 'made'", "deleted 'made-copy'", "deleted 'derived'"]
    names = {m["name"] for m in api(own_daemon, "GET", "/api/tags")["models"]}
    assert not names & {"made:latest", "made-copy:latest", "derived:latest"}
    again = cli(own_daemon, "rm", "made")
    assert again.returncode == 1 and "not found" in again.stderr


def test_create_with_a_missing_modelfile_is_one_error_line(own_daemon: Daemon, tmp_path: Path) -> None:
    result = cli(own_daemon, "create", "x", "-f", str(tmp_path / "nope"))
    assert result.returncode == 1
    assert result.stderr.startswith("Error: cannot read ") and result.stderr.count("\n") == 1


# -- no daemon -------------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [["list"], ["ps"], ["run", "tiny", "hi"], ["pull", "x"], ["rm", "x"]])
def test_no_daemon_gives_one_clear_line(args: list[str]) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "OLLAMA_HOST"}
    result = subprocess.run(
        [sys.executable, "-m", "rkllama_ollama.cli", *args],
        env={**env, "RKLLAMA_HOST": f"127.0.0.1:{port}"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr == (
        f"Error: could not connect to rkllama-ollama at http://127.0.0.1:{port} — is it running? "
        "(rkllama-ollama serve)\n"
    )
    assert result.stdout == ""
