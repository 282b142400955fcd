"""Sliding windows stitched slab by slab along the model grid's last axis: memory that does not grow with the scan.

MONAI's ``sliding_window_inference`` (what upstream runs) keeps one accumulator spanning the whole model grid:
for VISTA3D's 48-channel feature map that is ``48 x H x W x D x 4`` bytes, about 12 GB for a 0.5 mm whole-body
CT. Here the same windows (MONAI's own :func:`monai.data.utils.dense_patch_slices`, same scan interval, same
replicate padding of a grid smaller than the window, same constant blending) run in order of their start along
the last axis ``D`` (superior for the RAS model grid, the scan's length). Once every window that starts at or
before ``s`` has run, the voxels before the next start ``s'`` are final: no later window touches them. They
are divided by their window count, turned into labels (:func:`~nvseg_ray.inference.argmax_over_classes`,
``class_chunk_size`` classes at a time) and freed. Only ``[F, H, W, <= roi_D + step_D]`` features are ever held.

Peak memory of the stitching, float32, for a model grid of ``H x W`` in plane (padded to the window when
smaller), window ``(rH, rW, rD)``, step ``sD = max(int(rD * (1 - overlap)), 1)``, ``F`` = 48 feature channels,
``c`` = ``class_chunk_size``::

    4 bytes x H x W x [ F x (rD + sD)        # the open slab, while it is extended by the next window start
                        + (c + 2) x sD ]     # logits of one class chunk and the running max over a final part
    + 8 bytes x H x W x D                    # the int64 label map handed on (1 value per voxel, not F)

so for 192 x 192 x 128 windows at overlap 0.25 (``sD = 96``) and an in-plane model grid of 330 x 330 it is
about 5.1 GB + 0.9 MB per model-grid slice, against 21 MB per slice for a whole-grid feature map.

Per voxel the window outputs are summed in another order than MONAI's (by start along ``D`` first, MONAI by
start along ``H`` first), which only matters for voxels covered by three or more windows, in the last bit of a
float32 sum: the labels differ from the whole-grid path at most where two classes' logits tie to that bit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F  # noqa: N812 - torch's own convention

#: ``[B, C_in, rH, rW, rD] -> [B, F, rH, rW, rD]`` float32: the per-window feature predictor.
Predictor = Callable[[torch.Tensor], torch.Tensor]
#: ``[F, H, W, n] float32 (final, blended) -> [H, W, n] int64``: what turns a finished slab into labels.
Finisher = Callable[[torch.Tensor], torch.Tensor]


def scan_interval(image_size: Sequence[int], roi_size: Sequence[int], overlap: float) -> tuple[int, ...]:
    """MONAI's window step per axis (``monai.inferers.utils._get_scan_interval``): the window size where the
    (padded) image is exactly one window long, else ``int(roi * (1 - overlap))``, at least 1."""
    steps = []
    for size, roi in zip(image_size, roi_size):
        steps.append(int(roi) if int(roi) == int(size) else max(int(roi * (1 - overlap)), 1))
    return tuple(steps)


def replicate_pad(image: torch.Tensor, roi_size: Sequence[int]) -> tuple[torch.Tensor, list[slice]]:
    """Pad ``image`` [B, C, H, W, D] up to ``roi_size`` where it is smaller (MONAI's split: ``diff // 2`` before,
    the rest after; replicate mode). Returns the padded image and the slices of the original voxels in it."""
    pad: list[int] = []
    keep: list[slice] = []
    for axis in (4, 3, 2):  # F.pad's order: last axis first
        diff = max(int(roi_size[axis - 2]) - image.shape[axis], 0)
        pad.extend([diff // 2, diff - diff // 2])
    for axis in (2, 3, 4):
        before = pad[2 * (4 - axis)]
        keep.append(slice(before, before + image.shape[axis]))
    if any(pad):
        image = F.pad(image, pad=pad, mode="replicate")
    return image, keep


def _axis_counts(size: int, roi: int, starts: Sequence[int], device: torch.device) -> torch.Tensor:
    """How many windows (of those starting at ``starts`` along one axis) cover each of ``size`` voxels, float32."""
    counts = torch.zeros(size, dtype=torch.float32, device=device)
    for start in starts:
        counts[start : start + roi] += 1.0
    return counts


def stitch_in_slabs(image: torch.Tensor, predictor: Predictor, finish: Finisher, roi_size: Sequence[int],
                    overlap: float, sw_batch_size: int, device: torch.device) -> torch.Tensor:
    """Sliding-window ``predictor`` over ``image`` and ``finish`` each slab of the blended output once it is final.

    Args:
        image: [1, C, H, W, D] float32 model-grid volume (any device; windows are moved to ``device``).
        predictor: window features, see :data:`Predictor` (F channels, same spatial size as the window).
        finish: blended features of final voxels -> labels, see :data:`Finisher`.
        roi_size: the window (rH, rW, rD) in model-grid voxels.
        overlap: MONAI's overlap fraction (same for every axis).
        sw_batch_size: windows per predictor call (grouped within one start along ``D``).
        device: where windows run and the open slab is accumulated.

    Returns:
        [H, W, D] int64 labels on ``device`` (the grid of ``image``, padding removed).
    """
    padded, keep = replicate_pad(image, roi_size)
    size = tuple(padded.shape[2:])
    roi = tuple(int(r) for r in roi_size)
    steps = scan_interval(size, roi, overlap)
    from monai.data.utils import dense_patch_slices

    windows = dense_patch_slices(size, roi, steps)  # MONAI's windows, in MONAI's order (H outermost)
    starts = [sorted({w[axis].start for w in windows}) for axis in range(3)]
    counts_hw = (_axis_counts(size[0], roi[0], starts[0], device)[:, None]
                 * _axis_counts(size[1], roi[1], starts[1], device)[None, :])  # [H, W]
    counts_d = _axis_counts(size[2], roi[2], starts[2], device)  # [D]
    labels = torch.zeros(size, dtype=torch.int64, device=device)

    slab: torch.Tensor | None = None  # [F, H, W, n]: accumulated outputs of voxels lo .. lo + n along D
    lo = 0

    def finalize(upto: int) -> None:  # voxels lo .. upto are final: blend, label, drop them
        nonlocal slab, lo
        if slab is None or upto <= lo:
            return
        n = upto - lo
        done = slab[..., :n] / (counts_hw[:, :, None] * counts_d[lo:upto])
        labels[..., lo:upto] = finish(done)
        del done
        slab = slab[..., n:].clone() if slab.shape[-1] > n else None  # clone: free the finished voxels
        lo = upto

    for d_start in starts[2]:
        finalize(d_start)  # windows start here or later: everything before d_start is final
        group = [w for w in windows if w[2].start == d_start]  # MONAI's order within one D start
        end = d_start + roi[2]
        for first in range(0, len(group), sw_batch_size):
            batch = group[first : first + sw_batch_size]
            x = torch.cat([padded[(slice(0, 1), slice(None), *w)] for w in batch]).to(device)
            out = predictor(x)  # [b, F, rH, rW, rD]
            if slab is None:
                slab = torch.zeros((out.shape[1], *size[:2], end - lo), dtype=torch.float32, device=device)
            elif slab.shape[-1] < end - lo:  # this start reaches past the open slab: extend it
                grow = torch.zeros((*slab.shape[:3], end - lo - slab.shape[-1]), dtype=slab.dtype, device=device)
                slab = torch.cat([slab, grow], dim=-1)
                del grow
            for p, w in zip(out, batch):
                slab[:, w[0], w[1], d_start - lo : end - lo] += p.float()
            del out, x
    finalize(size[2])
    return labels[keep[0], keep[1], keep[2]]
