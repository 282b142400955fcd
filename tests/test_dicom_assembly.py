"""DICOM series -> volume (nvseg_ray/dicom/assembly.py), on series written by nvseg_ray/dicom/synthetic.py.

Every case compares with what the generator says the series must convert to (RAS affine, float32 HU array),
and one case with the dcm2niix converter when it is installed. Damaged series raise their own error class,
naming the series UID and the slice positions; ``resample=True`` regularises tilted / gapped / uneven stacks.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("pydicom", reason='the DICOM extra is needed: pip install "nvseg-ray[dicom]"')

import pydicom  # noqa: E402

from nvseg_ray.dicom import synthetic as S  # noqa: E402
from nvseg_ray.dicom.assembly import AssembledSeries, assemble_series, load_series  # noqa: E402
from nvseg_ray.dicom.series import DicomInstance  # noqa: E402
from nvseg_ray.errors import (  # noqa: E402
    DicomDuplicatePosition,
    DicomGantryTilt,
    DicomGeometryError,
    DicomMissingSlice,
    DicomMixedGeometry,
    DicomNoPixelData,
    DicomSingleSlice,
    DicomUnevenSpacing,
    InputError,
)

SHAPE = (40, 32, 12)  # (X = columns, Y = rows, Z = slices)
SPACING = (0.8, 0.7, 2.0)


def _assemble(fx: S.SeriesFixture, **kwargs) -> AssembledSeries:
    return assemble_series(fx.datasets(), fx.dicom_series(), **kwargs)


def _no_patient_data(text: str) -> None:
    for value in S.PATIENT.values():
        assert value not in text
    assert "DOE" not in text and "JANE" not in text


# --------------------------------------------------------------------------------------------------------
# Regular series: the generator's affine and voxels
# --------------------------------------------------------------------------------------------------------

CASES = {
    "axial": {},
    "coronal": {"orientation": "coronal"},
    "sagittal": {"orientation": "sagittal"},
    "oblique": {"orientation": "oblique"},
    "feet_first": {"feet_first": True},
    "feet_first_coronal": {"orientation": "coronal", "feet_first": True},
    "multiframe": {"multiframe": True},
    "multiframe_oblique_jpeg2000": {"multiframe": True, "orientation": "oblique", "transfer_syntax": "jpeg2000"},
    "jpeg2000": {"transfer_syntax": "jpeg2000"},
    "rle": {"transfer_syntax": "rle"},
    "jpegls": {"transfer_syntax": "jpegls"},
    "deflated": {"transfer_syntax": "deflated"},
    "implicit": {"transfer_syntax": "implicit"},
    "mr": {"modality": "MR"},
    "mr_multiframe": {"modality": "MR", "multiframe": True, "orientation": "sagittal"},
    "rescale_2_-1000": {"rescale": (2.0, -1000.0)},
    "rescale_half": {"rescale": (0.5, -50.0)},
    "signed_no_rescale": {"rescale": None},
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("resample", [False, True], ids=["strict", "resample"])
def test_assembles_like_the_generator(tmp_path: Path, case: str, resample: bool) -> None:
    fx = S.write_series(tmp_path / "s", shape=SHAPE, spacing=SPACING, seed=3, **CASES[case])
    out = _assemble(fx, resample=resample)

    np.testing.assert_allclose(out.image.affine, fx.ras_affine, atol=1e-4)
    np.testing.assert_allclose(out.lps_affine, fx.lps_affine, atol=1e-4)
    np.testing.assert_allclose(np.diag([-1, -1, 1, 1]) @ out.lps_affine, out.image.affine, atol=1e-9)
    data = np.asarray(out.image.dataobj)
    assert data.dtype == np.float32 and data.shape == SHAPE
    np.testing.assert_array_equal(data, fx.expected)
    assert int(out.image.header["qform_code"]) == 1 and int(out.image.header["sform_code"]) == 1
    np.testing.assert_allclose(out.image.get_qform(), fx.ras_affine, atol=1e-4)
    assert out.resampled is False and out.notes == []
    assert out.source_dtype == str(fx.stored.dtype)
    assert out.series.series_instance_uid == fx.series_uid
    # headers only, in slice order (the generator writes paths in slice order)
    assert all("PixelData" not in ds for ds in out.source_datasets)
    assert [ds.SOPInstanceUID for ds in out.source_datasets] == fx.sop_instance_uids
    assert out.frame_numbers == fx.frame_numbers
    if fx.frame_numbers is not None:
        assert out.frame_numbers == list(range(SHAPE[2], 0, -1))  # frames are written in reverse slice order


def test_rescale_per_instance_and_per_frame(tmp_path: Path) -> None:
    """Rescale Slope / Intercept of each instance, and the per-frame Pixel Value Transformation over the shared."""
    fx = S.write_series(tmp_path / "classic", shape=SHAPE, spacing=SPACING)
    datasets = fx.datasets()
    odd = next(ds for ds in datasets if ds.SOPInstanceUID == fx.sop_instance_uids[5])
    odd.RescaleSlope, odd.RescaleIntercept = 2, -2048
    data = np.asarray(assemble_series(datasets, fx.dicom_series()).image.dataobj)
    expected = fx.expected
    expected[:, :, 5] = fx.stored[:, :, 5].astype(np.float32) * 2 - 2048
    np.testing.assert_array_equal(data, expected)

    mf = S.write_series(tmp_path / "enhanced", shape=SHAPE, spacing=SPACING, multiframe=True)
    ds = mf.datasets()[0]
    shared = ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
    assert (float(shared.RescaleSlope), float(shared.RescaleIntercept)) == (1.0, -1024.0)
    item = ds.PerFrameFunctionalGroupsSequence[0]  # frame 1 = the last slice
    item.PixelValueTransformationSequence = pydicom.Sequence([pydicom.Dataset()])
    item.PixelValueTransformationSequence[0].RescaleSlope = 1
    item.PixelValueTransformationSequence[0].RescaleIntercept = -1000
    item.PixelValueTransformationSequence[0].RescaleType = "HU"
    out = assemble_series([ds], mf.dicom_series())
    expected = mf.expected
    expected[:, :, -1] += 24
    np.testing.assert_array_equal(np.asarray(out.image.dataobj), expected)


def _dcm2niix() -> str | None:
    local = Path(sys.executable).parent / "dcm2niix"
    return str(local) if local.exists() else shutil.which("dcm2niix")


@pytest.mark.skipif(_dcm2niix() is None, reason="dcm2niix is not installed (pip install dcm2niix)")
@pytest.mark.parametrize("case", ["axial", "oblique", "feet_first_coronal"])
def test_matches_dcm2niix(tmp_path: Path, case: str) -> None:
    """Same voxels and affine as dcm2niix's NIfTI of the same series, once both are made closest-canonical."""
    fx = S.write_series(tmp_path / "s", shape=SHAPE, spacing=SPACING, seed=5, **CASES[case])
    out_dir = tmp_path / "dcm2niix"
    out_dir.mkdir()
    run = subprocess.run([_dcm2niix(), "-z", "n", "-b", "n", "-f", "converted", "-o", str(out_dir), str(fx.folder)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    (converted,) = out_dir.glob("*.nii")
    theirs = nib.as_closest_canonical(nib.load(converted))
    ours = nib.as_closest_canonical(_assemble(fx).image)
    np.testing.assert_allclose(ours.affine, theirs.affine, atol=1e-4)
    np.testing.assert_array_equal(ours.get_fdata(), theirs.get_fdata())


# --------------------------------------------------------------------------------------------------------
# Damaged series
# --------------------------------------------------------------------------------------------------------

FAULTS = {
    "missing_slice": (DicomMissingSlice, True),
    "uneven_spacing": (DicomUnevenSpacing, True),
    "gantry_tilt": (DicomGantryTilt, True),
    "mixed_orientation": (DicomMixedGeometry, False),
    "mixed_matrix": (DicomMixedGeometry, False),
    "duplicate_position": (DicomDuplicatePosition, False),
    "single_slice": (DicomSingleSlice, False),
    "no_pixel_data": (DicomNoPixelData, False),
}


def _fault_position(fx: S.SeriesFixture) -> float:
    """The slice position (mm along the normal) the error must name."""
    n = len(fx.positions_mm)
    if fx.fault == "missing_slice":  # where the slice would be, on the regular grid
        normal = fx.lps_affine[:3, 2] / np.linalg.norm(fx.lps_affine[:3, 2])
        k = fx.fault_slices[0]
        return float(np.dot(fx.lps_affine[:3, 3] + k * fx.lps_affine[:3, 2], normal))
    if fx.fault in ("uneven_spacing", "duplicate_position"):
        return fx.positions_mm[SHAPE[2] // 2]
    if fx.fault in ("gantry_tilt", "single_slice"):
        return fx.positions_mm[0]
    assert n == SHAPE[2]
    return fx.positions_mm[fx.fault_slices[0]]


#: every fault without resampling; with ``resample=True`` the faults resampling cannot fix (the others: below)
FAULT_RUNS = [(f, False) for f in FAULTS] + [(f, True) for f, (_, resamplable) in FAULTS.items() if not resamplable]


@pytest.mark.parametrize(("fault", "resample"), FAULT_RUNS,
                         ids=[f"{f}-{'resample' if r else 'strict'}" for f, r in FAULT_RUNS])
def test_each_fault_raises_its_own_error(tmp_path: Path, fault: str, resample: bool) -> None:
    error_class, resamplable = FAULTS[fault]
    fx = S.write_series(tmp_path / fault, shape=SHAPE, spacing=SPACING, fault=fault)
    with pytest.raises(error_class) as caught:
        _assemble(fx, resample=resample)
    err = caught.value
    assert type(err) is error_class
    text = str(err)
    assert fx.series_uid in err.message and err.details["series_uid"] == fx.series_uid
    position = _fault_position(fx)
    assert f"{position:.2f}" in err.message, (position, err.message)
    assert any(abs(p - position) < 1e-2 for p in err.details["positions"]), err.details
    assert err.hint
    assert ("--dicom-resample" in err.hint) is resamplable
    _no_patient_data(text + repr(err.to_dict()))
    if isinstance(err, DicomGeometryError):
        assert err.code.startswith("dicom_")


def _linear_volume(fx: S.SeriesFixture) -> np.ndarray:
    """A volume whose slice k holds 10 x its position along the normal (plus a column ramp): linear in mm."""
    d = np.asarray(fx.positions_mm)
    ramp = np.arange(SHAPE[0])[:, None, None]
    return np.broadcast_to(np.rint(10 * d)[None, None, :] + ramp, (SHAPE[0], SHAPE[1], len(d))).astype(np.int16)


def test_resample_fills_a_missing_slice(tmp_path: Path) -> None:
    fx = S.write_series(tmp_path / "s", shape=SHAPE, spacing=SPACING, fault="missing_slice")
    out = _assemble(fx, resample=True)
    assert out.resampled and len(out.notes) == 1 and "missing slice" in out.notes[0]
    gap = _fault_position(fx)
    assert f"{gap:.2f}" in out.notes[0]
    np.testing.assert_allclose(out.image.affine, fx.ras_affine, atol=1e-4)  # the regular grid the stack lost a slice of
    data = np.asarray(out.image.dataobj)
    assert data.shape == SHAPE
    k = fx.fault_slices[0]
    keep = [z for z in range(SHAPE[2]) if z != k]
    np.testing.assert_array_equal(data[:, :, keep], fx.expected[:, :, keep])
    np.testing.assert_allclose(data[:, :, k], (fx.expected[:, :, k - 1] + fx.expected[:, :, k + 1]) / 2, atol=1e-3)


def test_resample_regularises_uneven_spacing(tmp_path: Path) -> None:
    probe = S.write_series(tmp_path / "probe", shape=SHAPE, spacing=SPACING, fault="uneven_spacing")
    fx = S.write_series(tmp_path / "s", _linear_volume(probe), spacing=SPACING, fault="uneven_spacing")
    assert fx.positions_mm == probe.positions_mm
    out = _assemble(fx, resample=True)
    assert out.resampled and out.notes == ["resampled: uneven spacing 2.00-3.00 mm -> 2.00 mm (linear)"]
    d = np.asarray(fx.positions_mm)
    n = int(np.floor((d[-1] - d[0]) / 2.0)) + 1  # the 2 mm grid from the first plane, within the stack
    data = np.asarray(out.image.dataobj)
    assert data.shape == SHAPE[:2] + (n,)
    lps = out.lps_affine
    np.testing.assert_allclose(lps[:3, :2], fx.lps_affine[:3, :2], atol=1e-6)
    np.testing.assert_allclose(lps[:3, 2], [0, 0, 2.0], atol=1e-6)
    np.testing.assert_allclose(lps[:3, 3], fx.lps_affine[:3, 3], atol=1e-6)
    grid = d[0] + 2.0 * np.arange(n)
    ramp = np.arange(SHAPE[0])[:, None]
    for k in range(n):  # linear in position -> linear interpolation is exact (up to the int16 rounding)
        np.testing.assert_allclose(data[:, :, k], np.broadcast_to(10 * grid[k] + ramp, SHAPE[:2]), atol=0.6)


def test_resample_removes_gantry_tilt(tmp_path: Path) -> None:
    """Each output voxel holds the source slice's value at that voxel's world position (bilinear)."""
    from scipy import ndimage

    fx = S.write_series(tmp_path / "s", shape=SHAPE, spacing=SPACING, fault="gantry_tilt")
    out = _assemble(fx, resample=True)
    assert out.resampled and "gantry tilt 15.00 deg" in out.notes[0]
    a = out.lps_affine[:3, :3]
    np.testing.assert_allclose(a.T @ a, np.diag(np.diag(a.T @ a)), atol=1e-6)  # an orthogonal grid
    data = np.asarray(out.image.dataobj)
    assert data.shape == SHAPE
    sources = {ds.SOPInstanceUID: ds for ds in fx.datasets()}
    ii, jj = np.meshgrid(np.arange(SHAPE[0]), np.arange(SHAPE[1]), indexing="ij")
    for k in (0, SHAPE[2] // 2, SHAPE[2] - 1):
        ds = sources[fx.sop_instance_uids[k]]
        row, col = np.asarray(ds.ImageOrientationPatient[:3], float), np.asarray(ds.ImageOrientationPatient[3:], float)
        ipp = np.asarray(ds.ImagePositionPatient, float)
        world = (out.lps_affine @ np.stack([ii.ravel(), jj.ravel(), np.full(ii.size, k), np.ones(ii.size)]))[:3]
        src_i = (world - ipp[:, None]).T @ row / SPACING[0]
        src_j = (world - ipp[:, None]).T @ col / SPACING[1]
        inside = (src_i >= 0) & (src_i <= SHAPE[0] - 1) & (src_j >= 0) & (src_j <= SHAPE[1] - 1)
        assert inside.mean() > 0.5
        want = ndimage.map_coordinates(fx.expected[:, :, k], [src_i[inside], src_j[inside]], order=1)
        np.testing.assert_allclose(data[:, :, k].ravel()[inside], want, atol=1e-2)


# --------------------------------------------------------------------------------------------------------
# Limits and decoders
# --------------------------------------------------------------------------------------------------------


def test_too_large_is_refused_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pydicom.pixels

    fx = S.write_series(tmp_path / "s", shape=SHAPE, spacing=SPACING, transfer_syntax="rle")
    datasets = fx.datasets()

    def no_decoding(*args, **kwargs):
        raise AssertionError("pixel data decoded before the size check")

    monkeypatch.setattr(pydicom.pixels, "get_decoder", no_decoding)
    n = int(np.prod(SHAPE))
    with pytest.raises(InputError) as caught:
        assemble_series(datasets, fx.dicom_series(), max_voxels=n - 1)
    assert caught.value.code == "too_large"
    assert caught.value.details["n_voxels"] == n and caught.value.details["series_uid"] == fx.series_uid
    assert all("PixelData" in ds for ds in datasets)
    monkeypatch.undo()
    assert assemble_series(datasets, fx.dicom_series(), max_voxels=n).image.shape == SHAPE


def test_resampled_grid_is_checked_against_the_limit(tmp_path: Path) -> None:
    fx = S.write_series(tmp_path / "s", shape=SHAPE, spacing=SPACING, fault="uneven_spacing")
    n_source = SHAPE[0] * SHAPE[1] * len(fx.paths)
    with pytest.raises(InputError) as caught:  # the source stack fits, the 2 mm grid does not
        _assemble(fx, resample=True, max_voxels=n_source)
    assert caught.value.code == "too_large" and caught.value.details["n_voxels"] > n_source


def test_missing_decoder_names_the_syntax_and_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pydicom.pixels

    fx = S.write_series(tmp_path / "s", shape=SHAPE, spacing=SPACING, transfer_syntax="jpeg2000")
    real = pydicom.pixels.get_decoder

    class Unavailable:
        is_available = False
        missing_dependencies = ["pylibjpeg-openjpeg"]

    monkeypatch.setattr(pydicom.pixels, "get_decoder",
                        lambda uid: Unavailable() if uid == S.TRANSFER_SYNTAXES["jpeg2000"] else real(uid))
    with pytest.raises(DicomNoPixelData) as caught:
        _assemble(fx)
    assert "JPEG 2000" in caught.value.message and S.TRANSFER_SYNTAXES["jpeg2000"] in caught.value.message
    assert "pylibjpeg-openjpeg" in caught.value.hint
    assert caught.value.details["series_uid"] == fx.series_uid


def test_undecodable_pixel_data(tmp_path: Path) -> None:
    fx = S.write_series(tmp_path / "s", shape=SHAPE, spacing=SPACING, transfer_syntax="jpeg2000")
    datasets = fx.datasets()
    broken = next(ds for ds in datasets if ds.SOPInstanceUID == fx.sop_instance_uids[4])
    from pydicom.encaps import encapsulate

    broken.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\0" * 64])
    with pytest.raises(DicomNoPixelData) as caught:
        assemble_series(datasets, fx.dicom_series())
    assert f"{fx.positions_mm[4]:.2f}" in caught.value.message and fx.series_uid in caught.value.message


# --------------------------------------------------------------------------------------------------------
# load_series (through sources.load_datasets) and the generators themselves
# --------------------------------------------------------------------------------------------------------


def test_load_series_from_files_and_zip(tmp_path: Path) -> None:
    fx = S.write_series(tmp_path / "series", shape=SHAPE, spacing=SPACING, orientation="oblique")
    out = load_series(fx.dicom_series())
    np.testing.assert_allclose(out.image.affine, fx.ras_affine, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(out.image.dataobj), fx.expected)

    archive = S.zip_series(tmp_path / "study.zip", [fx], extra_members={"README.txt": b"not DICOM"})
    series = fx.dicom_series()
    zipped = tuple(DicomInstance(f"zip://series/{Path(i.uri).name}::{archive}", i.sop_instance_uid)
                   for i in series.instances)
    from dataclasses import replace

    out = load_series(replace(series, source=str(archive), instances=zipped))
    np.testing.assert_array_equal(np.asarray(out.image.dataobj), fx.expected)


def test_generators(tmp_path: Path) -> None:
    study = S.write_folder_with_extras(tmp_path / "study")
    assert len(study.series) == 3 and len({s.series_uid for s in study.series}) == 3
    assert {s.study_uid for s in study.series} == {study.study_uid}
    sr = pydicom.dcmread(study.sr_path)
    assert sr.Modality == "SR" and "PixelData" not in sr and sr.StudyInstanceUID == study.study_uid
    scout = pydicom.dcmread(study.localizer_path)
    assert "LOCALIZER" in scout.ImageType and scout.StudyInstanceUID == study.study_uid
    for path in study.paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert str(ds.PatientName) == S.PATIENT["PatientName"] and ds.PatientID == S.PATIENT["PatientID"]
        assert ds.file_meta.TransferSyntaxUID and ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        _no_patient_data(str(path.relative_to(tmp_path)))
    # deterministic UIDs: the same seed writes the same UIDs
    again = S.write_folder_with_extras(tmp_path / "again")
    assert [s.series_uid for s in again.series] == [s.series_uid for s in study.series]
    assert again.series[0].sop_instance_uids == study.series[0].sop_instance_uids
    assert S.write_series(tmp_path / "other", shape=SHAPE, seed=1).series_uid != study.series[0].series_uid
    # every written file is a valid Part 10 file with a readable image
    mf = S.write_series(tmp_path / "mf", shape=SHAPE, multiframe=True, modality="MR")
    ds = pydicom.dcmread(mf.paths[0])
    assert ds.SOPClassUID == S.ENHANCED_MR_IMAGE_STORAGE and int(ds.NumberOfFrames) == SHAPE[2]
    assert ds.pixel_array.shape == (SHAPE[2], SHAPE[1], SHAPE[0])


def test_datasets_without_file_meta_and_split_series(tmp_path: Path) -> None:
    """In-memory datasets (no file meta) decode as uncompressed; a split series is named with its stack."""
    from dataclasses import replace

    fx = S.write_series(tmp_path / "s", shape=SHAPE, spacing=SPACING, orientation="sagittal")
    datasets = fx.datasets()
    for ds in datasets:
        del ds.file_meta
    out = assemble_series(datasets, fx.dicom_series())
    np.testing.assert_array_equal(np.asarray(out.image.dataobj), fx.expected)

    bad = S.write_series(tmp_path / "bad", shape=SHAPE, spacing=SPACING, fault="missing_slice")
    with pytest.raises(DicomMissingSlice) as caught:
        assemble_series(bad.datasets(), replace(bad.dicom_series(), split="2"))
    assert f"{bad.series_uid} (stack 2)" in caught.value.message
    assert caught.value.details["series_uid"] == bad.series_uid and caught.value.details["split"] == "2"
