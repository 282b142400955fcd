"""NIfTI and JSON I/O over local paths and fsspec URIs (``s3://``, ``gs://``, ``az://``, ``file://``, ...).

Everything goes through whole-object bytes: a volume is fetched with one ``cat_file`` call, gunzipped in
memory (with ``isal`` when it is installed, ~4x faster than zlib) and parsed by nibabel from a
:class:`io.BytesIO` -- no temporary files. Writes are atomic: a local file is written to a temporary name in
the destination directory and ``os.replace``-d into place; an object-store object is uploaded with a single
``pipe_file`` call, and object stores only make an object visible once its upload has completed (a single
PUT, or the ``CompleteMultipartUpload`` of a multipart upload), so readers never see a partial object.

S3 endpoint and credentials come from ``storage_options`` (s3fs keyword arguments, e.g.
``{"key": ..., "secret": ..., "endpoint_url": ...}``) or from the standard AWS environment variables
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL[_S3]``).
botocore already honours ``AWS_ENDPOINT_URL``; :func:`split_uri` additionally passes it to s3fs explicitly
so that fsspec's filesystem-instance cache is keyed by the endpoint (two endpoints in one process never
share a cached client).

Decompression is bounded by what the header declares: the first bytes are inflated, the header's shape,
datatype and ``vox_offset`` give the file's size, and at most that many bytes (plus
:data:`TRAILING_SLACK_BYTES`) are ever inflated -- a small ``.nii.gz`` that expands into gigabytes of
trailing zeros is refused with ``trailing_data`` after inflating only the declared size, and a header that
declares more than ``max_voxels`` voxels is refused with ``too_large`` before its data is inflated.

Every failure is a :class:`~nvseg_ray.errors.StorageError` (path/permission/network problems, with a
``reason`` detail such as ``"not_found"``) or an :class:`~nvseg_ray.errors.InputError` (the bytes are not a
usable NIfTI volume; ``code`` is ``"truncated_file"``, ``"unreadable_file"``, ``"trailing_data"`` or
``"too_large"``).
"""

from __future__ import annotations

import gzip
import io
import json
import math
import os
import posixpath
import secrets
import stat
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any
from urllib.parse import urlsplit

import fsspec
import nibabel as nib
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from nvseg_ray.config import DEFAULT_MAX_VOXELS  # re-exported: the voxel budget applied before inflating
from nvseg_ray.errors import ConfigError, InputError, OutputExists, StorageError
from nvseg_ray.errors import (  # the reason sub-codes of StorageError (re-exported: io names them in errors)
    REASON_IO_ERROR,
    REASON_IS_A_DIRECTORY,
    REASON_MISSING_PACKAGE,
    REASON_NO_CREDENTIALS,
    REASON_NOT_FOUND,
    REASON_PERMISSION_DENIED,
    REASON_UNSUPPORTED_SCHEME,
)

try:  # optional accelerator: pip install "nvseg-ray[fast]"
    from isal import igzip as _igzip
    from isal import isal_zlib as _isal_zlib
except ImportError:  # pragma: no cover - exercised only where isal is missing
    _igzip = None
    _isal_zlib = None

__all__ = [
    "CODE_TOO_LARGE",
    "CODE_TRAILING_DATA",
    "CODE_TRUNCATED_FILE",
    "CODE_UNREADABLE_FILE",
    "DEFAULT_MAX_VOXELS",
    "DeclaredLayout",
    "REASON_IO_ERROR",
    "REASON_IS_A_DIRECTORY",
    "REASON_MISSING_PACKAGE",
    "REASON_NO_CREDENTIALS",
    "REASON_NOT_FOUND",
    "REASON_PERMISSION_DENIED",
    "REASON_UNSUPPORTED_SCHEME",
    "check_data_size",
    "declared_layout",
    "decode_nifti",
    "encode_nifti",
    "exists",
    "expected_nifti_nbytes",
    "join_uri",
    "read_bytes",
    "read_nifti",
    "split_uri",
    "too_large_error",
    "uri_stem",
    "write_bytes_atomic",
    "write_json",
    "write_nifti",
]

#: InputError codes raised here (the full list lives in :mod:`nvseg_ray.validation`).
CODE_TRUNCATED_FILE = "truncated_file"
CODE_UNREADABLE_FILE = "unreadable_file"
CODE_TRAILING_DATA = "trailing_data"
CODE_TOO_LARGE = "too_large"
CODE_NOT_REGULAR_FILE = "not_a_regular_file"

#: Bytes tolerated after the declared voxel data (a few writers pad files); more is ``trailing_data``.
TRAILING_SLACK_BYTES = 64 * 1024
#: Largest accepted ``vox_offset`` (the 348/540-byte header plus extensions, e.g. an embedded DICOM
#: header of a few MiB): a larger one is a corrupt header, refused before anything is inflated.
MAX_HEADER_BYTES = 64 * 2**20
#: Decompressed bytes produced per inflate call (bounds the overshoot beyond what was asked for).
_INFLATE_CHUNK = 16 * 2**20

GZIP_MAGIC = b"\x1f\x8b"
NIFTI1_HEADER_SIZE = 348
NIFTI2_HEADER_SIZE = 540
ACCEPTED_FORMATS = "single-file NIfTI-1 or NIfTI-2 volumes (.nii or .nii.gz)"
#: isal implements gzip levels 0..3 only; higher levels fall back to the stdlib.
_ISAL_MAX_LEVEL = 3

# fsspec protocol -> (package, pip command) for the optional filesystem implementations.
_FS_PACKAGES: dict[str, tuple[str, str]] = {
    "s3": ("s3fs", 'pip install "nvseg-ray[s3]"'),
    "s3a": ("s3fs", 'pip install "nvseg-ray[s3]"'),
    "gs": ("gcsfs", "pip install gcsfs"),
    "gcs": ("gcsfs", "pip install gcsfs"),
    "az": ("adlfs", "pip install adlfs"),
    "abfs": ("adlfs", "pip install adlfs"),
    "abfss": ("adlfs", "pip install adlfs"),
    "adl": ("adlfs", "pip install adlfs"),
    "http": ("aiohttp", "pip install aiohttp"),
    "https": ("aiohttp", "pip install aiohttp"),
}
_S3_PROTOCOLS = ("s3", "s3a")


# --------------------------------------------------------------------------------------------------------
# URIs and filesystems
# --------------------------------------------------------------------------------------------------------


def _protocol(uri: str) -> str:
    """Lower-case scheme of ``uri`` (``"s3"``, ``"file"``, ...); ``""`` for a plain local path."""
    if "://" not in uri:
        return ""
    return uri.split("://", 1)[0].lower()


def _is_true(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def _env_s3_endpoint() -> str | None:
    """The S3 endpoint configured through the environment, following botocore's precedence.

    ``AWS_ENDPOINT_URL_S3`` (service-specific) wins over ``AWS_ENDPOINT_URL``; both are ignored when
    ``AWS_IGNORE_CONFIGURED_ENDPOINT_URLS`` is true, exactly as botocore does.
    """
    if _is_true(os.environ.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS")):
        return None
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _s3_options(storage_options: Mapping[str, Any]) -> dict[str, Any]:
    """s3fs options with the environment's endpoint added unless the caller already chose one."""
    options = dict(storage_options)
    client_kwargs = dict(options.get("client_kwargs") or {})
    if options.get("endpoint_url") or client_kwargs.get("endpoint_url"):
        return options
    endpoint = _env_s3_endpoint()
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
        options["client_kwargs"] = client_kwargs
    return options


def _missing_package_error(uri: str, protocol: str, exc: BaseException) -> StorageError:
    package, pip_cmd = _FS_PACKAGES.get(protocol, ("an fsspec implementation", "pip install <package>"))
    return StorageError(
        f"Cannot access {uri!r}: the {protocol}:// filesystem needs the optional package {package}, "
        f"which is not installed ({exc}).",
        hint=f"Install it with `{pip_cmd}` in the environment that runs nvseg (every Ray worker too).",
        uri=uri,
        reason=REASON_MISSING_PACKAGE,
        package=package,
    )


def split_uri(
    uri: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """Resolve ``uri`` to an fsspec filesystem and the path inside it.

    Args:
        uri: a local path (relative paths are made absolute), ``file://...``, ``s3://bucket/key`` or any
            other fsspec URL.
        storage_options: keyword arguments for the filesystem constructor (for s3fs: ``key``, ``secret``,
            ``endpoint_url``, ``client_kwargs``, ...). For ``s3://`` URIs without an explicit endpoint the
            ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` environment variable is passed on as
            ``client_kwargs["endpoint_url"]``; credentials and region come from the usual AWS chain.

    Returns:
        ``(filesystem, path)``; e.g. ``(S3FileSystem, "bucket/key.nii.gz")`` or
        ``(LocalFileSystem, "/abs/path/scan.nii")``.

    Raises:
        StorageError: the scheme is unknown or its optional package (s3fs, gcsfs, adlfs) is missing.
    """
    uri = os.fspath(uri)
    protocol = _protocol(uri)
    options = dict(storage_options or {})
    if protocol in _S3_PROTOCOLS:
        options = _s3_options(options)
    try:
        return fsspec.core.url_to_fs(uri, **options)
    except ImportError as exc:
        raise _missing_package_error(uri, protocol, exc) from exc
    except ValueError as exc:
        if "protocol" in str(exc).lower():
            raise StorageError(
                f"Cannot access {uri!r}: unsupported URI scheme {protocol + '://'!r} ({exc}).",
                hint="Use a local path, file://, s3://, gs:// or az:// (any protocol known to fsspec).",
                uri=uri,
                reason=REASON_UNSUPPORTED_SCHEME,
            ) from exc
        raise


def storage_error(exc: BaseException, uri: str, action: str) -> StorageError:
    """Translate an exception from fsspec / the OS / botocore into a user-facing StorageError."""
    name = type(exc).__name__
    if isinstance(exc, FileNotFoundError):
        where = f" (resolved against the current directory {os.getcwd()!r})" if not _protocol(uri) else ""
        return StorageError(
            f"Cannot {action} {uri!r}: no such file or object{where}.",
            hint="Check the spelling of the path/URI and that it exists "
            "(for S3: `aws s3 ls <uri>`; check the bucket name and AWS_ENDPOINT_URL).",
            uri=uri,
            reason=REASON_NOT_FOUND,
        )
    if isinstance(exc, PermissionError):
        return StorageError(
            f"Cannot {action} {uri!r}: permission denied ({exc}).",
            hint="Check the file permissions, or for object storage the credentials and the bucket policy "
            "(s3:GetObject / s3:PutObject).",
            uri=uri,
            reason=REASON_PERMISSION_DENIED,
        )
    if isinstance(exc, IsADirectoryError):
        return StorageError(
            f"Cannot {action} {uri!r}: it is a directory, not a file.",
            hint="Pass the path of a single .nii/.nii.gz file.",
            uri=uri,
            reason=REASON_IS_A_DIRECTORY,
        )
    if name in {"NoCredentialsError", "PartialCredentialsError"}:
        return StorageError(
            f"Cannot {action} {uri!r}: no object-storage credentials were found ({exc}).",
            hint="Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or pass key/secret in "
            "storage_options; use anon=True for public buckets.",
            uri=uri,
            reason=REASON_NO_CREDENTIALS,
        )
    return StorageError(
        f"Cannot {action} {uri!r}: {name}: {exc}",
        hint="Check the path, network access to the storage endpoint (AWS_ENDPOINT_URL) and the credentials.",
        uri=uri,
        reason=REASON_IO_ERROR,
    )


def check_regular_file(uri: str) -> None:
    """Raise :class:`InputError` (``not_a_regular_file``) when ``uri`` is a local path (plain or ``file://``) to
    something other than a regular file or folder after following links: reading a named pipe blocks forever and a
    link to ``/dev/zero`` never ends. Only ``stat`` is called (nothing is opened); object-store URIs and
    missing files pass (the read reports those)."""
    if "://" in uri and not uri.startswith("file://"):
        return
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):  # folders: the read reports is_a_directory
        kind = ("a named pipe" if stat.S_ISFIFO(mode) else "a character device" if stat.S_ISCHR(mode) else
                "a block device" if stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else
                "not a regular file")
        via = f" (a link to {os.path.realpath(path)})" if os.path.islink(path) else ""
        raise InputError(f"{uri} is {kind}{via}, not a regular file; it was not read",
                         hint="remove it from the input folder or manifest, or copy the volume to a regular file",
                         code=CODE_NOT_REGULAR_FILE)


def read_bytes(uri: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None) -> bytes:
    """Return the whole content of a file or object.

    Raises:
        InputError: ``not_a_regular_file`` for a local named pipe, device or socket (see :func:`check_regular_file`).
        StorageError: with ``details["reason"]`` one of ``"not_found"``, ``"permission_denied"``,
            ``"is_a_directory"``, ``"no_credentials"``, ``"missing_package"``, ``"io_error"``.
    """
    uri = os.fspath(uri)
    check_regular_file(uri)  # a named pipe or a link to /dev/zero would block or never end
    fs, path = split_uri(uri, storage_options)
    try:
        return fs.cat_file(path)
    except Exception as exc:
        raise storage_error(exc, uri, "read") from exc


def exists(uri: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None) -> bool:
    """True when ``uri`` names an existing file/object (or directory/prefix).

    Raises:
        StorageError: the storage could not be asked (missing package, credentials, network).
    """
    uri = os.fspath(uri)
    fs, path = split_uri(uri, storage_options)
    try:
        return bool(fs.exists(path))
    except FileNotFoundError:
        return False
    except Exception as exc:
        raise storage_error(exc, uri, "check") from exc


_NIFTI_SUFFIXES = (".nii.gz", ".nii")
_GLOB_CHARS = set("*?[")


def list_volumes(uri: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None, *,
                 recursive: bool = False, suffixes: tuple[str, ...] = _NIFTI_SUFFIXES) -> list[str]:
    """Expand a file, directory/prefix or glob into a sorted list of volume URIs (nothing is read).

    A single file is returned as given, whatever its suffix. A directory lists the files whose name ends
    in one of ``suffixes`` (case-insensitive), directly in it or, with ``recursive``, below it. URIs keep
    their scheme (``s3://bucket/key``); local results are plain paths.

    Raises:
        StorageError: the path does not exist, or nothing matching was found.
    """
    text = os.fspath(uri)
    fs, path = split_uri(text, storage_options)
    keep_scheme = bool(_protocol(text)) and _protocol(text) != "file"

    def as_uri(found: str) -> str:
        return fs.unstrip_protocol(found) if keep_scheme else found

    try:
        if _GLOB_CHARS & set(path):
            found = [p for p in fs.glob(path) if not fs.isdir(p)]
        elif fs.isfile(path):
            return [text]
        elif fs.isdir(path):
            found = fs.find(path) if recursive else [p for p in fs.ls(path, detail=False) if not fs.isdir(p)]
        else:
            raise StorageError(f"input not found: {text}", hint="check the path or URI (and credentials for s3://)",
                               reason=REASON_NOT_FOUND)
    except StorageError:
        raise
    except Exception as exc:
        raise storage_error(exc, text, "list") from exc
    lowered = tuple(s.lower() for s in suffixes)
    volumes = sorted(as_uri(p) for p in found if p.lower().endswith(lowered))
    if not volumes:
        raise StorageError(f"no {'/'.join(suffixes)} files found in {text}",
                           hint="point at a NIfTI file, a folder of them, or a glob such as 'scans/*.nii.gz'",
                           reason=REASON_NOT_FOUND)
    return volumes


def uri_stem(uri: str | os.PathLike[str]) -> str:
    """File name of ``uri`` without directory and NIfTI extension.

    ``"a/b/scan.nii.gz"`` -> ``"scan"``, ``"s3://bkt/x/CT_01.NII.GZ"`` -> ``"CT_01"``,
    ``"scan.nii"`` -> ``"scan"``; another extension is dropped once (``"scan.mha"`` -> ``"scan"``). The
    query string of an ``http(s)://`` URL is ignored.
    """
    text = os.fspath(uri)
    if _protocol(text) in {"http", "https"}:
        text = urlsplit(text).path
    name = text.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    lower = name.lower()
    for suffix in _NIFTI_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)] or name
    stem, dot, _ext = name.rpartition(".")
    return stem if dot and stem else name


def join_uri(base: str | os.PathLike[str], *parts: str) -> str:
    """Join path components onto a local path or a URI.

    Leading/trailing slashes of ``parts`` are ignored (a part never restarts at the root, unlike
    :func:`os.path.join`) and empty parts are skipped. ``join_uri("s3://bkt/out", "case1", "seg.nii.gz")``
    -> ``"s3://bkt/out/case1/seg.nii.gz"``; ``join_uri("/data/out", "a.json")`` -> ``"/data/out/a.json"``.
    """
    base_text = os.fspath(base)
    clean = [p.strip("/") for p in parts if p and p.strip("/")]
    if not clean:
        return base_text
    if _protocol(base_text):
        scheme, rest = base_text.split("://", 1)
        joined = posixpath.join(rest, *clean) if rest.rstrip("/") else "/".join(clean)
        return f"{scheme}://{joined}"
    return os.path.join(base_text, *clean)


# --------------------------------------------------------------------------------------------------------
# NIfTI decoding
# --------------------------------------------------------------------------------------------------------


def _truncated_gzip(uri: str, nbytes: int) -> InputError:
    return InputError(
        f"{uri!r} is a truncated gzip file: it ends before the end of the compressed stream "
        f"({nbytes} bytes read).",
        code=CODE_TRUNCATED_FILE,
        hint="The file was cut short (interrupted download/copy or a full disk). Copy or export it again.",
        uri=uri,
        nbytes=nbytes,
    )


def _corrupt_gzip(uri: str, nbytes: int, exc: BaseException) -> InputError:
    return InputError(
        f"{uri!r} is a corrupt gzip file ({type(exc).__name__}: {exc}).",
        code=CODE_TRUNCATED_FILE,
        hint="The compressed data is damaged. Copy or export the file again; "
        "`gzip -t <file>` tests a local copy.",
        uri=uri,
        nbytes=nbytes,
    )


class _BoundedGunzip:
    """Incremental gunzip of every member of ``raw`` into an in-memory buffer, never inflating more than asked.

    :meth:`fill` inflates until the buffer holds ``n`` bytes or the stream ends, so the caller decides how
    much a stream may expand to *before* it has expanded (zlib's ``max_length``; isal when installed).
    Zero padding after the last member is ignored (as :func:`gzip.decompress` does); other bytes after it
    are ``trailing_data``.
    """

    def __init__(self, raw: bytes, *, uri: str) -> None:
        self._zlib = _isal_zlib if _igzip is not None and _isal_zlib is not None else zlib
        self._raw_size = len(raw)
        self._uri = uri
        self._inflater = self._zlib.decompressobj(wbits=31)  # 31: gzip wrapper, CRC-32 and size checked
        self._pending: bytes = raw
        self.buffer = io.BytesIO()
        self.size = 0
        self.ended = False

    def fill(self, n: int) -> None:
        """Inflate until :attr:`size` >= ``n`` or the stream ended (``size`` may exceed ``n`` by < 16 MiB).

        Raises:
            InputError: ``truncated_file`` (stream cut short or corrupt), ``trailing_data`` (non-gzip bytes
                after the last member).
        """
        while self.size < n and not self.ended:
            if self._inflater.eof:
                rest = self._inflater.unused_data
                if rest[:2] == GZIP_MAGIC:  # next member of a multi-member file
                    self._inflater = self._zlib.decompressobj(wbits=31)
                    self._pending = rest
                    continue
                if rest.strip(b"\x00"):
                    raise InputError(
                        f"{self._uri!r} has {len(rest)} bytes of non-gzip data after the end of its gzip stream.",
                        code=CODE_TRAILING_DATA,
                        hint="The file is damaged or two files were concatenated. Copy or export it again.",
                        uri=self._uri,
                        nbytes=self._raw_size,
                    )
                self.ended = True
                break
            before = len(self._pending)
            try:
                chunk = self._inflater.decompress(self._pending, min(n - self.size, _INFLATE_CHUNK))
            except Exception as exc:  # zlib.error / IsalError: bad deflate data, CRC or length mismatch
                raise _corrupt_gzip(self._uri, self._raw_size, exc) from exc
            self._pending = self._inflater.unconsumed_tail
            if chunk:
                self.buffer.write(chunk)
                self.size += len(chunk)
            elif not self._inflater.eof and len(self._pending) == before:
                raise _truncated_gzip(self._uri, self._raw_size)


def _unreadable(uri: str, why: str, **details: Any) -> InputError:
    return InputError(
        f"{uri!r} is not a readable NIfTI volume: {why}.",
        code=CODE_UNREADABLE_FILE,
        hint=f"nvseg reads {ACCEPTED_FORMATS}. Convert DICOM series with e.g. `dcm2niix -z y <dicom_dir>`, "
        "and other formats (.mha/.nrrd/.hdr+.img) with SimpleITK or nibabel.",
        uri=uri,
        **details,
    )


def _header_class(raw: bytes, *, uri: str) -> type[nib.Nifti1Image]:
    """Pick Nifti1Image or Nifti2Image from the (uncompressed) header bytes, or refuse the bytes."""
    if len(raw) < 4:
        raise _unreadable(uri, f"the file holds only {len(raw)} bytes")
    little, big = struct.unpack("<i", raw[:4])[0], struct.unpack(">i", raw[:4])[0]
    sizes = {little, big}
    if NIFTI1_HEADER_SIZE in sizes:
        if len(raw) < NIFTI1_HEADER_SIZE:
            raise _truncated_header(uri, len(raw), NIFTI1_HEADER_SIZE)
        magic = raw[344:348]
        if magic == b"n+1\x00":
            return nib.Nifti1Image
        if magic == b"ni1\x00":
            raise _unreadable(uri, "it is the header of a two-file NIfTI pair (.hdr/.img)")
        raise _unreadable(uri, "it has an Analyze-7.5 style header without the NIfTI magic 'n+1'")
    if NIFTI2_HEADER_SIZE in sizes:
        if len(raw) < NIFTI2_HEADER_SIZE:
            raise _truncated_header(uri, len(raw), NIFTI2_HEADER_SIZE)
        if raw[4:8] == b"n+2\x00":
            return nib.Nifti2Image
        raise _unreadable(uri, "it has a 540-byte header without the NIfTI-2 magic 'n+2'")
    raise _unreadable(uri, "the first bytes are not a NIfTI-1 (348) or NIfTI-2 (540) header")


def _truncated_header(uri: str, have: int, need: int) -> InputError:
    return InputError(
        f"{uri!r} is truncated: it holds {have} bytes, less than the {need}-byte NIfTI header.",
        code=CODE_TRUNCATED_FILE,
        hint="The file was cut short (interrupted download/copy or a full disk). Copy or export it again.",
        uri=uri,
        nbytes=have,
        expected_nbytes=need,
    )


def expected_nifti_nbytes(img: nib.Nifti1Image) -> int | None:
    """Bytes a single-file NIfTI must hold for ``img``'s header: voxel offset + voxel count * item size.

    For a loaded image the offset comes from its ``ArrayProxy`` (nibabel resets ``vox_offset`` in the
    header copy it attaches to the image). Returns ``None`` when the data type is not understood.
    """
    header = img.header
    proxy = img.dataobj
    try:
        itemsize = int(np.dtype(header.get_data_dtype()).itemsize)
    except Exception:
        return None
    offset = int(getattr(proxy, "offset", header.get_data_offset())) if nib.is_proxy(proxy) else 0
    n_voxels = int(np.prod([int(n) for n in header.get_data_shape()], dtype=np.int64))
    return offset + n_voxels * itemsize


def check_data_size(img: nib.Nifti1Image, available: int, *, uri: str) -> None:
    """Raise ``truncated_file`` when ``available`` bytes are fewer than ``img``'s header declares."""
    expected = expected_nifti_nbytes(img)
    if expected is None or available >= expected:
        return
    shape = tuple(int(n) for n in img.header.get_data_shape())
    raise InputError(
        f"{uri!r} is truncated: its header declares {shape} voxels of {img.header.get_data_dtype()} "
        f"({expected} bytes including the header) but the file holds only {available} bytes.",
        code=CODE_TRUNCATED_FILE,
        hint="The file was cut short (interrupted download/copy or a full disk). Copy or export it again.",
        uri=uri,
        nbytes=available,
        expected_nbytes=expected,
    )


def too_large_error(uri: str, what: str, shape: tuple[int, ...], n_voxels: int, max_voxels: int,
                    **details: Any) -> InputError:
    """The ``too_large`` error for ``n_voxels`` (``shape``) above ``max_voxels``; ``what`` names the grid."""
    gib = n_voxels * 4 / 2**30
    return InputError(
        f"{uri!r}: {what} has {n_voxels:,} voxels (shape {tuple(shape)}), above the limit of {max_voxels:,}.",
        code=CODE_TOO_LARGE,
        hint=f"Raise the limit with --max-voxels {n_voxels} if the machine has the memory "
        f"(~{gib:.1f} GiB for one float32 copy alone), or crop/downsample the scan.",
        uri=uri,
        n_voxels=n_voxels,
        max_voxels=max_voxels,
        shape=[int(n) for n in shape],
        **details,
    )


@dataclass(frozen=True)
class DeclaredLayout:
    """What a single-file NIfTI header declares about the bytes that follow it (read without nibabel).

    Attributes:
        header_class: ``nib.Nifti1Image`` or ``nib.Nifti2Image``.
        shape: ``dim[1 : dim[0] + 1]``, every axis (spatial and beyond).
        dtype: voxel dtype of the ``datatype`` code, in the header's byte order.
        offset: byte offset of the voxel data: ``vox_offset``, at least the header size + 4 (nibabel
            refuses smaller single-file offsets except 0).
    """

    header_class: type[nib.Nifti1Image]
    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int

    @property
    def n_voxels(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Size of a well-formed file: ``offset`` + voxels x item size."""
        return self.offset + self.n_voxels * self.dtype.itemsize


def declared_layout(header: bytes, *, uri: str) -> DeclaredLayout:
    """Parse shape, datatype and data offset from the first bytes of an uncompressed NIfTI-1/2 file.

    Args:
        header: at least the 348 (NIfTI-1) or 540 (NIfTI-2) header bytes (more is ignored).
        uri: named in error messages.

    Raises:
        InputError: ``unreadable_file`` (not a single-file NIfTI, nonsense dim/datatype/vox_offset) or
            ``truncated_file`` (fewer bytes than the header).
    """
    klass = _header_class(header, uri=uri)
    endian = "<" if struct.unpack("<i", header[:4])[0] in (NIFTI1_HEADER_SIZE, NIFTI2_HEADER_SIZE) else ">"
    if klass is nib.Nifti2Image:
        (datatype,) = struct.unpack(endian + "h", header[12:14])
        dim = struct.unpack(endian + "8q", header[16:80])
        (vox_offset,) = struct.unpack(endian + "q", header[168:176])
        min_offset = NIFTI2_HEADER_SIZE + 4
    else:
        dim = struct.unpack(endian + "8h", header[40:56])
        (datatype,) = struct.unpack(endian + "h", header[70:72])
        (vox_offset,) = struct.unpack(endian + "f", header[108:112])
        min_offset = NIFTI1_HEADER_SIZE + 4
    ndim = int(dim[0])
    if not 1 <= ndim <= 7:
        raise _unreadable(uri, f"its header declares {ndim} dimensions (dim[0] must be 1..7)")
    shape = tuple(int(n) for n in dim[1 : ndim + 1])
    if min(shape) < 0:
        raise _unreadable(uri, f"its header declares a negative size in shape {shape}")
    try:
        dtype = np.dtype(nib.nifti1.data_type_codes.dtype[int(datatype)]).newbyteorder(endian)
    except (KeyError, TypeError) as exc:
        raise _unreadable(uri, f"its header declares the unknown NIfTI datatype code {datatype}") from exc
    if not math.isfinite(vox_offset) or not 0 <= vox_offset <= MAX_HEADER_BYTES:
        raise _unreadable(uri, f"its header declares a voxel data offset (vox_offset) of {vox_offset}, outside "
                          f"0..{MAX_HEADER_BYTES}")
    return DeclaredLayout(klass, shape, dtype, max(int(vox_offset), min_offset))


def _trailing_data_error(uri: str, layout: DeclaredLayout, nbytes: int | None, compressed: int | None) -> InputError:
    more = f"at least {nbytes:,}" if nbytes is not None else "more"
    packed = f" (from {compressed:,} compressed bytes)" if compressed is not None else ""
    return InputError(
        f"{uri!r} holds {more} bytes{packed}, more than the {layout.nbytes:,} its header declares "
        f"({layout.shape} voxels of {layout.dtype.name} after a {layout.offset}-byte header): the file has "
        "trailing data after the volume.",
        code=CODE_TRAILING_DATA,
        hint="A NIfTI file holds one volume and nothing after it. Re-export the volume (e.g. with nibabel "
        "`nib.save`) or check that the right file was sent.",
        uri=uri,
        expected_nbytes=layout.nbytes,
        nbytes=nbytes,
    )


def _check_declared(layout: DeclaredLayout, *, uri: str, max_voxels: int | None) -> None:
    if max_voxels is not None and layout.n_voxels > max_voxels:
        raise too_large_error(uri, "its header declares a volume that", layout.shape, layout.n_voxels, max_voxels)


def decode_nifti(raw: bytes, *, uri: str, max_voxels: int | None = DEFAULT_MAX_VOXELS) -> nib.Nifti1Image:
    """Parse a ``.nii`` or ``.nii.gz`` byte string into a nibabel image, entirely in memory.

    Gzip is detected from the magic bytes ``1f 8b`` (not from the file name) and inflated with a bound:
    first the header, then at most the size it declares plus :data:`TRAILING_SLACK_BYTES`, so the memory
    used is that of the declared volume whatever the stream expands to. The voxel data stays on-demand:
    ``img.dataobj`` is an ``ArrayProxy`` over the in-memory bytes that applies ``scl_slope``/``scl_inter``
    when read; ``img.affine`` maps voxel indices (i, j, k) to RAS+ world mm.

    Args:
        raw: the file content, gzip-compressed or not.
        uri: where the bytes came from, used in error messages only.
        max_voxels: refuse a header declaring more voxels (all axes together) than this before inflating
            its data; ``None`` for no limit.

    Returns:
        A :class:`nibabel.Nifti1Image` (or :class:`nibabel.Nifti2Image`, a subclass) whose data size has
        been checked against the header.

    Raises:
        InputError: ``truncated_file`` (gzip stream or voxel data shorter than declared, corrupt gzip),
            ``unreadable_file`` (not a single-file NIfTI-1/2), ``trailing_data`` (more bytes than the header
            declares) or ``too_large`` (more than ``max_voxels`` voxels declared).
    """
    if raw[:2] == GZIP_MAGIC:
        stream = _BoundedGunzip(raw, uri=uri)
        stream.fill(NIFTI2_HEADER_SIZE + 4)
        layout = declared_layout(stream.buffer.getvalue()[: NIFTI2_HEADER_SIZE + 4], uri=uri)
        _check_declared(layout, uri=uri, max_voxels=max_voxels)
        limit = layout.nbytes + TRAILING_SLACK_BYTES
        stream.fill(limit + 1)
        if stream.size > limit:
            raise _trailing_data_error(uri, layout, stream.size, len(raw))
        buffer, available = stream.buffer, stream.size
        buffer.seek(0)
    else:
        layout = declared_layout(raw, uri=uri)
        _check_declared(layout, uri=uri, max_voxels=max_voxels)
        if len(raw) > layout.nbytes + TRAILING_SLACK_BYTES:
            raise _trailing_data_error(uri, layout, len(raw), None)
        buffer, available = io.BytesIO(raw), len(raw)
    try:
        img = layout.header_class.from_stream(buffer)
    except Exception as exc:  # nibabel HeaderDataError, ValueError on nonsense header fields, ...
        raise _unreadable(uri, f"nibabel cannot parse its header ({type(exc).__name__}: {exc})") from exc
    check_data_size(img, available, uri=uri)
    return img


def read_nifti(uri: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None, *,
               max_voxels: int | None = DEFAULT_MAX_VOXELS) -> nib.Nifti1Image:
    """Fetch and decode a NIfTI volume: :func:`read_bytes` then :func:`decode_nifti` (bounded inflation)."""
    uri = os.fspath(uri)
    return decode_nifti(read_bytes(uri, storage_options), uri=uri, max_voxels=max_voxels)


# --------------------------------------------------------------------------------------------------------
# Encoding and atomic writes
# --------------------------------------------------------------------------------------------------------


def _gzip(data: bytes, compresslevel: int) -> bytes:
    """Gzip ``data`` reproducibly (header mtime 0); isal for levels 0-3 when installed."""
    if not 0 <= compresslevel <= 9:
        raise ConfigError(
            f"gzip compression level must be between 0 and 9, got {compresslevel}.",
            hint="Use 1 (fast, the default) up to 9 (smallest files); 0 stores without compression.",
            compresslevel=compresslevel,
        )
    if _igzip is not None and compresslevel <= _ISAL_MAX_LEVEL:
        return _igzip.compress(data, compresslevel, mtime=0)
    return gzip.compress(data, compresslevel=compresslevel, mtime=0)


def encode_nifti(img: nib.Nifti1Image, *, compresslevel: int = 1) -> bytes:
    """Serialise ``img`` to gzip-compressed single-file NIfTI bytes (the content of a ``.nii.gz``).

    The voxel data is written in the dtype recorded in ``img.header`` (``img.to_bytes()``), e.g. uint8
    for a label map. Note that nibabel re-derives ``scl_slope``/``scl_inter`` when the data is a scaled
    proxy or float data stored as an integer dtype, so such values round-trip within one quantisation step
    only; unscaled data round-trips exactly. isal is used for levels 0-3 when installed (~4x faster).
    """
    return _gzip(img.to_bytes(), compresslevel)


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def _write_local_atomic(data: bytes, path: str, overwrite: bool = True) -> None:
    """Write ``data`` to ``path`` via a hidden temp file in the same directory and ``os.replace``.

    The temp file is created with mode 0o666 minus the umask (like a normal ``open``), fsync-ed before the
    rename, and removed if anything fails, so ``path`` holds either its old content or all of ``data``.
    With ``overwrite=False`` the temp file is hard-linked to ``path`` instead (``os.link`` fails atomically
    with FileExistsError when ``path`` exists, even a dangling symlink) and then removed.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, target)
        else:
            os.link(tmp, target)
            tmp.unlink()
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(
    data: bytes, uri: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None, *,
    overwrite: bool = True,
) -> None:
    """Write ``data`` as the complete content of ``uri``; never leaves a partial file under that name.

    * Local paths: parent directories are created; the bytes go to ``.<name>.<random>.tmp`` in the same
      directory, are fsync-ed and then renamed over the target with :func:`os.replace` (atomic on POSIX).
      A crash can at worst leave a hidden ``.tmp`` file, never a half-written target.
    * Object stores: one ``pipe_file`` upload of the whole object. S3/GCS/Azure publish an object only
      when its upload completes (single PUT, or multipart upload completion), so readers see either the
      previous object or the new one.
    * ``overwrite=False``: never replace an existing file/object. Local: atomic (``os.link``). S3: a
      conditional PUT (``If-None-Match: *``, atomic on AWS S3 and MinIO). Other stores: an existence check
      just before the upload (a concurrent writer can still slip in between).

    Raises:
        OutputExists: ``overwrite=False`` and ``uri`` already exists.
        StorageError: permission denied, missing bucket, network or disk errors.
    """
    uri = os.fspath(uri)
    fs, path = split_uri(uri, storage_options)
    try:
        if _is_local(fs):
            _write_local_atomic(data, path, overwrite)
        elif overwrite:
            fs.pipe_file(path, data)
        elif _protocol(uri) in _S3_PROTOCOLS:
            fs.pipe_file(path, data, mode="create")
        else:
            if fs.exists(path):
                raise FileExistsError(path)
            fs.pipe_file(path, data)
    except FileExistsError as exc:
        raise OutputExists(f"Refusing to write {uri!r}: it already exists and this write may not replace it.",
                           hint="Choose a new output location (or remove the old one).", uri=uri) from exc
    except Exception as exc:
        raise storage_error(exc, uri, "write") from exc


def write_nifti(
    img: nib.Nifti1Image,
    uri: str | os.PathLike[str],
    storage_options: Mapping[str, Any] | None = None,
    compresslevel: int = 1,
) -> None:
    """Atomically write ``img`` to ``uri``: gzip-compressed for ``.nii.gz``, plain for ``.nii``.

    The whole file is encoded in memory first, so an encoding failure never touches an existing file.

    Raises:
        ConfigError: ``uri`` does not end in ``.nii`` or ``.nii.gz``.
        StorageError: the write failed.
    """
    uri = os.fspath(uri)
    lower = uri.lower()
    if lower.endswith(".nii.gz"):
        payload = encode_nifti(img, compresslevel=compresslevel)
    elif lower.endswith(".nii"):
        payload = img.to_bytes()
    else:
        raise ConfigError(
            f"Cannot write a NIfTI volume to {uri!r}: the name must end in .nii.gz or .nii.",
            hint="Use a .nii.gz output name (compressed, recommended) or .nii.",
            uri=uri,
        )
    write_bytes_atomic(payload, uri, storage_options)


def _json_default(obj: Any) -> Any:
    """JSON fallback for numpy scalars/arrays and paths."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, PurePath):
        return str(obj)
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def write_json(obj: Any, uri: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None, *,
               overwrite: bool = True) -> None:
    """Atomically write ``obj`` as UTF-8 JSON (indent 2, trailing newline); numpy values become plain JSON.

    ``overwrite=False``: :class:`~nvseg_ray.errors.OutputExists` when ``uri`` exists (see :func:`write_bytes_atomic`).
    """
    text = json.dumps(obj, indent=2, default=_json_default, ensure_ascii=False) + "\n"
    write_bytes_atomic(text.encode("utf-8"), uri, storage_options, overwrite=overwrite)

