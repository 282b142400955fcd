"""The upstream NV-Segment-CTMR inference chain, assembled directly from MONAI as its bundle configures it.

This is the *reference* that :mod:`nvseg_ray.engine` is tested and benchmarked against
(``configs/inference.json``; docs/upstream.md, Preprocessing): ``LoadImaged`` -> ``EnsureChannelFirstd``
-> ``EnsureTyped`` -> ``Spacingd`` 1.5 mm bilinear -> ``CropForegroundd`` (> 0, margin 10) -> ``VistaPreTransformd`` (subclass
expansion) -> ``ScaleIntensityRangePercentilesd`` 1..99 -> ``Orientationd`` RAS -> ``CastToTyped`` float32;
``SlidingWindowInfererAdapt`` (roi 192x192x128, MONAI's default overlap 0.25 and constant blending,
replicate padding, ``with_coord``, ``transpose=True``), autocast fp16 on CUDA; ``VistaPostTransformd`` ->
``Invertd`` (nearest) -> NaN -> 255 -> ``SaveImaged`` float32 ``<out>/<stem>/<stem>_trans.nii.gz``.

It is deliberately not optimised: it stitches ``n_prompts x voxels`` float32 logits and inverts with a
full ``grid_sample``, exactly like upstream. Use it to check results, not to run production work.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch
from monai.apps.vista3d.transforms import VistaPostTransformd, VistaPreTransformd
from monai.inferers import SlidingWindowInfererAdapt
from monai.transforms import (
    CastToTyped,
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    EnsureTyped,
    Invertd,
    Lambdad,
    LoadImaged,
    Orientationd,
    SaveImaged,
    ScaleIntensityRangePercentilesd,
    Spacingd,
)

from .config import DEFAULT_PATCH_SIZE, InferenceConfig
from .labels import SUBCLASSES

#: upstream inference.json ``subclass`` (string keys, as MONAI's VistaPreTransformd expects them).
UPSTREAM_SUBCLASS = {str(k): list(v) for k, v in SUBCLASSES.items()}


def upstream_preprocessing(device: str | torch.device = "cpu", subclass: dict | None = UPSTREAM_SUBCLASS) -> Compose:
    """Upstream's ``preprocessing`` Compose on keys ``image`` (+ ``label_prompt``)."""
    return Compose([
        LoadImaged("image", image_only=True),
        EnsureChannelFirstd("image"),
        EnsureTyped("image", device=device, track_meta=True),
        Spacingd("image", pixdim=[1.5, 1.5, 1.5], mode="bilinear"),
        CropForegroundd("image", source_key="image", margin=10, allow_smaller=True),
        VistaPreTransformd("image", subclass=subclass),
        ScaleIntensityRangePercentilesd("image", lower=1, upper=99, b_min=0, b_max=1, clip=True),
        Orientationd("image", axcodes="RAS"),
        CastToTyped("image", dtype=torch.float32),
    ])


def upstream_model_grid_chain(cfg: InferenceConfig | None = None) -> Compose:
    """Upstream's model-grid transforms (``Spacingd`` .. ``CastToTyped``, without the prompt-only
    ``VistaPreTransformd``) on key ``image``, with ``cfg``'s spacing, margin and percentiles (upstream's defaults
    when None): the judge of :func:`nvseg_ray.preprocess.prepare`. Feed it
    :func:`nvseg_ray.preprocess.to_meta_tensor` output; its ``Invertd`` is the judge of inversion."""
    cfg = cfg or InferenceConfig()
    lower, upper = cfg.percentiles
    return Compose([
        Spacingd("image", pixdim=list(cfg.spacing), mode="bilinear"),
        CropForegroundd("image", source_key="image", margin=cfg.crop_margin, allow_smaller=True),
        ScaleIntensityRangePercentilesd("image", lower=lower, upper=upper, b_min=0.0, b_max=1.0, clip=True),
        Orientationd("image", axcodes="RAS", labels=None),
        CastToTyped("image", dtype=torch.float32),
    ])


def upstream_infer(data: dict, network: torch.nn.Module, patch_size: Sequence[int] = DEFAULT_PATCH_SIZE,
                   sw_batch_size: int = 1) -> dict:
    """Sliding-window class-prompt inference; adds ``pred`` [n_prompts, H, W, D] logits to ``data``."""
    label_prompt = torch.as_tensor(data["label_prompt"])
    image = data["image"]
    inferer = SlidingWindowInfererAdapt(roi_size=list(patch_size), sw_batch_size=sw_batch_size, with_coord=True,
                                        padding_mode="replicate")
    amp = torch.autocast("cuda") if image.is_cuda else contextlib.nullcontext()
    with torch.no_grad(), amp:
        logits = inferer(image[None], network, class_vector=label_prompt[:, None].to(image.device), transpose=True)
    data["pred"], data["label_prompt"] = logits[0], label_prompt
    return data


def upstream_postprocessing(preprocessing: Compose, output_dir: str | None = None) -> Compose:
    """``VistaPostTransformd`` -> ``Invertd`` (nearest) -> NaN->255 [-> ``SaveImaged`` float32]."""
    steps = [
        VistaPostTransformd("pred"),
        Invertd("pred", transform=preprocessing, orig_keys="image", nearest_interp=True, to_tensor=True),
        Lambdad("pred", func=lambda x: torch.nan_to_num(x, nan=255)),
    ]
    if output_dir is not None:
        steps.append(SaveImaged("pred", output_dir=output_dir, output_ext=".nii.gz", output_dtype=np.float32,
                                output_postfix="trans", separate_folder=True, resample=False, print_log=False))
    return Compose(steps)


def upstream_segment(path: str, network: torch.nn.Module, prompts: Sequence[int],
                     patch_size: Sequence[int] = DEFAULT_PATCH_SIZE, device: str = "cpu") -> np.ndarray:
    """Run the whole upstream chain on one file; returns the (X, Y, Z) float32 label map on the input grid."""
    pre = upstream_preprocessing(device)
    data = pre({"image": path, "label_prompt": list(prompts)})
    data = upstream_infer(data, network.to(device), patch_size)
    return upstream_postprocessing(pre)(data)["pred"][0].cpu().numpy()
