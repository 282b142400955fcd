"""The ONNX step of MONAI's ``trt_compile`` for the image encoder (what TensorRT builds from), checked with
onnxruntime on the CPU: the tiny ``vista3d132`` (width 8, the real architecture), a 32^3 window (the smallest
cube with a 2^3 bottom level after the encoder's 4 downsamplings)."""

from __future__ import annotations

import sys

import pytest
import torch

_REASON = "{} is needed for the ONNX export tests: pip install \"nvseg-ray[test]\""
onnx = pytest.importorskip("onnx", reason=_REASON.format("onnx"))
pytest.importorskip("onnxscript", reason=_REASON.format("onnxscript (torch's dynamo ONNX exporter)"))
pytest.importorskip("onnxruntime", reason=_REASON.format("onnxruntime"))


from nvseg_ray.backends.onnx_export import check_with_onnxruntime, export_encoder_onnx  # noqa: E402
from nvseg_ray.errors import ConfigError  # noqa: E402
from nvseg_ray.synthetic import TINY_WIDTH, tiny_network, tiny_state_dict  # noqa: E402

WINDOW = (32, 32, 32)
ATOL, RTOL = 1e-4, 1e-3  # fp32 both sides; observed max |diff| ~1e-5 on features of magnitude ~1


@pytest.fixture(scope="module")
def network() -> torch.nn.Module:
    return tiny_network()


@pytest.fixture(scope="module")
def dynamic_onnx(network, tmp_path_factory):
    return export_encoder_onnx(network, tmp_path_factory.mktemp("onnx") / "encoder.onnx", patch_size=WINDOW,
                               dynamic_batch=True)


def _dims(model) -> list[list[int | str]]:
    return [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.input]


def test_dynamic_batch_export_matches_torch_at_batch_1_and_2(network, dynamic_onnx):
    onnx.checker.check_model(str(dynamic_onnx), full_check=True)
    model = onnx.load(str(dynamic_onnx))
    assert [v.name for v in model.graph.input] == ["x"]  # TrtCompiler's input_names: forward's signature
    (dims,) = _dims(model)
    assert isinstance(dims[0], str) and dims[1:] == [1, *WINDOW]  # only the batch axis is dynamic
    assert len(model.graph.output) == 5  # the encoder's list of 5 feature maps, flattened
    assert not list(dynamic_onnx.parent.glob("*.data"))  # weights inline (the exporter's external file resolved)

    for batch in (1, 2):
        torch.manual_seed(batch)
        result = check_with_onnxruntime(dynamic_onnx, network, torch.randn(batch, 1, *WINDOW), atol=ATOL, rtol=RTOL)
        assert result["ok"], result
        assert result["outputs"] == 5
        channels = [TINY_WIDTH * 2 ** level for level in range(5)]
        assert result["shapes"] == [[batch, c, *(n // 2 ** level for n in WINDOW)] for level, c in enumerate(channels)]


def test_export_leaves_the_network_unchanged(network, dynamic_onnx):
    """MONAI's add_casts_around_norms swaps every InstanceNorm3d for a CastToFloat wrapper in place: the export
    works on a copy, so the caller's network (and its state_dict keys) stay as they were."""
    assert not any(type(m).__name__ == "CastToFloat" for m in network.modules())
    assert set(network.state_dict()) == set(tiny_state_dict())


def test_static_export_is_upstreams_batch_1(network, tmp_path):
    """Upstream's dynamic_batchsize [1, 1, 1] (sw_batch_size 1) has min == max: MONAI exports static shapes."""
    path = export_encoder_onnx(network, tmp_path / "static.onnx", patch_size=WINDOW, dynamic_batch=False)
    onnx.checker.check_model(str(path))
    (dims,) = _dims(onnx.load(str(path)))
    assert dims == [1, 1, *WINDOW]
    result = check_with_onnxruntime(path, network, torch.randn(1, 1, *WINDOW), atol=ATOL, rtol=RTOL)
    assert result["ok"], result


def test_a_perturbed_network_fails_the_check(network, dynamic_onnx):
    """The comparison is not vacuous: a network whose first conv differs from the exported one is caught."""
    import copy

    other = copy.deepcopy(network)
    with torch.no_grad():
        other.image_encoder.encoder.conv_init.weight.add_(0.05)
    result = check_with_onnxruntime(dynamic_onnx, other, torch.randn(1, 1, *WINDOW), atol=ATOL, rtol=RTOL)
    assert not result["ok"] and result["max_abs_diff"] > ATOL


def test_window_must_be_a_multiple_of_16(network, tmp_path):
    with pytest.raises(ConfigError, match="multiple of 16"):
        export_encoder_onnx(network, tmp_path / "x.onnx", patch_size=(24, 32, 32))


def test_missing_onnxscript_is_a_config_error(network, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import onnxscript -> ImportError
    with pytest.raises(ConfigError, match="onnxscript") as info:
        export_encoder_onnx(network, tmp_path / "x.onnx", patch_size=WINDOW)
    assert "pip install" in (info.value.hint or "")
