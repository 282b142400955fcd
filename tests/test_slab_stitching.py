"""Slab-by-slab stitching equals MONAI's whole-grid ``sliding_window_inference`` (upstream's), on a geometry table.

MONAI is the judge: same windows, replicate padding of grids smaller than the window, constant blending. The
predictor is a small random 3-D convolution (zero-padded at each window's border, so overlapping windows
disagree and the blending is really tested); one case runs the tiny VISTA3D through the engine's path.
"""

from __future__ import annotations

import pytest
import torch
from monai.inferers import sliding_window_inference

from nvseg_ray.config import InferenceConfig
from nvseg_ray.inference import argmax_over_classes, class_embeddings, segment_classes, stitched_features
from nvseg_ray.slab_stitching import stitch_in_slabs

ROI = (16, 12, 10)

# (model-grid shape H, W, D; overlap; windows per predictor call)
CASES = {
    "smaller-than-window": ((9, 7, 5), 0.25, 1),
    "smaller-in-plane-long-scan": ((10, 12, 47), 0.25, 2),
    "exactly-one-window": (ROI, 0.25, 1),
    "several-windows-every-axis": ((37, 29, 41), 0.25, 3),
    "half-overlap-odd": ((33, 13, 31), 0.5, 4),
    "no-overlap": ((32, 24, 30), 0.0, 1),
    "heavy-overlap": ((20, 15, 23), 0.8, 5),
}


def _predictor(channels: int = 6, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Conv3d(1, channels, kernel_size=3, padding=1).eval()


def _monai(image: torch.Tensor, predictor, overlap: float, sw_batch_size: int) -> torch.Tensor:
    return sliding_window_inference(image, roi_size=ROI, sw_batch_size=sw_batch_size, predictor=predictor,
                                    overlap=overlap, mode="constant", padding_mode="replicate")[0]


@pytest.mark.parametrize("fixed_batch", [False, True])
@pytest.mark.parametrize("name", CASES)
@torch.inference_mode()
def test_features_equal_monai_whole_grid(name, fixed_batch):
    shape, overlap, batch = CASES[name]
    image = torch.rand((1, 1, *shape), generator=torch.Generator().manual_seed(1))
    predictor = _predictor()
    expected = _monai(image, predictor, overlap, batch)  # [F, H, W, D]
    pieces: list[torch.Tensor] = []
    batches: list[int] = []

    def keep(features: torch.Tensor) -> torch.Tensor:
        pieces.append(features.clone())
        return torch.zeros(features.shape[1:], dtype=torch.int64)

    def counted(x: torch.Tensor) -> torch.Tensor:
        batches.append(x.shape[0])
        return predictor(x)

    labels = stitch_in_slabs(image, counted, keep, ROI, overlap, batch, torch.device("cpu"), fixed_batch=fixed_batch)
    if fixed_batch:  # a compiled fixed-shape encoder sees one input shape only; the padding changes nothing
        assert set(batches) == {batch}
    got = torch.cat(pieces, dim=-1)
    # the finished slabs tile the (padded) grid; the padding is cut from the labels only
    assert labels.shape == shape and got.shape[-1] >= shape[-1]
    pad = [max(r - s, 0) // 2 for r, s in zip(ROI, shape)]
    got = got[:, pad[0] : pad[0] + shape[0], pad[1] : pad[1] + shape[1], pad[2] : pad[2] + shape[2]]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    if shape[2] > ROI[2]:
        assert len(pieces) > 1  # really stitched in slabs


@torch.inference_mode()
def test_slab_labels_equal_the_whole_grid_path_with_the_tiny_model(tiny_checkpoint):
    """The engine's path (slabs) against MONAI's whole-grid features + the same class-chunked argmax."""
    from nvseg_ray.model import load_model

    cfg = InferenceConfig(checkpoint=tiny_checkpoint, patch_size=(32, 32, 16), overlap=0.25, class_chunk_size=7)
    model = load_model(tiny_checkpoint)
    image = torch.rand((1, 1, 40, 36, 45), generator=torch.Generator().manual_seed(3))
    ids = list(range(1, 40))
    device = torch.device("cpu")
    reference = argmax_over_classes(stitched_features(model.network, image, cfg, device),
                                    class_embeddings(model.network, ids, device), ids, cfg.class_chunk_size)
    labels = segment_classes(model.network, image, ids, cfg, device)
    assert labels.dtype == torch.uint8 and labels.shape == reference.shape  # compact: ids <= 255
    agree = (labels == reference).float().mean().item()
    assert agree >= 0.9999, agree
