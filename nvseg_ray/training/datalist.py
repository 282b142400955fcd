"""Upstream-format data lists, fold splits and label mappings (docs/upstream.md, Training and evaluation).

A data list is the JSON file upstream's ``train.json`` / ``evaluate.json`` read through
``monai.auto3dseg.utils.datafold_read`` (example: ``msd_task09_spleen_folds.json``)::

    {"training": [{"image": "imagesTr/spleen_19.nii.gz", "label": "labelsTr/spleen_19.nii.gz", "fold": 0}, ...],
     "testing":  [{"image": "imagesTs/spleen_15.nii.gz"}, ...]}

``image`` is one path or a list of co-registered single-channel files (multi-channel input). Relative
paths are resolved against ``root`` (upstream ``dataset_dir``; here it defaults to the folder that holds the
data list). Any path may also be absolute or an fsspec URI (``s3://...``).

Label maps of a dataset use *local* ids (MSD spleen: 1 = spleen); ``label_mappings`` (upstream
``train_continual.json`` / ``evaluate.json``: ``{"default": [[1, 3]]}``) maps them onto the model's *global*
label space (3 = spleen). :func:`relabel` applies a mapping; :func:`check_items` verifies files, grids and
label values up front and reports every problem at once.
"""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import nibabel as nib
import numpy as np

from ..errors import DataListError, LabelMappingError, NvsegError
from ..io import join_uri, read_bytes, read_nifti, uri_stem

__all__ = [
    "AFFINE_TOLERANCE_MM",
    "MAX_GLOBAL_ID",
    "DataItem",
    "DataList",
    "DataListError",
    "LabelMapping",
    "LabelMappingError",
    "check_items",
    "global_ids",
    "load_datalist",
    "parse_label_mapping",
    "relabel",
    "resolve_path",
    "split_folds",
]

#: A validated label mapping: ``((local, global), ...)`` in the order given.
LabelMapping = tuple[tuple[int, int], ...]

#: Highest global id a mapping may target (upstream evaluator accepts label prompts < 512).
MAX_GLOBAL_ID = 511
#: Largest absolute difference between an image and its label affine (mm) that still counts as one grid.
AFFINE_TOLERANCE_MM = 1e-3
#: At most this many offending label values are listed per item.
_MAX_LISTED_VALUES = 20


@dataclass(frozen=True)
class DataItem:
    """One case of a data list, paths resolved.

    Attributes:
        image: one or more co-registered channel URIs (same shape and affine), in channel order.
        label: label-map URI (local label ids), or ``None`` (e.g. upstream ``testing`` items).
        fold: cross-validation fold, or ``None`` when the item has none (then it is always training).
        case_id: file stem of the first image (``imagesTr/spleen_19.nii.gz`` -> ``spleen_19``).
    """

    image: tuple[str, ...]
    label: str | None
    fold: int | None
    case_id: str


@dataclass
class DataList:
    """A parsed data list.

    Attributes:
        training: the ``training`` items (all folds), in file order.
        testing: the ``testing`` items, in file order.
        root: the folder relative paths were resolved against.
    """

    training: list[DataItem] = field(default_factory=list)
    testing: list[DataItem] = field(default_factory=list)
    root: str = ""


# --------------------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------------------


def _is_absolute(path: str) -> bool:
    return "://" in path or path.startswith("/") or os.path.isabs(path)


def _parent(uri: str) -> str:
    """Folder of a local path or URI (``s3://b/x/list.json`` -> ``s3://b/x``)."""
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://{posixpath.dirname(rest)}"
    return os.path.dirname(os.path.abspath(uri))


def resolve_path(path: str, root: str) -> str:
    """``path`` unchanged when absolute or a URI, else joined onto ``root``."""
    return path if _is_absolute(path) else join_uri(root, path)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _parse_item(entry: Any, where: str, root: str, problems: list[str], *, need_label: bool) -> DataItem | None:
    if not isinstance(entry, Mapping):
        problems.append(f"{where}: must be an object with 'image' (and 'label'), got {type(entry).__name__}")
        return None
    n_before = len(problems)
    image = entry.get("image")
    images: list[str] = []
    if isinstance(image, str) and image:
        images = [image]
    elif isinstance(image, list) and image and all(isinstance(p, str) and p for p in image):
        images = list(image)
    else:
        problems.append(f"{where}: 'image' must be a path or a non-empty list of paths, got {image!r}")
    label = entry.get("label")
    if label is None:
        if need_label:
            problems.append(f"{where}: training item has no 'label'")
    elif not (isinstance(label, str) and label):
        problems.append(f"{where}: 'label' must be a path, got {label!r}")
    fold = entry.get("fold")
    if fold is not None and not (_is_int(fold) and fold >= 0):
        problems.append(f"{where}: 'fold' must be an integer >= 0, got {fold!r}")
    if len(problems) > n_before:
        return None
    resolved = tuple(resolve_path(p, root) for p in images)
    return DataItem(image=resolved, label=resolve_path(label, root) if label else None,
                    fold=int(fold) if fold is not None else None, case_id=uri_stem(resolved[0]))


def load_datalist(uri: str, root: str | None = None, storage_options: dict | None = None) -> DataList:
    """Read an upstream data-list JSON (local path or fsspec URI) and resolve its paths.

    Args:
        uri: the JSON file.
        root: folder relative paths are resolved against (upstream ``dataset_dir``); default: the data
            list's own folder.
        storage_options: fsspec options for reading ``uri``.

    Returns:
        The :class:`DataList`. Training items must have a ``label``; testing items may.

    Raises:
        StorageError: the file cannot be read.
        DataListError: the file is not JSON or any entry is malformed (all entries are checked and every
            problem is listed).
    """
    uri = os.fspath(uri)
    raw = read_bytes(uri, storage_options)
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataListError([f"not valid JSON: {exc}"], source=uri, uri=uri) from None
    if not isinstance(data, Mapping):
        raise DataListError([f"top level must be an object with 'training' / 'testing', got {type(data).__name__}"],
                            source=uri, uri=uri)
    root = os.fspath(root) if root else _parent(uri)
    if "://" not in root:
        root = os.path.abspath(root)
    problems: list[str] = []
    if "training" not in data and "testing" not in data:
        problems.append("neither 'training' nor 'testing' is present")
    out = DataList(root=root)
    for key, target in (("training", out.training), ("testing", out.testing)):
        entries = data.get(key, [])
        if not isinstance(entries, list):
            problems.append(f"'{key}' must be a list, got {type(entries).__name__}")
            continue
        for i, entry in enumerate(entries):
            item = _parse_item(entry, f"{key}[{i}]", root, problems, need_label=key == "training")
            if item is not None:
                target.append(item)
    if problems:
        raise DataListError(problems, source=uri, uri=uri)
    return out


def split_folds(items: list[DataItem], fold: int) -> tuple[list[DataItem], list[DataItem]]:
    """Upstream ``datafold_read``: items with ``fold == fold`` are validation, all others (including items
    without a fold) are training. Returns ``(train, val)``, both in input order."""
    train = [it for it in items if it.fold != fold]
    val = [it for it in items if it.fold == fold]
    return train, val


# --------------------------------------------------------------------------------------------------------
# Label mappings
# --------------------------------------------------------------------------------------------------------


def _catalog():  # noqa: ANN202 - imported lazily: the catalog is only needed for class names
    from ..labels import LabelCatalog

    return LabelCatalog.default()


def parse_label_mapping(value: Any) -> LabelMapping:
    """Validate a label mapping ``[[local, global], ...]``.

    Accepts a sequence of pairs, its JSON text (``'[[1, 3]]'``), or upstream's ``{"default": [[1, 3]]}``.
    The global side may be a class name (``[[1, "spleen"]]``), looked up in the label catalog.
    Locals must be integers >= 1 without duplicates; globals integers in 1..511 (several locals may map
    to one global).

    Raises:
        LabelMappingError: listing every malformed pair.
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise LabelMappingError(f"label mapping {value!r} is not JSON: {exc}",
                                    hint="write it like '[[1, 3]]' (local id, global id)") from None
    if isinstance(value, Mapping) and set(value) == {"default"}:
        value = value["default"]
    if not isinstance(value, (list, tuple)) or not value:
        raise LabelMappingError(f"label mapping must be a non-empty list of [local, global] pairs, got {value!r}",
                                hint="e.g. [[1, 3]] maps local label 1 to global class 3 (spleen)")
    problems: list[str] = []
    pairs: list[tuple[int, int]] = []
    seen: set[int] = set()
    for i, pair in enumerate(value):
        if isinstance(pair, (list, tuple)) and len(pair) == 2 and isinstance(pair[1], str) and _is_int(pair[0]):
            try:  # a class name on the global side: resolved through the label catalog ("did you mean" on typos)
                pair = (pair[0], _catalog().resolve(pair[1]))
            except NvsegError as err:
                problems.append(f"entry {i}: {err.message}")
                continue
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(_is_int(v) for v in pair)):
            problems.append(f"entry {i} {pair!r} is not a pair of integers")
            continue
        local, glob = int(pair[0]), int(pair[1])
        if local < 1:
            problems.append(f"entry {i}: local id {local} must be >= 1 (0 is background and stays 0)")
        if not 1 <= glob <= MAX_GLOBAL_ID:
            problems.append(f"entry {i}: global id {glob} must be in 1..{MAX_GLOBAL_ID}")
        if local in seen:
            problems.append(f"entry {i}: local id {local} is mapped twice")
        seen.add(local)
        pairs.append((local, glob))
    if problems:
        raise LabelMappingError("invalid label mapping: " + "; ".join(problems), problems=problems,
                                hint="give [[local, global], ...] with distinct locals >= 1 and globals 1..511")
    return tuple(pairs)


def global_ids(mapping: Any) -> tuple[int, ...]:
    """The distinct global ids of a mapping, in first-appearance order."""
    out: list[int] = []
    for _local, glob in parse_label_mapping(mapping):
        if glob not in out:
            out.append(glob)
    return tuple(out)


def _integer_values(labels: np.ndarray) -> np.ndarray | None:
    """``labels`` as int64, or ``None`` when some value is not a (finite) integer."""
    if np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_:
        return labels.astype(np.int64, copy=False)
    if not np.all(np.isfinite(labels)):
        return None
    rounded = np.rint(labels)
    if not np.array_equal(rounded, labels):
        return None
    return rounded.astype(np.int64)


def relabel(labels: np.ndarray, mapping: Any) -> np.ndarray:
    """Map local label ids to global ids.

    Args:
        labels: label map of any shape, integer dtype or integer-valued floats; 0 is background.
        mapping: ``[[local, global], ...]`` (see :func:`parse_label_mapping`).

    Returns:
        uint16 array of the same shape: each ``local`` replaced by its ``global``, 0 kept as 0.

    Raises:
        DataListError: a value is not an integer, or is neither 0 nor a mapped local id.
    """
    pairs = parse_label_mapping(mapping)
    values = _integer_values(np.asarray(labels))
    if values is None:
        raise DataListError(["label map has non-integer values"], source="relabel")
    uniq, inverse = np.unique(values, return_inverse=True)
    lut = {0: 0, **dict(pairs)}
    unknown = [int(v) for v in uniq if int(v) not in lut]
    if unknown:
        raise DataListError([f"label values {unknown[:_MAX_LISTED_VALUES]} are not in the mapping "
                             f"(allowed: 0, {', '.join(str(lo) for lo, _ in pairs)})"], source="relabel")
    new = np.array([lut[int(v)] for v in uniq], dtype=np.uint16)
    return new[inverse].reshape(values.shape)


# --------------------------------------------------------------------------------------------------------
# Checking the files of a data list
# --------------------------------------------------------------------------------------------------------


def _spatial_shape(img: nib.Nifti1Image) -> tuple[int, ...]:
    """Shape with trailing singleton axes beyond the third dropped ((X, Y, Z, 1) -> (X, Y, Z))."""
    shape = tuple(int(s) for s in img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _read(uri: str, what: str, storage_options: Mapping[str, Any] | None,
          problems: list[str]) -> nib.Nifti1Image | None:
    try:
        return read_nifti(uri, storage_options)
    except NvsegError as exc:
        problems.append(f"cannot read {what} {uri}: {exc.message}")
    except Exception as exc:  # noqa: BLE001 - anything else unreadable is still a per-file problem
        problems.append(f"cannot read {what} {uri}: {type(exc).__name__}: {exc}")
    return None


def inspect_item(item: DataItem, mapping: Any, *, storage_options: Mapping[str, Any] | None = None,
                 check_values: bool = True) -> tuple[list[str], np.ndarray | None]:
    """Check one item; return ``(problems, label voxels)``.

    The label voxels (the stored values after scaling, trailing singleton axes dropped, on the label
    file's voxel grid == the image's grid when there are no problems) are returned so that callers
    such as the evaluation do not read the label twice; ``None`` when it could not be read or there is
    no label. Problems are strings prefixed with the case id.
    """
    pairs = parse_label_mapping(mapping)
    found: list[str] = []
    images = [_read(uri, f"image channel {c}" if len(item.image) > 1 else "image", storage_options, found)
              for c, uri in enumerate(item.image)]
    ref = images[0]
    if ref is not None:
        for c, img in enumerate(images[1:], start=1):
            if img is None:
                continue
            if _spatial_shape(img) != _spatial_shape(ref):
                found.append(f"image channel {c} {item.image[c]} has shape {list(_spatial_shape(img))}, "
                             f"channel 0 has {list(_spatial_shape(ref))}")
            elif not np.allclose(img.affine, ref.affine, atol=AFFINE_TOLERANCE_MM, rtol=0):
                found.append(f"image channel {c} {item.image[c]} has a different affine (voxel->world) than channel 0")
    voxels: np.ndarray | None = None
    if item.label is None:
        found.append("no label")
    else:
        label = _read(item.label, "label", storage_options, found)
        if label is not None:
            if ref is not None:
                if _spatial_shape(label) != _spatial_shape(ref):
                    found.append(f"label {item.label} has shape {list(_spatial_shape(label))}, "
                                 f"the image has {list(_spatial_shape(ref))}")
                elif not np.allclose(label.affine, ref.affine, atol=AFFINE_TOLERANCE_MM, rtol=0):
                    diff = float(np.abs(label.affine - ref.affine).max())
                    found.append(f"label {item.label} is not on the image grid: affines differ by up to "
                                 f"{diff:.4g} mm (tolerance {AFFINE_TOLERANCE_MM} mm)")
            voxels = np.asanyarray(label.dataobj).reshape(_spatial_shape(label))
            if check_values:
                ints = _integer_values(voxels)
                if ints is None:
                    bad = voxels[~np.isfinite(voxels) | (np.rint(voxels) != voxels)]
                    found.append(f"label {item.label} is not integer-valued (e.g. value {bad.flat[0]!r}, "
                                 f"dtype {voxels.dtype})")
                else:
                    allowed = {0, *(lo for lo, _ in pairs)}
                    extra = [int(v) for v in np.unique(ints) if int(v) not in allowed]
                    if extra:
                        shown = extra[:_MAX_LISTED_VALUES] + (["..."] if len(extra) > _MAX_LISTED_VALUES else [])
                        found.append(f"label {item.label} has values {shown} that are not in the label mapping "
                                     f"(allowed: {sorted(allowed)})")
    return [f"{item.case_id}: {p}" for p in found], voxels


def check_items(items: Iterable[DataItem], mapping: Any, *, storage_options: Mapping[str, Any] | None = None,
                check_values: bool = True) -> None:
    """Verify every item's files before training or evaluation; raise once with all problems.

    Checked per item: every image channel and the label exist and are readable NIfTI (the file is named);
    channels share shape and affine; the label has the image's shape and affine (within
    :data:`AFFINE_TOLERANCE_MM`); and, when ``check_values``, the label is integer-valued and holds only 0
    and the mapping's local ids (offending values listed). Each file is read once, whole.

    Raises:
        LabelMappingError: ``mapping`` is malformed.
        DataListError: listing every problem of every item (``details["problems"]``).
    """
    problems: list[str] = []
    for item in items:
        found, _ = inspect_item(item, mapping, storage_options=storage_options, check_values=check_values)
        problems.extend(found)
    if problems:
        raise DataListError(problems, source="data list check",
                            hint="fix or remove the listed items; label maps must share the image grid and use "
                                 "only 0 and the mapped local ids")
