"""Apply a :class:`~nvseg_ray.backends.choice.BackendChoice` to a VISTA3D network: plain PyTorch, ``torch.compile``
of the image encoder, or a TensorRT fp16 engine of the encoder's down path (upstream's ``inference_trt.json``),
built once per node into the :class:`~nvseg_ray.backends.engine_cache.EngineCache`.

Every failure falls back to the plain network with the reason (``BackendChoice.fall_back``); a failed TensorRT
build also leaves a failure marker so later starts on the node go straight to PyTorch. ``torch`` stays the only
hard dependency: ``monai.networks.trt_compile`` (and through it tensorrt / polygraphy / onnx) is imported only on
the trt path.

Fixed shapes: both accelerated backends are built for one window (``patch_size``) and one window batch
(``window_batch``). ``torch.compile`` runs with ``dynamic=False``, so **the caller must pad the last window batch
of a volume to ``window_batch`` windows** (a smaller batch triggers a recompilation, minutes on the full network);
the TensorRT engine accepts batches 1..``window_batch`` (``dynamic_batchsize=[1, w, w]``) but a different window
size is outside its profile.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .choice import BackendChoice, BackendEnvironment
from .engine_cache import (ENGINE_SUBMODULE, BuildTimeout, EngineCache, EngineKey, default_cache_dir,
                           monai_base_path)

#: the precision of the TensorRT engine (upstream's; fp16 vs fp32: relative L2 0.003, label agreement 0.999)
TRT_PRECISION = "fp16"


def _autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    """fp16 autocast on CUDA when ``amp`` (what inference runs under); a no-op elsewhere."""
    if amp and torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def warm_up(network: torch.nn.Module, *, patch_size: Sequence[int], window_batch: int, in_channels: int,
            device: torch.device | str, amp: bool = True, grad_mode: str = "inference") -> float:
    """One forward of a zero window batch ``[window_batch, in_channels, *patch_size]`` through the automatic
    branch's encoder, ``image_encoder(x, with_point=False, with_label=True)`` (what
    :class:`nvseg_ray.inference.AutoFeatures` calls), under fp16 autocast on CUDA when ``amp``.

    The model actor's start-up calls it (through :func:`accelerate`) so that the first volume does not pay for the
    compilation / engine build. ``grad_mode``: ``"inference"`` (``torch.inference_mode``, what inference runs
    under, so torch.compile's guards match) or ``"no_grad"`` (the TensorRT build: MONAI exports to ONNX under
    ``no_grad``). Returns the seconds it took.
    """
    device = torch.device(device)
    x = torch.zeros(int(window_batch), int(in_channels), *(int(s) for s in patch_size), device=device)
    grad = torch.inference_mode() if grad_mode == "inference" else torch.no_grad()
    start = time.perf_counter()
    with grad, _autocast(device, amp):
        network.image_encoder(x, with_point=False, with_label=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _forwarding_logger(log: Callable[[str], None]) -> logging.Logger:
    """A logger (not propagating: MONAI's own does not either) whose records go to ``log``."""

    class _Forward(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            with contextlib.suppress(Exception):
                log(f"[trt_compile] {record.getMessage()}")

    logger = logging.getLogger(f"nvseg_ray.backends.trt.{id(log):x}")
    logger.handlers[:] = [_Forward()]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return first if len(first) <= 300 else first[:297] + "..."


def accelerate(network: torch.nn.Module, choice: BackendChoice, *, patch_size: Sequence[int], window_batch: int,
               in_channels: int, device: torch.device | str, cache: EngineCache | None, checkpoint_sha256: str,
               env: BackendEnvironment, amp: bool = True,
               log: Callable[[str], None] = print) -> tuple[torch.nn.Module, BackendChoice]:
    """Run ``choice`` on ``network`` (already loaded and on ``device``, in eval mode) and warm it up.

    * ``torch``: ``network`` unchanged.
    * ``compile``: ``network.image_encoder`` replaced by ``torch.compile(..., dynamic=False)`` and compiled by one
      warm-up forward; any exception restores the plain encoder (fall back ``build_failed``). Load checkpoints
      before: the compiled module's state-dict keys carry an ``_orig_mod.`` prefix.
    * ``trt``: ``image_encoder.encoder`` becomes a TensorRT fp16 engine through MONAI's ``trt_compile`` (as
      upstream), its plan kept in ``cache`` (default: :func:`~nvseg_ray.backends.engine_cache.default_cache_dir`)
      under an :class:`EngineKey` of the weights, GPU, TensorRT / MONAI versions and shapes. An earlier failure
      marker -> PyTorch (``failed_before``); a build that raises or whose lock wait times out -> marker written,
      the plain network back (``build_failed`` / ``build_timeout``).

    Returns:
        ``(network, choice)``: the network to run (the same object, its encoder possibly replaced or patched) and
        the choice that really applies (``choice`` itself, or its fall-back).
    """
    if choice.backend == "torch":
        return network, choice
    shapes = dict(patch_size=tuple(int(s) for s in patch_size), window_batch=int(window_batch),
                  in_channels=int(in_channels), device=device, amp=amp)
    if choice.backend == "compile":
        return _accelerate_compile(network, choice, log=log, **shapes)
    if choice.backend == "trt":
        return _accelerate_trt(network, choice, cache=cache, checkpoint_sha256=checkpoint_sha256, env=env, log=log,
                               **shapes)
    raise ValueError(f"unknown backend {choice.backend!r} in {choice}")


# ------------------------------------------------------------------------------------------------------------
# torch.compile
# ------------------------------------------------------------------------------------------------------------


def _accelerate_compile(network: torch.nn.Module, choice: BackendChoice, *, log: Callable[[str], None],
                        **shapes: Any) -> tuple[torch.nn.Module, BackendChoice]:
    plain = network.image_encoder
    try:
        network.image_encoder = torch.compile(plain, dynamic=False)
        seconds = warm_up(network, grad_mode="inference", **shapes)
    except Exception as exc:  # noqa: BLE001 - any compiler failure: run the plain encoder
        network.image_encoder = plain
        reason = (f"torch.compile of the image encoder failed ({_short(exc)}); running plain PyTorch "
                  "(use --backend torch to skip the attempt, or report the error)")
        log(reason)
        return network, choice.fall_back("build_failed", reason)
    log(f"torch.compile: image encoder compiled for windows {list(shapes['patch_size'])} x "
        f"{shapes['window_batch']} in {seconds:.1f} s")
    return network, choice


# ------------------------------------------------------------------------------------------------------------
# TensorRT
# ------------------------------------------------------------------------------------------------------------


def engine_key(env: BackendEnvironment, *, checkpoint_sha256: str, patch_size: Sequence[int], window_batch: int,
               in_channels: int, precision: str = TRT_PRECISION) -> EngineKey:
    """The cache key of the encoder engine for these weights, this node's GPU and software, and these shapes."""
    import monai

    return EngineKey(checkpoint_sha256=str(checkpoint_sha256), gpu_name=env.gpu_name,
                     compute_capability=env.compute_capability, tensorrt_version=str(env.tensorrt_version or ""),
                     monai_version=str(monai.__version__), precision=precision,
                     patch_size=tuple(int(s) for s in patch_size), window_batch=int(window_batch),
                     in_channels=int(in_channels))


def _trt_module(network: torch.nn.Module) -> torch.nn.Module:
    module = network
    for part in ENGINE_SUBMODULE.split("."):
        module = getattr(module, part)
    return module


def _unwrap_trt(network: torch.nn.Module) -> None:
    """Undo ``trt_compile``'s patch of the encoder (its instance ``forward``, ``orig_forward``, ``_trt_compiler``).

    MONAI's export also wrapped the encoder's norm layers in fp32 casts (``add_casts_around_norms``); those stay
    (numerically they only run the norms in fp32)."""
    with contextlib.suppress(AttributeError):
        module = _trt_module(network)
        for name in ("forward", "orig_forward", "_trt_compiler"):
            module.__dict__.pop(name, None)


def _trt_compile(network: torch.nn.Module, plan: Path, window_batch: int, logger: logging.Logger) -> None:
    """Patch the encoder with MONAI's ``trt_compile`` so that it reads / writes exactly ``plan``: MONAI saves
    ``f"{base_path}.{submodule}.plan"``, so ``base_path`` is ``plan`` less ``.image_encoder.encoder.plan``."""
    from monai.networks import trt_compile  # lazy: pulls in tensorrt / polygraphy when present

    _unwrap_trt(network)  # trt_compile patches a module only once: a retry must see a plain one
    trt_compile(
        network,
        monai_base_path(plan, ENGINE_SUBMODULE),
        # "logger" is trt_compile's own keyword: inside args it would reach TrtCompiler twice (a TypeError)
        args={"precision": TRT_PRECISION, "dynamic_batchsize": [1, int(window_batch), int(window_batch)],
              "fallback": False},
        submodule=[ENGINE_SUBMODULE],
        logger=logger,
    )


def _engine_loaded(network: torch.nn.Module) -> bool:
    compiler = getattr(_trt_module(network), "_trt_compiler", None)
    return compiler is not None and getattr(compiler, "engine", None) is not None


def _accelerate_trt(network: torch.nn.Module, choice: BackendChoice, *, cache: EngineCache | None,
                    checkpoint_sha256: str, env: BackendEnvironment, log: Callable[[str], None],
                    **shapes: Any) -> tuple[torch.nn.Module, BackendChoice]:
    cache = cache if cache is not None else EngineCache(default_cache_dir())
    key = engine_key(env, checkpoint_sha256=checkpoint_sha256, patch_size=shapes["patch_size"],
                     window_batch=shapes["window_batch"], in_channels=shapes["in_channels"])
    marker = cache.failed_before(key)
    if marker:
        reason = (f"an earlier engine build on this node failed: {marker.get('reason', 'unknown error')} "
                  f"(delete {marker.get('marker', cache.marker_path(key))} to try again)")
        log(reason)
        return network, choice.fall_back("failed_before", reason)

    logger = _forwarding_logger(log)
    plan = cache.plan_path(key)
    built: list[float] = []

    def build_fn(tmp: Path) -> None:
        # MONAI builds on the first forward (ONNX export, then the TensorRT build) and writes the plan to tmp
        _trt_compile(network, tmp, shapes["window_batch"], logger)
        built.append(warm_up(network, grad_mode="no_grad", **shapes))
        if not tmp.is_file():
            raise RuntimeError("trt_compile wrote no engine (it has no effect without tensorrt, polygraphy and "
                               "CUDA; see its log above)")

    try:
        cache.build(key, build_fn)
        if built:  # this process built it (and holds the engine, loaded from the temp file now renamed)
            compiler = getattr(_trt_module(network), "_trt_compiler", None)
            if compiler is not None:
                compiler.plan_path = str(plan)
            cache.clear_failure(key)
            log(f"TensorRT: built the encoder engine {plan} in {built[0]:.1f} s")
        else:  # the plan was there (or another actor built it while we waited): load it
            _trt_compile(network, plan, shapes["window_batch"], logger)
            seconds = warm_up(network, grad_mode="no_grad", **shapes)
            if not _engine_loaded(network):
                raise RuntimeError(f"trt_compile did not load the cached engine {plan}")
            log(f"TensorRT: loaded the encoder engine {plan} ({seconds:.1f} s to the first window)")
    except BuildTimeout as exc:
        return _trt_failed(network, choice, cache, key, "build_timeout",
                           f"the TensorRT engine build did not finish in time ({exc}); running plain PyTorch "
                           f"(delete {cache.lock_path(key)} if no build is running, or use --backend torch)", log)
    except Exception as exc:  # noqa: BLE001 - export, build or load failed: run the plain network
        return _trt_failed(network, choice, cache, key, "build_failed",
                           f"the TensorRT engine build failed ({_short(exc)}); running plain PyTorch "
                           f"(fix the error and delete {cache.marker_path(key)} to retry, or use --backend torch)",
                           log)
    return network, choice


def _trt_failed(network: torch.nn.Module, choice: BackendChoice, cache: EngineCache, key: EngineKey, code: str,
                reason: str, log: Callable[[str], None]) -> tuple[torch.nn.Module, BackendChoice]:
    _unwrap_trt(network)
    with contextlib.suppress(OSError):
        cache.mark_failed(key, code, reason)
    log(reason)
    return network, choice.fall_back(code, reason)
