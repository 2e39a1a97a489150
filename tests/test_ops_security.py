"""API key, browser origins (CORS) and the DNS-rebinding Host check, on an in-process app."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from hypothesis import given
from hypothesis import strategies as st

from rkllama_ollama.api.app import create_app
from rkllama_ollama.api.security import (
    OriginPolicy,
    bearer_token,
    host_of,
    is_local_host,
    is_loopback_bind,
)
from rkllama_ollama.config import Settings, settings_from_env

KEY = "s3cret-key"
MakeClient = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture
def make_client(aiohttp_client: Any, tmp_path: Path) -> Callable[..., Awaitable[TestClient[Any, Any]]]:
    async def make(**overrides: Any) -> TestClient[Any, Any]:
        settings = Settings(models_dir=tmp_path / "models", offer_embedded=False).with_overrides(**overrides)
        settings.models_dir.mkdir(parents=True, exist_ok=True)
        return await aiohttp_client(create_app(settings))

    return make


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# -- API key ----------------------------------------------------------------------------------


async def test_api_key_guards_the_ollama_api(make_client: MakeClient) -> None:
    client = await make_client(api_key=KEY)
    for headers in (
        {},
        bearer("wrong"),
        bearer(""),
        {"Authorization": KEY},
        {"Authorization": f"Basic {KEY}"},
    ):
        response = await client.get("/api/tags", headers=headers)
        assert response.status == 401, headers
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        body = await response.json()
        assert isinstance(body["error"], str) and body["error"]
    response = await client.get("/api/tags", headers=bearer(KEY))
    assert response.status == 200
    assert await response.json() == {"models": []}


async def test_api_key_guards_v1_with_openai_envelope(make_client: MakeClient) -> None:
    client = await make_client(api_key=KEY)
    for headers in ({}, bearer("wrong")):
        response = await client.get("/v1/models", headers=headers)
        assert response.status == 401
        error = (await response.json())["error"]
        assert error["type"] == "invalid_request_error" and error["code"] == "invalid_api_key"
        assert error["message"]
    response = await client.get("/v1/models", headers=bearer(KEY))
    assert response.status != 401  # 200 once the OpenAI face exists, 404 before


async def test_root_is_open_and_everything_else_is_not(make_client: MakeClient) -> None:
    client = await make_client(api_key=KEY)
    response = await client.get("/")
    assert response.status == 200 and await response.text() == "Ollama is running"
    assert (await client.head("/")).status == 200
    assert (await client.post("/")).status == 401  # only GET/HEAD / are open
    assert (await client.get("/metrics")).status == 401
    assert (await client.get("/metrics", headers=bearer(KEY))).status == 200
    assert (await client.get("/no/such/route")).status == 401  # before routing: nothing leaks


async def test_without_api_key_any_authorization_header_is_ignored(make_client: MakeClient) -> None:
    client = await make_client()
    for headers in ({}, bearer(""), bearer("whatever")):
        assert (await client.get("/api/tags", headers=headers)).status == 200


# -- origins ----------------------------------------------------------------------------------


async def test_foreign_origin_is_refused(make_client: MakeClient) -> None:
    client = await make_client()
    response = await client.get("/api/tags", headers={"Origin": "http://evil.example"})
    assert response.status == 403
    assert "error" in await response.json()
    assert "Access-Control-Allow-Origin" not in response.headers
    response = await client.post("/api/chat", headers={"Origin": "https://attacker.test"}, json={})
    assert response.status == 403


async def test_default_origins_get_cors_headers(make_client: MakeClient) -> None:
    client = await make_client()
    for origin in ("http://localhost:3000", "https://127.0.0.1", "app://obsidian.md", "vscode-webview://x"):
        response = await client.get("/api/tags", headers={"Origin": origin})
        assert response.status == 200, origin
        assert response.headers["Access-Control-Allow-Origin"] == origin
        assert "Origin" in response.headers.getall("Vary")


async def test_preflight_is_204_for_allowed_and_403_for_foreign(make_client: MakeClient) -> None:
    client = await make_client(api_key=KEY)  # preflights carry no credentials: they must pass anyway
    headers = {
        "Origin": "http://localhost:5173",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    response = await client.options("/api/chat", headers=headers)
    assert response.status == 204
    assert response.headers["Access-Control-Allow-Origin"] == "http://localhost:5173"
    assert "POST" in response.headers["Access-Control-Allow-Methods"]
    allowed = response.headers["Access-Control-Allow-Headers"].lower()
    assert "authorization" in allowed and "content-type" in allowed
    response = await client.options("/api/chat", headers={**headers, "Origin": "http://evil.example"})
    assert response.status == 403


async def test_configured_origins_extend_the_defaults(make_client: MakeClient) -> None:
    client = await make_client(origins=("http://webui.lan:8080", "https://*.home.arpa"))
    for origin, status in (
        ("http://webui.lan:8080", 200),
        ("https://chat.home.arpa", 200),
        ("http://localhost", 200),
        ("http://webui.lan:9999", 403),
        ("http://home.arpa.evil.example", 403),
    ):
        assert (await client.get("/api/tags", headers={"Origin": origin})).status == status, origin


async def test_star_allows_every_origin(make_client: MakeClient) -> None:
    client = await make_client(origins=("*",))
    assert (await client.get("/api/tags", headers={"Origin": "http://anything.example"})).status == 200


@given(st.text(alphabet=st.characters(codec="ascii", exclude_categories=("Cc",)), max_size=40))
def test_origin_policy_allows_only_what_matches(tail: str) -> None:
    policy = OriginPolicy(["https://ok.example"])
    assert policy.allows("https://ok.example")
    assert policy.allows("HTTPS://OK.EXAMPLE")
    assert policy.allows("https://ok.example" + tail) == (tail.strip() == "")
    assert not policy.allows("https://evil.example" + tail)


# -- Host header ------------------------------------------------------------------------------


async def test_rebound_host_header_is_refused_on_loopback(make_client: MakeClient) -> None:
    client = await make_client()  # Settings' default host: 127.0.0.1
    for host in ("evil.example", "evil.example:11434", "8.8.8.8"):
        response = await client.get("/api/tags", headers={"Host": host})
        assert response.status == 403, host
    for host in ("localhost:11434", "127.0.0.1", "[::1]:11434", "box.local", "192.168.1.20", "x.localhost"):
        assert (await client.get("/api/tags", headers={"Host": host})).status == 200, host


async def test_host_check_is_off_when_serving_the_lan(make_client: MakeClient) -> None:
    client = await make_client(host="0.0.0.0")
    assert (await client.get("/api/tags", headers={"Host": "llm.example.com"})).status == 200


def test_host_parsing() -> None:
    assert host_of("Example.COM:11434") == "example.com"
    assert host_of("[::1]:11434") == "::1"
    assert host_of("::1") == "::1"
    assert is_local_host("10.0.0.5") and is_local_host("0.0.0.0") and not is_local_host("1.1.1.1")
    assert is_local_host("myboard", ["myboard"]) and not is_local_host("other", ["myboard"])
    assert is_loopback_bind("127.0.0.1") and is_loopback_bind("::1") and is_loopback_bind("localhost")
    assert not is_loopback_bind("0.0.0.0") and not is_loopback_bind("192.168.1.2")


def test_bearer_token_parsing() -> None:
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer  abc ") == "abc"
    assert bearer_token("Bearer ") == ""
    assert bearer_token("Basic abc") is None
    assert bearer_token("") is None


# -- settings ---------------------------------------------------------------------------------


def test_settings_read_key_and_origins_from_env() -> None:
    settings = settings_from_env({"RKLLAMA_API_KEY": " k ", "RKLLAMA_ORIGINS": "http://a, https://b ,"})
    assert settings.api_key == "k"
    assert settings.origins == ("http://a", "https://b")
    assert settings_from_env({"OLLAMA_ORIGINS": "http://c"}).origins == ("http://c",)
    assert settings_from_env({"RKLLAMA_API_KEY": "  "}).api_key is None
