"""Assemble the instances of one DICOM image series into a 3-D volume (a RAS NIfTI image).

:func:`assemble_series` works on datasets already read (pixel data included); :func:`load_series` reads them
first (:func:`nvseg_ray.dicom.sources.load_datasets`). Both return an :class:`AssembledSeries`.

Geometry. Every image plane (an instance of a classic CT / MR series, or a frame of an enhanced multi-frame
instance) has an orientation (row cosine r, column cosine c from ImageOrientationPatient / the Plane Orientation
functional group), a position p (ImagePositionPatient / Plane Position) and a pixel spacing (PixelSpacing =
[row spacing, column spacing]). Planes are ordered by their position along the slice normal n = r x c
(``d = p . n``, mm in LPS). Voxel (i = column, j = row, k = slice) maps to LPS mm by::

    lps_affine = [[r * col_spacing, c * row_spacing, (p_last - p_first) / (N - 1), p_first], [0, 0, 0, 1]]

and RAS = diag(-1, -1, 1, 1) @ LPS. The voxel data is not flipped: ``image`` holds (X, Y, Z) = (column, row,
slice) float32 values after Rescale Slope / Intercept (per instance, or per frame from the Pixel Value
Transformation functional group).

Faults are diagnosed from the headers, before any pixel data is decoded, each as its own error class
(:mod:`nvseg_ray.errors`): no pixel data, a single slice, mixed orientation / matrix / pixel spacing, duplicate
positions, gantry tilt (positions off the normal), missing slices (a gap of a whole number of steps) and uneven
spacing. Messages name the series UID and the slice positions (mm along the normal); never patient identifiers.
With ``resample=True`` a tilted, gapped or unevenly spaced stack is put on a regular grid instead (linear
interpolation; ``resampled=True`` and a line in ``notes``).

Memory: one float32 (X, Y, Z) array is preallocated; planes are decoded one at a time (pydicom's decoder, one
frame at a time for multi-frame objects) and each dataset's PixelData is dropped after decoding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import nibabel as nib
import numpy as np

from ..config import DEFAULT_MAX_VOXELS
from ..errors import (
    DicomDuplicatePosition,
    DicomError,
    DicomGantryTilt,
    DicomGeometryError,
    DicomMissingSlice,
    DicomMixedGeometry,
    DicomNoPixelData,
    DicomSingleSlice,
    DicomUnevenSpacing,
)
from ..io import too_large_error
from ..redaction import redact_uri
from .series import DicomSeries

#: LPS <-> RAS.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
#: Largest difference of direction cosines still "the same orientation".
ORIENTATION_TOL = 1e-3
#: Largest difference of pixel spacings (mm) still "the same spacing".
PIXEL_SPACING_TOL = 1e-3
#: A slice step may deviate this much (fraction of the step, at least STEP_TOL_MM) and still be regular.
STEP_TOL_REL = 0.01
STEP_TOL_MM = 1e-3
#: Positions closer than this (mm, along the normal) are the same position.
DUPLICATE_TOL_MM = 1e-3
#: A position may lie this far off the normal through the first one (mm, plus SHEAR_TOL_REL x distance) before the
#: stack counts as sheared (gantry tilt).
SHEAR_TOL_MM = 0.01
SHEAR_TOL_REL = 1e-3
#: Transfer syntax UID -> what to install to decode it (pydicom's plugins; python-gdcm decodes all of them).
DECODER_PACKAGES: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": "pylibjpeg pylibjpeg-libjpeg",  # JPEG baseline
    "1.2.840.10008.1.2.4.51": "pylibjpeg pylibjpeg-libjpeg",  # JPEG extended
    "1.2.840.10008.1.2.4.57": "pylibjpeg pylibjpeg-libjpeg",  # JPEG lossless
    "1.2.840.10008.1.2.4.70": "pylibjpeg pylibjpeg-libjpeg",  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.80": "pylibjpeg pylibjpeg-libjpeg",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81": "pylibjpeg pylibjpeg-libjpeg",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90": "pylibjpeg pylibjpeg-openjpeg",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91": "pylibjpeg pylibjpeg-openjpeg",  # JPEG 2000
    "1.2.840.10008.1.2.4.201": "pylibjpeg pylibjpeg-openjpeg",  # HTJ2K lossless
    "1.2.840.10008.1.2.4.202": "pylibjpeg pylibjpeg-openjpeg",  # HTJ2K lossless RPCL
    "1.2.840.10008.1.2.4.203": "pylibjpeg pylibjpeg-openjpeg",  # HTJ2K
    "1.2.840.10008.1.2.5": "pylibjpeg pylibjpeg-rle",  # RLE lossless (pydicom also decodes it with numpy)
}
#: How many positions a message lists before "...".
_SHOWN = 8


@dataclass
class AssembledSeries:
    """One DICOM series as a volume.

    Attributes:
        image: float32 (X = column i, Y = row j, Z = slice k) values after Rescale Slope / Intercept; affine =
            RAS (``diag(-1, -1, 1, 1) @ lps_affine``); qform = sform = affine, codes 1 (scanner).
        lps_affine: (4, 4) float64, voxel (i = col, j = row, k = slice) -> LPS mm.
        series: the series as discovered.
        source_datasets: the source pydicom Datasets WITHOUT PixelData, one per instance, in slice order k for a
            single-frame series; the one instance for a multi-frame series.
        frame_numbers: multi-frame: 1-based frame number of slice k (of the source stack); None for single-frame.
        source_dtype: stored pixel dtype, e.g. ``"int16"``.
        resampled: True when ``resample=True`` put an irregular (tilted, gapped, unevenly spaced) stack on a
            regular grid: then ``image``'s slices are no longer the source's planes.
        notes: what was done beyond the plain conversion, e.g. ``"resampled: uneven spacing 2.00-3.00 mm ->
            2.00 mm (linear)"`` (for reports).
    """

    image: nib.Nifti1Image | None
    lps_affine: np.ndarray
    series: DicomSeries
    source_datasets: list
    frame_numbers: list[int] | None
    source_dtype: str
    resampled: bool = False
    notes: list[str] = field(default_factory=list)
    #: (X, Y, Z) of the grid once the image is dropped (:meth:`without_voxels`).
    grid: tuple[int, ...] = ()

    @property
    def shape(self) -> tuple[int, int, int]:
        """(X, Y, Z) of the volume grid."""
        return tuple(int(n) for n in (self.image.shape[:3] if self.image is not None else self.grid))

    def without_voxels(self) -> AssembledSeries:
        """A copy without the image (headers, geometry and notes only): what travels with the mask to the SEG
        writer (batch rows pickle it)."""
        return replace(self, image=None, grid=self.shape)


@dataclass
class _Plane:
    """One image plane: a single-frame instance, or one frame of a multi-frame instance (header facts only)."""

    index: int  # dataset index in the input
    frame: int | None  # 1-based frame number, None for single-frame instances
    row: np.ndarray  # row direction cosine (LPS), unit
    col: np.ndarray  # column direction cosine (LPS), unit
    position: np.ndarray  # ImagePositionPatient (LPS mm)
    spacing: tuple[float, float]  # PixelSpacing: (row spacing, column spacing) mm
    rows: int
    cols: int
    slope: float
    intercept: float
    d: float = 0.0  # position along the slice normal, mm


# --------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------


def load_series(series: DicomSeries, storage_options: Mapping[str, Any] | None = None, *, resample: bool = False,
                max_voxels: int | None = DEFAULT_MAX_VOXELS) -> AssembledSeries:
    """Read the instances of ``series`` (:func:`~nvseg_ray.dicom.sources.load_datasets`) and assemble them
    (:func:`assemble_series`)."""
    from .sources import MAX_BYTES_PER_VOXEL, load_datasets

    datasets = load_datasets(series, dict(storage_options) if storage_options is not None else None,
                             max_bytes=None if max_voxels is None else max_voxels * MAX_BYTES_PER_VOXEL)
    return assemble_series(datasets, series, resample=resample, max_voxels=max_voxels)


def assemble_series(datasets: Sequence[Any], series: DicomSeries, *, resample: bool = False,
                    max_voxels: int | None = DEFAULT_MAX_VOXELS) -> AssembledSeries:
    """Assemble ``datasets`` (the instances of ``series``, any order, pixel data included) into one volume.

    Args:
        datasets: pydicom Datasets of one image series: single-frame instances, or one enhanced multi-frame
            instance. Their PixelData is deleted once decoded (they become ``source_datasets``).
        series: the discovered series (named in messages; returned as ``AssembledSeries.series``).
        resample: put a tilted / gapped / unevenly spaced stack on a regular grid (linear) instead of raising.
        max_voxels: refuse (``InputError`` code ``too_large``) a grid above this many voxels before decoding.

    Raises:
        DicomNoPixelData: an instance has no pixel data, or it cannot be decoded (missing decoder plugin).
        DicomSingleSlice / DicomMixedGeometry / DicomDuplicatePosition: never resampled.
        DicomGantryTilt / DicomMissingSlice / DicomUnevenSpacing: unless ``resample``.
        DicomGeometryError: an instance lacks the geometry tags (orientation, position, pixel spacing).
        InputError: ``too_large``.
    """
    try:
        return _assemble(list(datasets), series, resample=resample, max_voxels=max_voxels)
    except DicomError as err:  # details name the real Series Instance UID (and the stack, for a split series)
        err.details["series_uid"] = series.series_instance_uid
        if series.split:
            err.details["split"] = series.split
        raise


def _assemble(datasets: list[Any], series: DicomSeries, *, resample: bool,
              max_voxels: int | None) -> AssembledSeries:
    uid = series.series_instance_uid + (f" (stack {series.split})" if series.split else "")
    if not datasets:
        raise DicomError(f"series {uid} has no instances", code="no_dicom_series", series_uid=uid)
    _check_pixel_data(datasets, uid)
    planes = _planes(datasets, uid)
    multiframe = any(p.frame is not None for p in planes)
    if len(planes) == 1:
        p = planes[0]
        raise DicomSingleSlice(
            f"series {uid} has a single image plane (at {_mm(float(np.dot(p.position, _normal(p))))} mm along its "
            "normal): no slice spacing, no 3-D volume",
            hint="nvseg-ray segments 3-D volumes: select the volumetric series of the study (not a scout, key "
                 "image or single reformatted slice), or re-export the complete series",
            series_uid=uid, positions=[round(float(np.dot(p.position, _normal(p))), 3)])
    _check_same_geometry(planes, uid)
    normal = _normal(planes[0])
    for p in planes:
        p.d = float(np.dot(p.position, normal))
    planes.sort(key=lambda p: (p.d, p.index, p.frame or 0))
    rows, cols = planes[0].rows, planes[0].cols
    _check_size(series, (cols, rows, len(planes)), max_voxels)
    _check_duplicates(planes, uid)

    notes: list[str] = []
    shear = _shear(planes, normal)
    tilted = _check_tilt(planes, shear, normal, uid, resample)
    if tilted:
        notes.append(f"resampled: gantry tilt {tilted:.2f} deg removed (slices shifted in-plane onto the slice "
                     "normal, linear)")
    d = np.array([p.d for p in planes])
    grid_d, step_note = _check_spacing(d, uid, resample)
    if step_note:
        notes.append(step_note)
    resampled = bool(notes)

    n_out = len(grid_d) if grid_d is not None else len(planes)
    _check_size(series, (cols, rows, n_out), max_voxels)

    first = planes[0]
    lps = np.eye(4)
    lps[:3, 0] = first.row * first.spacing[1]
    lps[:3, 1] = first.col * first.spacing[0]
    if grid_d is not None:  # a regular grid along the normal from the first plane
        lps[:3, 2] = normal * (grid_d[1] - grid_d[0])
    elif tilted:
        lps[:3, 2] = normal * (d[-1] - d[0]) / (len(d) - 1)
    else:
        lps[:3, 2] = (planes[-1].position - first.position) / (len(planes) - 1)
    lps[:3, 3] = first.position

    volume, dtype = _decode(datasets, planes, uid, shear if tilted else None)
    if grid_d is not None:
        volume = _resample_along_normal(volume, d, grid_d)
    ras = LPS_TO_RAS @ lps
    image = nib.Nifti1Image(volume, ras)
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(ras, 1)
    image.set_sform(ras, 1)

    if multiframe:
        order = sorted({p.index for p in planes})
        sources = [datasets[i] for i in order]
        frame_numbers = [int(p.frame or 1) for p in planes] if len(sources) == 1 else None
    else:
        sources = [datasets[p.index] for p in planes]
        frame_numbers = None
    return AssembledSeries(image=image, lps_affine=lps, series=series, source_datasets=sources,
                           frame_numbers=frame_numbers, source_dtype=dtype, resampled=resampled, notes=notes)


# --------------------------------------------------------------------------------------------------------
# Header facts
# --------------------------------------------------------------------------------------------------------


def _mm(value: float) -> str:
    return f"{value:.2f}"


def _positions_text(values: Sequence[float]) -> str:
    shown = ", ".join(_mm(v) for v in values[:_SHOWN])
    more = f", ... ({len(values)} in all)" if len(values) > _SHOWN else ""
    return f"[{shown}{more}] mm"


def _rounded(values: Sequence[float]) -> list[float]:
    return [round(float(v), 3) for v in values]


def _normal(p: _Plane) -> np.ndarray:
    n = np.cross(p.row, p.col)
    return n / np.linalg.norm(n)


def _has_pixels(ds: Any) -> bool:
    return any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))


def _check_pixel_data(datasets: Sequence[Any], uid: str) -> None:
    missing = [n for n, ds in enumerate(datasets) if not _has_pixels(ds)]
    if not missing:
        return
    where, positions = [], []
    for n in missing:
        ds = datasets[n]
        pos, iop = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
        text = f"instance {ds.get('SOPInstanceUID', n)}"
        if pos is not None and iop is not None and len(pos) == 3 and len(iop) == 6:
            normal = np.cross([float(v) for v in iop[:3]], [float(v) for v in iop[3:]])
            if np.linalg.norm(normal) > 1e-3:
                d = float(np.dot([float(v) for v in pos], normal / np.linalg.norm(normal)))
                positions.append(round(d, 3))
                text += f" at {_mm(d)} mm along the slice normal"
        where.append(text)
    raise DicomNoPixelData(
        f"series {uid}: {len(missing)} of {len(datasets)} instances carry no pixel data ({'; '.join(where[:_SHOWN])})",
        hint="re-export the complete series from the PACS (the instance(s) above hold no image)",
        series_uid=uid, positions=positions,
        sop_instance_uids=[str(datasets[n].get("SOPInstanceUID", "")) for n in missing])


def _item(seq_owner: Any, keyword: str) -> Any:
    seq = seq_owner.get(keyword) if seq_owner is not None else None
    return seq[0] if seq else None


def _group(per_frame: Any, shared: Any, keyword: str) -> Any:
    """The first item of functional group ``keyword``: per-frame first, then shared."""
    return _item(per_frame, keyword) or _item(shared, keyword)


def _geometry_error(uid: str, ds: Any, what: str) -> DicomGeometryError:
    return DicomGeometryError(
        f"series {uid}: instance {ds.get('SOPInstanceUID', '?')} has no {what}: its place in 3-D is unknown",
        hint="re-export the series from the scanner or PACS with its geometry (a secondary capture or screenshot "
             "cannot be segmented as a volume)", series_uid=uid)


def _rescale(owner: Any) -> tuple[float, float]:
    slope = owner.get("RescaleSlope") if owner is not None else None
    intercept = owner.get("RescaleIntercept") if owner is not None else None
    return (float(slope) if slope not in (None, "") else 1.0,
            float(intercept) if intercept not in (None, "") else 0.0)


def _plane(index: int, frame: int | None, ds: Any, iop: Any, ipp: Any, spacing: Any, rescale: tuple[float, float],
           uid: str) -> _Plane:
    if iop is None or len(iop) != 6:
        raise _geometry_error(uid, ds, "ImageOrientationPatient")
    if ipp is None or len(ipp) != 3:
        raise _geometry_error(uid, ds, "ImagePositionPatient")
    if spacing is None or len(spacing) != 2:
        raise _geometry_error(uid, ds, "PixelSpacing")
    cos = np.asarray([float(v) for v in iop])
    row, col = cos[:3], cos[3:]
    if np.linalg.norm(row) < 1e-6 or np.linalg.norm(col) < 1e-6 or np.linalg.norm(np.cross(row, col)) < 1e-3:
        raise _geometry_error(uid, ds, "valid ImageOrientationPatient (degenerate direction cosines)")
    sp = (float(spacing[0]), float(spacing[1]))
    if not all(np.isfinite(sp)) or min(sp) <= 0:
        raise _geometry_error(uid, ds, "valid PixelSpacing (zero, negative or not finite)")
    return _Plane(index=index, frame=frame, row=row / np.linalg.norm(row), col=col / np.linalg.norm(col),
                  position=np.asarray([float(v) for v in ipp]), spacing=sp, rows=int(ds.Rows),
                  cols=int(ds.Columns), slope=rescale[0], intercept=rescale[1])


def _planes(datasets: Sequence[Any], uid: str) -> list[_Plane]:
    planes: list[_Plane] = []
    for n, ds in enumerate(datasets):
        if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
            raise DicomError(f"series {uid}: instance {ds.get('SOPInstanceUID', n)} is a colour image "
                             f"({ds.get('PhotometricInterpretation', '?')}), not a grey-scale CT/MR plane",
                             hint="select the grey-scale image series of the study", code="dicom_unsupported",
                             series_uid=uid)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        per_frame = ds.get("PerFrameFunctionalGroupsSequence")
        if per_frame is not None:
            if len(per_frame) != frames:
                raise DicomGeometryError(
                    f"series {uid}: instance {ds.get('SOPInstanceUID', n)} declares {frames} frames but has "
                    f"{len(per_frame)} per-frame functional group items", hint="re-export the series",
                    series_uid=uid)
            shared = _item(ds, "SharedFunctionalGroupsSequence")
            for f, item in enumerate(per_frame, start=1):
                orient = _group(item, shared, "PlaneOrientationSequence")
                pos = _group(item, shared, "PlanePositionSequence")
                meas = _group(item, shared, "PixelMeasuresSequence")
                pvt = _group(item, shared, "PixelValueTransformationSequence")
                planes.append(_plane(n, f, ds, orient.get("ImageOrientationPatient") if orient else None,
                                     pos.get("ImagePositionPatient") if pos else None,
                                     meas.get("PixelSpacing") if meas else None,
                                     _rescale(pvt) if pvt is not None else _rescale(ds), uid))
        elif frames > 1:
            raise DicomError(f"series {uid}: instance {ds.get('SOPInstanceUID', n)} has {frames} frames but no "
                             "per-frame geometry (PerFrameFunctionalGroupsSequence): not a CT/MR volume nvseg-ray "
                             "can place in 3-D", hint="export the series as classic single-frame CT/MR images or "
                             "as an Enhanced CT/MR object", code="dicom_unsupported", series_uid=uid)
        else:
            planes.append(_plane(n, None, ds, ds.get("ImageOrientationPatient"), ds.get("ImagePositionPatient"),
                                 ds.get("PixelSpacing"), _rescale(ds), uid))
    return planes


def _check_same_geometry(planes: list[_Plane], uid: str) -> None:
    """Raise DicomMixedGeometry when orientation, matrix or pixel spacing differ between planes."""
    ref = planes[0]
    normal = _normal(ref)
    checks = (
        ("orientation (ImageOrientationPatient)",
         lambda p: np.max(np.abs(np.r_[p.row - ref.row, p.col - ref.col])) > ORIENTATION_TOL,
         lambda p: "[" + ", ".join(f"{v:.4f}" for v in np.r_[p.row, p.col]) + "]"),
        ("matrix size (Rows x Columns)", lambda p: (p.rows, p.cols) != (ref.rows, ref.cols),
         lambda p: f"{p.rows}x{p.cols}"),
        ("pixel spacing (PixelSpacing)",
         lambda p: max(abs(p.spacing[0] - ref.spacing[0]), abs(p.spacing[1] - ref.spacing[1])) > PIXEL_SPACING_TOL,
         lambda p: f"{p.spacing[0]:g}x{p.spacing[1]:g} mm"),
    )
    for what, differs, describe in checks:
        odd = [p for p in planes if differs(p)]
        if not odd:
            continue
        same = [p for p in planes if not differs(p)]
        # name the minority: the planes unlike the majority
        minority, majority = (odd, same) if len(odd) <= len(same) else (same, odd)
        positions = sorted(float(np.dot(p.position, normal)) for p in minority)
        values = sorted({describe(p) for p in planes})
        raise DicomMixedGeometry(
            f"series {uid}: its {len(planes)} image planes differ in {what} ({'; '.join(values[:4])}): "
            f"{len(minority)} plane(s) unlike the other {len(majority)}, at {_positions_text(positions)} along the "
            "slice normal",
            hint="the series mixes several stacks (e.g. a scout, a reformat or a second acquisition): re-export "
                 "the volume alone, or remove the odd instances",
            series_uid=uid, positions=_rounded(positions))


def _check_duplicates(planes: list[_Plane], uid: str) -> None:
    d = np.array([p.d for p in planes])
    dup = np.flatnonzero(np.diff(d) <= DUPLICATE_TOL_MM)
    if dup.size == 0:
        return
    involved = set(dup.tolist()) | set((dup + 1).tolist())
    positions = sorted({round(float(d[i]), 3) for i in dup})
    raise DicomDuplicatePosition(
        f"series {uid}: {len(involved)} planes share {len(positions)} slice position(s) "
        f"{_positions_text(positions)} along the normal",
        hint="the series holds more than one image per position (several phases, echoes or a repeated "
             "acquisition): re-export one volume per series, or remove the duplicate instances",
        series_uid=uid, positions=positions)


def _shear(planes: list[_Plane], normal: np.ndarray) -> np.ndarray:
    """(N, 3) in-plane offsets (mm, LPS) of each position from the normal through the first plane."""
    p0 = planes[0].position
    return np.array([(p.position - p0) - (p.d - planes[0].d) * normal for p in planes])


def _check_tilt(planes: list[_Plane], shear: np.ndarray, normal: np.ndarray, uid: str, resample: bool) -> float:
    """0.0 when the positions follow the normal; else the tilt angle (deg) when resampling, or raise."""
    dist = np.abs(np.array([p.d for p in planes]) - planes[0].d)
    off = np.linalg.norm(shear, axis=1)
    if not np.any(off > SHEAR_TOL_MM + SHEAR_TOL_REL * dist):
        return 0.0
    span = dist[-1] if dist[-1] > 0 else 1.0
    angle = float(np.degrees(np.arctan2(off[-1], span)))
    if resample:
        return max(angle, 1e-3)
    positions = [p.d for p in planes]
    raise DicomGantryTilt(
        f"series {uid}: the slice positions do not follow the slice normal (gantry tilt / sheared stack of about "
        f"{angle:.1f} deg: the last plane lies {off[-1]:.2f} mm off the normal through the first); planes at "
        f"{_positions_text(positions)} along the normal",
        hint="re-export a tilt-corrected reconstruction, or pass --dicom-resample to shift the slices in-plane onto "
             "a regular (unsheared) grid",
        series_uid=uid, positions=_rounded(positions), tilt_deg=round(angle, 3))


def _check_spacing(d: np.ndarray, uid: str, resample: bool) -> tuple[np.ndarray | None, str]:
    """None when ``d`` (sorted positions, mm) is regular; else (resampling) the regular grid and a note, or raise."""
    diffs = np.diff(d)
    step = float(diffs.min())
    tol = max(STEP_TOL_MM, STEP_TOL_REL * step)
    if float(diffs.max() - step) <= tol:
        return None, ""
    multiples = np.rint(diffs / step)
    whole = bool(np.all(np.abs(diffs - multiples * step) <= tol * np.maximum(multiples, 1)))
    if whole:
        gaps = np.flatnonzero(multiples > 1)
        missing = [float(d[i] + m * step) for i in gaps for m in range(1, int(multiples[i]))]
        if not resample:
            raise DicomMissingSlice(
                f"series {uid}: {len(missing)} slice(s) missing from a regular {step:.2f} mm stack: expected at "
                f"{_positions_text(missing)} along the normal (gap between planes at "
                f"{', '.join(f'{_mm(d[i])}-{_mm(d[i + 1])}' for i in gaps[:_SHOWN])} mm)",
                hint="re-export the complete series from the PACS, or pass --dicom-resample to fill the gap by "
                     "linear interpolation onto the regular grid",
                series_uid=uid, positions=_rounded(missing), step_mm=round(step, 4))
        note = (f"resampled: {len(missing)} missing slice(s) at {_positions_text(missing)} filled by linear "
                f"interpolation ({step:.2f} mm grid)")
    else:
        changes = [float(d[i + 1]) for i in np.flatnonzero(np.abs(np.diff(diffs)) > tol)]
        if not resample:
            raise DicomUnevenSpacing(
                f"series {uid}: slice spacing varies from {step:.2f} to {float(diffs.max()):.2f} mm; the spacing "
                f"changes at {_positions_text(changes)} along the normal (planes from {_mm(d[0])} to {_mm(d[-1])} mm)",
                hint=f"re-export the series with one slice spacing, or pass --dicom-resample to resample the stack "
                     f"onto a regular {step:.2f} mm grid (linear)",
                series_uid=uid, positions=_rounded(changes), spacings_mm=sorted({round(float(s), 3) for s in diffs}))
        note = f"resampled: uneven spacing {step:.2f}-{float(diffs.max()):.2f} mm -> {step:.2f} mm (linear)"
    n = int(np.floor((d[-1] - d[0]) / step + tol / step)) + 1
    return d[0] + step * np.arange(n), note


def _check_size(series: DicomSeries, shape: tuple[int, int, int], max_voxels: int | None) -> None:
    n = int(np.prod(shape, dtype=np.int64))
    if max_voxels is not None and n > max_voxels:
        raise too_large_error(redact_uri(series.uri), "DICOM series", shape, n, int(max_voxels),
                              series_uid=series.series_instance_uid)


# --------------------------------------------------------------------------------------------------------
# Pixel data
# --------------------------------------------------------------------------------------------------------


def _decoder(ds: Any, uid: str) -> Any:
    from pydicom.dataset import FileMetaDataset
    from pydicom.pixels import get_decoder

    meta = getattr(ds, "file_meta", None)
    ts = str(meta.get("TransferSyntaxUID", "") or "") if meta is not None else ""
    if not ts:  # a dataset built in memory / without file meta: it was read (or made) uncompressed
        implicit = bool((getattr(ds, "original_encoding", None) or (False, True))[0])
        ts = "1.2.840.10008.1.2" if implicit else "1.2.840.10008.1.2.1"
        if meta is None:
            ds.file_meta = meta = FileMetaDataset()
        meta.TransferSyntaxUID = ts  # pydicom's decoders read the syntax from the file meta
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise DicomNoPixelData(f"series {uid}: no decoder exists for the transfer syntax {_ts_name(ts)} ({ts})",
                               hint="re-export the series uncompressed or in a standard lossless syntax",
                               series_uid=uid, transfer_syntax=ts) from None
    if not decoder.is_available:
        package = DECODER_PACKAGES.get(ts, "python-gdcm")
        raise DicomNoPixelData(
            f"series {uid}: its pixel data is compressed as {_ts_name(ts)} ({ts}) and no installed plugin decodes "
            "it", hint=f"pip install {package} (or python-gdcm), e.g. pip install \"nvseg-ray[dicom]\"",
            series_uid=uid, transfer_syntax=ts)
    return decoder


def _ts_name(ts: str) -> str:
    from pydicom.uid import UID

    return UID(ts).name


def _decode(datasets: Sequence[Any], planes: list[_Plane], uid: str,
            shear: np.ndarray | None) -> tuple[np.ndarray, str]:
    """(X, Y, Z) float32 volume of ``planes`` in order (Fortran order: each slice contiguous), and the stored
    dtype. ``shear``: (N, 3) in-plane offsets to undo (gantry tilt), or None. Drops PixelData when done."""
    rows, cols = planes[0].rows, planes[0].cols
    out = np.empty((cols, rows, len(planes)), dtype=np.float32, order="F")
    decoders: dict[int, Any] = {}
    remaining: dict[int, int] = {}
    for p in planes:
        remaining[p.index] = remaining.get(p.index, 0) + 1
    dtype = ""
    for k, p in enumerate(planes):
        ds = datasets[p.index]
        decoder = decoders.get(p.index) or decoders.setdefault(p.index, _decoder(ds, uid))
        try:
            arr, _meta = decoder.as_array(ds, index=None if p.frame is None else p.frame - 1)
        except Exception as exc:  # a corrupt or truncated stream, a plugin failure
            raise DicomNoPixelData(
                f"series {uid}: the pixel data of instance {ds.get('SOPInstanceUID', p.index)}"
                f"{'' if p.frame is None else f' frame {p.frame}'} (at {_mm(p.d)} mm along the normal) cannot be "
                f"decoded ({type(exc).__name__}: {str(exc)[:200]})",
                hint="re-export the series (the instance may be damaged); for compressed data check that the "
                     "pydicom plugins are installed: pip install \"nvseg-ray[dicom]\"",
                series_uid=uid, positions=[round(p.d, 3)]) from None
        if arr.ndim == 3 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.shape != (rows, cols):
            raise DicomMixedGeometry(f"series {uid}: the pixel data at {_mm(p.d)} mm is {arr.shape}, not the "
                                     f"declared {rows}x{cols}", hint="re-export the series", series_uid=uid,
                                     positions=[round(p.d, 3)])
        dtype = dtype or str(arr.dtype)
        plane = arr.T.astype(np.float32)
        if p.slope != 1.0:
            plane *= np.float32(p.slope)
        if p.intercept != 0.0:
            plane += np.float32(p.intercept)
        if shear is not None:
            plane = _unshear(plane, shear[k], p)
        out[:, :, k] = plane
        remaining[p.index] -= 1
        if remaining[p.index] == 0:  # every plane of this instance is decoded: keep its header only
            _drop_pixels(ds)
            decoders.pop(p.index, None)
    return out, dtype


def _drop_pixels(ds: Any) -> None:
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if keyword in ds:
            delattr(ds, keyword)


def _unshear(plane: np.ndarray, offset: np.ndarray, p: _Plane) -> np.ndarray:
    """Resample one (X, Y) plane so that its in-plane ``offset`` (mm, LPS) from the normal through the first
    plane is undone: new voxel (i, j) takes the value at (i - a, j - b) of the plane, a/b the offset in voxels."""
    from scipy import ndimage

    a = float(np.dot(offset, p.row)) / p.spacing[1]
    b = float(np.dot(offset, p.col)) / p.spacing[0]
    if abs(a) < 1e-3 and abs(b) < 1e-3:
        return plane
    return ndimage.shift(plane, (a, b), order=1, mode="nearest").astype(np.float32, copy=False)


def _resample_along_normal(volume: np.ndarray, d: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Linear interpolation of the (X, Y, N) ``volume`` sampled at sorted positions ``d`` onto ``grid`` (mm)."""
    out = np.empty(volume.shape[:2] + (len(grid),), dtype=np.float32, order="F")
    hi = np.clip(np.searchsorted(d, grid, side="left"), 1, len(d) - 1)
    lo = hi - 1
    w = np.clip((grid - d[lo]) / (d[hi] - d[lo]), 0.0, 1.0).astype(np.float32)
    for k in range(len(grid)):
        if w[k] <= 1e-6:
            out[:, :, k] = volume[:, :, lo[k]]
        elif w[k] >= 1 - 1e-6:
            out[:, :, k] = volume[:, :, hi[k]]
        else:
            out[:, :, k] = volume[:, :, lo[k]] * (1 - w[k]) + volume[:, :, hi[k]] * w[k]
    return out
