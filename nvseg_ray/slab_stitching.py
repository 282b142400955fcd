"""Sliding windows stitched slab by slab along the model grid's last axis: memory that does not grow with the scan.

MONAI's ``sliding_window_inference`` (what upstream runs) keeps one accumulator spanning the whole model grid:
for VISTA3D's 48-channel feature map that is ``48 x H x W x D x 4`` bytes, about 12 GB for a 0.5 mm whole-body
CT. Here the same windows (MONAI's own :func:`monai.data.utils.dense_patch_slices`, same scan interval, same
replicate padding of a grid smaller than the window, same constant blending) run in order of their start along
the last axis ``D`` (superior for the RAS model grid, the scan's length). The last axis is cut at every window
start and end; a window adds its output into the segments it spans. Once every window that starts at or before
``s`` has run, the segments that end before the next start ``s'`` are final: no later window touches them. Each
is divided by its window count, turned into labels (:func:`~nvseg_ray.inference.argmax_over_classes`,
``class_chunk_size`` classes at a time) and freed, so only one window length of features is ever held.

Peak memory of the stitching, for a model grid of ``H x W`` in plane (each padded to the window when smaller),
window ``(rH, rW, rD)``, step ``sD = max(int(rD * (1 - overlap)), 1)`` (no segment is longer, except the single
segment of a grid one window long), ``F`` = 48 feature channels and ``c`` = ``class_chunk_size``::

    4 bytes x [ F x H x W x rD                     # the open segments: one window length of running sums
                + F x rH x rW x rD x sw_batch_size  # the predictor's output for one batch of windows
                + (c + 6) x H x W x sD ]            # labelling a final segment: a class chunk's logits, max/argmax
    + 1 byte x H x W x D                            # the uint8 label map handed on (int16, 2 bytes, for ids > 255)

For 192 x 192 x 128 windows at overlap 0.25, one window per call, on a 256 x 256 in-plane grid that is about
2.9 GiB + 0.07 MB per model-grid slice (the uint8 labels; the float32 model grid it reads adds 0.26 MB), where
the whole-grid feature map (MONAI's stitching, used before) costs 12.6 MB per slice and upstream's 117-channel
logits 30.7 MB per slice. ``benchmarks/bench_stitch_memory.py``
measures it.

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
#: ``[F, H, W, n] float32 (final, blended) -> [H, W, n]`` integer labels: what turns a finished slab into labels.
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
                    overlap: float, sw_batch_size: int, device: torch.device,
                    label_dtype: torch.dtype = torch.int64, fixed_batch: bool = False) -> torch.Tensor:
    """Sliding-window ``predictor`` over ``image`` and ``finish`` each part of the blended output once it is final.

    The last axis is cut at every window start and end into segments; a window adds its output into the
    segments it spans, and a segment is finished (divided by its window count, labelled, freed) as soon as the
    next window starts after it. Nothing is ever copied or concatenated: at most one window length of segments
    is open, and one segment is finished at a time.

    Args:
        image: [1, C, H, W, D] float32 model-grid volume (any device; windows are moved to ``device``).
        predictor: window features, see :data:`Predictor` (F channels, same spatial size as the window).
        finish: blended features of final voxels -> labels, see :data:`Finisher`.
        roi_size: the window (rH, rW, rD) in model-grid voxels.
        overlap: MONAI's overlap fraction (same for every axis).
        sw_batch_size: windows per predictor call (grouped within one start along ``D``).
        device: where windows run and the open segments are accumulated.
        label_dtype: dtype of the returned labels (what ``finish`` returns is cast into it).
        fixed_batch: pad a last, smaller window batch to ``sw_batch_size`` (repeating its last window; the extra
            outputs are dropped), for predictors compiled for one input shape (``torch.compile(dynamic=False)``).

    On a CUDA ``device`` the model grid is copied there once (pinned host memory, a non-blocking copy); windows
    are then cut on the device and only the labels stay.

    Returns:
        [H, W, D] labels of ``label_dtype`` on ``device`` (the grid of ``image``, padding removed).
    """
    from monai.data.utils import dense_patch_slices

    if device.type == "cuda" and image.device != device:  # once, not per window
        image = image.pin_memory().to(device, non_blocking=True)
    padded, keep = replicate_pad(image, roi_size)
    size = tuple(padded.shape[2:])
    roi = tuple(int(r) for r in roi_size)
    windows = dense_patch_slices(size, roi, scan_interval(size, roi, overlap))  # MONAI's windows and order
    starts = [sorted({w[axis].start for w in windows}) for axis in range(3)]
    counts_hw = (_axis_counts(size[0], roi[0], starts[0], device)[:, None]
                 * _axis_counts(size[1], roi[1], starts[1], device)[None, :])[:, :, None]  # [H, W, 1]
    counts_d = _axis_counts(size[2], roi[2], starts[2], device)  # [D]
    cuts = sorted({0, size[2], *starts[2], *(s + roi[2] for s in starts[2])})
    labels = torch.zeros(size, dtype=label_dtype, device=device)
    open_segments: dict[int, torch.Tensor] = {}  # segment start along D -> [F, H, W, length] running sums
    ends = dict(zip(cuts[:-1], cuts[1:]))

    def finalize(before: int) -> None:  # every open segment that ends at or before ``before`` is final
        for lo in sorted(k for k in open_segments if ends[k] <= before):
            done = open_segments.pop(lo)
            hi = ends[lo]
            done /= counts_hw * counts_d[lo:hi]  # in place: MONAI's sum / count, then this segment is labelled
            # the whole segment at once: a view of it along D would be copied by the matrix product's reshape
            labels[..., lo:hi] = finish(done)
            del done

    for d_start in starts[2]:
        finalize(d_start)  # every later window starts here or after: what ends before d_start is final
        group = [w for w in windows if w[2].start == d_start]  # MONAI's order within one D start
        spans = [lo for lo in cuts[:-1] if d_start <= lo < d_start + roi[2]]
        for first in range(0, len(group), sw_batch_size):
            batch = group[first : first + sw_batch_size]
            x = torch.cat([padded[(slice(0, 1), slice(None), *w)] for w in batch]).to(device)
            if fixed_batch and len(batch) < sw_batch_size:
                x = torch.cat([x, x[-1:].expand(sw_batch_size - len(batch), *x.shape[1:])])
            out = predictor(x)[: len(batch)]  # [b, F, rH, rW, rD]
            for lo in spans:
                if lo not in open_segments:
                    open_segments[lo] = torch.zeros((out.shape[1], *size[:2], ends[lo] - lo), dtype=torch.float32,
                                                    device=device)
            for p, w in zip(out, batch):
                for lo in spans:
                    open_segments[lo][:, w[0], w[1], :] += p[..., lo - d_start : ends[lo] - d_start].float()
            del out, x
    finalize(size[2])
    return labels[keep[0], keep[1], keep[2]]
