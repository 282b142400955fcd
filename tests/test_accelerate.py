"""Applying a backend to the (tiny) VISTA3D network: torch unchanged; torch.compile for real on CPU and its
fall-back; the TensorRT path with a stand-in for MONAI's ``trt_compile`` (no GPU, no tensorrt here) that behaves
like it: patches ``image_encoder.encoder``, builds and saves ``f"{base_path}.image_encoder.encoder.plan"`` on the
first forward, loads an existing plan instead."""

from __future__ import annotations

import logging
from pathlib import Path
from types import MethodType

import monai.networks
import pytest
import torch
from monai.networks.nets import vista3d132

from nvseg_ray.backends.accelerate import accelerate, engine_key, warm_up
from nvseg_ray.backends.choice import BackendEnvironment, choose_backend
from nvseg_ray.backends.engine_cache import EngineCache
from nvseg_ray.synthetic import TINY_WIDTH, tiny_state_dict

PATCH = (32, 32, 32)
SHA = "0123456789abcdef" * 4
CUDA_ENV = BackendEnvironment(device_type="cuda", tensorrt_version="10.3.0", polygraphy=True, onnx=True,
                              torch_compile=True, gpu_name="NVIDIA H200", compute_capability="9.0")


@pytest.fixture(scope="module")
def state():
    return tiny_state_dict()


def tiny_network(state) -> torch.nn.Module:
    net = vista3d132(encoder_embed_dim=TINY_WIDTH, in_channels=1)
    net.load_state_dict(state)
    return net.eval()


def auto_features(net, x):
    with torch.inference_mode():
        return net.image_encoder(x, with_point=False, with_label=True)[1]


class FakeTrt:
    """Stands in for ``monai.networks.trt_compile`` (same signature and naming, see trt_compiler.py)."""

    def __init__(self, fail: Exception | None = None, write: bool = True) -> None:
        self.fail, self.write = fail, write
        self.calls: list[dict] = []
        self.builds: list[str] = []
        self.loads: list[str] = []

    def __call__(self, model, base_path, args=None, submodule=None, logger=None):
        self.calls.append({"base_path": base_path, "args": dict(args or {}), "submodule": submodule,
                           "logger": logger})
        fake = self

        class Compiler:
            def __init__(self, module, plan_path):
                self.plan_path, self.engine, self.old_forward = plan_path, None, module.forward

            def forward(self, module, argv, kwargs):
                if self.engine is None:
                    if Path(self.plan_path).is_file():
                        fake.loads.append(self.plan_path)
                    else:
                        logger.info(f"Building TensorRT engine: {self.plan_path}")
                        fake.builds.append(self.plan_path)
                        if fake.fail is not None:
                            raise fake.fail
                        if fake.write:
                            Path(self.plan_path).write_bytes(b"TRT-PLAN")
                    self.engine = "engine"
                return self.old_forward(*argv, **kwargs)

        def trt_forward(self, *argv, **kwargs):
            return self._trt_compiler.forward(self, argv, kwargs)

        for s in submodule:
            module = model
            for part in s.split("."):
                module = getattr(module, part)
            if not hasattr(module, "_trt_compiler"):
                module.orig_forward = module.forward
                module._trt_compiler = Compiler(module, base_path + "." + s + ".plan")
                module.forward = MethodType(trt_forward, module)
        return model


def run_trt(net, cache, log=None, **kw):
    choice = choose_backend("trt", CUDA_ENV, failed_before=cache.failed_before(key()))
    return accelerate(net, choice, patch_size=PATCH, window_batch=2, in_channels=1, device="cpu", cache=cache,
                      checkpoint_sha256=SHA, env=CUDA_ENV, log=(log if log is not None else [].append), **kw)


def key():
    return engine_key(CUDA_ENV, checkpoint_sha256=SHA, patch_size=PATCH, window_batch=2, in_channels=1)


def is_plain(net) -> bool:
    enc = net.image_encoder.encoder
    return not any(name in enc.__dict__ for name in ("forward", "orig_forward", "_trt_compiler"))


# ------------------------------------------------------------------------------------------------------------
# torch
# ------------------------------------------------------------------------------------------------------------


def test_torch_returns_the_same_network(state):
    net = tiny_network(state)
    encoder = net.image_encoder
    choice = choose_backend("torch", CUDA_ENV)
    out, got = accelerate(net, choice, patch_size=PATCH, window_batch=1, in_channels=1, device="cpu", cache=None,
                          checkpoint_sha256=SHA, env=CUDA_ENV, log=pytest.fail)
    assert out is net and out.image_encoder is encoder and got is choice


# ------------------------------------------------------------------------------------------------------------
# TensorRT (with the stand-in)
# ------------------------------------------------------------------------------------------------------------


def test_trt_builds_into_the_keyed_plan_then_reuses_it(state, tmp_path, monkeypatch):
    fake = FakeTrt()
    monkeypatch.setattr(monai.networks, "trt_compile", fake)
    cache = EngineCache(tmp_path / "engines")
    plan = cache.plan_path(key())
    lines: list[str] = []
    net = tiny_network(state)
    x = torch.randn(2, 1, *PATCH)
    expected = auto_features(tiny_network(state), x)

    out, choice = run_trt(net, cache, log=lines.append)
    assert out is net and (choice.backend, choice.code) == ("trt", "requested")
    assert plan.read_bytes() == b"TRT-PLAN"
    assert len(fake.builds) == 1 and fake.builds[0] != str(plan)  # built into a temp file, renamed into place
    assert sorted(p.name for p in plan.parent.glob("*.plan")) == [plan.name]
    call = fake.calls[0]
    assert call["submodule"] == ["image_encoder.encoder"]
    assert call["args"] == {"precision": "fp16", "dynamic_batchsize": [1, 2, 2], "fallback": False}
    assert isinstance(call["logger"], logging.Logger)
    assert any("[trt_compile] Building TensorRT engine" in line for line in lines)  # MONAI's log reaches log()
    assert net.image_encoder.encoder._trt_compiler.plan_path == str(plan)
    torch.testing.assert_close(auto_features(net, x), expected)  # the stand-in runs the encoder itself

    # a second start (a new actor, the same key): loads, builds nothing
    fake2 = FakeTrt()
    monkeypatch.setattr(monai.networks, "trt_compile", fake2)
    net2 = tiny_network(state)
    out2, choice2 = run_trt(net2, cache)
    assert (choice2.backend, choice2.code) == ("trt", "requested")
    assert fake2.builds == [] and fake2.loads == [str(plan)]
    assert fake2.calls[0]["base_path"] + ".image_encoder.encoder.plan" == str(plan)


def test_a_different_key_builds_its_own_plan(state, tmp_path, monkeypatch):
    fake = FakeTrt()
    monkeypatch.setattr(monai.networks, "trt_compile", fake)
    cache = EngineCache(tmp_path)
    run_trt(tiny_network(state), cache)
    other_env = BackendEnvironment("cuda", "10.3.0", True, True, True, gpu_name="NVIDIA A100-SXM4-80GB",
                                   compute_capability="8.0")
    accelerate(tiny_network(state), choose_backend("trt", other_env), patch_size=PATCH, window_batch=2,
               in_channels=1, device="cpu", cache=cache, checkpoint_sha256=SHA, env=other_env, log=[].append)
    assert len(fake.builds) == 2 and len(list(tmp_path.glob("*.plan"))) == 2


def test_failed_build_marks_the_node_and_falls_back(state, tmp_path, monkeypatch):
    fake = FakeTrt(fail=RuntimeError("polygraphy: fp16 in CreateConfig is not available"))
    monkeypatch.setattr(monai.networks, "trt_compile", fake)
    cache = EngineCache(tmp_path)
    net = tiny_network(state)
    lines: list[str] = []
    out, choice = run_trt(net, cache, log=lines.append)
    assert out is net and (choice.requested, choice.backend, choice.code) == ("trt", "torch", "build_failed")
    assert "fp16 in CreateConfig" in choice.reason and "delete" in choice.reason
    assert not cache.plan_path(key()).exists() and not list(tmp_path.glob("*.plan"))
    assert is_plain(net)  # the patch is undone: the plain encoder runs
    x = torch.randn(1, 1, *PATCH)
    torch.testing.assert_close(auto_features(net, x), auto_features(tiny_network(state), x))
    marker = cache.failed_before(key())
    assert marker is not None and marker["code"] == "build_failed" and "fp16 in CreateConfig" in marker["reason"]
    assert any("build failed" in line for line in lines)

    # later starts: straight to torch, with the earlier reason, without trying
    later = choose_backend("trt", CUDA_ENV, failed_before=marker)
    assert (later.backend, later.code) == ("torch", "failed_before") and "fp16 in CreateConfig" in later.reason
    assert choose_backend("auto", CUDA_ENV, failed_before=marker).code == "auto_torch"
    fake.calls.clear()
    _, again = accelerate(tiny_network(state), choose_backend("trt", CUDA_ENV), patch_size=PATCH, window_batch=2,
                          in_channels=1, device="cpu", cache=cache, checkpoint_sha256=SHA, env=CUDA_ENV,
                          log=[].append)
    assert again.code == "failed_before" and fake.calls == []

    # the marker removed: it builds again, and a success clears any marker
    cache.clear_failure(key())
    monkeypatch.setattr(monai.networks, "trt_compile", FakeTrt())
    _, ok = run_trt(tiny_network(state), cache)
    assert ok.backend == "trt" and cache.plan_path(key()).is_file() and cache.failed_before(key()) is None


def test_trt_compile_without_effect_is_a_build_failure(state, tmp_path, monkeypatch):
    """MONAI without tensorrt/polygraphy/CUDA logs a warning and returns the model unchanged: no plan appears."""
    monkeypatch.setattr(monai.networks, "trt_compile", lambda model, base_path, **kw: model)
    cache = EngineCache(tmp_path)
    net = tiny_network(state)
    out, choice = run_trt(net, cache)
    assert (choice.backend, choice.code) == ("torch", "build_failed") and "wrote no engine" in choice.reason
    assert not list(tmp_path.glob("*.plan")) and cache.failed_before(key()) is not None


def test_lock_wait_timeout_falls_back_with_build_timeout(state, tmp_path, monkeypatch):
    fake = FakeTrt()
    monkeypatch.setattr(monai.networks, "trt_compile", fake)
    holder = EngineCache(tmp_path)
    cache = EngineCache(tmp_path, build_timeout_s=0.3)
    with holder.locked(key()):  # another builder (flock: another open file description conflicts)
        net = tiny_network(state)
        out, choice = run_trt(net, cache)
    assert (choice.backend, choice.code) == ("torch", "build_timeout") and choice.reason
    assert fake.builds == [] and is_plain(net)


def test_real_trt_compile_on_this_machine_has_no_effect_and_falls_back(state, tmp_path):
    """The real MONAI trt_compile here (no CUDA, no tensorrt): nothing built, the plain network back."""
    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    net = tiny_network(state)
    lines: list[str] = []
    out, choice = run_trt(net, EngineCache(tmp_path), log=lines.append)
    assert out is net and (choice.backend, choice.code) == ("torch", "build_failed")
    assert any("has no effect" in line for line in lines), lines  # MONAI's warning reached our log
    assert is_plain(net) and not list(tmp_path.glob("*.plan"))


# ------------------------------------------------------------------------------------------------------------
# torch.compile
# ------------------------------------------------------------------------------------------------------------


def test_compile_failure_falls_back_to_the_plain_encoder(state, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("inductor: no C++ compiler")

    monkeypatch.setattr(torch, "compile", broken)
    net = tiny_network(state)
    encoder = net.image_encoder
    out, choice = accelerate(net, choose_backend("compile", CUDA_ENV), patch_size=PATCH, window_batch=1,
                             in_channels=1, device="cpu", cache=None, checkpoint_sha256=SHA, env=CUDA_ENV,
                             log=[].append)
    assert out is net and out.image_encoder is encoder
    assert (choice.requested, choice.backend, choice.code) == ("compile", "torch", "build_failed")
    assert "no C++ compiler" in choice.reason


def test_compile_whose_warm_up_fails_restores_the_encoder(state, monkeypatch):
    class Exploding(torch.nn.Module):
        def forward(self, *a, **k):
            raise RuntimeError("BackendCompilerFailed")

    monkeypatch.setattr(torch, "compile", lambda module, **kw: Exploding())
    net = tiny_network(state)
    encoder = net.image_encoder
    out, choice = accelerate(net, choose_backend("compile", CUDA_ENV), patch_size=PATCH, window_batch=1,
                             in_channels=1, device="cpu", cache=None, checkpoint_sha256=SHA, env=CUDA_ENV,
                             log=[].append)
    assert out.image_encoder is encoder and choice.code == "build_failed"


@pytest.mark.slow
def test_compile_for_real_on_cpu(state):
    """torch.compile of the tiny encoder on CPU (about 30-40 s on 2 cores): the same features, no recompile."""
    env = BackendEnvironment.probe("cpu")
    if not env.torch_compile:
        pytest.skip("torch.compile not usable here")
    net = tiny_network(state)
    x = torch.randn(1, 1, *PATCH)
    expected = auto_features(net, x)
    lines: list[str] = []
    out, choice = accelerate(net, choose_backend("compile", env), patch_size=PATCH, window_batch=1, in_channels=1,
                             device="cpu", cache=None, checkpoint_sha256=SHA, env=env, log=lines.append)
    assert (choice.backend, choice.code) == ("compile", "requested"), choice.reason
    assert out.image_encoder is not None and hasattr(out.image_encoder, "_orig_mod")
    torch.testing.assert_close(auto_features(out, x), expected, rtol=1e-4, atol=1e-5)
    assert any("compiled" in line for line in lines)
    assert warm_up(out, patch_size=PATCH, window_batch=1, in_channels=1, device="cpu") < 30  # compiled already
