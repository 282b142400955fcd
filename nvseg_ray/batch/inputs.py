"""Turn a prefix, glob or manifest into work items -- listing only, no volume is read."""

from __future__ import annotations

import io as _io
import json
import posixpath
from dataclasses import dataclass, field
from typing import Any

from ..dicom.discovery import discover_series, looks_like_dicom_source
from ..dicom.series import DicomSeries
from ..errors import ConfigError
from ..redaction import redact_uri
from ..io import list_volumes, read_bytes, split_uri
from ..labels import parse_class_list, parse_class_token

MANIFEST_SUFFIXES = (".csv", ".jsonl", ".ndjson", ".parquet")
#: error code of a local input that is not a regular file (a named pipe, a device, a socket, or a link to one).
#: manifest columns: ``uri`` is required, the others optional per row.
MANIFEST_COLUMNS = ("uri", "modality", "classes", "output_name")


@dataclass
class WorkItem:
    """One input volume and its per-row overrides.

    Attributes:
        uri: the volume's path or URI.
        rel_dir: folder of the volume relative to the input root ("" at the root); mirrored under the output.
        modality / classes: per-row prompt overrides (None = the job's).
        output_name: per-row output stem override (None = the input's stem).
        series: the DICOM series of this item (``uri`` is then its readable locator), None for a NIfTI volume.
    """

    uri: str
    rel_dir: str = ""
    modality: str | None = None
    classes: list[int | str] | None = None
    output_name: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    series: DicomSeries | None = None


def is_manifest(uri: str) -> bool:
    return uri.lower().endswith(MANIFEST_SUFFIXES)


def discover(uri: str, storage_options: dict | None = None, *, recursive: bool = True,
             suffixes: tuple[str, ...] = (".nii.gz", ".nii"), notes: list[str] | None = None) -> list[WorkItem]:
    """Work items for a folder/prefix (relative folders kept), a glob, a single file or a manifest; a DICOM
    folder / prefix / zip / DICOMweb URL (also as a manifest row) gives one item per image series.

    ``notes`` collects one line per DICOM source on what discovery skipped (localizers, SR, ...).
    """
    notes = notes if notes is not None else []
    if is_manifest(uri):
        return [expanded for item in read_manifest(uri, storage_options)
                for expanded in dicom_items(item, storage_options, notes)]
    if looks_like_dicom_source(uri, storage_options):
        return dicom_items(WorkItem(uri=uri), storage_options, notes)
    found = list_volumes(uri, storage_options, recursive=recursive, suffixes=suffixes)
    root = _root_of(uri, storage_options)
    return [WorkItem(uri=u, rel_dir=_relative_dir(u, root)) for u in found]


def dicom_items(item: WorkItem, storage_options: dict | None, notes: list[str]) -> list[WorkItem]:
    """``item`` itself when it names a NIfTI volume; else one item per DICOM image series under ``item.uri`` (the
    row's modality / classes apply to each; an ``output_name`` only to a source holding a single series)."""
    if item.series is not None or not looks_like_dicom_source(item.uri, storage_options):
        return [item]
    found = discover_series(item.uri, storage_options)
    if found.skipped:
        notes.append(f"{redact_uri(item.uri)}: {len(found.series)} series, {found.describe_skipped()}")
    if item.output_name and len(found.series) > 1:
        raise ConfigError(f"manifest row {redact_uri(item.uri)} holds {len(found.series)} DICOM series but names one "
                          f"output_name {item.output_name!r}",
                          hint="leave output_name empty (each series is named by its SeriesInstanceUID) or list the "
                          "series one per row")
    return [WorkItem(uri=s.uri, rel_dir=s.study_instance_uid, modality=item.modality, classes=item.classes,
                     output_name=item.output_name, extra=dict(item.extra), series=s) for s in found.series]


def _root_of(uri: str, storage_options: dict | None) -> str:
    """The folder relative paths are measured from: the folder itself, or a glob's static prefix."""
    fs, path = split_uri(uri, storage_options)
    head = path
    for i, ch in enumerate(path):
        if ch in "*?[":
            head = path[:i].rsplit("/", 1)[0]
            break
    else:
        if not fs.isdir(path):
            head = posixpath.dirname(path)
    return head.rstrip("/")


def _relative_dir(found: str, root: str) -> str:
    path = found.split("://", 1)[-1]
    root = root.split("://", 1)[-1]
    parent = posixpath.dirname(path)
    if root and (parent == root or parent.startswith(root + "/")):
        return parent[len(root):].strip("/")
    return ""


def read_manifest(uri: str, storage_options: dict | None = None) -> list[WorkItem]:
    """Read a CSV / JSON-lines / Parquet manifest with a ``uri`` column (see :data:`MANIFEST_COLUMNS`).

    ``classes`` may be a list (JSON/Parquet) or a comma-separated string (CSV). Relative ``uri`` values are
    resolved against the manifest's folder.
    """
    import pandas as pd

    raw = read_bytes(uri, storage_options)
    lower = uri.lower()
    try:
        if lower.endswith(".csv"):
            frame = pd.read_csv(_io.BytesIO(raw), dtype=str, keep_default_na=False)
        elif lower.endswith(".parquet"):
            frame = pd.read_parquet(_io.BytesIO(raw))
        else:
            frame = pd.DataFrame([json.loads(line) for line in raw.decode().splitlines() if line.strip()])
    except Exception as exc:
        raise ConfigError(f"cannot parse manifest {uri}: {type(exc).__name__}: {exc}",
                          hint="CSV needs a header row with a 'uri' column; JSON lines one object per line") from None
    if "uri" not in frame.columns:
        raise ConfigError(f"manifest {uri} has no 'uri' column (columns: {', '.join(map(str, frame.columns))})",
                          hint=f"expected columns: {', '.join(MANIFEST_COLUMNS)}")
    unknown = sorted(set(map(str, frame.columns)) - set(MANIFEST_COLUMNS))
    base = uri.rsplit("/", 1)[0] if "/" in uri else "."
    items = []
    for row_no, row in enumerate(frame.to_dict("records"), start=1):
        value = str(row.get("uri") or "").strip()
        if not value:
            raise ConfigError(f"manifest {uri} row {row_no}: empty 'uri'")
        if "://" not in value and not value.startswith("/") and not value.startswith("dicomweb+"):
            value = f"{base}/{value}"
        items.append(WorkItem(uri=value, modality=_opt_str(row.get("modality")), classes=_classes(row.get("classes")),
                              output_name=_opt_str(row.get("output_name")),
                              extra={k: row[k] for k in unknown}))
    if not items:
        raise ConfigError(f"manifest {uri} lists no volumes")
    return items


def _opt_str(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and value != value):
        return None
    text = str(value).strip()
    return text or None


def _classes(value: Any) -> list[int | str] | None:
    """A manifest cell as a class list: ``"liver,3"``, a list/array of names or ids, or one bare id (an int cell
    of a Parquet/JSONL manifest); empty or NaN -> None (the job's classes)."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    if isinstance(value, str):
        return parse_class_list(value) or None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [parse_class_token(str(int(value)))]
    if not hasattr(value, "__iter__"):  # anything else scalar (e.g. a bool cell): a name, refused when resolved
        return parse_class_list(str(value)) or None
    return [parse_class_token(str(p)) for p in list(value)] or None
