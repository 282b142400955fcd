"""DICOM SEG codings of label classes: SNOMED CT segmented-property category / type, laterality, display colour.

Every class of the packaged catalog carries a reviewed coding (``"dicom"`` entry of the class in
``nvseg_ray/resources/label_catalog.json``), folded in by ``scripts/build_label_catalog.py`` from
``scripts/data/segment_codes.csv``; docs/dicom-codes.md says where each code comes from and which classes
only get a generic code. :func:`segment_coding` answers for any class id of any catalog:

1. the class's own coding when its catalog carries one (the packaged catalog does for all 345 classes);
2. otherwise, when the packaged catalog has a class of the same name (a catalog read from an upstream bundle
   or a finetuned catalog that kept upstream names), that class's coding;
3. otherwise a *generic* coding (``generic=True``): category and type SCT 91723000 "Anatomical Structure",
   or SCT 49755003 "Morphologically Abnormal Structure" when the name says tumour / lesion / cancer / mass /
   cyst / hyperintensity; the laterality modifier when the name says left or right; a palette colour.

This module imports no DICOM library; codes are plain ``(value, scheme, meaning)`` triples that the SEG
writer turns into ``pydicom.sr.coding.Code`` objects.
"""

from __future__ import annotations

import colorsys
import csv
import io
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nvseg_ray.errors import ConfigError, PromptError

if TYPE_CHECKING:
    from .catalog import LabelCatalog

#: Coding schemes a coding may use (SNOMED CT; DCM for the few DICOM-defined concepts).
SCHEMES: tuple[str, ...] = ("SCT", "DCM")


@dataclass(frozen=True)
class Coded:
    """One coded concept, e.g. ``Coded("10200004", "SCT", "Liver")``.

    Attributes:
        value: code value (SNOMED CT concept id: digits only).
        scheme: coding scheme designator (``"SCT"``; ``"DCM"``).
        meaning: code meaning as written into the SEG (the DICOM / pydicom spelling where known).
    """

    value: str
    scheme: str
    meaning: str

    def to_list(self) -> list[str]:
        """``[value, scheme, meaning]``, the catalog file form."""
        return [self.value, self.scheme, self.meaning]


@dataclass(frozen=True)
class SegmentCoding:
    """How a class is described in a DICOM SEG segment.

    Attributes:
        category: Segmented Property Category (CID 7150), e.g. SCT 91723000 "Anatomical Structure".
        type: Segmented Property Type, e.g. SCT 10200004 "Liver".
        modifier: Segmented Property Type Modifier for laterality (SCT 7771000 "Left" / 24028007 "Right"),
            ``None`` when the class is not lateral (or its type concept already says the side).
        color: recommended display colour, sRGB ``(r, g, b)`` 0-255 (the SEG writer converts it to CIELab).
        generic: ``True`` when no specific SNOMED CT concept is known for the class and ``type`` is a
            generic one (docs/dicom-codes.md lists those classes and why).
        source: where the codes and colour come from (e.g. ``"TotalSegmentator:liver"``, ``"pydicom SCT"``).
        region: anatomic region the type is located in (DICOM Anatomic Region Sequence), e.g. SCT 10200004
            "Liver" for a "Neoplasm" segment; ``None`` when the type is itself anatomy.
    """

    category: Coded
    type: Coded
    modifier: Coded | None
    color: tuple[int, int, int]
    generic: bool
    source: str = ""
    region: Coded | None = None

    def to_dict(self) -> dict[str, Any]:
        """The catalog file form (the ``"dicom"`` entry of a class)."""
        data: dict[str, Any] = {"category": self.category.to_list(), "type": self.type.to_list()}
        if self.modifier is not None:
            data["modifier"] = self.modifier.to_list()
        if self.region is not None:
            data["region"] = self.region.to_list()
        data.update(color=list(self.color), generic=self.generic, source=self.source)
        return data


# Generic concepts (all in pydicom's SCT dictionary; the categories are members of CID 7150).
ANATOMICAL_STRUCTURE = Coded("91723000", "SCT", "Anatomical Structure")
MORPHOLOGICALLY_ABNORMAL_STRUCTURE = Coded("49755003", "SCT", "Morphologically Abnormal Structure")
TISSUE = Coded("85756007", "SCT", "Tissue")
LEFT = Coded("7771000", "SCT", "Left")
RIGHT = Coded("24028007", "SCT", "Right")

_ABNORMAL_WORDS = re.compile(r"tumou?r|lesion|cancer|mass|cyst|neoplasm|metasta|hyperintensit", re.IGNORECASE)
_LEFT = re.compile(r"(^|[^a-z])left([^a-z]|$)", re.IGNORECASE)
_RIGHT = re.compile(r"(^|[^a-z])right([^a-z]|$)", re.IGNORECASE)
_CODE_VALUE = re.compile(r"[0-9]{1,18}")


def laterality(name: str) -> Coded | None:
    """The laterality modifier a class name asks for: :data:`LEFT`, :data:`RIGHT` or ``None``.

    ``"left kidney"``, ``"breast left"``, ``"Left-Hippocampus"`` are lateral; a name mentioning both sides
    (or neither) is not.
    """
    left, right = bool(_LEFT.search(name)), bool(_RIGHT.search(name))
    if left == right:
        return None
    return LEFT if left else RIGHT


def palette_color(class_id: int) -> tuple[int, int, int]:
    """Deterministic, well-spread display colour for ``class_id`` (golden-ratio hue steps, 3 lightness bands).

    Used for classes whose source gives no colour and for generic codings.
    """
    hue = (class_id * 0.6180339887498949) % 1.0
    lightness = (0.45, 0.58, 0.36)[class_id % 3]
    saturation = (0.75, 0.62, 0.85)[(class_id // 3) % 3]
    red, green, blue = colorsys.hls_to_rgb(hue, lightness, saturation)
    return (round(red * 255), round(green * 255), round(blue * 255))


def generic_coding(class_id: int, name: str) -> SegmentCoding:
    """The documented fallback coding for a class without a known concept (``generic=True``)."""
    concept = MORPHOLOGICALLY_ABNORMAL_STRUCTURE if _ABNORMAL_WORDS.search(name) else ANATOMICAL_STRUCTURE
    return SegmentCoding(
        category=concept,
        type=concept,
        modifier=laterality(name),
        color=palette_color(class_id),
        generic=True,
        source="generic",
    )


def segment_coding(catalog: LabelCatalog, class_id: int) -> SegmentCoding:
    """The DICOM SEG coding of ``class_id`` in ``catalog`` (rules in the module docstring).

    Args:
        catalog: the label catalog the mask's ids belong to.
        class_id: a global class id; ids without a class below 512 (zero-shot point-prompt classes) get a
            generic coding.

    Raises:
        PromptError: ``class_id`` is 0 (background is not a segment) or outside the label space.
    """
    if class_id == 0:
        raise PromptError(
            "class id 0 is background and has no segment coding",
            hint="only labels > 0 become DICOM SEG segments",
            class_id=0,
        )
    name = catalog.name(class_id)  # raises PromptError outside 0..511
    label = catalog.classes.get(class_id)
    if label is not None and label.dicom is not None:
        return label.dicom
    if label is not None:
        found = _packaged_by_name(catalog, name)
        if found is not None:
            return found
    return generic_coding(class_id, name)


def _packaged_by_name(catalog: LabelCatalog, name: str) -> SegmentCoding | None:
    """The packaged catalog's coding of the class called ``name`` (same lookup key as prompts), if any."""
    packaged = type(catalog).default()  # the catalog's own class: no import of .catalog here (no cycle)
    if packaged is catalog:
        return None
    try:
        found = packaged.resolve(name)
    except PromptError:
        return None
    label = packaged.classes.get(found)
    return label.dicom if label is not None else None


# --------------------------------------------------------------------------------------------
# Catalog file form
# --------------------------------------------------------------------------------------------


def _fail(where: str, problem: str) -> ConfigError:
    return ConfigError(
        f"{where} {problem}",
        hint="regenerate the catalog with scripts/build_label_catalog.py (codes: scripts/data/segment_codes.csv)",
    )


def coded_from_list(value: Any, where: str) -> Coded:
    """``[value, scheme, meaning]`` -> :class:`Coded`, validating it (:class:`ConfigError` naming ``where``)."""
    if not (isinstance(value, list) and len(value) == 3 and all(isinstance(item, str) for item in value)):
        raise _fail(where, f"must be [code value, scheme, meaning] strings, got {value!r}")
    code, scheme, meaning = value
    if scheme not in SCHEMES:
        raise _fail(where, f"uses coding scheme {scheme!r}; expected one of {', '.join(SCHEMES)}")
    if scheme == "SCT" and not _CODE_VALUE.fullmatch(code):
        raise _fail(where, f"SNOMED CT code value {code!r} is not a concept id (digits)")
    if not code.strip() or not meaning.strip() or len(meaning) > 64:
        raise _fail(where, f"needs a code value and a meaning of 1-64 characters, got {value!r}")
    return Coded(code, scheme, meaning)


def coding_from_dict(value: Any, where: str) -> SegmentCoding:
    """The ``"dicom"`` entry of a catalog class -> :class:`SegmentCoding`, validating every field."""
    if not isinstance(value, Mapping):
        raise _fail(where, f"must be an object, got {type(value).__name__}")
    allowed = {"category", "type", "modifier", "region", "color", "generic", "source"}
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise _fail(where, f"has unknown keys {unknown}")
    missing = sorted({"category", "type", "color", "generic"} - set(value))
    if missing:
        raise _fail(where, f"lacks {missing}")
    modifier = value.get("modifier")
    region = value.get("region")
    color = value["color"]
    if not (isinstance(color, list) and len(color) == 3
            and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in color)):
        raise _fail(f"{where}.color", f"must be [r, g, b] integers 0-255, got {color!r}")
    if not isinstance(value["generic"], bool):
        raise _fail(f"{where}.generic", "must be true or false")
    source = value.get("source", "")
    if not isinstance(source, str):
        raise _fail(f"{where}.source", "must be a string")
    return SegmentCoding(
        category=coded_from_list(value["category"], f"{where}.category"),
        type=coded_from_list(value["type"], f"{where}.type"),
        modifier=None if modifier is None else coded_from_list(modifier, f"{where}.modifier"),
        color=(color[0], color[1], color[2]),
        generic=value["generic"],
        source=source,
        region=None if region is None else coded_from_list(region, f"{where}.region"),
    )


# --------------------------------------------------------------------------------------------
# The reviewed code table (scripts/data/segment_codes.csv)
# --------------------------------------------------------------------------------------------

#: Columns of the code table, in order. Codes are SNOMED CT (scheme ``SCT``); an empty colour means
#: :func:`palette_color`; ``generic`` is ``yes`` / ``no``; ``note`` says why a code is generic or coarse.
TABLE_COLUMNS: tuple[str, ...] = (
    "id", "name", "category_code", "category_meaning", "type_code", "type_meaning", "modifier_code",
    "modifier_meaning", "region_code", "region_meaning", "color", "generic", "source", "note",
)


def read_code_table(path: Path, catalog: LabelCatalog) -> dict[int, SegmentCoding]:
    """Parse the reviewed code table at ``path`` into ``class id -> coding`` for every class of ``catalog``.

    Every class must have exactly one row whose ``name`` equals the class name (so a renamed or renumbered
    upstream class cannot silently keep a stale code). Problems raise :class:`ConfigError` naming the row.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read the DICOM code table {path}: {exc.strerror or exc}") from exc
    reader = csv.DictReader(io.StringIO(text))
    if tuple(reader.fieldnames or ()) != TABLE_COLUMNS:
        raise ConfigError(f"{path}: columns must be {', '.join(TABLE_COLUMNS)}; got {reader.fieldnames}")
    codings: dict[int, SegmentCoding] = {}
    for line, row in enumerate(reader, start=2):
        where = f"{path}:{line}"
        cid = int(row["id"]) if row["id"].isdigit() else -1
        if cid not in catalog.classes:
            raise ConfigError(f"{where}: id {row['id']!r} is not a class of the catalog")
        if cid in codings:
            raise ConfigError(f"{where}: class {cid} has a second row")
        if row["name"] != catalog.classes[cid].name:
            raise ConfigError(f"{where}: class {cid} is {catalog.classes[cid].name!r} in the catalog, "
                              f"not {row['name']!r}; review its codes")
        codings[cid] = _row_coding(row, cid, where)
    missing = sorted(set(catalog.classes) - set(codings))
    if missing:
        raise ConfigError(f"{path}: no DICOM code row for class ids {missing}",
                          hint="add a row per class (a generic code, generic=yes, when no concept is known)")
    return codings


def _row_coding(row: Mapping[str, str], cid: int, where: str) -> SegmentCoding:
    def code(prefix: str) -> Coded | None:
        value, meaning = row[f"{prefix}_code"].strip(), row[f"{prefix}_meaning"].strip()
        if not value and not meaning:
            return None
        return coded_from_list([value, "SCT", meaning], f"{where} {prefix}")

    if row["generic"] not in ("yes", "no"):
        raise ConfigError(f"{where}: generic must be yes or no, got {row['generic']!r}")
    category, kind = code("category"), code("type")
    if category is None or kind is None:
        raise ConfigError(f"{where}: category and type codes are required")
    if row["color"].strip():
        parts = row["color"].split()
        if len(parts) != 3 or not all(part.isdigit() and int(part) <= 255 for part in parts):
            raise ConfigError(f"{where}: color must be 'r g b' (0-255), got {row['color']!r}")
        color = (int(parts[0]), int(parts[1]), int(parts[2]))
    else:
        color = palette_color(cid)
    return SegmentCoding(
        category=category,
        type=kind,
        modifier=code("modifier"),
        color=color,
        generic=row["generic"] == "yes",
        source=row["source"].strip() + ("" if row["color"].strip() else "; colour palette"),
        region=code("region"),
    )
