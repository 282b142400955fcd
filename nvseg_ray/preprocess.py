"""Upstream-exact preprocessing: input grid -> model grid, and the record needed to go back.

Order and parameters are those of NV-Segment-CTMR ``configs/inference.json`` (docs/upstream.md, Preprocessing):

1. ``Spacingd`` to 1.5 mm isotropic, bilinear, border padding, float64 resampling;
2. ``CropForegroundd`` on voxels > 0 with a 10-voxel margin (*before* intensity scaling, so on CT it
   keeps the body's soft tissue and denser, HU > 0);
3. ``ScaleIntensityRangePercentilesd`` 1st..99th percentile of the cropped volume -> [0, 1], clipped;
4. ``Orientationd`` to RAS;
5. cast to float32.

The modality does not change preprocessing (CT and MR both use percentile scaling). The transforms
are MONAI's own, so their inverse (:func:`nvseg_ray.postprocess.invert_labels`) is MONAI's too.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    CastToTyped,
    Compose,
    CropForegroundd,
    Orientationd,
    ScaleIntensityRangePercentilesd,
    Spacingd,
)

from .config import InferenceConfig
from .errors import InputError
from .io import too_large_error
from .validation import CODE_EMPTY_VOLUME, check_point_prompts

IMAGE_KEY = "image"


def build_preprocessing(cfg: InferenceConfig) -> Compose:
    """The invertible MONAI transform chain, keyed on ``"image"``."""
    lower, upper = cfg.percentiles
    return Compose(
        [
            Spacingd(IMAGE_KEY, pixdim=list(cfg.spacing), mode="bilinear"),
            CropForegroundd(IMAGE_KEY, source_key=IMAGE_KEY, margin=cfg.crop_margin, allow_smaller=True),
            ScaleIntensityRangePercentilesd(IMAGE_KEY, lower=lower, upper=upper, b_min=0.0, b_max=1.0, clip=True),
            Orientationd(IMAGE_KEY, axcodes="RAS", labels=None),
            CastToTyped(IMAGE_KEY, dtype=torch.float32),
        ]
    )


@dataclass
class PreparedVolume:
    """A volume on the model grid.

    Attributes:
        image: ``MetaTensor`` [1, H, W, D] float32 in [0, 1]; RAS axis order, ``cfg.spacing`` mm voxels,
            cropped to the foreground. Its ``applied_operations`` are what inversion needs.
        input_shape: (X, Y, Z) of the input image (voxel grid of the file).
        input_affine: 4x4 float64 voxel -> RAS world (mm) affine of the input image.
        points: [N, 3] float32 point prompts converted to *model-grid* voxel coordinates, or None.
        point_labels: [N] int64 labels (1 positive, 0 negative), or None.
    """

    image: MetaTensor
    input_shape: tuple[int, int, int]
    input_affine: np.ndarray
    points: torch.Tensor | None = None
    point_labels: torch.Tensor | None = None
    timings: dict[str, float] = field(default_factory=dict)
    #: brain workflow record (:class:`nvseg_ray.brain.BrainRecord`) when the input was registered to the brain
    #: template; ``input_shape``/``input_affine`` are then the template grid, and the record maps back.
    brain: Any | None = None

    @property
    def model_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.image.shape[1:])  # type: ignore[return-value]

    def split(self) -> tuple[np.ndarray, PreparedVolume]:
        """Separate the voxels from the inversion record, so they can travel to different workers.

        Returns:
            ``(voxels, record)``: voxels is the [C, H, W, D] float32 model input; record is this volume with
            an empty image that still carries the metadata and ``applied_operations`` inversion needs.
        """
        voxels = self.image.detach().cpu().numpy()
        empty = MetaTensor(torch.zeros((1, 0, 0, 0)), meta=dict(self.image.meta),
                           applied_operations=copy.deepcopy(self.image.applied_operations))
        record = PreparedVolume(image=empty, input_shape=self.input_shape, input_affine=self.input_affine,
                                points=self.points, point_labels=self.point_labels, timings=dict(self.timings),
                                brain=self.brain)
        return voxels, record

    def with_voxels(self, voxels: np.ndarray) -> PreparedVolume:
        """The inverse of :meth:`split`: a prepared volume whose image holds ``voxels`` [C, H, W, D]."""
        image = MetaTensor(torch.from_numpy(np.ascontiguousarray(voxels)), meta=dict(self.image.meta),
                           applied_operations=list(self.image.applied_operations))
        return PreparedVolume(image=image, input_shape=self.input_shape, input_affine=self.input_affine,
                              points=self.points, point_labels=self.point_labels, timings=dict(self.timings),
                              brain=self.brain)


def to_meta_tensor(array: np.ndarray, affine: np.ndarray) -> MetaTensor:
    """Wrap an (X, Y, Z) float32 array and its voxel->RAS affine as a channel-first ``MetaTensor``.

    Equivalent to MONAI's ``LoadImage(NibabelReader) + EnsureChannelFirst`` for a 3-D NIfTI: same data,
    same ``affine``; the transforms below read nothing else from the metadata.
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
    """The (X', Y', Z') grid ``Spacingd(pixdim=spacing)`` resamples a ``shape`` volume with ``affine`` onto.

    Computed exactly as MONAI's ``Spacing`` does (``zoom_affine`` keeping the axis directions, then
    ``compute_shape_offset``), without allocating anything.
    """
    from monai.data.utils import compute_shape_offset, to_affine_nd, zoom_affine

    affine_ = to_affine_nd(3, np.asarray(affine, dtype=np.float64))
    new_affine = zoom_affine(affine_, np.asarray(spacing, dtype=np.float64), diagonal=False)
    out_shape, _ = compute_shape_offset(tuple(int(n) for n in shape[:3]), affine_, new_affine, False)
    return tuple(int(n) for n in out_shape)  # type: ignore[return-value]


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


def _empty_after_resampling(array: np.ndarray, affine: np.ndarray, cfg: InferenceConfig, uri: str) -> InputError | None:
    """The ``empty_volume`` error when no voxel > 0 survives resampling (the foreground crop is then empty)."""
    resampled = Spacingd(IMAGE_KEY, pixdim=list(cfg.spacing), mode="bilinear")({IMAGE_KEY: to_meta_tensor(array, affine)})
    if bool((resampled[IMAGE_KEY] > 0).any()):
        return None
    return InputError(
        f"{uri!r} has {int(np.count_nonzero(array > 0))} voxel(s) above 0, but none is left after resampling to "
        f"{tuple(cfg.spacing)} mm: the foreground the model sees is empty.",
        code=CODE_EMPTY_VOLUME,
        hint="There is too little above 0 (soft tissue and denser on CT) to segment; check that this is the "
        "intended scan.",
        uri=uri,
    )


def prepare(array: np.ndarray, affine: np.ndarray, cfg: InferenceConfig, transforms: Compose | None = None, *,
            uri: str = "volume") -> PreparedVolume:
    """Run the preprocessing chain on one 3-D volume.

    Before anything is resampled the point prompts are checked against ``array``'s shape and the voxel budget
    against the resampled grid (:func:`check_model_grid`).

    Args:
        array: (X, Y, Z) float32 voxel values as stored in the file (scaling applied).
        affine: 4x4 voxel -> RAS world (mm) affine of ``array``.
        cfg: the inference configuration (spacing, margin, percentiles, point prompts).
        transforms: a prebuilt :func:`build_preprocessing` chain (optional).
        uri: named in error messages.

    Raises:
        PromptError: a point prompt outside the volume (``invalid_prompt``).
        InputError: ``too_large`` (resampled grid over ``cfg.max_voxels``) or ``empty_volume`` (nothing > 0
            left after resampling).
    """
    if cfg.points is not None:
        check_point_prompts(cfg.points, cfg.point_labels, shape=tuple(int(n) for n in array.shape), uri=uri)
    check_model_grid(array.shape, affine, cfg, uri=uri)
    transforms = transforms or build_preprocessing(cfg)
    try:
        out = transforms({IMAGE_KEY: to_meta_tensor(array, affine)})[IMAGE_KEY]
    except Exception:
        empty = _empty_after_resampling(array, affine, cfg, uri)
        if empty is not None:
            raise empty from None
        raise
    prepared = PreparedVolume(image=out, input_shape=tuple(int(s) for s in array.shape), input_affine=np.asarray(affine))
    if cfg.points is not None:
        model_affine = out.affine.detach().cpu().numpy()
        pts = world_points_to_model_grid(np.asarray(cfg.points), prepared.input_affine, model_affine)
        prepared.points = torch.as_tensor(pts, dtype=torch.float32)
        labels = cfg.point_labels if cfg.point_labels is not None else [1] * len(cfg.points)
        prepared.point_labels = torch.as_tensor(labels, dtype=torch.int64)
    return prepared
