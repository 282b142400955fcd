"""Upstream parity, chunking, geometry and end-to-end tests of the inference engine (tiny model, CPU): the
model-free stages (:mod:`nvseg_ray.stages`), the model runner and :func:`nvseg_ray.engine.segment_volume`."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from nvseg_ray.config import InferenceConfig
from nvseg_ray.engine import segment_volume
from nvseg_ray.inference import argmax_over_classes
from nvseg_ray.labels import LabelCatalog
from nvseg_ray.model_runner import ModelRunner
from nvseg_ray.output import mask_uri, write_result
from nvseg_ray.prompts import resolve_prompts
from nvseg_ray.stages import VolumeStages
from nvseg_ray.upstream import upstream_segment

from .model_helpers import TEST_PATCH, body_phantom, save_volume, segment_once

def upstream_reference(path: str, network: torch.nn.Module, prompts: list[int]) -> np.ndarray:
    return upstream_segment(path, network, prompts, patch_size=TEST_PATCH)


def make_cfg(checkpoint: str, **kw) -> InferenceConfig:
    return InferenceConfig(checkpoint=checkpoint, patch_size=TEST_PATCH, device="cpu", **kw)


# orientation x spacing x shape table (affine columns permuted/flipped, oblique rotation, odd sizes)
def _rot(deg: float) -> np.ndarray:
    a = np.deg2rad(deg)
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])


GEOMETRIES = {
    "RAS": (np.diag([1.2, 1.2, 2.5]), (61, 53, 29)),
    "LPS": (np.diag([-0.9, -0.9, 3.0]), (72, 67, 23)),
    "LAS": (np.diag([-1.1, 1.3, 2.0]), (57, 49, 31)),
    "PIR-permuted": (np.array([[0, 0, 1.7], [-1.4, 0, 0], [0, -1.6, 0]]), (41, 45, 47)),
    "oblique": (_rot(17) @ np.diag([1.0, 1.1, 2.2]), (59, 55, 27)),
}


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_parity_with_upstream_chain_and_exact_grid(name, tiny_checkpoint, tmp_path):
    linear, shape = GEOMETRIES[name]
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = [-40.0, 25.0, 12.0]
    path = save_volume(tmp_path / f"{name}.nii.gz", body_phantom(shape), affine)
    prompts = [1, 3, 5, 6, 7, 2]  # 2 expands into 14, 5 (5 then duplicates: dropped, first wins anyway)

    cfg = make_cfg(tiny_checkpoint, classes=prompts)
    runner = ModelRunner(cfg)
    result = segment_volume(str(path), VolumeStages(cfg), runner)
    reference = upstream_reference(str(path), runner.model.network, prompts)

    assert result.labels.shape == shape == reference.shape
    agree = np.mean(result.labels == reference)
    assert agree >= 0.999, f"{name}: only {agree:.5f} of voxels agree with the upstream chain"
    assert len(np.unique(reference)) > 2, "phantom/model too weak to make this test meaningful"

    out = mask_uri(str(path), str(tmp_path / "out"), cfg)
    write_result(result, input_uri=str(path), output_uri=out, cfg=cfg, model_uri=cfg.checkpoint, model_sha256="x")
    src, written = nib.load(str(path)), nib.load(out)
    assert written.shape == src.shape
    np.testing.assert_allclose(written.affine, src.affine, atol=1e-6)
    np.testing.assert_allclose(written.header.get_qform(), src.header.get_qform(), atol=1e-6)
    np.testing.assert_allclose(written.header.get_sform(), src.header.get_sform(), atol=1e-6)
    assert written.get_data_dtype() == np.uint16
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), result.labels)


@pytest.mark.parametrize("chunk", [1, 3, 7, 117])
def test_class_chunking_is_identical(chunk):
    torch.manual_seed(0)
    features = torch.randn(8, 9, 10, 11)
    ids = LabelCatalog.default().everything_ids("CT_BODY")
    emb = torch.randn(len(ids), 8)
    full = argmax_over_classes(features, emb, ids, chunk_size=len(ids))
    logits = torch.einsum("cf,fxyz->cxyz", emb, features)
    expect = torch.as_tensor([0, *ids])[torch.where(logits.max(0).values > 0, logits.argmax(0) + 1, 0)]
    assert full.dtype == torch.uint8  # compact: every id <= 255
    torch.testing.assert_close(full, expect.to(torch.uint8))
    torch.testing.assert_close(argmax_over_classes(features, emb, ids, chunk_size=chunk), full)


def test_everything_mode_chunked_end_to_end(tiny_checkpoint, tmp_path):
    path = save_volume(tmp_path / "ct.nii.gz", body_phantom((48, 44, 26)), np.diag([1.5, 1.5, 3.0, 1.0]))
    results = {}
    for chunk in (5, 200):
        results[chunk] = segment_once(make_cfg(tiny_checkpoint, modality="CT_BODY", class_chunk_size=chunk),
                                      path).labels
    np.testing.assert_array_equal(results[5], results[200])
    assert set(np.unique(results[5])) - {0} <= set(LabelCatalog.default().everything_ids("CT_BODY"))


def test_report_contents(tiny_checkpoint, tmp_path):
    path = save_volume(tmp_path / "scan.nii.gz", body_phantom((40, 40, 20)), np.diag([1.5, 1.5, 3.0, 1.0]))
    cfg = make_cfg(tiny_checkpoint, classes=["liver", "Spleen"], output_layout="flat", output_postfix="seg")
    runner = ModelRunner(cfg)
    result = segment_volume(str(path), VolumeStages(cfg), runner)
    out = mask_uri(str(path), str(tmp_path / "o"), cfg)
    assert out.endswith("o/scan_seg.nii.gz")
    report = write_result(result, input_uri=str(path), output_uri=out, cfg=cfg, model_uri=cfg.checkpoint,
                          model_sha256=runner.model.sha256)
    on_disk = json.loads((tmp_path / "o" / "scan_seg.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert on_disk["prompts"]["class_ids"] == [1, 3]
    assert set(on_disk["timings_s"]) == {"read", "preprocess", "infer", "postprocess", "qc", "write"}
    assert len(on_disk["model"]["sha256"]) == 64
    for row in on_disk["labels"]:
        assert row["voxels"] == int(np.sum(result.labels == row["id"]))
        assert row["volume_ml"] == pytest.approx(row["voxels"] * 1.5 * 1.5 * 3.0 / 1000, rel=1e-4)
        assert row["name"] in ("liver", "spleen")


def test_float32_output_matches_upstream_dtype(tiny_checkpoint, tmp_path):
    path = save_volume(tmp_path / "a.nii", body_phantom((30, 30, 16)), np.diag([2.0, 2.0, 3.0, 1.0]))
    cfg = make_cfg(tiny_checkpoint, classes=[1, 3], output_dtype="float32")
    result = segment_once(cfg, path)
    assert result.labels.dtype == np.float32


def test_point_prompts_run_through_the_point_head(tiny_checkpoint, tmp_path):
    path = save_volume(tmp_path / "p.nii.gz", body_phantom((50, 46, 24)), np.diag([1.5, 1.5, 3.0, 1.0]))
    cfg = make_cfg(tiny_checkpoint, classes=["liver"], points=[(25, 23, 12), (10, 10, 5)], point_labels=[1, 0])
    result = segment_once(cfg, path)
    assert result.labels.shape == (50, 46, 24)
    assert set(np.unique(result.labels)) <= {0, 1}  # the class id where the logit > 0; never 255
    assert result.prompts.class_ids == (1,) and result.prompts.with_points


def test_points_need_exactly_one_class(tiny_checkpoint):
    from nvseg_ray.errors import PromptError

    with pytest.raises(PromptError, match="exactly one class"):
        resolve_prompts(make_cfg(tiny_checkpoint, modality="CT_BODY", points=[(1, 2, 3)]), LabelCatalog.default())


def test_stages_then_runner_equal_segment_volume_and_the_label_array_is_compact(tiny_checkpoint, tmp_path):
    """The CPU stages need no model (a config without a checkpoint runs them); the runner's answer is a numpy
    array on the model grid in the integer dtype inference produced, and ``finish`` takes any integer dtype."""
    path = save_volume(tmp_path / "s.nii.gz", body_phantom((44, 40, 20)), np.diag([1.5, 1.5, 3.0, 1.0]))
    cfg = make_cfg(tiny_checkpoint, classes=["liver", "spleen"])
    stages = VolumeStages(cfg.model_copy(update={"checkpoint": None}))
    assert not hasattr(stages, "model")
    prompts = resolve_prompts(cfg, stages.catalog)
    volume = stages.read(str(path))
    prepared = stages.prepare(volume, modality=prompts.modality)
    runner = ModelRunner(cfg)
    timings: dict[str, float] = {}
    labels = runner.infer(prepared, prompts, timings)
    assert isinstance(labels, np.ndarray) and labels.shape == prepared.model_shape
    assert labels.dtype.kind in "iu" and set(np.unique(labels).tolist()) <= {0, *prompts.class_ids}
    assert timings["infer"] > 0
    finished = stages.finish(labels, prepared, volume, prompts)
    for dtype in (np.uint8, np.int16, np.int64):
        np.testing.assert_array_equal(stages.finish(labels.astype(dtype), prepared, volume, prompts).labels,
                                      finished.labels)
    readonly = labels.copy()
    readonly.flags.writeable = False  # as Ray's object store hands arrays over
    np.testing.assert_array_equal(stages.finish(readonly, prepared, volume, prompts).labels, finished.labels)
    np.testing.assert_array_equal(segment_volume(str(path), stages, runner, prompts).labels, finished.labels)


def test_runner_without_checkpoint_is_a_config_error():
    from nvseg_ray.errors import ConfigError

    with pytest.raises(ConfigError, match="no checkpoint given"):
        ModelRunner(InferenceConfig(device="cpu")).model
