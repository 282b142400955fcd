"""Synthetic DICOM series, written as real instance files, for the tests and ``benchmarks/bench_dicom.py``.

:func:`write_series` turns a phantom of :mod:`nvseg_ray.synthetic` (an (X, Y, Z) CT in HU) into one series of
real Part 10 files (pydicom 3 datasets with file meta): classic CT / MR Image Storage, one instance per slice, or
one Enhanced CT / MR Image Storage instance with per-frame functional groups (``multiframe=True``). It returns a
:class:`SeriesFixture` that says what the series must convert to: the expected RAS affine and the expected
(X, Y, Z) float32 array (values after Rescale Slope / Intercept), i.e. the NIfTI a correct reader produces.
``fault=...`` writes one of the damaged series a reader must refuse (or resample, on request).

:func:`write_folder_with_extras` writes a study folder with three image series, a Structured Report and a
localizer; :func:`zip_series` packs folders / files into a zip archive.

Classic CT / MR instances, the SR and the localizer pass ``dciodvfy`` without errors; the enhanced objects carry
what readers need (functional groups with geometry, pixel value transformation, frame content, dimensions) but
not every acquisition macro of the Enhanced CT / MR IODs.

Every instance carries fake patient identifiers (:data:`PATIENT`) so tests can assert they never leak into what
nvseg-ray writes or prints. File names never contain patient data. All UIDs are derived from ``seed`` (same
seed, same UIDs). Instances are written slice by slice, so a 512 x 512 x 300 series needs little more memory
than its (X, Y, Z) int16 source volume.

Geometry (voxel i = column, j = row, k = slice; world = LPS mm, as in DICOM):

* slice ``k`` of the volume is the image ``volume[:, :, k].T`` (Rows = Y, Columns = X);
* ``lps_affine[:3, 0] = row_cosine * spacing[0]``, ``[:3, 1] = col_cosine * spacing[1]``,
  ``[:3, 2] = normal * spacing[2]`` with ``normal = cross(row_cosine, col_cosine)``, ``[:3, 3]`` = position of
  slice 0; ``ras_affine = diag(-1, -1, 1, 1) @ lps_affine``; slice k is the k-th along the normal.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: Fake patient identifiers written into every generated instance (tests assert they never leak).
PATIENT: dict[str, str] = {"PatientName": "DOE^JANE", "PatientID": "PID-0001", "PatientBirthDate": "19700101"}

ORIENTATIONS = ("axial", "coronal", "sagittal", "oblique")
FAULTS = ("missing_slice", "uneven_spacing", "gantry_tilt", "mixed_orientation", "mixed_matrix",
          "duplicate_position", "single_slice", "no_pixel_data")
#: ``transfer_syntax`` name -> Transfer Syntax UID.
TRANSFER_SYNTAXES: dict[str, str] = {
    "explicit": "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "implicit": "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "deflated": "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "jpeg2000": "1.2.840.10008.1.2.4.90",  # JPEG 2000 Image Compression (Lossless Only)
    "jpegls": "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "rle": "1.2.840.10008.1.2.5",  # RLE Lossless
}
COMPRESSED = ("jpeg2000", "jpegls", "rle")

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"
BASIC_TEXT_SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.11"

#: Gantry tilt of ``fault="gantry_tilt"``, degrees.
TILT_DEG = 15.0
#: Shapes above this many voxels use :func:`nvseg_ray.synthetic.torso_ct` (slab-built) instead of body_phantom.
_LARGE = 4_000_000
#: Centre of the generated volumes in LPS mm (off the origin, so translations are checked).
_CENTRE = np.array([12.5, -30.0, 85.0])


@dataclass
class SeriesFixture:
    """What :func:`write_series` wrote and what a reader must make of it.

    Attributes:
        folder: the folder the instances were written to.
        paths: the instance files, in slice order k (multi-frame: the one file). For ``fault=...`` series: the
            files as written (a missing slice is absent, a duplicate appears twice in position order).
        study_uid / series_uid / frame_of_reference_uid: the UIDs in the headers.
        sop_instance_uids: SOP Instance UIDs, same order as ``paths``.
        sop_class_uid / modality / transfer_syntax: as written (transfer syntax as a UID).
        lps_affine / ras_affine: (4, 4) float64, voxel (i=col, j=row, k=slice) -> LPS / RAS mm, of the regular
            grid the series was generated on (for a fault: the grid before the damage).
        stored: (X, Y, Z) stored pixel values of that grid (uint16 or int16), before Rescale.
        rescale: (slope, intercept), or None when the instances carry no Rescale tags (MR).
        positions_mm: slice positions along the normal (mm, LPS) of the instances written, in ``paths`` order.
        frame_numbers: multi-frame: 1-based frame number of slice k; None for single-frame series.
        fault: the fault written, or None.
        fault_slices: indices k (of the regular grid) the fault touched (dropped, moved, duplicated, ...).
    """

    folder: Path
    paths: list[Path]
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    sop_instance_uids: list[str]
    sop_class_uid: str
    modality: str
    transfer_syntax: str
    lps_affine: np.ndarray
    ras_affine: np.ndarray
    stored: np.ndarray
    rescale: tuple[float, float] | None
    positions_mm: list[float]
    frame_numbers: list[int] | None = None
    fault: str | None = None
    fault_slices: list[int] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.stored.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size (column, row, slice) in mm of the generated grid."""
        return tuple(float(np.linalg.norm(self.lps_affine[:3, a])) for a in range(3))  # type: ignore[return-value]

    @property
    def expected(self) -> np.ndarray:
        """The (X, Y, Z) float32 volume the series converts to: ``stored * slope + intercept`` (HU for CT)."""
        out = self.stored.astype(np.float32)
        if self.rescale is not None:
            slope, intercept = self.rescale
            out *= np.float32(slope)
            out += np.float32(intercept)
        return out

    def datasets(self, **dcmread_kwargs: Any) -> list[Any]:
        """``pydicom.dcmread`` of every file, in :meth:`dicom_series` instance order (sorted by SOP UID)."""
        import pydicom

        order = sorted(range(len(self.paths)), key=lambda n: self.sop_instance_uids[n])
        return [pydicom.dcmread(self.paths[n], **dcmread_kwargs) for n in order]

    def dicom_series(self, source: str | None = None) -> Any:
        """The :class:`~nvseg_ray.dicom.series.DicomSeries` discovery would build for this series."""
        from .series import DicomInstance, DicomSeries

        n_frames = self.stored.shape[2] if self.frame_numbers is not None else 1
        instances = tuple(sorted((DicomInstance(str(p), uid, n_frames)
                                  for p, uid in zip(self.paths, self.sop_instance_uids)),
                                 key=lambda i: i.sop_instance_uid))
        return DicomSeries(source=str(source or self.folder), series_instance_uid=self.series_uid,
                           study_instance_uid=self.study_uid, modality=self.modality,
                           series_description=f"synthetic {self.modality}",
                           frame_of_reference_uid=self.frame_of_reference_uid, sop_class_uid=self.sop_class_uid,
                           instances=instances)


@dataclass
class StudyFixture:
    """What :func:`write_folder_with_extras` wrote: image series, and the non-image / localizer objects."""

    folder: Path
    study_uid: str
    series: list[SeriesFixture]
    sr_path: Path
    sr_series_uid: str
    localizer_path: Path
    localizer_series_uid: str

    @property
    def paths(self) -> list[Path]:
        return [p for s in self.series for p in s.paths] + [self.sr_path, self.localizer_path]


def uid(seed: Any, *parts: Any) -> str:
    """A deterministic ``2.25.<int>`` UID from ``seed`` and ``parts``."""
    text = "\0".join(["nvseg-ray-synthetic", str(seed), *map(str, parts)])
    return f"2.25.{int.from_bytes(hashlib.sha256(text.encode()).digest()[:16], 'big')}"


def _rotation(orientation: str, feet_first: bool) -> tuple[np.ndarray, np.ndarray]:
    """(row_cosine, col_cosine) in LPS for a named orientation."""
    if orientation == "axial":
        row, col = np.array([1.0, 0, 0]), np.array([0, 1.0, 0])
        if feet_first:
            row = -row  # a feet-first supine scan: image x runs patient right; normal points to the feet
    elif orientation == "coronal":
        row, col = np.array([1.0, 0, 0]), np.array([0, 0, -1.0])
    elif orientation == "sagittal":
        row, col = np.array([0, 1.0, 0]), np.array([0, 0, -1.0])
    elif orientation == "oblique":
        a, b, c = np.deg2rad([20.0, -12.0, 30.0])
        rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
        ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
        rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
        rot = rz @ ry @ rx
        row, col = rot[:, 0], rot[:, 1]
    else:
        raise ValueError(f"orientation must be one of {ORIENTATIONS}, not {orientation!r}")
    if feet_first and orientation != "axial":
        row = -row
    return row, col


def _phantom(shape: tuple[int, int, int], spacing: Sequence[float], seed: int) -> np.ndarray:
    from ..synthetic import body_phantom, torso_ct

    if int(np.prod(shape)) > _LARGE:
        return torso_ct(shape, spacing, seed)
    return body_phantom(shape, seed)


def _stored(volume: np.ndarray, rescale: tuple[float, float] | None) -> np.ndarray:
    """Stored values for ``volume`` (HU) under ``rescale``: uint16 when all >= 0, else int16 (slab by slab, so a
    benchmark-sized volume needs one extra 16-bit copy only)."""
    volume = np.asarray(volume)

    def convert(block: np.ndarray) -> np.ndarray:
        if rescale is None:
            return block
        slope, intercept = rescale
        if slope == 1.0 and float(intercept).is_integer():
            return block.astype(np.int32) - int(intercept)
        return np.rint((block.astype(np.float32) - np.float32(intercept)) / np.float32(slope))

    slab = 16
    blocks = range(0, volume.shape[2], slab)
    lo, hi = sorted(float(v) for v in convert(np.array([volume.min(), volume.max()])))  # monotonic in the value
    dtype = np.uint16 if lo >= 0 and hi <= 65535 else np.int16
    info = np.iinfo(dtype)
    out = np.empty(volume.shape, dtype=dtype)
    for z in blocks:
        out[:, :, z : z + slab] = np.clip(convert(volume[:, :, z : z + slab]), info.min, info.max)
    return out


def _base_dataset(*, modality: str, sop_class_uid: str, sop_uid: str, study_uid: str, series_uid: str,
                  for_uid: str, series_number: int, description: str, patient_position: str = "HFS") -> Any:
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = for_uid
    for key, value in PATIENT.items():
        setattr(ds, key, value)
    ds.PatientSex = "F"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240102"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "101500"
    ds.StudyID = "1"
    ds.AccessionNumber = "ACC-0001"
    ds.ReferringPhysicianName = ""
    ds.Modality = modality
    ds.Manufacturer = "nvseg-ray synthetic"
    ds.ManufacturerModelName = "phantom"
    ds.DeviceSerialNumber = "0"
    ds.SoftwareVersions = "1"
    ds.BodyPartExamined = "ABDOMEN"
    ds.SeriesNumber = series_number
    ds.SeriesDescription = description
    ds.PositionReferenceIndicator = ""
    ds.PatientPosition = patient_position
    return ds


def _pixel_module(ds: Any, stored: np.ndarray) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if stored.dtype == np.int16 else 0


def _save(ds: Any, path: Path, ts_name: str, pixels: np.ndarray | None) -> None:
    """Attach ``pixels`` ((rows, cols) or (frames, rows, cols)) in transfer syntax ``ts_name`` and write."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID

    ts = TRANSFER_SYNTAXES[ts_name]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.TransferSyntaxUID = ts
    ds.file_meta = meta
    if pixels is not None:
        if ts_name in COMPRESSED:
            ds.compress(ts, np.ascontiguousarray(pixels), generate_instance_uid=False)
        else:
            ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.save_as(path, enforce_file_format=True)


def write_series(folder: str | Path, volume: np.ndarray | None = None, *, shape: Sequence[int] = (48, 40, 24),
                 spacing: Sequence[float] = (0.8, 0.8, 2.0), orientation: str = "axial", feet_first: bool = False,
                 modality: str = "CT", multiframe: bool = False, transfer_syntax: str = "explicit",
                 fault: str | None = None, study_uid: str | None = None, series_uid: str | None = None,
                 seed: int = 0, rescale: tuple[float, float] | None | str = "default",
                 series_number: int = 1) -> SeriesFixture:
    """Write one DICOM image series into ``folder`` (created) and say what it must convert to.

    Args:
        folder: where the instance files go (``0001.dcm`` ... in slice order; ``enhanced.dcm`` when multi-frame).
        volume: (X, Y, Z) values (HU for CT); default: a phantom of ``shape`` (``body_phantom``, or the
            slab-built ``torso_ct`` above 4 M voxels) drawn with ``seed``.
        shape: (X, Y, Z) = (Columns, Rows, slices) when ``volume`` is None.
        spacing: (column, row, slice) spacing in mm: PixelSpacing = [spacing[1], spacing[0]].
        orientation: "axial", "coronal", "sagittal" or "oblique" (a rotation about all three axes).
        feet_first: flip the row direction (slice normal reversed): slices run head -> feet along k.
        modality: "CT" or "MR".
        multiframe: one Enhanced CT / MR Image Storage instance (per-frame functional groups; frames written in
            reverse slice order, so ``frame_numbers`` = [n, ..., 1]) instead of one instance per slice.
        transfer_syntax: a key of :data:`TRANSFER_SYNTAXES` ("explicit", "implicit", "deflated", "jpeg2000",
            "jpegls", "rle"); compressed ones are lossless. JPEG 2000 needs X, Y >= 32.
        fault: None or one of :data:`FAULTS` (single-frame series only).
        study_uid / series_uid: default derived from ``seed``.
        rescale: (slope, intercept); "default" = (1, -1024) for CT and no Rescale tags for MR; None = no tags.
        series_number: SeriesNumber.
    """
    if fault is not None and fault not in FAULTS:
        raise ValueError(f"fault must be one of {FAULTS}, not {fault!r}")
    if fault is not None and multiframe:
        raise ValueError("faults are written for single-frame series only")
    if modality not in ("CT", "MR"):
        raise ValueError("modality must be CT or MR")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spacing = tuple(float(s) for s in spacing)
    if volume is None:
        volume = _phantom(tuple(int(n) for n in shape), spacing, seed)
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError("volume must be (X, Y, Z)")
    nx, ny, nz = volume.shape
    if transfer_syntax == "jpeg2000" and min(nx, ny) < 32:
        raise ValueError("JPEG 2000 needs images of at least 32 x 32 (openjpeg's default 6 resolution levels)")
    if rescale == "default":
        rescale = (1.0, -1024.0) if modality == "CT" else None
    if rescale is None and modality == "MR" and volume.min() < 0:
        volume = np.clip(volume.astype(np.int32) + 1000, 0, None)  # MR-like: non-negative signal
    stored = _stored(volume, rescale)  # type: ignore[arg-type]

    study_uid = study_uid or uid(seed, "study")
    series_uid = series_uid or uid(seed, "series", orientation, modality, multiframe, fault)
    for_uid = uid(seed, "for", study_uid)
    row, col = _rotation(orientation, feet_first)
    normal = np.cross(row, col)
    step = normal * spacing[2]
    lps = np.eye(4)
    lps[:3, 0] = row * spacing[0]
    lps[:3, 1] = col * spacing[1]
    lps[:3, 2] = step
    lps[:3, 3] = _CENTRE - lps[:3, :3] @ (np.array([nx, ny, nz]) - 1) / 2
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    if multiframe:
        sop_class = ENHANCED_CT_IMAGE_STORAGE if modality == "CT" else ENHANCED_MR_IMAGE_STORAGE
    else:
        sop_class = CT_IMAGE_STORAGE if modality == "CT" else MR_IMAGE_STORAGE
    fixture = SeriesFixture(folder=folder, paths=[], study_uid=study_uid, series_uid=series_uid,
                            frame_of_reference_uid=for_uid, sop_instance_uids=[], sop_class_uid=sop_class,
                            modality=modality, transfer_syntax=TRANSFER_SYNTAXES[transfer_syntax],
                            lps_affine=lps, ras_affine=ras, stored=stored,
                            rescale=None if rescale is None else (float(rescale[0]), float(rescale[1])),
                            positions_mm=[], fault=fault)
    common = dict(modality=modality, study_uid=study_uid, series_uid=series_uid, for_uid=for_uid,
                  series_number=series_number, description=f"synthetic {modality} {orientation}",
                  patient_position="FFS" if feet_first else "HFS")
    if multiframe:
        _write_enhanced(fixture, common, row, col, spacing, transfer_syntax, seed)
    else:
        _write_classic(fixture, common, row, col, spacing, transfer_syntax, seed)
    return fixture


def _slice_plan(fault: str | None, nz: int, lps: np.ndarray, normal: np.ndarray,
                spacing: tuple[float, float, float]) -> tuple[list[tuple[int, np.ndarray]], list[int]]:
    """[(k of the source grid, ImagePositionPatient)] of the instances to write, and the slices the fault hit."""
    origin, step = lps[:3, 3], lps[:3, 2]
    plan = [(k, origin + k * step) for k in range(nz)]
    hit: list[int] = []
    mid = nz // 2
    if fault == "missing_slice":
        hit = [mid]
        plan = [p for p in plan if p[0] != mid]
    elif fault == "uneven_spacing":
        # steps of 1 x spacing up to the middle, then 1.5 x: 2.0 mm then 3.0 mm for a 2 mm series
        hit = list(range(mid + 1, nz))
        plan = [(k, origin + (k if k <= mid else mid + 1.5 * (k - mid)) * step) for k in range(nz)]
    elif fault == "gantry_tilt":
        hit = list(range(1, nz))
        table = np.array([0.0, 0.0, 1.0]) * spacing[2] / np.cos(np.deg2rad(TILT_DEG))
        if normal[2] < 0:
            table = -table
        plan = [(k, origin + k * table) for k in range(nz)]
    elif fault == "duplicate_position":
        hit = [mid]
        plan = plan[: mid + 1] + [(mid, origin + mid * step)] + plan[mid + 1 :]
    elif fault == "single_slice":
        hit = [0]
        plan = plan[:1]
    elif fault in ("mixed_orientation", "mixed_matrix", "no_pixel_data"):
        hit = [nz // 3]
    return plan, hit


def _write_classic(fx: SeriesFixture, common: dict[str, Any], row: np.ndarray, col: np.ndarray,
                   spacing: tuple[float, float, float], ts_name: str, seed: int) -> None:
    nx, ny, nz = fx.stored.shape
    normal = np.cross(row, col)
    iop = row, col
    plan, fx.fault_slices = _slice_plan(fx.fault, nz, fx.lps_affine, normal, spacing)
    if fx.fault == "gantry_tilt":
        t = np.deg2rad(TILT_DEG)  # the image plane rotated about the row (left-right) axis
        iop = row, np.cos(t) * col + np.sin(t) * normal
        normal = np.cross(*iop)
    for n, (k, position) in enumerate(plan):
        sop_uid = uid(seed, "sop", fx.series_uid, n)
        ds = _base_dataset(sop_class_uid=fx.sop_class_uid, sop_uid=sop_uid, **common)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL" if fx.modality == "CT" else "OTHER"]
        ds.InstanceNumber = n + 1
        ds.AcquisitionNumber = 1
        row_k, col_k = iop
        pixels = fx.stored[:, :, k].T
        if fx.fault == "mixed_orientation" and k in fx.fault_slices:
            a = np.deg2rad(10.0)
            rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
            row_k, col_k = rz @ row_k, rz @ col_k
        if fx.fault == "mixed_matrix" and k in fx.fault_slices:
            pixels = pixels[:-4, :-4]
        ds.ImageOrientationPatient = [round(float(v), 8) for v in (*row_k, *col_k)]
        ds.ImagePositionPatient = [round(float(v), 6) for v in position]
        ds.SliceLocation = round(float(np.dot(position, normal)), 6)
        ds.PixelSpacing = [spacing[1], spacing[0]]
        ds.SliceThickness = spacing[2]
        ds.Rows, ds.Columns = pixels.shape
        _pixel_module(ds, fx.stored)
        if fx.rescale is not None:
            ds.RescaleSlope, ds.RescaleIntercept = fx.rescale
            ds.RescaleType = "HU"
        if fx.modality == "CT":
            ds.KVP = 120
        else:
            ds.MagneticFieldStrength = 1.5
            ds.ScanningSequence = "GR"
            ds.SequenceVariant = "NONE"
            ds.ScanOptions = ""
            ds.MRAcquisitionType = "3D"
            ds.EchoTime, ds.RepetitionTime = 3.0, 8.0
            ds.EchoTrainLength = 1
        ds.WindowCenter, ds.WindowWidth = 40, 400
        path = fx.folder / f"{n + 1:04d}.dcm"
        no_pixels = fx.fault == "no_pixel_data" and k in fx.fault_slices
        _save(ds, path, ts_name, None if no_pixels else pixels)
        fx.paths.append(path)
        fx.sop_instance_uids.append(sop_uid)
        fx.positions_mm.append(float(np.dot(position, normal)))


def _write_enhanced(fx: SeriesFixture, common: dict[str, Any], row: np.ndarray, col: np.ndarray,
                    spacing: tuple[float, float, float], ts_name: str, seed: int) -> None:
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DicomSequence

    nx, ny, nz = fx.stored.shape
    normal = np.cross(row, col)
    sop_uid = uid(seed, "sop", fx.series_uid, "enhanced")
    ds = _base_dataset(sop_class_uid=fx.sop_class_uid, sop_uid=sop_uid, **common)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.InstanceNumber = 1
    ds.ContentQualification = "PRODUCT"
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.AcquisitionDateTime = "20240102101500"
    ds.BurnedInAnnotation = "NO"
    ds.PresentationLUTShape = "IDENTITY"
    ds.LossyImageCompression = "00"
    ds.AcquisitionContextSequence = DicomSequence([])
    ds.Rows, ds.Columns = ny, nx
    ds.NumberOfFrames = nz
    _pixel_module(ds, fx.stored)
    if fx.modality == "MR":
        ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]

    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = [spacing[1], spacing[0]]
    measures.SliceThickness = spacing[2]
    measures.SpacingBetweenSlices = spacing[2]
    shared.PixelMeasuresSequence = DicomSequence([measures])
    plane = Dataset()
    plane.ImageOrientationPatient = [round(float(v), 8) for v in (*row, *col)]
    shared.PlaneOrientationSequence = DicomSequence([plane])
    if fx.rescale is not None:
        pvt = Dataset()
        pvt.RescaleSlope, pvt.RescaleIntercept = fx.rescale
        pvt.RescaleType = "HU" if fx.modality == "CT" else "US"
        shared.PixelValueTransformationSequence = DicomSequence([pvt])
    frame_type = Dataset()
    frame_type.FrameType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    frame_type.PixelPresentation = "MONOCHROME"
    frame_type.VolumetricProperties = "VOLUME"
    frame_type.VolumeBasedCalculationTechnique = "NONE"
    if fx.modality == "CT":
        shared.CTImageFrameTypeSequence = DicomSequence([frame_type])
    else:
        shared.MRImageFrameTypeSequence = DicomSequence([frame_type])
    anatomy = Dataset()
    anatomy.FrameLaterality = "U"
    region = Dataset()
    region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = "818981001", "SCT", "Abdomen"
    anatomy.AnatomicRegionSequence = DicomSequence([region])
    shared.FrameAnatomySequence = DicomSequence([anatomy])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])

    dim_uid = uid(seed, "dimension", fx.series_uid)
    dims = []
    for pointer, group in ((0x00209057, 0x00209111), (0x00200032, 0x00209113)):  # in-stack position, IPP
        item = Dataset()
        item.DimensionOrganizationUID = dim_uid
        item.DimensionIndexPointer = pointer
        item.FunctionalGroupPointer = group
        dims.append(item)
    org = Dataset()
    org.DimensionOrganizationUID = dim_uid
    ds.DimensionOrganizationSequence = DicomSequence([org])
    ds.DimensionIndexSequence = DicomSequence(dims)

    frames = []
    order = list(range(nz))[::-1]  # frame f holds slice order[f]
    origin, step = fx.lps_affine[:3, 3], fx.lps_affine[:3, 2]
    for f, k in enumerate(order):
        item = Dataset()
        pos = Dataset()
        pos.ImagePositionPatient = [round(float(v), 6) for v in origin + k * step]
        item.PlanePositionSequence = DicomSequence([pos])
        content = Dataset()
        content.FrameAcquisitionDateTime = content.FrameReferenceDateTime = "20240102101500"
        content.FrameAcquisitionDuration = 100.0
        content.StackID = "1"
        content.InStackPositionNumber = k + 1
        content.DimensionIndexValues = [k + 1, k + 1]
        item.FrameContentSequence = DicomSequence([content])
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)
    fx.frame_numbers = [nz - k for k in range(nz)]  # slice k lives in frame nz - k (1-based)
    pixels = np.stack([fx.stored[:, :, k].T for k in order])
    path = fx.folder / "enhanced.dcm"
    _save(ds, path, ts_name, pixels)
    fx.paths.append(path)
    fx.sop_instance_uids.append(sop_uid)
    fx.positions_mm = [float(np.dot(origin + k * step, normal)) for k in range(nz)]


def write_localizer(folder: str | Path, *, study_uid: str, seed: int = 0,
                    shape: Sequence[int] = (48, 40)) -> tuple[Path, str]:
    """One CT scout (ImageType ORIGINAL\\PRIMARY\\LOCALIZER, a coronal projection). Returns (path, series UID)."""
    from ..synthetic import body_phantom

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = uid(seed, "localizer", study_uid)
    sop_uid = uid(seed, "localizer-sop", study_uid)
    ds = _base_dataset(modality="CT", sop_class_uid=CT_IMAGE_STORAGE, sop_uid=sop_uid, study_uid=study_uid,
                       series_uid=series_uid, for_uid=uid(seed, "for", study_uid), series_number=99,
                       description="scout")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.InstanceNumber = 1
    ds.AcquisitionNumber = 1
    ds.KVP = 120
    proj = body_phantom((int(shape[0]), 8, int(shape[1])), seed).astype(np.int32).mean(axis=1)  # (X, Z)
    stored = np.clip(proj + 1024, 0, 4095).astype(np.uint16)[:, ::-1].T  # rows = -Z (head at top)
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    ds.ImagePositionPatient = [-20.0, 0.0, 100.0]
    ds.PixelSpacing = [1.0, 1.0]
    ds.SliceThickness = 1.0
    ds.Rows, ds.Columns = stored.shape
    _pixel_module(ds, stored)
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    path = folder / "scout.dcm"
    _save(ds, path, "explicit", stored)
    return path, series_uid


def write_sr(folder: str | Path, *, study_uid: str, seed: int = 0) -> tuple[Path, str]:
    """A minimal Basic Text SR (no pixel data). Returns (path, series UID)."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DicomSequence

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = uid(seed, "sr", study_uid)
    sop_uid = uid(seed, "sr-sop", study_uid)
    ds = _base_dataset(modality="SR", sop_class_uid=BASIC_TEXT_SR_STORAGE, sop_uid=sop_uid, study_uid=study_uid,
                       series_uid=series_uid, for_uid=uid(seed, "for", study_uid), series_number=98,
                       description="report")
    for keyword in ("FrameOfReferenceUID", "BodyPartExamined", "PatientPosition", "PositionReferenceIndicator"):
        delattr(ds, keyword)
    ds.PerformedProcedureCodeSequence = DicomSequence([])
    ds.ReferencedPerformedProcedureStepSequence = DicomSequence([])
    ds.InstanceNumber = 1
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    name = Dataset()
    name.CodeValue, name.CodingSchemeDesignator, name.CodeMeaning = "121070", "DCM", "Findings"
    ds.ConceptNameCodeSequence = DicomSequence([name])
    text = Dataset()
    text.RelationshipType = "CONTAINS"
    text.ValueType = "TEXT"
    text.ConceptNameCodeSequence = DicomSequence([name])
    text.TextValue = "synthetic finding"
    ds.ContentSequence = DicomSequence([text])
    path = folder / "report.dcm"
    _save(ds, path, "explicit", None)
    return path, series_uid


def write_folder_with_extras(folder: str | Path, *, seed: int = 0,
                             shape: Sequence[int] = (32, 28, 12)) -> StudyFixture:
    """One study in ``folder``: three image series (``axial/`` CT, ``coronal/`` CT, ``mr/`` axial MR), a Basic
    Text SR (``report.dcm``) and a CT localizer (``scout.dcm``, ImageType LOCALIZER), all with one study UID."""
    folder = Path(folder)
    study_uid = uid(seed, "study-with-extras")
    series = [
        write_series(folder / "axial", shape=shape, orientation="axial", study_uid=study_uid, seed=seed,
                     series_number=1),
        write_series(folder / "coronal", shape=shape, orientation="coronal", study_uid=study_uid, seed=seed,
                     series_number=2),
        write_series(folder / "mr", shape=shape, orientation="axial", modality="MR", study_uid=study_uid,
                     seed=seed, series_number=3),
    ]
    sr_path, sr_uid = write_sr(folder, study_uid=study_uid, seed=seed)
    loc_path, loc_uid = write_localizer(folder, study_uid=study_uid, seed=seed)
    return StudyFixture(folder=folder, study_uid=study_uid, series=series, sr_path=sr_path, sr_series_uid=sr_uid,
                        localizer_path=loc_path, localizer_series_uid=loc_uid)


def zip_series(zip_path: str | Path, sources: Iterable[str | Path | SeriesFixture | StudyFixture], *,
               extra_members: Mapping[str, bytes] | None = None, prefix: str = "") -> Path:
    """Pack the files of ``sources`` (folders, files or fixtures) into ``zip_path`` (deflate).

    Member names are ``<prefix><folder name>/<relative path>`` (folders / fixtures) or ``<prefix><file name>``.
    ``extra_members`` adds more members (e.g. ``{"README.txt": b"..."}``, a non-DICOM file to skip).
    """
    zip_path = Path(zip_path)
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for src in sources:
            if isinstance(src, (SeriesFixture, StudyFixture)):
                src = src.folder
            src = Path(src)
            if src.is_dir():
                for path in sorted(p for p in src.rglob("*") if p.is_file()):
                    zf.write(path, prefix + f"{src.name}/{path.relative_to(src).as_posix()}")
            else:
                zf.write(src, prefix + src.name)
        for name, data in (extra_members or {}).items():
            zf.writestr(prefix + name, data)
    return zip_path


def dataset_bytes(ds: Any) -> bytes:
    """A dataset as Part 10 bytes (for tests that feed instances through a non-file source)."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
