"""The project's label catalog file format (``nvseg-label-catalog/1``): one class, reading and validating a file.

:meth:`nvseg_ray.labels.LabelCatalog.to_dict` writes this format and
:meth:`~nvseg_ray.labels.LabelCatalog.from_file` reads it (through :func:`parse_project`). The small
validators here (``require``, ``as_int``, ...) are shared with the upstream-bundle reader (:mod:`.bundle`):
every structural problem is a :class:`~nvseg_ray.errors.ConfigError` naming the offending entry.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from nvseg_ray.errors import ConfigError

from .codes import SegmentCoding, coding_from_dict
from .parsing import INT_TEXT, is_deprecated_name

if TYPE_CHECKING:
    from .catalog import LabelCatalog

#: Identifier written into (and required from) project catalog files.
CATALOG_FORMAT = "nvseg-label-catalog/1"


@dataclass(frozen=True)
class LabelClass:
    """One class of the global label space.

    Attributes:
        id: global class id (1..345 for the released model).
        name: display name (upstream ``channel_def``).
        modalities: scan types the class was trained on, upstream ``label_dict`` ``datasets`` tags
            (``"CT"``, ``"MRI"``); empty for deprecated classes and for the kidney group (2).
        datasets: training datasets per scan type, e.g. ``{"CT": ("AMOS22", ...), "MRI": (...)}``.
        deprecated: the class is retired (no training data); class prompts for it are refused.
        dicom: DICOM SEG coding (SNOMED CT category/type, laterality, colour; :mod:`.codes`), ``None`` when
            the catalog carries none (upstream bundles, most finetuned catalogs). Presentation metadata only:
            it is left out of equality, so a catalog read from an upstream bundle equals the packaged one.
    """

    id: int
    name: str
    modalities: tuple[str, ...] = ()
    datasets: Mapping[str, tuple[str, ...]] = field(default_factory=dict, hash=False)
    deprecated: bool = False
    dicom: SegmentCoding | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "modalities", tuple(self.modalities))
        frozen = {key: tuple(names) for key, names in self.datasets.items()}
        object.__setattr__(self, "datasets", MappingProxyType(frozen))

    def to_dict(self, *, with_dicom: bool = False) -> dict[str, Any]:
        """JSON-serialisable form; with ``with_dicom`` (the catalog file form) it includes the ``"dicom"`` coding."""
        data: dict[str, Any] = {
            "id": self.id,
            "name": self.name,
            "modalities": list(self.modalities),
            "datasets": {key: list(names) for key, names in self.datasets.items()},
            "deprecated": self.deprecated,
        }
        if with_dicom and self.dicom is not None:
            data["dicom"] = self.dicom.to_dict()
        return data


def read_json(path: Path) -> tuple[Any, str]:
    """Parse a json file; returns ``(data, sha256 hex of the bytes)``."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read label file {path}: {exc.strerror or exc}",
                          hint="check the --catalog / --bundle-dir path") from exc
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
    return data, hashlib.sha256(raw).hexdigest()


_PROJECT_KEYS = {"format", "source", "classes", "everything", "subclasses", "label_mappings"}
_CLASS_KEYS = {"id", "name", "modalities", "datasets", "deprecated", "dicom"}


def require(condition: bool, message: str) -> None:
    """Raise a :class:`ConfigError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(message, hint=f"regenerate the file with scripts/build_label_catalog.py ({CATALOG_FORMAT})")


def as_int(value: Any, where: str) -> int:
    require(isinstance(value, int) and not isinstance(value, bool), f"{where} must be an integer, got {value!r}")
    return int(value)


def int_key(value: str, where: str) -> int:
    require(isinstance(value, str) and bool(INT_TEXT.fullmatch(value)), f"{where} key {value!r} is not an integer")
    return int(value)


def as_list(value: Any, where: str) -> list[Any]:
    require(isinstance(value, list), f"{where} must be a list, got {type(value).__name__}")
    return value


def as_dict(value: Any, where: str) -> dict[str, Any]:
    require(isinstance(value, dict), f"{where} must be an object, got {type(value).__name__}")
    return value


def str_list(value: Any, where: str) -> tuple[str, ...]:
    items = as_list(value, where)
    require(all(isinstance(item, str) for item in items), f"{where} must be a list of strings")
    return tuple(items)


def int_list(value: Any, where: str) -> tuple[int, ...]:
    return tuple(as_int(item, where) for item in as_list(value, where))


def as_pairs(value: Any, where: str) -> tuple[tuple[int, int], ...]:
    pairs = []
    for item in as_list(value, where):
        require(isinstance(item, list) and len(item) == 2, f"{where} entries must be [local, global] pairs")
        pairs.append((as_int(item[0], where), as_int(item[1], where)))
    return tuple(pairs)


def parse_class(entry: Any, position: int) -> LabelClass:
    where = f"classes[{position}]"
    entry = as_dict(entry, where)
    unknown = sorted(set(entry) - _CLASS_KEYS)
    require(not unknown, f"{where} has unknown keys {unknown}")
    require("id" in entry and "name" in entry, f"{where} needs 'id' and 'name'")
    name = entry["name"]
    require(isinstance(name, str) and bool(name.strip()), f"{where}.name must be a non-empty string")
    deprecated = entry.get("deprecated", is_deprecated_name(name))
    require(isinstance(deprecated, bool), f"{where}.deprecated must be true or false")
    datasets = as_dict(entry.get("datasets", {}), f"{where}.datasets")
    return LabelClass(
        id=as_int(entry["id"], f"{where}.id"),
        name=name,
        modalities=str_list(entry.get("modalities", []), f"{where}.modalities"),
        datasets={key: str_list(names, f"{where}.datasets.{key}") for key, names in datasets.items()},
        deprecated=deprecated,
        dicom=coding_from_dict(entry["dicom"], f"{where}.dicom") if entry.get("dicom") is not None else None,
    )


def parse_project(cls: type[LabelCatalog], data: Any) -> LabelCatalog:
    """Project-format dict -> catalog, validating the structure."""
    data = as_dict(data, "label catalog")
    require(data.get("format") == CATALOG_FORMAT,
             f"unsupported label catalog format {data.get('format')!r} (expected {CATALOG_FORMAT!r})")
    unknown = sorted(set(data) - _PROJECT_KEYS)
    require(not unknown, f"unknown top-level keys {unknown}")
    classes: dict[int, LabelClass] = {}
    for position, entry in enumerate(as_list(data.get("classes"), "classes")):
        label = parse_class(entry, position)
        require(label.id not in classes, f"class id {label.id} is listed twice")
        classes[label.id] = label
    everything = as_dict(data.get("everything", {}), "everything")
    subclasses = as_dict(data.get("subclasses", {}), "subclasses")
    mappings = as_dict(data.get("label_mappings", {}), "label_mappings")
    return cls(
        classes=classes,
        everything={key: int_list(ids, f"everything.{key}") for key, ids in everything.items()},
        subclasses={int_key(k, "subclasses"): int_list(v, f"subclasses.{k}") for k, v in subclasses.items()},
        label_mappings={key: as_pairs(pairs, f"label_mappings.{key}") for key, pairs in mappings.items()},
        source=as_dict(data.get("source", {}), "source"),
    )
