"""Which backend runs the network, and why: a pure decision over a probed environment (table-testable).

:func:`choose_backend` maps a requested backend (``auto``, ``torch``, ``trt``, ``compile``) and a
:class:`BackendEnvironment` (what this node has: device, tensorrt, polygraphy, onnx, torch.compile) to a
:class:`BackendChoice`: the backend that will run, a stable ``code`` saying why, and a sentence a user
understands (what happened, and how to get the backend they asked for). Nothing here imports tensorrt,
polygraphy or onnx at module level; :meth:`BackendEnvironment.probe` looks for them lazily and never raises.

Codes (``BackendChoice.code``):

* ``requested``: the asked-for backend runs (``torch``, or ``trt`` / ``compile`` asked for and available).
* ``auto_trt``: ``auto`` picked TensorRT (CUDA, a supported TensorRT, polygraphy and onnx present).
* ``auto_torch``: ``auto`` picked plain PyTorch; the reason names what TensorRT lacked.
* ``no_cuda``, ``package_missing``, ``unsupported_tensorrt``, ``failed_before``: an explicit ``trt`` /
  ``compile`` request could not be met before trying (see :func:`choose_backend`).
* ``build_failed``, ``build_timeout``, ``runtime_error``: set later by :func:`BackendChoice.fall_back` when an
  engine build / compilation or its first run failed (:mod:`nvseg_ray.backends.accelerate`).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

BACKENDS = ("auto", "torch", "trt", "compile")
#: TensorRT majors the trt path supports (upstream's fp16 build uses the fp16 builder flag and precision
#: constraints, removed in TensorRT 11: polygraphy then raises "fp16 in CreateConfig is not available").
SUPPORTED_TENSORRT_MAJORS = (10,)

#: every ``BackendChoice.code``.
CODES = ("requested", "auto_trt", "auto_torch", "no_cuda", "package_missing", "unsupported_tensorrt",
         "build_failed", "build_timeout", "runtime_error", "failed_before")

TRT_INSTALL_HINT = "pip install 'nvseg-ray[trt]'"
_TENSORRT_PIN = "install TensorRT 10.x (pip install 'tensorrt-cu12>=10.3,<11' or 'tensorrt-cu13>=10.13,<11')"


def _has_module(name: str) -> bool:
    """Whether ``name`` can be imported, without importing it (any error counts as not importable)."""
    try:
        return importlib.util.find_spec(name) is not None
    except Exception:  # noqa: BLE001 - a broken parent package, a bad __spec__ ...: not importable
        return False


def _tensorrt_version() -> str | None:
    """The importable tensorrt's ``__version__``, or None (not installed, or its import fails in any way)."""
    if not _has_module("tensorrt"):
        return None
    try:
        trt = importlib.import_module("tensorrt")
        version = getattr(trt, "__version__", None)
        return str(version) if version else None
    except BaseException:  # noqa: BLE001 - a broken CUDA/TensorRT install can raise anything, even SystemExit
        return None


def _torch_compile_usable() -> bool:
    try:
        import torch

        major = int(str(torch.__version__).split(".", 1)[0])
        if major < 2 or not hasattr(torch, "compile") or sys.platform.startswith("win"):
            return False
        # inductor needs a C++ compiler / triton; on CPU it is present on Linux and macOS as a rule
        return _has_module("torch._inductor")
    except Exception:  # noqa: BLE001
        return False


def _device_type(device: Any) -> str:
    if device is None:
        return "cpu"
    kind = getattr(device, "type", None)
    if kind is None:
        kind = str(device).split(":", 1)[0]
    return str(kind) or "cpu"


def tensorrt_major(version: str | None) -> int | None:
    """``"10.3.0"`` -> 10; None / unparsable -> None."""
    if not version:
        return None
    try:
        return int(str(version).split(".", 1)[0])
    except ValueError:
        return None


@dataclass(frozen=True)
class BackendEnvironment:
    """What a node offers the backends (see :meth:`probe`)."""

    device_type: str                 # "cuda" | "cpu" | "mps"
    tensorrt_version: str | None     # None: not importable
    polygraphy: bool
    onnx: bool                       # onnx (+ onnxscript for torch's dynamo exporter) importable
    torch_compile: bool              # torch.compile usable (torch >= 2, not on Windows, inductor present)
    gpu_name: str = ""               # torch.cuda.get_device_name
    compute_capability: str = ""     # e.g. "9.0"

    @classmethod
    def probe(cls, device: Any) -> BackendEnvironment:
        """The real environment for ``device`` (a ``torch.device`` or its string). Imports lazily and never raises:
        anything that fails to import or answer counts as absent."""
        device_type = _device_type(device)
        gpu_name = capability = ""
        if device_type == "cuda":
            try:
                import torch

                if not torch.cuda.is_available():
                    device_type = "cpu"
                else:
                    index = getattr(device, "index", None)
                    index = torch.cuda.current_device() if index is None else index
                    gpu_name = str(torch.cuda.get_device_name(index))
                    major, minor = torch.cuda.get_device_capability(index)
                    capability = f"{major}.{minor}"
            except Exception:  # noqa: BLE001 - a broken driver: no CUDA
                device_type = "cpu"
        # TensorRT only matters on CUDA: importing it elsewhere costs start-up time for nothing
        tensorrt_version = _tensorrt_version() if device_type == "cuda" else None
        return cls(
            device_type=device_type,
            tensorrt_version=tensorrt_version,
            polygraphy=_has_module("polygraphy"),
            onnx=_has_module("onnx") and _has_module("onnxscript"),
            torch_compile=_torch_compile_usable(),
            gpu_name=gpu_name,
            compute_capability=capability,
        )

    def to_json(self) -> dict[str, Any]:
        return {"device_type": self.device_type, "tensorrt_version": self.tensorrt_version,
                "polygraphy": self.polygraphy, "onnx": self.onnx, "torch_compile": self.torch_compile,
                "gpu_name": self.gpu_name, "compute_capability": self.compute_capability}


@dataclass(frozen=True)
class BackendChoice:
    """The backend that runs, and why (``code`` from :data:`CODES`, ``reason`` for a user)."""

    requested: str
    backend: str   # "torch" | "trt" | "compile"
    code: str
    reason: str

    def to_json(self) -> dict[str, str]:
        return {"requested": self.requested, "backend": self.backend, "code": self.code, "reason": self.reason}

    def fall_back(self, code: str, reason: str) -> BackendChoice:
        """The same request, now run by plain PyTorch because of ``code`` / ``reason``."""
        return BackendChoice(requested=self.requested, backend="torch", code=code, reason=reason)


def _trt_blocker(env: BackendEnvironment, failed_before: Mapping[str, Any] | None) -> tuple[str, str] | None:
    """Why TensorRT cannot run here, as ``(code, reason)``; None when it can be tried."""
    if env.device_type != "cuda":
        return ("no_cuda", f"TensorRT needs a CUDA GPU but this node runs on {env.device_type!r} (no CUDA device); "
                           "run on a node with an NVIDIA GPU to use --backend trt")
    if env.tensorrt_version is None:
        return ("package_missing", f"tensorrt is not installed on this node ({TRT_INSTALL_HINT}; it needs "
                                   "access to NVIDIA's package index)")
    major = tensorrt_major(env.tensorrt_version)
    if major not in SUPPORTED_TENSORRT_MAJORS:
        supported = "/".join(f"{m}.x" for m in SUPPORTED_TENSORRT_MAJORS)
        return ("unsupported_tensorrt", f"TensorRT {env.tensorrt_version} is not supported (the fp16 engine build "
                                        f"needs TensorRT {supported}; TensorRT 11 removed the fp16 builder flag); "
                                        f"{_TENSORRT_PIN}")
    missing = [name for name, ok in (("polygraphy", env.polygraphy), ("onnx and onnxscript", env.onnx)) if not ok]
    if missing:
        return ("package_missing", f"{' and '.join(missing)} not installed, which the TensorRT build needs "
                                   f"({TRT_INSTALL_HINT})")
    if failed_before:
        what = str(failed_before.get("reason") or failed_before.get("code") or "unknown error")
        where = failed_before.get("marker") or "the engine cache"
        return ("failed_before", f"an earlier engine build on this node failed: {what} (delete the failure marker "
                                 f"{where} or run `nvseg` with a fresh --engine-cache-dir to try again)")
    return None


def choose_backend(requested: str, env: BackendEnvironment, *,
                   failed_before: Mapping[str, Any] | None = None) -> BackendChoice:
    """The backend for ``requested`` on ``env``.

    * ``torch``: plain PyTorch.
    * ``auto``: TensorRT when the device is CUDA, tensorrt imports with a supported major
      (:data:`SUPPORTED_TENSORRT_MAJORS`), polygraphy and onnx are present and no earlier build on this node
      failed (``failed_before``: the marker of :meth:`EngineCache.failed_before`); else PyTorch (``auto_torch``)
      with the reason.
    * ``trt``: the same checks; a failing one -> PyTorch with its specific code (``no_cuda``,
      ``package_missing``, ``unsupported_tensorrt``, ``failed_before``).
    * ``compile``: ``torch.compile`` of the image encoder when usable (CPU too), else PyTorch
      (``package_missing``).

    Raises:
        ConfigError: ``requested`` is not one of :data:`BACKENDS`.
    """
    name = str(requested).strip().lower() if isinstance(requested, str) else requested
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend {requested!r}", hint=f"choose one of: {', '.join(BACKENDS)}",
                          choices=list(BACKENDS))
    if name == "torch":
        return BackendChoice(name, "torch", "requested", "plain PyTorch, as requested")
    if name == "compile":
        if env.torch_compile:
            return BackendChoice(name, "compile", "requested", "torch.compile of the image encoder, as requested")
        return BackendChoice(name, "torch", "package_missing",
                             "torch.compile is not usable here (it needs torch >= 2 with its inductor compiler, not "
                             "on Windows); upgrade torch (pip install 'torch>=2') or use --backend torch")
    blocker = _trt_blocker(env, failed_before)
    if name == "auto":
        if blocker is None:
            return BackendChoice(name, "trt", "auto_trt",
                                 f"TensorRT {env.tensorrt_version} fp16 engine for the image encoder "
                                 f"(CUDA, tensorrt, polygraphy and onnx present)")
        return BackendChoice(name, "torch", "auto_torch", f"plain PyTorch: {blocker[1]}")
    if blocker is None:
        return BackendChoice(name, "trt", "requested",
                             f"TensorRT {env.tensorrt_version} fp16 engine for the image encoder, as requested")
    return BackendChoice(name, "torch", blocker[0], f"--backend trt not used: {blocker[1]}")
