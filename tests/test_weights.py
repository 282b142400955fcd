"""Tests for nvseg_ray.weights and the ``nvseg weights`` subcommand.

The real Hugging Face Hub is never contacted. A local stand-in serves the Hub's ``/resolve/`` layout
on 127.0.0.1 the way huggingface_hub (2.x) expects it:

* ``HEAD|GET /{repo_id}/resolve/{revision}/{filename}`` on the "hub" server:
  - LFS files answer ``302`` to a second ("CDN") server, carrying ``X-Repo-Commit``,
    ``X-Linked-Etag`` (the content's sha256, quoted), ``X-Linked-Size`` and ``Location``. The CDN is
    a different origin (another port), so huggingface_hub stops at the 302 and reads the metadata
    there, exactly as with the real Hub's CDN.
  - regular (non-LFS) files answer ``200`` with ``ETag`` = the git blob sha1 and ``X-Repo-Commit``.
  - unknown revision / file / repo: ``404`` with ``X-Error-Code`` RevisionNotFound / EntryNotFound /
    RepoNotFound (what huggingface_hub maps to its typed errors).
* ``HEAD|GET /blobs/{sha256}`` on the "CDN" server: the bytes.

Every request is recorded, so tests can assert that a cached run makes none.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import huggingface_hub.constants as hf_constants
import pytest

from nvseg_ray import weights
from nvseg_ray.commands import weights as weights_cmd
from nvseg_ray.errors import ConfigError, StorageError, WeightsDownloadError
from nvseg_ray.weights import HF_FILENAME, HF_REPO_ID, HF_REVISION, download_weights

CONFIG_FILE = "config.json"  # a regular (non-LFS) file
CORRUPT_FILE = "vista3d_pretrained_model/corrupt.pt"  # LFS file whose CDN bytes do not match its sha256


# --------------------------------------------------------------------------------------------- #
# Hub stand-in
# --------------------------------------------------------------------------------------------- #


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
    """State shared by the hub and CDN servers."""

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
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub, role))
    thread = threading.Thread(target=server.serve_forever, name=f"fake-{role}", daemon=True)
    thread.start()
    return server, thread


@pytest.fixture(scope="module")
def hub() -> Iterator[FakeHub]:
    """The Hub stand-in (hub + CDN servers), with a few KB of random 'weights'."""
    rng = random.Random(1234)
    fake = FakeHub()
    fake.files[HF_FILENAME] = FakeFile(rng.randbytes(48 * 1024))
    fake.files[CONFIG_FILE] = FakeFile(b'{"model": "vista3d"}\n', lfs=False)
    fake.files[CORRUPT_FILE] = FakeFile(rng.randbytes(4096), advertised_sha256=hashlib.sha256(b"other").hexdigest())
    servers = [_start(fake, "hub"), _start(fake, "cdn")]
    fake.endpoint = f"http://127.0.0.1:{servers[0][0].server_address[1]}"
    fake.cdn = f"http://127.0.0.1:{servers[1][0].server_address[1]}"
    yield fake
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture(autouse=True)
def hf_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Online mode, no token, and every huggingface_hub default cache under tmp_path."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HF_ENDPOINT", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    # constants are read once at import time: patch them too.
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_PROGRESS_BARS", True, raising=False)


@pytest.fixture
def fetch(hub: FakeHub) -> Callable[..., weights.WeightsRecord]:
    """``download_weights`` pointed at the stand-in; the request log starts empty."""
    hub.clear()

    def _fetch(dest: str | Path, **kwargs: object) -> weights.WeightsRecord:
        kwargs.setdefault("endpoint", hub.endpoint)
        return download_weights(str(dest), **kwargs)  # type: ignore[arg-type]

    return _fetch


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------------- #
# local destination
# --------------------------------------------------------------------------------------------- #


def test_download_to_local_path(hub: FakeHub, fetch: Callable[..., weights.WeightsRecord], tmp_path: Path) -> None:
    content = hub.files[HF_FILENAME].content
    dest = tmp_path / "models" / "model.pt"  # parent does not exist yet

    record = fetch(dest)

    assert dest.read_bytes() == content
    assert record.sha256 == _sha(content) == weights.sha256_file(dest)
    assert record.size == len(content)
    assert record.cached is False
    assert record.commit_hash == HF_REVISION
    assert record.source_url == f"{hub.endpoint}/{HF_REPO_ID}/resolve/{HF_REVISION}/{HF_FILENAME}"
    assert "hub-lfs-sha256" in record.verified_against
    sidecar = json.loads((tmp_path / "models" / "model.pt.json").read_text())
    assert sidecar["repo_id"] == HF_REPO_ID
    assert sidecar["revision"] == HF_REVISION
    assert sidecar["filename"] == HF_FILENAME
    assert sidecar["sha256"] == _sha(content)
    assert sidecar["size"] == len(content)
    assert sidecar["source_url"] == record.source_url
    assert datetime.fromisoformat(sidecar["downloaded_at"]).utcoffset() == timedelta(0)
    # only the weights and the sidecar are left; nothing leaked into the default HF cache
    assert sorted(p.name for p in dest.parent.iterdir()) == ["model.pt", "model.pt.json"]
    assert not list((tmp_path / "hf-home").glob("**/models--*"))
    assert ("cdn", "GET", f"/blobs/{_sha(content)}") in hub.requests
    assert weights.read_provenance(str(dest)) == weights.WeightsRecord(**{**sidecar, "cached": True, "dest": str(dest)})


def test_rerun_is_cached_and_offline(hub: FakeHub, fetch: Callable[..., weights.WeightsRecord], tmp_path: Path) -> None:
    dest = tmp_path / "model.pt"
    first = fetch(dest)
    hub.clear()

    again = fetch(dest)

    assert hub.requests == []
    assert again.cached is True
    assert again.sha256 == first.sha256
    assert again.downloaded_at == first.downloaded_at


def test_branch_revision_is_resolved_and_cache_matches_commit(
    hub: FakeHub, fetch: Callable[..., weights.WeightsRecord], tmp_path: Path
) -> None:
    dest = tmp_path / "model.pt"
    record = fetch(dest, revision="main")
    assert (record.revision, record.commit_hash) == ("main", HF_REVISION)
    assert HF_REVISION in record.source_url
    hub.clear()
    assert fetch(dest, revision=HF_REVISION).cached is True  # the pinned commit is what "main" resolved to
    assert hub.requests == []


def test_overwrite_redownloads_and_repairs(
    hub: FakeHub, fetch: Callable[..., weights.WeightsRecord], tmp_path: Path
) -> None:
    dest = tmp_path / "model.pt"
    fetch(dest)
    dest.write_bytes(b"corrupted")
    hub.clear()

    with pytest.raises(WeightsDownloadError) as excinfo:
        fetch(dest)
    assert "--overwrite" in str(excinfo.value)
    assert hub.requests == []

    record = fetch(dest, overwrite=True)
    assert record.cached is False
    assert any(role == "cdn" and method == "GET" for role, method, _ in hub.requests)
    assert dest.read_bytes() == hub.files[HF_FILENAME].content


def test_existing_file_without_sidecar_is_refused(fetch: Callable[..., weights.WeightsRecord], tmp_path: Path) -> None:
    dest = tmp_path / "model.pt"
    dest.write_bytes(b"some other checkpoint")
    with pytest.raises(WeightsDownloadError, match="no provenance sidecar") as excinfo:
        fetch(dest)
    assert "--overwrite" in str(excinfo.value)
    assert dest.read_bytes() == b"some other checkpoint"


def test_existing_file_with_other_revision_is_refused(
    fetch: Callable[..., weights.WeightsRecord], tmp_path: Path
) -> None:
    dest = tmp_path / "model.pt"
    fetch(dest)
    with pytest.raises(WeightsDownloadError, match="disagrees"):
        fetch(dest, revision="f" * 40)


# --------------------------------------------------------------------------------------------- #
# verification failures leave no destination behind
# --------------------------------------------------------------------------------------------- #


def _assert_nothing_written(dest: Path) -> None:
    assert not dest.exists()
    assert not Path(f"{dest}.json").exists()
    assert [p.name for p in dest.parent.iterdir()] == []  # no staging / temp leftovers


def test_wrong_expected_sha256_fails_before_download(
    hub: FakeHub, fetch: Callable[..., weights.WeightsRecord], tmp_path: Path
) -> None:
    dest = tmp_path / "out" / "model.pt"
    dest.parent.mkdir()
    wrong = "0" * 64

    with pytest.raises(WeightsDownloadError) as excinfo:
        fetch(dest, expected_sha256=wrong)

    message = str(excinfo.value)
    assert wrong in message and hub.files[HF_FILENAME].sha256 in message
    _assert_nothing_written(dest)
    assert not any(role == "cdn" for role, _, _ in hub.requests)  # the Hub's LFS sha256 disagreed first


def test_wrong_expected_sha256_on_non_lfs_file(
    hub: FakeHub, fetch: Callable[..., weights.WeightsRecord], tmp_path: Path
) -> None:
    dest = tmp_path / "out" / "config.json"
    dest.parent.mkdir()
    with pytest.raises(WeightsDownloadError, match="sha256 mismatch") as excinfo:
        fetch(dest, filename=CONFIG_FILE, expected_sha256="a" * 64)
    assert _sha(hub.files[CONFIG_FILE].content) in str(excinfo.value)
    _assert_nothing_written(dest)
    # without an expectation the non-LFS file downloads, but there is no Hub digest to check against
    record = fetch(dest, filename=CONFIG_FILE)
    assert record.verified_against == []
    assert dest.read_bytes() == hub.files[CONFIG_FILE].content


def test_content_not_matching_hub_lfs_sha256(
    hub: FakeHub, fetch: Callable[..., weights.WeightsRecord], tmp_path: Path
) -> None:
    dest = tmp_path / "out" / "model.pt"
    dest.parent.mkdir()
    fake = hub.files[CORRUPT_FILE]
    with pytest.raises(WeightsDownloadError, match="hub-lfs-sha256") as excinfo:
        fetch(dest, filename=CORRUPT_FILE)
    assert fake.sha256 in str(excinfo.value) and _sha(fake.content) in str(excinfo.value)
    _assert_nothing_written(dest)


def test_known_sha256_table_is_enforced(
    monkeypatch: pytest.MonkeyPatch, fetch: Callable[..., weights.WeightsRecord], tmp_path: Path
) -> None:
    monkeypatch.setitem(weights.KNOWN_SHA256, HF_REVISION, "f" * 64)
    dest = tmp_path / "out" / "model.pt"
    dest.parent.mkdir()
    with pytest.raises(WeightsDownloadError, match="KNOWN_SHA256"):
        fetch(dest)
    _assert_nothing_written(dest)


# --------------------------------------------------------------------------------------------- #
# readable errors
# --------------------------------------------------------------------------------------------- #


def test_unknown_revision_is_readable(fetch: Callable[..., weights.WeightsRecord], tmp_path: Path) -> None:
    unknown = "0123456789abcdef0123456789abcdef01234567"
    with pytest.raises(WeightsDownloadError) as excinfo:
        fetch(tmp_path / "model.pt", revision=unknown)
    text = str(excinfo.value)
    assert text.startswith("[weights_download_failed] revision ")
    assert unknown in text and "not found" in text and "hint:" in text
    assert "Traceback" not in text and len(text.splitlines()) == 2
    assert not (tmp_path / "model.pt").exists()


def test_unknown_file_is_readable(fetch: Callable[..., weights.WeightsRecord], tmp_path: Path) -> None:
    with pytest.raises(WeightsDownloadError, match=r"file 'nope\.pt' not found"):
        fetch(tmp_path / "model.pt", filename="nope.pt")


def test_unreachable_endpoint_is_readable(fetch: Callable[..., weights.WeightsRecord], tmp_path: Path) -> None:
    with pytest.raises(WeightsDownloadError, match=re.escape("could not reach http://127.0.0.1:9")):
        fetch(tmp_path / "model.pt", endpoint="http://127.0.0.1:9")


def test_offline_mode_is_honoured(
    hub: FakeHub, monkeypatch: pytest.MonkeyPatch, fetch: Callable[..., weights.WeightsRecord], tmp_path: Path
) -> None:
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsDownloadError, match="offline mode") as excinfo:
        fetch(tmp_path / "model.pt")
    assert "HF_HUB_OFFLINE" in str(excinfo.value)
    assert hub.requests == []


def test_missing_huggingface_hub(
    hub: FakeHub, monkeypatch: pytest.MonkeyPatch, fetch: Callable[..., weights.WeightsRecord], tmp_path: Path
) -> None:
    cached = tmp_path / "cached.pt"
    fetch(cached)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)

    with pytest.raises(WeightsDownloadError) as excinfo:
        fetch(tmp_path / "model.pt")
    assert "pip install 'nvseg-ray[hub]'" in str(excinfo.value)
    assert fetch(cached).cached is True  # already-present weights need no hub library


def test_bad_options_are_config_errors(fetch: Callable[..., weights.WeightsRecord], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="64 hexadecimal"):
        fetch(tmp_path / "model.pt", expected_sha256="abc")
    with pytest.raises(ConfigError):
        fetch(tmp_path / "model.pt", revision="")
    with pytest.raises(ConfigError):
        fetch("")
    with pytest.raises(ConfigError, match="is a directory"):
        fetch(tmp_path)
    with pytest.raises(ConfigError, match="owner/name"):
        fetch(tmp_path / "model.pt", repo_id="no-slash")


def test_sha256_file_and_read_provenance(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    data = random.Random(7).randbytes(weights.CHUNK_SIZE + 123)  # more than one chunk
    path.write_bytes(data)
    assert weights.sha256_file(path) == _sha(data)
    assert weights.sha256_file(f"file://{path}") == _sha(data)
    assert weights.read_provenance(str(path)) is None
    with pytest.raises(StorageError, match="not found"):
        weights.sha256_file(tmp_path / "missing.bin")


# --------------------------------------------------------------------------------------------- #
# remote destinations
# --------------------------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    """An S3 stand-in (moto server) on 127.0.0.1."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def test_download_to_s3(
    hub: FakeHub,
    fetch: Callable[..., weights.WeightsRecord],
    moto_endpoint: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import boto3
    import s3fs

    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    bucket = f"weights-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    options = {"client_kwargs": {"endpoint_url": moto_endpoint}, "key": "testing", "secret": "testing"}
    dest = f"s3://{bucket}/models/model.pt"
    content = hub.files[HF_FILENAME].content

    record = fetch(dest, storage_options=options)

    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    assert fs.cat_file(f"{bucket}/models/model.pt") == content
    assert json.loads(fs.cat_file(f"{bucket}/models/model.pt.json"))["sha256"] == _sha(content) == record.sha256
    assert sorted(fs.ls(f"{bucket}/models")) == [f"{bucket}/models/model.pt", f"{bucket}/models/model.pt.json"]
    assert weights.sha256_file(dest, storage_options=options) == record.sha256
    assert weights.verify_weights(dest, storage_options=options).sha256 == record.sha256
    hub.clear()
    assert fetch(dest, storage_options=options).cached is True
    assert hub.requests == []


def test_download_to_fsspec_without_atomic_put(fetch: Callable[..., weights.WeightsRecord], hub: FakeHub) -> None:
    """memory:// is not an object store: upload to <dest>.partial-<uuid>, then mv."""
    import fsspec

    root = f"memory://weights-{uuid.uuid4().hex}"
    record = fetch(f"{root}/models/model.pt")
    fs = fsspec.filesystem("memory")
    try:
        assert fs.cat_file(f"{root}/models/model.pt") == hub.files[HF_FILENAME].content
        names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{root}/models", detail=False))
        assert names == ["model.pt", "model.pt.json"]
        provenance = weights.read_provenance(f"{root}/models/model.pt")
        assert provenance is not None and provenance.sha256 == record.sha256
    finally:
        fs.rm(root, recursive=True)


# --------------------------------------------------------------------------------------------- #
# CLI
# --------------------------------------------------------------------------------------------- #


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="nvseg")
    weights_cmd.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_download_and_verify(
    hub: FakeHub, capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.clear()
    dest = tmp_path / "model.pt"
    digest = hub.files[HF_FILENAME].sha256

    assert _cli(["weights", "download", "--dest", str(dest), "--endpoint", hub.endpoint, "--sha256", digest]) == 0
    out = capsys.readouterr().out
    assert str(dest) in out and digest in out and HF_REVISION in out and "downloaded" in out
    assert "0.0 MB" in out  # 48 KiB

    assert _cli(["weights", "download", "--dest", str(dest), "--endpoint", hub.endpoint]) == 0
    assert "cached" in capsys.readouterr().out

    assert _cli(["weights", "verify", str(dest), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sha256"] == digest

    dest.write_bytes(b"tampered")
    with pytest.raises(WeightsDownloadError, match="does not match its provenance sidecar"):
        _cli(["weights", "verify", str(dest)])
    with pytest.raises(StorageError, match="not found"):
        _cli(["weights", "verify", str(tmp_path / "absent.pt")])


def test_cli_requires_an_action() -> None:
    with pytest.raises(SystemExit):
        _cli(["weights"])
