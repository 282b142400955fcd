"""Model grid -> input grid, output dtype, and per-label statistics."""

from __future__ import annotations

import copy
from collections.abc import Mapping

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd
from monai.utils import TraceKeys

from .errors import ConfigError
from .preprocess import IMAGE_KEY, PreparedVolume

#: relative size below which an off-axis term of the normalised resampling transform is float noise.
SEPARABLE_TOL = 1e-9
_DTYPE_MAX = {"uint8": 255, "uint16": 65535, "int16": 32767, "int32": 2**31 - 1, "float32": 2**24}


def invert_labels(labels: torch.Tensor, prepared: PreparedVolume, transforms: Compose) -> np.ndarray:
    """Undo orientation, crop and resampling with nearest-neighbour interpolation, as upstream's ``Invertd``.

    Orientation and crop are undone by MONAI itself (cheap: a flip/permute and a zero pad). The
    resampling back to the input grid is the expensive step -- MONAI builds a float64 sampling grid of
    3 x input voxels (1.9 GB for a 512x512x300 CT) and runs ``grid_sample``. Because the model grid keeps
    the input's direction cosines (``Spacing`` with ``diagonal=False``) and ``Orientation`` only
    permutes/flips axes, that resampling is separable: each input axis reads from exactly one model-grid
    axis. :func:`separable_nearest_indices` computes the per-axis nearest indices with the *same* torch
    kernels MONAI uses (``affine_grid``/``grid_sample`` on 1-D lines), and one fancy-indexing gather
    builds the result. Non-separable geometry falls back to MONAI's full ``Invertd`` path.

    Args:
        labels: [H, W, D] integer label map on the model grid (any device).
        prepared: the :class:`PreparedVolume` the labels were computed from (its ``applied_operations``).
        transforms: the preprocessing chain that produced ``prepared.image``.

    Returns:
        (X, Y, Z) uint16 label map on the input image's voxel grid (ids < 512 always fit). Voxels outside
        the cropped region are 0.
    """
    pred = _labels_with_operations(labels, prepared)
    # undo every transform after the first (Spacing): Orientation, then the foreground crop
    pred = Compose(transforms.transforms[1:]).inverse({IMAGE_KEY: pred})[IMAGE_KEY]
    spacing_op = pred.applied_operations[-1]
    fast = separable_nearest_indices(spacing_op, pred.affine, pred.shape[1:])
    if fast is None:  # oblique resampling cannot be split per axis: full MONAI inverse
        array = _monai_invert(labels, prepared, transforms)
    else:
        source = np.rint(pred.as_tensor().numpy()[0]).astype(np.uint16)
        array = source[fast]
    if array.shape != prepared.input_shape:  # inversion must land on the input grid exactly
        raise RuntimeError(f"inverted mask shape {array.shape} != input shape {prepared.input_shape}")
    return array


def _monai_invert(labels: torch.Tensor, prepared: PreparedVolume, transforms: Compose) -> np.ndarray:
    """Reference path: MONAI ``Invertd`` with nearest interpolation over the whole chain."""
    pred = _labels_with_operations(labels, prepared)
    reference = MetaTensor(torch.zeros((1, 0, 0, 0)), meta=dict(prepared.image.meta),
                           applied_operations=copy.deepcopy(pred.applied_operations))
    inverter = Invertd("pred", transform=transforms, orig_keys=IMAGE_KEY, nearest_interp=True, to_tensor=True)
    out = inverter({"pred": pred, IMAGE_KEY: reference})["pred"]
    return np.rint(out.detach().cpu().numpy()[0]).astype(np.uint16)


def _labels_with_operations(labels: torch.Tensor, prepared: PreparedVolume) -> MetaTensor:
    """The labels as a [1, H, W, D] float32 MetaTensor carrying a copy of the image's transform record.

    MONAI checks that an inverse is run by the very transform instance that recorded the operation (by
    ``id``); the record may come from another process (Ray stages, Serve replicas) or another instance of
    the same chain, so the ids are cleared (``TraceKeys.NONE`` skips that check). The chain itself is the
    one :func:`nvseg_ray.preprocess.build_preprocessing` builds for the same config.
    """
    operations = _without_instance_ids(copy.deepcopy(prepared.image.applied_operations))
    return MetaTensor(labels.detach().to("cpu", torch.float32)[None], meta=dict(prepared.image.meta),
                      applied_operations=operations)


def _without_instance_ids(record):  # noqa: ANN001, ANN202 - nested lists/dicts of MONAI trace records
    """Set every (nested, e.g. a crop's ``pad_info``) trace record's ``id`` to ``TraceKeys.NONE``, in place."""
    if isinstance(record, list):
        for item in record:
            _without_instance_ids(item)
    elif isinstance(record, dict):
        if TraceKeys.ID in record:
            record[TraceKeys.ID] = TraceKeys.NONE
        for value in record.values():
            if isinstance(value, (dict, list)):
                _without_instance_ids(value)
    return record


def separable_nearest_indices(spacing_op: dict, current_affine: torch.Tensor,
                              current_shape: tuple[int, ...]) -> tuple[np.ndarray, ...] | None:
    """Per-axis nearest-neighbour indices that invert a recorded MONAI ``Spacing`` op.

    Mirrors ``monai.transforms.spatial.functional.spatial_resample`` (inverse direction) and
    ``monai.networks.layers.AffineTransform``: the voxel->voxel transform is normalised with
    ``to_norm_affine``, axes are reversed for torch, and ``affine_grid`` + ``grid_sample`` (nearest, the
    op's padding mode, ``align_corners=False``) run in the op's dtype -- but on one line per axis instead
    of on the full grid. Valid only when the normalised transform maps each output axis to exactly one
    input axis; returns ``None`` otherwise.

    Args:
        spacing_op: the ``applied_operations`` entry recorded by ``Spacing``.
        current_affine: 4x4 voxel -> world affine of the (uncropped, model-orientation) label map.
        current_shape: its spatial shape (the model grid before cropping).

    Returns:
        A tuple of 3 broadcastable int64 index arrays ``(I0, I1, I2)`` such that
        ``labels[I0, I1, I2]`` has the input image's shape, or ``None``.
    """
    from monai.networks.utils import to_norm_affine

    info = spacing_op.get("extra_info", {})
    if spacing_op.get("class") not in ("Spacing", "SpatialResample") or "src_affine" not in info:
        return None
    dtype = getattr(torch, str(info.get("dtype", "float64")))
    align = info.get("align_corners")
    align = False if align in (None, "none", TraceKeys.NONE) else bool(align)
    padding = str(info.get("padding_mode", "border"))
    if padding not in ("border", "zeros", "reflection"):
        return None
    dst_size = tuple(int(s) for s in spacing_op["orig_size"])
    src_size = tuple(int(s) for s in current_shape)
    xform = np.linalg.solve(np.asarray(current_affine, dtype=np.float64), np.asarray(info["src_affine"], np.float64))
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
        if padding == "zeros":  # outside the source: grid_sample returns 0, indistinguishable here
            return None
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


def cast_labels(labels: np.ndarray, dtype: str, max_label: int) -> np.ndarray:
    """Cast a label map to the output dtype, refusing a dtype that cannot hold ``max_label``."""
    if max_label > _DTYPE_MAX[dtype]:
        raise ConfigError(f"output dtype {dtype} cannot hold label id {max_label}",
                          hint="use --output-dtype uint16 (the default)")
    return labels.astype(np.dtype(dtype), copy=False)


def label_statistics(labels: np.ndarray, affine: np.ndarray, names: Mapping[int, str]) -> list[dict]:
    """Voxel count and volume (ml) of every label present, ascending id, background excluded.

    Args:
        labels: (X, Y, Z) integer label map on the input grid.
        affine: its 4x4 voxel -> world (mm) affine; voxel volume = |det(affine[:3, :3])| mm^3.
        names: id -> class name.
    """
    voxel_ml = float(abs(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0
    counts = np.zeros(1, dtype=np.int64)
    for slab in labels:  # per first-axis slab: bincount's int64 working copy stays small
        slab_counts = np.bincount(slab.ravel())
        if len(slab_counts) > len(counts):
            counts = np.pad(counts, (0, len(slab_counts) - len(counts)))
        counts[: len(slab_counts)] += slab_counts
    return [
        {"id": int(i), "name": names.get(int(i), f"class {i}"), "voxels": int(n), "volume_ml": round(n * voxel_ml, 4)}
        for i, n in enumerate(counts)
        if i > 0 and n > 0
    ]
