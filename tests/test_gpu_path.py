"""The GPU path's CPU-testable parts that live outside nvseg_ray.backends' own tests: the automatic window batch,
the model runner's backend choice, its report, and the fall-back to PyTorch when an accelerated encoder fails
while running (tiny generated model, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nvseg_ray.backends.window_batch import (
    BYTES_PER_WINDOW_VOXEL,
    MAX_AUTO_WINDOW_BATCH,
    resolve_window_batch,
    window_batch_for_memory,
)
from nvseg_ray.config import InferenceConfig
from nvseg_ray.model_runner import ModelRunner, engine_cache_root
from nvseg_ray.prompts import resolve_prompts
from nvseg_ray.stages import VolumeStages

from .model_helpers import TEST_PATCH, body_phantom, save_volume

GiB = 2**30
WINDOW = (192, 192, 128)
PER_WINDOW = BYTES_PER_WINDOW_VOXEL * 192 * 192 * 128


@pytest.mark.parametrize(("free", "expected"), [
    (0, 1),                      # nothing free: still one window (the volume then fails as out of memory)
    (PER_WINDOW, 1),             # half of it for windows: not even one -> 1
    (4 * PER_WINDOW, 2),
    (8 * PER_WINDOW + 1, 4),
    (139 * GiB, MAX_AUTO_WINDOW_BATCH),  # an H200: capped
])
def test_window_batch_from_free_memory(free, expected):
    assert window_batch_for_memory(free, WINDOW) == expected


def test_window_batch_setting():
    cpu = torch.device("cpu")
    assert resolve_window_batch(3, cpu, WINDOW) == 3
    assert resolve_window_batch("auto", cpu, WINDOW) == 1  # a CPU gains nothing from batching windows
    assert InferenceConfig(sw_batch_size="auto").sw_batch_size == "auto"
    assert InferenceConfig(sw_batch_size="4").sw_batch_size == 4
    for bad in (0, 65, "many", 2.5, True):
        with pytest.raises(Exception, match="sw_batch_size"):
            InferenceConfig(sw_batch_size=bad)


def test_engine_cache_root(monkeypatch, tmp_path):
    monkeypatch.delenv("NVSEG_ENGINE_CACHE", raising=False)
    assert engine_cache_root(InferenceConfig(engine_cache_dir=str(tmp_path))) == str(tmp_path)
    monkeypatch.setenv("NVSEG_ENGINE_CACHE", str(tmp_path / "env"))
    assert engine_cache_root(InferenceConfig()) == str(tmp_path / "env")


def _prepared(cfg: InferenceConfig, tmp_path):
    path = save_volume(tmp_path / "ct.nii.gz", body_phantom((40, 36, 20)), np.diag([1.5, 1.5, 2.5, 1.0]))
    stages = VolumeStages(cfg)
    return stages.prepare(stages.read(str(path))), resolve_prompts(cfg, stages.catalog)


@pytest.mark.parametrize("backend", ["auto", "torch", "trt"])
def test_runner_on_cpu_runs_torch_and_says_why(tiny_checkpoint, backend):
    told: list[str] = []
    runner = ModelRunner(InferenceConfig(checkpoint=tiny_checkpoint, device="cpu", backend=backend), log=told.append)
    report = runner.backend_report()
    assert report["backend"] == "torch" and report["requested"] == backend
    assert report["window_batch"] == 1 and report["device"] == "cpu" and report["amp"] is False
    if backend != "torch":  # auto and trt on a CPU: no CUDA, said so
        assert "cuda" in report["reason"].lower()
    assert any("backend torch" in line for line in told)


@pytest.mark.parametrize("backend", ["compile", "trt"])
def test_an_accelerated_encoder_that_fails_while_running_falls_back_to_torch(tiny_checkpoint, tmp_path,
                                                                            monkeypatch, backend):
    from nvseg_ray.backends import accelerate as accelerate_module

    cfg = InferenceConfig(checkpoint=tiny_checkpoint, device="cpu", classes=["liver", "spleen"],
                          patch_size=TEST_PATCH, backend=backend, engine_cache_dir=str(tmp_path / "engines"))
    prepared, prompts = _prepared(cfg, tmp_path)
    expected = ModelRunner(cfg.model_copy(update={"backend": "torch"})).infer(prepared, prompts)

    class Broken(torch.nn.Module):  # an "accelerated" encoder that fails at run time (a TensorRT runtime error)
        def __init__(self, encoder: torch.nn.Module) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
            raise RuntimeError("engine execution failed")

    def fake_accelerate(network, choice, **kw):  # noqa: ANN001, ANN003, ANN202
        network.image_encoder = Broken(network.image_encoder)
        return network, choice

    monkeypatch.setattr(accelerate_module, "accelerate", fake_accelerate)
    monkeypatch.setattr("nvseg_ray.backends.choice.choose_backend",
                        lambda requested, env, **kw: _choice(backend))
    told: list[str] = []
    runner = ModelRunner(cfg, log=told.append)
    labels = runner.infer(prepared, prompts)
    np.testing.assert_array_equal(labels, expected)  # the volume still segmented, by plain PyTorch
    assert runner.backend.backend == "torch" and runner.backend.code == "runtime_error"
    assert "engine execution failed" in runner.backend.reason
    assert any("runtime_error" in line for line in told)
    # a TensorRT engine that failed while running may have broken the CUDA context: later starts skip it
    markers = list((tmp_path / "engines").glob("*.failed.json"))
    assert len(markers) == (1 if backend == "trt" else 0)


def _choice(backend: str):
    from nvseg_ray.backends.choice import BackendChoice

    return BackendChoice(requested=backend, backend=backend, code="requested", reason="asked for")
