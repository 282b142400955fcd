"""Input-volume validation: refuse unusable NIfTI volumes with a precise, fixable error.

:func:`validate_nifti` runs the cheap header checks first (shape, dtype, size, stored byte count,
qform/sform agreement, voxel spacing, orientation) and only then reads the voxels (truncation, NaN/Inf).
Each failure is an :class:`~nvseg_ray.errors.InputError` whose ``code`` is one of the ``CODE_*`` constants
below; the message names the file and the offending value, the hint says how to fix it.

The accepted volume is returned as a :class:`ValidatedVolume` whose ``array`` and ``affine`` are exactly
what ``monai.transforms.LoadImage(reader="NibabelReader", image_only=True, dtype=np.float32)`` (MONAI 1.6)
produces for the same file:

* MONAI's ``NibabelReader.read`` applies ``monai.data.utils.correct_nifti_header_if_necessary`` (which may
  replace the sform by the qform when the header's pixdim disagrees with the sform); that logic is
  mirrored by :func:`_monai_header_correction`, on a copy -- the caller's image is never modified.
* ``NibabelReader._get_affine`` returns ``img.affine`` (float64, voxel -> RAS+ world mm).
* ``NibabelReader._get_array_data`` returns ``np.asanyarray(img.dataobj)`` (nibabel applies
  ``scl_slope``/``scl_inter`` in its own float type) and ``LoadImage`` casts that to float32.

To guarantee that this MONAI behaviour never silently moves a volume, a header whose MONAI-corrected
affine differs from the file's own affine by more than ``VolumeLimits.qform_sform_tol_mm`` is refused
with ``qform_sform_mismatch``.
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import nibabel as nib
import numpy as np

from nvseg_ray.errors import ConfigError, InputError, PromptError
from nvseg_ray.io import (
    CODE_TOO_LARGE,
    CODE_TRAILING_DATA,
    CODE_TRUNCATED_FILE,
    CODE_UNREADABLE_FILE,
    DEFAULT_MAX_VOXELS,
    check_data_size,
    read_nifti,
    too_large_error,
)

__all__ = [
    "CODE_CONSTANT_VOLUME",
    "CODE_EMPTY_VOLUME",
    "CODE_INVALID_SPACING",
    "CODE_MULTI_VOLUME",
    "CODE_NON_FINITE",
    "CODE_NON_ORTHONORMAL",
    "CODE_NOT_3D",
    "CODE_QFORM_SFORM_MISMATCH",
    "CODE_TOO_LARGE",
    "CODE_TRAILING_DATA",
    "CODE_TRUNCATED_FILE",
    "CODE_UNREADABLE_FILE",
    "CODE_UNSUPPORTED_DTYPE",
    "DEFAULT_MAX_SPACING_MM",
    "DEFAULT_MAX_VOXELS",
    "DEFAULT_MIN_SPACING_MM",
    "DEFAULT_ORTHONORMAL_TOL",
    "DEFAULT_QFORM_SFORM_TOL_MM",
    "ERROR_CODES",
    "ValidatedVolume",
    "VolumeLimits",
    "check_model_input",
    "check_point_prompts",
    "read_and_validate",
    "validate_nifti",
]

# ----------------------------------------------------------------------------------------------------------
# Error codes (InputError.code)
# ----------------------------------------------------------------------------------------------------------
CODE_NOT_3D = "not_3d"
CODE_MULTI_VOLUME = "multi_volume"
CODE_UNSUPPORTED_DTYPE = "unsupported_dtype"
CODE_NON_FINITE = "non_finite"
CODE_INVALID_SPACING = "invalid_spacing"
CODE_NON_ORTHONORMAL = "non_orthonormal"
CODE_QFORM_SFORM_MISMATCH = "qform_sform_mismatch"
#: refused by :func:`check_model_input` (model inputs only; label maps may legitimately be all zero).
CODE_EMPTY_VOLUME = "empty_volume"
CODE_CONSTANT_VOLUME = "constant_volume"

#: Every InputError code an input volume can be refused with (reading + validation).
ERROR_CODES: tuple[str, ...] = (
    CODE_UNREADABLE_FILE,
    CODE_TRUNCATED_FILE,
    CODE_TRAILING_DATA,
    CODE_NOT_3D,
    CODE_MULTI_VOLUME,
    CODE_UNSUPPORTED_DTYPE,
    CODE_NON_FINITE,
    CODE_INVALID_SPACING,
    CODE_NON_ORTHONORMAL,
    CODE_QFORM_SFORM_MISMATCH,
    CODE_TOO_LARGE,
    CODE_EMPTY_VOLUME,
    CODE_CONSTANT_VOLUME,
)

# ----------------------------------------------------------------------------------------------------------
# Default limits
# ----------------------------------------------------------------------------------------------------------
# DEFAULT_MAX_VOXELS (2**29 voxels, a 2 GiB float32 array) is defined, with its reason, in nvseg_ray.config;
# re-exported here (through nvseg_ray.io, which applies it before inflating a .nii.gz).
#: Finest accepted voxel size. Clinical CT/MRI is >= ~0.2 mm; anything below 0.01 mm is microscopy or a
#: header written in metres/centimetres instead of millimetres (0.5 mm stored as 0.0005).
DEFAULT_MIN_SPACING_MM = 0.01
#: Coarsest accepted voxel size. Thick clinical slices are <= ~10 mm; 50 mm leaves room for scouts and
#: low-resolution MR while catching garbage pixdim/sform values.
DEFAULT_MAX_SPACING_MM = 50.0
#: Max |R^T R - I| entry for the unit direction cosines R: 1e-3 is a ~0.06 degree deviation from
#: perpendicular axes -- far above float32 header round-off (~1e-7), far below a real shear/gantry tilt.
DEFAULT_ORTHONORMAL_TOL = 1e-3
#: Max |qform - sform| entry in mm. Both are stored in float32 and the qform as a quaternion, whose
#: reconstruction loses up to ~2e-3 mm near 180-degree rotations; 0.01 mm is below 1/20 of the finest
#: clinical voxel, so any difference above it is a real disagreement between the two transforms.
DEFAULT_QFORM_SFORM_TOL_MM = 1e-2

_SPATIAL_AXES = ("i (x)", "j (y)", "k (z)")
_ACCEPTED_KINDS = frozenset("iuf")  # signed int, unsigned int, float


@dataclass(frozen=True)
class VolumeLimits:
    """Thresholds used by :func:`validate_nifti` (defaults: the ``DEFAULT_*`` module constants).

    Attributes:
        max_voxels: largest accepted X*Y*Z (CLI option ``--max-voxels``).
        min_spacing_mm / max_spacing_mm: accepted range of each voxel edge length, in world mm.
        orthonormal_tol: max entry of |R^T R - I| for the column-normalised direction matrix R.
        qform_sform_tol_mm: max |qform - sform| entry (mm) when both are set, and max change allowed by
            MONAI's header correction.
    """

    max_voxels: int = DEFAULT_MAX_VOXELS
    min_spacing_mm: float = DEFAULT_MIN_SPACING_MM
    max_spacing_mm: float = DEFAULT_MAX_SPACING_MM
    orthonormal_tol: float = DEFAULT_ORTHONORMAL_TOL
    qform_sform_tol_mm: float = DEFAULT_QFORM_SFORM_TOL_MM

    def __post_init__(self) -> None:
        if self.max_voxels < 1:
            raise ConfigError(
                f"--max-voxels must be a positive voxel count, got {self.max_voxels}.",
                hint=f"Use e.g. --max-voxels {DEFAULT_MAX_VOXELS} (the default).",
                max_voxels=self.max_voxels,
            )
        if not 0 < self.min_spacing_mm < self.max_spacing_mm:
            raise ConfigError(
                f"Voxel spacing limits must satisfy 0 < min < max, got min={self.min_spacing_mm} mm, "
                f"max={self.max_spacing_mm} mm.",
                hint=f"The defaults are {DEFAULT_MIN_SPACING_MM} mm and {DEFAULT_MAX_SPACING_MM} mm.",
            )
        if not (self.orthonormal_tol > 0 and self.qform_sform_tol_mm > 0):
            raise ConfigError(
                f"Geometry tolerances must be positive, got orthonormal_tol={self.orthonormal_tol}, "
                f"qform_sform_tol_mm={self.qform_sform_tol_mm}.",
                hint=f"The defaults are {DEFAULT_ORTHONORMAL_TOL} and {DEFAULT_QFORM_SFORM_TOL_MM} mm.",
            )


@dataclass
class ValidatedVolume:
    """A volume that passed :func:`validate_nifti`.

    Attributes:
        image: 3-D nibabel image (a 4-D t=1 input is squeezed) whose data is ``array`` (shared, its dtype,
            no scaling left in the header) and whose header is the (MONAI-corrected) source header.
        array: shape (X, Y, Z), voxel values after ``scl_slope``/``scl_inter`` (e.g. CT in HU), held once in the
            stored dtype where every value is exact in float32 (:data:`KEPT_DTYPES`: an int16 CT stays int16), else
            float32; equal in value to MONAI ``LoadImage(dtype=np.float32)`` output. Any memory order. Indexed in voxel
            space: ``array[i, j, k]`` is at world ``affine @ [i, j, k, 1]``.
        affine: float64 (4, 4), voxel index -> RAS+ world mm; identical to MONAI's ``meta["affine"]``.
        spacing: voxel edge lengths in mm along i, j, k (column norms of ``affine[:3, :3]``).
        shape: (X, Y, Z) == ``array.shape``.
        uri: where the volume came from (for messages and manifests).
        source_dtype: on-disk voxel dtype name, e.g. ``"int16"``.
        dicom: for a DICOM series, its :class:`~nvseg_ray.dicom.assembly.AssembledSeries` without voxels (source
            headers, series facts, resampling notes), which the DICOM SEG references; None for NIfTI input.
    """

    image: nib.Nifti1Image
    array: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]
    uri: str
    source_dtype: str
    dicom: Any = None

    def without_voxels(self) -> ValidatedVolume:
        """A copy that keeps header, affine and metadata but no voxel data: what the stages after ``prepare`` need
        (the mask's header, grid and report), so the input need not stay in memory while the model runs."""
        header_only = type(self.image)(np.zeros((1, 1, 1), np.uint8), None, header=self.image.header.copy())
        return dataclasses.replace(self, image=header_only, array=np.empty((0, 0, 0), self.array.dtype))

    def with_voxels(self, array: np.ndarray) -> ValidatedVolume:
        """The inverse of :meth:`without_voxels` for the stages' needs: ``array`` (X, Y, Z), the voxels that travelled
        apart (the batch job sends them from preprocessing to postprocessing past the model actor)."""
        return dataclasses.replace(self, array=array)


# ----------------------------------------------------------------------------------------------------------
# Header checks
# ----------------------------------------------------------------------------------------------------------


def _check_shape(shape: tuple[int, ...], *, uri: str) -> tuple[int, int, int]:
    """Return the spatial shape (X, Y, Z) or raise ``not_3d`` / ``multi_volume``.

    Accepted: (X, Y, Z) and (X, Y, Z, 1) with every spatial size >= 2. A spatial size of 1 is a single
    slice (2-D), a 4th dimension > 1 is a time series / multi-echo / multi-channel stack.
    """
    if len(shape) >= 5:
        raise InputError(
            f"{uri!r} is a {len(shape)}-D NIfTI with shape {shape} (vector- or tensor-valued voxels); "
            "only single 3-D volumes can be segmented.",
            code=CODE_MULTI_VOLUME,
            hint="Extract one 3-D component, e.g. with nibabel: `img.slicer[..., 0, 0]`, and save it.",
            uri=uri,
            shape=list(shape),
        )
    if len(shape) == 4 and shape[3] != 1:
        raise InputError(
            f"{uri!r} holds {shape[3]} volumes (4-D shape {shape}); only a single 3-D volume can be segmented.",
            code=CODE_MULTI_VOLUME,
            hint="Split it into 3-D files (`fslsplit <file>` or nibabel `img.slicer[..., t]`) and pass one "
            "volume per input, e.g. the contrast phase you want segmented.",
            uri=uri,
            shape=list(shape),
            n_volumes=int(shape[3]),
        )
    spatial = tuple(int(n) for n in shape[:3])
    if len(shape) < 3 or min(spatial) < 2:
        raise InputError(
            f"{uri!r} is not a 3-D volume: its shape is {shape}, a single slice or smaller.",
            code=CODE_NOT_3D,
            hint="Segmentation needs a 3-D volume with at least 2 voxels along each axis. Convert the whole "
            "DICOM series (e.g. `dcm2niix -z y <series_dir>`), not individual slices.",
            uri=uri,
            shape=list(shape),
        )
    return spatial  # type: ignore[return-value]


def _check_dtype(img: nib.Nifti1Image, *, uri: str) -> np.dtype:
    """Return the on-disk voxel dtype, or raise ``unsupported_dtype`` for non-real-scalar data."""
    try:
        dtype = np.dtype(img.get_data_dtype())
    except Exception as exc:
        raise InputError(
            f"{uri!r} declares a NIfTI datatype nibabel does not understand ({exc}).",
            code=CODE_UNSUPPORTED_DTYPE,
            hint="Re-export the volume with integer or float voxels (int16 for CT is typical).",
            uri=uri,
        ) from exc
    dataobj = img.dataobj
    if isinstance(dataobj, np.ndarray) and dataobj.dtype.kind not in _ACCEPTED_KINDS:
        dtype = dataobj.dtype
    if dtype.kind not in _ACCEPTED_KINDS or dtype.fields is not None:
        kind = {"c": "complex", "b": "boolean", "V": "RGB/structured"}.get(dtype.kind, "non-numeric")
        raise InputError(
            f"{uri!r} has {kind} voxels (dtype {dtype}); only real-valued integer or float scalar voxels "
            "can be segmented.",
            code=CODE_UNSUPPORTED_DTYPE,
            hint="Convert it to a scalar image first: magnitude for complex MR data, a grey-level channel "
            "for RGB, or int16/float32 for masks (e.g. `fslmaths in.nii.gz out.nii.gz -odt float`).",
            uri=uri,
            dtype=str(dtype),
        )
    return dtype


def _check_size(spatial: tuple[int, int, int], limits: VolumeLimits, *, uri: str) -> None:
    n_voxels = int(np.prod(spatial, dtype=np.int64))
    if n_voxels > limits.max_voxels:
        raise too_large_error(uri, "the volume", spatial, n_voxels, limits.max_voxels)


def _stored_nbytes(img: nib.Nifti1Image) -> int | None:
    """Bytes available to ``img``'s lazy data: in-memory buffer size or uncompressed file size, else None."""
    if not nib.is_proxy(img.dataobj):
        return None
    holder = img.file_map.get("image")
    if holder is None:
        return None
    if isinstance(holder.fileobj, io.BytesIO):
        with holder.fileobj.getbuffer() as view:
            return view.nbytes
    filename = holder.filename
    if holder.fileobj is None and filename and not str(filename).lower().endswith((".gz", ".bz2", ".zst")):
        try:
            return os.path.getsize(filename)
        except OSError:
            return None
    return None


def _check_stored_bytes(img: nib.Nifti1Image, *, uri: str) -> None:
    """Raise ``truncated_file`` when the stored bytes are fewer than the header declares (no data read)."""
    available = _stored_nbytes(img)
    if available is not None:
        check_data_size(img, available, uri=uri)


def _qform_sform_hint() -> str:
    return (
        "Make the two transforms agree: `fslorient -copysform2qform <file>` (if the sform is right) or "
        "`fslorient -copyqform2sform <file>`, or re-export the volume from the original DICOM "
        "(e.g. `dcm2niix -z y <series_dir>`)."
    )


def _check_qform_sform(header: nib.Nifti1Header, limits: VolumeLimits, *, uri: str) -> None:
    """With both qform_code > 0 and sform_code > 0, raise ``qform_sform_mismatch`` if they disagree."""
    qcode, scode = int(header["qform_code"]), int(header["sform_code"])
    if qcode <= 0 or scode <= 0:
        return
    try:
        qform = header.get_qform()
    except Exception as exc:
        raise InputError(
            f"{uri!r} has an invalid qform ({exc}) next to its sform.",
            code=CODE_QFORM_SFORM_MISMATCH,
            hint=_qform_sform_hint(),
            uri=uri,
        ) from exc
    diff = np.abs(qform - header.get_sform())
    max_diff = float(np.max(diff))
    if not max_diff <= limits.qform_sform_tol_mm:  # also catches NaN
        raise InputError(
            f"{uri!r} has a qform (code {qcode}) and an sform (code {scode}) that disagree by up to "
            f"{max_diff:.4g} mm (tolerance {limits.qform_sform_tol_mm} mm); tools that prefer the qform "
            "would place the segmentation elsewhere than tools that prefer the sform.",
            code=CODE_QFORM_SFORM_MISMATCH,
            hint=_qform_sform_hint(),
            uri=uri,
            max_difference_mm=_json_float(max_diff),
            qform_code=qcode,
            sform_code=scode,
        )


def _json_float(value: float) -> float | None:
    """``value`` as a JSON-safe float (None for NaN/Inf), for error details."""
    value = float(value)
    return value if np.isfinite(value) else None


def _spacing_of(affine: np.ndarray) -> np.ndarray:
    """Voxel edge lengths in mm: column norms of the 3x3 voxel->world block, shape (3,), float64."""
    return np.sqrt(np.sum(np.asarray(affine, dtype=np.float64)[:3, :3] ** 2, axis=0))


def _check_spacing(img: nib.Nifti1Image, affine: np.ndarray, limits: VolumeLimits, *, uri: str) -> None:
    """Raise ``invalid_spacing`` for a zero/non-finite/out-of-range voxel size along any axis."""
    spacing = _spacing_of(affine)
    space_units = img.header.get_xyzt_units()[0]
    units_note = ""
    if space_units not in ("mm", "unknown"):
        units_note = f" The header declares spatial units {space_units!r}; nvseg expects millimetres."
    for axis, value in enumerate(spacing):
        value = float(value)
        if np.isfinite(value) and limits.min_spacing_mm <= value <= limits.max_spacing_mm:
            continue
        if not np.isfinite(value):
            problem = "it must be a finite number"
        elif value == 0:
            problem = "it must be positive (the affine collapses this axis)"
        elif value < limits.min_spacing_mm:
            problem = f"below the minimum of {limits.min_spacing_mm} mm"
        else:
            problem = f"above the maximum of {limits.max_spacing_mm} mm"
        spacing_text = tuple(round(float(s), 6) for s in spacing)
        raise InputError(
            f"{uri!r} has an invalid voxel spacing: along axis {_SPATIAL_AXES[axis]} it is {value:.6g} mm, "
            f"{problem} (spacing {spacing_text} mm from the affine).{units_note}",
            code=CODE_INVALID_SPACING,
            hint="Fix the voxel size in the header (sform/pixdim must be in millimetres) or re-export the "
            "volume from the original DICOM (e.g. `dcm2niix -z y <series_dir>`).",
            uri=uri,
            axis=axis,
            spacing_mm=[_json_float(s) for s in spacing],
        )


def _check_orientation(affine: np.ndarray, limits: VolumeLimits, *, uri: str) -> None:
    """Raise ``non_orthonormal`` unless the unit direction cosines form an orthonormal basis.

    Assumes :func:`_check_spacing` passed (every column of ``affine[:3, :3]`` has a finite non-zero norm).
    """
    affine = np.asarray(affine, dtype=np.float64)
    hint = (
        "The voxel axes must be perpendicular. Re-export the volume with gantry-tilt correction "
        "(dcm2niix corrects tilt by default) or resample it to an orthogonal grid (e.g. with "
        "`ResampleImageFilter` in SimpleITK / 3D Slicer)."
    )
    if not np.all(np.isfinite(affine)):
        rows = [[round(float(v), 4) for v in row] for row in affine[:3]]
        raise InputError(
            f"{uri!r} has NaN/Inf numbers in its voxel-to-world affine (first three rows {rows}).",
            code=CODE_NON_ORTHONORMAL,
            hint="The header's sform/qform is corrupt. Re-export the volume from the original DICOM "
            "(e.g. `dcm2niix -z y <series_dir>`) or rewrite a valid affine with nibabel (`img.set_sform(...)`).",
            uri=uri,
        )
    directions = affine[:3, :3] / _spacing_of(affine)
    deviation = float(np.max(np.abs(directions.T @ directions - np.eye(3))))
    if deviation > limits.orthonormal_tol:
        singular = abs(float(np.linalg.det(directions))) < 1e-6
        what = "is singular (two axes point the same way)" if singular else "has sheared (non-perpendicular) axes"
        raise InputError(
            f"{uri!r} has a voxel-to-world affine that {what}: the direction cosines deviate from "
            f"orthonormal by {deviation:.4g} (tolerance {limits.orthonormal_tol}).",
            code=CODE_NON_ORTHONORMAL,
            hint=hint,
            uri=uri,
            deviation=deviation,
            affine=affine.tolist(),
        )


# ----------------------------------------------------------------------------------------------------------
# MONAI header correction (mirror of monai.data.utils.correct_nifti_header_if_necessary, MONAI 1.6.1)
# ----------------------------------------------------------------------------------------------------------


def _monai_affine_to_spacing(affine: np.ndarray, rank: int) -> np.ndarray:
    """``monai.data.utils.affine_to_spacing(affine, r=rank)``: column norms of ``affine[:rank, :rank]``, 0 -> 1."""
    block = np.asarray(affine, dtype=float)[:rank, :rank]
    spacing = np.sqrt(np.sum(block * block, axis=0))
    spacing[spacing == 0] = 1.0
    return spacing


def _shallow_copy(img: nib.Nifti1Image) -> nib.Nifti1Image:
    """A new image sharing ``img``'s data object, with copies of its header and affine."""
    return img.__class__(img.dataobj, img.affine, img.header, extra=img.extra, file_map=img.file_map)


def _monai_header_correction(img: nib.Nifti1Image) -> nib.Nifti1Image:
    """Return a copy of ``img`` corrected exactly as MONAI's ``NibabelReader.read`` corrects it.

    MONAI compares ``header.get_zooms()[:ndim]`` with the column norms of ``affine[:ndim, :ndim]`` (for
    ndim == 4 that block includes the translation column -- reproduced as is) and, when they differ,
    replaces the sform by the qform (or the qform by the sform) if that one matches the zooms, or else
    overwrites the header zooms. The resulting ``img.affine`` is what MONAI reports as ``meta["affine"]``.
    """
    out = _shallow_copy(img)
    header = out.header
    ndim = int(header["dim"][0])
    if ndim >= 5:
        return out
    zooms = np.asarray(header.get_zooms())[:ndim]
    if np.allclose(zooms, _monai_affine_to_spacing(out.affine, ndim)):
        return out
    sform_ok = np.allclose(_monai_affine_to_spacing(out.get_sform(), ndim), zooms)
    qform_ok = np.allclose(_monai_affine_to_spacing(out.get_qform(), ndim), zooms)
    if header["sform_code"] != 0:
        if sform_ok:
            return out
        if qform_ok:
            out.set_sform(out.get_qform())
            return out
    if header["qform_code"] != 0:
        if qform_ok:
            return out
        if sform_ok:
            out.set_qform(out.get_sform())
            return out
    header.set_zooms(_monai_affine_to_spacing(out.affine, ndim))
    return out


def _corrected_affine(img: nib.Nifti1Image, *, uri: str) -> tuple[nib.Nifti1Image, np.ndarray]:
    """MONAI-corrected copy of ``img`` and its float64 (4, 4) affine; a header MONAI cannot decode is refused."""
    try:
        corrected = _monai_header_correction(img)
    except Exception as exc:  # e.g. an invalid qform quaternion next to a valid sform
        raise InputError(
            f"{uri!r} has a qform that cannot be decoded ({type(exc).__name__}: {exc}) and a pixdim that "
            "does not match its sform, so its geometry is ambiguous.",
            code=CODE_QFORM_SFORM_MISMATCH,
            hint=_qform_sform_hint(),
            uri=uri,
        ) from exc
    return corrected, np.array(corrected.affine, dtype=np.float64, copy=True)


def _check_correction(
    original: np.ndarray, corrected: np.ndarray, img: nib.Nifti1Image, limits: VolumeLimits, *, uri: str
) -> None:
    """Refuse a header that MONAI's correction would move by more than ``qform_sform_tol_mm``."""
    max_diff = float(np.max(np.abs(np.asarray(corrected) - np.asarray(original))))
    if max_diff <= limits.qform_sform_tol_mm:
        return
    zooms = tuple(round(float(z), 6) for z in img.header.get_zooms()[:3])
    sizes = tuple(round(float(s), 6) for s in _spacing_of(original))
    raise InputError(
        f"{uri!r} has an inconsistent header: pixdim {zooms} does not match the voxel sizes {sizes} of its "
        "affine, so MONAI's NIfTI reader (used for inference) would rebuild the affine from the other "
        f"transform (qform/sform) and move the volume by up to {max_diff:.4g} mm "
        f"(tolerance {limits.qform_sform_tol_mm} mm).",
        code=CODE_QFORM_SFORM_MISMATCH,
        hint=_qform_sform_hint(),
        uri=uri,
        max_difference_mm=_json_float(max_diff),
        qform_code=int(img.header["qform_code"]),
        sform_code=int(img.header["sform_code"]),
    )


# ----------------------------------------------------------------------------------------------------------
# Data checks
# ----------------------------------------------------------------------------------------------------------


#: stored dtypes kept as they are: every value is exact in float32, so upstream's float32 cast changes nothing (an
#: int16 CT is then held in 2 bytes per voxel, not 4). Others (int32, float64, ...) are cast to float32 like MONAI.
KEPT_DTYPES = frozenset({"int8", "uint8", "int16", "uint16", "float32"})


def _read_voxels(img: nib.Nifti1Image, *, uri: str) -> np.ndarray:
    """Read voxels like MONAI: ``np.asanyarray(img.dataobj)`` (scaled by nibabel), float32 values.

    The array keeps its stored dtype where that is one of :data:`KEPT_DTYPES` (no scaling: nibabel then returns the
    stored integers) -- the same values as MONAI's float32 cast, held once -- else it is cast to float32. Returns a
    new array of shape ``img.shape`` (any memory order); raises ``truncated_file`` when the data cannot be read.
    """
    try:
        data = np.asanyarray(img.dataobj)
    except (OSError, EOFError, ValueError) as exc:
        raise InputError(
            f"{uri!r} is truncated or damaged: its voxel data cannot be read ({exc}).",
            code=CODE_TRUNCATED_FILE,
            hint="The file was cut short (interrupted download/copy or a full disk). Copy or export it again.",
            uri=uri,
        ) from exc
    if data.dtype.name in KEPT_DTYPES:
        return data
    with np.errstate(over="ignore", invalid="ignore"):  # float32 overflow -> Inf, reported by _check_finite
        return np.asarray(data, dtype=np.float32)


def _check_finite(array: np.ndarray, *, uri: str) -> None:
    """Raise ``non_finite`` if any voxel is NaN or +/-Inf (fast min/max test, exact count on failure)."""
    if array.size == 0 or (np.isfinite(array.min()) and np.isfinite(array.max())):
        return
    n_nan = int(np.count_nonzero(np.isnan(array)))
    n_inf = int(np.count_nonzero(np.isinf(array)))
    raise InputError(
        f"{uri!r} has {n_nan + n_inf:,} non-finite voxels ({n_nan:,} NaN, {n_inf:,} Inf) out of {array.size:,}.",
        code=CODE_NON_FINITE,
        hint="Replace them before segmenting, e.g. `fslmaths in.nii.gz -nan out.nii.gz` or "
        "`np.nan_to_num(data, nan=-1024)` for CT (Inf can also come from a huge scl_slope overflowing float32).",
        uri=uri,
        n_non_finite=n_nan + n_inf,
        n_nan=n_nan,
        n_inf=n_inf,
    )


def check_model_input(array: np.ndarray, *, uri: str) -> None:
    """Refuse a volume the model cannot be run on: nothing above 0, or a single value everywhere.

    Preprocessing crops to the voxels > 0 and scales by the 1st..99th percentile of what is left: an all-air CT
    (every voxel <= 0 HU, e.g. all -1024) leaves an empty crop, and a constant volume has no contrast to scale.
    Only model inputs are checked (a label map may be all background), so :func:`validate_nifti` does not.

    Args:
        array: (X, Y, Z) voxel values (e.g. :attr:`ValidatedVolume.array`), finite.
        uri: named in the message.

    Raises:
        InputError: ``empty_volume`` or ``constant_volume``.
    """
    low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
    if high <= 0:
        value = f"every voxel is {high:g}" if low == high else f"the values range from {low:g} to {high:g}"
        raise InputError(
            f"{uri!r} has no voxel above 0 ({value}): there is nothing to segment, since preprocessing keeps "
            "the foreground voxels > 0 (soft tissue and denser on CT).",
            code=CODE_EMPTY_VOLUME,
            hint="Check that this is the intended scan: an all-air or blank CT (e.g. every voxel -1024 HU), or an "
            "image whose intensities were shifted below 0, cannot be segmented.",
            uri=uri,
            min_value=low,
            max_value=high,
        )
    if low == high:
        raise InputError(
            f"{uri!r} is constant (every voxel is {high:g}): it has no contrast, so intensity scaling and "
            "segmentation are undefined.",
            code=CODE_CONSTANT_VOLUME,
            hint="Check that this is the intended scan and that it was exported with its voxel data (not a blank "
            "placeholder or a mask).",
            uri=uri,
            value=high,
        )


def _point_hint() -> str:
    return ("Give points as voxel indices 'i,j,k' of the input image (e.g. --points 120,95,40), each inside its "
            "shape, with one label per point: 1 (positive) or 0 (negative).")


def check_point_prompts(points: Sequence[Sequence[float]] | None, point_labels: Sequence[Any] | None, *,
                        shape: tuple[int, ...] | None = None, uri: str | None = None) -> None:
    """Refuse point prompts that cannot be clicks on the volume, before anything is computed.

    Args:
        points: (N, 3) voxel coordinates (i, j, k) of the INPUT image, or None.
        point_labels: N labels, 1 positive / 0 negative (None: all positive).
        shape: the input volume's (X, Y, Z); when given, every coordinate must lie in ``0 .. size - 1`` of its
            axis (the voxel index range).
        uri: the volume, named in the message.

    Raises:
        PromptError: ``invalid_prompt`` naming the point, the shape and the valid range: NaN/Inf or
            out-of-range coordinates, a point without 3 coordinates, labels that are not the integers 0/1
            (booleans and floats included), labels without points, or a label count that differs.
    """
    where = f" of {uri!r}" if uri else ""
    if points is None:
        if point_labels is not None:
            raise PromptError("point_labels were given without points", hint=_point_hint())
        return
    points = list(points)
    if not points:
        raise PromptError("points is an empty list", hint=_point_hint())
    labels = list(point_labels) if point_labels is not None else [1] * len(points)
    if len(labels) != len(points):
        raise PromptError(f"{len(points)} points but {len(labels)} point labels", hint=_point_hint())
    for label in labels:
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or int(label) not in (0, 1):
            raise PromptError(f"point labels must be the integers 1 (positive) or 0 (negative), got {label!r}",
                              hint=_point_hint(), point_labels=[repr(v) for v in labels])
    for point in points:
        coords = list(point)
        if len(coords) != 3 or any(isinstance(v, bool) or not isinstance(v, (int, float, np.number)) for v in coords):
            raise PromptError(f"a point needs 3 numeric voxel coordinates (i, j, k), got {coords!r}", hint=_point_hint())
        values = np.asarray(coords, dtype=np.float64)
        if not np.all(np.isfinite(values)):
            raise PromptError(f"point {coords!r}{where} has a NaN/Inf coordinate", hint=_point_hint(),
                              point=[repr(v) for v in coords])
        if shape is not None:
            upper = np.asarray(shape[:3], dtype=np.float64) - 1
            outside = [axis for axis in range(3) if not 0 <= values[axis] <= upper[axis]]
            if outside:
                ranges = ", ".join(f"{name.split()[0]} 0..{int(top)}" for name, top in zip(_SPATIAL_AXES, upper))
                raise PromptError(
                    f"point {tuple(_json_float(v) for v in values)} lies outside the volume{where}: its shape is "
                    f"{tuple(int(n) for n in shape[:3])}, so the valid voxel coordinates are {ranges} "
                    f"(axis {', '.join(_SPATIAL_AXES[a] for a in outside)} out of range)",
                    hint=_point_hint(),
                    point=[_json_float(v) for v in values],
                    shape=[int(n) for n in shape[:3]],
                )


def _output_image(corrected: nib.Nifti1Image, array: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    """3-D image holding ``array`` (its dtype, no scaling) with ``corrected``'s header and ``affine``."""
    header = corrected.header.copy()
    header.set_data_dtype(array.dtype)
    return corrected.__class__(array, affine, header)


# ----------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------


def validate_nifti(img: nib.Nifti1Image, *, uri: str, limits: VolumeLimits = VolumeLimits()) -> ValidatedVolume:
    """Check a NIfTI image and return its voxels and voxel->RAS+ world affine.

    Header checks (nothing read): ``multi_volume``, ``not_3d``, ``unsupported_dtype``, ``too_large``,
    ``truncated_file`` (stored bytes < declared), ``qform_sform_mismatch``, ``invalid_spacing``,
    ``non_orthonormal``. Data checks: ``truncated_file`` (read failure), ``non_finite``.

    Args:
        img: a nibabel NIfTI-1/2 image, typically lazy (from :func:`nvseg_ray.io.read_nifti`); not modified.
        uri: the image's location, named in error messages.
        limits: thresholds; see :class:`VolumeLimits`.

    Returns:
        :class:`ValidatedVolume` with ``array`` (X, Y, Z) (stored dtype or float32, see :class:`ValidatedVolume`)
        and ``affine`` float64 (4, 4), equal to MONAI 1.6 ``LoadImage(reader="NibabelReader", dtype=np.float32)``
        (a 4-D t=1 input is squeezed).

    Raises:
        InputError: with ``code`` in :data:`ERROR_CODES`.
    """
    spatial = _check_shape(tuple(int(n) for n in img.shape), uri=uri)
    source_dtype = _check_dtype(img, uri=uri)
    _check_size(spatial, limits, uri=uri)
    _check_stored_bytes(img, uri=uri)
    _check_qform_sform(img.header, limits, uri=uri)
    _check_spacing(img, img.affine, limits, uri=uri)
    _check_orientation(img.affine, limits, uri=uri)
    corrected, affine = _corrected_affine(img, uri=uri)
    _check_correction(img.affine, affine, img, limits, uri=uri)

    array = _read_voxels(corrected, uri=uri)
    if array.ndim == 4:
        array = np.ascontiguousarray(array[..., 0])
    if array.dtype.kind == "f":
        _check_finite(array, uri=uri)
    spacing = tuple(float(s) for s in _spacing_of(affine))
    return ValidatedVolume(
        image=_output_image(corrected, array, affine),
        array=array,
        affine=affine,
        spacing=spacing,  # type: ignore[arg-type]
        shape=spatial,
        uri=uri,
        source_dtype=source_dtype.name,
    )


def read_and_validate(
    uri: str | os.PathLike[str],
    storage_options: Mapping[str, Any] | None = None,
    limits: VolumeLimits = VolumeLimits(),
) -> ValidatedVolume:
    """:func:`nvseg_ray.io.read_nifti` then :func:`validate_nifti` (local path or fsspec URI).

    ``limits.max_voxels`` also bounds decompression: a header declaring more voxels (all axes) is refused
    with ``too_large`` before its data is inflated.
    """
    uri = os.fspath(uri)
    return validate_nifti(read_nifti(uri, storage_options, max_voxels=limits.max_voxels), uri=uri, limits=limits)
