"""Evaluation: Dice, summaries (every class counted), the CLI's config errors and an end-to-end Ray run."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from nvseg_ray.evaluation import EvaluateConfig, dice, evaluate_case, run_evaluation, summarize
from nvseg_ray.errors import ConfigError, DataListError
from nvseg_ray.io import read_nifti
from nvseg_ray.training.datalist import relabel

from .model_helpers import TEST_PATCH, body_phantom, save_volume

SHAPE = (40, 36, 24)
AFFINE = np.diag([1.5, 1.5, 2.0, 1.0])
MAPPING = [[1, 3], [2, 1]]  # local 1 -> spleen (3), local 2 -> liver (1)


def _load_cli():
    path = Path(__file__).resolve().parents[1] / "jobs" / "evaluate.py"
    spec = importlib.util.spec_from_file_location("evaluate_job", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _dataset(root: Path, n: int = 2) -> str:
    """``n`` phantom cases in fold 0 and one in fold 1, labels with local ids (1 spleen, 2 liver)."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training = []
    for i in range(n + 1):
        vol = body_phantom(SHAPE, seed=i)
        lab = np.zeros(SHAPE, np.uint8)
        lab[(vol > 45) & (vol < 90)] = 1
        lab[(vol > 90) & (vol < 300)] = 2
        save_volume(root / "imagesTr" / f"case_{i}.nii.gz", vol, AFFINE)
        save_volume(root / "labelsTr" / f"case_{i}.nii.gz", lab, AFFINE)
        training.append({"image": f"imagesTr/case_{i}.nii.gz", "label": f"labelsTr/case_{i}.nii.gz",
                         "fold": 0 if i < n else 1})
    path = root / "folds.json"
    path.write_text(json.dumps({"training": training, "testing": [{"image": "imagesTr/case_0.nii.gz"}]}))
    return str(path)


# -- metrics ---------------------------------------------------------------------------------------------


def test_dice_two_boxes() -> None:
    pred = np.zeros((10, 10, 10), np.uint16)
    truth = np.zeros_like(pred)
    pred[0:3, 0:3, 0:3] = 3  # |A| = 27
    truth[2:5, 0:3, 0:3] = 3  # |B| = 27, overlap = 1 * 3 * 3 = 9
    truth[7:9, 7:9, 7:9] = 1  # class 1 only in the truth
    scores = dice(pred, truth, [3, 1, 5])
    assert scores[3] == pytest.approx(2 * 9 / 54) == pytest.approx(0.3333, abs=1e-4)
    assert scores[1] == 0.0
    assert math.isnan(scores[5])  # absent from both: undefined
    assert dice(truth, truth, [3, 1]) == {3: 1.0, 1: 1.0}
    with pytest.raises(ValueError, match="shape"):
        dice(pred, truth[:-1], [3])


def test_summarize_counts_every_class_including_the_last() -> None:
    rows = [
        {"case_id": "a", "class_id": 3, "class_name": "spleen", "dice": 0.5},
        {"case_id": "a", "class_id": 1, "class_name": "liver", "dice": 0.2},
        {"case_id": "a", "class_id": 6, "class_name": "stomach", "dice": 1.0},
        {"case_id": "b", "class_id": 3, "class_name": "spleen", "dice": 0.7},
        {"case_id": "b", "class_id": 1, "class_name": "liver", "dice": float("nan")},  # undefined: excluded
        {"case_id": "b", "class_id": 6, "class_name": "stomach", "dice": 0.8},
        {"case_id": "c", "class_id": 3, "class_name": "spleen", "dice": float("nan"), "status": "failed"},
    ]
    s = summarize(rows)
    by_id = {c["class_id"]: c for c in s["classes"]}
    assert [c["class_id"] for c in s["classes"]] == [3, 1, 6]
    assert by_id[3]["mean_dice"] == pytest.approx(0.6) and by_id[3]["n_cases"] == 2
    assert by_id[1]["mean_dice"] == pytest.approx(0.2) and by_id[1]["n_undefined"] == 1
    assert by_id[6]["mean_dice"] == pytest.approx(0.9)
    # upstream would drop class 6 (docs/upstream.md, Upstream bugs, item 11)
    assert s["mean_dice"] == pytest.approx((0.6 + 0.2 + 0.9) / 3)
    assert s["n_cases"] == 2 and s["n_failed"] == 1


# -- configuration / CLI ---------------------------------------------------------------------------------


def test_config_and_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    datalist = _dataset(tmp_path / "data", n=1)
    cfg = EvaluateConfig(datalist=datalist, checkpoint="m.pt", output=str(tmp_path / "out"))
    assert cfg.label_mapping == [(1, 3)] and cfg.split == "validation" and cfg.patch_size == (192, 192, 128)
    assert EvaluateConfig.from_options(datalist=datalist, checkpoint="m.pt", output="o",
                                       label_mapping="[[1, 3], [2, 1]]").label_mapping == [(1, 3), (2, 1)]
    with pytest.raises(ConfigError, match="label_mapping"):
        EvaluateConfig.from_options(datalist=datalist, checkpoint="m.pt", output="o", label_mapping="[[0, 3]]")
    with pytest.raises(ConfigError, match="unknown_option"):
        EvaluateConfig.from_options(datalist=datalist, checkpoint="m.pt", output="o", unknown_option=1)

    cli = _load_cli()
    base = ["--datalist", datalist, "--checkpoint", "m.pt", "--output", str(tmp_path / "out")]
    assert cli.main([*base, "--label-mapping", "[[1, 600]]"]) == 2
    assert cli.main([*base, "--fold", "7"]) == 2
    assert "fold 7 has no training items" in capsys.readouterr().err
    assert cli.main([*base, "--split", "testing"]) == 2  # upstream testing items have no labels
    assert "no label" in capsys.readouterr().err
    assert cli.main([*base, "--patch-size", "48,48,30"]) == 2
    assert not (tmp_path / "out").exists()


def test_evaluate_case_rejects_off_grid_label(tmp_path: Path, tiny_checkpoint: str) -> None:
    from nvseg_ray.model_runner import ModelRunner
    from nvseg_ray.stages import VolumeStages
    from nvseg_ray.training.datalist import DataItem

    image = save_volume(tmp_path / "img.nii.gz", body_phantom(SHAPE), AFFINE)
    label = save_volume(tmp_path / "lab.nii.gz", np.zeros(SHAPE, np.uint8), np.diag([1.0, 1.5, 2.0, 1.0]))
    cfg = EvaluateConfig(datalist="x.json", checkpoint=tiny_checkpoint, output="o", patch_size=TEST_PATCH,
                         device="cpu")
    stages = VolumeStages(cfg.inference_config())
    item = DataItem(image=(str(image),), label=str(label), fold=0, case_id="img")
    with pytest.raises(DataListError, match="not on the image grid"):
        evaluate_case(stages, ModelRunner(cfg.inference_config()), item, [[1, 3]], stages.catalog)


# -- end to end on Ray -----------------------------------------------------------------------------------


@pytest.mark.usefixtures("ray_cluster")
def test_run_evaluation_end_to_end(tmp_path: Path, tiny_checkpoint: str) -> None:
    import torch

    from nvseg_ray.engine import segment_volume
    from nvseg_ray.model_runner import ModelRunner
    from nvseg_ray.stages import VolumeStages

    datalist = _dataset(tmp_path / "data", n=2)
    # a third fold-0 case whose label is missing: isolated as a failed row, the others still evaluated
    data = json.loads(Path(datalist).read_text())
    data["training"].append({"image": "imagesTr/case_0.nii.gz", "label": "labelsTr/missing.nii.gz", "fold": 0})
    data["training"][-1]["image"] = "imagesTr/broken.nii.gz"
    Path(datalist).write_text(json.dumps(data))
    (tmp_path / "data" / "imagesTr" / "broken.nii.gz").write_bytes(
        (tmp_path / "data" / "imagesTr" / "case_0.nii.gz").read_bytes())

    out = tmp_path / "eval"
    cfg = EvaluateConfig(datalist=datalist, checkpoint=tiny_checkpoint, output=str(out), label_mapping=MAPPING,
                         split="validation", fold=0, patch_size=TEST_PATCH, device="cpu", max_actors=2)
    lines: list[str] = []
    result = run_evaluation(cfg, echo=lines.append)

    assert result.exit_code == 3
    for name in ("per_case.parquet", "per_case.csv", "per_class.csv", "summary.json"):
        assert (out / name).is_file(), name
    frame = pd.read_parquet(out / "per_case.parquet")
    assert len(frame) == 3 * 2 and set(frame["class_id"]) == {3, 1}
    failed = frame[frame["case_id"] == "broken"]
    assert set(failed["status"]) == {"failed"} and set(failed["error_code"]) == {"invalid_datalist"}
    assert failed["error_message"].str.contains("missing.nii.gz").all()
    ok = frame[frame["status"] == "ok"]
    assert sorted(set(ok["case_id"])) == ["case_0", "case_1"]
    assert set(ok["class_name"]) == {"spleen", "liver"}

    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_cases"] == 2 and summary["n_failed"] == 1 and len(summary["classes"]) == 2
    assert summary["failed"][0]["case_id"] == "broken"
    per_class = pd.read_csv(out / "per_class.csv")
    assert sorted(per_class["class_id"]) == [1, 3]
    assert any("mean dice over 2 class(es)" in line for line in lines)

    # the engine's own prediction, scored directly, gives the same numbers
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the actor
    try:
        stages, runner = VolumeStages(cfg.inference_config()), ModelRunner(cfg.inference_config())
        for case in ("case_0", "case_1"):
            pred = segment_volume(str(tmp_path / "data" / "imagesTr" / f"{case}.nii.gz"), stages, runner).labels
            truth = relabel(np.asanyarray(read_nifti(tmp_path / "data" / "labelsTr" / f"{case}.nii.gz").dataobj),
                            MAPPING)
            expected = dice(pred, truth, [3, 1])
            rows = ok[ok["case_id"] == case].set_index("class_id")
            for cid, value in expected.items():
                got = rows.loc[cid, "dice"]
                assert (math.isnan(value) and math.isnan(got)) or got == pytest.approx(value, abs=1e-9), (case, cid)
                assert rows.loc[cid, "pred_voxels"] == int((pred == cid).sum())
                assert rows.loc[cid, "true_voxels"] == int((truth == cid).sum()) > 0
    finally:
        torch.set_num_threads(threads)
