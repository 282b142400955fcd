"""DICOM SEG output (nvseg_ray.dicom.seg): both segmentation types on generated series (axial, oblique, coronal,
multi-frame, and a resampled grid) read back with highdicom to exactly the labels, reference their source, carry
the segment codes and deterministic UIDs, and every BINARY SEG passes dciodvfy with no error."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom", reason='DICOM tests need the dicom extra: pip install "nvseg-ray[dicom]"')
hd = pytest.importorskip("highdicom", reason='DICOM tests need the dicom extra: pip install "nvseg-ray[dicom]"')

from nvseg_ray.dicom import seg as segmod  # noqa: E402
from nvseg_ray.dicom import synthetic  # noqa: E402
from nvseg_ray.dicom.assembly import AssembledSeries, assemble_series  # noqa: E402
from nvseg_ray.labels import LabelCatalog  # noqa: E402
from nvseg_ray.labels.codes import segment_coding  # noqa: E402

# pydicom's size heuristic fires when a J2K frame of a tiny test image happens to be rows * columns / 8 bytes long
pytestmark = pytest.mark.filterwarnings("ignore:The number of bytes of compressed pixel data matches:UserWarning")

DCIODVFY = shutil.which("dciodvfy") or ("/usr/bin/dciodvfy" if Path("/usr/bin/dciodvfy").exists() else None)
PATIENT_NAME = synthetic.PATIENT["PatientName"]
PATIENT_ID = synthetic.PATIENT["PatientID"]

#: liver, spleen, right kidney, left kidney (a left/right pair), aorta, hepatic tumor (type Neoplasm, region Liver)
CLASSES = (1, 3, 5, 14, 6, 26)


# --------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------


def label_map(shape: tuple[int, int, int], classes=CLASSES, seed: int = 0) -> np.ndarray:
    """(X, Y, Z) blocks of the given classes, asymmetric in every axis, with an empty slice and background."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint16)
    x, y, z = shape
    for n, cid in enumerate(classes):
        x0, y0 = rng.integers(0, x - 4), rng.integers(0, y - 4)
        z0 = n % max(z - 3, 1)
        labels[x0:x0 + rng.integers(3, 8), y0:y0 + rng.integers(2, 6), z0:z0 + rng.integers(1, 4)] = cid
    labels[0, 0, 1] = CLASSES[0]  # a lone voxel in a corner
    labels[:, :, z - 1] = 0  # an empty last slice (no frames there)
    return labels


def read_back(raw: bytes, tmp_path: Path, name: str) -> tuple[Any, Any]:
    path = tmp_path / name
    path.write_bytes(raw)
    return path, hd.seg.segread(path)


def labels_from_seg(seg: Any, assembled: Any) -> np.ndarray:
    """The SEG's label map as (X, Y, Z) class ids, on the assembled grid (checked)."""
    volume = seg.get_volume(combine_segments=True, relabel=False)
    mapping = segmod.segment_class_ids(seg)
    class_ids = np.zeros(max(mapping) + 1, np.int64)
    class_ids[list(mapping)] = list(mapping.values())
    # our grid as highdicom sees it: (slice, row, column) = (k, j, i)
    x, y, z = assembled.image.shape[:3]
    grid = hd.VolumeGeometry(affine=np.asarray(assembled.lps_affine)[:, [2, 1, 0, 3]], spatial_shape=(z, y, x),
                             coordinate_system="PATIENT",
                             frame_of_reference_uid=assembled.source_datasets[0].FrameOfReferenceUID)
    # permutes / flips / pads (the SEG omits empty slices) but never resamples: raises unless the grids coincide
    matched = volume.match_geometry(grid)
    return class_ids[matched.array].transpose(2, 1, 0)


def dciodvfy_errors(path: Path) -> tuple[list[str], str]:
    proc = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=120)
    text = proc.stdout + proc.stderr
    return [line for line in text.splitlines() if line.startswith("Error")], text


# --------------------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------------------


#: generated series (nvseg_ray.dicom.synthetic.write_series keyword arguments); frames >= 32 px unless noted
CASES = {
    "axial": dict(orientation="axial"),
    "oblique": dict(orientation="oblique"),
    "coronal": dict(orientation="coronal", shape=(20, 12, 16)),  # frames < 32 px: BINARY stored uncompressed
    "feet-first-sagittal": dict(orientation="sagittal", feet_first=True),
    "multiframe": dict(orientation="axial", multiframe=True),  # frames stored in reverse slice order
}
#: series assembled with --dicom-resample: the mask's grid is not the source's
RESAMPLED = {
    "missing-slice": dict(fault="missing_slice"),
    "gantry-tilt": dict(fault="gantry_tilt"),
}
SHAPE = (40, 36, 10)


def assembled_series(tmp_path: Path, name: str, **kwargs: Any) -> AssembledSeries:
    kwargs.setdefault("shape", SHAPE)
    resample = "fault" in kwargs
    fx = synthetic.write_series(tmp_path / name, seed=len(name), **kwargs)
    return assemble_series(fx.datasets(), fx.dicom_series(), resample=resample)


def build(labels: np.ndarray, assembled: AssembledSeries, seg_type: str, seed: str, **kwargs: Any) -> Any:
    kwargs.setdefault("model_sha256", "ab" * 32)
    return segmod.build_seg(labels, assembled, catalog=LabelCatalog.default(), seg_type=seg_type, seed=seed,
                            algorithm_version="0.1.0", **kwargs)


@pytest.mark.parametrize("seg_type", segmod.SEG_TYPES)
@pytest.mark.parametrize("case", [*CASES, *RESAMPLED])
def test_seg_round_trip(case: str, seg_type: str, tmp_path: Path) -> None:
    assembled = assembled_series(tmp_path, case, **{**CASES, **RESAMPLED}[case])
    assert assembled.resampled == (case in RESAMPLED)
    if case == "multiframe":
        assert assembled.frame_numbers == sorted(assembled.frame_numbers, reverse=True)
    catalog = LabelCatalog.default()
    labels = label_map(assembled.image.shape[:3])
    ds = build(labels, assembled, seg_type, f"key-{case}")
    path, seg = read_back(segmod.encode_seg(ds), tmp_path, f"{case}-{seg_type}.dcm")

    # exact labels on the same grid
    np.testing.assert_array_equal(labels_from_seg(seg, assembled), labels)
    # SOP class / transfer syntax
    expected_class = "1.2.840.10008.5.1.4.1.1.66.4" if seg_type == "binary" else "1.2.840.10008.5.1.4.1.1.66.7"
    assert seg.SOPClassUID == expected_class
    expected_ts = {"labelmap": segmod.LABELMAP_TRANSFER_SYNTAX, "binary": segmod.BINARY_TRANSFER_SYNTAX}[seg_type]
    if seg_type == "binary" and case == "coronal":
        expected_ts = segmod.EXPLICIT_VR_LITTLE_ENDIAN
    assert seg.file_meta.TransferSyntaxUID == expected_ts
    # source references: the series and each frame's source instance / frame; frame of reference; patient/study
    src = assembled.source_datasets
    ref_series = seg.ReferencedSeriesSequence
    assert [s.SeriesInstanceUID for s in ref_series] == [assembled.series.series_instance_uid]
    assert ({i.ReferencedSOPInstanceUID for i in ref_series[0].ReferencedInstanceSequence}
            == {d.SOPInstanceUID for d in src})
    assert seg.FrameOfReferenceUID == src[0].FrameOfReferenceUID
    assert seg.StudyInstanceUID == src[0].StudyInstanceUID
    assert seg.PatientName == PATIENT_NAME and seg.PatientID == PATIENT_ID
    _check_frame_references(seg, assembled)
    # segments: one per class present, catalog names, codes (+ laterality), colour, algorithm
    present = [int(c) for c in np.unique(labels) if c]
    assert {5, 14} <= set(present)  # a left/right pair
    mapping = segmod.segment_class_ids(seg)
    assert mapping == {n: cid for n, cid in enumerate(present, start=1)}
    by_number = {int(item.SegmentNumber): item for item in seg.SegmentSequence}
    assert sorted(by_number) == ([0] if seg_type == "labelmap" else []) + list(mapping)  # 0: LABELMAP background
    for number, cid in mapping.items():
        item = by_number[number]
        coding = segment_coding(catalog, cid)
        assert item.SegmentLabel == catalog.name(cid)
        cat, typ = item.SegmentedPropertyCategoryCodeSequence[0], item.SegmentedPropertyTypeCodeSequence[0]
        assert (cat.CodeValue, cat.CodingSchemeDesignator, cat.CodeMeaning) == (
            coding.category.value, coding.category.scheme, coding.category.meaning)
        assert (typ.CodeValue, typ.CodingSchemeDesignator, typ.CodeMeaning) == (
            coding.type.value, coding.type.scheme, coding.type.meaning)
        mods = typ.get("SegmentedPropertyTypeModifierCodeSequence", [])
        if coding.modifier is None:
            assert not mods
        else:
            assert [(m.CodeValue, m.CodingSchemeDesignator, m.CodeMeaning) for m in mods] == [
                (coding.modifier.value, coding.modifier.scheme, coding.modifier.meaning)]
        regions = item.get("AnatomicRegionSequence", [])
        if coding.region is None:
            assert not regions
        else:
            assert [(r.CodeValue, r.CodingSchemeDesignator, r.CodeMeaning) for r in regions] == [
                (coding.region.value, coding.region.scheme, coding.region.meaning)]
        rgb = hd.color.CIELabColor.from_dicom_value(item.RecommendedDisplayCIELabValue).to_rgb()
        assert np.abs(np.array(rgb) - np.array(coding.color)).max() <= 2
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        algo = item.SegmentationAlgorithmIdentificationSequence[0]
        assert algo.AlgorithmName == segmod.ALGORITHM_NAME and algo.AlgorithmVersion == "0.1.0"
        assert algo.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"  # CID 7162 Artificial Intelligence
        assert algo.AlgorithmParameters == f"model_sha256={'ab' * 32}"
    assert segment_coding(catalog, 5).modifier != segment_coding(catalog, 14).modifier  # both sides written
    assert segment_coding(catalog, 26).region is not None  # an anatomic region written
    assert seg.Manufacturer == "nvseg-ray" and seg.SeriesDescription == segmod.SERIES_DESCRIPTION
    # deterministic UIDs from the seed
    assert (seg.SeriesInstanceUID, seg.SOPInstanceUID) == segmod.series_uids(f"key-{case}")
    again = build(labels, assembled, seg_type, f"key-{case}")
    assert (again.SeriesInstanceUID, again.SOPInstanceUID) == (seg.SeriesInstanceUID, seg.SOPInstanceUID)
    # the validator, on BINARY (Debian's 2022 dciodvfy does not know the Label Map SOP class)
    if seg_type == "binary":
        if DCIODVFY is None:
            pytest.skip("dciodvfy (Debian dicom3tools) is not installed: the SEG was not validated")
        errors, text = dciodvfy_errors(path)
        assert not errors, text


def _source_planes(assembled: AssembledSeries) -> list[tuple[str, int | None, np.ndarray]]:
    """(SOP Instance UID, frame number or None, position) of every source plane."""
    out = []
    for ds in assembled.source_datasets:
        if "PerFrameFunctionalGroupsSequence" in ds:
            for number, frame in enumerate(ds.PerFrameFunctionalGroupsSequence, start=1):
                position = frame.PlanePositionSequence[0].ImagePositionPatient
                out.append((ds.SOPInstanceUID, number, np.array(position, float)))
        else:
            out.append((ds.SOPInstanceUID, None, np.array(ds.ImagePositionPatient, float)))
    return out


def _check_frame_references(seg: Any, assembled: AssembledSeries) -> None:
    """Each frame names the source image (and frame) in its plane -- at its position unless resampled -- or, for
    an interpolated frame of a resampled grid, the source planes on either side."""
    planes = _source_planes(assembled)
    iop = np.array(seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient)
    normal = np.cross(iop[:3], iop[3:])
    for frame in seg.PerFrameFunctionalGroupsSequence:
        position = np.array(frame.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
        refs = frame.DerivationImageSequence[0].SourceImageSequence
        assert len(refs) >= 1
        found = []
        for ref in refs:
            number = int(ref.ReferencedFrameNumber) if "ReferencedFrameNumber" in ref else None
            match = [p for uid, n, p in planes if uid == ref.ReferencedSOPInstanceUID and n == number]
            assert len(match) == 1, "a frame references an image that is not a source plane"
            found.append((match[0], ref.SpatialLocationsPreserved))
        if not assembled.resampled:
            assert len(found) == 1 and found[0][1] == "YES"
            np.testing.assert_allclose(found[0][0], position, atol=1e-3)
        elif len(found) == 1:  # in a source plane (same depth along the normal)
            assert abs((found[0][0] - position) @ normal) < 1e-3
        else:  # interpolated between two source planes
            depths = sorted(float((p - position) @ normal) for p, _ in found)
            assert len(found) == 2 and depths[0] < 0 < depths[1]
            assert {kept for _, kept in found} == {"NO"}


@pytest.mark.parametrize("seg_type", segmod.SEG_TYPES)
def test_more_than_255_segments(seg_type: str, tmp_path: Path) -> None:
    """260 classes (16-bit segment numbers; generic codings among them), each on one slice, round-trip exactly."""
    assembled = assembled_series(tmp_path, "many")
    ids = sorted(LabelCatalog.default().classes)[-260:]
    x, y, z = assembled.image.shape[:3]
    labels = np.zeros((x, y, z), np.int32)
    for n, cid in enumerate(ids):  # 26 classes per slice, each filling one row j of slice k
        k, cell = divmod(n, 26)
        labels[:, cell, k] = cid
    assert len(np.unique(labels)) == 261
    ds = build(labels, assembled, seg_type, "many")
    _, seg = read_back(segmod.encode_seg(ds), tmp_path, "many.dcm")
    np.testing.assert_array_equal(labels_from_seg(seg, assembled), labels)


def test_series_uids() -> None:
    series, instance = segmod.series_uids("row-1")
    assert (series, instance) == segmod.series_uids("row-1")
    assert series != instance
    assert set(segmod.series_uids("row-2")).isdisjoint({series, instance})
    for uid in (series, instance):
        assert uid.startswith("2.25.") and len(uid) <= 64 and uid[5:].isdigit() and not uid[5:].startswith("0")
        assert pydicom.uid.UID(uid).is_valid


def test_refusals(tmp_path: Path) -> None:
    from nvseg_ray.errors import ConfigError, DicomError

    assembled = assembled_series(tmp_path, "refuse")
    shape = assembled.image.shape[:3]
    with pytest.raises(DicomError) as err:
        build(np.zeros(shape, np.uint8), assembled, "binary", "x")
    assert err.value.code == "empty_segmentation"
    with pytest.raises(DicomError) as err:
        build(np.ones(shape[::-1], np.uint8), assembled, "binary", "x")
    assert err.value.code == "dicom_seg_grid"
    assert PATIENT_NAME not in str(err.value) and PATIENT_ID not in str(err.value.to_dict())
    with pytest.raises(DicomError):
        build(np.ones(shape, np.float32), assembled, "binary", "x")
    with pytest.raises(ConfigError):
        build(np.ones(shape, np.uint8), assembled, "rtstruct", "x")


def test_sparse_source_header_and_no_model_hash(tmp_path: Path) -> None:
    """Type-2 patient/study attributes absent from the source (real headers lack some) do not stop the SEG, the
    caller's datasets are left as they were, and without a model sha256 no algorithm parameter is written."""
    fx = synthetic.write_series(tmp_path / "sparse", shape=SHAPE)
    datasets = fx.datasets()
    for ds in datasets:
        for name in ("AccessionNumber", "ReferringPhysicianName", "PatientBirthDate", "StudyID"):
            if name in ds:
                delattr(ds, name)
    assembled = assemble_series(datasets, fx.dicom_series())
    ds = build(label_map(assembled.image.shape[:3]), assembled, "binary", "sparse", model_sha256=None)
    assert "AccessionNumber" not in assembled.source_datasets[0]
    path, seg = read_back(segmod.encode_seg(ds), tmp_path, "sparse.dcm")
    assert seg.AccessionNumber == "" and seg.PatientID == PATIENT_ID
    assert "AlgorithmParameters" not in seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    if DCIODVFY is not None:
        errors, text = dciodvfy_errors(path)
        assert not errors, text
