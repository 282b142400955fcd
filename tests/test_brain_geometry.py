"""RAS <-> ITK (LPS) conversions and the nearest-neighbour revert, table-driven over orientations, spacings and
oblique grids (no registration: fast)."""

from __future__ import annotations

import numpy as np
import pytest

from nvseg_ray.brain.images import affine_of, from_sitk, ras_matrix, sitk_affine_transform, to_sitk
from nvseg_ray.brain.phantom import rigid_scale_matrix
from nvseg_ray.brain.revert import template_to_input_grid


def _affine(spacing, rotation_deg=(0, 0, 0), flips=(1, 1, 1), perm=(0, 1, 2), origin=(10.0, -20.0, 30.0)):
    axes = rigid_scale_matrix(rotation_deg)[:3, :3] @ np.diag(spacing)
    axes = axes[:, list(perm)] * np.asarray(flips, float)
    out = np.eye(4)
    out[:3, :3], out[:3, 3] = axes, origin
    return out


GRIDS = {
    "ras-iso": _affine((1.0, 1.0, 1.0)),
    "lps-aniso": _affine((0.8, 0.8, 2.5), flips=(-1, -1, 1)),
    "permuted-flipped": _affine((1.2, 0.9, 3.0), flips=(1, -1, -1), perm=(2, 0, 1)),
    "oblique": _affine((1.1, 1.0, 1.4), rotation_deg=(12, -20, 7)),
}


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_sitk_images_keep_voxels_and_world_geometry(name):
    affine = GRIDS[name]
    array = np.random.default_rng(0).normal(size=(7, 5, 4)).astype(np.float32)
    image = to_sitk(array, affine)
    np.testing.assert_array_equal(from_sitk(image), array)
    np.testing.assert_allclose(affine_of(image), affine, atol=1e-9)
    ijk = (3, 1, 2)
    lps = np.asarray(image.TransformIndexToPhysicalPoint(ijk))
    ras = affine[:3, :3] @ ijk + affine[:3, 3]
    np.testing.assert_allclose(lps, ras * [-1, -1, 1], atol=1e-9)


@pytest.mark.parametrize("rotation,shift,scale", [((0, 0, 0), (0, 0, 0), (1, 1, 1)), ((10, -5, 30), (4, 5, -6), (1.1, 0.9, 1.0))])
def test_itk_transforms_round_trip_as_ras_matrices(rotation, shift, scale):
    matrix = rigid_scale_matrix(rotation, shift, scale, center=(5, -3, 8))
    transform = sitk_affine_transform(matrix)
    np.testing.assert_allclose(ras_matrix(transform), matrix, atol=1e-9)
    point = np.array([12.0, -7.0, 3.0])
    moved_lps = np.asarray(transform.TransformPoint(tuple(point * [-1, -1, 1])))
    np.testing.assert_allclose(moved_lps * [-1, -1, 1], matrix[:3, :3] @ point + matrix[:3, 3], atol=1e-9)


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_revert_is_exact_nearest_neighbour_on_any_input_grid(name):
    """Labels on a 1 mm template grid, mapped through a known transform onto each grid, equal a brute-force
    per-voxel lookup, with the input grid's exact shape and an integer dtype."""
    template_affine = _affine((1.0, 1.0, 1.0), origin=(-20.0, -20.0, -20.0))
    labels = np.random.default_rng(1).integers(0, 346, size=(40, 40, 40)).astype(np.uint16)
    transform = rigid_scale_matrix((5, 0, -8), (2, 1, 0), (1.05, 1, 0.95))
    input_affine = GRIDS[name].copy()
    input_affine[:3, 3] = (-10.0, -12.0, -8.0)
    shape = (9, 11, 7)
    out = template_to_input_grid(labels, template_affine, transform, shape, input_affine)
    assert out.shape == shape and out.dtype == np.uint16
    inv = np.linalg.inv(template_affine) @ np.linalg.inv(transform) @ input_affine
    for ijk in np.ndindex(*shape):
        u = np.rint(inv[:3, :3] @ ijk + inv[:3, 3]).astype(int)
        inside = np.all((u >= 0) & (u < 40))
        assert out[ijk] == (labels[tuple(u)] if inside else 0)
