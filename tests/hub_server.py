"""A stand-in for the Hugging Face Hub on 127.0.0.1, serving what huggingface_hub (2.x)
requests for a model repo, as read from its source:

- ``GET /api/models/{repo}[/revision/{rev}]`` (HfApi.model_info / repo_info): ``sha`` and
  ``siblings``;
- ``GET /api/models/{repo}/tree/{rev}?recursive=...`` (list_repo_tree, used by
  snapshot_download): one JSON page of ``{type, path, size, oid}``;
- ``HEAD`` / ``GET /{repo}/resolve/{rev}/{file}`` (hf_hub_download): ``X-Repo-Commit``,
  ``ETag``, ``Content-Length``, and ``Range`` requests (206) for resumed downloads.

Errors carry the ``X-Error-Code`` header the real Hub sends, which huggingface_hub maps to its
exceptions: an unknown (or private, without the token) repo is 401 ``RepoNotFound``, an
unknown revision 404 ``RevisionNotFound``, a missing file 404 ``EntryNotFound``, a gated repo
403 ``GatedRepo``. ``drop`` names files whose download breaks off half-way and whose resumed
downloads (``Range``) break off before any byte; ``flaky`` files break off half-way once, then
resume; ``hide`` files are listed but cannot be downloaded.

Runs in a daemon thread; ``stop()`` ends it, and it stops by itself after ``lifetime`` s.
Tests use the ``hub`` fixture (``from hub_server import hub``): a started server with
HF_ENDPOINT pointing at it and HF_HUB_CACHE in the test's tmp_path; ``go_offline`` then
stops it and sets HF_HUB_OFFLINE=1, so what runs next runs from the cache alone.
"""
from __future__ import annotations

import hashlib
import http.server
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple
from urllib.parse import unquote, urlsplit

import pytest


@dataclass
class Revision:
    commit: str
    files: Dict[str, bytes]


@dataclass
class Repo:
    revisions: Dict[str, Revision] = field(default_factory=dict)  # branch/tag -> revision
    token: Optional[str] = None  # private: served only with this bearer token
    gated: bool = False

    def find(self, rev: str) -> Optional[Revision]:
        if rev in self.revisions:
            return self.revisions[rev]
        return next((r for r in self.revisions.values() if r.commit == rev), None)


def folder_files(folder: Path) -> Dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}


class HubServer:
    def __init__(self, lifetime: float = 300.0):
        self.repos: Dict[str, Repo] = {}
        self.drop: Set[Tuple[str, str]] = set()  # (repo, filename): breaks off half-way, resumes fail
        self.flaky: Set[Tuple[str, str]] = set()  # (repo, filename): breaks off half-way once
        self.hide: Set[Tuple[str, str]] = set()  # (repo, filename) listed, but 404 to download
        self.requests: List[Tuple[str, str]] = []  # (method, path) of every request
        self.lock = threading.Lock()
        self.connections: Set[socket.socket] = set()  # open keep-alive connections
        self.lifetime = lifetime
        self._httpd: Optional[http.server.ThreadingHTTPServer] = None

    # ---------------------------------------------------------------- content
    def add(self, repo_id: str, files: Dict[str, bytes], revision: str = "main", token: Optional[str] = None,
            gated: bool = False) -> str:
        """Adds (or replaces) a revision of a repo; returns its commit hash."""
        h = hashlib.sha1(repo_id.encode() + revision.encode())
        for name in sorted(files):
            h.update(name.encode() + hashlib.sha256(files[name]).digest())
        commit = h.hexdigest()
        repo = self.repos.setdefault(repo_id, Repo())
        repo.revisions[revision] = Revision(commit, dict(files))
        repo.token = token
        repo.gated = gated
        return commit

    def add_folder(self, repo_id: str, folder: Path, revision: str = "main", **kw) -> str:
        """Serves a local model folder's files as a hub repo; returns the commit hash."""
        return self.add(repo_id, folder_files(folder), revision, **kw)

    def downloads(self, repo_id: str) -> List[str]:
        """Files of `repo_id` fetched with GET (not HEAD), in order."""
        pre = f"/{repo_id}/resolve/"
        return [unquote(p[len(pre):].split("/", 1)[1]) for m, p in self.requests if m == "GET" and p.startswith(pre)]

    # ---------------------------------------------------------------- server
    @property
    def url(self) -> str:
        assert self._httpd is not None
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "HubServer":
        server = self

        class Handler(_Handler):
            hub = server

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        t = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        t.start()
        self._timer = threading.Timer(self.lifetime, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            self._timer.cancel()
            httpd.shutdown()
            httpd.server_close()
            with self.lock:  # clients' pooled keep-alive connections die too
                for c in self.connections:
                    try:
                        c.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass


_API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+)|/tree/(?P<tree>[^/]+))?/?$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")


class _Handler(http.server.BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"
    timeout = 20  # a stuck client connection cannot hold a thread for long

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def setup(self) -> None:
        super().setup()
        with self.hub.lock:
            self.hub.connections.add(self.connection)

    def finish(self) -> None:
        with self.hub.lock:
            self.hub.connections.discard(self.connection)
        super().finish()

    def _send(self, code: int, body: bytes = b"", headers: Optional[Dict[str, str]] = None, head: bool = False) -> None:
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _error(self, code: int, error_code: str, message: str, head: bool, extra: Optional[Dict[str, str]] = None) -> None:
        h = {"X-Error-Code": error_code, "X-Error-Message": message, "Content-Type": "application/json"}
        h.update(extra or {})
        self._send(code, json.dumps({"error": message}).encode(), h, head)

    def _repo(self, repo_id: str, head: bool) -> Optional[Repo]:
        repo = self.hub.repos.get(repo_id)
        auth = self.headers.get("Authorization", "")
        if repo is None or (repo.token is not None and auth != f"Bearer {repo.token}"):
            self._error(401, "RepoNotFound", "Repository not found", head)
            return None
        if repo.gated and auth == "":
            self._error(403, "GatedRepo", "Access to this model is restricted", head)
            return None
        return repo

    def do_HEAD(self) -> None:
        self._handle(head=True)

    def do_GET(self) -> None:
        self._handle(head=False)

    def _handle(self, head: bool) -> None:
        path = urlsplit(self.path).path
        with self.hub.lock:
            self.hub.requests.append(("HEAD" if head else "GET", path))
        m = _API.match(path)
        if m:
            return self._api(unquote(m.group("repo")), m.group("rev"), m.group("tree"), head)
        m = _RESOLVE.match(path)
        if m:
            return self._resolve(unquote(m.group("repo")), unquote(m.group("rev")), unquote(m.group("file")), head)
        self._error(404, "NotFound", f"no route {path}", head)

    def _api(self, repo_id: str, rev: Optional[str], tree: Optional[str], head: bool) -> None:
        repo = self._repo(repo_id, head)
        if repo is None:
            return
        want = unquote(tree or rev or "main")
        r = repo.find(want)
        if r is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {want}", head)
        if tree is not None:
            body = [{"type": "file", "path": n, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                    for n, b in sorted(r.files.items())]
        else:
            body = {"id": repo_id, "modelId": repo_id, "sha": r.commit, "private": repo.token is not None,
                    "gated": repo.gated, "siblings": [{"rfilename": n} for n in sorted(r.files)]}
        self._send(200, json.dumps(body).encode(), {"Content-Type": "application/json"}, head)

    def _resolve(self, repo_id: str, rev: str, name: str, head: bool) -> None:
        repo = self._repo(repo_id, head)
        if repo is None:
            return
        r = repo.find(rev)
        if r is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
        if name not in r.files or (repo_id, name) in self.hub.hide:
            return self._error(404, "EntryNotFound", f"{name} does not exist on {rev}", head,
                               {"X-Repo-Commit": r.commit})
        data = r.files[name]
        headers = {"X-Repo-Commit": r.commit, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                   "Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
        rng = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        key = (repo_id, name)
        if not head and (key in self.hub.drop or (key in self.hub.flaky and not rng)):
            with self.hub.lock:
                self.hub.flaky.discard(key)
            # The headers promise the whole file (or the rest); the connection dies half-way
            # (first request) or before any byte (resumed requests).
            start = int(rng.group(1)) if rng else 0
            self.send_response(206 if rng else 200)
            for k, v in headers.items():
                self.send_header(k, v)
            if rng:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(data) - start))
            self.end_headers()
            if not rng:
                self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        if rng and not head:
            start = int(rng.group(1))
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            return self._send(206, data[start:], headers)
        self._send(200, data, headers, head)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    import huggingface_hub.constants as hfc

    server = HubServer(lifetime=120).start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # conftest sets it for every other test
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(hfc, "HF_HUB_OFFLINE", False)  # read by huggingface_hub at import
    yield server
    server.stop()


def go_offline(monkeypatch, server: HubServer) -> None:
    """No server and offline mode: whatever runs now runs from the cache alone."""
    import huggingface_hub.constants as hfc

    server.stop()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hfc, "HF_HUB_OFFLINE", True)
