"""Reading an upstream NV-Segment-CTMR bundle's label files into a :class:`~nvseg_ray.labels.LabelCatalog`.

The files are ``configs/label_dict.json`` (names, modality tags, training datasets), ``configs/metadata.json``
(``channel_def`` names, everything-labels) and ``configs/label_mappings.json`` (dataset-local -> global ids).
Two facts live only in upstream's ``configs/inference.json``, which is code rather than data, so they are
the named constants below: the CT_BODY exclusion set and the subclass dict (docs/upstream.md, Preprocessing,
step 5).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from nvseg_ray.errors import ConfigError

from .parsing import dedupe, is_deprecated_name
from .schema import LabelClass, as_dict, as_int, as_pairs, int_key, require, str_list

if TYPE_CHECKING:
    from .catalog import LabelCatalog

#: CT_BODY is built from the original VISTA3D CT ids 1..132 ...
CT_BODY_MAX_ID = 132
#: ... minus these ids. Source: upstream ``configs/inference.json`` (``ct_body``); the set is not in
#: any upstream json data file (metadata ``everything_labels.CT_BODY`` lists all 132 names and is
#: not the list upstream actually segments). Same set as the original VISTA3D CT bundle.
CT_BODY_EXCLUDED: frozenset[int] = frozenset({2, 16, 18, 20, 21, 23, 24, 25, 26, 27, 128, 129, 130, 131, 132})

#: The MRI everything-sets are the global targets of these training-dataset label mappings, in the
#: mapping's order (upstream ``inference.json``: ``mri_body`` / ``mri_brain``).
MRI_EVERYTHING_DATASETS: Mapping[str, str] = MappingProxyType(
    {"MRI_BODY": "TotalSegmentatorMR", "MRI_BRAIN": "LUMIR"}
)

#: Group prompts expanded into their parts. Source: upstream ``configs/inference.json`` ``subclass``
#: (used by ``VistaPreTransformd``): 2 kidney, 20 lung, 21 bone.
SUBCLASSES: Mapping[int, tuple[int, ...]] = MappingProxyType(
    {
        2: (14, 5),
        20: (28, 29, 30, 31, 32),
        21: tuple(range(33, 57)) + tuple(range(63, 98)) + (114, 120, 122),
    }
)

#: The upstream label files, in the order they are looked for (the first two: either one is enough).
UPSTREAM_FILES = ("label_dict.json", "metadata.json", "label_mappings.json")


def find_upstream_folder(path: Path) -> Path:
    """The folder holding the upstream label files: ``path`` itself or ``path/configs``."""
    if not path.is_dir():
        raise ConfigError(f"upstream bundle folder {path} does not exist or is not a folder",
                          hint="pass the bundle root, its configs/ folder, or a folder holding label_dict.json")
    for folder in (path, path / "configs"):
        if any((folder / name).is_file() for name in UPSTREAM_FILES[:2]):
            return folder
    raise ConfigError(
        f"no upstream label files (label_dict.json or metadata.json) in {path} or {path / 'configs'}",
        hint="pass the bundle root, its configs/ folder, or a folder holding label_dict.json / metadata.json",
    )


def detect_kind(data: Any) -> str | None:
    """``"project"``, ``"metadata.json"``, ``"label_dict.json"`` or None for an unknown json document."""
    if not isinstance(data, dict):
        return None
    if "format" in data and "classes" in data:
        return "project"
    if "network_data_format" in data:
        return "metadata.json"
    if data and all(isinstance(v, dict) and "index" in v for v in data.values()):
        return "label_dict.json"
    return None


def _channel_def(metadata: Any) -> dict[int, str]:
    """metadata ``network_data_format.outputs.pred.channel_def`` without background."""
    try:
        channel_def = metadata["network_data_format"]["outputs"]["pred"]["channel_def"]
    except (KeyError, TypeError) as exc:
        raise ConfigError("metadata.json has no network_data_format.outputs.pred.channel_def") from exc
    channel_def = as_dict(channel_def, "metadata.json channel_def")
    names = {int_key(key, "metadata.json channel_def"): value for key, value in channel_def.items()}
    require(all(isinstance(v, str) for v in names.values()), "metadata.json channel_def values must be names")
    return {cid: name for cid, name in names.items() if cid != 0}


def _metadata_everything(metadata: Any, key: str) -> tuple[int, ...] | None:
    """Ids of metadata ``everything_labels[key]`` in key order (without background), if present."""
    if not isinstance(metadata, dict):
        return None
    data_format = metadata.get("network_data_format")
    table = metadata.get("everything_labels")
    if isinstance(data_format, dict) and "everything_labels" in data_format:
        table = data_format["everything_labels"]
    if not isinstance(table, dict) or not isinstance(table.get(key), dict):
        return None
    ids = (int_key(k, f"metadata.json everything_labels.{key}") for k in table[key])
    return tuple(cid for cid in ids if cid != 0)


def _label_dict_classes(label_dict: Any) -> dict[int, LabelClass]:
    """label_dict.json (name -> {index, datasets, CT: [...], MRI: [...]}) -> classes."""
    label_dict = as_dict(label_dict, "label_dict.json")
    classes: dict[int, LabelClass] = {}
    for name, entry in label_dict.items():
        where = f"label_dict.json[{name!r}]"
        entry = as_dict(entry, where)
        cid = as_int(entry.get("index"), f"{where}.index")
        require(cid not in classes, f"label_dict.json lists index {cid} twice")
        datasets = {
            key: tuple(sorted(str_list(value, f"{where}.{key}")))
            for key, value in sorted(entry.items())
            if key not in ("index", "datasets")
        }
        modalities = str_list(entry.get("datasets", []), f"{where}.datasets")
        classes[cid] = LabelClass(cid, name, modalities, datasets, is_deprecated_name(name))
    return classes


def _merge_names(classes: dict[int, LabelClass], names: Mapping[int, str]) -> dict[int, LabelClass]:
    """Overlay channel_def names (authoritative) onto label_dict classes; add channel_def-only ids."""
    merged = dict(classes)
    for cid, name in names.items():
        base = classes.get(cid)
        modalities = base.modalities if base else ()
        datasets = base.datasets if base else {}
        merged[cid] = LabelClass(cid, name, modalities, datasets, is_deprecated_name(name))
    return merged


def _everything_sets(
    classes: Mapping[int, LabelClass], metadata: Any, mappings: Mapping[str, tuple[tuple[int, int], ...]]
) -> dict[str, tuple[int, ...]]:
    """CT_BODY from the constants; MRI sets from label_mappings, else from metadata key order."""
    sets: dict[str, tuple[int, ...]] = {}
    ct_body = tuple(cid for cid in range(1, CT_BODY_MAX_ID + 1) if cid not in CT_BODY_EXCLUDED and cid in classes)
    if ct_body:
        sets["CT_BODY"] = ct_body
    for key, dataset in MRI_EVERYTHING_DATASETS.items():
        if dataset in mappings:
            ids: tuple[int, ...] | None = dedupe(glob for _, glob in mappings[dataset])
        else:
            ids = _metadata_everything(metadata, key)
        if ids:
            sets[key] = ids
    return sets


def _source(metadata: Any, digests: Mapping[str, str]) -> dict[str, Any]:
    """Provenance: bundle name/version/MONAI version and sha256 of each file read."""
    source: dict[str, Any] = {"kind": "upstream-bundle"}
    if isinstance(metadata, dict):
        for key in ("name", "version", "monai_version"):
            if isinstance(metadata.get(key), str):
                source[key] = metadata[key]
    source["files"] = {name: digests[name] for name in sorted(digests)}
    return source


def parse_upstream(cls: type[LabelCatalog], data: Mapping[str, Any], digests: Mapping[str, str]) -> LabelCatalog:
    """Upstream label files (keyed by upstream file name) -> catalog."""
    metadata = data.get("metadata.json")
    require(metadata is not None or "label_dict.json" in data, "neither label_dict.json nor metadata.json given")
    classes = _label_dict_classes(data["label_dict.json"]) if "label_dict.json" in data else {}
    if metadata is not None:
        classes = _merge_names(classes, _channel_def(metadata))
    raw_mappings = as_dict(data.get("label_mappings.json", {}), "label_mappings.json")
    mappings = {key: as_pairs(pairs, f"label_mappings.json[{key!r}]") for key, pairs in raw_mappings.items()}
    subclasses = {
        parent: parts
        for parent, parts in SUBCLASSES.items()
        if parent in classes and all(part in classes for part in parts)
    }
    return cls(
        classes=classes,
        everything=_everything_sets(classes, metadata, mappings),
        subclasses=subclasses,
        label_mappings=mappings,
        source=_source(metadata, digests),
    )
