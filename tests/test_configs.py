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
    # upstream configures 0.3 but it never reaches the inferer (docs/upstream.md, Upstream bugs, item 4)
    assert cfg.overlap == 0.25
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


# ------------------------------------------------------------------ one source per default


def test_each_engine_default_is_defined_once():
    """DEFAULT_MAX_VOXELS lived in config.py, io.py and as a literal in serving/service.py; ServeSettings
    re-declared the engine's types and values. Now config.py owns them and the others read them."""
    import re

    from nvseg_ray import io as nio
    from nvseg_ray import validation
    from nvseg_ray.serving.service import ServeSettings

    sources = {p: p.read_text() for p in (REPO / "nvseg_ray").rglob("*.py")}
    defined = [p.relative_to(REPO).as_posix() for p, text in sources.items()
               if re.search(r"^DEFAULT_MAX_VOXELS\s*=", text, re.M)]
    assert defined == ["nvseg_ray/config.py"]
    assert [p.name for p, text in sources.items() if "1024**3 // 2" in text] == ["config.py"]
    assert nio.DEFAULT_MAX_VOXELS is validation.DEFAULT_MAX_VOXELS is cfgmod.DEFAULT_MAX_VOXELS
    serve = ServeSettings(checkpoint="model.pt")
    engine = InferenceConfig()
    shared = set(ServeSettings.model_fields) & set(InferenceConfig.model_fields) - {"checkpoint"}
    assert {"device", "patch_size", "sw_batch_size", "class_chunk_size", "amp", "output_dtype", "max_voxels"} <= shared
    for name in shared - {"brain"}:
        assert getattr(serve, name) == getattr(engine, name), name
    assert ServeSettings.model_fields["default_modality"].annotation == cfgmod.Modality
    assert ServeSettings.model_fields["output_dtype"].annotation == cfgmod.OutputDType


@pytest.mark.parametrize("bad", [{"patch_size": [1024, 16, 16]}, {"patch_size": [100, 96, 96]},
                                 {"sw_batch_size": cfgmod.MAX_SW_BATCH_SIZE + 1}])
def test_serve_and_evaluation_settings_use_the_engine_rules(bad):
    """The Serve app's settings and the evaluation config apply the engine's own patch-size and window-batch
    rules when they are read (ServeSettings checked no patch at all; evaluation only the multiple of 16)."""
    from nvseg_ray.evaluation import EvaluateConfig
    from nvseg_ray.serving.service import ServeSettings

    with pytest.raises(ConfigError):
        ServeSettings.from_args({"checkpoint": "model.pt", **bad})
    if "patch_size" in bad:
        with pytest.raises(ConfigError, match="patch"):
            EvaluateConfig.from_options(datalist="d.json", checkpoint="m.pt", output="out", **bad)
