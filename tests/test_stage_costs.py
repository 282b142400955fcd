"""Per-stage costs: wall seconds, process CPU seconds and peak memory per stage, in every report and manifest row."""

from __future__ import annotations

import json
import pickle

import numpy as np

from nvseg_ray.config import InferenceConfig
from nvseg_ray.output import write_result
from nvseg_ray.timing import STAGES, StageTimings, timed

from .model_helpers import TEST_PATCH, body_phantom, save_volume, segment_once


def test_stage_timings_measure_cpu_and_peak_memory_and_nest():
    timings = StageTimings()
    with timed(timings, "outer"):
        with timed(timings, "inner"):
            block = np.ones(40_000_000)  # 320 MB
            del block
        small = np.ones(1000)
    assert timings["outer"] >= timings["inner"] > 0
    assert timings.cpu_s["inner"] > 0 and timings.cpu_s["outer"] >= timings.cpu_s["inner"]
    # the outer stage keeps the inner stage's peak although the inner one reset the kernel's mark
    assert timings.peak_rss_mb["outer"] >= timings.peak_rss_mb["inner"] > 300
    again = pickle.loads(pickle.dumps(timings))
    assert isinstance(again, StageTimings) and again == timings and again.peak_rss_mb == timings.peak_rss_mb
    plain: dict[str, float] = {}
    with timed(plain, "x"):
        small.sum()
    assert set(plain) == {"x"}  # a plain dict only gets wall seconds


def test_report_carries_cpu_seconds_and_peak_memory_per_stage(tiny_checkpoint, tmp_path):
    path = tmp_path / "ct.nii.gz"
    save_volume(path, body_phantom((40, 36, 18), seed=2), np.diag([1.5, 1.5, 3.0, 1.0]))
    cfg = InferenceConfig(checkpoint=tiny_checkpoint, patch_size=TEST_PATCH, device="cpu", classes=["liver"])
    result = segment_once(cfg, path)
    out = tmp_path / "out" / "ct_trans.nii.gz"
    write_result(result, input_uri=str(path), output_uri=str(out), cfg=cfg, model_uri=None, model_sha256=None)
    report = json.loads(out.with_name("ct_trans.json").read_text())
    for stage in ("read", "preprocess", "infer", "postprocess", "write"):
        assert stage in STAGES
        assert report["cpu_s"][stage] >= 0 and report["peak_rss_mb"][stage] > 50, stage
    assert report["cpu_s"]["infer"] > 0
