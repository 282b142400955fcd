"""Every shipped config file loads and validates; defaults are pinned; bad configs fail clearly."""

from __future__ import annotations

from pathlib import Path

import pytest

from nvseg_ray import config as cfgmod
from nvseg_ray.config import InferenceConfig
from nvseg_ray.errors import ConfigError, PromptError

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p for p in (REPO / "configs").glob("*.yaml"))
#: which typed config each shipped file is (serve_apps/config.yaml is checked in tests/test_serve.py)
VALIDATORS = {"inference.yaml": InferenceConfig.from_sources,
              "batch_segment.yaml": lambda path: __import__("nvseg_ray.batch.config", fromlist=["x"])
              .BatchConfig.from_sources(path).inference,
              "train_finetune.yaml": lambda path: __import__("nvseg_ray.training.config", fromlist=["x"])
              .TrainConfig.from_sources(path)}


def test_there_are_shipped_configs():
    assert SHIPPED


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_validates(path):
    assert path.name in VALIDATORS, f"add a validator for the new config file {path.name}"
    cfg = VALIDATORS[path.name](path)
    assert all(s % cfgmod.PATCH_DIVISOR == 0 for s in cfg.patch_size)


def test_upstream_effective_defaults_are_pinned():
    cfg = InferenceConfig()
    assert cfg.spacing == (1.5, 1.5, 1.5)
    assert cfg.crop_margin == 10
    assert cfg.percentiles == (1.0, 99.0)
    assert cfg.patch_size == (192, 192, 128)
    assert cfg.overlap == 0.25  # upstream configures 0.3 but it never reaches the inferer (UPSTREAM.md §12.4)
    assert cfg.sw_batch_size == 1
    assert cfg.output_dtype == "uint16" and cfg.output_postfix == "trans" and cfg.output_layout == "nested"
    assert cfg.modality is None  # upstream silently defaults to MRI_BODY; we ask


def test_flags_override_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("modality: mri_body\noverlap: 0.5\n")
    cfg = InferenceConfig.from_sources(path, overlap=0.1, classes=None)
    assert cfg.modality == "MRI_BODY" and cfg.overlap == 0.1


@pytest.mark.parametrize("text,match", [
    ("patch_size: [192, 198, 128]\n", "multiple of 16"),  # upstream train.json's typo
    ("overlap: 1.5\n", "overlap"),
    ("modality: CT\n", "modality"),
    ("percentiles: [99, 1]\n", "lower < upper"),
    ("no_such_option: 1\n", "no_such_option"),
    ("points: [[1, 2, 3]]\npoint_labels: [1, 0]\n", "1 points but 2 point labels"),
    ("- a list\n", "mapping"),
    ("modality: [unclosed\n", "not valid YAML"),
])
def test_bad_config_is_a_clear_error(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises((ConfigError, PromptError), match=match) as err:  # prompt problems: invalid_prompt
        InferenceConfig.from_sources(path)
    assert str(path) in str(err.value) and err.value.exit_code == 2
