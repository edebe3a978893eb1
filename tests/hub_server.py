"""A Hugging Face Hub on 127.0.0.1 for tests: the endpoints huggingface_hub 2.x calls to resolve
a revision, list a repo and download files, serving local model directories.

Repos are ``org/name``; each ``push`` is a commit (40 hex digits) that ``main`` then points at.
Files are served as plain HTTP (no Xet headers, so huggingface_hub takes its plain-HTTP path):
``HEAD``/``GET /{repo}/resolve/{revision}/{file}`` with ``Range`` (206 + ``Content-Range``),
``GET /api/models/{repo}[/revision/{revision}]`` and ``GET /api/models/{repo}/tree/{revision}``.
Missing repos, revisions and files answer 404 with the ``X-Error-Code`` huggingface_hub maps to
``RepositoryNotFoundError``, ``RevisionNotFoundError`` and ``EntryNotFoundError``.

It can throttle body bytes, fail the next requests for a file with 500 or drop the connection
after some body bytes, run a hook on a matching request, and it logs every request. Files are
served in place (a push copies nothing; each file's sha256, its ETag, is computed once), so
``benchmarks/hub_stream.py`` serves GBs of 7B-shaped models through it.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

_CHUNK = 64 << 10
_RESOLVE = re.compile(r"^/([\w.-]+/[\w.-]+)/resolve/([^/]+)/(.+)$")
_API = re.compile(r"^/api/models/([\w.-]+/[\w.-]+)(?:/(revision|tree)/([^/]+)(?:/(.*))?)?$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


@dataclass(frozen=True)
class Request:
    """One request as served: ``sent`` counts body bytes written."""

    method: str
    path: str
    range: str | None
    status: int
    sent: int

    @property
    def repo(self) -> str | None:
        """The repo of a resolve request, else None."""
        m = _RESOLVE.match(self.path)
        return m.group(1) if m else None

    @property
    def revision(self) -> str | None:
        m = _RESOLVE.match(self.path)
        return m.group(2) if m else None

    @property
    def file(self) -> str | None:
        m = _RESOLVE.match(self.path)
        return m.group(3) if m else None


@dataclass
class _Fault:
    file: str
    failures: int = 0  # next requests answered 500
    drop_after: int | None = None  # bytes of body sent before the connection is dropped, once


class HubServer:
    """Serves pushed model directories until ``stop``; ``url`` is its endpoint."""

    def __init__(self) -> None:
        self.commits: dict[str, dict[str, dict[str, Path]]] = {}  # repo -> commit -> file -> path
        self.refs: dict[str, dict[str, str]] = {}  # repo -> branch -> commit
        self._log: list[Request] = []
        self._in_flight = 0  # requests being answered: logged once answered
        self.bytes_per_second: float | None = None
        self._faults: list[_Fault] = []
        self._hooks: list[tuple[Callable[[Request], bool], Callable[[], None]]] = []
        self._lock = threading.Lock()
        self._answered = threading.Condition(self._lock)
        self._pushes = 0
        self._etags: dict[tuple[Path, int, int], str] = {}  # (path, size, mtime) -> sha256
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def push(self, repo: str, directory: Path, branch: str = "main") -> str:
        """Commit ``directory``'s files (top level) to ``repo`` and point ``branch`` at it."""
        with self._lock:
            self._pushes += 1
            commit = hashlib.sha1(f"{repo}:{self._pushes}".encode()).hexdigest()
            files = {p.name: p for p in sorted(directory.iterdir()) if p.is_file()}
            self.commits.setdefault(repo, {})[commit] = files
            self.refs.setdefault(repo, {})[branch] = commit
        return commit

    def fail(self, file: str, times: int) -> None:
        """Answer the next ``times`` requests for ``file`` with 500."""
        with self._lock:
            self._faults.append(_Fault(file, failures=times))

    def drop(self, file: str, after: int) -> None:
        """Close the connection of the next body of ``file`` after ``after`` bytes."""
        with self._lock:
            self._faults.append(_Fault(file, drop_after=after))

    def on(self, match: Callable[[Request], bool], action: Callable[[], None]) -> None:
        """Run ``action`` once, before answering the first request ``match`` accepts (its status 0)."""
        with self._lock:
            self._hooks.append((match, action))

    @property
    def log(self) -> list[Request]:
        """Every request answered so far. A client has a response before the server's thread
        logs it, so this waits (up to 5 s) for the requests being answered."""
        with self._answered:
            self._answered.wait_for(lambda: self._in_flight == 0, timeout=5)
            return list(self._log)

    def requests(self, method: str | None = None) -> list[Request]:
        return [r for r in self.log if method is None or r.method == method]

    def _begin(self) -> None:
        with self._lock:
            self._in_flight += 1

    def _record(self, request: Request) -> None:
        with self._answered:
            self._log.append(request)
            self._in_flight -= 1
            self._answered.notify_all()

    def _run_hooks(self, request: Request) -> None:
        with self._lock:
            due = [h for h in self._hooks if h[0](request)]
            self._hooks = [h for h in self._hooks if h not in due]
        for _, action in due:
            action()

    def _fault(self, file: str, body: bool) -> _Fault | None:
        """The fault to apply to this request for ``file`` (consumed), if any: a drop waits for a
        request with a body."""
        with self._lock:
            for f in self._faults:
                if f.file == file and (f.failures or body):
                    f.failures = max(0, f.failures - 1)
                    if not f.failures:
                        self._faults.remove(f)
                    return f
        return None

    def etag(self, path: Path) -> str:
        """``path``'s sha256, read once (every request sends it; a shard may be GBs)."""
        st = path.stat()
        key = (path, st.st_size, st.st_mtime_ns)
        if key not in self._etags:
            with open(path, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
            with self._lock:
                self._etags[key] = digest
        return self._etags[key]

    def _commit(self, repo: str, revision: str) -> str | None:
        with self._lock:
            if revision in self.commits.get(repo, {}):
                return revision
            return self.refs.get(repo, {}).get(revision)


def _handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # the body's first write follows the headers' at once: with Nagle's algorithm it waited
        # for the client's delayed ACK, about 25 ms per request of a --stream-inputs merge
        disable_nagle_algorithm = True
        timeout = 10  # an idle keep-alive connection ends its thread

        def log_message(self, format: str, *args: object) -> None:  # the log is hub.log
            pass

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def _serve(self, body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            rng = self.headers.get("Range")
            hub._begin()
            status, sent = 500, 0
            try:
                hub._run_hooks(Request(self.command, path, rng, 0, 0))
                if m := _RESOLVE.match(path):
                    status, sent = self._file(m.group(1), m.group(2), m.group(3), rng, body)
                elif m := _API.match(path):
                    status, sent = self._api(m.group(1), m.group(2), m.group(3))
                else:
                    status, sent = self._error(404, "RepoNotFound", f"no route {path}")
            finally:
                hub._record(Request(self.command, path, rng, status, sent))

        def _error(self, status: int, code: str | None, message: str) -> tuple[int, int]:
            self.send_response(status)
            if code:
                self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return status, 0

        def _lookup(self, repo: str, revision: str) -> tuple[str, dict[str, Path]] | tuple[int, int]:
            if repo not in hub.commits:
                return self._error(404, "RepoNotFound", f"Repository {repo} not found")
            commit = hub._commit(repo, revision)
            if commit is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return commit, hub.commits[repo][commit]

        def _api(self, repo: str, kind: str | None, revision: str | None) -> tuple[int, int]:
            found = self._lookup(repo, revision or "main")
            if isinstance(found[0], int):
                return found  # type: ignore[return-value]
            commit, files = found  # type: ignore[misc]
            if kind == "tree":
                doc: object = [{"type": "file", "path": name, "size": p.stat().st_size,
                                "oid": hub.etag(p)[:40]} for name, p in files.items()]
            else:
                doc = {"id": repo, "modelId": repo, "sha": commit, "private": False,
                       "siblings": [{"rfilename": n, "size": p.stat().st_size} for n, p in files.items()]}
            data = json.dumps(doc).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return 200, len(data)

        def _file(self, repo: str, revision: str, name: str, rng: str | None, body: bool) -> tuple[int, int]:
            found = self._lookup(repo, revision)
            if isinstance(found[0], int):
                return found  # type: ignore[return-value]
            commit, files = found  # type: ignore[misc]
            if name not in files:
                return self._error(404, "EntryNotFound", f"{name} does not exist at {revision}")
            fault = hub._fault(name, body)
            if fault is not None and fault.drop_after is None:
                return self._error(500, None, "injected failure")
            path = files[name]
            size = path.stat().st_size
            start, stop, status = 0, size, 200
            if rng is not None:
                m = _RANGE.match(rng.strip())
                if not m or int(m.group(1)) >= size:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return 416, 0
                start, stop, status = int(m.group(1)), min(size, int(m.group(2) or size - 1) + 1), 206
            etag = hub.etag(path)
            self.send_response(status)
            self.send_header("X-Repo-Commit", commit)
            self.send_header("ETag", f'"{etag}"')
            if name.endswith(".safetensors"):  # as the Hub describes LFS files
                self.send_header("X-Linked-Etag", f'"{etag}"')
                self.send_header("X-Linked-Size", str(size))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(stop - start))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{size}")
            self.end_headers()
            if not body:
                return status, 0
            limit = stop - start
            if fault is not None and fault.drop_after is not None:
                limit = min(limit, fault.drop_after)
            sent = self._send(path, start, limit)
            if sent < stop - start:  # an injected drop: the client sees a short body
                self.close_connection = True
                self.connection.shutdown(2)
            return status, sent

        def _send(self, path: Path, start: int, count: int) -> int:
            sent = 0
            began = time.monotonic()
            with open(path, "rb") as f:
                f.seek(start)
                while sent < count:
                    rate = hub.bytes_per_second
                    piece = f.read(min(_CHUNK, count - sent, max(1, int(rate / 50)) if rate else _CHUNK))
                    if not piece:
                        break
                    if rate:  # each piece leaves when the bytes before and in it are due at that rate
                        ahead = (sent + len(piece)) / rate - (time.monotonic() - began)
                        if ahead > 0:
                            time.sleep(ahead)
                    self.wfile.write(piece)
                    sent += len(piece)
            return sent

    return Handler


UNSET = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


def hub_environment(server: HubServer, home: Path) -> dict[str, str]:
    """The environment that points huggingface_hub (imported after it is set, or in a child
    process) at ``server``, with its home (cache, token) in ``home``; unset ``UNSET`` too."""
    return {"HF_ENDPOINT": server.url, "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"),
            "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_ETAG_TIMEOUT": "5", "HF_HUB_DOWNLOAD_TIMEOUT": "10",
            "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def use_hub(server: HubServer, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point huggingface_hub at ``server`` with its home (cache, token) in ``home``, whether it was
    imported before or not: the environment for later imports and child processes, the constants
    it read at import for this process."""
    for name, value in hub_environment(server, home).items():
        monkeypatch.setenv(name, value)
    for name in UNSET:
        monkeypatch.delenv(name, raising=False)
    from huggingface_hub import constants

    patched = {"ENDPOINT": server.url,
               "HUGGINGFACE_CO_URL_TEMPLATE": server.url + "/{repo_id}/resolve/{revision}/{filename}",
               "HF_URL_HOSTS": constants.HF_URL_HOSTS | {"127.0.0.1"},
               "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"), "HF_XET_CACHE": str(home / "xet"),
               "HF_TOKEN_PATH": str(home / "token"), "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
               "HF_HUB_OFFLINE": False, "HF_HUB_DISABLE_TELEMETRY": True, "HF_HUB_ETAG_TIMEOUT": 5,
               "HF_HUB_DOWNLOAD_TIMEOUT": 10, "HF_HUB_DISABLE_XET": True}
    for name, value in patched.items():
        monkeypatch.setattr(constants, name, value)
    # its progress bars read the variable once, at import, into their own module
    monkeypatch.setattr(importlib.import_module("huggingface_hub.utils.tqdm"),
                        "HF_HUB_DISABLE_PROGRESS_BARS", True)


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    """A running test Hub that huggingface_hub (in this process and in children) talks to."""
    server = HubServer()
    use_hub(server, tmp_path / "hf_home", monkeypatch)
    try:
        yield server
    finally:
        server.stop()
