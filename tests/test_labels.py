"""Tests of the label catalog (nvseg_ray.labels), its build script and the ``nvseg labels`` subcommand."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nvseg_ray.commands import labels as labels_command
from nvseg_ray.errors import ConfigError, PromptError
from nvseg_ray.labels import MODALITIES, SUBCLASSES, LabelCatalog, LabelClass

REPO_ROOT = Path(__file__).resolve().parents[1]
UPSTREAM_DATA = Path(__file__).resolve().parents[2] / "shared" / "reference" / "upstream-data"
needs_upstream = pytest.mark.skipif(
    not (UPSTREAM_DATA / "label_dict.json").is_file(),
    reason=f"upstream reference label files not found at {UPSTREAM_DATA} (../shared is not checked out)",
)

CT_BODY_EXCLUDED = {2, 16, 18, 20, 21, 23, 24, 25, 26, 27, 128, 129, 130, 131, 132}
DEPRECATED = {16, 129, 130, 131, 133, *range(137, 146), 155, 162}
BONE_PARTS = (*range(33, 57), *range(63, 98), 114, 120, 122)


@pytest.fixture(scope="module")
def catalog() -> LabelCatalog:
    return LabelCatalog.default()


# ------------------------------------------------------------------ packaged content


def test_class_ids_are_1_to_345(catalog: LabelCatalog) -> None:
    assert list(catalog.classes) == list(range(1, 346))
    assert all(label.id == cid for cid, label in catalog.classes.items())


@pytest.mark.parametrize(("modality", "count"), [("CT_BODY", 117), ("MRI_BODY", 50), ("MRI_BRAIN", 132)])
def test_everything_set_sizes(catalog: LabelCatalog, modality: str, count: int) -> None:
    ids = catalog.everything_ids(modality)
    assert len(ids) == count
    assert len(set(ids)) == count


def test_ct_body_is_vista3d_set_ascending(catalog: LabelCatalog) -> None:
    expected = tuple(i for i in range(1, 133) if i not in CT_BODY_EXCLUDED)
    assert catalog.everything_ids("CT_BODY") == expected


def test_mri_body_order_follows_totalsegmentator_mr(catalog: LabelCatalog) -> None:
    assert catalog.everything_ids("MRI_BODY")[:8] == (9, 8, 6, 104, 105, 22, 91, 92)
    assert catalog.everything_ids("MRI_BODY")[-1] == 146


def test_mri_brain_is_lumir_block(catalog: LabelCatalog) -> None:
    assert catalog.everything_ids("MRI_BRAIN") == tuple(range(214, 346))


def test_deprecated_flags(catalog: LabelCatalog) -> None:
    assert set(catalog.deprecated_ids) == DEPRECATED
    assert all("(deprecated)" in catalog.classes[cid].name for cid in DEPRECATED)


@pytest.mark.parametrize(
    ("class_id", "name", "modalities"),
    [(1, "liver", ("CT", "MRI")), (2, "kidney", ()), (20, "lung", ("CT",)), (214, "3rd-Ventricle", ("MRI",))],
)
def test_class_fields(catalog: LabelCatalog, class_id: int, name: str, modalities: tuple[str, ...]) -> None:
    label = catalog.classes[class_id]
    assert (label.name, label.modalities) == (name, modalities)
    assert catalog.name(class_id) == name


def test_class_datasets(catalog: LabelCatalog) -> None:
    assert "TotalSegmentatorMR" in catalog.classes[1].datasets["MRI"]
    assert catalog.classes[214].datasets == {"MRI": ("LUMIR",)}
    assert len(catalog.label_mappings) == 40
    assert catalog.label_mappings["TotalSegmentatorMR"][0] == (1, 9)


@pytest.mark.parametrize(
    ("class_id", "expected"), [(0, "background"), (400, "zero-shot class 400"), (511, "zero-shot class 511")]
)
def test_name_of_unknown_ids(catalog: LabelCatalog, class_id: int, expected: str) -> None:
    assert catalog.name(class_id) == expected


@pytest.mark.parametrize("class_id", [-1, 512])
def test_name_outside_label_space(catalog: LabelCatalog, class_id: int) -> None:
    with pytest.raises(PromptError):
        catalog.name(class_id)


# ------------------------------------------------------------------ resolve


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        (5, 5),
        ("5", 5),
        (" 42 ", 42),
        ("liver", 1),
        ("LIVER", 1),
        ("Left Kidney", 14),
        ("left_kidney", 14),
        ("  left   kidney ", 14),
        ("3rd ventricle", 214),
        ("right prg precentral gyrus", 322),
        ("kidney mass", 129),  # deprecated alias resolves; resolve_prompts refuses it
    ],
)
def test_resolve(catalog: LabelCatalog, prompt: int | str, expected: int) -> None:
    assert catalog.resolve(prompt) == expected


def test_unknown_name_suggests(catalog: LabelCatalog) -> None:
    with pytest.raises(PromptError) as caught:
        catalog.resolve("kidny")
    text = str(caught.value)
    assert "unknown class name 'kidny'" in text
    assert "did you mean 'kidney' (2)" in text
    assert "nvseg labels --search kidny" in text
    assert 1 <= len(caught.value.details["suggestions"]) <= 3


@pytest.mark.parametrize("prompt", [True, 1.5, None, "", "no such organ xyz"])
def test_resolve_rejects(catalog: LabelCatalog, prompt: object) -> None:
    with pytest.raises(PromptError):
        catalog.resolve(prompt)  # type: ignore[arg-type]


# ------------------------------------------------------------------ resolve_prompts


@pytest.mark.parametrize(
    ("prompts", "kwargs", "expected"),
    [
        ([1, 3], {}, (1, 3)),
        (["spleen", "liver", 3, "Liver"], {}, (3, 1)),
        ([2], {}, (14, 5)),
        ([2, 14, 1], {}, (14, 5, 1)),
        ([20], {}, (28, 29, 30, 31, 32)),
        ([21], {}, BONE_PARTS),
        ([2], {"expand_subclasses": False}, (2,)),
        ([20, 21], {"expand_subclasses": False}, (20, 21)),
        ("liver", {}, (1,)),
        ([345], {}, (345,)),
        (None, {"modality": "mri_brain"}, tuple(range(214, 346))),
        ([], {"modality": "CT_BODY"}, tuple(i for i in range(1, 133) if i not in CT_BODY_EXCLUDED)),
        ([7], {"modality": "MRI_BRAIN"}, (7,)),
        ([400], {"with_points": True}, (400,)),
        (["liver", 1], {"with_points": True}, (1,)),
        ([1], {"with_points": True}, (1,)),
        ([2], {"with_points": True, "expand_subclasses": False}, (2,)),
    ],
)
def test_resolve_prompts(catalog: LabelCatalog, prompts: object, kwargs: dict, expected: tuple[int, ...]) -> None:
    assert catalog.resolve_prompts(prompts, **kwargs) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("prompts", "kwargs", "message"),
    [
        ([16], {}, "class id 16 is the deprecated class"),
        ([155], {}, "class id 155 is the deprecated class"),
        (["kidney mass"], {}, "class prompt 'kidney mass' (id 129) is the deprecated class"),
        ([0], {}, "class ids start at 1"),
        ([-3], {}, "class ids start at 1"),
        ([346], {}, "class id 346 is not a class of this model"),
        ([600], {}, "class id 600 is not a class of this model"),
        ([1, 600], {}, "class id 600"),
        (None, {}, "no modality given"),
        (None, {"modality": "CT"}, "unknown modality 'CT'"),
        ([16], {"with_points": True}, "deprecated"),
        ([600], {"with_points": True}, "outside the point head's range 1..511"),
        ([0], {"with_points": True}, "class ids start at 1"),
        ([1, 3], {"with_points": True}, "2 classes were given"),
        ([2], {"with_points": True}, "groups are not expanded with point prompts"),
        ([21], {"with_points": True}, "groups are not expanded"),
        ([], {"with_points": True}, "need exactly one class prompt"),
    ],
)
def test_resolve_prompts_refuses(catalog: LabelCatalog, prompts: object, kwargs: dict, message: str) -> None:
    with pytest.raises(PromptError) as caught:
        catalog.resolve_prompts(prompts, **kwargs)  # type: ignore[arg-type]
    assert message in str(caught.value)
    assert caught.value.hint


def test_without_points_accepts_330_upstream_ids_minus_155(catalog: LabelCatalog) -> None:
    accepted = [cid for cid in range(0, 520) if _accepted(catalog, cid)]
    assert len(accepted) == 329
    assert set(accepted) == set(range(1, 346)) - DEPRECATED


def _accepted(catalog: LabelCatalog, class_id: int) -> bool:
    try:
        catalog.resolve_prompts([class_id], expand_subclasses=False)
    except PromptError:
        return False
    return True


@pytest.mark.parametrize("modality", ["CT_BODY", "ct_body", "Mri-Body", " mri brain "])
def test_everything_ids_case_insensitive(catalog: LabelCatalog, modality: str) -> None:
    assert catalog.everything_ids(modality)


def test_unknown_modality_lists_valid(catalog: LabelCatalog) -> None:
    with pytest.raises(PromptError) as caught:
        catalog.everything_ids("BRAIN")
    assert all(name in str(caught.value) for name in MODALITIES)


# ------------------------------------------------------------------ search


@pytest.mark.parametrize(
    ("text", "ids"),
    [
        ("kidney", [2, 5, 14, 116, 117, 129]),
        ("KIDNEY CYST", [116, 117]),
        ("left_kidney", [14, 116]),
        ("14", [14]),
        ("zzzz", []),
    ],
)
def test_search(catalog: LabelCatalog, text: str, ids: list[int]) -> None:
    assert [label.id for label in catalog.search(text)] == ids


def test_search_by_dataset(catalog: LabelCatalog) -> None:
    assert [label.id for label in catalog.search("lumir")] == list(range(214, 346))


# ------------------------------------------------------------------ serialisation / loading


def test_roundtrip_through_file(catalog: LabelCatalog, tmp_path: Path) -> None:
    path = tmp_path / "catalog.json"
    path.write_text(catalog.to_json(), encoding="utf-8")
    assert LabelCatalog.from_file(path) == catalog
    assert LabelCatalog.load(path) == catalog
    assert LabelCatalog.from_dict(catalog.to_dict()).to_dict() == catalog.to_dict()


def test_packaged_file_is_canonical(catalog: LabelCatalog) -> None:
    packaged = REPO_ROOT / "nvseg_ray" / "resources" / "label_catalog.json"
    assert packaged.read_text(encoding="utf-8") == catalog.to_json()
    assert json.loads(packaged.read_text())["format"] == "nvseg-label-catalog/1"


def test_default_is_cached() -> None:
    assert LabelCatalog.default() is LabelCatalog.default()
    assert LabelCatalog.load(None) is LabelCatalog.default()


def test_catalog_is_read_only(catalog: LabelCatalog) -> None:
    with pytest.raises(TypeError):
        catalog.classes[999] = LabelClass(999, "x")  # type: ignore[index]


def _write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(format="other/2"), "unsupported label catalog format"),
        (lambda d: d.update(subclass={}), "unknown top-level keys"),
        (lambda d: d["classes"].append(dict(d["classes"][0])), "listed twice"),
        (lambda d: d["everything"].update(CT_BODY=[1, 999]), "unknown class ids [999]"),
        (lambda d: d["classes"][0].update(id="one"), "must be an integer"),
        (lambda d: d["classes"][1].update(name="LIVER"), "have the same name"),
    ],
)
def test_bad_catalog_files(catalog: LabelCatalog, tmp_path: Path, mutate, message: str) -> None:
    data = catalog.to_dict()
    mutate(data)
    path = _write(tmp_path / "bad.json", data)
    with pytest.raises(ConfigError) as caught:
        LabelCatalog.from_file(path)
    assert message in str(caught.value)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("content", ["{not json", "[1, 2]"])
def test_load_rejects_non_catalogs(tmp_path: Path, content: str) -> None:
    path = tmp_path / "x.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError):
        LabelCatalog.load(path)


def test_load_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        LabelCatalog.load(tmp_path / "missing.json")
    with pytest.raises(ConfigError):
        LabelCatalog.from_upstream_bundle(tmp_path)


def test_finetuned_catalog_drives_lookups(tmp_path: Path) -> None:
    data = {
        "format": "nvseg-label-catalog/1",
        "classes": [{"id": 1, "name": "tumour"}, {"id": 2, "name": "cyst (deprecated)"}, {"id": 3, "name": "kidney"}],
        "everything": {"CT_BODY": [3, 1]},
    }
    custom = LabelCatalog.load(_write(tmp_path / "ft.json", data))
    assert custom.resolve("Tumour") == 1
    assert custom.resolve_prompts([3]) == (3,)  # no subclass dict -> no expansion
    assert custom.resolve_prompts(None, modality="ct_body") == (3, 1)
    assert custom.classes[2].deprecated
    with pytest.raises(PromptError, match="valid modalities: CT_BODY"):
        custom.everything_ids("MRI_BODY")


# ------------------------------------------------------------------ upstream bundle


@needs_upstream
def test_upstream_bundle_equals_packaged(catalog: LabelCatalog) -> None:
    assert LabelCatalog.from_upstream_bundle(UPSTREAM_DATA) == catalog
    assert LabelCatalog.load(UPSTREAM_DATA) == catalog


@needs_upstream
def test_upstream_configs_layout_and_single_files(catalog: LabelCatalog, tmp_path: Path) -> None:
    configs = tmp_path / "bundle" / "configs"
    configs.mkdir(parents=True)
    for name in ("label_dict.json", "metadata.json", "label_mappings.json"):
        shutil.copy(UPSTREAM_DATA / name, configs / name)
    assert LabelCatalog.from_upstream_bundle(tmp_path / "bundle") == catalog
    assert LabelCatalog.load(configs / "label_dict.json") == catalog
    assert LabelCatalog.load(configs / "metadata.json") == catalog


@needs_upstream
@pytest.mark.parametrize("files", [("label_dict.json", "metadata.json"), ("metadata.json",)])
def test_upstream_without_mappings_uses_metadata_order(
    catalog: LabelCatalog, tmp_path: Path, files: tuple[str, ...]
) -> None:
    for name in files:
        shutil.copy(UPSTREAM_DATA / name, tmp_path / name)
    partial = LabelCatalog.from_upstream_bundle(tmp_path)
    assert partial.everything == catalog.everything
    assert partial.subclasses == catalog.subclasses == SUBCLASSES
    assert [label.name for label in partial.classes.values()] == [label.name for label in catalog.classes.values()]
    assert partial.deprecated_ids == catalog.deprecated_ids
    assert partial.label_mappings == {}


@needs_upstream
def test_build_script_check_mode() -> None:
    script = REPO_ROOT / "scripts" / "build_label_catalog.py"
    done = subprocess.run(
        [sys.executable, str(script), "--bundle-dir", str(UPSTREAM_DATA), "--check"],
        capture_output=True, text=True, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "up to date" in done.stdout


# ------------------------------------------------------------------ CLI subcommand


def _run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="nvseg")
    labels_command.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["labels", *argv])
    return args.func(args)


def _table_ids(out: str) -> list[int]:
    lines = out.strip().splitlines()
    return [int(line.split()[0]) for line in lines[1:-1]]


def test_cli_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert _run_cli([]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert lines[0].split() == ["id", "name", "modalities", "deprecated"]
    assert _table_ids(out) == list(range(1, 346))
    assert lines[-1] == "345 classes (16 deprecated)"
    assert "kidney mass (deprecated)" in out


def test_cli_search(capsys: pytest.CaptureFixture[str]) -> None:
    assert _run_cli(["--search", "kidney"]) == 0
    out = capsys.readouterr().out
    assert _table_ids(out) == [2, 5, 14, 116, 117, 129]
    assert "6 of 345 classes match 'kidney'" in out.splitlines()[-1]


def test_cli_modality_order(capsys: pytest.CaptureFixture[str]) -> None:
    assert _run_cli(["--modality", "MRI_BODY"]) == 0
    out = capsys.readouterr().out
    assert _table_ids(out)[:6] == [9, 8, 6, 104, 105, 22]
    assert out.splitlines()[-1].startswith("50 MRI_BODY")


def test_cli_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert _run_cli(["--json", "--modality", "mri_body", "--search", "kidney"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [item["id"] for item in data] == [14, 5]
    assert set(data[0]) == {"id", "name", "modalities", "datasets", "deprecated"}


def test_cli_unknown_modality() -> None:
    with pytest.raises(PromptError, match="unknown modality"):
        _run_cli(["--modality", "PET"])


@needs_upstream
def test_cli_catalog_option(capsys: pytest.CaptureFixture[str]) -> None:
    assert _run_cli(["--catalog", str(UPSTREAM_DATA), "--search", "LUMIR"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("132 of 345")


# ------------------------------------------------------------------ one class-list rule, one package


#: (typed text, what every class-list parser must return): separators ``,`` and ``;``, blanks dropped, ASCII
#: decimal (optionally signed) ids, everything else a name (``²`` passes ``str.isdigit`` but is no id).
CLASS_LISTS = [
    ("liver, 3;spleen", ["liver", 3, "spleen"]),
    (" 3 ; ; 5 ,", [3, 5]),
    ("+4,-2", [4, -2]),
    ("²,3²", ["²", "3²"]),
    ("\u0663", ["\u0663"]),  # ARABIC-INDIC DIGIT THREE: int() would read it, the rule does not
    ("left kidney;right kidney", ["left kidney", "right kidney"]),
]


@pytest.mark.parametrize(("text", "expected"), CLASS_LISTS)
def test_every_class_list_parser_follows_one_rule(text: str, expected: list[int | str]) -> None:
    """The CLI flag, a batch manifest cell, the Serve form field and the benchmarks' flag read a class list alike
    (they had four parsers: two ignored ';', two read '+4' as a name)."""
    from benchmarks._common import classes_arg
    from nvseg_ray.batch.inputs import _classes as manifest_cell
    from nvseg_ray.commands.options import add_inference_arguments
    from nvseg_ray.labels import parse_class_list
    from nvseg_ray.serving.service import parse_form_list

    parser = argparse.ArgumentParser()
    add_inference_arguments(parser)
    assert parse_class_list(text) == expected
    assert parser.parse_args(["--classes", text]).classes == expected
    assert manifest_cell(text) == expected
    assert parse_form_list(text) == expected
    assert classes_arg(text) == expected


def test_labels_package_keeps_its_public_names() -> None:
    """The split into nvseg_ray/labels/ (catalog, schema, bundle, parsing, printing) keeps ``from nvseg_ray.labels
    import X`` working for every name the single module exported."""
    import nvseg_ray.labels as labels

    assert set(labels.__all__) == {"CATALOG_FORMAT", "CT_BODY_EXCLUDED", "CT_BODY_MAX_ID", "MAX_POINT_PROMPT_ID",
                                   "MODALITIES", "MRI_EVERYTHING_DATASETS", "SUBCLASSES", "LabelCatalog",
                                   "LabelClass", "parse_class_list", "parse_class_token"}
    assert all(hasattr(labels, name) for name in labels.__all__)
    assert set(labels.CT_BODY_EXCLUDED) == CT_BODY_EXCLUDED
    assert labels.LabelCatalog.default().to_json() == (REPO_ROOT / "nvseg_ray" / "resources" /
                                                        "label_catalog.json").read_text()
    for module in (REPO_ROOT / "nvseg_ray" / "labels").glob("*.py"):
        assert len(module.read_text().splitlines()) < 500, f"{module.name} grew past 500 lines: split it by concern"
