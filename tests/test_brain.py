"""Brain T1 workflow: synthetic heads made from the ICBM152 template (nilearn, 2 mm here for speed) plus a
generated skull/scalp shell, moved by known transforms onto anisotropic, oblique grids."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from nvseg_ray.brain.registration import map_points, register_affine
from nvseg_ray.brain.revert import template_to_input_grid
from nvseg_ray.brain.skullstrip import atlas_mask
from nvseg_ray.config import BrainConfig, InferenceConfig
from nvseg_ray.errors import ConfigError, InputError
from nvseg_ray.output import write_result

from .brain_helpers import HEAD_CASES, brain_corners, make_head, save_head, template_of
from .model_helpers import TEST_PATCH, body_phantom, save_volume, segment_once

#: a few MRI_BRAIN classes keep the tiny model's class head cheap (the everything-set is 132 classes).
BRAIN_CLASSES = [214, 215, 260, 345]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2.0 * (a & b).sum() / max(a.sum() + b.sum(), 1))


@pytest.fixture(scope="session")
def template(template_paths):
    return template_of(template_paths)


def brain_cfg(checkpoint: str, template_paths, **brain) -> InferenceConfig:
    return InferenceConfig(checkpoint=checkpoint, modality="MRI_BRAIN", classes=BRAIN_CLASSES, patch_size=TEST_PATCH,
                           device="cpu", brain={"template": template_paths[0], "template_mask": template_paths[1],
                                                **brain})


@pytest.mark.parametrize("case", sorted(HEAD_CASES))
def test_registration_recovers_the_transform_and_atlas_strip_recovers_the_brain(template, case):
    head = make_head(template, case)
    reg = register_affine(head.array, head.affine, template)
    corners = brain_corners(template)
    residual = np.linalg.norm(map_points(reg.template_to_input, corners) - map_points(head.template_to_head, corners),
                              axis=1)
    assert residual.max() < 2.0, f"{case}: residual at the brain's corners {residual.round(2)} mm"
    mask = atlas_mask(template, reg.template_to_input, head.array.shape, head.affine)
    assert dice(mask, head.brain_mask) >= 0.9


def test_revert_lands_where_the_known_inverse_puts_it(template, template_paths, tiny_checkpoint):
    """Labels drawn in template space, reverted through the *estimated* transform, against the same labels
    mapped through the *known* one, on the exact input grid."""
    from nvseg_ray.brain import prepare_brain, revert_to_input

    head = make_head(template, "rot-scale-oblique")
    image = nib.Nifti1Image(head.array, head.affine)
    _, record = prepare_brain(head.array, head.affine, image, BrainConfig(template=template_paths[0],
                                                                          template_mask=template_paths[1]), uri="head")
    x = np.arange(template.shape[0])[:, None, None]
    labels = np.where(template.mask, np.where(x < template.shape[0] // 2, 214, 345), 0).astype(np.uint16)
    reverted = revert_to_input(labels, record)
    truth = template_to_input_grid(labels, template.affine, head.template_to_head, head.array.shape, head.affine)
    assert reverted.shape == head.array.shape and reverted.dtype == np.uint16
    for label in (214, 345):
        assert dice(reverted == label, truth == label) >= 0.95
    assert set(np.unique(reverted)) <= {0, 214, 345}


def test_uint8_head_gives_integer_brain_labels_on_the_exact_input_grid(template, template_paths, tiny_checkpoint,
                                                                        tmp_path):
    head = make_head(template, "thick-slices-shrunk", as_uint8=True)
    path = save_head(tmp_path / "head_u8.nii.gz", head)
    source = nib.load(path)
    assert source.get_data_dtype() == np.uint8
    cfg = brain_cfg(tiny_checkpoint, template_paths)
    result = segment_once(cfg, path)
    out = tmp_path / "head_u8_trans.nii.gz"
    report = write_result(result, input_uri=str(path), output_uri=str(out), cfg=cfg, model_uri=None,
                          model_sha256=None)
    mask = nib.load(out)
    values = np.asanyarray(mask.dataobj)
    assert mask.get_data_dtype() == np.uint16 and values.dtype == np.uint16
    assert mask.shape == source.shape
    np.testing.assert_allclose(mask.affine, source.affine, atol=1e-5)
    np.testing.assert_allclose(mask.get_qform(), source.get_qform(), atol=1e-5)
    np.testing.assert_allclose(mask.get_sform(), source.get_sform(), atol=1e-5)
    assert not np.isfinite(mask.header["scl_slope"]) or mask.header["scl_slope"] in (0, 1)
    found = set(np.unique(values).tolist())
    assert found - {0} and found - {0} <= set(BRAIN_CLASSES), found
    # the transform and quality figures travel with the output
    brain = report["brain"]
    assert json.loads((tmp_path / "head_u8_trans.json").read_text())["brain"]["template_to_input"] == \
        brain["template_to_input"]
    assert brain["correlation"] > 0.9 and 1000 < brain["brain_ml"] < 2500
    assert {"brain_skullstrip", "brain_bias_correct", "brain_register", "brain_revert"} <= set(result.timings)


def test_brain_preprocess_none_is_upstreams_manual_mode(template_paths, tiny_checkpoint, tmp_path):
    path = save_volume(tmp_path / "aligned.nii.gz", body_phantom((40, 44, 36), seed=3) + 1000.0, np.eye(4))
    cfg = brain_cfg(tiny_checkpoint, template_paths, preprocess="none")
    result = segment_once(cfg, path)
    assert result.brain is None and "brain_skullstrip" not in result.timings
    assert result.labels.shape == (40, 44, 36)


def test_ct_is_refused_as_not_t1(template_paths, tiny_checkpoint, tmp_path):
    path = save_volume(tmp_path / "ct.nii.gz", body_phantom((40, 44, 36), seed=1), np.diag([1.2, 1.2, 1.5, 1.0]))
    with pytest.raises(InputError, match="looks like a CT") as err:
        segment_once(brain_cfg(tiny_checkpoint, template_paths), path)
    assert err.value.code == "not_t1_like"


def test_noise_volume_fails_the_quality_checks(template_paths, tiny_checkpoint, tmp_path):
    noise = np.random.default_rng(0).uniform(0, 100, (70, 80, 60)).astype(np.float32)
    path = save_volume(tmp_path / "noise.nii.gz", noise, np.diag([2.0, 2.0, 2.0, 1.0]))
    with pytest.raises(InputError) as err:
        segment_once(brain_cfg(tiny_checkpoint, template_paths), path)
    assert err.value.code in {"registration_failed", "not_t1_like", "empty_brain_mask"}, err.value


def test_command_backend_runs_a_tool_and_reports_a_missing_one(template, template_paths, tiny_checkpoint, tmp_path):
    head = make_head(template, "aligned-iso")
    path = save_head(tmp_path / "head.nii.gz", head)
    np.save(tmp_path / "truth.npy", head.brain_mask)
    tool = tmp_path / "fake_synthstrip.py"  # stands in for mri_synthstrip: writes the true mask
    tool.write_text(
        "import sys, numpy as np, nibabel as nib\n"
        "args = dict(zip(sys.argv[1::2], sys.argv[2::2]))\n"
        "img = nib.load(args['-i'])\n"
        f"mask = np.load({str(tmp_path / 'truth.npy')!r}).astype(np.uint8)\n"
        "nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj) * mask, img.affine), args['-o'])\n"
        "nib.save(nib.Nifti1Image(mask, img.affine), args['-m'])\n")
    command = f"{sys.executable} {tool} -i {{input}} -o {{output}} -m {{mask}}"
    result = segment_once(brain_cfg(tiny_checkpoint, template_paths, skull_strip="command",
                                    skull_strip_command=command), path)
    assert result.brain["skull_strip"] == "command" and result.brain["correlation"] > 0.9

    missing = brain_cfg(tiny_checkpoint, template_paths, skull_strip="command",
                        skull_strip_command="mri_synthstrip_not_installed -i {input} -o {output}")
    with pytest.raises(InputError, match="not installed or not on PATH") as err:
        segment_once(missing, path)
    assert err.value.code == "skull_strip_tool_missing"


def test_brain_config_errors_are_clear():
    with pytest.raises(ConfigError, match="needs skull_strip_command"):
        InferenceConfig.from_sources(None, brain={"skull_strip": "command"})
    with pytest.raises(ConfigError, match="placeholders"):
        InferenceConfig.from_sources(None, brain={"skull_strip": "command", "skull_strip_command": "strip in out"})
    cfg = InferenceConfig.from_sources(None, modality="mri_brain", brain={"skull_strip": "none"})
    assert cfg.uses_brain_workflow() and not cfg.uses_brain_workflow("CT_BODY")
    assert cfg.brain.skull_strip == "none" and cfg.brain.bias_correction  # merged with the defaults


def test_batch_job_segments_a_brain_cohort_with_one_broken_scan(template, template_paths, tiny_checkpoint, tmp_path,
                                                                 ray_cluster):
    import pandas as pd

    from nvseg_ray.batch.cli import main as batch_main

    cohort = tmp_path / "heads"
    cohort.mkdir()
    heads = {"sub-01_T1w.nii.gz": make_head(template, "rot-scale-oblique", seed=1),
             "sub-02_T1w.nii.gz": make_head(template, "thick-slices-shrunk", as_uint8=True, seed=2)}
    for name, head in heads.items():
        save_head(cohort / name, head)
    save_volume(cohort / "sub-03_ct.nii.gz", body_phantom((40, 44, 36), seed=1), np.diag([1.2, 1.2, 1.5, 1.0]))
    out = tmp_path / "masks"
    code = batch_main(["--input", str(cohort), "--output", str(out), "--checkpoint", tiny_checkpoint,
                       "--modality", "MRI_BRAIN", "--classes", ",".join(map(str, BRAIN_CLASSES)),
                       "--patch-size", ",".join(map(str, TEST_PATCH)), "--device", "cpu",
                       "--brain-template", template_paths[0], "--brain-template-mask", template_paths[1],
                       "--max-failures", "1", "--no-progress-bars", "--run-name", "brain"])
    assert code == 0  # one failure tolerated
    manifest = pd.read_parquet(out / "_nvseg_runs" / "brain" / "manifest.parquet")
    rows = {Path(r["uri"]).name: r for r in manifest.to_dict("records")}
    assert rows["sub-03_ct.nii.gz"]["status"] == "failed" and rows["sub-03_ct.nii.gz"]["error_code"] == "not_t1_like"
    for name, head in heads.items():
        row = rows[name]
        assert row["status"] == "ok", row["error_message"]
        assert row["t_brain_skullstrip"] > 0 and row["t_brain_register"] > 0 and row["t_brain_revert"] > 0
        assert row["t_preprocess"] >= row["t_brain_skullstrip"] + row["t_brain_register"]
        assert row["registration_correlation"] > 0.9 and 1000 < row["brain_ml"] < 2500
        mask = nib.load(row["output_uri"])
        assert mask.shape == head.array.shape and mask.get_data_dtype() == np.uint16
        np.testing.assert_allclose(mask.affine, head.affine, atol=1e-5)


def test_brain_settings_key_only_brain_outputs():
    """Batch resume keys: brain settings change MRI_BRAIN outputs' keys, never those of CT or body MRI."""
    base, other = InferenceConfig(), InferenceConfig(brain={"skull_strip": "none"})
    assert base.resume_key_fields("CT_BODY") == other.resume_key_fields("CT_BODY")
    assert base.resume_key_fields("MRI_BRAIN") != other.resume_key_fields("MRI_BRAIN")
