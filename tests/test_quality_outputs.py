"""QC as a user meets it: what `nvseg segment` and the batch job write next to each mask (the report's quality
section, the preview, the viewer label tables), the manifest's QC columns, the run's statistics table, the run
report and `nvseg report` (tiny generated model, local Ray, real files)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from nvseg_ray.batch import BatchConfig, run_batch
from nvseg_ray.cli import main
from nvseg_ray.config import InferenceConfig
from nvseg_ray.output import colour_table_uris, preview_uri, report_uri, write_outputs

from .model_helpers import TEST_PATCH, body_phantom, save_volume, segment_once

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STRUCTURE_KEYS = {"id", "name", "voxels", "volume_ml", "mean", "std", "median", "p5", "p95", "bbox", "cut_by_fov"}


def _scan(path: Path, seed: int = 0, shape: tuple[int, int, int] = (40, 36, 20)) -> Path:
    save_volume(path, body_phantom(shape, seed=seed), np.diag([1.5, 1.5, 2.5, 1.0]))
    return path


def _cfg(checkpoint: str, **kw) -> InferenceConfig:
    return InferenceConfig(checkpoint=checkpoint, classes=["liver", "spleen", 5], patch_size=TEST_PATCH,
                           device="cpu", **kw)


def test_report_preview_and_viewer_tables_next_to_the_mask(tiny_checkpoint, tmp_path):
    scan = _scan(tmp_path / "ct.nii.gz")
    cfg = _cfg(tiny_checkpoint, quality={"preview": True})
    result = segment_once(cfg, scan)
    mask = str(tmp_path / "out" / "ct_trans.nii.gz")
    report = write_outputs(result, input_uri=str(scan), output_uri=mask, cfg=cfg, model_uri=None, model_sha256=None)

    on_disk = json.loads(Path(report_uri(mask)).read_text())
    assert on_disk["quality"] == json.loads(json.dumps(report["quality"]))
    present = {int(i) for i in np.unique(result.labels)} - {0}
    structures = on_disk["quality"]["structures"]
    assert {s["id"] for s in structures} == present
    assert all(STRUCTURE_KEYS <= set(s) for s in structures)
    for s in structures:  # intensity statistics in the input's HU, from the input's voxels under the mask
        values = np.asarray(result.volume.array)[np.asarray(result.labels) == s["id"]]
        assert s["voxels"] == values.size
        assert s["mean"] == pytest.approx(values.mean(), abs=0.01)
    assert "timings_s" in on_disk and "qc" in on_disk["timings_s"]

    png = Path(preview_uri(mask)).read_bytes()
    assert png.startswith(PNG_MAGIC) and report["preview"]["bytes"] == len(png)
    assert Image.open(io.BytesIO(png)).size[0] > 0
    tables = colour_table_uris(mask)
    assert set(report["viewer_tables"]) == {"slicer", "itksnap"}
    slicer = Path(tables["slicer"]).read_text()
    itksnap = Path(tables["itksnap"]).read_text()
    for class_id in cfg_ids(result):
        assert any(line.split()[:1] == [str(class_id)] for line in slicer.splitlines() if not line.startswith("#"))
        assert any(line.split()[:1] == [str(class_id)] for line in itksnap.splitlines() if not line.startswith("#"))


def cfg_ids(result) -> tuple[int, ...]:
    return tuple(result.prompts.class_ids)


def test_qc_off_writes_no_quality_and_drops_the_voxels(tiny_checkpoint, tmp_path):
    scan = _scan(tmp_path / "ct.nii.gz")
    cfg = _cfg(tiny_checkpoint, quality={"qc": False, "colour_tables": False})
    result = segment_once(cfg, scan)
    assert result.quality is None and result.volume.array.size == 0  # nothing needs the input past prepare
    mask = str(tmp_path / "ct_trans.nii.gz")
    report = write_outputs(result, input_uri=str(scan), output_uri=mask, cfg=cfg, model_uri=None, model_sha256=None)
    assert "quality" not in report and "preview" not in report and "viewer_tables" not in report
    assert not Path(preview_uri(mask)).exists()
    assert not any(Path(u).exists() for u in colour_table_uris(mask).values())


def test_segment_cli_preview_flag(tiny_checkpoint, tmp_path, capsys):
    scan = _scan(tmp_path / "ct.nii.gz")
    out = tmp_path / "out"
    code = main(["segment", str(scan), "-o", str(out), "-c", tiny_checkpoint, "--classes", "liver,spleen",
                 "--patch-size", ",".join(map(str, TEST_PATCH)), "--device", "cpu", "--preview"])
    assert code == 0, capsys.readouterr()
    mask = out / "ct" / "ct_trans.nii.gz"
    assert Path(preview_uri(str(mask))).read_bytes().startswith(PNG_MAGIC)
    printed = capsys.readouterr().out
    assert str(preview_uri(str(mask))) in printed
    # how the network ran, said once and recorded in the report (a CPU: torch, and why not TensorRT)
    assert "backend torch (asked for auto" in printed
    backend = json.loads(Path(report_uri(str(mask))).read_text())["backend"]
    assert backend["backend"] == "torch" and backend["requested"] == "auto" and backend["window_batch"] == 1
    # without --preview (the CLI's default) no preview is written
    code = main(["segment", str(scan), "-o", str(tmp_path / "out2"), "-c", tiny_checkpoint, "--classes", "liver",
                 "--patch-size", ",".join(map(str, TEST_PATCH)), "--device", "cpu"])
    assert code == 0 and not Path(preview_uri(str(tmp_path / "out2" / "ct" / "ct_trans.nii.gz"))).exists()


def test_batch_default_preview_is_on_and_cli_default_is_off():
    batch = BatchConfig(input="in", output="out", inference={"checkpoint": "m.pt"})
    assert batch.inference.quality.preview is True
    assert BatchConfig(input="in", output="out",
                       inference={"checkpoint": "m.pt", "quality": {"preview": False}}).inference.quality.preview is False
    assert InferenceConfig().quality.preview is None  # `nvseg segment`, Serve: off unless asked


@pytest.mark.usefixtures("ray_cluster")
def test_batch_run_qc_columns_statistics_table_and_run_report(tiny_checkpoint, tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i, name in enumerate(("a.nii.gz", "b.nii.gz")):
        _scan(inputs / name, seed=i, shape=(40 + 2 * i, 36, 20))
    (inputs / "broken.nii.gz").write_bytes(b"\x1f\x8b\x08\x00 not a volume")
    out = tmp_path / "out"
    cfg = BatchConfig(input=str(inputs), output=str(out), run_name="r1", progress_interval_s=60, progress_bars=False,
                      cost_per_node_hour=2.0, max_failures=-1,
                      inference={"checkpoint": tiny_checkpoint, "modality": "CT_BODY", "patch_size": TEST_PATCH,
                                 "device": "cpu"})
    result = run_batch(cfg, echo=lambda s: None)
    rows = {Path(r["uri"]).name: r for r in result.manifest.to_dict("records")}
    assert {k: r["status"] for k, r in rows.items()} == {"a.nii.gz": "ok", "b.nii.gz": "ok", "broken.nii.gz": "failed"}

    run_dir = out / "_nvseg_runs" / "r1"
    for name in ("a", "b"):
        row = rows[f"{name}.nii.gz"]
        mask = out / name / f"{name}_trans.nii.gz"
        assert row["report_uri"] == report_uri(str(mask)) and row["preview_uri"] == preview_uri(str(mask))
        assert Path(row["preview_uri"]).read_bytes().startswith(PNG_MAGIC)  # on by default in the batch job
        assert bytes(row["thumbnail"]).startswith(PNG_MAGIC)
        assert len(row["thumbnail"]) < len(Path(row["preview_uri"]).read_bytes())
        report = json.loads(Path(row["report_uri"]).read_text())
        assert row["qc_flags"] == ",".join(f["code"] for f in report["quality"]["flags"])
        assert [r["flag"] for r in json.loads(row["qc_reasons"])] == [f["code"] for f in report["quality"]["flags"]]
        key = json.loads(row["key_volumes"])
        assert key and all({"name", "ml", "cut_by_fov"} <= set(k) for k in key)
        assert row["t_qc"] > 0
        assert (row["backend"], row["backend_code"], row["window_batch"]) == ("torch", "auto_torch", 1)
        assert "CUDA" in row["backend_reason"] and report["backend"]["backend"] == "torch"
        assert all(Path(u).exists() for u in colour_table_uris(str(mask)).values())
    assert rows["broken.nii.gz"]["qc_flags"] == "" and rows["broken.nii.gz"]["preview_uri"] == ""

    # the run's statistics table: one row per volume and structure, the same numbers as each volume's report
    table = pd.read_parquet(run_dir / "structures.parquet")
    for name in ("a", "b"):
        report = json.loads(Path(rows[f"{name}.nii.gz"]["report_uri"]).read_text())
        mine = table[table["output_uri"] == rows[f"{name}.nii.gz"]["output_uri"]].sort_values("id")
        assert list(mine["id"]) == [s["id"] for s in report["quality"]["structures"]]
        assert list(mine["volume_ml"]) == pytest.approx([s["volume_ml"] for s in report["quality"]["structures"]])

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["report"] == str(run_dir / "report.html") and summary["nodes"] >= 1
    assert summary["cost_per_volume"] == pytest.approx(summary["cost"] / 2, abs=1e-5) and summary["cost"] > 0
    html = (run_dir / "report.html").read_text()
    for name in ("a.nii.gz", "b.nii.gz", "broken.nii.gz"):
        assert name in html
    assert "data:image/png;base64," in html and "truncated_file" in html

    # resumed: the skipped volumes keep their QC columns (from their earlier reports) and the report lists them
    again = run_batch(cfg.model_copy(update={"run_name": "r2"}), echo=lambda s: None)
    skipped = {Path(r["uri"]).name: r for r in again.manifest.to_dict("records") if r["status"] == "skipped"}
    assert set(skipped) == {"a.nii.gz", "b.nii.gz"}
    for name, row in skipped.items():
        assert row["qc_flags"] == rows[name]["qc_flags"] and row["preview_uri"] == rows[name]["preview_uri"]
        assert row["key_volumes"] == rows[name]["key_volumes"]

    # `nvseg report RUN_DIR` rebuilds the report from the manifest
    (run_dir / "report.html").unlink()
    assert main(["report", str(run_dir)]) == 0
    assert (run_dir / "report.html").read_text().count("a.nii.gz") >= 1
