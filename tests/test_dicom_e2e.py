"""DICOM end to end as a user meets it: `nvseg segment` on folders / zips / DICOMweb, the batch job over a DICOM
prefix in S3 (moto over HTTP), and the Serve app with a zip upload and a DICOMweb series URL (real Orthanc).

Series are generated with :mod:`nvseg_ray.dicom.synthetic`; the model is the tiny generated checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from nvseg_ray.cli import main
from nvseg_ray.config import InferenceConfig
from nvseg_ray.dicom import synthetic as dsyn
from nvseg_ray.engine import segment_volume
from nvseg_ray.errors import EXIT_INVALID, EXIT_VOLUMES_FAILED
from nvseg_ray.model_runner import ModelRunner
from nvseg_ray.stages import VolumeStages

from .model_helpers import TEST_PATCH
from .test_dicom_seg import DCIODVFY, dciodvfy_errors

pytest.importorskip("highdicom")

CLASSES = "liver,spleen,5"
PHI = tuple(dsyn.PATIENT.values())


def _cli(*argv: str) -> int:
    return main([str(a) for a in argv])


def _common(checkpoint: str) -> list[str]:
    return ["--checkpoint", checkpoint, "--patch-size", ",".join(map(str, TEST_PATCH)), "--device", "cpu"]


def _no_phi(*texts: str) -> None:
    for text in texts:
        for value in PHI:
            assert value not in text, f"patient identifier {value!r} leaked"


def _seg_labels(path: Path | bytes, fx: dsyn.SeriesFixture) -> np.ndarray:
    """A SEG read back with highdicom onto the series' own grid, as (X, Y, Z) global class ids (segment number ->
    class id through the segment descriptions); raises unless the SEG's frames lie exactly on that grid."""
    import io

    import highdicom as hd

    from nvseg_ray.dicom.seg import segment_class_ids

    seg = hd.seg.segread(io.BytesIO(path) if isinstance(path, bytes) else str(path))
    mapping = segment_class_ids(seg)
    class_ids = np.zeros(max(mapping) + 1, np.int64)
    class_ids[list(mapping)] = list(mapping.values())
    x, y, z = fx.shape
    grid = hd.VolumeGeometry(affine=np.asarray(fx.lps_affine)[:, [2, 1, 0, 3]], spatial_shape=(z, y, x),
                             coordinate_system="PATIENT", frame_of_reference_uid=fx.frame_of_reference_uid)
    matched = seg.get_volume(combine_segments=True, relabel=False).match_geometry(grid)
    return class_ids[matched.array].transpose(2, 1, 0)


def test_folder_of_three_series_plus_sr_and_scout(tiny_checkpoint, tmp_path, capsys):
    study = dsyn.write_folder_with_extras(tmp_path / "study")
    out = tmp_path / "out"
    code = _cli("segment", study.folder, "-o", out, "--classes", CLASSES, *_common(tiny_checkpoint))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "1 localizer" in captured.out and "no_image:SR" in captured.out
    _no_phi(captured.out, captured.err)
    for fx in study.series:
        mask = out / fx.study_uid / fx.series_uid / f"{fx.series_uid}_trans.nii.gz"
        seg = mask.with_name(f"{fx.series_uid}_trans.seg.dcm")
        report_path = mask.with_name(f"{fx.series_uid}_trans.json")
        assert mask.exists() and seg.exists() and report_path.exists()
        img = nib.load(mask)
        np.testing.assert_allclose(img.affine, fx.ras_affine, atol=1e-4)
        labels = np.asarray(img.dataobj)
        assert np.array_equal(_seg_labels(seg, fx), labels), "the SEG reads back to the NIfTI mask's labels"
        if DCIODVFY:  # the standard's own checker (Debian dicom3tools): no IOD errors in a BINARY SEG
            errors, text = dciodvfy_errors(seg)
            assert not errors, text
        report_text = report_path.read_text()
        _no_phi(report_text)
        report = json.loads(report_text)
        assert report["dicom"]["series_instance_uid"] == fx.series_uid
        assert report["dicom"]["n_instances"] == len(fx.paths)
        assert report["dicom"]["seg"]["series_instance_uid"] and report["dicom"]["seg"]["segments"] >= 1


@pytest.mark.parametrize("orientation,kw", [("axial", {}), ("oblique", {}), ("coronal", {"feet_first": True}),
                                            ("axial", {"multiframe": True})])
def test_dicom_mask_equals_mask_of_the_same_series_as_nifti(tiny_checkpoint, tmp_path, orientation, kw):
    """The series converted to NIfTI (our assembly, saved to a file; its affine and voxels equal the generator's and,
    in tests/test_dicom_assembly.py, dcm2niix's) segments to the same mask as the series itself."""
    from nvseg_ray.dicom.assembly import load_series

    fx = dsyn.write_series(tmp_path / "s", orientation=orientation, seed=3, **kw)
    nifti = tmp_path / "same.nii.gz"
    converted = load_series(fx.dicom_series()).image
    np.testing.assert_allclose(converted.affine, fx.ras_affine, atol=1e-4)
    assert np.array_equal(np.asarray(converted.dataobj), fx.expected)
    nib.save(converted, nifti)
    cfg = InferenceConfig(checkpoint=tiny_checkpoint, patch_size=TEST_PATCH, device="cpu", classes=["liver", 5])
    stages, runner = VolumeStages(cfg), ModelRunner(cfg)
    from_dicom = segment_volume(fx.dicom_series(), stages, runner)
    from_nifti = segment_volume(str(nifti), stages, runner)
    np.testing.assert_allclose(from_dicom.volume.affine, from_nifti.volume.affine, atol=1e-4)
    assert np.array_equal(from_dicom.labels, from_nifti.labels)


def test_modality_auto_and_output_format_rules(tiny_checkpoint, tmp_path, capsys):
    mr = dsyn.write_series(tmp_path / "mr", modality="MR", seed=4)
    out = tmp_path / "out"
    assert _cli("segment", mr.folder, "-o", out, "--modality", "auto", "--output-format", "dicom-seg",
                *_common(tiny_checkpoint)) == 0
    report = json.loads(next(out.rglob("*.json")).read_text())
    assert report["modality"] == "MRI_BODY" and not list(out.rglob("*.nii.gz"))
    nifti = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(mr.expected, mr.ras_affine), nifti)
    capsys.readouterr()
    assert _cli("segment", nifti, "-o", out, "--modality", "auto", *_common(tiny_checkpoint)) == EXIT_VOLUMES_FAILED
    assert "--modality auto needs DICOM input" in capsys.readouterr().err
    assert _cli("segment", nifti, "-o", out, "--classes", "liver", "--output-format", "dicom-seg",
                *_common(tiny_checkpoint)) == EXIT_INVALID
    assert "needs DICOM input" in capsys.readouterr().err


def test_zip_input_and_geometry_fault_is_one_failed_volume(tiny_checkpoint, tmp_path, capsys):
    good = dsyn.write_series(tmp_path / "good", seed=5)
    bad = dsyn.write_series(tmp_path / "bad", seed=6, fault="missing_slice")
    archive = dsyn.zip_series(tmp_path / "both.zip", [good, bad])
    out = tmp_path / "out"
    code = _cli("segment", archive, "-o", out, "--classes", CLASSES, *_common(tiny_checkpoint))
    err = capsys.readouterr().err
    assert code == EXIT_VOLUMES_FAILED
    assert "dicom_missing_slice" in err and bad.series_uid in err and "Traceback" not in err
    assert (out / good.study_uid / good.series_uid / f"{good.series_uid}_trans.seg.dcm").exists()
    # --dicom-resample turns the irregular stack into a volume, and the report says so
    assert _cli("segment", bad.folder, "-o", out, "--classes", CLASSES, "--dicom-resample",
                *_common(tiny_checkpoint)) == 0
    report = json.loads((out / bad.study_uid / bad.series_uid / f"{bad.series_uid}_trans.json").read_text())
    assert report["dicom"]["resampled"] is True and report["dicom"]["notes"]


def test_dicomweb_in_and_seg_stored_back_into_the_study(tiny_checkpoint, tmp_path, orthanc, capsys):
    from nvseg_ray.dicom.dicomweb import discover, series_exists

    fx = dsyn.write_series(tmp_path / "pacs", seed=7)
    orthanc.upload(fx.paths)
    root = orthanc.dicomweb_root
    url = f"{root}/studies/{fx.study_uid}/series/{fx.series_uid}"
    code = _cli("segment", url, "-o", f"dicomweb+{root}", "--classes", CLASSES, *_common(tiny_checkpoint))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    _no_phi(captured.out, captured.err)
    found, _ = discover(f"{root}/studies/{fx.study_uid}")
    # the study now holds the SEG (skipped by discovery as a non-image object) beside the CT
    assert [s.series_instance_uid for s in found] == [fx.series_uid]
    from nvseg_ray.dicom.seg import series_uids

    assert any(series_exists(root, fx.study_uid, uid) for uid in _seg_series_in(orthanc, fx.study_uid))
    # running it again stores the same SEG series again (deterministic UIDs): still one SEG series in the study
    assert _cli("segment", url, "-o", f"dicomweb+{root}", "--classes", CLASSES, *_common(tiny_checkpoint)) == 0
    assert len(_seg_series_in(orthanc, fx.study_uid)) == 1
    del series_uids


def _seg_series_in(orthanc, study_uid: str) -> list[str]:
    import httpx

    answer = httpx.get(f"{orthanc.dicomweb_root}/studies/{study_uid}/series", params={"Modality": "SEG"},
                       headers=orthanc._headers(), timeout=30)
    answer.raise_for_status()
    return [item["0020000E"]["Value"][0] for item in (answer.json() if answer.content else [])]


def test_dicomweb_urls_pass_the_serve_url_rules(tmp_path):
    """The Serve app checks a DICOMweb URL like any image URL before a request is sent: a loopback PACS is refused
    unless allow_private_networks, and a host outside the allow-list is refused."""
    from nvseg_ray.errors import FetchRefused
    from nvseg_ray.serving.dicom_input import dicomweb_series
    from nvseg_ray.serving.fetch import FetchPolicy

    url = "http://127.0.0.1:9/dicom-web/studies/1.2.3/series/1.2.3.4"
    with pytest.raises(FetchRefused) as private:
        dicomweb_series(url, FetchPolicy())
    assert private.value.http_status == 403
    with pytest.raises(FetchRefused):
        dicomweb_series("dicomweb+" + url, FetchPolicy())
    with pytest.raises(FetchRefused):
        dicomweb_series(url.replace("127.0.0.1", "pacs.example.org"),
                        FetchPolicy(allowed_hosts=("images.example.org",)))


def test_zip_inflating_beyond_the_voxel_budget_is_refused_before_inflating(tmp_path):
    """A zip whose members declare more bytes than the voxel budget can hold is refused from the central directory
    (a zip bomb is never inflated)."""
    import zipfile

    from nvseg_ray.dicom.discovery import discover_series
    from nvseg_ray.dicom.sources import load_datasets
    from nvseg_ray.errors import DicomError

    fx = dsyn.write_series(tmp_path / "s", seed=8)
    archive = tmp_path / "bomb.zip"
    dsyn.zip_series(archive, [fx])
    import pydicom

    padded = pydicom.dcmread(fx.paths[-1])
    padded.SOPInstanceUID = padded.file_meta.MediaStorageSOPInstanceUID = dsyn.uid(8, "padded")
    padded.ImagePositionPatient = [float(v) + 50.0 for v in padded.ImagePositionPatient]
    padded.DataSetTrailingPadding = b"\0" * (64 * 2**20)  # 64 MB of zeros after the pixel data: ~64 KB zipped
    with zipfile.ZipFile(archive, "a", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("padded.dcm", dsyn.dataset_bytes(padded))
    series = discover_series(str(archive)).series
    assert len(series) == 1
    with pytest.raises(DicomError) as err:
        load_datasets(series[0], max_bytes=8 * 2**20)
    assert err.value.code == "too_large" and fx.series_uid in err.value.message
