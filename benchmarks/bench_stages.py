#!/usr/bin/env python
"""Per-stage wall time and peak memory of the nvseg-ray engine against the upstream MONAI chain, on ONE volume.

Both sides run the same file with the same weights on the same device, split into the same five
stages (read, preprocess, infer, postprocess, write):

=============  ================================================  ==========================================
stage          ours (nvseg_ray.engine / nvseg_ray.output)        upstream (nvseg_ray.upstream, MONAI)
=============  ================================================  ==========================================
read           ``VolumeStages.read`` (read_and_validate)         LoadImaged + EnsureChannelFirstd + EnsureTyped
preprocess     ``VolumeStages.prepare`` (nvseg_ray.model_grid)   Spacingd .. CastToTyped (rest of the Compose)
infer          ``ModelRunner.infer`` (slabs + chunked argmax)    ``upstream_infer`` + VistaPostTransformd
postprocess    ``VolumeStages.finish`` (invert, statistics)      Invertd (nearest) + NaN -> 255
write          ``output.write_result`` (uint16, gzip 1, report)  SaveImaged float32
=============  ================================================  ==========================================

Memory: a background thread samples the resident set size from ``/proc/self/statm`` every ~5 ms. Because
a sampler thread only runs when the main thread releases the GIL, the kernel's own high-water mark
(``VmHWM``, reset per stage by writing ``5`` to ``/proc/self/clear_refs``) is read as well where the kernel
allows it; a stage's peak is the larger of the two. "peak extra MB" = peak RSS during the stage minus the
RSS at its start. Before every stage (untimed) Python garbage is collected and glibc's free lists are
trimmed so that each stage starts from what is really still referenced.

Run ``python benchmarks/bench_stages.py --help`` for the options; see ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import glob
import math
import os
import platform
import statistics
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python benchmarks/bench_stages.py` from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks._common import (  # noqa: E402
    classes_arg, floats_arg, ints_arg, log, work_folder, write_report, write_tiny_checkpoint,
)

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from nvseg_ray.synthetic import write_torso_ct  # noqa: E402  (the synthetic CT, shared with the tests)

STAGES = ("read", "preprocess", "infer", "postprocess", "write")
NON_MODEL = ("read", "preprocess", "postprocess", "write")  # what CPU workers pay per volume
MB = 1024 * 1024
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

DESCRIPTION = """\
Per-stage benchmark (wall seconds and peak resident memory) of the nvseg-ray engine against the upstream
NV-Segment-CTMR chain built from MONAI, on ONE volume: read, preprocess, infer, postprocess, write.

By default a synthetic int16 CT (488x404x224 at 0.75x0.75x1.5 mm, 44 M voxels) and a tiny randomly initialised
checkpoint (width 8, ~6 M parameters, same architecture and the same full 192x192x128 windows as the real
model) are generated in a temporary directory. The tiny model keeps a CPU run to a few minutes; the
costs of read, preprocess and write do not depend on the weights (postprocess barely does), and the infer
stage still shows the cost of stitching (ours: 8..48 feature channels; upstream: n_classes float32 logits).

The real checkpoint (--checkpoint models/model.pt, 218 M parameters) takes ~70 s PER WINDOW on a 2-core
CPU (a default CT has 6 windows per side): use it only on a GPU (--device cuda).
"""


# ------------------------------------------------------------------------------------------------------------
# Measurement
# ------------------------------------------------------------------------------------------------------------


def _malloc_trim() -> None:
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def settle() -> None:
    """Drop Python garbage and return glibc's free memory to the OS (before a stage, untimed)."""
    gc.collect()
    _malloc_trim()


class MemoryMonitor:
    """Resident-set-size sampler (background thread, ``/proc/self/statm``) plus the kernel's resettable VmHWM."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self._fd = os.open("/proc/self/statm", os.O_RDONLY)
        self._lock = threading.Lock()
        self._peak = self.rss()
        self._samples = 0
        self._stop = threading.Event()
        self.hwm_resettable = self._reset_hwm() and self._hwm() is not None
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def rss(self) -> int:
        """Current resident set size in bytes."""
        return int(os.pread(self._fd, 256, 0).split()[1]) * PAGE_SIZE

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    @staticmethod
    def _hwm() -> int | None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            value = self.rss()
            with self._lock:
                if value > self._peak:
                    self._peak = value
                self._samples += 1

    def __enter__(self) -> MemoryMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        os.close(self._fd)

    def begin(self) -> int:
        """Start a measurement window; returns the RSS now."""
        with self._lock:
            now = self.rss()
            self._peak, self._samples = now, 0
        if self.hwm_resettable:
            self._reset_hwm()
        return now

    def end(self) -> tuple[int, int | None, int]:
        """``(sampled peak, kernel high-water mark or None, number of samples)`` since :meth:`begin`."""
        now = self.rss()
        with self._lock:
            sampled, samples = max(self._peak, now), self._samples
        return sampled, (self._hwm() if self.hwm_resettable else None), samples


class Recorder:
    """Times stages and measures their memory; one instance per side and repetition."""

    def __init__(self, monitor: MemoryMonitor, device: torch.device) -> None:
        self.monitor = monitor
        self.cuda = device.type == "cuda"
        self.stages: dict[str, dict[str, Any]] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        settle()
        gpu_start = 0
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            gpu_start = torch.cuda.memory_allocated()
        start_rss = self.monitor.begin()
        cpu0 = os.times()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            cpu1 = os.times()
            sampled, hwm, samples = self.monitor.end()
            peak = max(sampled, hwm or 0)
            rec = {"seconds": seconds, "cpu_user_s": cpu1.user - cpu0.user, "cpu_sys_s": cpu1.system - cpu0.system,
                   "start_rss_mb": start_rss / MB, "peak_rss_mb": peak / MB,
                   "peak_extra_mb": max(peak - start_rss, 0) / MB, "sampled_peak_rss_mb": sampled / MB,
                   "hwm_peak_rss_mb": None if hwm is None else hwm / MB, "samples": samples}
            if self.cuda:
                gpu_peak = torch.cuda.max_memory_allocated()
                rec.update(gpu_peak_mb=gpu_peak / MB, gpu_peak_extra_mb=max(gpu_peak - gpu_start, 0) / MB)
            self.stages[name] = rec


def summarise(runs: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Best time (min) and worst memory (max) over repetitions, per stage."""
    out: dict[str, Any] = {"seconds": {}, "cpu_s": {}, "peak_extra_mb": {}, "peak_rss_mb": {}}
    gpu = "gpu_peak_extra_mb" in runs[0][STAGES[0]]
    if gpu:
        out["gpu_peak_extra_mb"] = {}
    for s in STAGES:
        out["seconds"][s] = min(r[s]["seconds"] for r in runs)
        out["cpu_s"][s] = min(r[s]["cpu_user_s"] + r[s]["cpu_sys_s"] for r in runs)
        out["peak_extra_mb"][s] = max(r[s]["peak_extra_mb"] for r in runs)
        out["peak_rss_mb"][s] = max(r[s]["peak_rss_mb"] for r in runs)
        if gpu:
            out["gpu_peak_extra_mb"][s] = max(r[s]["gpu_peak_extra_mb"] for r in runs)
    out["total_s"] = sum(out["seconds"].values())
    out["total_cpu_s"] = sum(out["cpu_s"].values())
    out["sys_fraction"] = sum(r[s]["cpu_sys_s"] for r in runs for s in STAGES) / max(
        sum(r[s]["cpu_user_s"] + r[s]["cpu_sys_s"] for r in runs for s in STAGES), 1e-9)
    out["process_peak_rss_mb"] = max(out["peak_rss_mb"].values())
    if len(runs) > 1:
        out["total_s_median"] = statistics.median(sum(r[s]["seconds"] for s in STAGES) for r in runs)
    out["runs"] = runs
    return out


def warm_up(network: torch.nn.Module, patch_size: Sequence[int], class_ids: Sequence[int],
            device: torch.device) -> None:
    """One untimed forward pass on a patch-sized window, so that neither side pays for the first call
    (oneDNN/cuDNN kernel selection, CUDA context, first use of allocator memory); ours runs first."""
    x = torch.zeros(1, 1, *patch_size, device=device)
    amp = torch.autocast("cuda") if device.type == "cuda" else contextlib.nullcontext()
    with torch.inference_mode(), amp:
        network(x, class_vector=torch.as_tensor(list(class_ids), device=device)[:, None])
    if device.type == "cuda":
        torch.cuda.synchronize()
    del x
    settle()


def window_count(shape: Sequence[int], roi: Sequence[int], overlap: float) -> int:
    """Sliding windows MONAI visits for ``shape`` (same scan interval rule as ``_get_scan_interval``)."""
    n = 1
    for s, r in zip(shape, roi):
        if s <= r:
            continue
        step = max(int(r * (1 - overlap)), 1)
        n *= math.ceil((s - r) / step) + 1
    return n


# ------------------------------------------------------------------------------------------------------------
# The two sides
# ------------------------------------------------------------------------------------------------------------


def run_ours(path: str, out_dir: str, cfg: Any, model: Any, rec: Recorder) -> dict[str, Any]:
    """Engine stages; returns the label map, output path and facts about the model grid."""
    from nvseg_ray.model_runner import ModelRunner
    from nvseg_ray.output import mask_uri, write_result
    from nvseg_ray.prompts import resolve_prompts
    from nvseg_ray.stages import VolumeStages

    stages, runner = VolumeStages(cfg), ModelRunner(cfg, model=model)
    prompts = resolve_prompts(cfg, stages.catalog)
    _ = runner.model  # on the device before the clock starts (as in the Ray actor)
    with rec.stage("read"):
        volume = stages.read(path)
    with rec.stage("preprocess"):
        prepared = stages.prepare(volume)
    model_shape = prepared.model_shape
    with rec.stage("infer"):
        labels = runner.infer(prepared, prompts)
    with rec.stage("postprocess"):
        result = stages.finish(labels, prepared, volume, prompts)
    del labels, prepared, volume
    out = mask_uri(path, out_dir, cfg)
    with rec.stage("write"):
        write_result(result, input_uri=path, output_uri=out, cfg=cfg, model_uri=model.uri, model_sha256=model.sha256)
    return {"labels": result.labels, "output": out, "model_shape": model_shape}


def run_upstream(path: str, out_dir: str, class_ids: Sequence[int], network: torch.nn.Module,
                 patch_size: Sequence[int], sw_batch_size: int, device: torch.device, rec: Recorder) -> dict[str, Any]:
    """The upstream Compose chains, sliced into the same stages."""
    from monai.transforms import Compose

    from nvseg_ray.upstream import upstream_infer, upstream_postprocessing, upstream_preprocessing

    pre = upstream_preprocessing(device)
    load = Compose(pre.transforms[:3])  # LoadImaged, EnsureChannelFirstd, EnsureTyped
    preprocess = Compose(pre.transforms[3:])  # Spacingd .. CastToTyped
    post = upstream_postprocessing(pre, output_dir=out_dir)  # Invertd inverts the whole `pre`
    vista_post, save = post.transforms[0], post.transforms[-1]
    invert = Compose(post.transforms[1:-1])  # Invertd, NaN -> 255
    with rec.stage("read"):
        data = load({"image": path, "label_prompt": list(class_ids)})
    with rec.stage("preprocess"):
        data = preprocess(data)
    with rec.stage("infer"):
        data = vista_post(upstream_infer(data, network, patch_size, sw_batch_size))
    with rec.stage("postprocess"):
        data = invert(data)
    with rec.stage("write"):
        data = save(data)
    labels = data["pred"][0].detach().cpu().numpy()
    del data
    written = sorted(glob.glob(os.path.join(out_dir, "**", "*.nii.gz"), recursive=True))
    return {"labels": labels, "output": written[-1] if written else None}


# ------------------------------------------------------------------------------------------------------------
# Reporting
# ------------------------------------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(report: dict[str, Any]) -> str:
    ours, up = report["ours"], report.get("upstream")
    gpu = "gpu_peak_extra_mb" in ours
    cols = ["stage", "ours s", "upstream s", "ratio", "ours peak MB", "upstream peak MB"]
    if gpu:
        cols += ["ours GPU MB", "upstream GPU MB"]
    rows = []
    for s in STAGES:
        o, u = ours["seconds"][s], (up["seconds"][s] if up else None)
        row = [s, _fmt(o, ".2f"), _fmt(u, ".2f"), _fmt(report["ratio"].get(s), ".2f") + ("x" if up else ""),
               _fmt(ours["peak_extra_mb"][s], ".0f"), _fmt(up["peak_extra_mb"][s] if up else None, ".0f")]
        if gpu:
            row += [_fmt(ours["gpu_peak_extra_mb"][s], ".0f"),
                    _fmt(up["gpu_peak_extra_mb"][s] if up and "gpu_peak_extra_mb" in up else None, ".0f")]
        rows.append(row)
    total = ["total", _fmt(ours["total_s"], ".2f"), _fmt(up["total_s"] if up else None, ".2f"),
             _fmt(report["ratio"].get("total"), ".2f") + ("x" if up else ""),
             _fmt(ours["process_peak_rss_mb"], ".0f"), _fmt(up["process_peak_rss_mb"] if up else None, ".0f")]
    if gpu:
        total += ["", ""]
    rows.append(total)
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]

    def line(cells: list[str]) -> str:
        return "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(cells, widths)))

    sep = "  ".join("-" * w for w in widths)
    out = [line(cols), sep, *(line(r) for r in rows[:-1]), sep, line(rows[-1])]
    out.append("(peak MB per stage = peak RSS during the stage minus RSS at its start; the total row shows "
               "the process peak RSS; ratio = upstream s / ours s, > 1 means ours is faster)")
    return "\n".join(out)


def format_summary(report: dict[str, Any]) -> str:
    ours, up = report["ours"], report.get("upstream")
    lines = []
    o_size = ours["output"]["bytes"]
    if up:
        u_size = up["output"]["bytes"]
        lines.append(f"output file: ours {o_size / MB:.2f} MB ({ours['output']['dtype']}, gzip level "
                     f"{ours['output']['compresslevel']}) vs upstream {u_size / MB:.2f} MB (float32) "
                     f"= {u_size / max(o_size, 1):.1f}x smaller")
        agr = report["agreement"]
        lines.append(f"label agreement: {agr['equal_fraction'] * 100:.4f}% of {agr['voxels']} voxels equal "
                     f"({agr['differing_voxels']} differ); foreground voxels ours {agr['foreground_ours']}, "
                     f"upstream {agr['foreground_upstream']}; labels present ours {agr['labels_ours']}, "
                     f"upstream {agr['labels_upstream']}")
        lines.append("CPU s ours/upstream (user+sys of this process, all threads; steadier than wall time when busy): "
                     + ", ".join(f"{s} {ours['cpu_s'][s]:.2f}/{up['cpu_s'][s]:.2f}" for s in STAGES)
                     + f"; total ours {ours['total_cpu_s']:.1f} vs upstream {up['total_cpu_s']:.1f} "
                     f"({up['total_cpu_s'] / max(ours['total_cpu_s'], 1e-9):.2f}x); system share "
                     f"{ours['sys_fraction'] * 100:.0f}% / {up['sys_fraction'] * 100:.0f}%")
        nm = report["non_model_cpu_s"]
        lines.append(f"CPU s outside the model ({', '.join(NON_MODEL)}): ours {nm['ours']:.2f} vs upstream "
                     f"{nm['upstream']:.2f} = {nm['ours_over_upstream']:.2f}x of upstream's (goal <= 0.25x)")
    else:
        lines.append(f"output file: ours {o_size / MB:.2f} MB ({ours['output']['dtype']}, gzip level "
                     f"{ours['output']['compresslevel']}); upstream skipped")
    return "\n".join(lines)


def agreement(ours: np.ndarray, upstream: np.ndarray) -> dict[str, Any]:
    """Fraction of voxels with the same label (ours: integer ids; upstream: float32 ids)."""
    if ours.shape != upstream.shape:
        return {"equal_fraction": 0.0, "voxels": int(ours.size), "differing_voxels": int(ours.size),
                "shape_mismatch": [list(ours.shape), list(upstream.shape)], "foreground_ours": None,
                "foreground_upstream": None, "labels_ours": None, "labels_upstream": None}
    up = np.rint(upstream).astype(np.int32)
    equal = int(np.count_nonzero(ours == up))
    labels_up = np.unique(up)
    return {"equal_fraction": equal / ours.size, "voxels": int(ours.size), "differing_voxels": int(ours.size - equal),
            "foreground_ours": int(np.count_nonzero(ours)), "foreground_upstream": int(np.count_nonzero(up)),
            "labels_ours": int(np.count_nonzero(np.bincount(ours.ravel())[1:])),
            "labels_upstream": int(np.count_nonzero(labels_up))}


def machine_info(device: torch.device) -> dict[str, Any]:
    from importlib import metadata

    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                            "device": str(device)}
    with contextlib.suppress(Exception):
        info["affinity_cpus"] = len(os.sched_getaffinity(0))
    with contextlib.suppress(OSError):
        info["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    with contextlib.suppress(Exception):
        info["mem_total_gb"] = round(os.sysconf("SC_PHYS_PAGES") * PAGE_SIZE / 1024**3, 1)
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    for dist in ("torch", "monai", "nibabel", "numpy", "nvseg-ray"):
        try:
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info[dist] = None
    info["isal"] = importlib_available("isal")
    return info


def importlib_available(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


# ------------------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_stages.py", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=ints_arg, default=(488, 404, 224),
                   help="synthetic CT shape (default 488,404,224: 44 M voxels, an abdominal CT's size)")
    p.add_argument("--spacing", type=floats_arg, default=(0.75, 0.75, 1.5),
                   help="synthetic CT voxel size in mm (default 0.75,0.75,1.5)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for both sides (default 1: CPU seconds per stage as one core spends them)")
    p.add_argument("--input", help="benchmark this .nii/.nii.gz instead of a synthetic CT (--shape/--spacing ignored)")
    p.add_argument("--checkpoint", help="model.pt to use instead of a generated tiny one (width 8). The real "
                   "218M-parameter model needs ~70 s per 192x192x128 window on a 2-core CPU: use it on a GPU only")
    p.add_argument("--modality", default="CT_BODY", help="everything-set to segment (default CT_BODY: 117 classes)")
    p.add_argument("--classes", type=classes_arg, help="comma-separated class ids/names instead of the modality's "
                   "everything-set (fewer classes = smaller upstream logits buffer)")
    p.add_argument("--patch-size", type=ints_arg, default=(192, 192, 128), help="sliding window (default 192,192,128)")
    p.add_argument("--sw-batch-size", type=int, default=1, help="windows per forward pass (default 1)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--repeat", type=int, default=1, help="runs per side; best time and worst memory are reported")
    p.add_argument("--json", dest="json_out", help="also write every number to this JSON file")
    p.add_argument("--skip-upstream", action="store_true",
                   help="only run ours (upstream stitches n_classes x voxels float32 logits: 3.9 GB for the default "
                   "volume, ~10 GB process peak)")
    p.add_argument("--no-warmup", action="store_true",
                   help="skip the untimed warm-up window (otherwise the first side timed, ours, pays for it)")
    p.add_argument("--workdir", help="keep inputs and outputs in this directory (default: a deleted temp dir)")
    p.add_argument("--quiet", "-q", action="store_true", help="print only the table and summary")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    # upstream's Orientationd(axcodes="RAS") without `labels` warns about a MONAI default change on every call
    warnings.filterwarnings("ignore", message=".*Orientationd.*labels", category=FutureWarning)
    if len(args.shape) != 3 or len(args.spacing) != 3 or len(args.patch_size) != 3:
        raise SystemExit("--shape, --spacing and --patch-size need 3 values each")
    if args.repeat < 1:
        raise SystemExit("--repeat must be >= 1")
    if args.threads >= 1:
        torch.set_num_threads(args.threads)
    with work_folder(args.workdir, "nvseg-bench-") as work:
        report = _run(args, work)
    if not args.quiet:
        print()
    print(format_table(report))
    print(format_summary(report))
    write_report(report, args.json_out)
    return report


def _run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from nvseg_ray.config import InferenceConfig
    from nvseg_ray.inference import resolve_device
    from nvseg_ray.model import load_model

    t0 = time.perf_counter()
    if args.input:
        path = Path(args.input)
        synthetic_input = False
    else:
        path = work / "ct_phantom.nii.gz"
        write_torso_ct(path, args.shape, args.spacing)
        synthetic_input = True
    if args.checkpoint:
        ckpt, synthetic_ckpt = args.checkpoint, False
    else:
        ckpt, synthetic_ckpt = str(write_tiny_checkpoint(work / "tiny_model.pt")), True
    inputs_s = time.perf_counter() - t0

    cfg = InferenceConfig(checkpoint=ckpt, modality=args.modality if not args.classes else None,
                          classes=args.classes, patch_size=tuple(args.patch_size), sw_batch_size=args.sw_batch_size,
                          device=args.device,
                          # like for like with upstream, which has no QC (benchmarks/bench_quality.py measures it)
                          quality={"qc": False, "preview": False})
    device = resolve_device(cfg.device)
    t0 = time.perf_counter()
    model = load_model(ckpt)
    model.network.to(device)
    load_s = time.perf_counter() - t0
    from nvseg_ray.engine import resolve_prompts
    from nvseg_ray.labels import LabelCatalog

    class_ids = resolve_prompts(cfg, LabelCatalog.load(cfg.label_catalog)).class_ids
    header = nib.load(str(path))
    in_shape = tuple(int(s) for s in header.shape[:3])
    in_spacing = tuple(round(float(z), 4) for z in header.header.get_zooms()[:3])
    n_params = sum(p.numel() for p in model.network.parameters())
    log(args, f"input: {path.name} {in_shape} @ {in_spacing} mm, {path.stat().st_size / MB:.1f} MB "
               f"({'synthetic' if synthetic_input else 'given'}; inputs prepared in {inputs_s:.1f} s)")
    log(args, f"model: {'tiny generated' if synthetic_ckpt else ckpt} width {model.architecture.embed_dim}, "
               f"{n_params / 1e6:.1f} M parameters, loaded in {load_s:.1f} s; device {device}, "
               f"{torch.get_num_threads()} torch threads")
    log(args, f"prompts: {len(class_ids)} classes ({args.classes or args.modality}); patch "
               f"{list(cfg.patch_size)}, overlap {cfg.overlap}")

    load_start = os.getloadavg()[0]
    if load_start > 0.5 * (os.cpu_count() or 1):
        log(args, f"note: load average {load_start:.1f} on {os.cpu_count()} CPUs: other processes compete, "
                   "times will be noisy (use --repeat, which alternates the sides and keeps the best time)")
    warmup_s = None
    if not args.no_warmup:
        t0 = time.perf_counter()
        warm_up(model.network, cfg.patch_size, class_ids[:1], device)
        warmup_s = time.perf_counter() - t0
        log(args, f"warm-up window (untimed): {warmup_s:.1f} s")
    ours_runs: list[dict] = []
    up_runs: list[dict] = []
    ours_res: dict[str, Any] = {}
    up_res: dict[str, Any] = {}
    with MemoryMonitor() as monitor:
        if not monitor.hwm_resettable:
            log(args, "note: /proc/self/clear_refs not writable: peaks come from the 5 ms sampler only")
        for i in range(args.repeat):
            tag = f" (run {i + 1}/{args.repeat})" if args.repeat > 1 else ""
            log(args, f"ours{tag} ...")
            rec = Recorder(monitor, device)
            ours_res = run_ours(str(path), str(work / f"ours{i}"), cfg, model, rec)
            ours_runs.append(rec.stages)
            log(args, "  " + ", ".join(f"{s} {rec.stages[s]['seconds']:.2f}s" for s in STAGES))
            if not args.skip_upstream:
                log(args, f"upstream{tag} ...")
                ours_labels = ours_res["labels"]
                ours_res["labels"] = None  # keep one reference only while upstream runs
                settle()
                rec = Recorder(monitor, device)
                up_res = run_upstream(str(path), str(work / f"upstream{i}"), class_ids, model.network,
                                      cfg.patch_size, cfg.sw_batch_size, device, rec)
                up_runs.append(rec.stages)
                ours_res["labels"] = ours_labels
                del ours_labels
                log(args, "  " + ", ".join(f"{s} {rec.stages[s]['seconds']:.2f}s" for s in STAGES))

    model_shape = ours_res["model_shape"]
    ours = summarise(ours_runs)
    ours["output"] = {"path_name": Path(ours_res["output"]).name, "bytes": os.path.getsize(ours_res["output"]),
                      "dtype": cfg.output_dtype, "compresslevel": cfg.compresslevel}
    report: dict[str, Any] = {
        "format": "nvseg-bench-stages/1",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {**machine_info(device), "loadavg_start_1min": round(load_start, 2)},
        "input": {"synthetic": synthetic_input, "path_name": path.name, "shape": list(in_shape),
                  "spacing_mm": list(in_spacing), "bytes": path.stat().st_size},
        "model": {"synthetic": synthetic_ckpt, "embed_dim": model.architecture.embed_dim, "parameters": n_params,
                  "load_s": load_s},
        "settings": {"modality": cfg.modality, "classes": args.classes, "n_prompts": len(class_ids),
                     "patch_size": list(cfg.patch_size), "overlap": cfg.overlap, "sw_batch_size": cfg.sw_batch_size,
                     "repeat": args.repeat, "warmup_s": warmup_s, "memory_sampler_interval_s": 0.005,
                     "kernel_hwm_used": monitor.hwm_resettable},
        "model_grid": {"shape": list(model_shape), "voxels": int(np.prod(model_shape)),
                       "windows": window_count(model_shape, cfg.patch_size, cfg.overlap),
                       "upstream_logits_mb": len(class_ids) * int(np.prod(model_shape)) * 4 / MB},
        "stages": list(STAGES),
        "ours": ours,
        "upstream": None,
        "ratio": {},
    }
    if up_runs:
        up = summarise(up_runs)
        up["output"] = {"path_name": Path(up_res["output"]).name if up_res["output"] else None,
                        "bytes": os.path.getsize(up_res["output"]) if up_res["output"] else 0,
                        "dtype": "float32"}
        report["upstream"] = up
        report["ratio"] = {s: up["seconds"][s] / ours["seconds"][s] if ours["seconds"][s] > 0 else None
                           for s in STAGES}
        report["ratio"]["total"] = up["total_s"] / ours["total_s"]
        report["agreement"] = agreement(ours_res["labels"], up_res["labels"])
        ours_nm, up_nm = (sum(side["cpu_s"][s] for s in NON_MODEL) for side in (ours, up))
        report["non_model_cpu_s"] = {"ours": ours_nm, "upstream": up_nm, "ours_over_upstream": ours_nm / max(up_nm, 1e-9)}
    mg = report["model_grid"]
    log(args, f"model grid {mg['shape']} ({mg['voxels'] / 1e6:.1f} M voxels, {mg['windows']} windows); "
               f"upstream logits buffer {mg['upstream_logits_mb']:.0f} MB")
    return report


if __name__ == "__main__":
    main()
