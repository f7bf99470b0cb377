"""A small imitation of the Hugging Face Hub on 127.0.0.1, for tests of the real client.

It serves `{repo_id: {filename: bytes}}` through the endpoints `huggingface_hub` 2.x calls:

- `HEAD|GET /{repo}/resolve/{revision}/{path}`: the file, with the headers `hf_hub_download`
  needs (`X-Repo-Commit`, `ETag`, `Content-Length`), `Range: bytes=a-b` -> 206.
- `GET /api/models/{repo}[/revision/{revision}]`: repo info with `sha` and `siblings` (sizes).
- `GET /api/models/{repo}/tree/{revision}[/{path}]`: the tree listing `snapshot_download` reads.
- Errors as the Hub sends them: 404 + `X-Error-Code: RepoNotFound | RevisionNotFound |
  EntryNotFound`; gated repos 401 (no token) / 403 (token not allowed) + `GatedRepo`.

Revisions are `main` and the repo's commit (a sha1 of its content). `fail_once` cuts one GET of
a file after N bytes, to exercise retries (huggingface_hub 2.4 resumes with a Range request only
past whole 10 MiB chunks it has written; an earlier cut restarts the file from byte 0). `cut_at`
stops every GET of a file at an absolute byte offset until the entry is removed: a connection
that keeps dropping, so a client gives up and must resume on its next run. Every
request is recorded in `requests` (never the token itself). Point huggingface_hub at it with
`use_hub(monkeypatch, server, tmp_path)`.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

# Files the real Hub stores in LFS: their ETag is the sha256 and the tree lists an `lfs` entry.
_LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".npz", ".pt", ".pth", ".model")
_LFS_MIN_SIZE = 10 * 1024 * 1024
_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")
_Query = dict[str, list[str]]


def git_blob_id(data: bytes) -> str:
    """The git object id of a file, which the Hub reports as `oid` / `blobId`."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class RecordedRequest:
    """One request the server saw; `authorized` says whether a Bearer token came with it."""

    method: str
    path: str
    range: str | None
    authorized: bool


@dataclass
class HubServer:
    """The fake Hub. Use as a context manager, or call `start()` / `stop()`."""

    repos: dict[str, dict[str, bytes]] = field(default_factory=dict)
    gated: set[str] = field(default_factory=set)
    allowed_tokens: set[str] = field(default_factory=set)
    fail_once: dict[tuple[str, str], int] = field(default_factory=dict)
    cut_at: dict[tuple[str, str], int] = field(default_factory=dict)
    requests: list[RecordedRequest] = field(default_factory=list)
    _httpd: ThreadingHTTPServer | None = field(default=None, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        """Base URL to use as HF_ENDPOINT."""
        assert self._httpd is not None, "server not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        """Listen on a free port of 127.0.0.1 in a daemon thread."""
        handler = type("Handler", (_Handler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        # A short poll interval keeps stop() (it waits for one poll) from adding 0.5 s per test.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def commit(self, repo: str) -> str:
        """The repo's commit id: changes whenever its files change."""
        h = hashlib.sha1(repo.encode())
        for name in sorted(self.repos[repo]):
            h.update(name.encode() + b"\0" + hashlib.sha256(self.repos[repo][name]).digest())
        return h.hexdigest()

    def file_entry(self, repo: str, name: str) -> dict[str, Any]:
        """The tree/siblings metadata of one file."""
        data = self.repos[repo][name]
        entry: dict[str, Any] = {"type": "file", "path": name, "size": len(data)}
        entry["oid"] = git_blob_id(data)
        if _is_lfs(name, data):
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data)}
            entry["lfs"]["pointerSize"] = 134
        return entry


def use_hub(monkeypatch: Any, server: HubServer, tmp_path: Path) -> Path:
    """Point huggingface_hub at `server` with an empty cache under `tmp_path`; return the cache.

    huggingface_hub reads its settings once at import, so the module constants are patched as
    well as the environment (for code that reads the environment, or a subprocess). Patching
    `constants.ENDPOINT` alone is not enough: `hf_hub_url` formats the import-time
    `HUGGINGFACE_CO_URL_TEMPLATE` and swaps in an explicit `endpoint=` only where the URL starts
    with `constants.ENDPOINT`, so a lone ENDPOINT patch silently sends requests to huggingface.co.
    The module-level `HfApi()` behind `huggingface_hub.model_info()` & co. also kept its endpoint.
    """
    from huggingface_hub import constants, hf_api

    home = tmp_path / "hf-home"
    cache = home / "hub"
    env = {
        "HF_ENDPOINT": server.url,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(cache),
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "NO_PROXY": "127.0.0.1,localhost",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    patches = {
        "ENDPOINT": server.url,
        "HUGGINGFACE_CO_URL_TEMPLATE": server.url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": constants.HF_URL_HOSTS | {"127.0.0.1"},
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(cache),
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_XET": True,
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        # huggingface_hub 2.x fetches {ENDPOINT}/api/agent-harnesses once a day into HF_HOME.
        "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"),
    }
    for key, value in patches.items():
        monkeypatch.setattr(constants, key, value)
    monkeypatch.setattr(hf_api.api, "endpoint", server.url)
    return cache


def _is_lfs(name: str, data: bytes) -> bool:
    return name.endswith(_LFS_SUFFIXES) or len(data) >= _LFS_MIN_SIZE


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects; every reply has a length

    def log_message(self, format: str, *args: Any) -> None:  # quiet: pytest shows failures
        pass

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def do_GET(self) -> None:
        self._dispatch(head=False)

    # ---- routing ------------------------------------------------------------------------

    def _dispatch(self, *, head: bool) -> None:
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        auth = self.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else None
        self.hub.requests.append(
            RecordedRequest(self.command, path, self.headers.get("Range"), token is not None)
        )
        query = parse_qs(parts.query)
        if path.startswith("/api/models/"):
            self._api(path.removeprefix("/api/models/"), query, token, head=head)
        elif "/resolve/" in path:
            repo, _, rest = path.lstrip("/").partition("/resolve/")
            revision, _, filename = rest.partition("/")
            self._resolve(repo, revision, filename, token, head=head)
        else:
            self._error(404, "RepoNotFound", "Repository not found", head=head)

    def _api(self, rest: str, query: _Query, token: str | None, *, head: bool) -> None:
        # {org}/{name} [/revision/{rev} | /tree/{rev}[/{path}]]
        segments = rest.split("/")
        repo, kind, revision = "/".join(segments[:2]), "info", "main"
        if len(segments) >= 4 and segments[2] in ("revision", "tree"):
            kind, revision = segments[2], segments[3]
        elif len(segments) != 2:
            self._error(404, None, "Not found", head=head)
            return
        if not self._check_repo(repo, revision, token, head=head):
            return
        if kind == "tree":
            recursive = query.get("recursive", ["false"])[0].lower() == "true"
            self._json(self._tree(repo, "/".join(segments[4:]), recursive), head=head)
        else:
            self._json(self._repo_info(repo), head=head)

    def _check_repo(self, repo: str, revision: str, token: str | None, *, head: bool) -> bool:
        """Send the Hub's error and return False when the repo/revision cannot be served."""
        if repo not in self.hub.repos:
            self._error(404, "RepoNotFound", "Repository not found", head=head)
            return False
        if repo in self.hub.gated and token not in self.hub.allowed_tokens:
            status = 401 if token is None else 403
            message = f"Access to model {repo} is restricted. You must be authenticated."
            self._error(status, "GatedRepo", message, head=head)
            return False
        if revision not in ("main", self.hub.commit(repo)):
            self._error(404, "RevisionNotFound", "Invalid rev id", head=head)
            return False
        return True

    # ---- endpoints ----------------------------------------------------------------------

    def _repo_info(self, repo: str) -> dict[str, Any]:
        siblings = []
        for name in sorted(self.hub.repos[repo]):
            entry = self.hub.file_entry(repo, name)
            sibling: dict[str, Any] = {"rfilename": name, "size": entry["size"]}
            sibling["blobId"] = entry["oid"]
            if "lfs" in entry:
                lfs = entry["lfs"]
                sibling["lfs"] = {"sha256": lfs["oid"], "size": lfs["size"], "pointerSize": 134}
            siblings.append(sibling)
        return {
            "_id": hashlib.md5(repo.encode()).hexdigest()[:24],
            "id": repo,
            "modelId": repo,
            "author": repo.split("/")[0],
            "sha": self.hub.commit(repo),
            "lastModified": "2025-06-25T00:00:00.000Z",
            "private": False,
            "gated": "manual" if repo in self.hub.gated else False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "library_name": "transformers",
            "siblings": siblings,
            "usedStorage": sum(s["size"] for s in siblings),
        }

    def _tree(self, repo: str, under: str, recursive: bool) -> list[dict[str, Any]]:
        prefix = under.strip("/") + "/" if under.strip("/") else ""
        files = sorted(n for n in self.hub.repos[repo] if n.startswith(prefix))
        out: list[dict[str, Any]] = []
        folders: set[str] = set()
        for name in files:
            rel = name[len(prefix) :]
            dirs = rel.split("/")[:-1]
            for i in range(1, len(dirs) + 1 if recursive else min(len(dirs), 1) + 1):
                folders.add(prefix + "/".join(dirs[:i]))
            if recursive or not dirs:
                out.append(self.hub.file_entry(repo, name))
        oid = "0" * 40
        out += [{"type": "directory", "path": d, "oid": oid, "size": 0} for d in sorted(folders)]
        return out

    def _resolve(
        self, repo: str, revision: str, filename: str, token: str | None, *, head: bool
    ) -> None:
        if not self._check_repo(repo, revision, token, head=head):
            return
        commit = self.hub.commit(repo)
        data = self.hub.repos[repo].get(filename)
        if data is None:
            headers = {"X-Repo-Commit": commit}  # lets the client cache the file's absence
            self._error(404, "EntryNotFound", f"{filename} does not exist", head=head, **headers)
            return
        entry = self.hub.file_entry(repo, filename)
        etag = entry["lfs"]["oid"] if "lfs" in entry else entry["oid"]
        headers = {
            "X-Repo-Commit": commit,
            "ETag": f'"{etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        start, end, status = 0, len(data) - 1, 200
        requested = self.headers.get("Range")
        if requested:
            parsed = _parse_range(requested, len(data))
            if parsed is None:
                headers["Content-Range"] = f"bytes */{len(data)}"
                self._send(416, b"", headers, head=head)
                return
            (start, end), status = parsed, 206
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        body = data[start : end + 1]
        cut = None if head else self.hub.fail_once.pop((repo, filename), None)
        if not head and (repo, filename) in self.hub.cut_at:
            cut = max(self.hub.cut_at[(repo, filename)] - start, 0)
        self._send(status, body, headers, head=head, cut_after=cut)

    # ---- replies ------------------------------------------------------------------------

    def _json(self, payload: Any, *, head: bool) -> None:
        body = json.dumps(payload).encode()
        self._send(200, body, {"Content-Type": "application/json"}, head=head)

    def _error(
        self, status: int, code: str | None, message: str, *, head: bool, **headers: str
    ) -> None:
        if code is not None:
            headers["X-Error-Code"] = code
        headers["X-Error-Message"] = message
        headers["Content-Type"] = "application/json"
        self._send(status, json.dumps({"error": message}).encode(), headers, head=head)

    def _send(
        self,
        status: int,
        body: bytes,
        headers: dict[str, str],
        *,
        head: bool,
        cut_after: int | None = None,
    ) -> None:
        self.send_response(status, HTTPStatus(status).phrase)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if head:
            return
        if cut_after is not None and cut_after < len(body):
            # Promise the whole body, deliver part of it, then drop the connection: the client
            # sees a truncated transfer, as on a flaky network.
            self.wfile.write(body[:cut_after])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)


def _parse_range(value: str, size: int) -> tuple[int, int] | None:
    match = _RANGE.match(value.strip())
    if match is None or (not match.group(1) and not match.group(2)):
        return None
    first, last = match.group(1), match.group(2)
    if not first:  # "bytes=-N": the last N bytes
        start, end = max(size - int(last), 0), size - 1
    else:
        start = int(first)
        end = min(int(last), size - 1) if last else size - 1
    if start >= size or start > end:
        return None
    return start, end
