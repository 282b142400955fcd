"""Tests for nvseg_ray.weights and the ``nvseg weights`` subcommand.

The real Hugging Face Hub is never contacted: ``tests/hub_standin.py`` serves the Hub's ``/resolve/``
layout (302 to a CDN origin for LFS files, X-Repo-Commit / X-Linked-Etag / X-Linked-Size, typed 404s)
on 127.0.0.1 and records every request, so tests can assert that a cached run makes none.
S3 destinations use the shared moto fixtures (``s3_env`` / ``s3_bucket``) from ``tests/conftest.py``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import huggingface_hub.constants as hf_constants
import pytest

from nvseg_ray import weights
from nvseg_ray.commands import weights as weights_cmd
from nvseg_ray.errors import ConfigError, StorageError, WeightsDownloadError
from nvseg_ray.weights import HF_FILENAME, HF_REPO_ID, HF_REVISION, download_weights

from .hub_standin import FakeFile, FakeHub, hub_env, isolate_hf_env, start_hub

CONFIG_FILE = "config.json"  # a regular (non-LFS) file
CORRUPT_FILE = "vista3d_pretrained_model/corrupt.pt"  # LFS file whose CDN bytes do not match its sha256


@pytest.fixture(scope="module")
def hub() -> Iterator[FakeHub]:
    """The Hub stand-in (hub + CDN servers), with a few KB of random 'weights', a non-LFS and a corrupt file."""
    rng = random.Random(1234)
    files = {
        HF_FILENAME: FakeFile(rng.randbytes(48 * 1024)),
        CONFIG_FILE: FakeFile(b'{"model": "vista3d"}\n', lfs=False),
        CORRUPT_FILE: FakeFile(rng.randbytes(4096), advertised_sha256=hashlib.sha256(b"other").hexdigest()),
    }
    with start_hub(files) as fake:
        yield fake


@pytest.fixture(autouse=True)
def hf_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Online mode, no token, and every huggingface_hub default cache under tmp_path."""
    isolate_hf_env(monkeypatch, tmp_path / "hf-home")


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


def test_download_to_s3(
    hub: FakeHub,
    fetch: Callable[..., weights.WeightsRecord],
    s3_env: dict[str, Any],
    s3_bucket: str,
) -> None:
    import s3fs

    bucket, options = s3_bucket, s3_env
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


def test_cli_subprocess_honours_hf_endpoint(hf_hub: FakeHub, tmp_path: Path) -> None:
    """``python -m nvseg_ray weights download`` in a child process finds the stand-in through HF_ENDPOINT alone."""
    hf_hub.clear()
    dest = tmp_path / "models" / "model.pt"
    env = hub_env(hf_hub, tmp_path / "hf-home")
    assert env["HF_ENDPOINT"] == hf_hub.endpoint and "HF_HUB_OFFLINE" not in env

    def nvseg(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "nvseg_ray", *argv],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )

    download = nvseg("weights", "download", "--dest", str(dest))
    assert download.returncode == 0, download.stderr
    assert dest.read_bytes() == hf_hub.files[HF_FILENAME].content
    assert "downloaded" in download.stdout
    assert ("cdn", "GET", f"/blobs/{hf_hub.files[HF_FILENAME].sha256}") in hf_hub.requests  # the env var was used

    verify = nvseg("weights", "verify", str(dest))
    assert verify.returncode == 0, verify.stderr
    assert hf_hub.files[HF_FILENAME].sha256 in verify.stdout
