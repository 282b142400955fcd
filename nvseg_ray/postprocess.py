"""Model grid -> input grid, output dtype, and per-label statistics."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from .errors import ConfigError
from .model_grid import SEPARABLE_TOL, GridMap
from .preprocess import PreparedVolume

_DTYPE_MAX = {"uint8": 255, "uint16": 65535, "int16": 32767, "int32": 2**31 - 1, "float32": 2**24}
#: input slices gathered at a time when inverting: bounds the gather's index arrays and temporaries.
INVERT_SLAB_SLICES = 32


def invert_labels(labels: np.ndarray | torch.Tensor, prepared: PreparedVolume, dtype: str | np.dtype = np.uint16,
                  ) -> np.ndarray:
    """Undo orientation, crop and resampling with nearest-neighbour interpolation, as upstream's ``Invertd``.

    Orientation and crop are a view and an offset here. The resampling back to the input grid is what MONAI
    makes expensive -- a float64 sampling grid of 3 x input voxels (1.9 GB for a 512x512x300 CT) and a full
    ``grid_sample``. Because the model grid keeps the input's direction cosines, each input axis reads from exactly
    one model-grid axis: :func:`separable_nearest_indices` computes the per-axis nearest indices with the *same*
    torch kernels MONAI uses (on 1-D lines, from the affine MONAI's inverse would hold,
    :meth:`~nvseg_ray.model_grid.GridMap.inverted_affine`, so exact .5 ties fall the same way), and the result is
    gathered slab by slab straight into the output array. Geometry that cannot be split per axis falls back to
    MONAI's own nearest resampling.

    Args:
        labels: [H, W, D] integer label map on the model grid (numpy or torch, any device, any integer dtype).
        prepared: the :class:`PreparedVolume` the labels were computed from (its ``grid``).
        dtype: the returned array's dtype (the output file's; it must hold every label).

    Returns:
        (X, Y, Z) label map of ``dtype`` on the input image's voxel grid, Fortran-ordered (NIfTI's voxel order).
        Voxels outside the cropped region are 0.
    """
    grid = prepared.grid
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    if tuple(labels.shape) != grid.model_shape:
        raise RuntimeError(f"labels of shape {tuple(labels.shape)} for a model grid of {grid.model_shape}")
    cropped = grid.to_resampled_order(labels)  # a view, cropped-grid (input) axis order
    current = grid.inverted_affine()
    fast = separable_nearest_indices(grid.input_affine, grid.input_shape, current, grid.resampled_shape)
    if fast is None:  # geometry that cannot be split per axis: MONAI's full nearest resampling
        return _monai_nearest(cropped, grid, current).astype(dtype, copy=False)
    out = np.zeros(grid.input_shape, dtype=dtype, order="F")  # NIfTI's order: the writer then copies nothing
    targets, sources = [], []
    for axis in range(3):
        index = fast[axis].reshape(-1) - grid.crop_start[axis]
        inside = np.nonzero((index >= 0) & (index < cropped.shape[axis]))[0]
        targets.append(inside)
        sources.append(index[inside])
    if not all(len(t) for t in targets):
        return out
    # the nearest index is monotonic in the input index, so the voxels that land in the crop are one box
    box = tuple(slice(int(t[0]), int(t[-1]) + 1) if len(t) == t[-1] - t[0] + 1 else t for t in targets[:2])
    rows = np.ix_(sources[0], sources[1], [0])
    for first in range(0, len(targets[2]), INVERT_SLAB_SLICES):
        z_targets = targets[2][first : first + INVERT_SLAB_SLICES]
        z_sources = sources[2][first : first + INVERT_SLAB_SLICES]
        gathered = cropped[rows[0], rows[1], z_sources[None, None, :]]
        if all(isinstance(b, slice) for b in box):
            out[box[0], box[1], z_targets] = gathered
        else:
            out[np.ix_(targets[0], targets[1], z_targets)] = gathered
    return out


def _monai_nearest(cropped: np.ndarray, grid: GridMap, current_affine: np.ndarray) -> np.ndarray:
    """Reference path: MONAI's nearest ``SpatialResample`` (what ``Invertd`` runs for Spacing) of the uncropped labels.

    Returns (X, Y, Z) labels on the input grid (int64)."""
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    full = np.zeros(grid.resampled_shape, dtype=np.float32)
    full[tuple(slice(s, e) for s, e in zip(grid.crop_start, grid.crop_end))] = cropped
    image = MetaTensor(torch.from_numpy(full)[None], affine=torch.as_tensor(current_affine, dtype=torch.float64))
    resample = SpatialResample(mode="nearest", padding_mode="border", align_corners=False, dtype=torch.float64)
    out = resample(image, dst_affine=torch.as_tensor(grid.input_affine, dtype=torch.float64),
                   spatial_size=grid.input_shape)
    return np.rint(out.as_tensor().numpy()[0]).astype(np.int64)


def separable_nearest_indices(input_affine: np.ndarray, input_shape: Sequence[int], current_affine: np.ndarray,
                              current_shape: Sequence[int], *, dtype: torch.dtype = torch.float64,
                              align_corners: bool = False, padding: str = "border") -> tuple[np.ndarray, ...] | None:
    """Per-axis nearest-neighbour indices that map a resampled grid back onto the input grid, as MONAI does.

    Mirrors ``monai.transforms.spatial.functional.spatial_resample`` (inverse direction of Spacing: float64,
    border padding, ``align_corners=False``) and ``monai.networks.layers.AffineTransform``: the voxel->voxel
    transform is normalised with ``to_norm_affine``, axes are reversed for torch, and ``affine_grid`` +
    ``grid_sample`` (nearest) run -- but on one line per axis instead of on the full grid. Valid only when the
    normalised transform maps each output axis to exactly one input axis; returns ``None`` otherwise.

    Args:
        input_affine, input_shape: the input grid (voxel -> RAS mm) the labels go back to.
        current_affine: 4x4 voxel -> RAS mm affine of the (uncropped, input-axis-order) resampled label grid.
        current_shape: its spatial shape.

    Returns:
        A tuple of 3 broadcastable int64 index arrays ``(I0, I1, I2)`` into the resampled grid such that
        ``labels[I0, I1, I2]`` has the input image's shape, or ``None``.
    """
    from monai.networks.utils import to_norm_affine

    align = bool(align_corners)
    if padding not in ("border", "reflection"):  # zeros: outside the source reads 0, indistinguishable here
        return None
    dst_size = tuple(int(s) for s in input_shape)
    src_size = tuple(int(s) for s in current_shape)
    xform = np.linalg.solve(np.asarray(current_affine, dtype=np.float64), np.asarray(input_affine, np.float64))
    theta = to_norm_affine(torch.as_tensor(xform, dtype=dtype)[None], src_size, dst_size, align_corners=align)
    rev = [2, 1, 0]
    theta[:, :3] = theta[:, rev]
    theta[:, :, :3] = theta[:, :, rev]
    linear = theta[0, :3, :3].abs()
    # float noise from oblique direction cosines (|x| ~ 1e-16) is not a coupling between axes: drop it
    noise = linear <= SEPARABLE_TOL * linear.max()
    had_noise = bool((linear[noise] > 0).any())
    theta[0, :3, :3][noise] = 0.0
    # torch grid component c (x, y, z) reads input dim (2 - c); grid column k is driven by output dim (2 - k)
    owner = linear.argmax(dim=1)
    if sorted(owner.tolist()) != [0, 1, 2] or (~noise).sum().item() != 3:
        return None
    indices: list[np.ndarray] = [np.empty(0)] * 3
    for c in range(3):
        in_dim, out_dim = 2 - c, 2 - int(owner[c])
        line = [1, 1, 1]
        line[out_dim] = dst_size[out_dim]
        grid = torch.nn.functional.affine_grid(theta[:, :3], size=[1, 1, *line], align_corners=align)
        probe_shape = [1, 1, 1]
        probe_shape[in_dim] = src_size[in_dim]
        probe = torch.arange(src_size[in_dim], dtype=dtype).reshape(1, 1, *probe_shape)
        if had_noise and _has_rounding_ties(grid[..., c], src_size[in_dim], align):
            return None  # the dropped noise terms decide exact .5 ties in MONAI's full-grid path
        picked = torch.nn.functional.grid_sample(probe, grid, mode="nearest", padding_mode=padding, align_corners=align)
        idx = picked.reshape(-1).round().to(torch.int64).numpy()
        shape = [1, 1, 1]
        shape[out_dim] = dst_size[out_dim]
        indices[in_dim] = idx.reshape(shape)
    return tuple(indices)


def _has_rounding_ties(normalised: torch.Tensor, size: int, align_corners: bool) -> bool:
    """Whether any normalised grid coordinate lands (within 1e-6 voxel) on a .5 nearest-neighbour tie."""
    if align_corners:
        coord = (normalised + 1) / 2 * (size - 1)
    else:
        coord = ((normalised + 1) * size - 1) / 2
    frac = coord - torch.floor(coord)
    return bool(((frac - 0.5).abs() < 1e-6).any())


def check_output_dtype(dtype: str, max_label: int) -> np.dtype:
    """The output dtype as numpy's, refusing one that cannot hold ``max_label``.

    Raises:
        ConfigError: e.g. ``uint8`` for label id 300.
    """
    if max_label > _DTYPE_MAX[dtype]:
        raise ConfigError(f"output dtype {dtype} cannot hold label id {max_label}",
                          hint="use --output-dtype uint16 (the default)")
    return np.dtype(dtype)


def cast_labels(labels: np.ndarray, dtype: str, max_label: int) -> np.ndarray:
    """Cast a label map to the output dtype (no copy when it already is), refusing a dtype that cannot hold
    ``max_label``."""
    return labels.astype(check_output_dtype(dtype, max_label), copy=False)


def label_statistics(labels: np.ndarray, affine: np.ndarray, names: Mapping[int, str]) -> list[dict]:
    """Voxel count and volume (ml) of every label present, ascending id, background excluded.

    Args:
        labels: (X, Y, Z) integer label map on the input grid.
        affine: its 4x4 voxel -> world (mm) affine; voxel volume = |det(affine[:3, :3])| mm^3.
        names: id -> class name.
    """
    voxel_ml = float(abs(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0
    counts = np.zeros(1, dtype=np.int64)
    axis = 2 if labels.flags.f_contiguous and not labels.flags.c_contiguous else 0  # the slowest-varying axis
    step = max(1, (1 << 22) // max(1, labels.size // max(1, labels.shape[axis])))  # ~4 M voxels per slab
    for start in range(0, labels.shape[axis], step):  # per slab: bincount's intp working copy stays small
        slab = labels[start : start + step] if axis == 0 else labels[:, :, start : start + step]
        slab_counts = np.bincount(slab.ravel(order="K").astype(np.intp, copy=False))
        if len(slab_counts) > len(counts):
            counts = np.pad(counts, (0, len(slab_counts) - len(counts)))
        counts[: len(slab_counts)] += slab_counts
    return [
        {"id": int(i), "name": names.get(int(i), f"class {i}"), "voxels": int(n), "volume_ml": round(n * voxel_ml, 4)}
        for i, n in enumerate(counts)
        if i > 0 and n > 0
    ]
