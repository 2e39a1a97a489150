"""A small synchronous HTTP client for the daemon's Ollama API, used by the CLI (urllib + orjson)."""

from __future__ import annotations

import logging
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from http.client import HTTPException, HTTPResponse
from pathlib import Path
from typing import Any

import orjson

from rkllama_ollama import __version__

log = logging.getLogger(__name__)

USER_AGENT = f"rkllama-ollama-cli/{__version__}"
UPLOAD_CHUNK_BYTES = 1 << 20


class DaemonUnreachable(Exception):
    """Nothing answers at the daemon's address."""

    def __init__(self, base_url: str) -> None:
        super().__init__(base_url)
        self.base_url = base_url


class DaemonError(Exception):
    """The daemon answered with an error (a non-2xx status or an `{"error": ...}` stream line)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status

    @property
    def not_found(self) -> bool:
        return self.status == 404 or "not found" in self.message


def error_message(status: int, body: bytes) -> str:
    """The `error` of an Ollama (or OpenAI) error body, else the body text, else the status."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = None
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict):
            error = error.get("message")
        if isinstance(error, str) and error:
            return error
    text = body.decode("utf-8", "replace").strip()
    return text or f"HTTP {status}"


@dataclass
class Client:
    base_url: str
    api_key: str | None = None

    # -- transport ----------------------------------------------------------------------------

    def _open(
        self, method: str, path: str, body: Any = None, *, data: Any = None, size: int | None = None
    ) -> HTTPResponse:
        headers = {"User-Agent": USER_AGENT, "Accept": "application/x-ndjson, application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        if body is not None:
            data = orjson.dumps(body)
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(self.base_url + path, data=data, method=method, headers=headers)
        if size is not None:
            request.add_header("Content-Type", "application/octet-stream")
            request.add_header("Content-Length", str(size))
        try:
            # No timeout, like Ollama's client: loads, prefill and unloads may take long on a board.
            response = urllib.request.urlopen(request)  # noqa: S310 - the daemon's own http URL
        except urllib.error.HTTPError as exc:
            message = error_message(exc.code, exc.read())
            exc.close()
            raise DaemonError(message, exc.code) from None
        except (TimeoutError, urllib.error.URLError, ConnectionError) as exc:
            log.debug("daemon unreachable url=%s error=%s", self.base_url, exc)
            raise DaemonUnreachable(self.base_url) from None
        return response

    def request(self, method: str, path: str, body: Any = None) -> Any:
        """One request; the decoded JSON reply (None for an empty body)."""
        with self._open(method, path, body) as response:
            raw = response.read()
        return orjson.loads(raw) if raw.strip() else None

    def stream(self, method: str, path: str, body: Any) -> Iterator[dict[str, Any]]:
        """The NDJSON objects of a streamed reply; an `error` line raises DaemonError."""
        response = self._open(method, path, body)
        with response:
            try:
                lines = nonempty_lines(response)
                for line in lines:
                    event = orjson.loads(line)
                    if isinstance(event, dict) and event.get("error"):
                        raise DaemonError(str(event["error"]))
                    yield event
            except (ConnectionError, HTTPException) as exc:
                log.debug("stream broken url=%s error=%s", self.base_url, exc)
                raise DaemonError("the connection to the daemon was lost") from None
            except orjson.JSONDecodeError as exc:
                raise DaemonError(f"unexpected reply from the daemon: {exc}") from None

    # -- endpoints ----------------------------------------------------------------------------

    def tags(self) -> list[dict[str, Any]]:
        return list((self.request("GET", "/api/tags") or {}).get("models") or [])

    def ps(self) -> list[dict[str, Any]]:
        return list((self.request("GET", "/api/ps") or {}).get("models") or [])

    def show(self, model: str, verbose: bool = False) -> dict[str, Any]:
        return dict(self.request("POST", "/api/show", {"model": model, "verbose": verbose}) or {})

    def delete(self, model: str) -> None:
        self.request("DELETE", "/api/delete", {"model": model})

    def copy(self, source: str, destination: str) -> None:
        self.request("POST", "/api/copy", {"source": source, "destination": destination})

    def pull(self, model: str) -> Iterator[dict[str, Any]]:
        return self.stream("POST", "/api/pull", {"model": model, "stream": True})

    def create(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        return self.stream("POST", "/api/create", {**body, "stream": True})

    def blob_exists(self, hex_digest: str) -> bool:
        try:
            self.request("HEAD", f"/api/blobs/sha256:{hex_digest}")
        except DaemonError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def upload_blob(self, hex_digest: str, path: Path) -> None:
        with path.open("rb") as handle:
            size = path.stat().st_size
            response = self._open("POST", f"/api/blobs/sha256:{hex_digest}", data=_chunks(handle), size=size)
            response.close()

    def generate(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        return self.stream("POST", "/api/generate", body)

    def chat(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        return self.stream("POST", "/api/chat", body)


def nonempty_lines(response: HTTPResponse) -> Iterator[bytes]:
    """The non-empty lines of a streamed body, each as soon as it arrives."""
    for line in response:
        if line.strip():
            yield line


def _chunks(handle: Any) -> Iterator[bytes]:
    while chunk := handle.read(UPLOAD_CHUNK_BYTES):
        yield chunk
