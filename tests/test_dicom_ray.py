"""DICOM through the Ray layers: the batch job over a DICOM prefix in S3 (moto over HTTP; resume by SOP UID set)
and the Serve app over real HTTP (a zip upload; a DICOMweb series URL on a real Orthanc; DICOM SEG answers)."""

from __future__ import annotations

import io
import json
import zipfile

import httpx
import numpy as np
import pytest

from nvseg_ray.batch import BatchConfig, run_batch
from nvseg_ray.dicom import synthetic as dsyn
from nvseg_ray.io import split_uri

from .model_helpers import TEST_PATCH
from .test_dicom_e2e import PHI, _seg_labels
from .test_serve import TIMEOUT_S, running_service

pytest.importorskip("highdicom")
pytestmark = pytest.mark.usefixtures("ray_cluster")


def _upload(fs, paths, prefix: str) -> None:
    for path in paths:
        fs.put_file(str(path), f"{prefix}/{path.parent.name}/{path.name}")


def test_batch_over_a_dicom_prefix_resumes_by_instance_set(tiny_checkpoint, tmp_path, s3_bucket):
    a = dsyn.write_series(tmp_path / "a", seed=11, shape=(40, 36, 20))
    b = dsyn.write_series(tmp_path / "b", seed=12, shape=(40, 36, 20), study_uid=a.study_uid)
    broken = dsyn.write_series(tmp_path / "c", seed=13, shape=(40, 36, 20), fault="uneven_spacing")
    fs, _ = split_uri(f"s3://{s3_bucket}")
    prefix = f"{s3_bucket}/archive"
    _upload(fs, a.paths, prefix)
    _upload(fs, b.paths[:-4], prefix)  # b arrives without its last 4 slices
    _upload(fs, broken.paths, prefix)
    fs.pipe_file(f"{prefix}/readme.txt", b"not DICOM")
    cfg = BatchConfig(input=f"s3://{prefix}", output=f"s3://{s3_bucket}/out", progress_interval_s=60,
                      progress_bars=False, max_failures=1,
                      inference={"checkpoint": tiny_checkpoint, "classes": ["liver", "spleen"],
                                 "patch_size": TEST_PATCH, "device": "cpu"})
    lines: list[str] = []
    first = run_batch(cfg, echo=lines.append)
    rows = {r["series_instance_uid"]: r for r in first.manifest.to_dict("records")}
    assert first.exit_code == 0 and len(rows) == 3
    assert rows[a.series_uid]["status"] == "ok" and rows[b.series_uid]["n_instances"] == len(b.paths) - 4
    assert rows[broken.series_uid]["status"] == "failed"
    assert rows[broken.series_uid]["error_code"] == "dicom_uneven_spacing"
    assert rows[a.series_uid]["study_instance_uid"] == a.study_uid and rows[a.series_uid]["dicom_modality"] == "CT"
    assert fs.exists(rows[a.series_uid]["seg_uri"].split("://", 1)[1])
    # per-stage costs of the series: CPU seconds and peak memory of the worker that ran each stage
    assert rows[a.series_uid]["cpu_infer"] > 0 and rows[a.series_uid]["t_seg"] > 0
    assert all(rows[a.series_uid][f"rss_mb_{stage}"] > 50 for stage in ("read", "preprocess", "infer", "seg"))
    manifest_text = json.dumps(first.manifest.to_dict("records"), default=str) + "\n".join(lines)
    for value in PHI:
        assert value not in manifest_text
    # b gains its last slices: only b is redone; a is skipped; the broken series fails again
    _upload(fs, b.paths[-4:], prefix)
    second = run_batch(cfg, echo=lambda s: None)
    rows2 = {r["series_instance_uid"]: r for r in second.manifest.to_dict("records")}
    assert rows2[a.series_uid]["status"] == "skipped"
    assert rows2[b.series_uid]["status"] == "ok" and rows2[b.series_uid]["n_instances"] == len(b.paths)


def test_batch_from_a_qido_query_stores_segs_into_the_pacs(tiny_checkpoint, tmp_path, orthanc):
    """--input a QIDO-RS query, --output the DICOMweb root (STOW-RS), --run-dir for the manifest and reports; a
    re-run skips what is done."""
    from nvseg_ray.dicom.dicomweb import discover

    ct = dsyn.write_series(tmp_path / "ct", seed=21, shape=(40, 36, 16))
    mr = dsyn.write_series(tmp_path / "mr", seed=22, shape=(40, 36, 16), modality="MR", study_uid=ct.study_uid)
    orthanc.upload([*ct.paths, *mr.paths])
    root = orthanc.dicomweb_root
    cfg = BatchConfig(input=f"{root}/series?Modality=CT&StudyInstanceUID={ct.study_uid}", output=f"dicomweb+{root}",
                      run_dir=str(tmp_path / "run"), progress_interval_s=60, progress_bars=False,
                      inference={"checkpoint": tiny_checkpoint, "modality": "auto", "classes": ["liver", "spleen"],
                                 "patch_size": TEST_PATCH, "device": "cpu"})
    first = run_batch(cfg, echo=lambda s: None)
    rows = first.manifest.to_dict("records")
    assert first.exit_code == 0 and [r["series_instance_uid"] for r in rows] == [ct.series_uid]
    assert rows[0]["status"] == "ok" and rows[0]["seg_uri"].startswith(root)
    assert not list((tmp_path / "run").rglob("*.nii.gz")) and list((tmp_path / "run").rglob("*_trans.json"))
    series, skipped = discover(f"{root}/studies/{ct.study_uid}")
    assert {s.series_instance_uid for s in series} == {ct.series_uid, mr.series_uid}
    assert skipped.get("no_image:SEG") == 1  # the stored SEG, in the source study
    again = run_batch(cfg, echo=lambda s: None)
    assert [r["status"] for r in again.manifest.to_dict("records")] == ["skipped"]
    with pytest.raises(Exception, match="run-dir"):
        BatchConfig(input=cfg.input, output=f"dicomweb+{root}", inference={"checkpoint": tiny_checkpoint})


# The Serve tests come last: their module-scoped app holds 3 of the test cluster's 4 logical CPUs (one per
# deployment) until the module ends, and a batch job's model actor takes the fourth, so a batch test after them
# would wait for CPUs forever.


@pytest.fixture(scope="module")
def dicom_service(tiny_checkpoint):
    args = {"checkpoint": tiny_checkpoint, "patch_size": list(TEST_PATCH), "device": "cpu", "max_upload_mb": 8.0,
            "request_timeout_s": TIMEOUT_S, "allowed_hosts": ["127.0.0.1"], "allow_private_networks": True}
    with running_service(args) as url:
        yield url


def test_serve_zip_upload_returns_seg_and_nifti(dicom_service, tmp_path):
    fx = dsyn.write_series(tmp_path / "s", seed=14)
    archive = dsyn.zip_series(tmp_path / "s.zip", [fx]).read_bytes()
    resp = httpx.post(f"{dicom_service}/v1/segment", files={"file": ("series.zip", archive, "application/zip")},
                      data={"classes": "liver,spleen", "output": "dicom-seg"}, timeout=TIMEOUT_S)
    assert resp.status_code == 200, resp.text[:500]
    assert resp.headers["content-type"] == "application/dicom"
    seg_labels = _seg_labels(resp.content, fx)
    resp = httpx.post(f"{dicom_service}/v1/segment", files={"file": ("series.zip", archive, "application/zip")},
                      data={"classes": "liver,spleen", "output": "nifti"}, timeout=TIMEOUT_S)
    assert resp.status_code == 200, resp.text[:500]
    import gzip

    import nibabel as nib

    img = nib.Nifti1Image.from_bytes(gzip.decompress(resp.content))
    np.testing.assert_allclose(img.affine, fx.ras_affine, atol=1e-4)
    assert np.array_equal(np.asarray(img.dataobj), seg_labels)
    # a zip with two series is refused with a clear error, as is a NIfTI upload asking for a SEG
    two = dsyn.write_series(tmp_path / "t", seed=15)
    both = dsyn.zip_series(tmp_path / "both.zip", [fx, two]).read_bytes()
    resp = httpx.post(f"{dicom_service}/v1/segment", files={"file": ("both.zip", both)},
                      data={"classes": "liver"}, timeout=TIMEOUT_S)
    assert resp.status_code == 422 and resp.json()["error"]["code"] == "several_series"
    assert str(tmp_path) not in resp.text  # the temporary folder is not named
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("notes.txt", "nothing here")
    resp = httpx.post(f"{dicom_service}/v1/segment", files={"file": ("x.zip", buf.getvalue())},
                      data={"classes": "liver"}, timeout=TIMEOUT_S)
    assert resp.status_code == 422 and resp.json()["error"]["code"] == "no_dicom_series"


def test_serve_dicomweb_series_url(dicom_service, tmp_path, orthanc):
    fx = dsyn.write_series(tmp_path / "w", seed=16)
    orthanc.upload(fx.paths)
    url = f"{orthanc.dicomweb_root}/studies/{fx.study_uid}/series/{fx.series_uid}"
    resp = httpx.post(f"{dicom_service}/v1/vista3d/inference",
                      json={"image": url, "modality": "auto", "output": {"format": "dicom-seg"}}, timeout=TIMEOUT_S)
    assert resp.status_code == 200, resp.text[:500]
    labels = _seg_labels(resp.content, fx)
    assert labels.shape == fx.shape
    resp = httpx.post(f"{dicom_service}/v1/vista3d/inference",
                      json={"image": url.replace(fx.series_uid, "1.2.3.4"), "prompts": {"classes": ["liver"]}},
                      timeout=TIMEOUT_S)
    assert resp.status_code in (404, 422), resp.text[:300]
    resp = httpx.post(f"{dicom_service}/v1/jobs", json={"image": url, "output_uri": "s3://nowhere/x.nii.gz"},
                      timeout=TIMEOUT_S)
    assert resp.status_code == 400 and "/v1/vista3d/inference" in resp.json()["error"]["message"]
