"""A local stand-in for the Hugging Face Hub: the subset of its HTTP API that huggingface_hub uses to pull.

- ``GET /api/models/<org>/<repo>[/revision/<rev>]`` -> ``{"id", "sha", "siblings": [...]}``; with
  ``?blobs=true`` each sibling has ``size``, ``blobId`` and, for weights files, ``lfs{size,sha256}``.
- ``HEAD|GET /<org>/<repo>/resolve/<rev>/<path>`` -> the file, with ``X-Repo-Commit``, ``ETag`` and
  ``Content-Length``; ``Range: bytes=N-`` answers 206 from N (how huggingface_hub resumes).
- unknown repos / files -> 404 with ``X-Error-Code: RepoNotFound`` / ``EntryNotFound``.

Knobs for fault tests: `lie_sha256` (report a wrong sha256 for a path), `cut_once_after` (drop the
connection once after N bytes of a path), `hold_after` (stop sending after N bytes of a path until
`release` is called), `chunk`/`chunk_delay` (slow sending). `requests` records ``(method, path, range)``.
The server runs on its own event loop in a daemon thread, so synchronous tests and live daemons can use it.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from dataclasses import dataclass, field

from aiohttp import web

from tests.support.daemon import free_port

LFS_SUFFIXES = (".gguf", ".rkllm", ".bin", ".safetensors")


def _commit_of(repo: str) -> str:
    return hashlib.sha1(repo.encode()).hexdigest()


@dataclass
class FakeHub:
    repos: dict[str, dict[str, bytes]] = field(default_factory=dict)
    lie_sha256: set[str] = field(default_factory=set)  # "<repo>/<path>"
    cut_once_after: dict[str, int] = field(default_factory=dict)
    hold_after: dict[str, int] = field(default_factory=dict)
    chunk: int = 64 * 1024
    chunk_delay: float = 0.0
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    port: int = 0

    def __post_init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._released = threading.Event()
        self.holding = threading.Event()  # set once a held download reached its byte limit
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-hub", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add(self, repo: str, files: dict[str, bytes]) -> None:
        self.repos.setdefault(repo, {}).update(files)

    def release(self) -> None:
        self._released.set()

    def file_requests(self, path_suffix: str) -> list[tuple[str, str, str | None]]:
        return [r for r in self.requests if r[0] == "GET" and r[1].endswith(path_suffix)]

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> FakeHub:
        self.port = self.port or free_port()
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        self._released.set()
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/api/models/{org}/{repo}", self._model_info)
        app.router.add_get("/api/models/{org}/{repo}/revision/{rev}", self._model_info)
        app.router.add_route("*", "/{org}/{repo}/resolve/{rev}/{path:.+}", self._resolve)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    # --- handlers --------------------------------------------------------------------------------

    @staticmethod
    def _not_found(code: str) -> web.Response:
        return web.json_response({"error": code}, status=404, headers={"X-Error-Code": code})

    def _sha256(self, repo: str, path: str, data: bytes) -> str:
        if f"{repo}/{path}" in self.lie_sha256:
            return hashlib.sha256(data + b"tampered").hexdigest()
        return hashlib.sha256(data).hexdigest()

    async def _model_info(self, request: web.Request) -> web.Response:
        repo = f"{request.match_info['org']}/{request.match_info['repo']}"
        self.requests.append(("GET", request.path, None))
        files = self.repos.get(repo)
        if files is None:
            return self._not_found("RepoNotFound")
        siblings = []
        for path, data in sorted(files.items()):
            sibling: dict[str, object] = {"rfilename": path}
            if request.query.get("blobs"):
                sibling["size"] = len(data)
                sibling["blobId"] = hashlib.sha1(data).hexdigest()
                if path.endswith(LFS_SUFFIXES):
                    sibling["lfs"] = {
                        "size": len(data),
                        "sha256": self._sha256(repo, path, data),
                        "pointerSize": 134,
                    }
            siblings.append(sibling)
        return web.json_response({"id": repo, "modelId": repo, "sha": _commit_of(repo), "siblings": siblings})

    async def _resolve(self, request: web.Request) -> web.StreamResponse:
        repo = f"{request.match_info['org']}/{request.match_info['repo']}"
        path = request.match_info["path"]
        self.requests.append((request.method, request.path, request.headers.get("Range")))
        files = self.repos.get(repo)
        if files is None:
            return self._not_found("RepoNotFound")
        data = files.get(path)
        if data is None:
            return self._not_found("EntryNotFound")
        etag = (
            self._sha256(repo, path, data) if path.endswith(LFS_SUFFIXES) else hashlib.sha1(data).hexdigest()
        )
        headers = {"X-Repo-Commit": _commit_of(repo), "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        if request.method == "HEAD":
            headers["Content-Length"] = str(len(data))
            return web.Response(status=200, headers=headers)
        start = 0
        range_header = request.headers.get("Range")
        if range_header and range_header.startswith("bytes="):
            start = int(range_header[len("bytes=") :].split("-")[0] or 0)
        body = data[start:]
        status = 206 if start else 200
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        headers["Content-Length"] = str(len(body))
        response = web.StreamResponse(status=status, headers=headers)
        await response.prepare(request)
        key = f"{repo}/{path}"
        sent = start
        while sent < len(data):
            cut = self.cut_once_after.get(key)
            if cut is not None and sent >= cut:
                del self.cut_once_after[key]
                assert request.transport is not None
                request.transport.close()
                return response
            hold = self.hold_after.get(key)
            if hold is not None and sent >= hold:
                del self.hold_after[key]
                self.holding.set()
                await asyncio.to_thread(self._released.wait, 30)
            end = min(len(data), sent + self.chunk)
            if cut is not None:
                end = min(end, max(cut, sent + 1))
            if hold is not None and sent < hold:
                end = min(end, hold)
            await response.write(data[sent:end])
            sent = end
            if self.chunk_delay:
                await asyncio.sleep(self.chunk_delay)
        await response.write_eof()
        return response
