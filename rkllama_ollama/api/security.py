"""Security middlewares: browser origins (CORS), the DNS-rebinding Host check, and the API key.

- Origins work like Ollama's: requests without an `Origin` header (curl, SDKs, Open WebUI's backend)
  pass; a browser origin must be one of Ollama's defaults or match RKLLAMA_ORIGINS (`*` wildcards),
  otherwise 403. Allowed origins get CORS headers, and their `OPTIONS` preflight answers 204.
- Host check: when bound to loopback, a `Host` that does not name this machine or a private address
  is refused with 403, so a hostile web page cannot reach the daemon through a rebound DNS name.
- API key: with RKLLAMA_API_KEY set, every route except `GET`/`HEAD /` needs
  `Authorization: Bearer <key>`; 401 in Ollama's `{"error"}` shape, or OpenAI's envelope on `/v1/`.
"""

from __future__ import annotations

import fnmatch
import hmac
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable

from aiohttp import typedefs, web

from rkllama_ollama.api import wire
from rkllama_ollama.config import Settings

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = typedefs.Middleware  # a callable taking (request, handler) by those names

_DEFAULT_HOSTS = ("localhost", "127.0.0.1", "0.0.0.0")
DEFAULT_ORIGINS: tuple[str, ...] = (
    *(
        f"{scheme}://{host}{port}"
        for host in _DEFAULT_HOSTS
        for scheme in ("http", "https")
        for port in ("", ":*")
    ),
    "app://*",
    "file://*",
    "tauri://*",
    "vscode-webview://*",
    "vscode-file://*",
)
ALLOWED_METHODS = "GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS"
ALLOWED_HEADERS = (
    "Authorization, Content-Type, User-Agent, Accept, X-Requested-With, OpenAI-Beta, "
    "x-stainless-arch, x-stainless-async, x-stainless-custom-poll-interval, x-stainless-helper-method, "
    "x-stainless-lang, x-stainless-os, x-stainless-package-version, x-stainless-poll-helper, "
    "x-stainless-retry-count, x-stainless-runtime, x-stainless-runtime-version, x-stainless-timeout"
)
CORS_ORIGIN_KEY = web.RequestKey("cors_origin", str)


# ------------------------------------------------------------------------------------------------
# Origins
# ------------------------------------------------------------------------------------------------


class OriginPolicy:
    """Ollama's default origins plus the configured patterns; `*` in a pattern matches any text."""

    def __init__(self, extra: Iterable[str] = ()) -> None:
        self.patterns = tuple(p.lower() for p in (*DEFAULT_ORIGINS, *extra))
        self.allow_all = "*" in self.patterns

    def allows(self, origin: str) -> bool:
        origin = origin.strip().lower()
        if self.allow_all:
            return True
        return any(fnmatch.fnmatchcase(origin, _glob(p)) for p in self.patterns)


def _glob(pattern: str) -> str:
    """Only `*` is special in an origin pattern; escape fnmatch's `?` and `[`."""
    return pattern.replace("[", "[[]").replace("?", "[?]")


def origin_middleware(policy: OriginPolicy) -> Middleware:
    @web.middleware
    async def check_origin(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if origin is None:
            return await handler(request)
        if not policy.allows(origin):
            log.warning(
                "refused %s %s from origin %r (not in RKLLAMA_ORIGINS)", request.method, request.path, origin
            )
            return _error(request, 403, f"origin {origin!r} is not allowed")
        request[CORS_ORIGIN_KEY] = origin
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            return web.Response(status=204, headers=_preflight_headers())
        return await handler(request)

    return check_origin


def _preflight_headers() -> dict[str, str]:
    return {
        "Access-Control-Allow-Methods": ALLOWED_METHODS,
        "Access-Control-Allow-Headers": ALLOWED_HEADERS,
        "Access-Control-Max-Age": "43200",
    }


async def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: also reaches streamed responses, whose headers leave before the handler ends."""
    origin = request.get(CORS_ORIGIN_KEY)
    if origin is not None:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers.add("Vary", "Origin")


# ------------------------------------------------------------------------------------------------
# Host header (DNS rebinding)
# ------------------------------------------------------------------------------------------------


def is_loopback_bind(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_of(header: str) -> str:
    """The host name of a Host header without port or IPv6 brackets, lower case."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header[1:]
    if header.count(":") == 1:
        return header.split(":", 1)[0]
    return header


def is_local_host(name: str, machine_names: Iterable[str] = ()) -> bool:
    if not name or name == "localhost" or name in machine_names:
        return True
    if name.endswith((".localhost", ".local", ".internal")):
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    return address.is_loopback or address.is_private or address.is_unspecified or address.is_link_local


def host_middleware() -> Middleware:
    machine = socket.gethostname().lower()
    machine_names = {machine, machine.split(".", 1)[0]}

    @web.middleware
    async def check_host(request: web.Request, handler: Handler) -> web.StreamResponse:
        name = host_of(request.headers.get("Host", ""))
        if not is_local_host(name, machine_names):
            log.warning("refused %s %s for Host %r (DNS rebinding guard)", request.method, request.path, name)
            return _error(request, 403, f"host {name!r} is not allowed")
        return await handler(request)

    return check_host


# ------------------------------------------------------------------------------------------------
# API key
# ------------------------------------------------------------------------------------------------


def is_open_route(request: web.Request) -> bool:
    return request.path == "/" and request.method in ("GET", "HEAD")


def bearer_token(header: str) -> str | None:
    scheme, _, token = header.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def api_key_middleware(api_key: str) -> Middleware:
    expected = api_key.encode()

    @web.middleware
    async def check_api_key(request: web.Request, handler: Handler) -> web.StreamResponse:
        if is_open_route(request):
            return await handler(request)
        token = bearer_token(request.headers.get("Authorization", ""))
        if token is None or not hmac.compare_digest(token.encode(), expected):
            reason = "missing" if token is None else "wrong"
            log.warning("refused %s %s: %s API key", request.method, request.path, reason)
            return _unauthorized(request)
        return await handler(request)

    return check_api_key


def _unauthorized(request: web.Request) -> web.Response:
    headers = {"WWW-Authenticate": 'Bearer realm="rkllama-ollama"'}
    if request.path.startswith("/v1/"):
        body = {
            "error": {
                "message": "Incorrect or missing API key. Send it as 'Authorization: Bearer <key>'.",
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_api_key",
            }
        }
        return wire.json_response(body, 401, charset=False, headers=headers)
    return wire.error_response(401, "unauthorized: missing or wrong API key", headers)


def _error(request: web.Request, status: int, message: str) -> web.Response:
    if request.path.startswith("/v1/"):
        return wire.openai_error_response(status, message)
    return wire.error_response(status, message)


# ------------------------------------------------------------------------------------------------
# Assembly
# ------------------------------------------------------------------------------------------------


def security_middlewares(settings: Settings) -> list[Middleware]:
    """In order: origin (and preflight), Host check when bound to loopback, API key when configured."""
    middlewares: list[Middleware] = [origin_middleware(OriginPolicy(settings.origins))]
    if is_loopback_bind(settings.host):
        middlewares.append(host_middleware())
    if settings.api_key:
        middlewares.append(api_key_middleware(settings.api_key))
    return middlewares


def install_security(app: web.Application) -> None:
    """Signals the middlewares need (CORS headers on every prepared response)."""
    app.on_response_prepare.append(add_cors_headers)
