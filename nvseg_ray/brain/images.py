"""Conversions between NIfTI-style arrays (``array[i, j, k]`` at RAS ``affine @ [i, j, k, 1]``) and SimpleITK.

ITK works in LPS physical coordinates and stores images z-fastest; NIfTI/nibabel in RAS with ``array[i, j, k]``.
``to_sitk`` and ``from_sitk`` translate both ways without resampling; ``ras_matrix`` turns an ITK transform
(LPS, fixed point -> moving point) into a 4 x 4 RAS matrix.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import ConfigError

#: RAS <-> LPS: negate x and y.
FLIP_XY = np.diag([-1.0, -1.0, 1.0, 1.0])


def sitk() -> Any:
    """The SimpleITK module, or a clear error naming the extra to install."""
    try:
        import SimpleITK
    except ImportError:  # pragma: no cover - exercised only without the extra
        raise ConfigError("the brain MRI workflow needs SimpleITK (N4 bias correction and registration)",
                          hint='pip install "nvseg-ray[brain]"  (or: pip install SimpleITK nilearn)') from None
    return SimpleITK


def spacing_of(affine: np.ndarray) -> np.ndarray:
    """Voxel edge lengths in mm (column norms of the 3 x 3 part)."""
    return np.linalg.norm(np.asarray(affine, float)[:3, :3], axis=0)


def to_sitk(array: np.ndarray, affine: np.ndarray, dtype: Any = np.float32) -> Any:
    """A SimpleITK image with the same voxels and world geometry.

    Args:
        array: (X, Y, Z) voxels, ``array[i, j, k]``.
        affine: 4 x 4 voxel index -> RAS world mm; its axes must be perpendicular (validated inputs are).
    """
    itk = sitk()
    affine = np.asarray(affine, float)
    spacing = spacing_of(affine)
    lps = FLIP_XY @ affine
    direction = lps[:3, :3] / spacing
    image = itk.GetImageFromArray(np.ascontiguousarray(np.asarray(array, dtype).transpose(2, 1, 0)))
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(o) for o in lps[:3, 3]])
    image.SetDirection([float(d) for d in direction.ravel()])
    return image


def from_sitk(image: Any) -> np.ndarray:
    """The (X, Y, Z) voxel array of a SimpleITK image (a copy)."""
    return sitk().GetArrayFromImage(image).transpose(2, 1, 0).copy()


def affine_of(image: Any) -> np.ndarray:
    """The 4 x 4 voxel -> RAS affine of a SimpleITK image."""
    spacing = np.asarray(image.GetSpacing(), float)
    direction = np.asarray(image.GetDirection(), float).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * spacing
    lps[:3, 3] = image.GetOrigin()
    return FLIP_XY @ lps


def ras_matrix(transform: Any) -> np.ndarray:
    """4 x 4 RAS matrix of an ITK affine-like transform (LPS, maps fixed points to moving points)."""
    return FLIP_XY @ _lps_matrix(transform) @ FLIP_XY


def _lps_matrix(transform: Any) -> np.ndarray:
    m = np.asarray(transform.GetMatrix(), float).reshape(3, 3)
    center = np.asarray(transform.GetCenter(), float)
    translation = np.asarray(transform.GetTranslation(), float)
    out = np.eye(4)
    out[:3, :3] = m
    out[:3, 3] = translation + center - m @ center
    return out


def sitk_affine_transform(ras: np.ndarray) -> Any:
    """An ITK ``AffineTransform`` (LPS) equal to the 4 x 4 RAS matrix ``ras``."""
    itk = sitk()
    lps = FLIP_XY @ np.asarray(ras, float) @ FLIP_XY
    transform = itk.AffineTransform(3)
    transform.SetMatrix([float(v) for v in lps[:3, :3].ravel()])
    transform.SetTranslation([float(v) for v in lps[:3, 3]])
    return transform
