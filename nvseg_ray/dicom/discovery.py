"""Find DICOM image series in a folder, object-store prefix, zip archive or DICOMweb URL -- headers only.

:func:`discover_series` never decodes pixel data: for files it reads the first :data:`HEADER_BYTES` of each
instance (one ranged request per object on S3, issued concurrently by fsspec) and parses the elements up to the
pixel data (and, for enhanced multi-frame objects, up to the per-frame functional groups); only an instance whose
header is longer than that is read again in full.

Grouping (:func:`nvseg_ray.dicom.grouping.group_series`, shared with DICOMweb discovery): by SeriesInstanceUID,
and inside a series by FrameOfReferenceUID, ImageOrientationPatient and Rows x Columns (each enhanced multi-frame
instance on its own), so one row of the batch job is always one stack. Skipped and counted
(:attr:`Discovery.skipped`): non-DICOM files, DICOMDIR, objects without an image (SR, PR, KO, SEG, RT*, ...) and
localizers (ImageType contains LOCALIZER).
"""

from __future__ import annotations

import io as _io
import os
import zipfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import DicomError, REASON_NOT_FOUND, StorageError
from ..io import split_uri, storage_error
from ..redaction import redact_uri
from .grouping import SKIP_NOT_DICOM, group_series
from .series import DicomSeries

#: Bytes read from each instance for discovery: a CT/MR header is 2-10 KB before its pixel data; 64 KiB covers
#: nearly every real header in one ranged request (longer ones are re-read whole).
HEADER_BYTES = 64 * 1024
#: File names that are never instances of a series (checked case-insensitively on the last path component).
NOT_INSTANCES = (".nii", ".nii.gz", ".json", ".txt", ".csv", ".md", ".xml", ".html", ".jsonl", ".parquet")
#: Tags read at discovery (everything else is skipped).
_TAGS = ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "Modality", "SeriesDescription",
         "FrameOfReferenceUID", "ImageOrientationPatient", "Rows", "Columns", "ImageType", "NumberOfFrames",
         "SharedFunctionalGroupsSequence", "MediaStorageSOPClassUID")
@dataclass
class Discovery:
    """What :func:`discover_series` found under one source.

    Attributes:
        series: image series (one per stack), sorted by study, series UID and split.
        skipped: count of skipped files/objects by reason (``not_dicom``, ``dicomdir``, ``localizer``, and
            ``no_image:<Modality>`` such as ``no_image:SR``).
    """

    series: list[DicomSeries] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)

    def describe_skipped(self) -> str:
        """``"2 skipped (1 localizer, 1 no_image:SR)"`` or ``""``."""
        if not self.skipped:
            return ""
        parts = ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items()))
        return f"{sum(self.skipped.values())} skipped ({parts})"


def _pydicom():
    try:
        import pydicom
    except ImportError as exc:  # pragma: no cover - the dicom extra is part of every install we ship
        raise DicomError(f"reading DICOM needs pydicom, which is not installed ({exc})",
                         hint="pip install 'nvseg-ray[dicom]'") from None
    return pydicom


def looks_like_dicom_source(uri: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    """True for a DICOMweb URL, a ``.zip``, a ``.dcm`` file, or a folder/prefix holding no NIfTI volume.

    Cheap: at most one listing; no file is opened. ``nvseg segment``, the batch job and the Serve app use it to
    decide between the NIfTI reader and :func:`discover_series`.
    """
    from .dicomweb import is_dicomweb_url

    if is_dicomweb_url(uri):
        return True
    lower = uri.lower().split("?", 1)[0]
    if lower.endswith((".zip", ".dcm", ".dicom")):
        return True
    if lower.endswith((".nii", ".nii.gz")) or any(ch in uri for ch in "*?["):
        return False
    fs, path = split_uri(uri, storage_options)
    try:
        if not fs.isdir(path):
            return False
        names = fs.find(path)
    except Exception:  # the NIfTI path reports storage problems with its own messages
        return False
    return bool(names) and not any(n.lower().endswith((".nii", ".nii.gz")) for n in names)


def _header_of(raw: bytes) -> Any | None:
    """The header elements of one instance (``pydicom.Dataset``), or None when ``raw`` is not DICOM.

    Stops before the pixel data and before the per-frame functional groups (which can be megabytes).
    Raises EOFError-like errors when ``raw`` is a cut-off head whose header continues (caller reads the rest).
    """
    pydicom = _pydicom()
    from pydicom.filereader import read_partial

    def stop_when(tag: Any, vr: Any, length: int) -> bool:
        return tag >= 0x52009230  # PerFrameFunctionalGroupsSequence, then pixel data; never needed here

    from pydicom.tag import Tag

    # Files without the 128-byte preamble + "DICM" (written by old software) are parsed forcibly, and kept only
    # when they turn out to name an instance of a series.
    forced = raw[128:132] != b"DICM"
    buffer = _io.BytesIO(raw)
    try:
        ds = read_partial(buffer, stop_when=stop_when, defer_size=4096, force=forced,
                          specific_tags=[Tag(k) for k in _TAGS])
    except pydicom.errors.InvalidDicomError:
        return None
    if forced and not (ds.get("SOPInstanceUID") and (ds.get("SeriesInstanceUID") or ds.get("SOPClassUID"))):
        return None
    return ds


def _parse(raw: bytes, whole: bool) -> tuple[Any | None, bool]:
    """``(header, complete)``: complete False when a cut-off head needs the full file."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = _header_of(raw)
    except Exception:
        if whole:
            return None, True
        return None, False
    if ds is None:
        return None, True
    if not whole and len(raw) >= HEADER_BYTES and not ds.get("SeriesInstanceUID"):
        return None, False
    return ds, True


def _instance_files(uri: str, storage_options: Mapping[str, Any] | None) -> tuple[Any, list[str], bool]:
    """``(fs, paths, keep_scheme)`` of the candidate instance files under a folder/prefix or one file."""
    fs, path = split_uri(uri, storage_options)
    try:
        if fs.isfile(path):
            paths = [path]
        elif fs.isdir(path):
            paths = sorted(fs.find(path))
        else:
            raise StorageError(f"DICOM input not found: {redact_uri(uri)}",
                               hint="check the folder, prefix or zip path (and credentials for s3://)",
                               reason=REASON_NOT_FOUND, uri=redact_uri(uri))
    except StorageError:
        raise
    except Exception as exc:
        raise storage_error(exc, redact_uri(uri), "list") from exc
    keep_scheme = "://" in uri and not uri.startswith("file://")
    return fs, paths, keep_scheme


def _is_candidate(name: str) -> bool:
    base = name.rsplit("/", 1)[-1].lower()
    return not base.startswith(".") and not base.endswith(NOT_INSTANCES)


def _read_heads(fs: Any, paths: list[str]) -> list[bytes]:
    """The first :data:`HEADER_BYTES` of each path; concurrent on async filesystems (s3fs, gcsfs)."""
    if not paths:
        return []
    try:
        heads = fs.cat_ranges(paths, [0] * len(paths), [HEADER_BYTES] * len(paths), on_error="return")
    except TypeError:  # an implementation without on_error
        heads = fs.cat_ranges(paths, [0] * len(paths), [HEADER_BYTES] * len(paths))
    return [h if isinstance(h, (bytes, bytearray)) else b"" for h in heads]


def _headers_from_files(uri: str, storage_options: Mapping[str, Any] | None,
                        skipped: Counter) -> list[tuple[str, Any]]:
    fs, paths, keep_scheme = _instance_files(uri, storage_options)
    paths = [p for p in paths if _is_candidate(p)]
    found: list[tuple[str, Any]] = []
    heads = _read_heads(fs, paths)
    for path, head in zip(paths, heads):
        ds, complete = _parse(head, whole=len(head) < HEADER_BYTES)
        if not complete:
            try:
                ds, _ = _parse(fs.cat_file(path), whole=True)
            except Exception:
                ds = None
        located = fs.unstrip_protocol(path) if keep_scheme else path
        if ds is None:
            skipped[SKIP_NOT_DICOM] += 1
            continue
        found.append((located, ds))
    return found


#: Largest zip archive member read as one instance (a 512 x 512 slice is 0.5 MB; enhanced multi-frame objects of
#: whole scans reach a few hundred MB): a member declaring more is skipped, so a zip bomb cannot exhaust memory.
MAX_ZIP_MEMBER_BYTES = 2 * 1024**3


def zip_member_uri(archive: str, member: str) -> str:
    """``zip://<member>::<archive>`` -- the locator of one zip member (fsspec's chained URL form)."""
    return f"zip://{member}::{archive}"


def split_zip_member_uri(uri: str) -> tuple[str, str] | None:
    """``(archive, member)`` of a :func:`zip_member_uri`, else None."""
    if not uri.startswith("zip://") or "::" not in uri:
        return None
    member, archive = uri[len("zip://"):].split("::", 1)
    return archive, member


def open_zip(archive: str, storage_options: Mapping[str, Any] | None) -> zipfile.ZipFile:
    """Open a local or remote zip archive (random access through fsspec; members are read on demand).

    Raises:
        DicomError: ``not_a_zip`` when the file is not a zip archive.
    """
    fs, path = split_uri(archive, storage_options)
    try:
        handle = fs.open(path, "rb")
    except Exception as exc:
        raise storage_error(exc, redact_uri(archive), "read") from exc
    try:
        return zipfile.ZipFile(handle)
    except zipfile.BadZipFile as exc:
        handle.close()
        raise DicomError(f"{redact_uri(archive)} is not a readable zip archive ({exc})",
                         hint="upload a .zip of the series' .dcm files (zip -r series.zip folder/)",
                         code="not_a_zip", uri=redact_uri(archive)) from None


def _headers_from_zip(archive: str, storage_options: Mapping[str, Any] | None,
                      skipped: Counter) -> list[tuple[str, Any]]:
    found: list[tuple[str, Any]] = []
    with open_zip(archive, storage_options) as zf:
        for info in sorted(zf.infolist(), key=lambda i: i.filename):
            if info.is_dir() or not _is_candidate(info.filename):
                continue
            if info.file_size > MAX_ZIP_MEMBER_BYTES:
                skipped["too_large"] += 1
                continue
            with zf.open(info) as member:
                head = member.read(HEADER_BYTES)
                ds, complete = _parse(head, whole=len(head) < HEADER_BYTES)
                if not complete:
                    ds, _ = _parse(head + member.read(), whole=True)
            if ds is None:
                skipped[SKIP_NOT_DICOM] += 1
                continue
            found.append((zip_member_uri(archive, info.filename), ds))
    return found


def discover_series(uri: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None) -> Discovery:
    """All image series under ``uri``: a folder or prefix (recursive), one instance file, a ``.zip`` of instances
    or a DICOMweb study / series / QIDO query URL. Headers only (see the module docstring).

    Raises:
        StorageError: the location does not exist or cannot be listed.
        DicomError: ``no_dicom_series`` when nothing under ``uri`` is an image series (the message counts what
            was skipped and why).
    """
    text = os.fspath(uri)
    from .dicomweb import discover as discover_dicomweb, is_dicomweb_url

    found = Discovery()
    if is_dicomweb_url(text):
        found.series, found.skipped = discover_dicomweb(text)
    else:
        lower = text.lower().split("?", 1)[0]
        headers = (_headers_from_zip(text, storage_options, found.skipped) if lower.endswith(".zip")
                   else _headers_from_files(text, storage_options, found.skipped))
        found.series = group_series(text, headers, found.skipped)
    if not found.series:
        skipped = found.describe_skipped() or "no files"
        raise DicomError(f"no DICOM image series found in {redact_uri(text)}: {skipped}",
                         hint="point at a folder, prefix, .zip or DICOMweb URL of CT/MR image instances "
                         "(SR, presentation states, SEG/RT objects and localizers are skipped)",
                         code="no_dicom_series", uri=redact_uri(text), skipped=dict(found.skipped))
    return found
