"""Tiny VISTA3D checkpoints and phantom volumes for tests (generated, never downloaded).

The generators live in :mod:`nvseg_ray.synthetic` (shared with the benchmarks); the names are re-exported here
so the tests keep importing them from one place.
"""

from __future__ import annotations

from pathlib import Path

from nvseg_ray.config import InferenceConfig
from nvseg_ray.dicom.series import DicomSeries
from nvseg_ray.engine import segment_volume
from nvseg_ray.model_runner import ModelRunner
from nvseg_ray.prompts import Prompts
from nvseg_ray.stages import SegmentationResult, VolumeStages
from nvseg_ray.synthetic import TINY_WIDTH, body_phantom, save_volume
from nvseg_ray.synthetic import tiny_state_dict as make_tiny_state_dict

__all__ = ["TEST_PATCH", "TINY_WIDTH", "body_phantom", "make_tiny_state_dict", "save_volume", "segment_once"]

#: small sliding-window patch for CPU tests (multiple of 16, like the real 192x192x128).
TEST_PATCH = (48, 48, 32)


def segment_once(cfg: InferenceConfig, source: str | Path | DicomSeries,
                 prompts: Prompts | None = None) -> SegmentationResult:
    """Every stage of one volume in-process (what ``nvseg segment`` runs), with fresh stages and a fresh model."""
    return segment_volume(str(source) if isinstance(source, Path) else source, VolumeStages(cfg), ModelRunner(cfg),
                          prompts)
