"""Tests of the DICOM SEG codings of label classes (nvseg_ray.labels.codes, scripts/data/segment_codes.csv)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nvseg_ray.errors import ConfigError, PromptError
from nvseg_ray.labels import LabelCatalog
from nvseg_ray.labels.codes import (
    ANATOMICAL_STRUCTURE,
    LEFT,
    MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
    RIGHT,
    TABLE_COLUMNS,
    Coded,
    SegmentCoding,
    generic_coding,
    laterality,
    palette_color,
    read_code_table,
    segment_coding,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
CODE_TABLE = REPO_ROOT / "scripts" / "data" / "segment_codes.csv"
PACKAGED = REPO_ROOT / "nvseg_ray" / "resources" / "label_catalog.json"
UPSTREAM_DATA = REPO_ROOT.parent / "shared" / "reference" / "upstream-data"
needs_upstream = pytest.mark.skipif(
    not (UPSTREAM_DATA / "label_dict.json").is_file(),
    reason=f"upstream reference label files not found at {UPSTREAM_DATA} (../shared is not checked out)",
)
#: Category concepts of DICOM CID 7150 that the table uses.
CATEGORIES = {"91723000", "49755003", "85756007"}


@pytest.fixture(scope="module")
def catalog() -> LabelCatalog:
    return LabelCatalog.default()


@pytest.fixture(scope="module")
def sct_meanings() -> dict[str, set[str]]:
    """pydicom's SNOMED CT dictionary: code value -> every meaning pydicom spells for it (lower case)."""
    concepts = pytest.importorskip("pydicom.sr._concepts_dict").concepts
    found: dict[str, set[str]] = {}
    for entry in concepts["SCT"].values():
        for value, (meaning, _cids) in entry.items():
            found.setdefault(value, set()).add(meaning.lower())
    return found


def _codes(coding: SegmentCoding) -> list[Coded]:
    return [c for c in (coding.category, coding.type, coding.modifier, coding.region) if c is not None]


# ------------------------------------------------------------------ coverage and form


def test_every_class_has_a_coding(catalog: LabelCatalog) -> None:
    assert len(catalog.classes) == 345
    for cid, label in catalog.classes.items():
        assert label.dicom is not None, cid
        assert segment_coding(catalog, cid) is label.dicom


def test_codes_are_well_formed(catalog: LabelCatalog) -> None:
    for cid in catalog.classes:
        coding = segment_coding(catalog, cid)
        assert coding.category.value in CATEGORIES, cid
        for code in _codes(coding):
            assert code.scheme == "SCT"
            assert re.fullmatch(r"[1-9][0-9]{5,17}", code.value), (cid, code)
            assert code.meaning.strip() == code.meaning and 0 < len(code.meaning) <= 64, (cid, code)
        assert len(coding.color) == 3 and all(0 <= c <= 255 for c in coding.color)
        assert coding.source


def test_known_codes_match_pydicom(catalog: LabelCatalog, sct_meanings: dict[str, set[str]]) -> None:
    """Every code pydicom knows carries one of pydicom's meanings for it; the generic and category
    concepts and every modifier are in pydicom's dictionary."""
    unknown = set()
    for cid in catalog.classes:
        coding = segment_coding(catalog, cid)
        for code in _codes(coding):
            if code.value in sct_meanings:
                assert code.meaning.lower() in sct_meanings[code.value], (cid, code, sct_meanings[code.value])
            else:
                unknown.add(code.value)
                assert code is coding.type, f"class {cid}: {code} (not a type) is not in pydicom's dictionary"
                assert coding.source.startswith("TotalSegmentator:"), f"class {cid}: {code} has no published source"
    # Only TotalSegmentator-published type codes are outside pydicom's dictionary (ribs, S1, some muscles...).
    assert len(unknown) <= 19, sorted(unknown)


def test_generic_codings_are_the_documented_concepts(catalog: LabelCatalog) -> None:
    generic = [cid for cid in catalog.classes if segment_coding(catalog, cid).generic]
    assert 0 < len(generic) < len(catalog.classes)
    for cid in generic:
        coding = segment_coding(catalog, cid)
        assert coding.type == coding.category
        assert coding.type in (ANATOMICAL_STRUCTURE, MORPHOLOGICALLY_ABNORMAL_STRUCTURE)
        assert coding.region is None
    for cid in catalog.classes:
        coding = segment_coding(catalog, cid)
        if not coding.generic:
            assert coding.type not in (ANATOMICAL_STRUCTURE, MORPHOLOGICALLY_ABNORMAL_STRUCTURE), cid


def test_generic_classes_are_named_in_the_docs(catalog: LabelCatalog) -> None:
    doc = (REPO_ROOT / "docs" / "dicom-codes.md").read_text(encoding="utf-8")
    table = doc.split("## Generic codes", 1)[1].split("\n\n| ids |", 1)[1].split("\n\n", 1)[0]
    listed: set[int] = set()
    for row in table.splitlines()[2:]:
        for first, last in re.findall(r"(\d+)(?:-(\d+))?", row.split("|")[1]):
            listed.update(range(int(first), int(last or first) + 1))
    generic = {cid for cid in catalog.classes if segment_coding(catalog, cid).generic}
    assert listed == generic, (sorted(generic - listed), sorted(listed - generic))


def test_lateral_names_carry_the_side(catalog: LabelCatalog) -> None:
    """A name saying left/right gets that laterality modifier, unless the type concept itself names the side
    (e.g. "Left ventricle", "Middle lobe of right lung"); a modifier is never the opposite side."""
    lateral = 0
    for cid, label in catalog.classes.items():
        coding = segment_coding(catalog, cid)
        side = laterality(label.name)
        if side is None:
            assert coding.modifier is None, (cid, label.name)
            continue
        lateral += 1
        if coding.modifier is not None:
            assert coding.modifier == side, (cid, label.name)
        else:
            assert side.meaning.lower() in coding.type.meaning.lower(), (cid, label.name, coding.type)
        opposite = RIGHT if side == LEFT else LEFT
        assert opposite.meaning.lower() not in coding.type.meaning.lower().split(), (cid, coding.type)
    assert lateral > 200


@pytest.mark.parametrize(
    ("class_id", "type_value", "modifier", "region"),
    [
        (1, "10200004", None, None),                    # liver
        (5, "64033007", "24028007", None),              # right kidney
        (14, "64033007", "7771000", None),              # left kidney
        (26, "108369006", None, "10200004"),            # hepatic tumor: neoplasm in the liver
        (33, "49668003", None, None),                   # vertebrae L5
        (123, "36765005", "7771000", None),             # left subclavian artery (not TotalSegmentator's 29700009)
        (151, "87878005", None, None),                  # left ventricle: the side is in the concept
        (229, "5366008", "24028007", None),             # Right-Hippocampus
    ],
)
def test_selected_codings(catalog: LabelCatalog, class_id: int, type_value: str, modifier: str | None,
                          region: str | None) -> None:
    coding = segment_coding(catalog, class_id)
    assert coding.type.value == type_value
    assert (coding.modifier.value if coding.modifier else None) == modifier
    assert (coding.region.value if coding.region else None) == region
    assert not coding.generic


def test_colours_are_mostly_distinct(catalog: LabelCatalog) -> None:
    colours = [segment_coding(catalog, cid).color for cid in catalog.classes]
    assert len(set(colours)) >= len(colours) - 5


def test_palette_is_deterministic_and_spread() -> None:
    colours = [palette_color(cid) for cid in range(1, 512)]
    assert colours == [palette_color(cid) for cid in range(1, 512)]
    assert len(set(colours)) == len(colours)


# ------------------------------------------------------------------ fallbacks


def test_background_and_out_of_range_ids_are_refused(catalog: LabelCatalog) -> None:
    with pytest.raises(PromptError, match="background"):
        segment_coding(catalog, 0)
    with pytest.raises(PromptError):
        segment_coding(catalog, 512)


def test_zero_shot_ids_get_a_generic_coding(catalog: LabelCatalog) -> None:
    coding = segment_coding(catalog, 400)
    assert coding.generic and coding.type == ANATOMICAL_STRUCTURE and coding.modifier is None


@needs_upstream
def test_upstream_bundle_catalog_uses_the_packaged_codes(catalog: LabelCatalog) -> None:
    upstream = LabelCatalog.from_upstream_bundle(UPSTREAM_DATA)
    assert upstream == catalog  # codings are presentation metadata, outside equality
    assert all(label.dicom is None for label in upstream.classes.values())
    for cid in (1, 5, 116, 248):
        assert segment_coding(upstream, cid) == segment_coding(catalog, cid)


def test_finetuned_catalog_falls_back_by_name_then_generic(tmp_path: Path) -> None:
    data = {
        "format": "nvseg-label-catalog/1",
        "classes": [{"id": 1, "name": "Left Kidney"}, {"id": 2, "name": "right kidney tumour"},
                    {"id": 3, "name": "gizmo"}],
    }
    path = tmp_path / "ft.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    custom = LabelCatalog.load(path)
    packaged = LabelCatalog.default()
    assert segment_coding(custom, 1) == segment_coding(packaged, 14)
    tumour = segment_coding(custom, 2)
    assert tumour.generic and tumour.type == MORPHOLOGICALLY_ABNORMAL_STRUCTURE and tumour.modifier == RIGHT
    assert segment_coding(custom, 3) == generic_coding(3, "gizmo")


# ------------------------------------------------------------------ catalog file and build


def test_catalog_file_keeps_codings(catalog: LabelCatalog, tmp_path: Path) -> None:
    path = tmp_path / "catalog.json"
    path.write_text(catalog.to_json(), encoding="utf-8")
    again = LabelCatalog.from_file(path)
    assert [label.dicom for label in again.classes.values()] == [label.dicom for label in catalog.classes.values()]
    assert again.to_json() == catalog.to_json() == PACKAGED.read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(type=["10200004", "SCT"]), "must be [code value, scheme, meaning]"),
        (lambda d: d.update(type=["LIVER", "SCT", "Liver"]), "is not a concept id"),
        (lambda d: d.update(category=["1", "LN", "x"]), "coding scheme 'LN'"),
        (lambda d: d.update(color=[0, 0, 256]), "0-255"),
        (lambda d: d.update(generic="no"), "true or false"),
        (lambda d: d.update(colour=[1, 2, 3]), "unknown keys"),
        (lambda d: d.pop("type"), "lacks ['type']"),
    ],
)
def test_bad_codings_are_refused(catalog: LabelCatalog, tmp_path: Path, mutate, message: str) -> None:
    data = catalog.to_dict()
    mutate(data["classes"][0]["dicom"])
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        LabelCatalog.from_file(path)
    assert message in str(caught.value)
    assert "classes[0].dicom" in str(caught.value)


def test_code_table_covers_the_catalog(catalog: LabelCatalog) -> None:
    codings = read_code_table(CODE_TABLE, catalog)
    assert sorted(codings) == list(catalog.classes)
    assert all(codings[cid] == label.dicom for cid, label in catalog.classes.items())


def _table_rows() -> list[str]:
    return CODE_TABLE.read_text(encoding="utf-8").splitlines()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda rows: rows[:-1], "no DICOM code row for class ids [345]"),
        (lambda rows: [*rows, rows[1]], "second row"),
        (lambda rows: [rows[0], rows[1].replace(",liver,", ",lever,"), *rows[2:]], "review its codes"),
        (lambda rows: [rows[0], rows[1].replace("40 140 40", "40 140"), *rows[2:]], "'r g b'"),
        (lambda rows: [rows[0].replace("note", "remark"), *rows[1:]], "columns must be"),
    ],
)
def test_bad_code_tables_are_refused(catalog: LabelCatalog, tmp_path: Path, edit, message: str) -> None:
    path = tmp_path / "codes.csv"
    path.write_text("\n".join(edit(_table_rows())) + "\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        read_code_table(path, catalog)
    assert message in str(caught.value)


def test_table_columns() -> None:
    assert _table_rows()[0].split(",") == list(TABLE_COLUMNS)


@needs_upstream
def test_build_script_reproduces_the_packaged_catalog(tmp_path: Path) -> None:
    out = tmp_path / "label_catalog.json"
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "build_label_catalog.py"), "--bundle-dir", str(UPSTREAM_DATA),
         "--output", str(out)],
        capture_output=True, text=True, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert out.read_text(encoding="utf-8") == PACKAGED.read_text(encoding="utf-8")
    match = re.search(r"DICOM codes: (\d+) specific, (\d+) generic", done.stdout)
    assert match and int(match[1]) + int(match[2]) == 345


def test_codes_module_imports_no_dicom_library() -> None:
    code = ("import sys, nvseg_ray.labels.codes as c; from nvseg_ray.labels import LabelCatalog; "
            "c.segment_coding(LabelCatalog.default(), 1); "
            "assert not {'pydicom', 'highdicom'} & set(sys.modules), sorted(sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr


def test_cli_prints_the_dicom_codes(capsys):
    """``nvseg labels --json --dicom-codes`` shows each class's SEG coding (what a PACS will display)."""
    import json

    from nvseg_ray.cli import main

    assert main(["labels", "--search", "left kidney", "--json", "--dicom-codes"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows and all(r["dicom"]["category"] and r["dicom"]["type"] for r in rows)
    assert any(r["dicom"].get("modifier") and "Left" in json.dumps(r["dicom"]["modifier"]) for r in rows)
