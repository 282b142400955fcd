"""nvseg_ray.io: NIfTI/JSON I/O over local paths, file:// and s3:// (moto), atomic writes, URI helpers."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from fsspec.implementations.local import LocalFileSystem

from nvseg_ray import io as nio
from nvseg_ray.errors import ConfigError, InputError, StorageError

from .helpers import make_nifti, nifti_bytes


def _assert_same_image(a: nib.Nifti1Image, b: nib.Nifti1Image) -> None:
    assert type(a) is type(b)
    assert a.shape == b.shape
    assert a.get_data_dtype() == b.get_data_dtype()
    np.testing.assert_array_equal(a.affine, b.affine)
    np.testing.assert_array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj))
    for field in ("qform_code", "sform_code", "pixdim", "srow_x", "srow_y", "srow_z"):
        np.testing.assert_array_equal(a.header[field], b.header[field])


# --------------------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------------------


def _local(tmp_path: Path, request: pytest.FixtureRequest, name: str) -> tuple[str, dict[str, Any] | None]:
    return str(tmp_path / "sub" / name), None


def _file_url(tmp_path: Path, request: pytest.FixtureRequest, name: str) -> tuple[str, dict[str, Any] | None]:
    return (tmp_path / name).as_uri(), None


def _s3_env_only(tmp_path: Path, request: pytest.FixtureRequest, name: str) -> tuple[str, dict[str, Any] | None]:
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/in/{name}", None  # endpoint + credentials from AWS_* env vars only


def _s3_options(tmp_path: Path, request: pytest.FixtureRequest, name: str) -> tuple[str, dict[str, Any] | None]:
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/in/{name}", request.getfixturevalue("s3_env")


LOCATIONS = {"local": _local, "file_url": _file_url, "s3_env": _s3_env_only, "s3_options": _s3_options}


@pytest.mark.parametrize("name", ["scan.nii", "scan.nii.gz"])
@pytest.mark.parametrize("location", list(LOCATIONS))
def test_nifti_roundtrip(location: str, name: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    # unscaled data: nibabel re-derives scl_slope/inter when it writes a scaled proxy (values within one step)
    img = make_nifti((12, 10, 8), dtype=np.int16)
    uri, options = LOCATIONS[location](tmp_path, request, name)

    nio.write_nifti(img, uri, options)
    assert nio.exists(uri, options)
    raw = nio.read_bytes(uri, options)
    assert (raw[:2] == nio.GZIP_MAGIC) == name.endswith(".gz")
    back = nio.read_nifti(uri, options)

    _assert_same_image(img, back)


def test_nifti2_roundtrip(tmp_path: Path) -> None:
    img = make_nifti((6, 5, 4), nifti2=True)
    uri = str(tmp_path / "n2.nii.gz")
    nio.write_nifti(img, uri)
    back = nio.read_nifti(uri)
    assert isinstance(back, nib.Nifti2Image)
    _assert_same_image(img, back)


@pytest.mark.parametrize("use_isal", [True, False], ids=["isal", "stdlib"])
@pytest.mark.parametrize(
    "compress",
    [
        lambda raw: raw,
        lambda raw: gzip.compress(raw, compresslevel=9),
        lambda raw: gzip.compress(raw, compresslevel=1, mtime=0),
        lambda raw: gzip.compress(raw[:200]) + gzip.compress(raw[200:]),  # multi-member gzip
    ],
    ids=["plain", "gzip9", "gzip1", "multi_member"],
)
def test_gzip_and_plain_decode_identically(compress: Any, use_isal: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not use_isal:
        monkeypatch.setattr(nio, "_igzip", None)
    img = make_nifti((9, 8, 7), dtype=np.uint8)
    plain = nifti_bytes(img)
    decoded = nio.decode_nifti(compress(plain), uri="mem://x.nii.gz")
    _assert_same_image(img, decoded)
    assert nib.is_proxy(decoded.dataobj)  # lazily readable


@pytest.mark.parametrize("use_isal", [True, False], ids=["isal", "stdlib"])
@pytest.mark.parametrize("level", [0, 1, 3, 6, 9])
def test_encode_nifti_is_gzip_and_deterministic(level: int, use_isal: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not use_isal:
        monkeypatch.setattr(nio, "_igzip", None)
    img = make_nifti((9, 8, 7))
    first = nio.encode_nifti(img, compresslevel=level)
    assert first[:2] == nio.GZIP_MAGIC
    assert first == nio.encode_nifti(img, compresslevel=level)
    assert gzip.decompress(first) == img.to_bytes()


@pytest.mark.parametrize("level", [-1, 10])
def test_encode_nifti_rejects_bad_level(level: int) -> None:
    with pytest.raises(ConfigError, match="compression level"):
        nio.encode_nifti(make_nifti((4, 4, 4)), compresslevel=level)


def test_write_nifti_requires_nifti_suffix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\.nii\.gz or \.nii"):
        nio.write_nifti(make_nifti((4, 4, 4)), str(tmp_path / "seg.mha"))


@pytest.mark.parametrize("location", ["local", "s3_env"])
def test_write_json_roundtrip(location: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    uri, options = LOCATIONS[location](tmp_path, request, "manifest.json")
    obj = {"labels": [1, 2], "spacing": np.array([0.8, 0.8, 2.5]), "n": np.int64(7), "path": Path("/x"), "µ": "ok"}
    nio.write_json(obj, uri, options)
    text = nio.read_bytes(uri, options).decode("utf-8")
    assert text.endswith("\n") and text.startswith('{\n  "labels"')
    assert json.loads(text) == {"labels": [1, 2], "spacing": [0.8, 0.8, 2.5], "n": 7, "path": "/x", "µ": "ok"}


# --------------------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------------------


def test_atomic_write_creates_parents_and_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "out.bin"
    nio.write_bytes_atomic(b"first", str(target))
    nio.write_bytes_atomic(b"second", str(target))
    assert target.read_bytes() == b"second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.bin"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # like a plain open(), not mkstemp's 0600


@pytest.mark.parametrize("stage", ["encode", "write", "rename"])
def test_failed_write_keeps_existing_file(stage: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "seg.nii.gz"
    old = make_nifti((6, 6, 6))
    nio.write_nifti(old, str(target))
    before = target.read_bytes()

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise OSError(28, "No space left on device")

    if stage == "encode":
        monkeypatch.setattr(nio, "encode_nifti", boom)
        expected: type[Exception] = OSError
    elif stage == "write":
        monkeypatch.setattr(os, "fsync", boom)  # fails after the temp file has been (partly) written
        expected = StorageError
    else:
        monkeypatch.setattr(os, "replace", boom)
        expected = StorageError
    with pytest.raises(expected) as info:
        nio.write_nifti(make_nifti((7, 7, 7)), str(target))

    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["seg.nii.gz"]
    if expected is StorageError:
        assert str(target) in info.value.message and "No space left" in info.value.message


def test_write_to_missing_bucket_is_storage_error(s3_env: dict[str, Any]) -> None:
    with pytest.raises(StorageError) as info:
        nio.write_bytes_atomic(b"x", "s3://nvseg-no-such-bucket/out.json", s3_env)
    assert info.value.details["uri"] == "s3://nvseg-no-such-bucket/out.json"


# --------------------------------------------------------------------------------------------------------
# Read errors
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["local", "s3_key", "s3_bucket"])
def test_missing_file_is_storage_error(where: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if where == "local":
        uri = str(tmp_path / "nope.nii.gz")
    elif where == "s3_key":
        uri = f"s3://{request.getfixturevalue('s3_bucket')}/nope.nii.gz"
    else:
        request.getfixturevalue("s3_env")
        uri = "s3://nvseg-no-such-bucket/nope.nii.gz"
    with pytest.raises(StorageError) as info:
        nio.read_nifti(uri)
    err = info.value
    assert err.details["reason"] == nio.REASON_NOT_FOUND
    assert err.details["uri"] == uri and uri in err.message and err.hint
    assert err.to_dict()["code"] == "storage_error"
    assert not nio.exists(uri)


def test_directory_is_storage_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError) as info:
        nio.read_bytes(str(tmp_path))
    assert info.value.details["reason"] in {nio.REASON_IS_A_DIRECTORY, nio.REASON_IO_ERROR}


def _gz(img_bytes: bytes) -> bytes:
    return gzip.compress(img_bytes, compresslevel=1, mtime=0)


_VALID = nifti_bytes(make_nifti((10, 9, 8), dtype=np.int16))


def _pair_header() -> bytes:
    raw = bytearray(_VALID)
    raw[344:348] = b"ni1\x00"
    return bytes(raw)


BAD_BYTES = [
    ("truncated_gz", _gz(_VALID)[:-40], nio.CODE_TRUNCATED_FILE),
    ("gz_header_only", _gz(_VALID)[:10], nio.CODE_TRUNCATED_FILE),
    ("corrupt_gz", _gz(_VALID)[:20] + bytes(64) + _gz(_VALID)[84:], nio.CODE_TRUNCATED_FILE),
    ("truncated_data", _VALID[:-100], nio.CODE_TRUNCATED_FILE),
    ("truncated_data_gz", _gz(_VALID[:-100]), nio.CODE_TRUNCATED_FILE),
    ("truncated_header", _VALID[:200], nio.CODE_TRUNCATED_FILE),
    ("random_bytes", np.random.default_rng(1).bytes(4096), nio.CODE_UNREADABLE_FILE),
    ("gzipped_random", _gz(b"not a nifti at all" * 50), nio.CODE_UNREADABLE_FILE),
    ("empty", b"", nio.CODE_UNREADABLE_FILE),
    ("nifti_pair_header", _pair_header(), nio.CODE_UNREADABLE_FILE),
]


@pytest.mark.parametrize(("name", "raw", "code"), BAD_BYTES, ids=[c[0] for c in BAD_BYTES])
def test_bad_bytes_are_input_errors(name: str, raw: bytes, code: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.nii.gz"
    path.write_bytes(raw)
    with pytest.raises(InputError) as info:
        nio.read_nifti(str(path))
    err = info.value
    assert err.code == code
    assert str(path) in err.message and err.hint
    if code == nio.CODE_UNREADABLE_FILE:
        assert ".nii.gz" in err.hint


# --------------------------------------------------------------------------------------------------------
# Filesystems and URIs
# --------------------------------------------------------------------------------------------------------


def test_split_uri_local_and_file_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for uri in ("rel/scan.nii", (tmp_path / "rel" / "scan.nii").as_uri(), str(tmp_path / "rel" / "scan.nii")):
        fs, path = nio.split_uri(uri)
        assert isinstance(fs, LocalFileSystem)
        assert path == str(tmp_path / "rel" / "scan.nii")


@pytest.mark.parametrize(
    ("env", "options", "expected"),
    [
        ({"AWS_ENDPOINT_URL": "http://env:1"}, {}, "http://env:1"),
        ({"AWS_ENDPOINT_URL": "http://env:1", "AWS_ENDPOINT_URL_S3": "http://s3env:2"}, {}, "http://s3env:2"),
        ({"AWS_ENDPOINT_URL": "http://env:1"}, {"endpoint_url": "http://opt:3"}, "http://opt:3"),
        ({"AWS_ENDPOINT_URL": "http://env:1"}, {"client_kwargs": {"endpoint_url": "http://ck:4"}}, "http://ck:4"),
        ({"AWS_ENDPOINT_URL": "http://env:1", "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS": "true"}, {}, None),
        ({}, {}, None),
    ],
    ids=["env", "service_specific_env", "option_wins", "client_kwargs_win", "ignored", "none"],
)
def test_s3_endpoint_resolution(
    env: dict[str, str], options: dict[str, Any], expected: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    resolved = nio._s3_options(options)
    endpoint = resolved.get("endpoint_url") or resolved.get("client_kwargs", {}).get("endpoint_url")
    assert endpoint == expected


def test_s3_filesystem_uses_env_endpoint(s3_env: dict[str, Any], s3_bucket: str) -> None:
    fs, path = nio.split_uri(f"s3://{s3_bucket}/k.bin")
    assert type(fs).__name__ == "S3FileSystem" and path == f"{s3_bucket}/k.bin"
    assert fs.client_kwargs["endpoint_url"] == s3_env["endpoint_url"]


@pytest.mark.parametrize(("uri", "package"), [("gs://bucket/x.nii.gz", "gcsfs"), ("az://container/x.nii.gz", "adlfs")])
def test_missing_filesystem_package_is_storage_error(uri: str, package: str) -> None:
    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed")
    with pytest.raises(StorageError) as info:
        nio.read_bytes(uri)
    assert info.value.details["reason"] == nio.REASON_MISSING_PACKAGE
    assert package in info.value.message and "pip install" in info.value.hint


def test_unknown_scheme_is_storage_error() -> None:
    with pytest.raises(StorageError) as info:
        nio.read_bytes("nosuchscheme://x/y.nii")
    assert info.value.details["reason"] == nio.REASON_UNSUPPORTED_SCHEME


@pytest.mark.parametrize(
    ("uri", "stem"),
    [
        ("a/b/scan.nii.gz", "scan"),
        ("scan.nii", "scan"),
        ("/data/CT_01.NII.GZ", "CT_01"),
        ("s3://bucket/p/q/case.001.nii.gz", "case.001"),
        ("file:///tmp/x/y.Nii", "y"),
        ("s3://bucket/dir/", "dir"),
        ("scan.mha", "scan"),
        ("noext", "noext"),
        (".nii.gz", ".nii.gz"),
        ("https://host/v/scan.nii.gz?X-Amz-Signature=abc", "scan"),
        (Path("/a/b/vol.nii.gz"), "vol"),
    ],
)
def test_uri_stem(uri: str, stem: str) -> None:
    assert nio.uri_stem(uri) == stem


@pytest.mark.parametrize(
    ("base", "parts", "expected"),
    [
        ("s3://bucket/out", ("case1", "seg.nii.gz"), "s3://bucket/out/case1/seg.nii.gz"),
        ("s3://bucket/out/", ("/case1/", "seg.nii.gz"), "s3://bucket/out/case1/seg.nii.gz"),
        ("s3://bucket", ("seg.nii.gz",), "s3://bucket/seg.nii.gz"),
        ("s3://bucket/", ("seg.nii.gz",), "s3://bucket/seg.nii.gz"),
        ("file:///tmp/out", ("a.json",), "file:///tmp/out/a.json"),
        ("/data/out", ("case1", "a.json"), os.path.join("/data/out", "case1", "a.json")),
        ("relative", ("/abs-looking",), os.path.join("relative", "abs-looking")),
        ("/data/out", ("", "a.json"), os.path.join("/data/out", "a.json")),
        ("s3://bucket/out", (), "s3://bucket/out"),
    ],
)
def test_join_uri(base: str, parts: tuple[str, ...], expected: str) -> None:
    assert nio.join_uri(base, *parts) == expected


def test_join_uri_output_is_writable(tmp_path: Path, s3_env: dict[str, Any], s3_bucket: str) -> None:
    for base in (str(tmp_path), f"s3://{s3_bucket}/runs"):
        uri = nio.join_uri(base, "case1", "out.json")
        nio.write_json({"ok": True}, uri)
        assert nio.exists(uri) and json.loads(nio.read_bytes(uri)) == {"ok": True}
