"""Validation Dice of a finetuning run: per volume (:func:`dice_sums`) and all-reduced over the DDP ranks
(:func:`validate`)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .config import TrainConfig


def dice_sums(logits: torch.Tensor, label: torch.Tensor, class_ids: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Per-class Dice of ``logits > 0`` against ``label == class`` for one volume.

    Args:
        logits: [n, H, W, D] float, one channel per entry of ``class_ids``.
        label: [H, W, D] integer global ids.

    Returns:
        ``(dice, valid)``: float64 [n] Dice values and [n] 1.0/0.0 flags; a class absent from both the
        prediction and the ground truth is not counted (valid 0), as MONAI's ``DiceMetric(ignore_empty)``.
    """
    dice = np.zeros(len(class_ids))
    valid = np.zeros(len(class_ids))
    for i, cid in enumerate(class_ids):
        pred = logits[i] > 0
        gt = label == cid
        denom = float(pred.sum() + gt.sum())
        if gt.any():
            dice[i] = 2.0 * float((pred & gt).sum()) / denom
            valid[i] = 1.0
    return dice, valid


def all_reduce(values: np.ndarray) -> np.ndarray:
    """Sum of a float64 [k] array over the DDP ranks (``values`` itself without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    t = torch.as_tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.cpu().numpy()


def validate(net: torch.nn.Module, loader: Any, cfg: TrainConfig, device: torch.device) -> dict[str, float]:
    """All-reduced per-class and mean Dice of the automatic branch over this rank's validation volumes.

    Every rank must call it (the sums are all-reduced), also one whose share of the volumes is empty.
    Sliding window over each volume on the model grid, class prompts = ``cfg.global_ids``, mask = logit > 0.
    Returns ``val_dice_<id>`` per class (NaN: absent from every volume) and ``val_mean_dice`` (over the
    finite ones)."""
    from ..config import InferenceConfig
    from ..inference import class_embeddings, stitched_features

    icfg = InferenceConfig(patch_size=cfg.patch_size, overlap=cfg.val_overlap, amp=cfg.amp)
    ids = cfg.global_ids
    sums = np.zeros(2 * len(ids))
    net.eval()
    with torch.inference_mode():
        emb = class_embeddings(net, ids, device)  # [n, F]
        for batch in loader:
            for b in range(batch["image"].shape[0]):
                feats = stitched_features(net, batch["image"][b : b + 1].float(), icfg, device)  # [F, H, W, D]
                logits = torch.einsum("nf,fhwd->nhwd", emb, feats)
                dice, valid = dice_sums(logits.cpu(), batch["label"][b, 0].long(), ids)
                sums += np.concatenate([dice, valid])
    net.train()
    sums = all_reduce(sums)
    dice_sum, count = sums[: len(ids)], sums[len(ids) :]
    out: dict[str, float] = {}
    per_class = []
    for cid, s, c in zip(ids, dice_sum, count):
        value = float(s / c) if c > 0 else float("nan")
        out[f"val_dice_{cid}"] = value
        per_class.append(value)
    finite = [v for v in per_class if math.isfinite(v)]
    out["val_mean_dice"] = float(np.mean(finite)) if finite else float("nan")
    return out
