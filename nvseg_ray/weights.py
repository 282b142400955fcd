"""Download and verify the pretrained NV-Segment-CTMR (VISTA3D) weights.

The released checkpoint lives on the Hugging Face Hub (``nvidia/NV-Segment-CTMR``, file
``vista3d_pretrained_model/model.pt``, about 872 MB). Unlike upstream, which contacts the Hub on
every run to "touch a download counter", this module contacts the Hub **only** inside
:func:`download_weights`, and only when the destination does not already hold verified weights.
Nothing here touches the network at import time.

How a download works:

1. If ``dest`` exists (and ``overwrite`` is false) its sha256 is recomputed and compared with the
   provenance sidecar ``<dest>.json``; on success the recorded provenance is returned with
   ``cached=True`` and the Hub is never contacted.
2. Otherwise the file's metadata is fetched (one HEAD request). For LFS files the Hub reports the
   sha256 of the content as the ETag (``X-Linked-Etag``), so an ``expected_sha256`` that disagrees
   with the Hub fails before any byte is downloaded.
3. The file is fetched with :func:`huggingface_hub.hf_hub_download` (which honours ``HF_ENDPOINT``,
   ``HF_HUB_OFFLINE``, ``HF_TOKEN`` ...) into a private, throw-away cache, pinned to the commit the
   HEAD request resolved, then stream-hashed and checked against ``expected_sha256``,
   :data:`KNOWN_SHA256` and the Hub's LFS sha256.
4. Only verified bytes are published to ``dest``, atomically (see :func:`_publish`), followed by the
   sidecar. A failed verification leaves ``dest`` untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from types import ModuleType
from typing import IO, Any

from .errors import ConfigError, NvsegError, StorageError, WeightsDownloadError

HF_REPO_ID = "nvidia/NV-Segment-CTMR"
HF_FILENAME = "vista3d_pretrained_model/model.pt"
#: Hub commit pinned by NVIDIA's own tooling (medical-AI-skills ``nv-segment-ctmr``).
HF_REVISION = "4fb8b4a6b2532be9f1c449a3726fe5440ab4213a"

#: revision (commit hash) -> sha256 of ``HF_FILENAME`` at that revision.
#: Empty on purpose: no real download has been recorded yet (this project is built without access
#: to the Hub). Once someone downloads the file, add ``HF_REVISION: "<sha256 from the sidecar>"``
#: here; from then on every download is checked against it in addition to the Hub's LFS sha256.
KNOWN_SHA256: dict[str, str] = {}

#: read/hash block size.
CHUNK_SIZE = 8 * 1024 * 1024
#: suffix of the provenance sidecar written next to the weights.
SIDECAR_SUFFIX = ".json"
#: fsspec protocols whose single PUT is already atomic (the object appears only once the upload
#: completes) and which have no cheap rename (``mv`` = copy + delete).
_ATOMIC_PUT_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "oss", "r2"})
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_OVERWRITE_HINT = "re-run with --overwrite (overwrite=True) to download the weights again"


@dataclass
class WeightsRecord:
    """Provenance of a weights file; also the content of the ``<dest>.json`` sidecar.

    Attributes:
        repo_id: Hugging Face repo the file came from.
        revision: the revision that was requested (commit hash, branch or tag).
        filename: path of the file inside the repo.
        sha256: hex sha256 of the file's bytes, computed locally.
        size: size in bytes.
        downloaded_at: UTC ISO-8601 time of the download.
        source_url: the ``/resolve/<commit>/`` URL the file was fetched from.
        dest: where the weights are (local path or fsspec URI).
        cached: True when this call found verified weights at ``dest`` and did not download.
        commit_hash: the commit the Hub resolved ``revision`` to.
        verified_against: which references ``sha256`` was checked against at download time
            (``"hub-lfs-sha256"``, ``"expected_sha256"``, ``"KNOWN_SHA256"``).
    """

    repo_id: str
    revision: str
    filename: str
    sha256: str
    size: int
    downloaded_at: str
    source_url: str
    dest: str
    cached: bool = False
    commit_hash: str | None = None
    verified_against: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (all fields)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WeightsRecord:
        """Build a record from :meth:`to_dict` output; unknown keys are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class _Location:
    """A resolved destination: ``fs is None`` means a plain local path."""

    uri: str
    path: str
    fs: Any = None

    @property
    def is_local(self) -> bool:
        return self.fs is None


@dataclass(frozen=True)
class _HubFile:
    """What one HEAD request on ``/resolve/`` tells about the file."""

    commit_hash: str
    lfs_sha256: str | None
    url: str


# --------------------------------------------------------------------------------------------- #
# public API
# --------------------------------------------------------------------------------------------- #


def download_weights(
    dest: str | os.PathLike[str],
    *,
    revision: str = HF_REVISION,
    repo_id: str = HF_REPO_ID,
    filename: str = HF_FILENAME,
    expected_sha256: str | None = None,
    endpoint: str | None = None,
    token: str | None = None,
    storage_options: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> WeightsRecord:
    """Download the pretrained weights to ``dest`` (a local path or fsspec URI) and verify them.

    Args:
        dest: target file, e.g. ``models/model.pt`` or ``s3://bucket/models/model.pt``.
        revision: Hub revision; a commit hash is recommended (the default is pinned).
        repo_id: Hub repository.
        filename: file inside the repository.
        expected_sha256: hex digest the file must have; also checked against the Hub before
            downloading when the Hub reports an LFS sha256.
        endpoint: Hub endpoint (mirror); defaults to ``HF_ENDPOINT`` / huggingface.co.
        token: Hub token; defaults to huggingface_hub's own lookup (``HF_TOKEN``, ``hf auth login``).
        storage_options: fsspec options for a remote ``dest``.
        overwrite: download again even if ``dest`` already holds verified weights.

    Returns:
        The provenance record (also written to ``<dest>.json``).

    Raises:
        ConfigError: invalid arguments.
        WeightsDownloadError: the Hub cannot be reached or refuses, a digest does not match, or
            ``dest`` exists with a missing or disagreeing sidecar.
        StorageError: ``dest`` cannot be read or written.
    """
    dest = os.fspath(dest)
    expected = _normalize_sha256(expected_sha256, "expected_sha256")
    _check_names(dest, revision, repo_id, filename)
    loc = _resolve(dest, storage_options)
    if loc.is_local and os.path.isdir(loc.path):
        raise ConfigError(f"weights destination {dest} is a directory", hint="pass a file path, e.g. models/model.pt")
    if not overwrite and _exists(loc):
        return _verify_existing(loc, repo_id, revision, filename, expected)

    hub = _import_hub()
    hub_file = _fetch_hub_file(hub, repo_id, filename, revision, endpoint, token)
    expectations = _expectations(expected, revision, hub_file.commit_hash)
    if hub_file.lfs_sha256:
        _check_digest(hub_file.lfs_sha256, expectations, what=f"the Hub's LFS sha256 of {filename}")

    with _staging_dir(loc) as staging:
        local_file = _hub_download(hub, repo_id, filename, hub_file, endpoint, token, staging)
        digest = sha256_file(local_file)
        if hub_file.lfs_sha256:
            expectations.append(("hub-lfs-sha256", hub_file.lfs_sha256))
        _check_digest(digest, expectations, what=f"the sha256 of the downloaded {filename}")
        record = WeightsRecord(
            repo_id=repo_id,
            revision=revision,
            filename=filename,
            sha256=digest,
            size=os.path.getsize(local_file),
            downloaded_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            source_url=hub_file.url,
            dest=dest,
            cached=False,
            commit_hash=hub_file.commit_hash,
            verified_against=[label for label, _ in expectations],
        )
        _publish(local_file, loc)
    _write_sidecar(loc, record)
    return record


def verify_weights(dest: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> WeightsRecord:
    """Recompute the sha256 of ``dest`` and compare it with its provenance sidecar.

    Never contacts the Hub (a remote ``dest`` is of course read from its storage).

    Returns:
        The sidecar's record, with ``dest`` set to the argument and ``cached=True``.

    Raises:
        WeightsDownloadError: the sidecar is missing or the digest disagrees.
        StorageError: ``dest`` cannot be read.
    """
    loc = _resolve(os.fspath(dest), storage_options)
    if not _exists(loc):
        raise StorageError(f"weights file not found: {loc.uri}", hint="download it with `nvseg weights download`")
    record = _require_provenance(loc)
    _check_file_digest(loc, record)
    return record


def sha256_file(path_or_uri: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> str:
    """Hex sha256 of a local file or fsspec URI, read in 8 MiB chunks.

    Raises:
        StorageError: the file does not exist or cannot be read.
    """
    return _sha256(_resolve(os.fspath(path_or_uri), storage_options))


def _sha256(loc: _Location) -> str:
    """Stream-hash ``loc`` (see :func:`sha256_file`)."""
    digest = hashlib.sha256()
    try:
        with _open(loc, "rb") as handle:
            for chunk in iter(lambda: handle.read(CHUNK_SIZE), b""):
                digest.update(chunk)
    except FileNotFoundError as exc:
        raise StorageError(f"file not found: {loc.uri}") from exc
    except NvsegError:
        raise
    except Exception as exc:  # fsspec backends raise many types
        raise StorageError(f"could not read {loc.uri}: {_one_line(exc)}") from exc
    return digest.hexdigest()


def read_provenance(
    dest: str | os.PathLike[str], storage_options: dict[str, Any] | None = None
) -> WeightsRecord | None:
    """Read the ``<dest>.json`` sidecar; ``None`` if there is none.

    The returned record has ``dest`` set to the argument and ``cached=True`` (it describes a file
    that is already there). Does not hash ``dest``; see :func:`verify_weights`.

    Raises:
        WeightsDownloadError: the sidecar exists but is not a valid provenance record.
        StorageError: the sidecar cannot be read.
    """
    return _read_sidecar(_resolve(os.fspath(dest), storage_options))


# --------------------------------------------------------------------------------------------- #
# validation
# --------------------------------------------------------------------------------------------- #


def _normalize_sha256(value: str | None, name: str) -> str | None:
    """Lower-case hex digest (an optional ``sha256:`` prefix is accepted) or ConfigError."""
    if value is None:
        return None
    digest = value.strip().lower().removeprefix("sha256:")
    if not _SHA256_RE.fullmatch(digest):
        raise ConfigError(f"{name} must be 64 hexadecimal characters, got {value!r}")
    return digest


def _check_names(dest: str, revision: str, repo_id: str, filename: str) -> None:
    """Reject empty or malformed arguments before any I/O."""
    if not dest or not str(dest).strip():
        raise ConfigError("weights destination (--dest) must not be empty")
    if not revision or not revision.strip():
        raise ConfigError("revision must not be empty", hint=f"the pinned default is {HF_REVISION}")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ConfigError(f"repo_id must look like 'owner/name', got {repo_id!r}")
    if not filename or filename.startswith("/") or ".." in filename.split("/"):
        raise ConfigError(f"filename must be a relative path inside the repo, got {filename!r}")


def _expectations(expected: str | None, revision: str, commit_hash: str | None) -> list[tuple[str, str]]:
    """(label, digest) pairs the downloaded file must match, before the Hub's own digest."""
    out: list[tuple[str, str]] = []
    if expected:
        out.append(("expected_sha256", expected))
    known = KNOWN_SHA256.get(revision) or (KNOWN_SHA256.get(commit_hash) if commit_hash else None)
    if known:
        out.append(("KNOWN_SHA256", known.lower()))
    return out


def _check_digest(actual: str, expectations: list[tuple[str, str]], *, what: str) -> None:
    """Raise WeightsDownloadError naming both digests on the first mismatch."""
    for label, wanted in expectations:
        if actual != wanted:
            raise WeightsDownloadError(
                f"sha256 mismatch: {what} is {actual}, but {label} is {wanted}",
                hint="the destination was not written; check --sha256 / --revision, or the mirror you use",
                actual_sha256=actual,
                expected_sha256=wanted,
                reference=label,
            )


# --------------------------------------------------------------------------------------------- #
# existing destination (no network)
# --------------------------------------------------------------------------------------------- #


def _verify_existing(loc: _Location, repo_id: str, revision: str, filename: str, expected: str | None) -> WeightsRecord:
    """Return the sidecar record of an existing ``dest`` after checking it matches the request."""
    record = _require_provenance(loc)
    wanted = {"repo_id": repo_id, "filename": filename}
    for key, value in wanted.items():
        if getattr(record, key) != value:
            _raise_sidecar_disagrees(loc, f"{key} is {getattr(record, key)!r}, requested {value!r}")
    if revision not in (record.revision, record.commit_hash):
        _raise_sidecar_disagrees(loc, f"revision is {record.revision!r}, requested {revision!r}")
    for label, digest in _expectations(expected, revision, record.commit_hash):
        if record.sha256 != digest:
            _raise_sidecar_disagrees(loc, f"sha256 is {record.sha256}, but {label} is {digest}")
    _check_file_digest(loc, record)
    return record


def _require_provenance(loc: _Location) -> WeightsRecord:
    """The sidecar record of ``loc``, or WeightsDownloadError if there is none."""
    record = _read_sidecar(loc)
    if record is None:
        raise WeightsDownloadError(
            f"{loc.uri} exists but has no provenance sidecar {_sidecar_uri(loc)}, so it cannot be verified",
            hint=_OVERWRITE_HINT,
        )
    return record


def _check_file_digest(loc: _Location, record: WeightsRecord) -> None:
    """Hash ``loc`` and compare with the sidecar's sha256."""
    actual = _sha256(loc)
    if actual != record.sha256:
        raise WeightsDownloadError(
            f"{loc.uri} does not match its provenance sidecar: sha256 is {actual}, sidecar says {record.sha256}",
            hint=_OVERWRITE_HINT,
            actual_sha256=actual,
            expected_sha256=record.sha256,
        )


def _raise_sidecar_disagrees(loc: _Location, why: str) -> None:
    raise WeightsDownloadError(
        f"{loc.uri} already exists and its provenance sidecar disagrees with the request: {why}",
        hint=_OVERWRITE_HINT,
    )


# --------------------------------------------------------------------------------------------- #
# Hugging Face Hub (the only network access)
# --------------------------------------------------------------------------------------------- #


def _import_hub() -> ModuleType:
    """Import huggingface_hub lazily, with an install hint when it is missing."""
    try:
        import huggingface_hub
    except ImportError as exc:
        raise WeightsDownloadError(
            "downloading weights needs the 'huggingface_hub' package, which is not installed",
            hint="pip install 'nvseg-ray[hub]'",
        ) from exc
    return huggingface_hub


def _fetch_hub_file(
    hub: ModuleType, repo_id: str, filename: str, revision: str, endpoint: str | None, token: str | None
) -> _HubFile:
    """HEAD the file on the Hub: resolved commit, LFS sha256 (when the file is in LFS), size."""
    url = hub.hf_hub_url(repo_id, filename, revision=revision, endpoint=endpoint)
    try:
        meta = hub.get_hf_file_metadata(url, token=token)
    except Exception as exc:
        raise _hub_error(exc, hub, repo_id, filename, revision, endpoint) from exc
    if not meta.commit_hash:
        raise WeightsDownloadError(
            f"{url} did not answer like a Hugging Face Hub (no X-Repo-Commit header)",
            hint="check --endpoint / HF_ENDPOINT",
        )
    etag = (meta.etag or "").lower()
    return _HubFile(
        commit_hash=meta.commit_hash,
        lfs_sha256=etag if _SHA256_RE.fullmatch(etag) else None,
        url=hub.hf_hub_url(repo_id, filename, revision=meta.commit_hash, endpoint=endpoint),
    )


def _hub_download(
    hub: ModuleType,
    repo_id: str,
    filename: str,
    hub_file: _HubFile,
    endpoint: str | None,
    token: str | None,
    cache_dir: str,
) -> str:
    """Fetch the file at the resolved commit into ``cache_dir``; return the real file path."""
    try:
        pointer = hub.hf_hub_download(
            repo_id,
            filename,
            revision=hub_file.commit_hash,
            endpoint=endpoint,
            token=token,
            cache_dir=cache_dir,
            library_name="nvseg-ray",
        )
    except Exception as exc:
        raise _hub_error(exc, hub, repo_id, filename, hub_file.commit_hash, endpoint) from exc
    return os.path.realpath(pointer)


def _hub_error(
    exc: Exception, hub: ModuleType, repo_id: str, filename: str, revision: str, endpoint: str | None
) -> WeightsDownloadError:
    """Translate a huggingface_hub / transport exception into a readable WeightsDownloadError."""
    where = endpoint or getattr(getattr(hub, "constants", None), "ENDPOINT", "the Hugging Face Hub")
    names = {cls.__name__ for cls in type(exc).__mro__}
    details = {"repo_id": repo_id, "revision": revision, "filename": filename, "endpoint": where}
    details["cause"] = type(exc).__name__
    if "RevisionNotFoundError" in names:
        message = f"revision {revision!r} not found in {repo_id} on {where}"
        hint = "check --revision (a commit hash, branch or tag of the repo)"
    elif "EntryNotFoundError" in names and "LocalEntryNotFoundError" not in names:
        message = f"file {filename!r} not found in {repo_id} at revision {revision!r} on {where}"
        hint = "check the file name and revision"
    elif "RepositoryNotFoundError" in names:
        message = f"repository {repo_id} not found or not accessible on {where}"
        hint = "check the repo id; for gated/private repos set HF_TOKEN and accept the licence on the model page"
    elif "OfflineModeIsEnabled" in names:
        message = f"cannot download {repo_id}/{filename}: Hugging Face offline mode is enabled"
        hint = "unset HF_HUB_OFFLINE, or copy the weights to --dest by other means"
    elif "LocalEntryNotFoundError" in names or any("Connect" in n or "Timeout" in n for n in names):
        message = f"could not reach {where} to download {repo_id}/{filename}: {_one_line(exc)}"
        hint = "check the network / proxy settings, or point --endpoint (HF_ENDPOINT) at a reachable mirror"
    else:
        message = f"downloading {repo_id}/{filename}@{revision} from {where} failed: {_one_line(exc)}"
        hint = None
    return WeightsDownloadError(message, hint=hint, **details)


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: message`` squeezed onto one line (no tracebacks, bounded length)."""
    text = " ".join(str(exc).split()) or "(no message)"
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}"


# --------------------------------------------------------------------------------------------- #
# storage
# --------------------------------------------------------------------------------------------- #


def _resolve(uri: str, storage_options: dict[str, Any] | None) -> _Location:
    """Local path (also ``file://``) or an fsspec filesystem + path."""
    if "://" not in uri:
        return _Location(uri=uri, path=uri)
    if uri.startswith("file://"):
        return _Location(uri=uri, path=uri[len("file://") :])
    try:
        import fsspec

        fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    except ImportError as exc:
        raise StorageError(
            f"no filesystem driver for {uri}: {_one_line(exc)}",
            hint="pip install 'nvseg-ray[s3]' for s3:// (or the fsspec driver of your storage)",
        ) from exc
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"unsupported destination or storage_options for {uri!r}: {_one_line(exc)}") from exc
    return _Location(uri=uri, path=path, fs=fs)


def _sidecar_uri(loc: _Location) -> str:
    return loc.uri + SIDECAR_SUFFIX


def _sidecar(loc: _Location) -> _Location:
    return replace(loc, uri=_sidecar_uri(loc), path=loc.path + SIDECAR_SUFFIX)


def _open(loc: _Location, mode: str) -> IO[Any]:
    if loc.is_local:
        return open(loc.path, mode)
    return loc.fs.open(loc.path, mode)


def _exists(loc: _Location) -> bool:
    """Whether ``loc`` is an existing file (StorageError if the storage cannot be queried)."""
    if loc.is_local:
        return os.path.isfile(loc.path)
    try:
        loc.fs.invalidate_cache(loc.path)
        return bool(loc.fs.isfile(loc.path))
    except Exception as exc:
        raise StorageError(f"could not check {loc.uri}: {_one_line(exc)}") from exc


def _read_sidecar(loc: _Location) -> WeightsRecord | None:
    """Parse ``<loc>.json``; None when it does not exist."""
    side = _sidecar(loc)
    if not _exists(side):
        return None
    try:
        with _open(side, "rb") as handle:
            data = json.loads(handle.read().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise WeightsDownloadError(f"provenance sidecar {side.uri} is not valid JSON", hint=_OVERWRITE_HINT) from exc
    except Exception as exc:
        raise StorageError(f"could not read {side.uri}: {_one_line(exc)}") from exc
    try:
        record = WeightsRecord.from_dict(data)
    except TypeError as exc:
        raise WeightsDownloadError(
            f"provenance sidecar {side.uri} is missing fields: {exc}", hint=_OVERWRITE_HINT
        ) from exc
    return replace(record, dest=loc.uri, cached=True)


@contextmanager
def _staging_dir(loc: _Location) -> Iterator[str]:
    """A throw-away Hub cache; next to a local ``dest`` so publishing is a same-volume rename."""
    try:
        if loc.is_local:
            parent = os.path.dirname(os.path.abspath(loc.path))
            os.makedirs(parent, exist_ok=True)
            path = tempfile.mkdtemp(prefix=".nvseg-weights-", dir=parent)
        else:
            path = tempfile.mkdtemp(prefix="nvseg-weights-")
    except OSError as exc:
        raise StorageError(f"cannot create a staging directory for {loc.uri}: {_one_line(exc)}") from exc
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _publish(local_file: str, loc: _Location) -> None:
    """Put verified bytes at ``loc`` atomically.

    * local: the staged file is already on the destination's volume -> ``os.replace`` (a rename).
    * object stores (s3, gcs, azure ...): one ``put`` -- an object only becomes visible once its
      upload completes, and these stores have no cheap rename (``mv`` would copy 872 MB again).
    * other fsspec filesystems: upload to ``<dest>.partial-<uuid>``, then ``mv`` into place.
    """
    try:
        if loc.is_local:
            os.replace(local_file, loc.path)
        elif _protocols(loc.fs) & _ATOMIC_PUT_PROTOCOLS:
            loc.fs.put_file(local_file, loc.path)
        else:
            _put_then_move(local_file, loc)
    except NvsegError:
        raise
    except Exception as exc:
        raise StorageError(f"could not write weights to {loc.uri}: {_one_line(exc)}") from exc
    finally:
        if not loc.is_local:
            loc.fs.invalidate_cache(loc.path)


def _put_then_move(local_file: str, loc: _Location) -> None:
    """Upload to a unique partial name, then rename; the partial is removed on failure."""
    partial = f"{loc.path}.partial-{uuid.uuid4().hex}"
    parent = loc.path.rsplit("/", 1)[0] if "/" in loc.path else ""
    if parent:
        loc.fs.makedirs(parent, exist_ok=True)
    try:
        loc.fs.put_file(local_file, partial)
        loc.fs.mv(partial, loc.path)
    except BaseException:
        try:
            if loc.fs.exists(partial):
                loc.fs.rm(partial)
        except Exception:
            pass  # best effort; the original error matters more
        raise


def _protocols(fs: Any) -> set[str]:
    proto = fs.protocol
    return {proto} if isinstance(proto, str) else set(proto)


def _write_sidecar(loc: _Location, record: WeightsRecord) -> None:
    """Write ``<dest>.json`` (atomically for local paths; a single put for remote ones)."""
    payload = record.to_dict()
    payload.pop("cached", None)  # a property of a call, not of the file
    data = (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode("utf-8")
    side = _sidecar(loc)
    try:
        if side.is_local:
            _atomic_write_local(side.path, data)
        else:
            with side.fs.open(side.path, "wb") as handle:
                handle.write(data)
            side.fs.invalidate_cache(side.path)
    except Exception as exc:
        raise StorageError(f"could not write provenance sidecar {side.uri}: {_one_line(exc)}") from exc


def _atomic_write_local(path: str, data: bytes) -> None:
    """Write to a unique temp file in the same directory, fsync, then ``os.replace``."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
