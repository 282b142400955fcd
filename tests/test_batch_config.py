"""BatchConfig: named defaults pinned, shipped YAML validates, flags override YAML, inputs discovered."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nvseg_ray.batch import config as bc
from nvseg_ray.batch.cli import build_parser, config_from_args
from nvseg_ray.batch.inputs import discover, read_manifest
from nvseg_ray.errors import ConfigError, StorageError

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_pinned():
    assert bc.DEFAULT_PREPROCESS_CPUS == 1.0 and bc.DEFAULT_POSTPROCESS_CPUS == 1.0 and bc.DEFAULT_MODEL_CPUS == 1.0
    assert bc.DEFAULT_MIN_ACTORS == bc.DEFAULT_MAX_ACTORS == 1
    assert bc.DEFAULT_MAX_ATTEMPTS == 3 and bc.DEFAULT_MAX_FAILURES == 0
    assert bc.DEFAULT_SUFFIXES == (".nii.gz", ".nii")


def test_shipped_batch_config_validates():
    cfg = bc.BatchConfig.from_sources(REPO / "configs" / "batch_segment.yaml")
    assert cfg.inference.modality == "CT_BODY" and cfg.input.startswith("s3://")


def test_flags_override_yaml(tmp_path):
    args = build_parser().parse_args(["--config", str(REPO / "configs" / "batch_segment.yaml"), "--input", "/data/ct",
                                      "--max-actors", "4", "--classes", "liver,3", "--overlap", "0.5"])
    cfg = config_from_args(args)
    assert cfg.input == "/data/ct" and cfg.max_actors == 4 and cfg.output == "s3://my-bucket/masks/"
    assert cfg.inference.classes == ["liver", 3] and cfg.inference.overlap == 0.5
    assert cfg.inference.modality == "CT_BODY"  # from the YAML's inference mapping


@pytest.mark.parametrize("argv,match", [
    (["--input", "x", "--output", "y"], "checkpoint is required"),
    (["--input", "x", "--output", "y", "--checkpoint", "m.pt", "--min-actors", "2"], "min_actors"),
    (["--output", "y", "--checkpoint", "m.pt"], "input"),
    (["--input", "x", "--output", "y", "--checkpoint", "m.pt", "--patch-size", "100,100,100"], "multiple of 16"),
])
def test_bad_options_are_config_errors(argv, match):
    with pytest.raises(ConfigError, match=match):
        config_from_args(build_parser().parse_args(argv))


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")


def test_discover_prefix_glob_and_file(tmp_path):
    for rel in ("a.nii.gz", "sub/b.nii", "sub/deeper/c.NII.GZ", "sub/readme.txt", "d.nrrd"):
        _touch(tmp_path / rel)
    items = discover(str(tmp_path))
    assert [(Path(i.uri).name, i.rel_dir) for i in items] == [
        ("a.nii.gz", ""), ("b.nii", "sub"), ("c.NII.GZ", "sub/deeper")]
    assert [Path(i.uri).name for i in discover(str(tmp_path), recursive=False)] == ["a.nii.gz"]
    globbed = discover(str(tmp_path / "sub" / "*.nii"))
    assert [(Path(i.uri).name, i.rel_dir) for i in globbed] == [("b.nii", "")]
    assert [i.uri for i in discover(str(tmp_path / "d.nrrd"))] == [str(tmp_path / "d.nrrd")]
    with pytest.raises(StorageError, match="no .nii.gz/.nii files"):
        discover(str(tmp_path / "sub" / "deeper" / "*.txt"))
    with pytest.raises(StorageError, match="not found"):
        discover(str(tmp_path / "nope"))


def test_manifest_formats(tmp_path):
    (tmp_path / "m.csv").write_text("uri,classes,modality,output_name\nscans/a.nii.gz,\"liver,3\",,A\n/abs/b.nii,,MRI_BODY,\n")
    items = read_manifest(str(tmp_path / "m.csv"))
    assert items[0].uri == f"{tmp_path}/scans/a.nii.gz" and items[0].classes == ["liver", 3]
    assert items[0].output_name == "A" and items[0].modality is None
    assert items[1].uri == "/abs/b.nii" and items[1].classes is None and items[1].modality == "MRI_BODY"
    import pandas as pd

    pd.DataFrame({"uri": ["/x/y.nii.gz"], "classes": [np.array([1, 2])]}).to_parquet(tmp_path / "m.parquet")
    assert read_manifest(str(tmp_path / "m.parquet"))[0].classes == [1, 2]
    (tmp_path / "bad.csv").write_text("path\n/x.nii\n")
    with pytest.raises(ConfigError, match="no 'uri' column"):
        read_manifest(str(tmp_path / "bad.csv"))
