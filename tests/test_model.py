"""Checkpoint formats, architecture detection and clear errors."""

from __future__ import annotations

import pytest
import torch

from nvseg_ray.errors import CheckpointError
from nvseg_ray.model import architecture_from_state_dict, load_model

from .model_helpers import make_tiny_state_dict


@pytest.fixture(scope="module")
def tiny_sd():
    return make_tiny_state_dict(seed=1)


@pytest.mark.parametrize("wrap", ["plain", "model_key", "ddp_prefix", "state_dict_key", "compiled_prefix"])
def test_checkpoint_formats_load(wrap, tiny_sd, tmp_path):
    obj = {
        "plain": tiny_sd,
        "model_key": {"model": tiny_sd},
        "ddp_prefix": {f"module.{k}": v for k, v in tiny_sd.items()},
        "state_dict_key": {"state_dict": tiny_sd, "epoch": 3},
        "compiled_prefix": {f"_orig_mod.{k}": v for k, v in tiny_sd.items()},
    }[wrap]
    path = tmp_path / "model.pt"
    torch.save(obj, path)
    loaded = load_model(str(path))
    assert loaded.architecture.embed_dim == 8 and loaded.architecture.in_channels == 1
    for key, value in loaded.network.state_dict().items():
        torch.testing.assert_close(value, tiny_sd[key])
    assert len(loaded.sha256) == 64


def test_multichannel_checkpoint_detected(tmp_path):
    sd = make_tiny_state_dict(in_channels=2)
    assert architecture_from_state_dict(sd).in_channels == 2
    torch.save(sd, tmp_path / "m.pt")
    net = load_model(str(tmp_path / "m.pt")).network
    assert net.image_encoder.encoder.conv_init.weight.shape[1] == 2


def test_missing_and_unexpected_keys_are_named(tiny_sd, tmp_path):
    sd = dict(tiny_sd)
    sd.pop("class_head.mlp.0.weight")
    sd["extra.head.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as err:
        load_model(str(tmp_path / "bad.pt"))
    assert "class_head.mlp.0.weight" in str(err.value) and "extra.head.weight" in str(err.value)


def test_unsafe_pickle_refused(tmp_path):
    torch.save({"model": make_tiny_state_dict(), "obj": object()}, tmp_path / "pickle.pt")
    with pytest.raises(CheckpointError, match="weights_only"):
        load_model(str(tmp_path / "pickle.pt"))


@pytest.mark.parametrize("content", [b"not a checkpoint", b""])
def test_garbage_file(content, tmp_path):
    (tmp_path / "x.pt").write_bytes(content)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_model(str(tmp_path / "x.pt"))


def test_not_vista3d(tmp_path):
    torch.save({"layer.weight": torch.zeros(3, 3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="no VISTA3D encoder stem"):
        load_model(str(tmp_path / "other.pt"))
