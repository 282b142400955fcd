"""The model grid (values, affine) equals upstream's MONAI chain, and inversion equals its Invertd, on a geometry table.

The judge is :func:`nvseg_ray.upstream.upstream_model_grid_chain` (MONAI's Spacingd, CropForegroundd,
ScaleIntensityRangePercentilesd, Orientationd, CastToTyped) and MONAI's ``Invertd`` with nearest interpolation.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Invertd

import nvseg_ray.postprocess as post
from nvseg_ray.config import InferenceConfig
from nvseg_ray.errors import ConfigError, InputError
from nvseg_ray.preprocess import prepare, to_meta_tensor
from nvseg_ray.upstream import upstream_model_grid_chain


def _rotation(axis: int, deg: float) -> np.ndarray:
    a = np.deg2rad(deg)
    i, j = [k for k in range(3) if k != axis]
    rot = np.eye(3)
    rot[i, i], rot[i, j], rot[j, i], rot[j, j] = np.cos(a), -np.sin(a), np.sin(a), np.cos(a)
    return rot


#: affine columns (direction x spacing) of the geometry table
LINEAR = {
    "RAS": np.diag([1.2, 1.2, 2.5]),
    "LPS": np.diag([-0.9, -0.9, 3.0]),
    "LAS-half-spacing": np.diag([-0.75, 0.75, 1.5]),  # exact 2:1 ratio -> .5 ties everywhere on two axes
    "permuted": np.array([[0, 0, 1.7], [-1.4, 0, 0], [0, -1.6, 0]]),
    "already-1.5mm": np.diag([1.5, 1.5, 1.5]),  # MONAI skips resampling
    "near-1.5mm": np.diag([1.5004, 0.8, 1.4995]),  # spacings within MONAI's 1e-3 of the target are kept
    "coarse-3mm": np.diag([3.0, 3.0, 3.0]),  # upsampling
    "oblique-z": _rotation(2, 17) @ np.diag([1.0, 1.1, 2.2]),
    "oblique-xy-ties": _rotation(0, 33) @ _rotation(1, 10) @ np.diag([0.75, 0.75, 1.5]),
    "sheared": np.array([[0.8, 0.0, 0.0], [0.0, 0.8, 0.35], [0.0, 0.0, 2.0]]),  # gantry tilt as shear: MONAI path
}
#: (shape, dtype, values): odd and small shapes, stored int16 CT and float MR-like values
VOLUMES = {
    "float-small": ((17, 23, 19), np.float32, "normal"),
    "int16-ct": ((41, 36, 29), np.int16, "ct"),
    "float-odd": ((60, 17, 31), np.float32, "normal"),
}


def _volume(shape, dtype, kind, rng):
    if kind == "ct":  # air outside an elliptic body, soft tissue and bone inside: a real foreground box
        x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
        body = (x / 0.7) ** 2 + (y / 0.55) ** 2 < 1
        ct = np.where(body, rng.normal(40, 60, shape), -1000 + rng.normal(0, 5, shape))
        return np.rint(ct).astype(dtype)
    return rng.normal(50, 100, shape).astype(dtype)


def _affine(name, rng):
    affine = np.eye(4)
    affine[:3, :3] = LINEAR[name]
    affine[:3, 3] = rng.normal(0, 40, 3)
    return affine


def _reference(volume, affine, cfg):
    chain = upstream_model_grid_chain(cfg)
    return chain, chain({"image": to_meta_tensor(volume, affine)})["image"]


def _monai_inverted(labels, reference, chain):
    pred = MetaTensor(torch.as_tensor(labels, dtype=torch.float32)[None], meta=dict(reference.meta),
                      applied_operations=list(reference.applied_operations))
    out = Invertd("pred", transform=chain, orig_keys="image", nearest_interp=True, to_tensor=True)(
        {"pred": pred, "image": reference})["pred"]
    return np.rint(out.numpy()[0]).astype(np.int64)


@pytest.mark.parametrize("volume_kind", list(VOLUMES))
@pytest.mark.parametrize("name", list(LINEAR))
def test_model_grid_and_inversion_equal_monai(name, volume_kind):
    rng = np.random.default_rng(zlib.crc32(f"{name}/{volume_kind}".encode()))
    shape, dtype, kind = VOLUMES[volume_kind]
    volume, affine = _volume(shape, dtype, kind, rng), _affine(name, rng)
    cfg = InferenceConfig(patch_size=(48, 48, 32))
    chain, reference = _reference(volume, affine, cfg)
    prepared = prepare(volume, affine, cfg)

    ours = prepared.image.as_tensor().numpy()
    theirs = reference.as_tensor().numpy()
    assert ours.shape == theirs.shape and ours.dtype == np.float32
    np.testing.assert_array_equal(prepared.image.affine.numpy(), reference.affine.numpy())
    # equal up to float rounding: MONAI's float64 grid carries ~1e-16 noise in its interpolation weights, which
    # decides the float32 rounding of values that sit on a rounding midpoint (common with 1/4, 1/2 weights)
    assert np.abs(ours - theirs).max() <= 1e-6
    assert np.mean(ours == theirs) >= 0.9

    labels = rng.integers(0, 9, prepared.model_shape).astype(np.uint8)
    inverted = post.invert_labels(labels, prepared)
    assert inverted.shape == shape and inverted.dtype == np.uint16
    np.testing.assert_array_equal(inverted, _monai_inverted(labels, reference, chain))
    # the record alone (what crosses Ray stages) inverts identically; torch input and other dtypes too
    _, record = prepared.split()
    np.testing.assert_array_equal(post.invert_labels(torch.as_tensor(labels.astype(np.int16)), record, "float32"),
                                  inverted)


def test_large_volume_uses_numpy_percentile_and_equals_monai():
    """Above 10^6 cropped voxels MONAI's percentile switches from torch.quantile to np.percentile."""
    rng = np.random.default_rng(7)
    volume = _volume((160, 150, 120), np.int16, "ct", rng)
    affine = _affine("LAS-half-spacing", rng)
    affine[:3, :3] = np.diag([-1.4, 1.4, 1.4])
    cfg = InferenceConfig()
    _, reference = _reference(volume, affine, cfg)
    prepared = prepare(volume, affine, cfg)
    assert int(np.prod(prepared.model_shape)) > 1_000_000
    np.testing.assert_array_equal(prepared.image.affine.numpy(), reference.affine.numpy())
    ours, theirs = prepared.image.as_tensor().numpy(), reference.as_tensor().numpy()
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() <= 1e-6 and np.mean(ours == theirs) >= 0.9


@pytest.mark.parametrize("name,expect_fast", [("RAS", True), ("permuted", True), ("LAS-half-spacing", True),
                                              ("oblique-z", True), ("oblique-xy-ties", False)])
def test_fast_inversion_taken_where_exact(name, expect_fast, monkeypatch):
    calls = []
    real = post._monai_nearest
    monkeypatch.setattr(post, "_monai_nearest", lambda *a: calls.append(1) or real(*a))
    affine = np.eye(4)
    affine[:3, :3] = LINEAR[name]
    cfg = InferenceConfig(patch_size=(48, 48, 32))
    prepared = prepare(np.random.default_rng(0).normal(size=(20, 21, 22)).astype(np.float32), affine, cfg)
    post.invert_labels(np.zeros(prepared.model_shape, dtype=np.uint8), prepared)
    assert (not calls) == expect_fast


def test_nothing_above_zero_after_resampling_is_empty_volume():
    volume = np.full((30, 30, 30), -5.0, np.float32)
    volume[16, 16, 16] = 1.0  # one bright 0.5 mm voxel between the 1.5 mm samples (every 3rd voxel, from 0)
    affine = np.diag([0.5, 0.5, 0.5, 1.0])
    with pytest.raises(InputError) as info:
        prepare(volume, affine, InferenceConfig())
    assert info.value.code == "empty_volume"


def test_cast_labels_refuses_too_small_dtype():
    with pytest.raises(ConfigError, match="uint8 cannot hold label id 300"):
        post.cast_labels(np.array([0, 300]), "uint8", 300)
    assert post.cast_labels(np.array([0, 300]), "uint16", 300).dtype == np.uint16


def test_label_statistics_volume_from_affine():
    labels = np.zeros((4, 4, 4), np.int32)
    labels[:2] = 3
    labels[3, 3, 3] = 7
    stats = post.label_statistics(labels, np.diag([2.0, 1.0, 0.5, 1.0]), {3: "spleen"})
    assert stats == [{"id": 3, "name": "spleen", "voxels": 32, "volume_ml": 0.032},
                     {"id": 7, "name": "class 7", "voxels": 1, "volume_ml": 0.001}]
