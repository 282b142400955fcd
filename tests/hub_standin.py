"""A local stand-in for the Hugging Face Hub, for tests that must never contact the real one.

It emulates the part of the Hub that ``huggingface_hub`` (2.x) uses to download a single file
(``hf_hub_download`` / ``get_hf_file_metadata``), served over real HTTP on 127.0.0.1 by two threaded
servers, the "hub" and a "CDN" (a different origin, i.e. another port):

* ``HEAD|GET /{repo_id}/resolve/{revision}/{filename}`` on the hub server (the *resolve URL*):

  - LFS files answer ``302`` to the CDN (``Location: {cdn}/blobs/{sha256}``), carrying
    ``X-Repo-Commit`` (the commit the revision resolved to), ``X-Linked-Etag`` (the content's sha256,
    quoted), ``X-Linked-Size`` and ``ETag`` (git blob sha1). Because the CDN is another origin,
    huggingface_hub stops at the 302 and reads the metadata there, exactly as with the real Hub.
  - regular (non-LFS) files answer ``200`` with the bytes, ``ETag`` = the git blob sha1 and
    ``X-Repo-Commit``.
  - unknown revision / file / repo: ``404`` with ``X-Error-Code`` ``RevisionNotFound`` /
    ``EntryNotFound`` / ``RepoNotFound`` (and ``X-Error-Message``), which huggingface_hub maps to its
    typed errors.

  A revision is a branch name listed in :attr:`FakeHub.refs` or the commit hash itself.
* ``HEAD|GET /blobs/{sha256}`` on the CDN server: the LFS bytes (``404`` for unknown blobs).

Every request is appended to :attr:`FakeHub.requests` as ``(role, method, path)`` with role ``"hub"``
or ``"cdn"``, so tests can assert e.g. that a cached run made none (:meth:`FakeHub.clear` resets it).

Usage::

    from .hub_standin import FakeFile, hub_env, start_hub

    with start_hub({"vista3d_pretrained_model/model.pt": FakeFile(checkpoint_bytes)}) as hub:
        download_weights(dest, endpoint=hub.endpoint)           # in process, explicit endpoint
        subprocess.run([...], env=hub_env(hub, tmp_path / "hf-home"))  # a child via HF_ENDPOINT

In process, huggingface_hub reads most settings once at import time; use :func:`isolate_hf_env` (or the
``hf_isolated_env`` fixture in ``conftest.py``) to get online mode and a private cache. The ``hf_hub``
fixture in ``conftest.py`` serves a fake ``vista3d_pretrained_model/model.pt`` with this module.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from nvseg_ray.weights import HF_FILENAME, HF_REPO_ID, HF_REVISION

if TYPE_CHECKING:
    import pytest

__all__ = [
    "HF_FILENAME",
    "HF_REPO_ID",
    "HF_REVISION",
    "FakeFile",
    "FakeHub",
    "hub_env",
    "isolate_hf_env",
    "start_hub",
]


@dataclass
class FakeFile:
    """One file of the fake repo."""

    content: bytes
    lfs: bool = True
    advertised_sha256: str | None = None  # what the hub claims; defaults to the real digest

    @property
    def sha256(self) -> str:
        return self.advertised_sha256 or hashlib.sha256(self.content).hexdigest()

    @property
    def git_sha1(self) -> str:
        return hashlib.sha1(b"blob %d\0" % len(self.content) + self.content).hexdigest()


@dataclass
class FakeHub:
    """State shared by the hub and CDN servers; ``endpoint`` / ``cdn`` are set once they listen."""

    repo_id: str = HF_REPO_ID
    commit: str = HF_REVISION
    refs: dict[str, str] = field(default_factory=lambda: {"main": HF_REVISION})
    files: dict[str, FakeFile] = field(default_factory=dict)
    requests: list[tuple[str, str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    endpoint: str = ""
    cdn: str = ""

    def record(self, role: str, method: str, path: str) -> None:
        with self.lock:
            self.requests.append((role, method, path))

    def clear(self) -> None:
        with self.lock:
            self.requests.clear()

    def blob(self, sha256: str) -> bytes | None:
        for fake in self.files.values():
            if fake.lfs and fake.sha256 == sha256:
                return fake.content
        return None


def _handler(hub: FakeHub, role: str) -> type[BaseHTTPRequestHandler]:
    """Request handler class bound to ``hub``; ``role`` is "hub" or "cdn"."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def _serve(self, body: bool) -> None:
            hub.record(role, self.command, self.path)
            path = urlsplit(self.path).path
            if role == "cdn":
                self._serve_blob(path, body)
            else:
                self._serve_resolve(path, body)

        def _serve_blob(self, path: str, body: bool) -> None:
            content = hub.blob(path.rsplit("/", 1)[-1]) if path.startswith("/blobs/") else None
            if content is None:
                self._error(404, "NotFound", "no such blob", body)
            else:
                self._send(200, {}, content, body)

        def _serve_resolve(self, path: str, body: bool) -> None:
            prefix = f"/{hub.repo_id}/resolve/"
            if not path.startswith(prefix):
                self._error(404, "RepoNotFound", "Repository not found", body)
                return
            revision, _, filename = path[len(prefix) :].partition("/")
            revision, filename = unquote(revision), unquote(filename)
            commit = hub.refs.get(revision, revision if revision == hub.commit else None)
            if commit is None:
                self._error(404, "RevisionNotFound", "Invalid rev id: " + revision, body)
                return
            fake = hub.files.get(filename)
            if fake is None:
                self._error(404, "EntryNotFound", "Entry not found", body, {"X-Repo-Commit": commit})
                return
            if fake.lfs:
                headers = {
                    "X-Repo-Commit": commit,
                    "X-Linked-Etag": f'"{fake.sha256}"',
                    "X-Linked-Size": str(len(fake.content)),
                    "ETag": f'"{fake.git_sha1}"',
                    "Location": f"{hub.cdn}/blobs/{fake.sha256}",
                }
                self._send(302, headers, b"", body)
            else:
                self._send(200, {"X-Repo-Commit": commit, "ETag": f'"{fake.git_sha1}"'}, fake.content, body)

        def _error(self, status: int, code: str, message: str, body: bool, extra: dict | None = None) -> None:
            headers = {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"}
            headers.update(extra or {})
            self._send(status, headers, json.dumps({"error": message}).encode(), body)

        def _send(self, status: int, headers: dict[str, str], content: bytes, body: bool) -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            if body and content:
                self.wfile.write(content)

    return Handler


def _start(hub: FakeHub, role: str) -> tuple[ThreadingHTTPServer, threading.Thread]:
    """Serve ``role`` ("hub" or "cdn") for ``hub`` on a free 127.0.0.1 port, in a daemon thread."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub, role))
    thread = threading.Thread(target=server.serve_forever, name=f"fake-{role}", daemon=True)
    thread.start()
    return server, thread


@contextmanager
def start_hub(
    files: Mapping[str, FakeFile],
    *,
    repo_id: str = HF_REPO_ID,
    commit: str = HF_REVISION,
    refs: Mapping[str, str] | None = None,
) -> Iterator[FakeHub]:
    """Run the hub + CDN servers serving ``files`` (repo path -> :class:`FakeFile`) of ``repo_id``.

    ``commit`` is the commit every revision resolves to; ``refs`` maps branch names to it (default
    ``{"main": commit}``). Yields the :class:`FakeHub` with ``endpoint`` (use as ``HF_ENDPOINT`` /
    ``endpoint=``) and ``cdn`` set; the servers are shut down on exit. ``hub.files`` may be edited
    while running.
    """
    hub = FakeHub(
        repo_id=repo_id,
        commit=commit,
        refs=dict(refs) if refs is not None else {"main": commit},
        files=dict(files),
    )
    servers = [_start(hub, "hub")]
    try:
        servers.append(_start(hub, "cdn"))
        hub.endpoint = f"http://127.0.0.1:{servers[0][0].server_address[1]}"
        hub.cdn = f"http://127.0.0.1:{servers[1][0].server_address[1]}"
        yield hub
    finally:
        for server, thread in servers:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)


# Settings that would stop huggingface_hub from using the stand-in (offline mode, a real token, a
# different endpoint, proxies) or that point its caches somewhere other than the chosen HF_HOME.
_HF_UNSET = (
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_TOKEN",
    "HF_TOKEN_PATH",
    "HUGGING_FACE_HUB_TOKEN",
    "HF_ENDPOINT",
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "HF_ASSETS_CACHE",
    "HF_XET_CACHE",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
)


def _no_proxy(current: str | None) -> str:
    hosts = [h for h in (current or "").split(",") if h.strip()]
    return ",".join([*hosts, *(h for h in ("127.0.0.1", "localhost") if h not in hosts)])


def hub_env(hub: FakeHub, hf_home: str | os.PathLike[str], base: Mapping[str, str] | None = None) -> dict[str, str]:
    """A complete environment for a *subprocess* that should download from ``hub``.

    Starts from ``base`` (default: ``os.environ``), removes whatever would get in the way
    (``HF_HUB_OFFLINE``, tokens, proxies, cache overrides, ... in upper and lower case) and sets
    huggingface_hub's standard variables: ``HF_ENDPOINT`` = ``hub.endpoint``, ``HF_HOME`` = ``hf_home``
    (the Hub cache becomes ``<hf_home>/hub``), ``HF_HUB_DISABLE_TELEMETRY``, progress bars off, and
    ``NO_PROXY`` covering 127.0.0.1 / localhost. Pass it as ``subprocess.run(..., env=hub_env(...))``.
    """
    env = dict(os.environ if base is None else base)
    for name in _HF_UNSET:
        env.pop(name, None)
        env.pop(name.lower(), None)
    no_proxy = _no_proxy(env.pop("NO_PROXY", None) or env.pop("no_proxy", None))
    env.pop("no_proxy", None)
    env.update(
        {
            "HF_ENDPOINT": hub.endpoint,
            "HF_HOME": str(hf_home),
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "NO_PROXY": no_proxy,
            "no_proxy": no_proxy,
        }
    )
    return env


def isolate_hf_env(monkeypatch: pytest.MonkeyPatch, hf_home: str | os.PathLike[str]) -> None:
    """In this process: online mode, no token, no endpoint override, every huggingface_hub cache under ``hf_home``.

    Sets the environment variables *and* patches ``huggingface_hub.constants`` (read once at import time).
    """
    import huggingface_hub.constants as hf_constants

    hf_home = Path(hf_home)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HF_ENDPOINT", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_PROGRESS_BARS", True, raising=False)
