"""Nearest-neighbour resampling from the template grid onto the exact input grid (labels and masks).

For every input voxel ``v``: world point ``p = input_affine @ v`` -> template point ``q = inv(template_to_input) @ p``
-> template voxel ``u = inv(template_affine) @ q``, rounded; voxels that fall outside the template grid get 0.
Pure numpy, in slabs of input slices, so memory stays at a few copies of one slab; the result has exactly the
input's shape (and is written with the input's affine, qform and sform by the caller).
"""

from __future__ import annotations

import numpy as np

#: input slices (along the last axis) mapped per step.
SLAB = 16


def template_to_input_grid(values: np.ndarray, template_affine: np.ndarray, template_to_input: np.ndarray,
                           input_shape: tuple[int, int, int], input_affine: np.ndarray,
                           dtype: np.dtype | type = np.uint16) -> np.ndarray:
    """Map a template-grid array onto the input grid by nearest neighbour.

    Args:
        values: (template X, Y, Z) array (labels or a mask), any numeric dtype.
        template_affine: its voxel -> RAS affine; ``template_to_input``: 4 x 4 RAS, template point -> input point.
        input_shape, input_affine: the target grid.
        dtype: output dtype (integer labels stay exact: no interpolation, no scaling).

    Returns:
        ``input_shape`` array of ``dtype``.
    """
    index_map = np.linalg.inv(template_affine) @ np.linalg.inv(template_to_input) @ np.asarray(input_affine, float)
    out = np.zeros(input_shape, dtype)
    limits = np.asarray(values.shape)
    i, j = np.meshgrid(np.arange(input_shape[0]), np.arange(input_shape[1]), indexing="ij")
    for k0 in range(0, input_shape[2], SLAB):
        k = np.arange(k0, min(k0 + SLAB, input_shape[2]))
        coords = (index_map[:3, 0, None, None, None] * i[..., None] + index_map[:3, 1, None, None, None] * j[..., None]
                  + index_map[:3, 2, None, None, None] * k[None, None, :] + index_map[:3, 3, None, None, None])
        u = np.rint(coords).astype(np.int64)  # (3, X, Y, slab)
        inside = np.all((u >= 0) & (u < limits[:, None, None, None]), axis=0)
        slab = np.zeros(inside.shape, dtype)
        slab[inside] = values[u[0][inside], u[1][inside], u[2][inside]]
        out[:, :, k] = slab
    return out
