"""Synthetic T1 heads built from a brain template, for tests, benchmarks and smoke tests.

A head is the template brain (scaled to T1-like intensities) wrapped in a generated skull (dark) and scalp
(bright) shell, moved by a known world transform and resampled onto an arbitrary (anisotropic, oblique) grid,
with an optional smooth multiplicative bias field and noise. Because the transform is known, registration,
skull stripping and the label revert can be checked against the truth.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .images import from_sitk, sitk, sitk_affine_transform, to_sitk
from .template import BrainTemplate

#: T1-like intensities of the shells (the template brain is scaled to ~0..BRAIN_SCALE).
BRAIN_SCALE = 700.0
SKULL_VALUE, SKULL_MM = 40.0, 4.0
SCALP_VALUE, SCALP_MM = 450.0, 5.0


@dataclass(frozen=True)
class SyntheticHead:
    """A generated head scan and its ground truth.

    Attributes:
        array: (X, Y, Z) voxels (float32, or uint8 when requested).
        affine: 4 x 4 voxel -> RAS affine of the head grid.
        brain_mask: (X, Y, Z) bool true brain mask on the head grid.
        template_to_head: the 4 x 4 RAS world transform (template point -> head point) used to build it.
    """

    array: np.ndarray
    affine: np.ndarray
    brain_mask: np.ndarray
    template_to_head: np.ndarray


def rigid_scale_matrix(rotation_deg: Sequence[float] = (0, 0, 0), translation_mm: Sequence[float] = (0, 0, 0),
                       scale: Sequence[float] = (1, 1, 1), center: Sequence[float] = (0, 0, 0)) -> np.ndarray:
    """4 x 4 RAS matrix: scale, then rotate (x, y, z Euler angles, degrees) about ``center``, then translate."""
    ax, ay, az = np.deg2rad(rotation_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    linear = rz @ ry @ rx @ np.diag(scale)
    c = np.asarray(center, float)
    m = np.eye(4)
    m[:3, :3] = linear
    m[:3, 3] = c - linear @ c + np.asarray(translation_mm, float)
    return m


def head_in_template_space(template: BrainTemplate, pad_mm: float = 14.0, neck_mm: float = 0.0
                           ) -> tuple[np.ndarray, np.ndarray]:
    """The template brain plus skull and scalp shells on the template grid padded by ``pad_mm``; with ``neck_mm``
    > 0 also a soft-tissue neck (an elliptic cylinder with a fatty rim) reaching that far below the brain, which
    pulls the head's centre of mass away from the brain's, as real scans do.

    Returns:
        ``(image float32, affine)`` of the padded grid.
    """
    from scipy.ndimage import distance_transform_edt

    spacing = np.linalg.norm(template.affine[:3, :3], axis=0)
    pad = np.ceil(pad_mm / spacing).astype(int)
    below = np.ceil(max(neck_mm, pad_mm) / spacing[2]).astype(int)
    widths = [(p, p) for p in pad[:2]] + [(below, pad[2])]
    image = np.pad(template.image * BRAIN_SCALE, widths)
    mask = np.pad(template.mask, widths)
    affine = template.affine.copy()
    affine[:3, 3] -= affine[:3, :3] @ np.array([pad[0], pad[1], below])
    outside = distance_transform_edt(~mask, sampling=spacing)
    image = np.where(mask, image, 0.0)
    image[(outside > 0) & (outside <= SKULL_MM)] = SKULL_VALUE
    image[(outside > SKULL_MM) & (outside <= SKULL_MM + SCALP_MM)] = SCALP_VALUE
    if neck_mm > 0:  # in voxel units of the (axis-aligned) template grid
        idx = np.array(np.nonzero(mask))
        centre, half = idx.mean(1), (idx.max(1) - idx.min(1)) / 2.0
        i, j = np.ogrid[: image.shape[0], : image.shape[1]]
        r2 = ((i - centre[0]) / (0.35 * half[0])) ** 2 + ((j - centre[1] + 0.2 * half[1]) / (0.35 * half[1])) ** 2
        top = int(centre[2] - 0.4 * half[2])
        neck = np.where(r2 <= 0.8, 300.0, np.where(r2 <= 1.0, SCALP_VALUE, 0.0))[..., None]
        region = image[:, :, :top]
        image[:, :, :top] = np.where(region == 0, neck, region)
    return image.astype(np.float32), affine


def oblique_grid(spacing: Sequence[float], rotation_deg: Sequence[float], bounds_mm: np.ndarray
                 ) -> tuple[tuple[int, int, int], np.ndarray]:
    """A grid with voxel size ``spacing`` and axes rotated by ``rotation_deg`` that covers the (8, 3) corner
    points ``bounds_mm`` (RAS world). Returns ``(shape, affine)``."""
    rotation = rigid_scale_matrix(rotation_deg)[:3, :3]
    axes = rotation * np.asarray(spacing, float)
    local = np.linalg.solve(axes, np.asarray(bounds_mm, float).T).T  # corner coordinates in grid units
    lo, hi = np.floor(local.min(0)), np.ceil(local.max(0))
    affine = np.eye(4)
    affine[:3, :3] = axes
    affine[:3, 3] = axes @ lo
    return tuple(int(n) + 1 for n in hi - lo), affine  # type: ignore[return-value]


def synthetic_head(template: BrainTemplate, template_to_head: np.ndarray, *, spacing: Sequence[float] = (1.2, 1.0, 1.4),
                   grid_rotation_deg: Sequence[float] = (0.0, 0.0, 0.0), bias: float = 0.2, noise: float = 0.01,
                   as_uint8: bool = False, neck_mm: float = 0.0, seed: int = 0) -> SyntheticHead:
    """A head scan made from ``template`` moved by ``template_to_head`` onto an oblique ``spacing`` grid.

    Args:
        bias: amplitude of a smooth multiplicative bias field (0 = none); ``noise``: Gaussian noise, as a
            fraction of :data:`BRAIN_SCALE`.
        as_uint8: store as uint8 (0..255), as many MR exports do.
        neck_mm: add a neck reaching this far below the brain (see :func:`head_in_template_space`).
    """
    itk = sitk()
    head, head_affine = head_in_template_space(template, neck_mm=neck_mm)
    corners = np.array([[i, j, k, 1.0] for i in (0, head.shape[0] - 1) for j in (0, head.shape[1] - 1)
                        for k in (0, head.shape[2] - 1)])
    moved = (template_to_head @ (head_affine @ corners.T)).T[:, :3]
    shape, affine = oblique_grid(spacing, grid_rotation_deg, moved)
    reference = to_sitk(np.zeros(shape, np.uint8), affine, np.uint8)
    inverse = sitk_affine_transform(np.linalg.inv(template_to_head))  # head point -> template point
    array = from_sitk(itk.Resample(to_sitk(head, head_affine), reference, inverse, itk.sitkLinear, 0.0,
                                   itk.sitkFloat32))
    mask = from_sitk(itk.Resample(to_sitk(template.mask.astype(np.uint8), template.affine, np.uint8), reference,
                                  inverse, itk.sitkNearestNeighbor, 0, itk.sitkUInt8)) > 0
    rng = np.random.default_rng(seed)
    if bias:
        grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
        direction = rng.normal(size=3)
        array *= np.exp(bias * sum(d * g for d, g in zip(direction / np.linalg.norm(direction), grids)))
    if noise:
        array += rng.normal(0.0, noise * BRAIN_SCALE, shape).astype(np.float32) * (array > 0)
    array = np.maximum(array, 0.0).astype(np.float32)
    if as_uint8:
        array = np.round(array * (255.0 / max(float(array.max()), 1.0))).astype(np.uint8)
    return SyntheticHead(array=array, affine=affine, brain_mask=mask, template_to_head=template_to_head)
