"""Inversion to the input grid equals MONAI's Invertd (the upstream path) voxel for voxel."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import nvseg_ray.postprocess as post
from nvseg_ray.config import InferenceConfig
from nvseg_ray.errors import ConfigError
from nvseg_ray.preprocess import build_preprocessing, prepare


def _rotation(axis: int, deg: float) -> np.ndarray:
    a = np.deg2rad(deg)
    i, j = [k for k in range(3) if k != axis]
    rot = np.eye(3)
    rot[i, i], rot[i, j], rot[j, i], rot[j, j] = np.cos(a), -np.sin(a), np.sin(a), np.cos(a)
    return rot


LINEAR = {
    "RAS": np.diag([1.2, 1.2, 2.5]),
    "LPS": np.diag([-0.9, -0.9, 3.0]),
    "LAS-half-spacing": np.diag([-0.75, 0.75, 1.5]),  # exact 2:1 ratio -> .5 ties everywhere on two axes
    "permuted": np.array([[0, 0, 1.7], [-1.4, 0, 0], [0, -1.6, 0]]),
    "already-1.5mm": np.diag([1.5, 1.5, 1.5]),
    "coarse-3mm": np.diag([3.0, 3.0, 3.0]),
    "oblique-z": _rotation(2, 17) @ np.diag([1.0, 1.1, 2.2]),
    "oblique-xy-ties": _rotation(0, 33) @ _rotation(1, 10) @ np.diag([0.75, 0.75, 1.5]),
}


@pytest.mark.parametrize("name", list(LINEAR))
@pytest.mark.parametrize("seed", [0, 1])
def test_inversion_equals_monai_invertd(name, seed):
    rng = np.random.default_rng(seed)
    affine = np.eye(4)
    affine[:3, :3] = LINEAR[name]
    affine[:3, 3] = rng.normal(0, 40, 3)
    shape = tuple(int(s) for s in rng.integers(17, 61, 3))
    volume = rng.normal(50, 100, shape).astype(np.float32)
    cfg = InferenceConfig(patch_size=(48, 48, 32))
    transforms = build_preprocessing(cfg)
    prepared = prepare(volume, affine, cfg, transforms)
    labels = torch.as_tensor(rng.integers(0, 9, prepared.model_shape))
    fast = post.invert_labels(labels, prepared, transforms)
    reference = post._monai_invert(labels, prepared, transforms)
    assert fast.shape == shape
    np.testing.assert_array_equal(fast, reference)
    # another instance of the same chain (another process, replica or Ray stage) inverts identically
    other = build_preprocessing(cfg)
    np.testing.assert_array_equal(post.invert_labels(labels, prepared, other), reference)
    np.testing.assert_array_equal(post._monai_invert(labels, prepared, other), reference)


@pytest.mark.parametrize("name,expect_fast", [("RAS", True), ("permuted", True), ("LAS-half-spacing", True),
                                              ("oblique-z", True), ("oblique-xy-ties", False)])
def test_fast_path_taken_where_exact(name, expect_fast, monkeypatch):
    calls = []
    monkeypatch.setattr(post, "_monai_invert", lambda *a: calls.append(1) or np.zeros((20, 21, 22), np.int32))
    affine = np.eye(4)
    affine[:3, :3] = LINEAR[name]
    cfg = InferenceConfig(patch_size=(48, 48, 32))
    transforms = build_preprocessing(cfg)
    prepared = prepare(np.random.default_rng(0).normal(size=(20, 21, 22)).astype(np.float32), affine, cfg, transforms)
    post.invert_labels(torch.zeros(prepared.model_shape, dtype=torch.int64), prepared, transforms)
    assert (not calls) == expect_fast


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
