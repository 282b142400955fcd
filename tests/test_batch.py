"""The Ray Data batch job end to end: local Ray, moto S3 over HTTP, tiny generated model and volumes."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from nvseg_ray.batch import BatchConfig, run_batch
from nvseg_ray.batch.pipeline import FAULT_INJECTION_ENV
from nvseg_ray.config import InferenceConfig
from nvseg_ray.errors import ConfigError
from nvseg_ray.io import split_uri
from nvseg_ray.labels import LabelCatalog
from nvseg_ray.prompts import resolve_prompts

from .model_helpers import TEST_PATCH, body_phantom, save_volume, segment_once

pytestmark = pytest.mark.usefixtures("ray_cluster")

AFFINES = [np.diag([1.4, 1.4, 2.5, 1.0]), np.diag([-1.2, -1.2, 3.0, 1.0]), np.diag([1.6, 1.5, 2.0, 1.0])]


def make_tree(root: Path, layout: dict[str, int], corrupt: tuple[str, ...] = ()) -> list[Path]:
    """Write phantoms at root/<relpath> (value: seed); ``corrupt`` paths get garbage bytes."""
    paths = []
    for i, (rel, seed) in enumerate(layout.items()):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        save_volume(path, body_phantom((36 + 2 * i, 34, 18), seed=seed), AFFINES[i % len(AFFINES)])
        paths.append(path)
    for rel in corrupt:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"\x1f\x8b\x08\x00 this is not a volume")
    return paths


def batch_cfg(input: str, output: str, checkpoint: str, **kw) -> BatchConfig:
    inference = {"checkpoint": checkpoint, "classes": ["liver", "spleen", 5], "patch_size": TEST_PATCH,
                 "device": "cpu"} | kw.pop("inference", {})
    return BatchConfig(input=input, output=output, inference=inference, progress_interval_s=60,
                       progress_bars=False, **kw)


def by_uri(frame: pd.DataFrame) -> dict[str, dict]:
    return {Path(r["uri"]).name: r for r in frame.to_dict("records")}


def test_prefix_with_corrupt_file_mirrors_folders_and_matches_cli(tiny_checkpoint, tmp_path):
    inputs = tmp_path / "in"
    make_tree(inputs, {"p1/ct/a.nii.gz": 0, "p2/b.nii": 1, "c.nii.gz": 2}, corrupt=("p2/broken.nii.gz",))
    (inputs / "notes.txt").write_text("ignored: not a volume")
    out = tmp_path / "out"
    result = run_batch(batch_cfg(str(inputs), str(out), tiny_checkpoint, max_in_flight=2), echo=lambda s: None)
    # the admission gate held: never more than 2 volumes between read and written mask, every slot freed
    # (including the corrupt file's, which failed in preprocessing)
    assert result.summary["in_flight"] == {"limit": 2, "held": 0, "peak": 2}

    rows = by_uri(result.manifest)
    assert set(rows) == {"a.nii.gz", "b.nii", "c.nii.gz", "broken.nii.gz"}
    assert {k: r["status"] for k, r in rows.items()} == {"a.nii.gz": "ok", "b.nii": "ok", "c.nii.gz": "ok",
                                                        "broken.nii.gz": "failed"}
    assert rows["broken.nii.gz"]["error_code"] == "truncated_file"
    assert result.exit_code == 3 and result.summary["failed"] == 1 and result.summary["ok"] == 3
    for name, rel in {"a.nii.gz": "p1/ct/a/a_trans.nii.gz", "b.nii": "p2/b/b_trans.nii.gz",
                      "c.nii.gz": "c/c_trans.nii.gz"}.items():
        assert rows[name]["output_uri"] == str(out / rel)
        assert rows[name]["t_infer"] > 0 and rows[name]["model_actor"] and rows[name]["preprocess_node"]
        report = json.loads((out / rel).with_name(Path(rel).name.replace(".nii.gz", ".json")).read_text())
        assert report["resume_key"] == rows[name]["resume_key"]

    # identical to the single-volume engine (the CLI's code path) for the same input and prompts
    expected = segment_once(InferenceConfig(checkpoint=tiny_checkpoint, classes=["liver", "spleen", 5],
                                            patch_size=TEST_PATCH, device="cpu"), inputs / "p1/ct/a.nii.gz").labels
    written = nib.load(str(out / "p1/ct/a/a_trans.nii.gz"))
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), expected)

    # manifest + summary landed under the output prefix
    manifest = pd.read_parquet(result.summary["manifest"])
    assert len(manifest) == 4 and set(manifest["status"]) == {"ok", "failed"}
    assert json.loads(Path(result.summary["manifest"]).with_name("summary.json").read_text())["ok"] == 3


def test_rerun_skips_everything_and_overwrite_redoes(tiny_checkpoint, tmp_path):
    inputs = tmp_path / "in"
    make_tree(inputs, {"a.nii.gz": 0, "b.nii.gz": 1})
    out = tmp_path / "out"
    first = run_batch(batch_cfg(str(inputs), str(out), tiny_checkpoint), echo=lambda s: None)
    assert first.exit_code == 0 and first.summary["ok"] == 2
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*_trans.*")}

    again = run_batch(batch_cfg(str(inputs), str(out), tiny_checkpoint), echo=lambda s: None)
    assert list(again.manifest["status"]) == ["skipped", "skipped"]
    assert again.manifest["t_infer"].sum() == 0 and again.summary["model_busy_fraction"] == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*_trans.*")} == stamps  # nothing rewritten

    changed = run_batch(batch_cfg(str(inputs), str(out), tiny_checkpoint, inference={"classes": ["liver"]}),
                        echo=lambda s: None)
    assert set(changed.manifest["error_code"]) == {"output_conflict"} and changed.exit_code == 3
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*_trans.*")} == stamps  # never overwritten silently

    redo = run_batch(batch_cfg(str(inputs), str(out), tiny_checkpoint, inference={"overwrite": True}),
                     echo=lambda s: None)
    assert list(redo.manifest["status"]) == ["ok", "ok"]


def test_s3_glob_and_manifest_inputs(tiny_checkpoint, tmp_path, s3_env, s3_bucket):
    import s3fs

    local = tmp_path / "in"
    paths = make_tree(local, {"x/one.nii.gz": 0, "x/two.nii.gz": 1, "y/three.nii.gz": 2})
    fs = s3fs.S3FileSystem(**s3_env)
    for p in paths:
        fs.put(str(p), f"{s3_bucket}/ct/{p.relative_to(local)}")
    fs.put(tiny_checkpoint, f"{s3_bucket}/models/model.pt")
    ckpt = f"s3://{s3_bucket}/models/model.pt"

    globbed = run_batch(batch_cfg(f"s3://{s3_bucket}/ct/x/*.nii.gz", f"s3://{s3_bucket}/masks", ckpt),
                        echo=lambda s: None)
    assert globbed.summary["ok"] == 2
    assert fs.exists(f"{s3_bucket}/masks/one/one_trans.nii.gz") and fs.exists(f"{s3_bucket}/masks/one/one_trans.json")

    manifest = pd.DataFrame({"uri": [f"s3://{s3_bucket}/ct/y/three.nii.gz", "ct/x/one.nii.gz"],
                             "classes": ["spleen", "liver;3"], "output_name": ["case3", "case1"]})
    fs.pipe(f"{s3_bucket}/run.csv", manifest.to_csv(index=False).encode())
    listed = run_batch(batch_cfg(f"s3://{s3_bucket}/run.csv", f"s3://{s3_bucket}/by-list", ckpt),
                       echo=lambda s: None)
    rows = {Path(r["output_uri"]).name: r for r in listed.manifest.to_dict("records")}
    assert set(rows) == {"case3_trans.nii.gz", "case1_trans.nii.gz"}
    assert list(rows["case3_trans.nii.gz"]["class_ids"]) == [3]
    assert list(rows["case1_trans.nii.gz"]["class_ids"]) == [1, 3]
    # a relative uri resolves against the manifest's folder
    assert rows["case1_trans.nii.gz"]["uri"] == f"s3://{s3_bucket}/ct/x/one.nii.gz"
    assert {r["status"] for r in rows.values()} == {"ok"}
    report = json.loads(fs.cat(f"{s3_bucket}/by-list/case3/case3_trans.json"))
    assert report["prompts"]["class_ids"] == [3]
    assert fs.exists(split_uri(listed.summary["manifest"], s3_env)[1])


def test_jsonl_manifest_with_bad_rows(tiny_checkpoint, tmp_path):
    inputs = tmp_path / "in"
    make_tree(inputs, {"a.nii.gz": 0})
    lines = [{"uri": str(inputs / "a.nii.gz"), "modality": "MRI_BODY", "classes": None},
             {"uri": str(inputs / "a.nii.gz"), "classes": ["livr"], "output_name": "typo"},
             {"uri": str(inputs / "missing.nii.gz"), "output_name": "missing", "modality": "CT_BODY"}]
    listing = tmp_path / "list.jsonl"
    listing.write_text("\n".join(json.dumps(x) for x in lines))
    result = run_batch(batch_cfg(str(listing), str(tmp_path / "out"), tiny_checkpoint, max_failures=2,
                                 inference={"classes": None}), echo=lambda s: None)
    rows = {Path(r["output_uri"]).name: r for r in result.manifest.to_dict("records")}
    assert rows["a_trans.nii.gz"]["status"] == "ok" and rows["a_trans.nii.gz"]["modality"] == "MRI_BODY"
    assert rows["typo_trans.nii.gz"]["error_code"] == "invalid_prompt"
    assert "did you mean 'liver'" in rows["typo_trans.nii.gz"]["error_message"]
    assert rows["missing_trans.nii.gz"]["error_code"] == "storage_error"
    assert result.exit_code == 0  # 2 failures tolerated by --max-failures 2


def test_actor_crash_is_retried_then_marked_failed(tiny_checkpoint, tmp_path, monkeypatch):
    inputs = tmp_path / "in"
    make_tree(inputs, {"good1.nii.gz": 0, "poison.nii.gz": 1, "good2.nii.gz": 2})
    # one volume in flight: a slot leaked by the crashed (and retried) model task would hang the job here
    cfg = batch_cfg(str(inputs), str(tmp_path / "out"), tiny_checkpoint, max_attempts=2, max_in_flight=1)
    monkeypatch.setenv(FAULT_INJECTION_ENV, "poison")  # forwarded to the job's workers (NVSEG_* prefix)
    result = run_batch(cfg, echo=lambda s: None)
    rows = by_uri(result.manifest)
    assert rows["poison.nii.gz"]["status"] == "failed"
    assert rows["poison.nii.gz"]["error_code"] == "model_worker_crashed"
    assert rows["good1.nii.gz"]["status"] == rows["good2.nii.gz"]["status"] == "ok"
    assert result.summary["in_flight"] == {"limit": 1, "held": 0, "peak": 1}


def test_cpu_stages_starved_by_other_work_are_reported_then_run(tiny_checkpoint, tmp_path, monkeypatch):
    """Other work holding every CPU the model actor leaves (a Serve app, another job) makes the CPU stages pend:
    the driver says so once, and the job finishes when the CPUs come back."""
    import threading

    import ray

    from nvseg_ray.batch import pipeline

    inputs = tmp_path / "in"
    make_tree(inputs, {"a.nii.gz": 0})
    monkeypatch.setattr(pipeline, "STARVED_NOTICE_S", 2.0)
    total = ray.cluster_resources()["CPU"]
    holder = ray.remote(num_cpus=total - 1)(type("CpuHolder", (), {"ping": lambda self: None})).remote()
    ray.get(holder.ping.remote())  # the holder runs: one CPU is left, and the job's model actor takes it
    release = threading.Timer(10.0, ray.kill, args=(holder,))
    release.start()
    lines: list[str] = []
    try:
        result = run_batch(batch_cfg(str(inputs), str(tmp_path / "out"), tiny_checkpoint), echo=lines.append)
    finally:
        release.cancel()
        ray.kill(holder)
    told = [line for line in lines if "wait for a CPU" in line]
    assert len(told) == 1 and f"0 of {total:g} CPUs free" in told[0], lines
    assert result.exit_code == 0 and by_uri(result.manifest)["a.nii.gz"]["status"] == "ok"


def test_config_errors_are_clear(tiny_checkpoint, tmp_path):
    with pytest.raises(ConfigError, match="checkpoint is required"):
        BatchConfig.from_sources(None, input="x", output="y")
    with pytest.raises(ConfigError, match="min_actors"):
        BatchConfig.from_sources(None, input="x", output="y", min_actors=3, max_actors=1,
                                 inference={"checkpoint": tiny_checkpoint})


def test_finetuned_checkpoint_sidecar_round_trips_into_the_batch_job(tiny_checkpoint, tmp_path):
    """A finetuned model.pt + model.pt.labels.json (as jobs/train.py exports them) runs unchanged in the batch
    job; the sidecar's expand_subclasses=false keeps a reused group id (2) as one class."""
    import shutil

    ckpt = tmp_path / "finetuned.pt"
    shutil.copy(tiny_checkpoint, ckpt)
    (tmp_path / "finetuned.pt.labels.json").write_text(json.dumps(
        {"label_mapping": [[1, 2]], "classes": [2], "expand_subclasses": False}))
    inputs = tmp_path / "in"
    make_tree(inputs, {"a.nii.gz": 0})
    result = run_batch(batch_cfg(str(inputs), str(tmp_path / "out"), str(ckpt), inference={"classes": [2]}),
                       echo=lambda s: None)
    row = result.manifest.iloc[0]
    assert row["status"] == "ok" and list(row["class_ids"]) == [2]
    report = json.loads((tmp_path / "out" / "a" / "a_trans.json").read_text())
    assert report["prompts"]["expand_subclasses"] is False and report["prompts"]["class_ids"] == [2]
    # the released weights (no sidecar) still expand 2 -> 14, 5 as upstream does
    cfg = InferenceConfig(checkpoint=tiny_checkpoint, classes=[2])
    assert resolve_prompts(cfg, LabelCatalog.default()).class_ids == (14, 5)
