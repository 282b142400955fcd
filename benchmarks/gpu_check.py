#!/usr/bin/env python
"""GPU check for the VISTA3D / NV-Segment-CTMR network: speed per window, fp16/TensorRT agreement, one volume.

Self-contained: needs only torch, monai and nibabel (numpy comes with them) -- no Ray, no nvseg_ray -- so it can
be copied onto any GPU machine and run there (``docs/gpu.md``):

    pip install torch monai==1.6.1 nibabel
    python gpu_check.py --json gpu_check.json          # full check, one CUDA GPU, < 5 minutes
    python gpu_check.py --smoke --device cpu           # reduced mode (tiny network), CPU, < 1 minute

What it measures (random, seeded weights: speed and numerical agreement, not segmentation quality):

1. the environment (GPU, driver, CUDA, cuDNN, torch, monai, TensorRT if it imports);
2. the full-width ``monai.networks.nets.vista3d132()`` per 192 x 192 x 128 window, at window batch 1, 2 and 4,
   timed with CUDA events after a warm-up: fp32 with TF32 off, fp32 with TF32 on, fp16 autocast, ``torch.compile``
   of ``image_encoder`` (fp16 autocast, ``dynamic=False``) and TensorRT (MONAI ``trt_compile`` of
   ``image_encoder.encoder``, fp16, as upstream's ``inference_trt.json``), each only when available. What is timed
   is the direct predictor the nvseg-ray engine runs per window: ``image_encoder(x, with_point=False,
   with_label=True)`` then ``class_head.image_post_mapping``;
3. label agreement of fp16 (and TF32, compile, TensorRT) against fp32 on a few windows of a synthetic CT:
   logits = 117 class embeddings @ window features, labels = argmax, 0 where no logit > 0;
4. one synthetic 256^3 volume end to end: sliding windows (overlap 0.25) stitched on the device in float32,
   class-chunked argmax on the device, uint8 labels back to the host; device memory peak; volumes per second.

Results go to ``--json`` (default ``gpu_check.json``) and a short summary is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
#: The CT_BODY-like prompt: 117 class ids.
CLASS_IDS = list(range(1, 118))
CLASS_CHUNK = 16
#: Upstream's intensity window for CT (ScaleIntensityRanged a_min / a_max, HU) -> [0, 1].
HU_MIN, HU_MAX = -963.8, 1053.7

FULL = {"width": 48, "window": (192, 192, 128), "volume": (256, 256, 256), "warmup": 3, "iters": 10,
        "volume_repeats": 3, "agreement_windows": 4}
SMOKE = {"width": 8, "window": (32, 32, 32), "volume": (64, 64, 64), "warmup": 2, "iters": 3,
         "volume_repeats": 2, "agreement_windows": 2}

NO_CUDA = "no CUDA device: run with --smoke on CPU, or on a GPU machine"


class UsageError(Exception):
    """An expected situation the user has to change (exit code 2, no traceback)."""


# --------------------------------------------------------------------------------------------- small helpers


class Budget:
    """Wall-clock budget: optional parts are skipped when their estimated cost would overrun it."""

    def __init__(self, seconds: float) -> None:
        self.start = time.perf_counter()
        self.seconds = float(seconds)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def allows(self, estimate_s: float) -> bool:
        return self.elapsed() + estimate_s <= self.seconds


def say(args: argparse.Namespace, msg: str) -> None:
    if not args.quiet:
        print(msg, flush=True)


def error_text(exc: BaseException, limit: int = 600) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= limit else text[:limit] + " ..."


def dist_version(name: str) -> str | None:
    """Installed distribution version without importing it; None when not installed."""
    try:
        return importlib.metadata.version(name)
    except Exception:  # noqa: BLE001 - any metadata problem means "unknown"
        return None


def module_present(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except Exception:  # noqa: BLE001
        return False


def sync(device) -> None:  # noqa: ANN001
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def set_tf32(enabled: bool) -> None:
    """TF32 for cuDNN convolutions and cuBLAS matmuls, through the new API where it exists (mixing the legacy
    ``allow_tf32`` flags with it raises in torch >= 2.9)."""
    import torch

    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        value = "tf32" if enabled else "ieee"
        torch.backends.cudnn.conv.fp32_precision = value
        torch.backends.cuda.matmul.fp32_precision = value
    else:  # torch < 2.9
        torch.backends.cudnn.allow_tf32 = enabled
        torch.backends.cuda.matmul.allow_tf32 = enabled


def tf32_defaults() -> dict[str, Any]:
    import torch

    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        return {"cudnn_conv": conv.fp32_precision, "cuda_matmul": torch.backends.cuda.matmul.fp32_precision}
    return {"cudnn_conv": "tf32" if torch.backends.cudnn.allow_tf32 else "ieee",
            "cuda_matmul": "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"}


def reset_peak(device) -> None:  # noqa: ANN001
    import torch

    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device) -> dict[str, float]:
    import torch

    if device.type != "cuda":
        return {}
    return {"device_peak_allocated_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1),
            "device_peak_reserved_mb": round(torch.cuda.max_memory_reserved(device) / 2**20, 1)}


def cuda_alive(device) -> bool:  # noqa: ANN001
    """False when the CUDA context is broken (a sticky error such as an illegal address)."""
    import torch

    if device.type != "cuda":
        return True
    try:
        torch.ones(1, device=device).add_(1).item()
        torch.cuda.synchronize(device)
        return True
    except Exception:  # noqa: BLE001
        return False


def release(device) -> None:  # noqa: ANN001
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------- environment


def environment(device) -> dict[str, Any]:  # noqa: ANN001
    """Versions and the device; nothing that identifies the machine (no hostname, no serials, no UUIDs)."""
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "os": platform.system(),
        "arch": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": None,
        "monai": dist_version("monai"),
        "nibabel": dist_version("nibabel"),
        "numpy": dist_version("numpy"),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "tf32_defaults": tf32_defaults(),
    }
    with contextlib.suppress(Exception):
        env["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu"] = {
            "name": props.name,
            "compute_capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "total_memory_mb": round(props.total_memory / 2**20),
            "device_count": torch.cuda.device_count(),
        }
        with contextlib.suppress(Exception):
            free, total = torch.cuda.mem_get_info(device)
            env["gpu"]["free_memory_mb"] = round(free / 2**20)
        with contextlib.suppress(Exception):
            v = int(torch._C._cuda_getDriverVersion())  # CUDA driver API version, e.g. 12080
            env["gpu"]["cuda_driver_api"] = f"{v // 1000}.{(v % 1000) // 10}"
        env["gpu"]["driver"] = nvidia_driver_version()
    env["packages"] = {name: dist_version(dist) for name, dist in (
        ("polygraphy", "polygraphy"), ("onnx", "onnx"), ("onnxscript", "onnxscript"),
        ("onnx_graphsurgeon", "onnx-graphsurgeon"), ("onnxruntime", "onnxruntime"),
        ("onnxruntime_gpu", "onnxruntime-gpu"), ("torch_tensorrt", "torch-tensorrt"))}
    env["tensorrt"] = tensorrt_info()
    return env


def nvidia_driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=False)
        lines = [line.strip() for line in out.stdout.splitlines() if line.strip()]
        return lines[0] if out.returncode == 0 and lines else None
    except Exception:  # noqa: BLE001 - no nvidia-smi, or it hung
        return None


def tensorrt_info() -> dict[str, Any]:
    """Whether tensorrt and polygraphy import (lazily; any failure is recorded, never raised)."""
    info: dict[str, Any] = {"importable": False, "version": None, "polygraphy_importable": False}
    try:
        import tensorrt  # noqa: PLC0415

        info["importable"] = True
        info["version"] = getattr(tensorrt, "__version__", None)
    except BaseException as exc:  # noqa: BLE001 - a broken install can raise anything, even SystemExit
        info["error"] = error_text(exc, 300)
    try:
        import polygraphy  # noqa: F401, PLC0415

        info["polygraphy_importable"] = True
    except BaseException as exc:  # noqa: BLE001
        info["polygraphy_error"] = error_text(exc, 300)
    return info


# --------------------------------------------------------------------------------------------- inputs and model


def synthetic_ct(shape: tuple[int, int, int], seed: int = 0):  # noqa: ANN201
    """A CT-like volume [1, 1, H, W, D] float32 in [0, 1]: an elliptic-cylinder body (fat rim, soft tissue),
    a spine, lungs and organ-like blobs of different densities, noise, lightly smoothed; seeded."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    g = torch.Generator().manual_seed(seed)
    h, w, d = shape
    x = torch.linspace(-1, 1, h)[:, None, None]
    y = torch.linspace(-1, 1, w)[None, :, None]
    z = torch.linspace(-1, 1, d)[None, None, :]
    hu = torch.full(shape, -1000.0)
    body = ((x / 0.85) ** 2 + (y / 0.65) ** 2 <= 1) & (z.abs() <= 0.97)
    inner = ((x / 0.78) ** 2 + (y / 0.58) ** 2 <= 1) & (z.abs() <= 0.97)
    hu = torch.where(body, torch.tensor(-100.0), hu)
    hu = torch.where(inner, torch.tensor(40.0), hu)
    for side in (-1, 1):  # lungs in the upper half
        lung = ((x - side * 0.4) / 0.3) ** 2 + ((y + 0.05) / 0.35) ** 2 + ((z - 0.55) / 0.4) ** 2 <= 1
        hu = torch.where(lung & inner, torch.tensor(-850.0), hu)
    spine = ((x / 0.09) ** 2 + ((y - 0.42) / 0.09) ** 2 <= 1) & (z.abs() <= 0.97)
    hu = torch.where(spine, torch.tensor(700.0), hu)
    densities = (60.0, 150.0, 25.0, 90.0, -30.0, 300.0, 55.0, 120.0)
    for i in range(12):  # organ-like blobs
        c = (torch.rand(3, generator=g) * 1.2 - 0.6).tolist()
        r = (torch.rand(3, generator=g) * 0.17 + 0.08).tolist()
        blob = ((x - c[0]) / r[0]) ** 2 + ((y - c[1] * 0.8) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2 <= 1
        hu = torch.where(blob & inner & ~spine, torch.tensor(densities[i % len(densities)]), hu)
    hu = hu + torch.randn(shape, generator=g) * 20.0
    hu = F.avg_pool3d(hu[None, None], kernel_size=3, stride=1, padding=1, count_include_pad=False)
    return ((hu - HU_MIN) / (HU_MAX - HU_MIN)).clamp_(0.0, 1.0).contiguous()


def build_network(width: int, device, seed: int = 0):  # noqa: ANN001, ANN201
    """``vista3d132(encoder_embed_dim=width)`` with seeded random weights, in eval mode on ``device``."""
    import torch
    from monai.networks.nets import vista3d132

    torch.manual_seed(seed)
    return vista3d132(encoder_embed_dim=width).to(device).eval()


class DirectPredictor:
    """What the engine runs per window: ``[B, 1, h, w, d] -> [B, F, h, w, d]`` float32 features."""

    def __init__(self, network, encoder=None) -> None:  # noqa: ANN001
        self.network = network
        self.encoder = encoder if encoder is not None else network.image_encoder

    def __call__(self, x):  # noqa: ANN001, ANN204
        _, auto = self.encoder(x, with_point=False, with_label=True)
        return self.network.class_head.image_post_mapping(auto).float()


def class_embeddings(network, device):  # noqa: ANN001, ANN201
    """The class head's MLP-mapped embeddings of :data:`CLASS_IDS`, [117, F] float32."""
    import torch

    head = network.class_head
    with torch.no_grad():
        ids = torch.as_tensor(CLASS_IDS, dtype=torch.long, device=device)[:, None]
        emb = head.class_embeddings(ids)
        if head.use_mlp:
            emb = head.mlp(emb)
        return emb[:, 0, :].float()


def labels_from_features(features, embeddings, chunk: int = CLASS_CHUNK):  # noqa: ANN001, ANN201
    """[F, *spatial] float32 -> [*spatial] uint8 class ids: argmax over the classes' logits, ``chunk`` classes at
    a time (running maximum), 0 where no logit > 0; the first class wins a tie."""
    import torch

    spatial = features.shape[1:]
    flat = features.reshape(features.shape[0], -1)
    best = torch.zeros(flat.shape[1], dtype=flat.dtype, device=flat.device)
    best_idx = torch.zeros(flat.shape[1], dtype=torch.int64, device=flat.device)
    for start in range(0, embeddings.shape[0], chunk):
        logits = embeddings[start : start + chunk] @ flat
        chunk_max, chunk_arg = logits.max(dim=0)
        del logits
        better = chunk_max > best
        best = torch.where(better, chunk_max, best)
        best_idx = torch.where(better, chunk_arg + (start + 1), best_idx)
    lut = torch.as_tensor([0, *CLASS_IDS], dtype=torch.uint8, device=flat.device)
    return lut[best_idx].reshape(spatial)


def precision_context(precision: str, device):  # noqa: ANN001, ANN201
    """TF32 switch plus autocast for one precision name."""
    import torch

    set_tf32(precision == "tf32")
    if precision in ("fp16", "compile", "trt"):
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def agreement_windows(volume, window: tuple[int, ...], n: int) -> list:  # noqa: ANN001
    """``n`` window crops [1, 1, *window] of ``volume`` at spread-out positions."""
    fractions = [(0.5, 0.5, 0.5), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), (0.0, 1.0, 0.5), (1.0, 0.0, 0.25),
                 (0.5, 0.0, 1.0), (0.25, 0.75, 0.0), (0.75, 0.25, 0.75)]
    crops = []
    size = volume.shape[2:]
    for f in fractions[:n]:
        start = [round(fi * max(s - r, 0)) for fi, s, r in zip(f, size, window)]
        sl = tuple(slice(st, st + r) for st, r in zip(start, window))
        crops.append(volume[(slice(None), slice(None), *sl)].contiguous())
    return crops


# --------------------------------------------------------------------------------------------- measurements


def time_calls(fn, x, warmup: int, iters: int, device) -> list[float]:  # noqa: ANN001
    """Milliseconds of each of ``iters`` calls of ``fn(x)`` after ``warmup`` calls: CUDA events on a GPU,
    ``perf_counter`` on a CPU."""
    import torch

    for _ in range(warmup):
        fn(x)
    sync(device)
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in events:
            start.record()
            fn(x)
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) for start, end in events]
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - t0) * 1000.0)
    return times


def window_entry(precision: str, batch: int, times_ms: list[float], device, **extra: Any) -> dict[str, Any]:  # noqa: ANN001
    med = statistics.median(times_ms)
    entry: dict[str, Any] = {
        "precision": precision,
        "window_batch": batch,
        "ms_per_window": round(med / batch, 3),
        "ms_per_batch": round(med, 3),
        "ms_per_batch_min": round(min(times_ms), 3),
        "iterations": len(times_ms),
        "tf32": precision == "tf32",
    }
    entry.update(extra)
    entry.update(peak_mb(device))
    return entry


def compare(reference: list, candidate: list, embeddings) -> dict[str, Any]:  # noqa: ANN001
    """Label agreement and relative L2 of features (lists of [1, F, *window] float32 on the device)."""
    equal = total = foreground = 0
    num = den = 0.0
    distinct: set[int] = set()
    for ref, cand in zip(reference, candidate):
        lab_r = labels_from_features(ref[0], embeddings)
        lab_c = labels_from_features(cand[0], embeddings)
        equal += int((lab_r == lab_c).sum())
        total += lab_r.numel()
        foreground += int((lab_r > 0).sum())
        distinct.update(int(v) for v in lab_r.unique().tolist())
        num += float((cand.double() - ref.double()).pow(2).sum())
        den += float(ref.double().pow(2).sum())
    return {
        "equal_fraction": equal / total if total else None,
        "rel_l2": math.sqrt(num / den) if den > 0 else None,
        "voxels": total,
        "reference_foreground_fraction": foreground / total if total else None,
        "reference_distinct_labels": len(distinct),
        "windows": len(reference),
    }


def window_features(predictor, windows: list, precision: str, device) -> list:  # noqa: ANN001
    import torch

    out = []
    with torch.no_grad(), precision_context(precision, device):
        for w in windows:
            out.append(predictor(w.to(device)))
    sync(device)
    return out


def run_volume(predictor, volume_host, embeddings, window, overlap: float, sw_batch: int,  # noqa: ANN001
               precision: str, device):  # noqa: ANN001, ANN201
    """One volume end to end: host float32 -> device, sliding windows stitched in float32 on the device,
    chunked argmax on the device, uint8 labels -> host. Returns (labels on the host, wall seconds)."""
    import torch
    from monai.inferers import sliding_window_inference

    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        image = volume_host.to(device, non_blocking=False)
        with precision_context(precision, device):
            feats = sliding_window_inference(
                image, roi_size=window, sw_batch_size=sw_batch, predictor=predictor, overlap=overlap,
                mode="constant", padding_mode="replicate", sw_device=device, device=device)
        set_tf32(False)
        labels = labels_from_features(feats[0].float(), embeddings)
        del feats, image
        labels_host = labels.cpu()
    sync(device)
    return labels_host, time.perf_counter() - t0


def sliding_window_count(shape, window, overlap: float) -> int:  # noqa: ANN001
    count = 1
    for size, roi in zip(shape, window):
        size = max(size, roi)
        step = roi if roi == size else max(int(roi * (1 - overlap)), 1)
        count *= math.ceil((size - roi) / step) + 1
    return count


# --------------------------------------------------------------------------------------------- sections


class Check:
    """Runs the sections, collecting the report; every section records its own failures and goes on."""

    def __init__(self, args: argparse.Namespace, device) -> None:  # noqa: ANN001
        self.args = args
        self.device = device
        self.cuda = device.type == "cuda"
        self.budget = Budget(args.time_budget_s)
        self.report: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "mode": "smoke" if args.smoke else "full",
            "environment": {},
            "settings": {},
            "windows": [],
            "agreement": {},
            "volume": {},
            "skipped": [],
            "errors": [],
            "total_s": None,
        }
        self.reference: list = []  # fp32 features of the agreement windows
        self.embeddings = None
        self.network = None
        self.volume_host = None
        self.crops: list = []
        self.compile_state: dict[str, Any] = {}  # the compiled predictor, its last compile time, or "done"
        self.trt_state: dict[str, Any] = {}

    # -- bookkeeping
    def skip(self, part: str, reason: str) -> None:
        self.report["skipped"].append({"part": part, "reason": reason})
        say(self.args, f"  skipped {part}: {reason}")

    def fail(self, section: str, exc: BaseException) -> None:
        self.report["errors"].append({"section": section, "error": error_text(exc)})
        say(self.args, f"  error in {section}: {error_text(exc, 300)}")
        release(self.device)

    def over_budget(self, part: str, estimate_s: float) -> bool:
        if self.budget.allows(estimate_s):
            return False
        self.skip(part, f"time budget: {self.budget.elapsed():.0f} s used of {self.budget.seconds:.0f} s, "
                        f"this part needs about {estimate_s:.0f} s (raise --time-budget-s)")
        return True

    # -- sections
    def run(self) -> dict[str, Any]:
        a = self.args
        say(a, f"gpu_check ({self.report['mode']} mode) on {self.device}")
        self.report["environment"] = environment(self.device)
        self.report["settings"] = {
            "width": a.width, "window": list(a.window), "window_batches": list(a.window_batches),
            "warmup": a.warmup, "iters": a.iters, "overlap": a.overlap, "volume_shape": list(a.volume_shape),
            "volume_precision": a.volume_precision, "volume_window_batch": a.volume_window_batch,
            "volume_repeats": a.volume_repeats, "agreement_windows": a.agreement_windows,
            "n_classes": len(CLASS_IDS), "class_chunk": CLASS_CHUNK, "seed": a.seed,
            "cudnn_benchmark": a.cudnn_benchmark, "time_budget_s": a.time_budget_s,
            "timer": "cuda_events" if self.cuda else "perf_counter",
            "weights": "random (torch.manual_seed(seed))",
        }
        import torch

        torch.backends.cudnn.benchmark = bool(a.cudnn_benchmark)
        try:
            self.prepare()
        except Exception as exc:  # noqa: BLE001 - nothing else can run without the network
            self.fail("prepare", exc)
            return self.finish()
        self.section("windows", self.eager_windows)
        self.section("agreement", self.eager_agreement)
        self.section("volume", self.volume)
        # batch 1 (upstream's setting) of both optional paths first, then the larger batches, while time is left
        first, rest = self.args.window_batches[:1], self.args.window_batches[1:]
        self.section("compile", lambda: self.compiled(first))
        self.section("trt", lambda: self.tensorrt(first))
        if rest:
            self.section("compile", lambda: self.compiled(rest))
            self.section("trt", lambda: self.tensorrt(rest))
        return self.finish()

    def section(self, name: str, fn) -> None:  # noqa: ANN001
        if not cuda_alive(self.device):
            self.skip(name, "the CUDA context is broken by an earlier error")
            return
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - recorded; the other sections still run
            self.fail(name, exc)

    def finish(self) -> dict[str, Any]:
        set_tf32(False)
        self.report["total_s"] = round(self.budget.elapsed(), 2)
        return self.report

    def prepare(self) -> None:
        a = self.args
        t0 = time.perf_counter()
        self.network = build_network(a.width, self.device, a.seed)
        self.report["settings"]["parameters_m"] = round(sum(p.numel() for p in self.network.parameters()) / 1e6, 2)
        self.embeddings = class_embeddings(self.network, self.device)
        self.volume_host = synthetic_ct(tuple(a.volume_shape), a.seed)
        self.crops = agreement_windows(self.volume_host, a.window, a.agreement_windows)
        say(a, f"  network vista3d132(encoder_embed_dim={a.width}): "
               f"{self.report['settings']['parameters_m']} M parameters; synthetic volume {tuple(a.volume_shape)} "
               f"({time.perf_counter() - t0:.1f} s)")

    def batch_input(self, b: int):  # noqa: ANN201
        import torch

        return torch.cat([self.crops[0]] * b).to(self.device)

    def time_precision(self, predictor, precision: str, b: int, **extra: Any) -> dict[str, Any]:  # noqa: ANN001
        import torch

        x = self.batch_input(b)
        reset_peak(self.device)
        try:
            with torch.no_grad(), precision_context(precision, self.device):
                times = time_calls(predictor, x, self.args.warmup, self.args.iters, self.device)
            entry = window_entry(precision, b, times, self.device, **extra)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory at a large batch
            entry = {"precision": precision, "window_batch": b, "error": error_text(exc), **extra}
        finally:
            set_tf32(False)
            del x
            release(self.device)
        self.report["windows"].append(entry)
        self.show_window(entry)
        return entry

    def show_window(self, e: dict[str, Any]) -> None:
        if "error" in e:
            say(self.args, f"  {e['precision']:>8} batch {e['window_batch']}: error {e['error'][:200]}")
            return
        extra = "".join(f", {k} {e[k]:.1f} s" for k in ("compile_s", "build_s") if k in e)
        say(self.args, f"  {e['precision']:>8} batch {e['window_batch']}: {e['ms_per_window']:8.2f} ms/window "
                       f"({e['ms_per_batch']:.2f} ms/batch{extra})")

    def precisions(self) -> list[str]:
        if self.args.smoke or not self.cuda:
            reason = ("fp16 autocast and TF32 need CUDA (CPU run)" if not self.cuda
                      else "smoke mode runs fp32 only")
            self.skip("fp16", reason)
            self.skip("tf32", reason)
            return ["fp32"]
        return ["fp32", "tf32", "fp16"]

    def eager_windows(self) -> None:
        predictor = DirectPredictor(self.network)
        first = True
        for precision in self.precisions():
            for b in self.args.window_batches:
                # the first fp32 timing always runs: it is the reference the rest is compared with
                if not first and self.over_budget(f"{precision} batch {b}", self.estimate_window(b)):
                    continue
                self.time_precision(predictor, precision, b)
                first = False

    def estimate_window(self, b: int) -> float:
        done = [e for e in self.report["windows"] if "ms_per_batch" in e and e["window_batch"] == b]
        per_call = max((e["ms_per_batch"] for e in done), default=500.0 * b) / 1000.0
        return per_call * (self.args.warmup + self.args.iters) + 2.0

    def eager_agreement(self) -> None:
        predictor = DirectPredictor(self.network)
        self.reference = window_features(predictor, self.crops, "fp32", self.device)
        agree = self.report["agreement"]
        if self.args.smoke or not self.cuda:
            again = window_features(predictor, self.crops, "fp32", self.device)
            agree["fp32_vs_fp32"] = compare(self.reference, again, self.embeddings)
            reason = "fp16 needs CUDA (CPU run)" if not self.cuda else "smoke mode runs fp32 only"
            agree["fp16_vs_fp32"] = {"skipped": reason}
        else:
            for precision in ("fp16", "tf32"):
                feats = window_features(predictor, self.crops, precision, self.device)
                agree[f"{precision}_vs_fp32"] = compare(self.reference, feats, self.embeddings)
                del feats
        agree.setdefault("trt_vs_fp32", {"skipped": "TensorRT not run yet"})
        for key, val in agree.items():
            if "equal_fraction" in val:
                say(self.args, f"  agreement {key}: {100 * val['equal_fraction']:.3f} % equal labels, "
                               f"relative L2 {val['rel_l2']:.2e}")

    def volume(self) -> None:
        a = self.args
        precision = a.volume_precision
        if precision != "fp32" and not self.cuda:
            precision = "fp32"
        n_windows = sliding_window_count(a.volume_shape, a.window, a.overlap)
        timed = [e for e in self.report["windows"] if "ms_per_window" in e and e["precision"] in ("fp32", precision)]
        ms = min((e["ms_per_window"] for e in timed), default=500.0)
        estimate = (ms / 1000.0 * n_windows + 1.0) * (1 + a.volume_repeats)
        if self.over_budget("volume", estimate):
            return
        predictor = DirectPredictor(self.network)
        reset_peak(self.device)
        labels, first_s = run_volume(predictor, self.volume_host, self.embeddings, a.window, a.overlap,
                                     a.volume_window_batch, precision, self.device)
        memory = peak_mb(self.device)
        runs = []
        for i in range(a.volume_repeats):
            if i > 0 and self.over_budget(f"volume repeat {i + 1}", first_s + 1.0):
                break
            _, s = run_volume(predictor, self.volume_host, self.embeddings, a.window, a.overlap,
                              a.volume_window_batch, precision, self.device)
            runs.append(s)
        memory_steady = peak_mb(self.device)
        vol = {
            "shape": list(a.volume_shape),
            "precision": precision,
            "window": list(a.window),
            "overlap": a.overlap,
            "window_batch": a.volume_window_batch,
            "n_windows": n_windows,
            "n_classes": len(CLASS_IDS),
            "class_chunk": CLASS_CHUNK,
            "label_dtype": str(labels.dtype).replace("torch.", ""),
            "foreground_fraction": float((labels > 0).float().mean()),
            "first_run_s": round(first_s, 3),
            "seconds": round(statistics.median(runs) if runs else first_s, 3),
            "steady_runs_s": [round(s, 3) for s in runs],
            "volumes_per_s": round(len(runs) / sum(runs), 3) if runs else None,
        }
        if memory:
            vol["device_peak_allocated_mb"] = max(memory["device_peak_allocated_mb"],
                                                  memory_steady.get("device_peak_allocated_mb", 0))
            vol["device_peak_reserved_mb"] = max(memory["device_peak_reserved_mb"],
                                                 memory_steady.get("device_peak_reserved_mb", 0))
        else:
            vol["device_peak_allocated_mb"] = vol["device_peak_reserved_mb"] = None
        self.report["volume"] = vol
        say(a, f"  volume {tuple(a.volume_shape)} ({n_windows} windows, {precision}): {vol['seconds']:.2f} s, "
               f"{vol['volumes_per_s']} volumes/s, device peak {vol['device_peak_allocated_mb']} MB allocated")
        del labels
        release(self.device)

    def compiled(self, batches: tuple[int, ...]) -> None:
        a = self.args
        st = self.compile_state
        if st.get("done"):
            return
        if a.skip_compile or a.smoke or not self.cuda:
            st["done"] = True
            self.skip("compile", "--skip-compile" if a.skip_compile else
                      "torch.compile is measured on CUDA in full mode only (CPU/smoke run)")
            return
        import torch

        if "predictor" not in st:
            encoder = torch.compile(self.network.image_encoder, dynamic=False)
            st["predictor"] = DirectPredictor(self.network, encoder)
            st["estimate"] = 90.0
        predictor = st["predictor"]
        for b in batches:
            if self.over_budget(f"compile batch {b}", st["estimate"] + self.estimate_window(b)):
                continue
            x = self.batch_input(b)
            try:
                with torch.no_grad(), precision_context("compile", self.device):
                    sync(self.device)
                    t0 = time.perf_counter()
                    predictor(x)
                    sync(self.device)
                    compile_s = time.perf_counter() - t0
            except Exception as exc:  # noqa: BLE001
                entry = {"precision": "compile", "window_batch": b, "error": error_text(exc)}
                self.report["windows"].append(entry)
                self.show_window(entry)
                st["done"] = True  # a compiler failure repeats at every batch size
                release(self.device)
                return
            finally:
                set_tf32(False)
                del x
            st["estimate"] = compile_s
            self.time_precision(predictor, "compile", b, compile_s=round(compile_s, 2),
                                note="torch.compile(image_encoder, dynamic=False) under fp16 autocast")
            if b == 1 and self.reference:
                feats = window_features(predictor, self.crops, "compile", self.device)
                self.report["agreement"]["compile_vs_fp32"] = compare(self.reference, feats, self.embeddings)
                del feats
        release(self.device)

    def tensorrt(self, batches: tuple[int, ...]) -> None:
        a = self.args
        agree = self.report["agreement"]
        st = self.trt_state
        if st.get("done"):
            return
        st["done"] = True  # until proven runnable below
        if a.skip_trt:
            self.skip("trt", "--skip-trt")
            agree["trt_vs_fp32"] = {"skipped": "--skip-trt"}
            return
        if not self.cuda:
            self.skip("trt", "TensorRT needs CUDA (CPU run)")
            agree["trt_vs_fp32"] = {"skipped": "TensorRT needs CUDA (CPU run)"}
            return
        if a.smoke:
            self.skip("trt", "smoke mode runs fp32 only")
            agree["trt_vs_fp32"] = {"skipped": "smoke mode runs fp32 only"}
            return
        info = self.report["environment"].get("tensorrt", {})
        if not (info.get("importable") and info.get("polygraphy_importable")):
            missing = [n for n, k in (("tensorrt", "importable"), ("polygraphy", "polygraphy_importable"))
                       if not info.get(k)]
            reason = (f"{' and '.join(missing)} not importable (pip install 'tensorrt-cu12<11' polygraphy onnx "
                      f"onnxscript onnxruntime onnx-graphsurgeon)")
            self.skip("trt", reason)
            agree["trt_vs_fp32"] = {"skipped": reason}
            return
        st["done"] = False
        import torch
        from monai.networks import trt_compile

        messages: list[str] = []

        class Collect(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                messages.append(f"{record.levelname}: {record.getMessage()}"[:400])

        logger = logging.getLogger("gpu_check.trt")
        logger.setLevel(logging.INFO)
        logger.propagate = False
        logger.handlers = [Collect()]
        st.setdefault("estimate", 120.0)  # no build time is published; replaced by the first measured one
        if "equal_fraction" not in agree.get("trt_vs_fp32", {}):
            agree["trt_vs_fp32"] = {"skipped": "no TensorRT engine was built"}
        with tempfile.TemporaryDirectory(prefix="gpu_check_trt_") as tmp:
            for b in batches:
                if self.over_budget(f"trt batch {b}", st["estimate"] + self.estimate_window(b)):
                    continue
                messages.clear()
                net = build_network(a.width, self.device, a.seed)  # same seeded weights, fresh modules
                base = str(Path(tmp) / f"vista3d_b{b}")
                extra: dict[str, Any] = {"note": "trt_compile(image_encoder.encoder), fp16 engine; decoders and "
                                                 "class head in PyTorch under fp16 autocast"}
                x = self.batch_input(b)
                try:
                    trt_compile(net, base, args={"precision": "fp16", "dynamic_batchsize": [1, b, b]},
                                submodule=["image_encoder.encoder"], logger=logger)
                    compiler = getattr(net.image_encoder.encoder, "_trt_compiler", None)
                    if compiler is None:
                        raise RuntimeError("trt_compile() had no effect: " + "; ".join(messages))
                    predictor = DirectPredictor(net)
                    with torch.no_grad():  # first call: ONNX export + engine build, fp32 input
                        sync(self.device)
                        t0 = time.perf_counter()
                        predictor(x)
                        sync(self.device)
                        build_s = time.perf_counter() - t0
                    if getattr(compiler, "engine", None) is None:
                        raise RuntimeError("no TensorRT engine after the first call: " + "; ".join(messages))
                except Exception as exc:  # noqa: BLE001 - recorded with the compiler's own messages
                    entry = {"precision": "trt", "window_batch": b, "error": error_text(exc),
                             "messages": messages[-10:], **extra}
                    self.report["windows"].append(entry)
                    self.show_window(entry)
                    agree["trt_vs_fp32"] = {"skipped": f"TensorRT failed: {error_text(exc, 300)}"}
                    del net, x
                    release(self.device)
                    st["done"] = True  # the same failure would repeat at every batch size
                    if not cuda_alive(self.device):
                        self.skip("trt (rest)", "the CUDA context is broken after the TensorRT failure")
                    return
                del x
                st["estimate"] = build_s
                extra["build_s"] = round(build_s, 2)
                plans = sorted(Path(tmp).glob(f"vista3d_b{b}*.plan"))
                if plans:
                    extra["engine_mb"] = round(sum(p.stat().st_size for p in plans) / 2**20, 1)
                self.time_precision(predictor, "trt", b, **extra)
                if b == 1 and self.reference:
                    feats = window_features(predictor, self.crops, "trt", self.device)
                    agree["trt_vs_fp32"] = compare(self.reference, feats, self.embeddings)
                    del feats
                del net, predictor
                release(self.device)
        if "equal_fraction" not in agree["trt_vs_fp32"] and 1 not in a.window_batches:
            agree["trt_vs_fp32"] = {"skipped": "agreement is measured with the batch-1 engine (add 1 to --windows)"}


# --------------------------------------------------------------------------------------------- CLI


def window_arg(text: str) -> tuple[int, int, int]:
    try:
        dims = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three comma-separated integers, got '{text}'") from None
    if len(dims) != 3 or any(d < 32 or d % 16 for d in dims):
        raise argparse.ArgumentTypeError(
            f"'{text}': a window needs three sizes, each a multiple of 16 and at least 32 (the encoder halves "
            "each axis four times and its instance norm needs more than one voxel at the bottom)")
    return dims  # type: ignore[return-value]


def shape_arg(text: str) -> tuple[int, int, int]:
    try:
        dims = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three comma-separated integers, got '{text}'") from None
    if len(dims) != 3 or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"'{text}': expected three positive sizes")
    return dims  # type: ignore[return-value]


def batches_arg(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"'{text}': expected positive window batch sizes")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true",
                   help="reduced mode for a CPU: tiny network (width 8), 32^3 windows, fp32 only, 64^3 volume")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available, else cpu)")
    p.add_argument("--json", default="gpu_check.json", help="where to write the results (default gpu_check.json)")
    p.add_argument("--window", type=window_arg, default=None, help="window size, e.g. 192,192,128")
    p.add_argument("--windows", "--window-batches", dest="window_batches", type=batches_arg, default=(1, 2, 4),
                   help="window batch sizes to time (default 1,2,4; smoke 1,2)")
    p.add_argument("--width", type=int, default=None, help="encoder_embed_dim (default 48; smoke 8)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls before timing (default 3; smoke 1)")
    p.add_argument("--iters", type=int, default=None, help="timed calls per measurement (default 10; smoke 3)")
    p.add_argument("--volume-shape", type=shape_arg, default=None, help="end-to-end volume (default 256,256,256)")
    p.add_argument("--volume-precision", choices=("fp16", "fp32", "tf32"), default=None,
                   help="precision of the end-to-end volume (default fp16 on CUDA, fp32 on CPU / smoke)")
    p.add_argument("--volume-window-batch", type=int, default=1, help="window batch of the volume (default 1)")
    p.add_argument("--volume-repeats", type=int, default=None,
                   help="steady-state volume runs after the first one (default 3; smoke 2)")
    p.add_argument("--agreement-windows", type=int, default=None, help="windows for label agreement (default 4)")
    p.add_argument("--overlap", type=float, default=0.25, help="sliding-window overlap (default 0.25)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="torch.backends.cudnn.benchmark = True (off by default, as in the engine)")
    p.add_argument("--skip-compile", action="store_true", help="do not time torch.compile")
    p.add_argument("--skip-trt", action="store_true", help="do not try TensorRT")
    p.add_argument("--time-budget-s", type=float, default=270.0,
                   help="skip the remaining optional parts when this many seconds would be exceeded (default 270)")
    p.add_argument("--quiet", action="store_true", help="only the summary")
    args = p.parse_args(argv)
    defaults = SMOKE if args.smoke else FULL
    if args.smoke and args.window_batches == (1, 2, 4):
        args.window_batches = (1, 2)
    args.window = args.window or defaults["window"]
    args.width = args.width or defaults["width"]
    args.warmup = defaults["warmup"] if args.warmup is None else max(args.warmup, 0)
    args.iters = max(args.iters or defaults["iters"], 1)
    args.volume_shape = args.volume_shape or defaults["volume"]
    args.volume_repeats = defaults["volume_repeats"] if args.volume_repeats is None else max(args.volume_repeats, 0)
    args.agreement_windows = max(1, min(8, args.agreement_windows or defaults["agreement_windows"]))
    args.volume_window_batch = max(1, args.volume_window_batch)
    if not 0 <= args.overlap < 1:
        p.error("--overlap must be in [0, 1)")
    return args


def resolve_device(args: argparse.Namespace):  # noqa: ANN201
    import torch

    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise UsageError(f"unknown device '{name}': use cuda, cuda:N or cpu") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(NO_CUDA)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"device '{name}' requested but this machine has {torch.cuda.device_count()} GPU(s)")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise UsageError(f"unsupported device '{name}': use cuda, cuda:N or cpu")
    if not args.smoke and device.type != "cuda":
        raise UsageError(NO_CUDA)
    if args.volume_precision is None:
        args.volume_precision = "fp16" if device.type == "cuda" and not args.smoke else "fp32"
    return device


def summary(report: dict[str, Any]) -> str:
    env = report["environment"]
    gpu = env.get("gpu") or {}
    trt = env.get("tensorrt") or {}
    lines = [f"== gpu_check ({report['mode']}) ==",
             f"device: {gpu.get('name', env.get('device'))}"
             + (f" (sm {gpu['compute_capability']}, {gpu['total_memory_mb']} MB, driver {gpu.get('driver')})"
                if gpu else ""),
             f"torch {env.get('torch')} (CUDA {env.get('torch_cuda')}, cuDNN {env.get('cudnn')}), monai "
             f"{env.get('monai')}, TensorRT {trt.get('version') if trt.get('importable') else 'not importable'}"]
    if report["windows"]:
        lines.append("window timings (median):")
        for e in report["windows"]:
            if "error" in e:
                lines.append(f"  {e['precision']:>8} b{e['window_batch']}: ERROR {e['error'][:160]}")
            else:
                extra = "".join(f"  [{k} {e[k]:.1f} s]" for k in ("compile_s", "build_s") if k in e)
                lines.append(f"  {e['precision']:>8} b{e['window_batch']}: {e['ms_per_window']:9.2f} ms/window"
                             f"{extra}")
    for key, val in report["agreement"].items():
        if "equal_fraction" in val:
            verdict = "ok" if val["equal_fraction"] >= 0.998 else "BELOW the 99.8 % goal"
            lines.append(f"agreement {key}: {100 * val['equal_fraction']:.3f} % labels equal ({verdict}), "
                         f"relative L2 {val['rel_l2']:.2e}")
        else:
            lines.append(f"agreement {key}: skipped ({val.get('skipped')})")
    vol = report["volume"]
    if vol:
        mem = (f", device peak {vol['device_peak_allocated_mb']} MB allocated / {vol['device_peak_reserved_mb']} MB "
               f"reserved" if vol.get("device_peak_allocated_mb") is not None else "")
        lines.append(f"volume {'x'.join(map(str, vol['shape']))} ({vol['n_windows']} windows, {vol['precision']}): "
                     f"{vol['seconds']:.2f} s, {vol['volumes_per_s']} volumes/s{mem}")
    for s in report["skipped"]:
        lines.append(f"skipped {s['part']}: {s['reason']}")
    for e in report["errors"]:
        lines.append(f"error in {e['section']}: {e['error'][:300]}")
    lines.append(f"total {report['total_s']:.1f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import torch  # noqa: F401
        import monai  # noqa: F401
    except ImportError as exc:
        print(f"gpu_check: {exc.name or exc} is not installed: pip install torch monai==1.6.1 nibabel",
              file=sys.stderr)
        return 2
    try:
        device = resolve_device(args)
    except UsageError as exc:
        print(f"gpu_check: {exc}", file=sys.stderr)
        return 2
    report = Check(args, device).run()
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(summary(report))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
