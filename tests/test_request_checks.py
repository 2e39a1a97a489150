"""request_checks.py: one checker for every face (unknown model, capabilities, images), and the error
middleware writing its refusals in each face's shape."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from rkllama_ollama.api.app import create_app
from rkllama_ollama.config import Settings
from rkllama_ollama.models.capabilities import Capability
from rkllama_ollama.models.store import ModelEntry, ModelNotFound
from rkllama_ollama.request_checks import NOT_FOUND_PULL, RequestChecks, RequestRefused
from tests.test_generation_plan import entry

MakeClient = Callable[[], Awaitable[TestClient[Any, Any]]]


class _Store:
    """Knows one model, by its name and (for the native face) its folder name."""

    def __init__(self, model: ModelEntry) -> None:
        self.model = model

    def resolve(self, name: object) -> ModelEntry:
        if str(name) in ("known", "known:latest") or getattr(name, "model", None) == "known":
            return self.model
        raise ModelNotFound(str(name))


def refusal(call: Callable[[], object]) -> tuple[int, str]:
    with pytest.raises(RequestRefused) as info:
        call()
    return info.value.status, info.value.message


def test_each_capability_refusal_names_the_model_as_sent() -> None:
    chat_only = entry(capabilities=(Capability.COMPLETION,))
    check = RequestChecks.check
    assert refusal(lambda: check(chat_only, "m:1", kind="chat", think=True)) == (
        400,
        '"m:1" does not support thinking',
    )
    assert refusal(lambda: check(chat_only, "m:1", kind="generate", insert=True)) == (
        400,
        "registry.ollama.ai/library/plan-test:latest does not support insert",  # Ollama names it in full
    )
    assert refusal(lambda: check(chat_only, "m:1", kind="chat", images=True)) == (
        400,
        '"m:1" does not support images',
    )
    embedder = entry(capabilities=(Capability.EMBEDDING,))
    assert refusal(lambda: check(embedder, "e", kind="chat")) == (400, '"e" does not support chat')
    assert refusal(lambda: check(embedder, "e", kind="generate")) == (400, '"e" does not support generate')
    everything = entry(capabilities=tuple(Capability))
    check(everything, "x", kind="chat", think="high", insert=True, images=True)  # nothing refused
    check(chat_only, "m:1", kind="chat", think=False)  # think off needs no thinking


async def test_resolve_refuses_an_unknown_model_with_the_face_s_wording() -> None:
    known = entry()
    checks = RequestChecks(_Store(known))  # type: ignore[arg-type]
    assert await checks.resolve("known") is known
    with pytest.raises(RequestRefused) as info:
        await checks.resolve("nope")
    assert (info.value.status, info.value.message) == (404, "model 'nope' not found")
    with pytest.raises(RequestRefused) as info:
        await checks.resolve("nope", not_found=NOT_FOUND_PULL)
    assert info.value.message == 'model "nope" not found, try pulling it first'
    with pytest.raises(RequestRefused) as info:
        await checks.model_for("known", kind="chat", images=True, label_of=lambda e: "folder-name")
    assert (info.value.status, info.value.message) == (400, '"folder-name" does not support images')


@pytest.fixture
def make_client(aiohttp_client: Any, tmp_path: Path) -> MakeClient:
    async def make() -> TestClient[Any, Any]:
        settings = Settings(models_dir=tmp_path / "models", offer_embedded=False)
        settings.models_dir.mkdir(parents=True, exist_ok=True)
        return await aiohttp_client(create_app(settings))

    return make


CHAT = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/api/chat", {"model": "ghost", "messages": CHAT}, "model 'ghost' not found"),
        ("/api/generate", {"model": "ghost", "prompt": "hi"}, "model 'ghost' not found"),
        ("/api/embed", {"model": "ghost", "input": "hi"}, 'model "ghost" not found, try pulling it first'),
        ("/generate", {"model": "ghost", "messages": CHAT}, "model 'ghost' not found"),
        ("/load_model", {"model_name": "ghost"}, "model 'ghost' not found"),
    ],
)
async def test_an_unknown_model_is_a_404_in_ollama_s_shape(
    make_client: MakeClient, path: str, body: dict[str, Any], message: str
) -> None:
    client = await make_client()
    response = await client.post(path, json=body)
    assert (response.status, await response.json()) == (404, {"error": message})


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/v1/chat/completions", {"model": "ghost", "messages": CHAT}, "model 'ghost' not found"),
        ("/v1/completions", {"model": "ghost", "prompt": "hi"}, "model 'ghost' not found"),
        ("/v1/responses", {"model": "ghost", "input": "hi"}, "model 'ghost' not found"),
        (
            "/v1/embeddings",
            {"model": "ghost", "input": "hi"},
            'model "ghost" not found, try pulling it first',
        ),
    ],
)
async def test_an_unknown_model_is_a_404_in_openai_s_shape(
    make_client: MakeClient, path: str, body: dict[str, Any], message: str
) -> None:
    client = await make_client()
    response = await client.post(path, json=body)
    assert response.status == 404
    error = (await response.json())["error"]
    assert error["message"] == message
