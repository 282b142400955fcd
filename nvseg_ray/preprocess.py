"""Preprocessing: input grid -> model grid, upstream's values, and the record that maps labels back.

The result is that of NV-Segment-CTMR's ``configs/inference.json`` chain (docs/upstream.md, Preprocessing):

1. ``Spacingd`` to 1.5 mm isotropic, bilinear, border padding, float64 resampling;
2. ``CropForegroundd`` on voxels > 0 with a 10-voxel margin (*before* intensity scaling, so on CT it
   keeps the body's soft tissue and denser, HU > 0);
3. ``ScaleIntensityRangePercentilesd`` 1st..99th percentile of the cropped volume -> [0, 1], clipped;
4. ``Orientationd`` to RAS;
5. cast to float32.

It is computed by :mod:`nvseg_ray.model_grid` (separable 1-D resampling restricted to the foreground, one
selection for both percentiles, orientation as a view), not by MONAI's transforms, which remain the tests' judge
(:func:`nvseg_ray.upstream.upstream_model_grid_chain`). The modality does not change preprocessing (CT and MR
both use percentile scaling).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

from .config import InferenceConfig
from .errors import InputError
from .io import too_large_error
from .model_grid import (
    GridMap,
    crop_affine,
    foreground_box,
    input_foreground_box,
    is_unchanged,
    orientation_to_ras,
    output_range_touching,
    percentile_range,
    resample_separable,
    scale_into,
    separable_scale_shift,
    spacing_target,
    voxel_map,
)
from .validation import CODE_EMPTY_VOLUME, check_point_prompts

IMAGE_KEY = "image"


@dataclass
class PreparedVolume:
    """A volume on the model grid.

    Attributes:
        image: ``MetaTensor`` [1, H, W, D] float32 in [0, 1]; RAS axis order, ``cfg.spacing`` mm voxels, cropped to
            the foreground; its ``affine`` is the model grid's (voxel -> RAS mm).
        grid: how the input grid maps onto the model grid (what inversion needs), :class:`~nvseg_ray.model_grid.GridMap`.
        points: [N, 3] float32 point prompts converted to *model-grid* voxel coordinates, or None.
        point_labels: [N] int64 labels (1 positive, 0 negative), or None.
        brain: brain workflow record (:class:`nvseg_ray.brain.BrainRecord`) when the input was registered to the
            brain template; ``grid`` then starts from the template grid, and the record maps back.
    """

    image: MetaTensor
    grid: GridMap
    points: torch.Tensor | None = None
    point_labels: torch.Tensor | None = None
    timings: dict[str, float] = field(default_factory=dict)
    brain: Any | None = None

    @property
    def model_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.image.shape[1:])  # type: ignore[return-value]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(X, Y, Z) of the grid the labels are inverted onto (the input's; the template's for the brain workflow)."""
        return self.grid.input_shape

    @property
    def input_affine(self) -> np.ndarray:
        return self.grid.input_affine

    def split(self) -> tuple[np.ndarray, PreparedVolume]:
        """Separate the voxels from the record, so they can travel to different workers.

        Returns:
            ``(voxels, record)``: voxels is the [C, H, W, D] float32 model input; record is this volume with an
            empty image that still carries the model affine and the grid map.
        """
        voxels = self.image.detach().cpu().numpy()
        empty = MetaTensor(torch.zeros((1, 0, 0, 0)), affine=self.image.affine.clone())
        return voxels, self._with_image(empty)

    def with_voxels(self, voxels: np.ndarray) -> PreparedVolume:
        """The inverse of :meth:`split`: a prepared volume whose image holds ``voxels`` [C, H, W, D]."""
        image = MetaTensor(torch.from_numpy(np.ascontiguousarray(voxels)), affine=self.image.affine.clone())
        return self._with_image(image)

    def _with_image(self, image: MetaTensor) -> PreparedVolume:
        return PreparedVolume(image=image, grid=self.grid, points=self.points, point_labels=self.point_labels,
                              timings=dict(self.timings), brain=self.brain)


def to_meta_tensor(array: np.ndarray, affine: np.ndarray) -> MetaTensor:
    """Wrap an (X, Y, Z) array and its voxel->RAS affine as a channel-first float32 ``MetaTensor``.

    Equivalent to MONAI's ``LoadImage(NibabelReader) + EnsureChannelFirst`` for a 3-D NIfTI: same data,
    same ``affine``; MONAI's transforms read nothing else from the metadata.
    """
    data = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None]
    aff = torch.as_tensor(np.asarray(affine, dtype=np.float64))
    return MetaTensor(data, affine=aff, meta={"original_affine": aff.clone(), "spatial_shape": np.asarray(array.shape),
                                              "original_channel_dim": "no_channel", "space": "RAS"})


def world_points_to_model_grid(points_ijk: np.ndarray, input_affine: np.ndarray, model_affine: np.ndarray) -> np.ndarray:
    """Map voxel coordinates of the input image to voxel coordinates of the model grid.

    ``model_ijk = inv(model_affine) @ input_affine @ input_ijk`` (both affines voxel -> RAS mm), which is
    how upstream converts clicks (docs/upstream.md, Inference: point prompts).
    """
    pts = np.asarray(points_ijk, dtype=np.float64).reshape(-1, 3)
    homog = np.concatenate([pts, np.ones((len(pts), 1))], axis=1)
    xform = np.linalg.solve(np.asarray(model_affine, dtype=np.float64), np.asarray(input_affine, dtype=np.float64))
    return (homog @ xform.T)[:, :3]


def resampled_shape(shape: tuple[int, ...], affine: np.ndarray, spacing: tuple[float, float, float]) -> tuple[int, int, int]:
    """The (X', Y', Z') grid ``Spacingd(pixdim=spacing)`` resamples a ``shape`` volume with ``affine`` onto
    (:func:`nvseg_ray.model_grid.spacing_target`), without allocating anything."""
    return spacing_target(shape, affine, spacing)[0]


def check_model_grid(shape: tuple[int, ...], affine: np.ndarray, cfg: InferenceConfig, *, uri: str) -> tuple[int, int, int]:
    """Apply the voxel budget ``cfg.max_voxels`` to the resampled model grid, before anything is allocated.

    A coarse volume (e.g. 40^3 voxels of 50 mm) resampled to 1.5 mm needs a grid far larger than the file
    (1334^3 voxels, ~70 GB in float64). Returns the resampled (X', Y', Z') shape.

    Raises:
        InputError: ``too_large``, naming the input and the resampled sizes.
    """
    target = resampled_shape(shape, affine, cfg.spacing)
    n_voxels = int(np.prod(target, dtype=np.int64))
    if n_voxels > cfg.max_voxels:
        spacing_in = tuple(round(float(v), 4) for v in np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(0)))
        raise too_large_error(
            uri, f"resampling its {tuple(int(n) for n in shape[:3])} voxels of {spacing_in} mm to "
            f"{tuple(cfg.spacing)} mm gives a model grid that", target, n_voxels, cfg.max_voxels,
            input_shape=[int(n) for n in shape[:3]], input_spacing_mm=list(spacing_in))
    return target


def _empty_after_resampling(array: np.ndarray, cfg: InferenceConfig, uri: str) -> InputError:
    """The ``empty_volume`` error when no voxel > 0 survives resampling (the foreground crop is then empty)."""
    return InputError(
        f"{uri!r} has {int(np.count_nonzero(array > 0))} voxel(s) above 0, but none is left after resampling to "
        f"{tuple(cfg.spacing)} mm: the foreground the model sees is empty.",
        code=CODE_EMPTY_VOLUME,
        hint="There is too little above 0 (soft tissue and denser on CT) to segment; check that this is the "
        "intended scan.",
        uri=uri,
    )


def _resampled_foreground(array: np.ndarray, affine: np.ndarray, cfg: InferenceConfig,
                          ) -> tuple[tuple[int, int, int], np.ndarray, np.ndarray, tuple[int, ...], tuple] | None:
    """Spacing's values over the region that can hold its foreground.

    Returns ``(resampled_shape, resampled_affine, values, offset, positive)`` -- ``values`` float32 on the resampled
    grid from ``offset`` on (input axis order), ``positive`` per axis where ``values > 0`` -- or None when no
    input voxel is > 0.
    """
    out_shape, new_affine = spacing_target(array.shape, affine, cfg.spacing)
    xform = voxel_map(affine, new_affine)
    if is_unchanged(affine, new_affine, xform, array.shape, out_shape):  # MONAI returns the input as it is
        values = np.asarray(array, dtype=np.float32)
        above = values > 0
        positive = (above.any(axis=(1, 2)), above.any(axis=(0, 2)), above.any(axis=(0, 1)))
        return out_shape, np.asarray(affine, np.float64), values, (0, 0, 0), positive
    resampled_affine = (torch.as_tensor(affine, dtype=torch.float64) @ torch.as_tensor(xform)).numpy()
    separable = separable_scale_shift(xform)
    if separable is None:  # a sheared affine couples the axes: MONAI's own Spacing
        from monai.transforms import Spacing

        resampled = Spacing(pixdim=list(cfg.spacing), mode="bilinear")(to_meta_tensor(array, affine))
        values = resampled.as_tensor().numpy()[0]
        above = values > 0
        positive = (above.any(axis=(1, 2)), above.any(axis=(0, 2)), above.any(axis=(0, 1)))
        return out_shape, resampled.affine.numpy(), values, (0, 0, 0), positive
    scale, shift = separable
    box = input_foreground_box(array)
    if box is None:
        return None
    margin = int(cfg.crop_margin)
    region = []
    for axis in range(3):
        touching = output_range_touching(scale[axis], shift[axis], out_shape[axis], array.shape[axis], box[axis])
        region.append(range(max(touching.start - margin, 0), min(touching.stop + margin, out_shape[axis])))
    if any(len(r) == 0 for r in region):
        return None
    values, positive = resample_separable(array, scale, shift, region)
    return out_shape, resampled_affine, values, tuple(r.start for r in region), positive


def prepare(array: np.ndarray, affine: np.ndarray, cfg: InferenceConfig, *, uri: str = "volume") -> PreparedVolume:
    """Put one 3-D volume on the model grid (upstream's values; see the module docstring).

    Before anything is resampled the point prompts are checked against ``array``'s shape and the voxel budget
    against the resampled grid (:func:`check_model_grid`).

    Args:
        array: (X, Y, Z) voxel values as stored in the file (scaling applied), any real dtype (int16 CT is read as
            it is stored; nothing is converted to float64 or float32 as a whole).
        affine: 4x4 voxel -> RAS world (mm) affine of ``array``.
        cfg: the inference configuration (spacing, margin, percentiles, point prompts).
        uri: named in error messages.

    Raises:
        PromptError: a point prompt outside the volume (``invalid_prompt``).
        InputError: ``too_large`` (resampled grid over ``cfg.max_voxels``) or ``empty_volume`` (nothing > 0
            left after resampling).
    """
    if cfg.points is not None:
        check_point_prompts(cfg.points, cfg.point_labels, shape=tuple(int(n) for n in array.shape), uri=uri)
    check_model_grid(array.shape, affine, cfg, uri=uri)
    affine = np.asarray(affine, dtype=np.float64)
    found = _resampled_foreground(array, affine, cfg)
    if found is None:
        raise _empty_after_resampling(array, cfg, uri)
    out_shape, resampled_affine, values, offset, positive = found
    box = foreground_box(positive, offset, out_shape, int(cfg.crop_margin))
    if box is None:
        raise _empty_after_resampling(array, cfg, uri)
    start, end = box
    cropped = values[tuple(slice(s - o, e - o) for s, e, o in zip(start, end, offset))]
    ornt, model_affine = orientation_to_ras(crop_affine(resampled_affine, start), cropped.shape)
    grid = GridMap(input_shape=tuple(int(s) for s in array.shape), input_affine=affine,  # type: ignore[arg-type]
                   resampled_shape=out_shape, resampled_affine=resampled_affine, crop_start=start, crop_end=end,
                   ornt=ornt, model_affine=model_affine)
    a_min, a_max = percentile_range(cropped, *cfg.percentiles)
    model = scale_into(grid.to_model_order(cropped), a_min, a_max)
    del values, cropped
    image = MetaTensor(torch.from_numpy(model)[None], affine=torch.as_tensor(model_affine, dtype=torch.float64))
    prepared = PreparedVolume(image=image, grid=grid)
    if cfg.points is not None:
        pts = world_points_to_model_grid(np.asarray(cfg.points), affine, model_affine)
        prepared.points = torch.as_tensor(pts, dtype=torch.float32)
        labels = cfg.point_labels if cfg.point_labels is not None else [1] * len(cfg.points)
        prepared.point_labels = torch.as_tensor(labels, dtype=torch.int64)
    return prepared

