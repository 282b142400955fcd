"""The backend choice: the full table of (device x tensorrt x polygraphy x onnx x request x failure marker), the
reasons, and the real probe on this (CPU) machine."""

from __future__ import annotations

import builtins
import importlib
import itertools

import pytest

from nvseg_ray.backends import choice as choice_mod
from nvseg_ray.backends.choice import (BACKENDS, CODES, BackendChoice, BackendEnvironment, choose_backend)
from nvseg_ray.errors import ConfigError

MARKER = {"code": "build_failed", "reason": "RuntimeError: out of memory", "marker": "/tmp/x.failed.json"}


def expected(requested, device, trt, polygraphy, onnx, compile_ok, failed):
    """The rules, written out independently of the implementation: (backend, code)."""
    if requested == "torch":
        return "torch", "requested"
    if requested == "compile":
        return ("compile", "requested") if compile_ok else ("torch", "package_missing")
    if device != "cuda":
        blocker = "no_cuda"
    elif trt is None:
        blocker = "package_missing"
    elif not trt.startswith("10."):
        blocker = "unsupported_tensorrt"
    elif not (polygraphy and onnx):
        blocker = "package_missing"
    elif failed:
        blocker = "failed_before"
    else:
        blocker = None
    if requested == "auto":
        return ("trt", "auto_trt") if blocker is None else ("torch", "auto_torch")
    return ("trt", "requested") if blocker is None else ("torch", blocker)


TABLE = list(itertools.product(("auto", "torch", "trt", "compile"), ("cuda", "cpu", "mps"),
                               (None, "10.3.0", "11.0.1"), (True, False), (True, False), (True, False),
                               (False, True)))


@pytest.mark.parametrize("requested,device,trt,polygraphy,onnx,compile_ok,failed", TABLE)
def test_choice_table(requested, device, trt, polygraphy, onnx, compile_ok, failed):
    env = BackendEnvironment(device_type=device, tensorrt_version=trt, polygraphy=polygraphy, onnx=onnx,
                             torch_compile=compile_ok)
    got = choose_backend(requested, env, failed_before=MARKER if failed else None)
    assert (got.backend, got.code) == expected(requested, device, trt, polygraphy, onnx, compile_ok, failed)
    assert got.requested == requested
    assert got.code in CODES
    assert got.reason.strip()
    assert got.to_json() == {"requested": requested, "backend": got.backend, "code": got.code, "reason": got.reason}


def _env(**kw):
    base = dict(device_type="cuda", tensorrt_version="10.3.0", polygraphy=True, onnx=True, torch_compile=True,
                gpu_name="NVIDIA H200", compute_capability="9.0")
    base.update(kw)
    return BackendEnvironment(**base)


# every pre-build fallback with the words that tell a user what is wrong and how to fix it
FALLBACKS = [
    ("trt", _env(device_type="cpu"), None, "no_cuda", ["CUDA", "GPU"]),
    ("trt", _env(tensorrt_version=None), None, "package_missing", ["tensorrt", "pip install 'nvseg-ray[trt]'"]),
    ("trt", _env(polygraphy=False), None, "package_missing", ["polygraphy", "pip install"]),
    ("trt", _env(onnx=False), None, "package_missing", ["onnx", "pip install"]),
    ("trt", _env(tensorrt_version="11.0.1"), None, "unsupported_tensorrt", ["11.0.1", "not supported", "10.x"]),
    ("trt", _env(), MARKER, "failed_before", ["earlier engine build", "out of memory", "delete"]),
    ("compile", _env(torch_compile=False), None, "package_missing", ["torch.compile", "--backend torch"]),
    ("auto", _env(device_type="cpu"), None, "auto_torch", ["no CUDA device"]),
    ("auto", _env(tensorrt_version=None), None, "auto_torch", ["tensorrt is not installed",
                                                                "pip install 'nvseg-ray[trt]'"]),
    ("auto", _env(tensorrt_version="11.0.1"), None, "auto_torch", ["TensorRT 11.0.1 is not supported"]),
    ("auto", _env(), MARKER, "auto_torch", ["an earlier engine build on this node failed"]),
]


@pytest.mark.parametrize("requested,env,marker,code,words", FALLBACKS)
def test_fallback_reasons_say_what_and_how_to_fix(requested, env, marker, code, words):
    got = choose_backend(requested, env, failed_before=marker)
    assert (got.backend, got.code) == ("torch", code)
    for word in words:
        assert word in got.reason, (word, got.reason)


def test_every_code_is_reachable_with_a_reason():
    seen = {}
    for row in TABLE:
        requested, device, trt, polygraphy, onnx, compile_ok, failed = row
        env = BackendEnvironment(device, trt, polygraphy, onnx, compile_ok)
        got = choose_backend(requested, env, failed_before=MARKER if failed else None)
        seen[got.code] = got.reason
    later = {"build_failed", "build_timeout", "runtime_error"}  # set by accelerate, through fall_back
    assert set(seen) == set(CODES) - later
    base = choose_backend("trt", _env())
    for code in later:
        fell = base.fall_back(code, f"{code}: delete the marker to retry")
        assert (fell.requested, fell.backend, fell.code) == ("trt", "torch", code) and fell.reason
        seen[code] = fell.reason
    assert set(seen) == set(CODES) and all(r.strip() for r in seen.values())


def test_requests_are_case_insensitive_and_unknown_names_list_the_choices():
    assert choose_backend("TRT", _env()).backend == "trt"
    with pytest.raises(ConfigError) as info:
        choose_backend("onnxruntime", _env())
    for name in BACKENDS:
        assert name in str(info.value)
    assert info.value.exit_code == 2


def test_fall_back_keeps_the_request():
    c = BackendChoice("auto", "trt", "auto_trt", "x")
    f = c.fall_back("runtime_error", "CUDA error 700")
    assert f == BackendChoice("auto", "torch", "runtime_error", "CUDA error 700")
    assert c.backend == "trt"  # frozen: a new object


# ------------------------------------------------------------------------------------------------------------
# the real probe (this machine has no GPU and no tensorrt)
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:0", None])
def test_probe_on_this_cpu_machine(device):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA machine: this test is about a CPU-only one")
    env = BackendEnvironment.probe(torch.device(device) if device == "cuda:0" else device)
    assert env.device_type == "cpu"
    assert env.tensorrt_version is None
    assert env.gpu_name == "" and env.compute_capability == ""
    assert isinstance(env.polygraphy, bool) and isinstance(env.onnx, bool)
    assert env.torch_compile is True  # torch 2.13 on Linux
    assert choose_backend("auto", env).code == "auto_torch"


@pytest.mark.parametrize("error", [ImportError("no libnvinfer"), RuntimeError("CUDA driver too old"),
                                   OSError("libcudart.so: cannot open")])
def test_tensorrt_probe_never_raises(monkeypatch, error):
    """A tensorrt that is 'there' but whose import blows up counts as absent."""
    real_import = builtins.__import__
    real_import_module = importlib.import_module

    def broken_import(name, *args, **kwargs):
        if name == "tensorrt" or name.startswith("tensorrt."):
            raise error
        return real_import(name, *args, **kwargs)

    def broken_import_module(name, *args, **kwargs):
        if name == "tensorrt":
            raise error
        return real_import_module(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", broken_import)
    monkeypatch.setattr(importlib, "import_module", broken_import_module)
    monkeypatch.setattr(choice_mod, "_has_module", lambda name: True)  # as if every package were installed
    assert choice_mod._tensorrt_version() is None
    env = BackendEnvironment.probe("cpu")
    assert env.device_type == "cpu" and env.tensorrt_version is None


def test_probe_survives_find_spec_raising(monkeypatch):
    def boom(name, *a, **k):
        raise ValueError(f"{name}.__spec__ is None")

    monkeypatch.setattr(importlib.util, "find_spec", boom)
    env = BackendEnvironment.probe("cpu")
    assert (env.device_type, env.tensorrt_version, env.polygraphy, env.onnx) == ("cpu", None, False, False)


def test_probe_on_cuda_with_a_broken_driver(monkeypatch):
    """torch.cuda answering with an exception: the probe says cpu (no CUDA) instead of raising."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def broken(*a, **k):
        raise RuntimeError("CUDA driver initialization failed")

    monkeypatch.setattr(torch.cuda, "current_device", broken)
    monkeypatch.setattr(torch.cuda, "get_device_name", broken)
    env = BackendEnvironment.probe("cuda")
    assert env.device_type == "cpu" and env.tensorrt_version is None


def test_probe_on_a_fake_cuda_node_reads_the_gpu_and_tensorrt(monkeypatch):
    import sys
    import types

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (9, 0))
    fake = types.ModuleType("tensorrt")
    fake.__version__ = "10.3.0"
    fake.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(choice_mod, "_has_module", lambda name: True)
    env = BackendEnvironment.probe("cuda")
    assert (env.device_type, env.tensorrt_version, env.gpu_name, env.compute_capability) == (
        "cuda", "10.3.0", "NVIDIA H200", "9.0")
    assert choose_backend("auto", env).to_json()["backend"] == "trt"
