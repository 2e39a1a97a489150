from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from rkllama_ollama.api.app import build_context, create_app
from rkllama_ollama.config import settings_from_env
from tests.support.daemon import Daemon
from tests.support.inprocess_daemon import InProcessDaemon
from tests.support.inprocess_runner import inprocess_runner_factory
from tests.support.tiny_gguf import write_tiny_gguf

TINY = "tiny"


def make_gguf_model(
    store: Path,
    folder: str,
    *,
    context_length: int = 4096,
    system: str | None = None,
    max_new_tokens: int | None = None,
) -> Path:
    """A store folder in the seed layout: Modelfile + tiny random GGUF. A random model rarely ends on
    its own, so a test that does not bound each request can bound the model (`max_new_tokens`)."""
    model_dir = store / folder
    model_dir.mkdir(parents=True, exist_ok=True)
    write_tiny_gguf(model_dir / "tiny.gguf", context_length=context_length)
    lines = ['FROM="tiny.gguf"', "TEMPERATURE=0.7"]
    if system:
        lines.append(f'SYSTEM="{system}"')
    if max_new_tokens is not None:
        lines.append(f"MAX_NEW_TOKENS={max_new_tokens}")
    (model_dir / "Modelfile").write_text("\n".join(lines) + "\n")
    return model_dir


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("store") / "models"
    make_gguf_model(store, TINY, context_length=32768)
    return store


@pytest.fixture(scope="session")
def daemon(tiny_store: Path) -> Iterator[Daemon]:
    """A live `rkllama-ollama serve` process with runner child processes (tests/support/daemon.py)."""
    with Daemon(tiny_store).start() as server:
        yield server


@pytest.fixture(scope="session")
def served(tiny_store: Path) -> Iterator[Daemon]:
    """The daemon's HTTP server in this process (runners too), on a real port: for HTTP tests that do
    not need to prove the `serve` process or a child runner process. Same interface as `daemon`."""
    with InProcessDaemon(tiny_store, name="served", keep_log=False).start() as server:
        yield server


AiohttpClient = Callable[[web.Application], Awaitable[TestClient]]


@pytest.fixture
async def app_client(aiohttp_client: AiohttpClient, tiny_store: Path) -> TestClient:
    """An aiohttp test client on the whole application, on the test's own loop, runners in-process;
    `app_client.app` reaches the context (scheduler, store) for white-box checks."""
    settings = settings_from_env({"RKLLAMA_EMBEDDED_MODEL": "0", "RKLLAMA_MODELS": str(tiny_store)})
    ctx = build_context(settings, runner_factory=inprocess_runner_factory())
    return await aiohttp_client(create_app(settings, ctx))
