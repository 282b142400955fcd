"""Data lists, fold splits, label mappings and the up-front file checks (nvseg_ray.training.datalist)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nvseg_ray.errors import ConfigError, StorageError
from nvseg_ray.training.datalist import (
    DataItem,
    DataListError,
    LabelMappingError,
    check_items,
    load_datalist,
    parse_label_mapping,
    relabel,
    split_folds,
)

from .model_helpers import save_volume

AFFINE = np.diag([1.5, 1.5, 2.0, 1.0])
SHAPE = (8, 8, 6)


def _write_list(path: Path, data: dict) -> str:
    path.write_text(json.dumps(data))
    return str(path)


def _case(folder: Path, name: str, *, label_values=(0, 1), shape=SHAPE, label_shape=None, label_affine=None,
          label_dtype=np.uint8) -> DataItem:
    folder.mkdir(parents=True, exist_ok=True)
    image = save_volume(folder / f"{name}.nii.gz", np.zeros(shape, np.int16), AFFINE)
    lab = np.zeros(label_shape or shape, label_dtype)
    for i, v in enumerate(label_values):
        lab.flat[i] = v
    label = save_volume(folder / f"{name}_seg.nii.gz", lab, AFFINE if label_affine is None else label_affine)
    return DataItem(image=(str(image),), label=str(label), fold=0, case_id=name)


# -- parsing -----------------------------------------------------------------------------------------------


def test_load_relative_absolute_channels_and_folds(tmp_path: Path) -> None:
    (tmp_path / "lists").mkdir()
    uri = _write_list(tmp_path / "lists" / "folds.json", {
        "training": [
            {"image": "imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz", "fold": 0},
            {"image": ["imagesTr/b_t1.nii.gz", "/abs/b_t2.nii.gz"], "label": "s3://bkt/b.nii.gz", "fold": 1},
            {"image": "imagesTr/c.nii", "label": "labelsTr/c.nii"},
        ],
        "testing": [{"image": "imagesTs/d.nii.gz"}],
    })
    data = load_datalist(uri)
    root = str(tmp_path / "lists")
    assert data.root == root
    a, b, c = data.training
    assert a == DataItem(image=(f"{root}/imagesTr/a.nii.gz",), label=f"{root}/labelsTr/a.nii.gz", fold=0, case_id="a")
    assert b.image == (f"{root}/imagesTr/b_t1.nii.gz", "/abs/b_t2.nii.gz") and b.case_id == "b_t1"
    assert b.label == "s3://bkt/b.nii.gz" and b.fold == 1
    assert c.fold is None and c.case_id == "c"
    assert data.testing == [DataItem(image=(f"{root}/imagesTs/d.nii.gz",), label=None, fold=None, case_id="d")]

    other = load_datalist(uri, root="s3://bucket/Task09")
    assert other.training[0].image == ("s3://bucket/Task09/imagesTr/a.nii.gz",)
    assert other.training[1].image[1] == "/abs/b_t2.nii.gz"

    train, val = split_folds(data.training, 0)
    assert [i.case_id for i in val] == ["a"] and [i.case_id for i in train] == ["b_t1", "c"]
    train, val = split_folds(data.training, 1)
    assert [i.case_id for i in val] == ["b_t1"] and [i.case_id for i in train] == ["a", "c"]


#: upstream's data list of MSD Task09 (spleen), in the shared/ folder beside the repository.
UPSTREAM_SPLEEN_LIST = (Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "upstream-data"
                        / "msd_task09_spleen_folds.json")


@pytest.mark.skipif(not UPSTREAM_SPLEEN_LIST.is_file(),
                    reason=f"upstream data list not found at {UPSTREAM_SPLEEN_LIST} (../shared is not checked out)")
def test_upstream_spleen_list() -> None:
    path = UPSTREAM_SPLEEN_LIST
    data = load_datalist(str(path), root="/data/Task09_Spleen")
    assert len(data.training) == 41 and len(data.testing) == 20
    sizes = [len(split_folds(data.training, k)[1]) for k in range(5)]
    assert sizes == [9, 8, 8, 8, 8]
    assert all(i.label and i.label.startswith("/data/Task09_Spleen/labelsTr/") for i in data.training)


def test_malformed_list_reports_every_problem(tmp_path: Path) -> None:
    uri = _write_list(tmp_path / "bad.json", {
        "training": [{"image": "a.nii.gz"}, {"image": [], "label": "x.nii.gz"},
                     {"image": "c", "label": "c", "fold": -1}, "nope"],
        "testing": {"image": "t"},
    })
    with pytest.raises(DataListError) as err:
        load_datalist(uri)
    problems = err.value.details["problems"]
    assert len(problems) == 5, problems
    assert err.value.code == "invalid_datalist" and isinstance(err.value, ConfigError)
    (tmp_path / "notjson.json").write_text("{")
    with pytest.raises(DataListError, match="not valid JSON"):
        load_datalist(str(tmp_path / "notjson.json"))
    with pytest.raises(StorageError):
        load_datalist(str(tmp_path / "missing.json"))


def test_load_from_s3(s3_env: dict, s3_bucket: str, tmp_path: Path) -> None:
    from nvseg_ray.io import write_bytes_atomic

    uri = f"s3://{s3_bucket}/lists/folds.json"
    write_bytes_atomic(json.dumps({"training": [{"image": "im/a.nii.gz", "label": "lb/a.nii.gz", "fold": 2}]}).encode(),
                       uri)
    data = load_datalist(uri, storage_options=s3_env)
    assert data.root == f"s3://{s3_bucket}/lists"
    assert data.training[0].image == (f"s3://{s3_bucket}/lists/im/a.nii.gz",)


# -- label mappings --------------------------------------------------------------------------------------


def test_parse_label_mapping() -> None:
    assert parse_label_mapping([[1, 3]]) == ((1, 3),)
    assert parse_label_mapping("[[1, 3], [2, 1]]") == ((1, 3), (2, 1))
    assert parse_label_mapping({"default": [[1, 3]]}) == ((1, 3),)
    assert parse_label_mapping([(1, 5), (2, 5)]) == ((1, 5), (2, 5))  # merging locals is fine
    with pytest.raises(LabelMappingError) as err:
        parse_label_mapping([[0, 3], [1, 600], [1, 2], [1.5, 2], [True, 1]])
    assert len(err.value.details["problems"]) == 5
    for bad in ([], "[[1,", 5, [[1, 2, 3]]):
        with pytest.raises(LabelMappingError):
            parse_label_mapping(bad)


def test_relabel() -> None:
    labels = np.array([[0, 1], [2, 1]], np.uint8)
    out = relabel(labels, [[1, 3], [2, 300]])
    assert out.dtype == np.uint16 and out.tolist() == [[0, 3], [300, 3]]
    assert relabel(labels.astype(np.float32), [[1, 3], [2, 1]]).tolist() == [[0, 3], [1, 3]]  # no chaining
    with pytest.raises(DataListError, match=r"\[2\]"):
        relabel(labels, [[1, 3]])
    with pytest.raises(DataListError, match="non-integer"):
        relabel(np.array([0.5]), [[1, 3]])


# -- file checks -----------------------------------------------------------------------------------------


def test_check_items_ok(tmp_path: Path) -> None:
    item = _case(tmp_path, "ok", label_values=(0, 1, 2))
    check_items([item], [[1, 3], [2, 1]])


def test_check_items_reports_all_problems_at_once(tmp_path: Path) -> None:
    good = _case(tmp_path, "good")
    missing = DataItem(image=(str(tmp_path / "nowhere.nii.gz"),), label=good.label, fold=0, case_id="nowhere")
    off_grid = _case(tmp_path, "shifted", label_affine=AFFINE + np.array([[0, 0, 0, 0.5]] + [[0] * 4] * 3))
    bad_values = _case(tmp_path, "values", label_values=(0, 1, 4, 7))
    float_label = _case(tmp_path, "floaty", label_values=(0, 0.5), label_dtype=np.float32)
    with pytest.raises(DataListError) as err:
        check_items([good, missing, off_grid, bad_values, float_label], [[1, 3]])
    problems = err.value.details["problems"]
    text = str(err.value)
    assert len(problems) == 4, problems
    assert "nowhere.nii.gz" in text and "nowhere: cannot read image" in text
    assert "shifted: label" in text and "not on the image grid" in text
    assert "values: label" in text and "[4, 7]" in text
    assert "floaty: label" in text and "not integer-valued" in text


def test_check_items_shapes_and_channels(tmp_path: Path) -> None:
    small = _case(tmp_path, "small", label_shape=(8, 8, 5))
    a = _case(tmp_path / "mc", "t1")
    t2 = save_volume(tmp_path / "mc" / "t2.nii.gz", np.zeros((8, 8, 7), np.int16), AFFINE)
    multi = DataItem(image=(a.image[0], str(t2)), label=a.label, fold=1, case_id="t1")
    unlabelled = DataItem(image=a.image, label=None, fold=None, case_id="nolabel")
    with pytest.raises(DataListError) as err:
        check_items([small, multi, unlabelled], [[1, 3]])
    problems = err.value.details["problems"]
    assert len(problems) == 3, problems
    assert any("small: label" in p and "[8, 8, 5]" in p for p in problems)
    assert any("t1: image channel 1" in p and "[8, 8, 7]" in p for p in problems)
    assert any(p == "nolabel: no label" for p in problems)


def test_label_mapping_accepts_class_names_with_suggestions():
    from nvseg_ray.errors import LabelMappingError
    from nvseg_ray.training.datalist import parse_label_mapping

    assert parse_label_mapping([[1, "Spleen"], [2, "liver"]]) == ((1, 3), (2, 1))
    with pytest.raises(LabelMappingError, match="did you mean 'spleen'"):
        parse_label_mapping([[1, "splen"]])
