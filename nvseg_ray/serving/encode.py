"""Response encodings of a finished mask.

* ``nrrd_zip`` (:func:`nrrd_zip`) -- what NVIDIA's VISTA-3D NIM returns, so NIM clients work unchanged: a
  zip holding ``<stem>_seg.nrrd`` (the label map, gzip-encoded NRRD in LPS space, as 3D Slicer/ITK write
  it) and ``labels.json`` (the label table: ``[{"id", "name", "voxels", "volume_ml"}, ...]``).
* ``nifti`` (:func:`nifti_gz`) -- the label map as a ``.nii.gz`` on the input's grid (the CLI's output).
* ``json`` -- the label table / report only; encoded by the service itself (``MEDIA_TYPE_JSON``).

Orientation: NIfTI affines map voxel indices to RAS+ millimetres; NRRD files here use
``space: left-posterior-superior`` (the DICOM convention Slicer and ITK expect), so
``LPS = diag(-1, -1, 1) @ RAS``. ``space directions`` holds one vector per array axis (the columns of the
affine's 3x3 part) and ``space origin`` its translation. The array is written in NRRD's axis order
(``index_order="F"``), so ``labels[i, j, k]`` is voxel ``(i, j, k)`` in both formats.
"""

from __future__ import annotations

import io
import json
import re
import unicodedata
import zipfile
from urllib.parse import quote
from collections.abc import Mapping, Sequence
from typing import Any

import nibabel as nib
import nrrd
import numpy as np

from ..errors import EncodeError, InputError, NvsegError
from ..io import CODE_UNREADABLE_FILE, encode_nifti

__all__ = [
    "LABELS_JSON",
    "MEDIA_TYPES",
    "MEDIA_TYPE_JSON",
    "MEDIA_TYPE_NIFTI",
    "MEDIA_TYPE_ZIP",
    "NRRD_SPACE",
    "EncodeError",
    "content_disposition",
    "decode_nrrd",
    "encode_nrrd",
    "image_nrrd_zip",
    "label_dtype",
    "lps_to_ras",
    "nifti_gz",
    "nrrd_zip",
    "ras_to_lps",
    "read_nrrd_zip",
    "response_filename",
    "safe_stem",
]

MEDIA_TYPE_ZIP = "application/zip"
MEDIA_TYPE_NIFTI = "application/gzip"
MEDIA_TYPE_JSON = "application/json"
MEDIA_TYPE_PNG = "image/png"
#: output format (request ``output.format``) -> ``Content-Type`` of the response.
MEDIA_TYPES: dict[str, str] = {"nrrd_zip": MEDIA_TYPE_ZIP, "nifti": MEDIA_TYPE_NIFTI, "json": MEDIA_TYPE_JSON,
                               "preview": MEDIA_TYPE_PNG}

NRRD_SPACE = "left-posterior-superior"
NRRD_SUFFIX = "_seg.nrrd"
LABELS_JSON = "labels.json"
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
_SPACE_ALIASES = {
    "left-posterior-superior": "LPS",
    "lps": "LPS",
    "right-anterior-superior": "RAS",
    "ras": "RAS",
}
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed zip entry timestamp
_FILE_SUFFIXES = {"nrrd_zip": "_seg.zip", "nifti": "_seg.nii.gz", "json": "_seg.json", "preview": "_preview.png"}


# --------------------------------------------------------------------------------------------------------
# Names and orientation
# --------------------------------------------------------------------------------------------------------


def safe_stem(stem: str) -> str:
    """``stem`` usable as a file name inside a zip / a ``Content-Disposition``: ``[A-Za-z0-9._-]`` only."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", str(stem)).strip("._")
    return cleaned or "image"


def response_filename(stem: str, fmt: str) -> str:
    """File name of a response body: ``scan_seg.zip``, ``scan_seg.nii.gz`` or ``scan_seg.json``."""
    try:
        return safe_stem(stem) + _FILE_SUFFIXES[fmt]
    except KeyError:
        raise NvsegError(f"unknown output format {fmt!r}", hint=f"use one of {', '.join(_FILE_SUFFIXES)}") from None


def content_disposition(filename: str, max_chars: int = 200) -> str:
    """An ``attachment`` ``Content-Disposition`` value for any file name (RFC 6266 / RFC 5987), ASCII only.

    ``filename="..."`` carries an ASCII fallback (accents stripped, other characters -> ``_``) and
    ``filename*=UTF-8''...`` the percent-encoded UTF-8 name, so that names like ``Zürich_頭部_seg.nii.gz``
    survive and the header stays Latin-1-encodable (HTTP servers refuse anything else). Names are cut to
    ``max_chars`` characters, keeping the suffix (``_seg.nii.gz``).
    """
    name = unicodedata.normalize("NFC", str(filename)).replace("/", "_").replace("\\", "_")
    name = "".join(ch if ch.isprintable() else "_" for ch in name) or "image"
    if len(name) > max_chars:
        stem, dot, suffix = name.partition(".")
        suffix = (dot + suffix)[-40:]
        name = stem[: max_chars - len(suffix)] + suffix
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    ascii_name = re.sub(r'[^A-Za-z0-9._-]+', "_", ascii_name).strip("_") or "image"
    if ascii_name.startswith("."):
        ascii_name = "image" + ascii_name
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(name, safe='')}"


def ras_to_lps(affine: np.ndarray) -> np.ndarray:
    """A 4x4 voxel->RAS+ affine as a voxel->LPS affine (and vice versa: the flip is its own inverse)."""
    return _RAS_TO_LPS @ np.asarray(affine, dtype=np.float64)


def lps_to_ras(affine: np.ndarray) -> np.ndarray:
    """A 4x4 voxel->LPS affine as a voxel->RAS+ affine."""
    return _RAS_TO_LPS @ np.asarray(affine, dtype=np.float64)


def label_dtype(labels: np.ndarray) -> np.dtype:
    """``uint8`` when every label is below 256, else ``uint16``.

    Raises:
        EncodeError: a label is negative or above 65535, or the array is not integer/bool.
    """
    arr = np.asarray(labels)
    if arr.dtype.kind not in "biu":
        raise EncodeError(f"label maps must hold integers, got dtype {arr.dtype}")
    if arr.size == 0:
        return np.dtype(np.uint8)
    low, high = int(arr.min()), int(arr.max())
    if low < 0 or high > 65535:
        raise EncodeError(f"label ids must be within 0..65535, got {low}..{high}")
    return np.dtype(np.uint8) if high < 256 else np.dtype(np.uint16)


def _check_volume(labels: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    arr = np.asarray(labels)
    if arr.ndim != 3:
        raise EncodeError(f"label maps must be 3-D (X, Y, Z), got shape {arr.shape}")
    aff = np.asarray(affine, dtype=np.float64)
    if aff.shape != (4, 4) or not np.all(np.isfinite(aff)):
        raise EncodeError(f"the affine must be a finite 4x4 matrix, got {aff.shape}")
    return arr.astype(label_dtype(arr), copy=False), aff


# --------------------------------------------------------------------------------------------------------
# NRRD
# --------------------------------------------------------------------------------------------------------


def encode_nrrd(labels: np.ndarray, affine: np.ndarray, *, compresslevel: int = 1) -> bytes:
    """A gzip-encoded NRRD (``uint8``/``uint16``, LPS space) of ``labels`` with the RAS+ ``affine``."""
    data, ras = _check_volume(labels, affine)
    lps = ras_to_lps(ras)
    header: dict[str, Any] = {
        "dimension": 3,
        "space": NRRD_SPACE,
        "space directions": lps[:3, :3].T.copy(),  # row a = direction (and spacing) of array axis a
        "space origin": lps[:3, 3].copy(),
        "kinds": ["domain", "domain", "domain"],
        "encoding": "gzip",
        "endian": "little",
    }
    buffer = io.BytesIO()
    nrrd.write(buffer, np.ascontiguousarray(data.astype(data.dtype.newbyteorder("<"), copy=False)), header,
               compression_level=compresslevel, index_order="F")
    return buffer.getvalue()


def decode_nrrd(data: bytes, *, name: str = "<nrrd>") -> tuple[np.ndarray, np.ndarray]:
    """Parse NRRD bytes into ``(array in (X, Y, Z) order, voxel->RAS+ affine)``.

    Raises:
        InputError: ``unreadable_file`` -- not an attached-header NRRD, or a space we cannot convert.
    """
    try:
        fh = io.BytesIO(data)
        header = nrrd.read_header(fh)
        array = nrrd.read_data(header, fh, index_order="F")
    except Exception as exc:  # nrrd.NRRDError, ValueError, zlib.error, ...
        raise InputError(f"{name!r} is not a readable NRRD file ({type(exc).__name__}: {exc}).",
                         code=CODE_UNREADABLE_FILE, uri=name) from exc
    ndim = array.ndim
    directions = header.get("space directions")
    origin = header.get("space origin")
    space = _SPACE_ALIASES.get(str(header.get("space", "")).strip().lower())
    if directions is None or space is None:
        raise InputError(f"{name!r} has no LPS/RAS 'space' with 'space directions'; cannot place it in the world.",
                         code=CODE_UNREADABLE_FILE, uri=name, space=header.get("space"))
    affine = np.eye(4)
    affine[:3, :ndim] = np.asarray(directions, dtype=np.float64)[:ndim, :3].T
    if origin is not None:
        affine[:3, 3] = np.asarray(origin, dtype=np.float64)[:3]
    return array, (lps_to_ras(affine) if space == "LPS" else affine)


# --------------------------------------------------------------------------------------------------------
# Zip (the NIM response)
# --------------------------------------------------------------------------------------------------------


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _zip_entry(archive: zipfile.ZipFile, name: str, payload: bytes, compresslevel: int) -> None:
    info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    archive.writestr(info, payload, compress_type=zipfile.ZIP_DEFLATED, compresslevel=compresslevel)


def nrrd_zip(labels: np.ndarray, affine: np.ndarray, stem: str, label_table: Sequence[Mapping[str, Any]], *,
             compresslevel: int = 1) -> bytes:
    """The NIM-style response body: a deflate zip with ``<stem>_seg.nrrd`` and ``labels.json``.

    Args:
        labels: integer label map, shape (X, Y, Z), on the grid ``affine`` describes.
        affine: 4x4 voxel -> RAS+ mm (a NIfTI ``image.affine``).
        stem: base name (sanitised with :func:`safe_stem`), e.g. ``"scan"`` -> ``scan_seg.nrrd``.
        label_table: ``[{"id", "name", "voxels", "volume_ml"}, ...]``, written as ``labels.json``.
        compresslevel: gzip level of the NRRD data and deflate level of the zip entries (1 fast .. 9 small).

    Raises:
        EncodeError: labels not 3-D integers within 0..65535, or a bad affine.
    """
    payload = encode_nrrd(labels, affine, compresslevel=compresslevel)
    table = json.dumps(list(label_table), indent=2, default=_json_default, ensure_ascii=False) + "\n"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        _zip_entry(archive, safe_stem(stem) + NRRD_SUFFIX, payload, compresslevel)
        _zip_entry(archive, LABELS_JSON, table.encode("utf-8"), compresslevel)
    return buffer.getvalue()


def image_nrrd_zip(image: nib.Nifti1Image, stem: str, label_table: Sequence[Mapping[str, Any]], *,
                   compresslevel: int = 1) -> bytes:
    """:func:`nrrd_zip` of a NIfTI label image (e.g. ``nvseg_ray.output.mask_image(result)``)."""
    return nrrd_zip(np.asanyarray(image.dataobj), image.affine, stem, label_table, compresslevel=compresslevel)


def read_nrrd_zip(data: bytes) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Open a :func:`nrrd_zip` body: ``(labels (X, Y, Z), voxel->RAS+ affine, label table)``.

    Works on NIM responses too (the label table is ``[]`` when the zip has no ``labels.json``).

    Raises:
        InputError: ``unreadable_file`` -- not a zip, no single ``.nrrd`` member, or an unreadable NRRD.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise InputError(f"the response is not a zip file ({exc}).", code=CODE_UNREADABLE_FILE) from exc
    with archive:
        names = archive.namelist()
        members = [n for n in names if n.lower().endswith(".nrrd")]
        if len(members) != 1:
            raise InputError(f"expected one .nrrd file in the zip, found {members or 'none'} (entries: {names}).",
                             code=CODE_UNREADABLE_FILE)
        labels, affine = decode_nrrd(archive.read(members[0]), name=members[0])
        table: list[dict[str, Any]] = []
        if LABELS_JSON in names:
            try:
                table = list(json.loads(archive.read(LABELS_JSON).decode("utf-8")))
            except (ValueError, TypeError) as exc:
                raise InputError(f"{LABELS_JSON} in the zip is not a JSON list ({exc}).",
                                 code=CODE_UNREADABLE_FILE) from exc
    return labels, affine, table


# --------------------------------------------------------------------------------------------------------
# NIfTI
# --------------------------------------------------------------------------------------------------------


def nifti_gz(image: nib.Nifti1Image, *, compresslevel: int = 1) -> bytes:
    """The label image as ``.nii.gz`` bytes (:func:`nvseg_ray.io.encode_nifti`)."""
    return encode_nifti(image, compresslevel=compresslevel)
