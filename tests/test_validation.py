"""nvseg_ray.validation: one table case per error code, 4-D squeeze, and exact MONAI LoadImage parity."""

from __future__ import annotations

import dataclasses
import gzip
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from nvseg_ray import io as nio
from nvseg_ray import validation as val
from nvseg_ray.errors import ConfigError, InputError
from nvseg_ray.synthetic import tissue_phantom

from .helpers import CT_AFFINE, make_nifti, nifti_bytes, write_nifti_file

URI = "s3://bucket/cases/case_001.nii.gz"


def _rotation_z(degrees: float) -> np.ndarray:
    t = np.deg2rad(degrees)
    rot = np.eye(4)
    rot[:2, :2] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    return rot


def _scaled_columns(affine: np.ndarray, factors: tuple[float, float, float]) -> np.ndarray:
    out = affine.copy()
    out[:3, :3] = out[:3, :3] * np.asarray(factors)
    return out


def _with_voxels(shape: tuple[int, ...], **voxels: float) -> np.ndarray:
    """Phantom data with specific voxels overwritten, e.g. ``_with_voxels(s, nan=2, inf=1)``."""
    data = tissue_phantom(shape).astype(np.float32)
    flat = data.reshape(-1)
    n_nan, n_inf = voxels.get("nan", 0), voxels.get("inf", 0)
    flat[:n_nan] = np.nan
    if n_inf:
        flat[-n_inf:] = np.inf
    return data


def _truncated_in_memory(tmp_path: Path) -> nib.Nifti1Image:
    return nib.Nifti1Image.from_bytes(nifti_bytes(make_nifti((10, 9, 8), dtype=np.int16))[:-100])


def _truncated_on_disk(tmp_path: Path) -> nib.Nifti1Image:
    path = tmp_path / "cut.nii"
    path.write_bytes(nifti_bytes(make_nifti((10, 9, 8), dtype=np.int16))[:-100])
    return nib.load(path)


def _truncated_gz_on_disk(tmp_path: Path) -> nib.Nifti1Image:
    path = tmp_path / "cut.nii.gz"
    path.write_bytes(nifti_bytes(make_nifti((10, 9, 8), dtype=np.int16), gz=True)[:-60])
    return nib.load(path)


SHEAR = CT_AFFINE @ np.array([[1, 0.3, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
SINGULAR = np.array([[1.0, 1.0, 0, 0], [0, 0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
NAN_ORIGIN = CT_AFFINE + np.array([[0, 0, 0, np.nan], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
SHIFTED_5MM = CT_AFFINE + np.array([[0, 0, 0, 5.0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])

# (id, builder(tmp_path) -> image or raw bytes, limits overrides, expected code, fragment of the message)
Case = tuple[str, Callable[[Path], Any], dict[str, Any], str, str]
BAD_VOLUMES: list[Case] = [
    ("unreadable_random_bytes", lambda p: np.random.default_rng(0).bytes(2048), {}, val.CODE_UNREADABLE_FILE, "NIfTI"),
    ("truncated_in_memory", _truncated_in_memory, {}, val.CODE_TRUNCATED_FILE, "holds only"),
    ("truncated_nii_on_disk", _truncated_on_disk, {}, val.CODE_TRUNCATED_FILE, "holds only"),
    ("truncated_nii_gz_on_disk", _truncated_gz_on_disk, {}, val.CODE_TRUNCATED_FILE, "truncated"),
    ("not_3d_2d", lambda p: make_nifti((16, 16), data=np.zeros((16, 16), np.float32)), {}, val.CODE_NOT_3D, "(16, 16)"),
    ("not_3d_single_slice", lambda p: make_nifti((16, 16, 1)), {}, val.CODE_NOT_3D, "single slice"),
    ("not_3d_4d_single_slice", lambda p: make_nifti((16, 1, 16, 1)), {}, val.CODE_NOT_3D, "(16, 1, 16, 1)"),
    ("multi_volume_4d", lambda p: make_nifti((8, 8, 8, 3)), {}, val.CODE_MULTI_VOLUME, "holds 3 volumes"),
    ("multi_volume_5d", lambda p: make_nifti((8, 8, 8, 1, 2)), {}, val.CODE_MULTI_VOLUME, "5-D"),
    ("dtype_complex", lambda p: make_nifti((8, 8, 8), dtype=np.complex64), {}, val.CODE_UNSUPPORTED_DTYPE, "complex"),
    (
        "dtype_rgb",
        lambda p: make_nifti((8, 8, 8), dtype=np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])),
        {},
        val.CODE_UNSUPPORTED_DTYPE,
        "RGB",
    ),
    ("non_finite_nan_inf", lambda p: make_nifti((8, 8, 8), data=_with_voxels((8, 8, 8), nan=2, inf=1)), {},
     val.CODE_NON_FINITE, "3 non-finite voxels (2 NaN, 1 Inf)"),
    ("non_finite_slope_overflow", lambda p: make_nifti((8, 8, 8), dtype=np.int16, scl_slope=1e38), {},
     val.CODE_NON_FINITE, "Inf"),
    ("spacing_zero", lambda p: make_nifti((8, 8, 8), affine=np.diag([1.0, 1.0, 0.0, 1.0]), qform=False), {},
     val.CODE_INVALID_SPACING, "along axis k (z) it is 0 mm, it must be positive"),
    ("spacing_nan", lambda p: make_nifti((8, 8, 8), affine=np.diag([1.0, np.nan, 1.0, 1.0]), qform=False), {},
     val.CODE_INVALID_SPACING, "axis j (y)"),
    ("spacing_too_small_metres", lambda p: make_nifti((8, 8, 8), affine=np.diag([0.0008, 0.0008, 0.0025, 1])), {},
     val.CODE_INVALID_SPACING, "below the minimum"),
    ("spacing_too_large", lambda p: make_nifti((8, 8, 8), affine=np.diag([1.0, 1.0, 80.0, 1.0])), {},
     val.CODE_INVALID_SPACING, "above the maximum of 50.0 mm"),
    ("non_orthonormal_shear", lambda p: make_nifti((8, 8, 8), affine=SHEAR, qform=False), {},
     val.CODE_NON_ORTHONORMAL, "sheared"),
    ("non_orthonormal_singular", lambda p: make_nifti((8, 8, 8), affine=SINGULAR, qform=False), {},
     val.CODE_NON_ORTHONORMAL, "singular"),
    ("non_orthonormal_nan_translation", lambda p: make_nifti((8, 8, 8), affine=NAN_ORIGIN, qform=False), {},
     val.CODE_NON_ORTHONORMAL, "NaN/Inf"),
    ("qform_sform_mismatch", lambda p: make_nifti((8, 8, 8), qform=SHIFTED_5MM, sform=True), {},
     val.CODE_QFORM_SFORM_MISMATCH, "disagree by up to 5 mm"),
    (
        # sform code>0, qform code 0, pixdim (1,1,1) disagreeing with the sform voxel sizes: MONAI's reader
        # would silently swap in the qform (moving the volume) -- refused instead.
        "qform_fallback_would_move_volume",
        lambda p: make_nifti((8, 8, 8), qform=False, zooms=(1.0, 1.0, 1.0)),
        {},
        val.CODE_QFORM_SFORM_MISMATCH,
        "inconsistent header",
    ),
    ("too_large", lambda p: make_nifti((16, 12, 10)), {"max_voxels": 1000}, val.CODE_TOO_LARGE, "1,920 voxels"),
    ("trailing_data_gz", lambda p: gzip.compress(nifti_bytes(make_nifti((8, 8, 8), dtype=np.int16)) + bytes(2**20)),
     {}, val.CODE_TRAILING_DATA, "trailing data"),
]

# model inputs only (val.check_model_input): (id, voxel values, expected code, fragment of the message)
MODEL_INPUT_CASES = [
    ("empty_all_air", np.full((8, 8, 8), -1024.0, np.float32), val.CODE_EMPTY_VOLUME, "every voxel is -1024"),
    ("empty_all_zero", np.zeros((8, 8, 8), np.float32), val.CODE_EMPTY_VOLUME, "no voxel above 0"),
    ("empty_negative_range", np.linspace(-1000, -1, 512, dtype=np.float32).reshape(8, 8, 8), val.CODE_EMPTY_VOLUME,
     "from -1000 to -1"),
    ("constant_positive", np.full((8, 8, 8), 40.0, np.float32), val.CODE_CONSTANT_VOLUME, "every voxel is 40"),
]


@pytest.mark.parametrize(("name", "array", "code", "fragment"), MODEL_INPUT_CASES, ids=[c[0] for c in MODEL_INPUT_CASES])
def test_unusable_model_input_is_refused(name: str, array: np.ndarray, code: str, fragment: str) -> None:
    vol = val.validate_nifti(make_nifti(array.shape, data=array), uri=URI)  # a valid file (label maps may be empty)
    with pytest.raises(InputError) as info:
        val.check_model_input(vol.array, uri=URI)
    assert info.value.code == code and fragment in info.value.message and info.value.hint
    assert json.loads(json.dumps(info.value.to_dict(), allow_nan=False))["code"] == code


def test_model_input_with_foreground_passes() -> None:
    val.check_model_input(val.validate_nifti(make_nifti((8, 8, 8)), uri=URI).array, uri=URI)


def test_table_covers_every_error_code() -> None:
    codes = {value for name, value in vars(val).items() if name.startswith("CODE_")}
    assert codes == set(val.ERROR_CODES)
    assert {case[3] for case in BAD_VOLUMES} | {case[2] for case in MODEL_INPUT_CASES} == set(val.ERROR_CODES)


@pytest.mark.parametrize(("name", "build", "limits", "code", "fragment"), BAD_VOLUMES, ids=[c[0] for c in BAD_VOLUMES])
def test_bad_volume_is_refused(
    name: str, build: Callable[[Path], Any], limits: dict[str, Any], code: str, fragment: str, tmp_path: Path
) -> None:
    built = build(tmp_path)
    with pytest.raises(InputError) as info:
        if isinstance(built, bytes):
            path = tmp_path / "case_001.nii.gz"
            path.write_bytes(built)
            uri = str(path)
            val.read_and_validate(uri, limits=val.VolumeLimits(**limits))
        else:
            uri = URI
            val.validate_nifti(built, uri=uri, limits=val.VolumeLimits(**limits))
    err = info.value
    assert err.code == code, str(err)
    assert fragment in err.message, err.message
    assert repr(uri) in err.message and err.hint
    payload = json.loads(json.dumps(err.to_dict(), allow_nan=False))  # strict JSON for HTTP bodies / manifests
    assert payload["code"] == code and payload["uri"] == uri
    assert err.exit_code == 3


def test_too_large_names_the_option() -> None:
    with pytest.raises(InputError) as info:
        val.validate_nifti(make_nifti((16, 12, 10)), uri=URI, limits=val.VolumeLimits(max_voxels=1000))
    assert "--max-voxels" in info.value.hint
    assert info.value.details["n_voxels"] == 1920 and info.value.details["max_voxels"] == 1000


def test_header_checks_do_not_read_voxels(monkeypatch: pytest.MonkeyPatch) -> None:
    img = make_nifti((16, 12, 10))
    monkeypatch.setattr(val, "_read_voxels", lambda *a, **k: pytest.fail("voxel data was read"))
    with pytest.raises(InputError, match="above the limit"):
        val.validate_nifti(img, uri=URI, limits=val.VolumeLimits(max_voxels=10))


# --------------------------------------------------------------------------------------------------------
# Accepted volumes
# --------------------------------------------------------------------------------------------------------


def test_accepts_4d_singleton_and_squeezes() -> None:
    img = make_nifti((10, 9, 8, 1), dtype=np.int16)
    vol = val.validate_nifti(img, uri=URI)
    assert vol.shape == (10, 9, 8) and vol.array.shape == (10, 9, 8)
    assert vol.image.shape == (10, 9, 8) and vol.image.header["dim"][0] == 3
    np.testing.assert_array_equal(vol.array, np.asanyarray(img.dataobj)[..., 0].astype(np.float32))
    np.testing.assert_array_equal(vol.affine, img.affine)


def test_validated_volume_fields() -> None:
    img = make_nifti((10, 9, 8), dtype=np.int16, scl_slope=2.0, scl_inter=-1024.0)
    vol = val.validate_nifti(img, uri=URI)
    assert vol.uri == URI and vol.source_dtype == "int16"
    assert vol.array.dtype == np.float32 and vol.array.shape == (10, 9, 8)  # scaled (scl_slope): float32
    assert vol.affine.dtype == np.float64 and vol.affine.shape == (4, 4)
    np.testing.assert_allclose(vol.spacing, (0.8, 0.8, 2.5), rtol=1e-6)
    assert all(isinstance(s, float) for s in vol.spacing)
    stored = np.asanyarray(img.dataobj.get_unscaled()).astype(np.float64)
    np.testing.assert_array_equal(vol.array, (stored * 2.0 - 1024.0).astype(np.float32))
    # the output image carries the float32 array (no scaling) and the source geometry + codes
    assert vol.image.get_data_dtype() == np.float32 and vol.image.dataobj is vol.array
    np.testing.assert_array_equal(vol.image.affine, vol.affine)
    assert int(vol.image.header["qform_code"]) == 1 and int(vol.image.header["sform_code"]) == 1
    roundtrip = nio.decode_nifti(nio.encode_nifti(vol.image), uri="mem://x.nii.gz")
    np.testing.assert_array_equal(np.asanyarray(roundtrip.dataobj), vol.array)


def test_validation_does_not_modify_the_input_image() -> None:
    sform = _scaled_columns(CT_AFFINE, (1 + 2e-5, 1.0, 1.0))  # pixdim mismatch -> MONAI swaps in the qform
    img = make_nifti((8, 8, 8), sform=sform)
    before = img.header.binaryblock, img.affine.copy()
    vol = val.validate_nifti(img, uri=URI)
    assert img.header.binaryblock == before[0]
    np.testing.assert_array_equal(img.affine, before[1])
    assert not np.array_equal(vol.affine, img.affine)  # the qform replaced the sform, as MONAI does


@pytest.mark.parametrize(
    "kwargs",
    [{"max_voxels": 0}, {"min_spacing_mm": 0.0}, {"min_spacing_mm": 5.0, "max_spacing_mm": 1.0},
     {"orthonormal_tol": 0.0}, {"qform_sform_tol_mm": -1.0}],
)
def test_volume_limits_reject_nonsense(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        val.VolumeLimits(**kwargs)


def test_volume_limits_defaults() -> None:
    limits = val.VolumeLimits()
    assert limits.max_voxels == val.DEFAULT_MAX_VOXELS == 536_870_912
    assert dataclasses.is_dataclass(limits)
    with pytest.raises(dataclasses.FrozenInstanceError):
        limits.max_voxels = 1  # type: ignore[misc]


def test_read_and_validate_from_s3(s3_env: dict[str, Any], s3_bucket: str) -> None:
    img = make_nifti((10, 9, 8), dtype=np.int16, scl_slope=2.0, scl_inter=-1024.0)
    uri = f"s3://{s3_bucket}/ct/case.nii.gz"
    nio.write_bytes_atomic(nifti_bytes(img, gz=True), uri)
    vol = val.read_and_validate(uri)
    assert vol.uri == uri and vol.shape == (10, 9, 8)
    np.testing.assert_array_equal(vol.array, np.asanyarray(img.dataobj).astype(np.float32))


# --------------------------------------------------------------------------------------------------------
# MONAI LoadImage parity (other modules rely on this being exact)
# --------------------------------------------------------------------------------------------------------

PARITY_CASES: dict[str, Callable[[], nib.Nifti1Image]] = {
    "float32": lambda: make_nifti((12, 10, 8)),
    "int16_slope2_inter-1024": lambda: make_nifti((12, 10, 8), dtype=np.int16, scl_slope=2.0, scl_inter=-1024.0),
    "int16_fractional_slope": lambda: make_nifti((12, 10, 8), dtype=np.int16, scl_slope=0.37, scl_inter=-3.3),
    "uint8": lambda: make_nifti((12, 10, 8), dtype=np.uint8),
    "float64": lambda: make_nifti((12, 10, 8), dtype=np.float64),
    "4d_t1": lambda: make_nifti((12, 10, 8, 1), dtype=np.int16, scl_slope=2.0, scl_inter=-1024.0),
    "oblique": lambda: make_nifti((12, 10, 8), affine=_rotation_z(25.0) @ CT_AFFINE),
    "sform_only": lambda: make_nifti((12, 10, 8), qform=False),
    "qform_only": lambda: make_nifti((12, 10, 8), sform=False),
    "no_transform": lambda: make_nifti((12, 10, 8), qform=False, sform=False),
    # pixdim disagrees with the sform within tolerance: MONAI replaces the sform by the qform
    "monai_header_correction": lambda: make_nifti((12, 10, 8), sform=_scaled_columns(CT_AFFINE, (1 + 2e-5, 1, 1))),
    "nifti2": lambda: make_nifti((12, 10, 8), dtype=np.int16, scl_slope=2.0, scl_inter=-1024.0, nifti2=True),
}


@pytest.fixture(scope="module")
def monai_load_image() -> Any:
    transforms = pytest.importorskip("monai.transforms")
    return transforms.LoadImage(image_only=True, dtype=np.float32)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_matches_monai_load_image(case: str, suffix: str, tmp_path: Path, monai_load_image: Any) -> None:
    path = write_nifti_file(str(tmp_path / f"vol{suffix}"), PARITY_CASES[case]())

    expected = monai_load_image(path)
    vol = val.read_and_validate(path)

    monai_array = np.asarray(expected)
    if case == "4d_t1":
        assert monai_array.shape[-1] == 1
        monai_array = monai_array[..., 0]
    assert monai_array.dtype == np.float32
    # held in the stored dtype where every value is exact in float32 (no scaling), else float32 like MONAI
    assert vol.array.dtype.name in val.KEPT_DTYPES and vol.array.dtype in (np.dtype(vol.source_dtype), np.float32)
    np.testing.assert_array_equal(vol.array.astype(np.float32), monai_array, strict=True)  # the same values
    monai_affine = np.asarray(expected.affine)
    assert monai_affine.dtype == vol.affine.dtype == np.float64
    np.testing.assert_array_equal(vol.affine, monai_affine, strict=True)
