"""Sliding-window inference on the model grid, with memory bounded independently of the class count.

Upstream stitches ``[1, n_prompts, H, W, D]`` float32 logits (117 x voxels x 4 bytes for CT_BODY) and
then takes an argmax. VISTA3D's class head makes that buffer unnecessary: for a window ``w`` the logit
of class ``c`` at voxel ``x`` is a dot product ``e_c . P_w(x)`` between the class embedding ``e_c``
(48 values) and the window's post-mapped feature map ``P_w`` (48 channels). Constant-weight blending
averages windows, and averaging commutes with the dot product:

    mean_w(e_c . P_w(x)) = e_c . mean_w(P_w(x))

So we stitch the 48-channel feature map (same windows, overlap, replicate padding and constant blending as
upstream's MONAI ``sliding_window_inference``), then evaluate the logits of ``class_chunk_size`` classes at a
time, keeping a running maximum and argmax per voxel. The result is the upstream mask (up to float rounding at
exact ties), and the result is identical for every chunk size. The stitching runs slab by slab along the last
axis (:mod:`nvseg_ray.slab_stitching`), so only a slab of the feature map is ever held: peak memory is a function
of the window, the overlap, the class chunk and the in-plane size, not of the scan's length. (MONAI's whole-grid
stitching, :func:`stitched_features`, remains for training-time evaluation, and as the tests' reference.)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence

import torch
from monai.inferers import sliding_window_inference

from .config import InferenceConfig
from .slab_stitching import scan_interval, stitch_in_slabs

#: ``() -> bool``, polled before every window: True stops the work with :class:`StopRequested`.
ShouldStop = Callable[[], bool]


class StopRequested(Exception):  # noqa: N818 - a signal, not an error
    """Raised inside inference when its ``should_stop`` callable returns True (the request is gone)."""


def _check(should_stop: ShouldStop | None) -> None:
    if should_stop is not None and should_stop():
        raise StopRequested


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> the first CUDA device when available, else CPU.

    Raises:
        ConfigError: an unknown device name, CUDA requested where there is none, or a GPU index that does not exist.
    """
    from .config import DEVICE_CHOICES
    from .errors import ConfigError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"unknown device {name!r}", hint=f"use {DEVICE_CHOICES}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' requested but CUDA is not available", hint="use --device cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device '{name}' requested but this machine has {torch.cuda.device_count()} GPU(s)",
                          hint=f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}, cuda or auto")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"unsupported device {name!r}", hint=f"use {DEVICE_CHOICES}")
    return device


#: Most sliding windows one volume may need. A whole-body CT at upstream's patch and overlap needs < 100;
#: 10,000 allows overlap 0.9 on large volumes while refusing settings that would run for hours.
MAX_SLIDING_WINDOWS = 10_000


def sliding_window_count(shape: Sequence[int], patch: Sequence[int], overlap: float) -> int:
    """Windows MONAI's ``sliding_window_inference`` runs over a ``shape`` model grid (same step rule)."""
    padded = [max(int(size), int(roi)) for size, roi in zip(shape, patch)]  # smaller grids are padded up
    count = 1
    for size, roi, step in zip(padded, patch, scan_interval(padded, patch, overlap)):
        count *= math.ceil((size - int(roi)) / step) + 1
    return count


def check_window_count(model_shape: Sequence[int], cfg: InferenceConfig, *, uri: str) -> int:
    """Refuse a model grid that needs more than :data:`MAX_SLIDING_WINDOWS` windows; returns the count.

    Raises:
        InputError: ``too_large``, with the count and how to lower it.
    """
    from .errors import InputError

    count = sliding_window_count(model_shape, cfg.patch_size, cfg.overlap)
    if count > MAX_SLIDING_WINDOWS:
        raise InputError(
            f"{uri!r}: its {tuple(int(n) for n in model_shape)} model grid needs {count:,} sliding windows of "
            f"{tuple(cfg.patch_size)} at overlap {cfg.overlap}, above the limit of {MAX_SLIDING_WINDOWS:,}.",
            code="too_large",
            hint="Lower --overlap (upstream uses 0.25) or use a larger --patch-size (upstream: 192,192,128).",
            uri=uri,
            n_windows=count,
            max_windows=MAX_SLIDING_WINDOWS,
        )
    return count


def _autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    """fp16 autocast on CUDA (upstream's ``amp: true``); a no-op on CPU."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


class AutoFeatures(torch.nn.Module):
    """``x -> class_head.image_post_mapping(auto_branch(x))``: [B, C_in, h, w, d] -> [B, F, h, w, d] float32."""

    def __init__(self, network: torch.nn.Module, should_stop: ShouldStop | None = None) -> None:
        super().__init__()
        self.network = network
        self.should_stop = should_stop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check(self.should_stop)
        _, auto = self.network.image_encoder(x, with_point=False, with_label=True)
        return self.network.class_head.image_post_mapping(auto).float()


def class_embeddings(network: torch.nn.Module, class_ids: Sequence[int], device: torch.device) -> torch.Tensor:
    """The class head's MLP-mapped embeddings, [n_classes, F] float32, in prompt order."""
    head = network.class_head
    ids = torch.as_tensor(list(class_ids), dtype=torch.long, device=device)[:, None]  # [n, 1]
    emb = head.class_embeddings(ids)  # [n, 1, F]
    if head.use_mlp:
        emb = head.mlp(emb)
    return emb[:, 0, :].float()


class _StoppablePredictor(torch.nn.Module):
    """The network for the point window inferer, polling ``should_stop`` before every window."""

    def __init__(self, network: torch.nn.Module, should_stop: ShouldStop) -> None:
        super().__init__()
        self.network = network
        self.should_stop = should_stop

    def forward(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201 - the network's own signature
        _check(self.should_stop)
        return self.network(*args, **kwargs)


def stitched_features(network: torch.nn.Module, image: torch.Tensor, cfg: InferenceConfig,
                      device: torch.device, should_stop: ShouldStop | None = None) -> torch.Tensor:
    """Sliding-window the automatic branch over ``image`` [1, C, H, W, D] -> features [F, H, W, D] float32.

    The features stay on ``device`` (stitching on the GPU when there is one, like upstream's
    ``SlidingWindowInfererAdapt``).
    """
    with _autocast(device, cfg.amp):
        out = sliding_window_inference(
            image.to(device),
            roi_size=cfg.patch_size,
            sw_batch_size=cfg.sw_batch_size,
            predictor=AutoFeatures(network, should_stop),
            overlap=cfg.overlap,
            mode="constant",
            padding_mode="replicate",
            sw_device=device,
            device=device,
        )
    return out[0].float()


def compact_label_dtype(max_id: int) -> torch.dtype:
    """The smallest dtype that carries global class ids up to ``max_id`` across stages: uint8 (<= 255, e.g. every
    CT_BODY and MRI_BODY id), else int16 (the catalog's ids end at 345). 8 or 4 times smaller than int64."""
    return torch.uint8 if max_id <= 255 else torch.int16


def argmax_over_classes(features: torch.Tensor, embeddings: torch.Tensor, class_ids: Sequence[int],
                        chunk_size: int) -> torch.Tensor:
    """Upstream's ``VistaPostTransformd`` on logits computed ``chunk_size`` classes at a time.

    Args:
        features: [F, H, W, D] float32 stitched feature map.
        embeddings: [n, F] float32 class embeddings in prompt order.
        class_ids: the n global class ids, in prompt order.
        chunk_size: classes evaluated at once.

    Returns:
        [H, W, D] label map of global ids in :func:`compact_label_dtype`; 0 where no class has a logit > 0. Among
        classes with equal maximal logit the first prompt wins (``torch.argmax`` semantics).
    """
    spatial = features.shape[1:]
    flat = features.reshape(features.shape[0], -1)  # [F, V]
    best = torch.zeros(flat.shape[1], dtype=flat.dtype, device=flat.device)  # threshold: logits > 0
    best_idx = torch.zeros(flat.shape[1], dtype=torch.int64, device=flat.device)  # 0 = background
    for start in range(0, len(class_ids), chunk_size):
        logits = embeddings[start : start + chunk_size] @ flat  # [c, V]
        chunk_max, chunk_arg = logits.max(dim=0)
        del logits
        better = chunk_max > best
        best = torch.where(better, chunk_max, best)
        best_idx = torch.where(better, chunk_arg + (start + 1), best_idx)
    lut = torch.as_tensor([0, *class_ids], dtype=compact_label_dtype(max(class_ids, default=0)), device=flat.device)
    return lut[best_idx].reshape(spatial)


@torch.inference_mode()
def segment_classes(network: torch.nn.Module, image: torch.Tensor, class_ids: Sequence[int], cfg: InferenceConfig,
                    device: torch.device, should_stop: ShouldStop | None = None,
                    fixed_batch: bool = False) -> torch.Tensor:
    """Automatic (class-prompt) segmentation on the model grid, stitched slab by slab
    (:mod:`nvseg_ray.slab_stitching`: memory bounded by the window and the in-plane size, not the scan length).

    Args:
        network: a VISTA3D network already on ``device``.
        image: [1, C, H, W, D] float32 preprocessed volume.
        class_ids: global class ids (already resolved and subclass-expanded), prompt order.
        should_stop: polled before every sliding window; True raises :class:`StopRequested`.
        fixed_batch: every forward pass gets exactly ``cfg.sw_batch_size`` windows (a compiled fixed-shape encoder).

    Returns:
        [H, W, D] label map (global ids, :func:`compact_label_dtype`) on ``device``.
    """
    embeddings = class_embeddings(network, class_ids, device)

    def finish(features: torch.Tensor) -> torch.Tensor:  # [F, H, W, n] final features -> [H, W, n] labels
        return argmax_over_classes(features, embeddings, class_ids, cfg.class_chunk_size)

    with _autocast(device, cfg.amp):
        return stitch_in_slabs(image, AutoFeatures(network, should_stop), finish, cfg.patch_size, cfg.overlap,
                               cfg.sw_batch_size, device, compact_label_dtype(max(class_ids, default=0)),
                               fixed_batch=fixed_batch)


@torch.inference_mode()
def segment_points(network: torch.nn.Module, image: torch.Tensor, class_id: int, points: torch.Tensor,
                   point_labels: torch.Tensor, cfg: InferenceConfig, device: torch.device,
                   special_index: Sequence[int] = (25, 26, 27, 28, 29, 117),
                   should_stop: ShouldStop | None = None) -> torch.Tensor:
    """Point-prompted segmentation of one object through the point head (MONAI's point window inferer).

    Unvalidated for the NV-Segment-CTMR weights (upstream documents CTMR as "automatic only").

    Args:
        image: [1, C, H, W, D] float32 preprocessed volume.
        class_id: the object's global class id (> 132 is zero-shot: the point head runs alone).
        points: [N, 3] model-grid voxel coordinates.
        point_labels: [N] 1 positive / 0 negative.
        should_stop: polled before every point window; True raises :class:`StopRequested`.

    Returns:
        [H, W, D] map (:func:`compact_label_dtype`) with ``class_id`` where the logit > 0, else 0. Voxels no window covered are
        0 (upstream writes 255 there, which collides with real class 255).
    """
    from monai.apps.vista3d.inferer import point_based_window_inferer

    labels = point_labels.clone()
    if class_id in special_index:  # upstream VistaPreTransformd: special classes use labels 2/3
        labels = labels + 2
    supported = class_id <= network.point_head.last_supported
    class_vector = torch.tensor([[class_id]], device=device) if supported else None
    with _autocast(device, cfg.amp):
        logits = point_based_window_inferer(
            inputs=image.to(device),
            roi_size=cfg.patch_size,
            predictor=network if should_stop is None else _StoppablePredictor(network, should_stop),
            point_coords=points[None].to(device),
            point_labels=labels[None].to(device),
            class_vector=class_vector,
            prompt_class=torch.tensor([[class_id]], device=device),
            transpose=True,
        )
    logits = torch.nan_to_num(logits[0, 0].float(), nan=-1.0)
    return torch.where(logits > 0, class_id, 0).to(compact_label_dtype(class_id))
