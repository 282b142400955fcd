"""MONAI transform chains for finetuning: the inference preprocessing, applied to image *and* label.

Deterministic part (shared by training and validation, cacheable), in the order inference uses
(:mod:`nvseg_ray.preprocess`; upstream's training chain crops before resampling, which makes the
model see a slightly different grid at train and test time):

1. :class:`LoadVolumesd` -- read the image channel(s) and the label with the project's NIfTI reader
   (local paths and fsspec URIs, header validation), channel-first ``MetaTensor``;
2. ``Spacingd`` to ``cfg.spacing`` (image bilinear, label nearest);
3. ``CropForegroundd`` on image voxels > 0, ``cfg.crop_margin`` voxels, applied to both keys;
4. ``ScaleIntensityRangePercentilesd`` 1..99 percentile -> [0, 1], clipped (image);
5. ``Orientationd`` RAS (both);
6. cast: image float32, label int16 (upstream's uint8 cannot hold global ids > 255).

Training then adds ``SpatialPadd`` to the patch, ``RandCropByLabelClassesd`` (local label ids, equal
ratios for background and every mapped class), optional flips, upstream's small intensity augmentation,
and finally :class:`RelabelToGlobald` (local -> global ids, ``datalist.relabel``). Validation relabels
right after the deterministic part and is otherwise deterministic.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    CastToTyped,
    Compose,
    CropForegroundd,
    EnsureTyped,
    MapTransform,
    Orientationd,
    RandCropByLabelClassesd,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ResizeWithPadOrCropd,
    ScaleIntensityRangePercentilesd,
    Spacingd,
    SpatialPadd,
)

from ..errors import InputError
from ..preprocess import to_meta_tensor
from ..validation import read_and_validate
from .config import TrainConfig

IMAGE_KEY = "image"
LABEL_KEY = "label"


class LoadVolumesd(MapTransform):
    """Read ``data["image"]`` (a URI or a sequence of co-registered channel URIs) and ``data["label"]``.

    Output: ``image`` MetaTensor [C, X, Y, Z] float32, ``label`` MetaTensor [1, X, Y, Z] float32 (integer
    values), both with the file's voxel->RAS ``affine`` (as ``LoadImaged(ensure_channel_first=True)``).
    """

    def __init__(self, keys: KeysCollection = (IMAGE_KEY, LABEL_KEY), storage_options: dict | None = None,
                 allow_missing_keys: bool = True) -> None:
        super().__init__(keys, allow_missing_keys)
        self.storage_options = storage_options or None

    def _read(self, uris: Sequence[str]) -> MetaTensor:
        volumes = [read_and_validate(u, self.storage_options) for u in uris]
        first = volumes[0]
        for vol in volumes[1:]:
            if vol.shape != first.shape or not np.allclose(vol.affine, first.affine, atol=1e-3):
                raise InputError(f"channel {vol.uri} does not share the grid of {first.uri}",
                                 hint="multi-channel images must be co-registered (same shape and affine)")
        out = to_meta_tensor(first.array, first.affine)
        if len(volumes) > 1:
            data = torch.from_numpy(np.stack([v.array for v in volumes]).astype(np.float32, copy=False))
            out = MetaTensor(data, affine=out.affine, meta=dict(out.meta))
        out.meta["filename_or_obj"] = first.uri
        return out

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            uris = [value] if isinstance(value, str) else list(value)
            d[key] = self._read(uris)
        return d


class RelabelToGlobald(MapTransform):
    """Map local label ids to global ids with :func:`nvseg_ray.training.datalist.relabel`.

    Keeps the container type and metadata; the output dtype is int16 ([1, H, W, D]).
    """

    def __init__(self, mapping: Sequence[tuple[int, int]], keys: KeysCollection = LABEL_KEY,
                 allow_missing_keys: bool = True) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mapping = tuple((int(a), int(b)) for a, b in mapping)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from .datalist import relabel

        d = dict(data)
        for key in self.key_iterator(d):
            label = d[key]
            array = label.detach().cpu().numpy() if isinstance(label, torch.Tensor) else np.asarray(label)
            mapped = torch.from_numpy(np.ascontiguousarray(relabel(array, self.mapping)).astype(np.int16))
            if isinstance(label, MetaTensor):
                mapped = MetaTensor(mapped, meta=dict(label.meta), applied_operations=list(label.applied_operations))
            d[key] = mapped
        return d


def _deterministic(cfg: TrainConfig, keys: tuple[str, ...]) -> list:
    lower, upper = cfg.percentiles
    has_label = LABEL_KEY in keys
    modes = ("bilinear", "nearest") if has_label else ("bilinear",)
    out = [
        LoadVolumesd(keys, storage_options=cfg.storage_options),
        Spacingd(keys, pixdim=list(cfg.spacing), mode=modes),
        CropForegroundd(keys, source_key=IMAGE_KEY, margin=cfg.crop_margin, allow_smaller=True),
        ScaleIntensityRangePercentilesd(IMAGE_KEY, lower=lower, upper=upper, b_min=0.0, b_max=1.0, clip=True),
        Orientationd(keys, axcodes="RAS", labels=None),
        CastToTyped(keys, dtype=(torch.float32, torch.int16) if has_label else torch.float32),
    ]
    return out


def crop_ratios(mapping: Sequence[tuple[int, int]]) -> list[float]:
    """``RandCropByLabelClassesd`` ratios over local ids 0..max: 1 for background and mapped ids, else 0."""
    locals_ = {int(a) for a, _ in mapping}
    return [1.0 if (i == 0 or i in locals_) else 0.0 for i in range(max(locals_) + 1)]


def build_train_transforms(cfg: TrainConfig) -> Compose:
    """Deterministic preprocessing + random patch sampling and augmentation + relabelling.

    Output per sample (a list of ``cfg.num_patches_per_image`` dicts): ``image`` [C, *patch] float32 in
    [0, 1] (before augmentation), ``label`` [1, *patch] int16 global ids.
    """
    keys = (IMAGE_KEY, LABEL_KEY)
    ratios = crop_ratios(cfg.label_mapping)
    p = cfg.intensity_aug_prob
    chain = _deterministic(cfg, keys) + [
        SpatialPadd(keys, spatial_size=cfg.patch_size, mode="constant"),
        RandCropByLabelClassesd(keys, label_key=LABEL_KEY, spatial_size=cfg.patch_size, num_classes=len(ratios),
                                ratios=ratios, num_samples=cfg.num_patches_per_image, warn=False),
        ResizeWithPadOrCropd(keys, spatial_size=cfg.patch_size, mode="constant"),
    ]
    if cfg.flip_prob > 0:
        chain += [RandFlipd(keys, prob=cfg.flip_prob, spatial_axis=axis) for axis in range(3)]
    if p > 0:
        chain += [
            RandGaussianSmoothd(IMAGE_KEY, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0), prob=p),
            RandScaleIntensityd(IMAGE_KEY, factors=0.1, prob=p),
            RandShiftIntensityd(IMAGE_KEY, offsets=0.1, prob=p),
            RandGaussianNoised(IMAGE_KEY, mean=0.0, std=0.2, prob=p),
        ]
    chain += [
        RelabelToGlobald(cfg.label_mapping),
        EnsureTyped(keys, dtype=(torch.float32, torch.int16), track_meta=False),
    ]
    return Compose(chain)


def build_val_transforms(cfg: TrainConfig) -> Compose:
    """Deterministic preprocessing + relabelling: ``image`` [C, H, W, D] float32, ``label`` [1, H, W, D]
    int16 global ids, on the model grid (``cfg.spacing``, RAS, foreground-cropped)."""
    keys = (IMAGE_KEY, LABEL_KEY)
    return Compose(_deterministic(cfg, keys) + [
        RelabelToGlobald(cfg.label_mapping),
        EnsureTyped(keys, dtype=(torch.float32, torch.int16), track_meta=False),
    ])
