"""The input grid -> model grid mapping: geometry, separable resampling, and the record that maps labels back.

Upstream (MONAI, ``configs/inference.json``) builds the model grid with ``Spacingd`` (1.5 mm, bilinear, border
padding, computed over a float64 sampling grid of 3 values per output voxel), ``CropForegroundd`` (> 0, margin
10), ``ScaleIntensityRangePercentilesd`` (1st..99th percentile -> [0, 1], clipped) and ``Orientationd`` (RAS).
This module computes the same grid, the same voxel values (up to float64 rounding before the cast to float32)
and MONAI's own affines, with far less work:

* ``Spacing`` keeps the input's direction cosines (``zoom_affine(diagonal=False)``), so for every input whose
  affine columns are orthogonal -- axis-aligned and oblique alike -- the output->input voxel map is a per-axis
  scale and shift. Trilinear interpolation is then a product of 1-D weights: three 1-D linear passes, in
  float64 like MONAI, over slabs of the output (so no sampling grid and no full-size float64 copy exists).
  A sheared affine (columns not orthogonal, e.g. a gantry tilt kept as shear) couples the axes; it goes through
  MONAI's ``Spacing`` itself.
* The foreground box is found before anything is resampled: a resampled voxel can only be > 0 if one of the
  input voxels it interpolates is, so the input's own > 0 box, mapped onto the output grid, bounds the work.
  The exact box (MONAI's rule: > 0 on the resampled values, ``margin`` voxels, clipped to the grid) is then
  taken from the resampled slabs.
* Percentiles come from one selection (``np.percentile`` of both quantiles in one call, as MONAI's own
  percentile function computes them; ``torch.quantile`` for at most 10^6 voxels, as MONAI does).
* Orientation to RAS is a flip and a transpose, applied when the one float32 model-grid array is written.

Coordinate spaces: every affine here is 4x4 float64, voxel (i, j, k) -> RAS world millimetres (nibabel's and
MONAI's convention). "Input grid" is the file's voxel grid, "resampled grid" Spacing's full output (input axis
order), "model grid" the cropped, RAS-ordered grid the network sees.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import nibabel as nib
import numpy as np
import torch

#: MONAI's ``AFFINE_TOL``: Spacing keeps an input spacing within this of the target, and skips resampling when
#: the voxel map is within it of the identity.
AFFINE_TOL = 1e-3
#: off-diagonal terms of the output->input voxel map below this fraction of its largest term are float noise
#: (oblique direction cosines leave ~1e-16); above it the axes are coupled (shear) and MONAI's Spacing runs.
SEPARABLE_TOL = 1e-9
#: output slices resampled at a time: bounds the float64 working set (a few in-plane slices of the input).
SLAB_SLICES = 16
#: above this many voxels MONAI's ``percentile`` uses ``np.percentile``, at or below it ``torch.quantile``.
TORCH_QUANTILE_MAX = 1_000_000


@dataclass(frozen=True)
class GridMap:
    """How the input grid maps onto the model grid, as MONAI's transforms record it (everything inversion needs).

    Attributes:
        input_shape: (X, Y, Z) of the input grid.
        input_affine: input grid -> RAS mm.
        resampled_shape: Spacing's output (X', Y', Z'), input axis order.
        resampled_affine: resampled grid -> RAS mm, exactly as MONAI stores it (``input_affine @ xform``).
        crop_start, crop_end: the foreground box on the resampled grid (``end`` exclusive).
        ornt: [3, 2] nibabel orientation transform cropped grid -> RAS (MONAI's ``spatial_ornt``).
        model_affine: model grid -> RAS mm, exactly as MONAI's Orientation leaves it.
    """

    input_shape: tuple[int, int, int]
    input_affine: np.ndarray
    resampled_shape: tuple[int, int, int]
    resampled_affine: np.ndarray
    crop_start: tuple[int, int, int]
    crop_end: tuple[int, int, int]
    ornt: np.ndarray
    model_affine: np.ndarray

    @property
    def cropped_shape(self) -> tuple[int, int, int]:
        """The foreground box's shape, resampled (input) axis order."""
        return tuple(int(e - s) for s, e in zip(self.crop_start, self.crop_end))  # type: ignore[return-value]

    @property
    def model_shape(self) -> tuple[int, int, int]:
        """(H, W, D) of the model grid (RAS axis order)."""
        shape = self.cropped_shape
        return tuple(int(shape[int(i)]) for i in np.argsort(self.ornt[:, 0]))  # type: ignore[return-value]

    def to_model_order(self, cropped: np.ndarray) -> np.ndarray:
        """A view of a cropped-grid array (resampled axis order) in model-grid (RAS) order: MONAI's flip, then
        transpose."""
        flips = tuple(axis for axis in range(3) if self.ornt[axis, 1] == -1)
        view = np.flip(cropped, axis=flips) if flips else cropped
        return view.transpose(np.argsort(self.ornt[:, 0]))

    def to_resampled_order(self, model: np.ndarray) -> np.ndarray:
        """The inverse of :meth:`to_model_order`: a view of a model-grid array in cropped-grid axis order."""
        view = model.transpose(np.argsort(np.argsort(self.ornt[:, 0])))
        flips = tuple(axis for axis in range(3) if self.ornt[axis, 1] == -1)
        return np.flip(view, axis=flips) if flips else view

    def inverted_affine(self) -> np.ndarray:
        """The affine MONAI's ``Invertd`` gives the labels after undoing Orientation and the crop, just before it
        inverts Spacing (resampled grid -> RAS mm). It equals :attr:`resampled_affine` up to float rounding; the
        rounding decides exact nearest-neighbour ties, so it is computed with MONAI's own operations, in order."""
        model = torch.as_tensor(self.model_affine, dtype=torch.float64)
        axcodes = nib.orientations.aff2axcodes(crop_affine(self.resampled_affine, self.crop_start))
        back = nib.orientations.ornt_transform(nib.io_orientation(model.numpy()),
                                               nib.orientations.axcodes2ornt(axcodes))
        undone = _matmul(model, torch.as_tensor(nib.orientations.inv_ornt_aff(back, self.model_shape)))
        return _matmul(undone, _translate([-s for s in self.crop_start])).numpy()


def _translate(shift: Sequence[float]) -> torch.Tensor:
    out = torch.eye(4, dtype=torch.float64)
    out[:3, 3] = torch.as_tensor([float(s) for s in shift], dtype=torch.float64)
    return out


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` in float64, as MONAI's ``track_transform_meta`` updates a MetaTensor's affine."""
    return a.to(torch.float64) @ b.to(torch.float64)


def crop_affine(affine: np.ndarray, start: Sequence[int]) -> np.ndarray:
    """The affine of a crop starting at voxel ``start``, as MONAI's crop computes it (``affine @ translate``)."""
    return _matmul(torch.as_tensor(affine, dtype=torch.float64), _translate(start)).numpy()


def spacing_target(shape: Sequence[int], affine: np.ndarray,
                   spacing: Sequence[float]) -> tuple[tuple[int, int, int], np.ndarray]:
    """The grid MONAI's ``Spacing(pixdim=spacing, diagonal=False)`` resamples a ``shape`` volume onto.

    Returns:
        ``(shape', new_affine)``: the resampled (X', Y', Z') and its voxel -> RAS mm affine as ``Spacing`` computes
        it (``zoom_affine`` keeping the direction cosines, an input spacing within :data:`AFFINE_TOL` of the target
        kept, ``compute_shape_offset`` for the shape and the origin).
    """
    from monai.data.utils import affine_to_spacing, compute_shape_offset, to_affine_nd, zoom_affine

    affine_ = to_affine_nd(3, np.asarray(affine, dtype=np.float64))
    out_d = np.asarray(spacing, dtype=np.float64).copy()
    orig_d = affine_to_spacing(affine_, 3, out_d.dtype)
    for axis, current in enumerate(orig_d):
        if out_d[axis] - AFFINE_TOL <= current <= out_d[axis] + AFFINE_TOL:
            out_d[axis] = current
    new_affine = zoom_affine(affine_, out_d, diagonal=False)
    out_shape, offset = compute_shape_offset(tuple(int(n) for n in shape[:3]), affine_, new_affine, False)
    new_affine[:3, -1] = offset[:3]
    return tuple(int(n) for n in out_shape), new_affine  # type: ignore[return-value]


def voxel_map(input_affine: np.ndarray, new_affine: np.ndarray) -> np.ndarray:
    """MONAI's output -> input voxel transform ``solve(input_affine, new_affine)``, 4x4 float64."""
    return np.linalg.solve(np.asarray(input_affine, np.float64), np.asarray(new_affine, np.float64))


def is_unchanged(input_affine: np.ndarray, new_affine: np.ndarray, xform: np.ndarray, in_shape: Sequence[int],
                 out_shape: Sequence[int]) -> bool:
    """MONAI's ``affine_unchanged``: Spacing then returns the input voxels as they are (cast to float32)."""
    same_size = tuple(in_shape) == tuple(out_shape)
    return same_size and (np.allclose(input_affine, new_affine, atol=AFFINE_TOL)
                          or np.allclose(xform, np.eye(4), atol=AFFINE_TOL))


def separable_scale_shift(xform: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``(scale[3], shift[3])`` with ``input_voxel = scale * output_voxel + shift`` per axis, or None where the
    output -> input map couples axes (off-diagonal terms above :data:`SEPARABLE_TOL` of the largest)."""
    linear = np.abs(xform[:3, :3])
    off = linear - np.diag(np.diag(linear))
    if off.max() > SEPARABLE_TOL * linear.max():
        return None
    return np.diag(xform[:3, :3]).copy(), xform[:3, 3].copy()


@dataclass(frozen=True)
class _AxisWeights:
    """1-D linear interpolation along one axis: ``out[j] = src[lo[j]] * (1 - w[j]) + src[hi[j]] * w[j]``."""

    lo: np.ndarray  # int64 [n_out], source indices (relative to the slab's first source index)
    hi: np.ndarray
    w: np.ndarray  # float64 [n_out]
    identity: bool  # exact copy: integer coordinates 0, 1, 2, ...


def _axis_weights(scale: float, shift: float, out_range: range, n_src: int) -> _AxisWeights:
    """grid_sample's bilinear weights with border padding and ``align_corners=False`` for one axis (the
    normalisation cancels: the source coordinate is ``scale * j + shift`` clipped to ``[0, n_src - 1]``)."""
    coord = np.clip(scale * np.arange(out_range.start, out_range.stop, dtype=np.float64) + shift, 0.0, n_src - 1)
    lo = np.floor(coord).astype(np.int64)
    w = coord - lo
    hi = np.minimum(lo + 1, n_src - 1)
    identity = bool(np.all(w == 0.0)) and len(lo) > 0 and bool(np.all(np.diff(lo) == 1))
    return _AxisWeights(lo, hi, w, identity)


def source_span(weights: _AxisWeights) -> tuple[int, int]:
    """The source indices ``[first, last + 1)`` that ``weights`` read."""
    return int(weights.lo.min()), int(weights.hi.max()) + 1


def _lerp_axis(block: np.ndarray, weights: _AxisWeights, first: int, axis: int) -> np.ndarray:
    """One 1-D linear pass along ``axis`` of ``block`` (whose index 0 is source index ``first``); float64."""
    if weights.identity:
        return np.take(block, weights.lo - first, axis=axis)
    shape = [1, 1, 1]
    shape[axis] = -1
    w = weights.w.reshape(shape)
    out = np.asarray(np.take(block, weights.lo - first, axis=axis), dtype=np.float64)
    out *= 1.0 - w
    out += np.take(block, weights.hi - first, axis=axis) * w
    return out


def input_foreground_box(array: np.ndarray) -> tuple[tuple[int, int], ...] | None:
    """Per-axis ``[first, last + 1)`` of the input voxels > 0 (computed slab by slab), or None if there is none."""
    spans: list[np.ndarray] = [np.zeros(n, dtype=bool) for n in array.shape]
    step = max(1, (1 << 24) // max(1, array.shape[0] * array.shape[1]))
    for z0 in range(0, array.shape[2], step):
        positive = array[:, :, z0 : z0 + step] > 0
        spans[0] |= positive.any(axis=(1, 2))
        spans[1] |= positive.any(axis=(0, 2))
        spans[2][z0 : z0 + step] = positive.any(axis=(0, 1))
    if not spans[0].any():
        return None
    return tuple((int(np.argmax(s)), len(s) - int(np.argmax(s[::-1]))) for s in spans)


def output_range_touching(scale: float, shift: float, n_out: int, n_src: int, src_box: tuple[int, int]) -> range:
    """The output indices whose interpolation reads a source index inside ``src_box`` (``[first, last + 1)``)."""
    weights = _axis_weights(scale, shift, range(n_out), n_src)
    touches = (weights.hi >= src_box[0]) & (weights.lo < src_box[1])
    if not touches.any():
        return range(0, 0)
    idx = np.nonzero(touches)[0]
    return range(int(idx[0]), int(idx[-1]) + 1)


def resample_separable(array: np.ndarray, scale: np.ndarray, shift: np.ndarray,
                       region: Sequence[range]) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """Trilinear resampling (MONAI Spacing's values) of ``region`` of the output grid, slab by slab along axis 2.

    Args:
        array: (X, Y, Z) input voxels in their stored dtype (any real dtype).
        scale, shift: per-axis output -> input voxel map (:func:`separable_scale_shift`).
        region: one ``range`` of output indices per axis.

    Returns:
        ``(values, positive)``: the float32 values of ``region`` (computed in float64 and rounded once, as MONAI
        casts its float64 result), and per axis a bool vector marking where ``values > 0`` along that axis.
    """
    n_src = array.shape
    out = np.empty(tuple(len(r) for r in region), dtype=np.float32)
    positive = [np.zeros(len(r), dtype=bool) for r in region]
    in_plane = [_axis_weights(float(scale[a]), float(shift[a]), region[a], n_src[a]) for a in (0, 1)]
    spans = [source_span(w) for w in in_plane]
    # the axis that shrinks most (largest input voxels per output voxel) first: later passes read fewer voxels
    order = sorted(range(3), key=lambda a: -float(scale[a]))
    for z0 in range(0, len(region[2]), SLAB_SLICES):
        z_range = range(region[2].start + z0, min(region[2].start + z0 + SLAB_SLICES, region[2].stop))
        axis_weights = [*in_plane, _axis_weights(float(scale[2]), float(shift[2]), z_range, n_src[2])]
        z_span = source_span(axis_weights[2])
        block: np.ndarray = array[spans[0][0] : spans[0][1], spans[1][0] : spans[1][1], z_span[0] : z_span[1]]
        firsts = (spans[0][0], spans[1][0], z_span[0])
        for axis in order:
            block = _lerp_axis(block, axis_weights[axis], firsts[axis], axis)
        slab = out[:, :, z0 : z0 + len(z_range)]
        slab[...] = block  # float64 (or the stored dtype for identity passes) -> float32, rounded once
        above = slab > 0
        positive[0] |= above.any(axis=(1, 2))
        positive[1] |= above.any(axis=(0, 2))
        positive[2][z0 : z0 + len(z_range)] = above.any(axis=(0, 1))
    return out, tuple(positive)


def foreground_box(positive: Sequence[np.ndarray], offset: Sequence[int], full_shape: Sequence[int],
                   margin: int) -> tuple[tuple[int, int, int], tuple[int, int, int]] | None:
    """MONAI's ``generate_spatial_bounding_box`` (``allow_smaller=True``) from per-axis "> 0 somewhere" vectors
    that start at ``offset`` of a grid of ``full_shape``; None when nothing is > 0."""
    if not all(p.any() for p in positive):
        return None
    start, end = [], []
    for p, off, size in zip(positive, offset, full_shape):
        first = int(np.argmax(p)) + int(off)
        last = len(p) - 1 - int(np.argmax(p[::-1])) + int(off)
        start.append(max(first - margin, 0))
        end.append(min(last + margin + 1, int(size)))
    return tuple(start), tuple(end)  # type: ignore[return-value]


def orientation_to_ras(cropped_affine: np.ndarray, cropped_shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """MONAI ``Orientation(axcodes="RAS")``: ``(spatial_ornt [3, 2], model_affine)`` for a cropped grid."""
    src = nib.io_orientation(np.asarray(cropped_affine, dtype=np.float64))
    ornt = nib.orientations.ornt_transform(src, nib.orientations.axcodes2ornt("RAS"))
    xform = torch.as_tensor(nib.orientations.inv_ornt_aff(ornt, tuple(int(n) for n in cropped_shape)))
    model_affine = _matmul(torch.as_tensor(cropped_affine, dtype=torch.float64), xform).numpy()
    return ornt, model_affine


def percentile_range(values: np.ndarray, lower: float, upper: float) -> tuple[np.float32, np.float32]:
    """The ``lower`` and ``upper`` percentiles of ``values`` (float32, any layout) exactly as MONAI's
    ``percentile`` computes them (linear interpolation), as float32."""
    if values.size > TORCH_QUANTILE_MAX:
        result = np.percentile(values, np.asarray([lower, upper], dtype=np.float64))
        return np.float32(result[0]), np.float32(result[1])
    tensor = torch.from_numpy(np.ascontiguousarray(values))
    q = torch.as_tensor(np.asarray([lower, upper], dtype=np.float64) / 100.0, dtype=tensor.dtype)
    lo, hi = torch.quantile(tensor, q).tolist()
    return np.float32(lo), np.float32(hi)


def scale_into(cropped_model_order: np.ndarray, a_min: np.float32, a_max: np.float32) -> np.ndarray:
    """MONAI ``ScaleIntensityRange(a_min, a_max, 0, 1, clip=True)`` in float32, written into one new C-ordered
    array (the model grid): ``(x - a_min) / (a_max - a_min)`` clipped to [0, 1]; ``x - a_min`` when
    ``a_max == a_min`` (MONAI's divide-by-zero branch, not clipped)."""
    out = np.empty(cropped_model_order.shape, dtype=np.float32)
    np.subtract(cropped_model_order, a_min, out=out, dtype=np.float32)
    width = np.float32(a_max - a_min)
    if width == 0:
        return out
    np.divide(out, width, out=out)
    np.clip(out, 0.0, 1.0, out=out)
    return out
