#!/usr/bin/env python
"""Batch throughput: the sequential in-process loop (how the upstream bundle works) against the Ray Data pipeline.

In ONE run, on the same generated volumes and the same weights:

(a) **sequential**: one process, one model loaded before the clock starts; for each volume
    read -> preprocess -> infer -> postprocess -> write (``engine.segment_volume`` + ``output.write_result``).
(b) **ray**: ``nvseg_ray.batch.run_batch`` on a local Ray started by this script (CPU read/preprocess tasks ->
    one model actor -> CPU postprocess/write tasks). Wall time excludes ``ray.init`` but includes the actor's
    start-up (worker process, imports, weights) and the manifest.
(c) **ray, N x scale volumes**: the same pipeline again on ``N * scale`` volumes (hard links/copies of the
    N files), to show that peak memory does not grow with the number of volumes.

Steady state ("once warm"): for the Ray runs, the three stage callables of the pipeline are wrapped (in this
driver, before ``run_batch`` submits them; ``--no-trace`` turns it off) so that every call appends its start and
end time to a file. The warm window runs from the end of the model actor's first call to the end of its last:
``steady vol/s = (n - 1) / window`` and ``steady busy = t_infer of the calls after the first / window``. That
leaves out the actor's start-up (worker process, imports, weights, first call) and the pipeline filling up and
draining. The traces also tell where the model's idle time goes (next volume already preprocessed = dispatch
overhead, or not yet = starved by the CPU stages) and how long volumes queue before each stage. For the
sequential loop (and with ``--no-trace``) steady state is measured between the first and the last finished
volume, from the modification times of the JSON reports (written last).

Memory: a daemon thread sums the resident set size (``/proc/<pid>/statm``) of this process and all its
descendants (the local Ray's gcs_server, raylet and every worker) every 50 ms; the process list is refreshed
every 0.5 s. Shared pages (libraries, the object store) count once per process that maps them, so the sum
overstates physical use; the proportional set size (``/proc/<pid>/smaps_rollup``, once a second) is recorded
as well. Processes of other Ray sessions on the machine are not counted. When this script joins a Ray that it
did not start (``--ray-address``) only the driver is counted.

Run ``python benchmarks/bench_batch.py --help`` for the options; see ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import shutil
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python benchmarks/bench_batch.py` from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks._common import (  # noqa: E402
    classes_arg, floats_arg, ints_arg, log, work_folder, write_report, write_tiny_checkpoint,
)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from nvseg_ray.synthetic import write_torso_ct  # noqa: E402

MB = 1024 * 1024
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

# Workload defaults: a small field of view (154 x 154 x 120 mm) scanned at high resolution. The model grid
# (1.5 mm, ~95 x 73 x 80 after the foreground crop) fits ONE 112 x 112 x 80 window, so the tiny model's
# inference (~2-4 s on one core) is of the same order as the CPU stages on the 23.6 M-voxel input
# (read + resample + invert + encode, ~1-3 s): the regime where overlapping them pays (on a GPU with the
# real model, inference is far cheaper than the CPU stages of a full CT, so the CPU stages dominate).
DEFAULT_N = 8
DEFAULT_SCALE = 10
DEFAULT_SHAPE = (384, 384, 160)
DEFAULT_SPACING = (0.4, 0.4, 0.75)
DEFAULT_PATCH = (112, 112, 80)
DEFAULT_CLASSES = "liver,spleen,3"

# Ray defaults for a 2-core machine (see benchmarks/README.md, "Ray settings"): as many logical CPUs as cores,
# one model actor holding one of them (one torch thread) and one CPU-stage task at a time on the other core
# (BatchConfig's own defaults: 1 CPU per task). Measured against 0.5-CPU stage tasks (two CPU-stage tasks
# beside the model) and a 3-CPU Ray: once warm the model was >= 98% busy in all three (the model stage is the
# bottleneck), and 1-CPU tasks had the best steady throughput and the lowest peak memory, because no
# CPU-stage task competes with the model thread for a core.
DEFAULT_RAY_CPUS = 2.0
DEFAULT_MODEL_CPUS = 1.0
DEFAULT_STAGE_CPUS = 1.0
DEFAULT_STAGE_MEMORY_GB = 2.0

#: targets from the issue.
TARGET_RATIO = 1.3
TARGET_BUSY = 0.90
#: "flat": peak memory for N x scale volumes at most this many times the peak for N volumes.
TARGET_FLAT = 1.25

SAMPLE_INTERVAL_S = 0.05
PROC_REFRESH_S = 0.5
PSS_INTERVAL_S = 1.0

DESCRIPTION = """\
Batch throughput of nvseg-ray: the sequential in-process loop (one process, one model: how the upstream
bundle segments a folder) against the Ray Data pipeline (CPU preprocess tasks -> model actor -> CPU
postprocess tasks), on N generated volumes, then the pipeline again on N x scale volumes (peak memory must
not grow with N). Prints volumes/s, the model's busy fraction and peak memory (RSS summed over this process
and all Ray processes it started) per mode, the throughput ratio and PASS/FAIL against the issue's targets
(ratio >= 1.3, model busy >= 90% once warm, peak memory flat in N).

By default a tiny randomly initialised checkpoint (width 8, ~6 M parameters, real architecture) and
synthetic int16 CTs (384x384x160 at 0.4x0.4x0.75 mm) are generated in a temporary directory; the default
run takes ~4-6 minutes on 2 cores.
"""


# ------------------------------------------------------------------------------------------------------------
# Inputs (the synthetic CTs are nvseg_ray.synthetic.torso_ct, shared with the other benchmarks and the tests)
# ------------------------------------------------------------------------------------------------------------


def replicate(sources: Sequence[Path], folder: Path, count: int) -> list[Path]:
    """``count`` input files in ``folder``, cycling over ``sources`` (hard links; copies across filesystems)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(count):
        src = sources[i % len(sources)]
        dst = folder / f"vol{i:04d}.nii.gz"
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
        out.append(dst)
    return out


# ------------------------------------------------------------------------------------------------------------
# Memory of a process tree
# ------------------------------------------------------------------------------------------------------------


def _malloc_trim() -> None:
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def settle() -> None:
    gc.collect()
    _malloc_trim()


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants (from the parent ids in ``/proc/<pid>/stat``)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()  # after "pid (comm) ": state ppid ...
        children.setdefault(int(fields[1]), []).append(int(name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return 0


def pss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return 0


class TreeMemorySampler:
    """Background thread: RSS summed over this process and its descendants every 50 ms (peak, process count),
    plus the summed proportional set size once a second."""

    def __init__(self, interval_s: float = SAMPLE_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self.root = os.getpid()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pids = process_tree(self.root)
        self._refreshed = time.monotonic()
        self._pss_at = 0.0
        self._reset()
        self._thread = threading.Thread(target=self._run, name="tree-rss-sampler", daemon=True)

    def _reset(self) -> None:
        self.peak_rss = self.peak_pss = 0
        self.peak_processes = 0
        self.samples = 0

    def current(self) -> tuple[int, int]:
        """``(summed RSS now, number of processes)``, refreshing the process list."""
        pids = process_tree(self.root)
        return sum(rss_bytes(p) for p in pids), len(pids)

    def _tick(self) -> None:
        now = time.monotonic()
        if now - self._refreshed >= PROC_REFRESH_S:
            self._pids, self._refreshed = process_tree(self.root), now
        pids = self._pids
        rss = sum(rss_bytes(p) for p in pids)
        pss = None
        if now - self._pss_at >= PSS_INTERVAL_S:
            pss, self._pss_at = sum(pss_bytes(p) for p in pids), now
        with self._lock:
            self.samples += 1
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_processes = max(self.peak_processes, len(pids))
            if pss is not None:
                self.peak_pss = max(self.peak_pss, pss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._tick()

    def __enter__(self) -> TreeMemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def begin(self) -> dict[str, float]:
        """Start a measurement window; returns the memory at rest (RSS, PSS, processes) now."""
        settle()
        self._pids, self._refreshed = process_tree(self.root), time.monotonic()
        rest_rss = sum(rss_bytes(p) for p in self._pids)
        rest_pss = sum(pss_bytes(p) for p in self._pids)
        with self._lock:
            self._reset()
            self._pss_at = 0.0
        return {"rest_rss_mb": rest_rss / MB, "rest_pss_mb": rest_pss / MB, "rest_processes": len(self._pids)}

    def end(self) -> dict[str, float]:
        self._tick()
        with self._lock:
            return {"peak_rss_mb": self.peak_rss / MB, "peak_pss_mb": self.peak_pss / MB,
                    "peak_processes": self.peak_processes, "samples": self.samples}


# ------------------------------------------------------------------------------------------------------------
# Finish times -> steady state
# ------------------------------------------------------------------------------------------------------------


def steady_state(finish_times: Sequence[float], infer_s: Sequence[float], n_actors: int = 1) -> dict[str, Any]:
    """Throughput and model busy fraction between the first and the last finished volume.

    ``finish_times[i]`` / ``infer_s[i]``: finish time (any clock) and model seconds of volume ``i``.
    """
    if len(finish_times) < 2:
        return {"volumes_per_s": None, "busy_fraction": None, "interval_s": None, "first_finish_s": None}
    order = np.argsort(finish_times)
    t = np.asarray(finish_times, dtype=float)[order]
    infer = np.asarray(infer_s, dtype=float)[order]
    span = float(t[-1] - t[0])
    if span <= 0:
        return {"volumes_per_s": None, "busy_fraction": None, "interval_s": span, "first_finish_s": None}
    return {"volumes_per_s": (len(t) - 1) / span, "busy_fraction": float(infer[1:].sum()) / (span * max(n_actors, 1)),
            "interval_s": span, "first_finish_s": None}


def report_mtime(output_uri: str) -> float:
    """Modification time (s, wall clock) of the JSON report next to a written mask (written last)."""
    from nvseg_ray.output import report_uri

    return os.stat(report_uri(output_uri)).st_mtime_ns / 1e9


# ------------------------------------------------------------------------------------------------------------
# Stage traces of the Ray pipeline (start/end time of every stage call, from inside the workers)
# ------------------------------------------------------------------------------------------------------------


def _traced_function(fn: Any, stage: str, trace_dir: str) -> Any:
    """``fn(row, **kw)`` that also appends ``{stage, uri, start, end, pid}`` to ``<trace_dir>/<stage>-<pid>.jsonl``."""

    def traced(row: dict[str, Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
        start = time.time()
        out = fn(row, *args, **kwargs)
        rec = {"stage": stage, "uri": row["uri"], "start": start, "end": time.time(), "pid": os.getpid()}
        with open(os.path.join(trace_dir, f"{stage}-{os.getpid()}.jsonl"), "a") as f:
            f.write(json.dumps(rec) + "\n")
        return out

    traced.__name__ = getattr(fn, "__name__", stage)  # Ray Data names the operator after the function
    return traced


def _traced_actor_class(base: type, trace_dir: str) -> type:
    """A subclass of the model actor class whose calls are traced like :func:`_traced_function` (plus t_infer)."""

    def __call__(self: Any, row: dict[str, Any]) -> dict[str, Any]:
        start = time.time()
        out = base.__call__(self, row)
        rec = {"stage": "model", "uri": row["uri"], "start": start, "end": time.time(), "pid": os.getpid(),
               "t_infer": float(out.get("t_infer") or 0.0)}
        with open(os.path.join(trace_dir, f"model-{os.getpid()}.jsonl"), "a") as f:
            f.write(json.dumps(rec) + "\n")
        return out

    return type(base.__name__, (base,), {"__call__": __call__, "__module__": __name__})


@contextlib.contextmanager
def traced_pipeline(trace_dir: Path) -> Any:
    """Swap the pipeline's three stage callables for traced wrappers (restored on exit)."""
    from nvseg_ray.batch import pipeline

    trace_dir.mkdir(parents=True, exist_ok=True)
    saved = pipeline._preprocess, pipeline._ModelActor, pipeline._postprocess
    pipeline._preprocess = _traced_function(saved[0], "preprocess", str(trace_dir))
    pipeline._ModelActor = _traced_actor_class(saved[1], str(trace_dir))
    pipeline._postprocess = _traced_function(saved[2], "postprocess", str(trace_dir))
    try:
        yield
    finally:
        pipeline._preprocess, pipeline._ModelActor, pipeline._postprocess = saved


def read_traces(trace_dir: Path) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {"preprocess": [], "model": [], "postprocess": []}
    for path in sorted(trace_dir.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                out[rec["stage"]].append(rec)
    for recs in out.values():
        recs.sort(key=lambda r: r["start"])
    return out


def analyse_traces(traces: dict[str, list[dict[str, Any]]], t0: float) -> dict[str, Any]:
    """Steady state of the model stage and where its idle time goes.

    Warm window: from the end of the first model call to the end of the last one (the actor has started and
    run once). ``busy`` = model seconds of the calls after the first / window; ``gap_input_ready_s``: idle time
    while the next volume was already preprocessed (scheduling/dispatch overhead), ``gap_starved_s``: idle time
    waiting for a preprocess task to finish.
    """
    model, pre, post = traces["model"], traces["preprocess"], traces["postprocess"]
    res: dict[str, Any] = {"calls": {k: len(v) for k, v in traces.items()}}
    if not model:
        return res
    pre_end = {r["uri"]: r["end"] for r in pre}
    post_by_uri = {r["uri"]: r for r in post}
    res["first_preprocess_start_s"] = pre[0]["start"] - t0 if pre else None
    res["first_model_start_s"] = model[0]["start"] - t0
    res["last_model_end_s"] = model[-1]["end"] - t0
    res["last_postprocess_end_s"] = max(r["end"] for r in post) - t0 if post else None
    if len(model) >= 2:
        window = model[-1]["end"] - model[0]["end"]
        calls = sum(r["end"] - r["start"] for r in model[1:])
        infer = sum(r.get("t_infer", 0.0) for r in model[1:])
        ready = starved = 0.0
        for prev, cur in zip(model, model[1:]):
            gap = max(cur["start"] - prev["end"], 0.0)
            avail = pre_end.get(cur["uri"], prev["end"])
            waited = min(max(avail - prev["end"], 0.0), gap)
            starved += waited
            ready += gap - waited
        res.update(window_s=window, volumes_per_s=(len(model) - 1) / window if window > 0 else None,
                   busy_fraction=infer / window if window > 0 else None,
                   call_busy_fraction=calls / window if window > 0 else None,
                   gap_input_ready_s=ready, gap_starved_s=starved,
                   mean_gap_s=(ready + starved) / (len(model) - 1),
                   model_call_overhead_s=(calls - infer) / (len(model) - 1))
    lags = [post_by_uri[r["uri"]]["start"] - r["end"] for r in model if r["uri"] in post_by_uri]
    if lags:
        res["postprocess_queue_s"] = {"mean": float(np.mean(lags)), "max": float(np.max(lags))}
    waits = [r["start"] - pre_end[r["uri"]] for r in model if r["uri"] in pre_end]
    if waits:
        res["model_queue_s"] = {"mean": float(np.mean(waits)), "max": float(np.max(waits))}
    # volumes "in flight": preprocessed (payload in the object store) but not yet picked up by a postprocess task
    events = sorted([(r["end"], 1) for r in pre] + [(r["start"], -1) for r in post])
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    res["max_in_flight"] = peak
    if post:
        res["first_postprocess_end_s"] = min(r["end"] for r in post) - t0
    for stage, recs in (("preprocess", pre), ("postprocess", post)):
        if recs:
            res[f"{stage}_call_s"] = float(np.mean([r["end"] - r["start"] for r in recs]))
            res[f"{stage}_processes"] = len({r["pid"] for r in recs})
    return res


# ------------------------------------------------------------------------------------------------------------
# The modes
# ------------------------------------------------------------------------------------------------------------


def inference_settings(args: argparse.Namespace, ckpt: str) -> dict[str, Any]:
    return {"checkpoint": ckpt, "modality": None if args.classes else args.modality, "classes": args.classes,
            "patch_size": tuple(args.patch_size), "device": "cpu"}


def run_sequential(paths: Sequence[Path], out_dir: Path, settings: dict[str, Any],
                   sampler: TreeMemorySampler, args: argparse.Namespace) -> dict[str, Any]:
    """(a) One process, one model loaded before the clock starts; every stage of every volume in turn."""
    from nvseg_ray.config import InferenceConfig
    from nvseg_ray.engine import segment_volume
    from nvseg_ray.model_runner import ModelRunner
    from nvseg_ray.output import mask_uri, write_result
    from nvseg_ray.prompts import resolve_prompts
    from nvseg_ray.stages import VolumeStages
    from nvseg_ray.timing import STAGES

    cfg = InferenceConfig(**settings)
    t0 = time.perf_counter()
    stages, runner = VolumeStages(cfg), ModelRunner(cfg)
    prompts = resolve_prompts(cfg, stages.catalog)
    model = runner.model  # loaded (and on the device) before timing, like the bundle's one-time network load
    load_s = time.perf_counter() - t0
    default_threads = torch.get_num_threads()
    calibration: dict[int, float] = {}
    if args.seq_threads:
        threads = args.seq_threads
    else:  # untimed: the first volume once per thread count; the baseline gets the faster one (also a warm-up)
        for n_threads in sorted({1, default_threads}):
            torch.set_num_threads(n_threads)
            t0 = time.perf_counter()
            segment_volume(str(paths[0]), stages, runner, prompts)
            calibration[n_threads] = time.perf_counter() - t0
        threads = min(calibration, key=calibration.get)
        log(args, "  torch threads (untimed trial on the first volume): " + ", ".join(
            f"{k}: {v:.1f} s" for k, v in calibration.items()) + f" -> {threads}")
    torch.set_num_threads(threads)
    rest = sampler.begin()
    stage_s = dict.fromkeys(STAGES, 0.0)
    finish, infer = [], []
    cpu0 = os.times()
    start = time.perf_counter()
    for i, path in enumerate(paths):
        result = segment_volume(str(path), stages, runner, prompts)
        out = mask_uri(str(path), str(out_dir), cfg)
        write_result(result, input_uri=str(path), output_uri=out, cfg=cfg, model_uri=model.uri,
                     model_sha256=model.sha256)
        for k, v in result.timings.items():
            stage_s[k] = stage_s.get(k, 0.0) + v
        finish.append(report_mtime(out))
        infer.append(result.timings.get("infer", 0.0))
        del result
        log(args, f"  sequential {i + 1}/{len(paths)}: " + ", ".join(
            f"{k} {v:.2f}" for k, v in stage_s.items()) + " (cumulative s)")
    wall = time.perf_counter() - start
    cpu1 = os.times()
    mem = sampler.end()
    torch.set_num_threads(default_threads)
    del stages, runner, model
    settle()
    steady = {**steady_state(finish, infer), "method": "first to last finished volume (report mtimes)"}
    return {"mode": "sequential", "volumes": len(paths), "ok": len(paths), "wall_s": wall,
            "volumes_per_s": len(paths) / wall, "model_busy_fraction": sum(infer) / wall,
            "steady": steady, "stage_seconds": stage_s, "model_load_s": load_s,
            "torch_threads": threads, "thread_trial_s": calibration,
            "cpu_s": (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system), **rest, **mem}


def run_ray(input_dir: Path, out_dir: Path, settings: dict[str, Any], sampler: TreeMemorySampler,
            args: argparse.Namespace, label: str) -> dict[str, Any]:
    """(b)/(c) ``run_batch`` on ``input_dir``; wall time includes actor start-up, not ``ray.init``."""
    from nvseg_ray.batch import BatchConfig, run_batch

    cfg = BatchConfig(input=str(input_dir), output=str(out_dir), inference=settings,
                      preprocess_cpus=args.preprocess_cpus, postprocess_cpus=args.postprocess_cpus,
                      model_cpus=args.model_cpus, stage_memory_gb=args.stage_memory_gb, min_actors=1,
                      max_actors=1, max_failures=-1, progress_bars=False, progress_interval_s=3600,
                      run_name=label)
    trace_dir = out_dir.parent / f"trace_{out_dir.name}"
    rest = sampler.begin()
    wall_clock0 = time.time()
    start = time.perf_counter()
    with traced_pipeline(trace_dir) if args.trace else contextlib.nullcontext():
        result = run_batch(cfg, echo=lambda s: None)
    wall = time.perf_counter() - start
    mem = sampler.end()
    frame = result.manifest
    ok = frame[frame["status"] == "ok"]
    finish = [report_mtime(u) for u in ok["output_uri"]]
    by_finish = steady_state(finish, list(ok["t_infer"]), n_actors=1)
    if finish:
        by_finish["first_finish_s"] = min(finish) - wall_clock0
    trace = analyse_traces(read_traces(trace_dir), wall_clock0) if args.trace else {}
    if trace.get("volumes_per_s") is not None:
        steady = {"volumes_per_s": trace["volumes_per_s"], "busy_fraction": trace["busy_fraction"],
                  "interval_s": trace["window_s"], "first_finish_s": by_finish.get("first_finish_s"),
                  "method": "model stage, end of its first call to end of its last call (stage traces)"}
    else:
        steady = {**by_finish, "method": "first to last finished volume (report mtimes)"}
    summary = result.summary
    errors = frame.loc[frame["status"] == "failed", "error_message"].head(3).tolist()
    return {"mode": "ray", "label": label, "volumes": int(len(frame)), "ok": int(len(ok)),
            "failed": int(summary["failed"]), "errors": errors, "wall_s": wall, "volumes_per_s": len(ok) / wall,
            "model_busy_fraction": summary["model_busy_fraction"], "run_batch_wall_s": summary["wall_s"],
            "steady": steady, "steady_by_finish_times": by_finish, "trace": trace,
            "stage_seconds": summary["stage_seconds"], **rest, **mem}


# ------------------------------------------------------------------------------------------------------------
# Reporting
# ------------------------------------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else format(value, spec) + suffix


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


def format_table(report: dict[str, Any]) -> str:
    cols = ["mode", "volumes", "wall s", "vol/s", "steady vol/s", "model busy", "steady busy", "peak MB",
            "peak PSS MB"]
    rows = []
    for run in report["runs"]:
        name = run["mode"] if run["mode"] == "sequential" else f"ray ({run['label']})"
        rows.append([name, str(run["volumes"]), _fmt(run["wall_s"], ".1f"), _fmt(run["volumes_per_s"], ".3f"),
                     _fmt(run["steady"]["volumes_per_s"], ".3f"), _pct(run["model_busy_fraction"]),
                     _pct(run["steady"]["busy_fraction"]), _fmt(run["peak_rss_mb"], ".0f"),
                     _fmt(run["peak_pss_mb"], ".0f")])
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]

    def line(cells: list[str]) -> str:
        return "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(cells, widths)))

    out = [line(cols), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]
    return "\n".join(out)


def format_targets(report: dict[str, Any]) -> str:
    lines = []
    r = report["ratios"]
    lines.append(f"throughput ratio ray/sequential: end-to-end {_fmt(r['end_to_end'], '.2f', 'x')} "
                 f"(N={report['settings']['n']}, incl. actor start-up), "
                 f"{_fmt(r.get('end_to_end_scaled'), '.2f', 'x')} (N x scale); "
                 f"steady state {_fmt(r['steady'], '.2f', 'x')} (N), {_fmt(r.get('steady_scaled'), '.2f', 'x')} "
                 "(N x scale)")
    for name, t in report["targets"].items():
        verdict = "n/a" if t["pass"] is None else ("PASS" if t["pass"] else "FAIL")
        lines.append(f"  {verdict:4}  {name}: {t['text']}")
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    from importlib import metadata

    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    with contextlib.suppress(Exception):
        info["mem_total_gb"] = round(os.sysconf("SC_PHYS_PAGES") * PAGE_SIZE / 1024**3, 1)
    for dist in ("torch", "monai", "ray", "nvseg-ray"):
        try:
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info[dist] = None
    return info


def build_targets(seq: dict[str, Any], ray_n: dict[str, Any], ray_big: dict[str, Any] | None,
                  ratios: dict[str, Any]) -> dict[str, Any]:
    targets: dict[str, Any] = {}
    steady_ratio = ratios.get("steady_scaled") or ratios.get("steady")
    e2e = ratios.get("end_to_end_scaled") or ratios.get("end_to_end")
    targets["throughput ratio >= 1.3"] = {
        "value": steady_ratio, "end_to_end": e2e, "threshold": TARGET_RATIO,
        "pass": None if steady_ratio is None else steady_ratio >= TARGET_RATIO,
        "text": f"steady-state ray/sequential {_fmt(steady_ratio, '.2f', 'x')} "
                f"(end-to-end incl. actor start-up {_fmt(e2e, '.2f', 'x')}: "
                f"{'PASS' if e2e is not None and e2e >= TARGET_RATIO else 'FAIL'})"}
    busy_run = ray_big or ray_n
    busy = busy_run["steady"]["busy_fraction"]
    targets["model busy >= 90% once warm"] = {
        "value": busy, "whole_run": busy_run["model_busy_fraction"], "threshold": TARGET_BUSY,
        "pass": None if busy is None else busy >= TARGET_BUSY,
        "text": f"steady-state busy {_pct(busy)} over {busy_run['volumes']} volumes (whole run incl. start-up "
                f"{_pct(busy_run['model_busy_fraction'])})"}
    if ray_big is not None:
        flat = ray_big["peak_rss_mb"] / ray_n["peak_rss_mb"] if ray_n["peak_rss_mb"] else None
        flat_pss = ray_big["peak_pss_mb"] / ray_n["peak_pss_mb"] if ray_n["peak_pss_mb"] else None
        extra = ray_big["volumes"] - ray_n["volumes"]
        per_volume = (ray_big["peak_rss_mb"] - ray_n["peak_rss_mb"]) / extra if extra > 0 else None
        # memory is bounded by the pipeline only if the number of volumes in flight does not grow with N
        fl_n = (ray_n.get("trace") or {}).get("max_in_flight")
        fl_big = (ray_big.get("trace") or {}).get("max_in_flight")
        bounded = None if fl_n is None or fl_big is None else fl_big <= max(2 * fl_n, 4)
        ok = None if flat is None else flat <= TARGET_FLAT and bounded is not False
        in_flight = "" if bounded is None else (
            f"; volumes in flight (preprocessed, not yet postprocessed) at most {fl_n} vs {fl_big}"
            + ("" if bounded else ": the queue grows with N, so memory does too, until Ray Data's object-store "
               "budget stops it"))
        targets["peak memory flat in N"] = {
            "value": flat, "pss_ratio": flat_pss, "threshold": TARGET_FLAT, "mb_per_extra_volume": per_volume,
            "max_in_flight": [fl_n, fl_big], "in_flight_bounded": bounded, "pass": ok,
            "text": f"peak RSS {ray_n['peak_rss_mb']:.0f} MB for {ray_n['volumes']} volumes vs "
                    f"{ray_big['peak_rss_mb']:.0f} MB for {ray_big['volumes']}: {_fmt(flat, '.2f', 'x')} "
                    f"(PSS {_fmt(flat_pss, '.2f', 'x')}; {_fmt(per_volume, '+.1f')} MB per extra volume; flat = "
                    f"<= {TARGET_FLAT}x){in_flight}"}
    else:
        targets["peak memory flat in N"] = {"value": None, "threshold": TARGET_FLAT, "pass": None,
                                           "text": "not measured (--scale 1)"}
    return targets


# ------------------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_batch.py", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=DEFAULT_N, help=f"volumes for (a) and (b) (default {DEFAULT_N})")
    p.add_argument("--scale", type=int, default=DEFAULT_SCALE,
                   help=f"(c) runs the pipeline on N x scale volumes (default {DEFAULT_SCALE}; 1 skips (c))")
    p.add_argument("--shape", type=ints_arg, default=DEFAULT_SHAPE,
                   help="synthetic CT shape (default %s)" % ",".join(map(str, DEFAULT_SHAPE)))
    p.add_argument("--spacing", type=floats_arg, default=DEFAULT_SPACING,
                   help="synthetic CT voxel size in mm (default %s)" % ",".join(map(str, DEFAULT_SPACING)))
    p.add_argument("--classes", type=classes_arg, default=None,
                   help=f"comma-separated class ids/names (default {DEFAULT_CLASSES} unless --modality is given)")
    p.add_argument("--modality", help="everything-set to segment instead of --classes (e.g. CT_BODY: 117 classes)")
    p.add_argument("--patch-size", type=ints_arg, default=DEFAULT_PATCH,
                   help="sliding window (default %s)" % ",".join(map(str, DEFAULT_PATCH)))
    p.add_argument("--checkpoint", help="model.pt to use instead of a generated tiny one (width 8)")
    p.add_argument("--ray-cpus", type=float, default=DEFAULT_RAY_CPUS,
                   help=f"logical CPUs of the local Ray started here (default {DEFAULT_RAY_CPUS:g})")
    p.add_argument("--model-cpus", type=float, default=DEFAULT_MODEL_CPUS,
                   help=f"CPUs of the model actor = its torch threads (default {DEFAULT_MODEL_CPUS:g})")
    p.add_argument("--preprocess-cpus", type=float, default=DEFAULT_STAGE_CPUS,
                   help=f"CPUs per read/preprocess task (default {DEFAULT_STAGE_CPUS:g})")
    p.add_argument("--postprocess-cpus", type=float, default=DEFAULT_STAGE_CPUS,
                   help=f"CPUs per postprocess/write task (default {DEFAULT_STAGE_CPUS:g})")
    p.add_argument("--stage-memory-gb", type=float, default=DEFAULT_STAGE_MEMORY_GB,
                   help=f"memory reserved per CPU-stage task (default {DEFAULT_STAGE_MEMORY_GB:g})")
    p.add_argument("--ray-address", help="join this Ray cluster instead of starting a local one (memory then "
                   "covers the driver only)")
    p.add_argument("--seq-threads", type=int, default=0,
                   help="torch threads of the sequential baseline (default 0: try 1 and torch's default on the "
                   "first volume, untimed, and keep the faster)")
    p.add_argument("--skip-sequential", action="store_true", help="only run the Ray pipeline (no ratio)")
    p.add_argument("--no-trace", dest="trace", action="store_false",
                   help="do not trace the pipeline's stage calls (steady state then comes from report mtimes)")
    p.add_argument("--json", dest="json_out", help="also write every number to this JSON file")
    p.add_argument("--workdir", help="keep inputs and outputs in this directory (default: a deleted temp dir)")
    p.add_argument("--quiet", "-q", action="store_true", help="print only the table and the targets")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the report (also written to ``--json``).

    If Ray is already initialised in this process (e.g. a test session's fixture), that Ray is used and left
    running; otherwise a local Ray is started with ``--ray-cpus`` and shut down at the end.
    """
    args = build_parser().parse_args(argv)
    if len(args.shape) != 3 or len(args.spacing) != 3 or len(args.patch_size) != 3:
        raise SystemExit("--shape, --spacing and --patch-size need 3 values each")
    if args.n < 2 or args.scale < 1:
        raise SystemExit("--n must be >= 2 (steady state needs two finished volumes) and --scale >= 1")
    if args.classes is None and not args.modality:
        args.classes = classes_arg(DEFAULT_CLASSES)
    with work_folder(args.workdir, "nvseg-bench-batch-") as work:
        report = _run(args, work)
    if not args.quiet:
        print()
    print(format_table(report))
    print(format_targets(report))
    write_report(report, args.json_out)
    return report


def _start_ray(args: argparse.Namespace) -> tuple[bool, float]:
    """``(started here, seconds)``: joins an initialised Ray / ``--ray-address``, else starts a local one."""
    import ray

    if ray.is_initialized():
        return False, 0.0
    import logging

    import ray.data  # noqa: F401  (its loggers exist from here on)

    if args.quiet:  # Ray Data logs every dataset's execution plan at INFO
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    if args.ray_address:
        ray.init(address=args.ray_address, logging_level="WARNING", log_to_driver=False)
    else:
        ray.init(num_cpus=args.ray_cpus, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    return True, time.perf_counter() - t0


def _run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    src = work / "sources"
    src.mkdir(parents=True, exist_ok=True)
    sources = [write_torso_ct(src / f"src{i:03d}.nii.gz", args.shape, args.spacing, seed=i) for i in range(args.n)]
    in_n = replicate(sources, work / "in_n", args.n)
    big = args.n * args.scale if args.scale > 1 else 0
    if big:
        replicate(sources, work / "in_big", big)
    if args.checkpoint:
        ckpt, synthetic_ckpt = args.checkpoint, False
    else:
        ckpt, synthetic_ckpt = str(write_tiny_checkpoint(work / "tiny_model.pt")), True
    inputs_s = time.perf_counter() - t0
    settings = inference_settings(args, ckpt)
    log(args, f"inputs: {args.n} synthetic CTs {list(args.shape)} @ {list(args.spacing)} mm "
               f"({sources[0].stat().st_size / MB:.1f} MB each){f', {big} links for (c)' if big else ''}; "
               f"model {'tiny generated (width 8)' if synthetic_ckpt else ckpt}; prepared in {inputs_s:.1f} s")
    log(args, f"prompts: {args.classes or args.modality}; patch {list(args.patch_size)}")

    runs: list[dict[str, Any]] = []
    load_start = os.getloadavg()[0]
    if load_start > 0.5 * (os.cpu_count() or 1):
        log(args, f"note: load average {load_start:.1f} on {os.cpu_count()} CPUs: other processes compete, "
                   "times will be noisy")
    ray_info: dict[str, Any] = {}
    with TreeMemorySampler() as sampler:
        seq = None
        if not args.skip_sequential:
            log(args, f"(a) sequential, {args.n} volumes ...")
            seq = run_sequential(in_n, work / "out_seq", settings, sampler, args)
            runs.append(seq)
            log(args, f"  {seq['wall_s']:.1f} s with {seq['torch_threads']} torch thread(s), "
                       f"{seq['volumes_per_s']:.3f} vol/s, infer "
                       f"{seq['model_busy_fraction']:.0%} of the time, peak {seq['peak_rss_mb']:.0f} MB")
        import ray

        started, init_s = _start_ray(args)
        try:
            resources = ray.cluster_resources()
            ray_info = {"started_here": started, "init_s": init_s, "cpus": resources.get("CPU"),
                        "memory_gb": round(resources.get("memory", 0) / 1024**3, 1),
                        "object_store_gb": round(resources.get("object_store_memory", 0) / 1024**3, 1)}
            log(args, f"ray: {'started' if started else 'joined'} ({resources.get('CPU')} logical CPUs"
                       f"{f', init {init_s:.1f} s' if started else ''}); model actor {args.model_cpus:g} CPU, "
                       f"preprocess {args.preprocess_cpus:g}, postprocess {args.postprocess_cpus:g} CPU per task")
            log(args, f"(b) ray, {args.n} volumes ...")
            ray_n = run_ray(work / "in_n", work / "out_ray_n", settings, sampler, args, f"N={args.n}")
            runs.append(ray_n)
            log(args, _ray_line(ray_n))
            ray_big = None
            if big:
                log(args, f"(c) ray, {big} volumes ...")
                ray_big = run_ray(work / "in_big", work / "out_ray_big", settings, sampler, args, f"N={big}")
                runs.append(ray_big)
                log(args, _ray_line(ray_big))
        finally:
            if started:
                ray.shutdown()

    ratios: dict[str, Any] = {"end_to_end": None, "steady": None}
    if seq is not None:
        seq_steady = seq["steady"]["volumes_per_s"]
        ratios["end_to_end"] = ray_n["volumes_per_s"] / seq["volumes_per_s"]
        if seq_steady and ray_n["steady"]["volumes_per_s"]:
            ratios["steady"] = ray_n["steady"]["volumes_per_s"] / seq_steady
        if ray_big is not None:
            ratios["end_to_end_scaled"] = ray_big["volumes_per_s"] / seq["volumes_per_s"]
            if seq_steady and ray_big["steady"]["volumes_per_s"]:
                ratios["steady_scaled"] = ray_big["steady"]["volumes_per_s"] / seq_steady
    targets = build_targets(seq, ray_n, ray_big, ratios) if seq is not None else {}
    machine = machine_info()
    machine["loadavg_start_1min"] = round(load_start, 2)
    machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    return {
        "format": "nvseg-bench-batch/1",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine,
        "ray": ray_info,
        "input": {"synthetic": True, "shape": list(args.shape), "spacing_mm": list(args.spacing),
                  "bytes_each": sources[0].stat().st_size},
        "model": {"synthetic": synthetic_ckpt, "checkpoint": None if synthetic_ckpt else ckpt},
        "settings": {"n": args.n, "scale": args.scale, "classes": args.classes, "modality": settings["modality"],
                     "patch_size": list(args.patch_size), "ray_cpus": args.ray_cpus, "model_cpus": args.model_cpus,
                     "preprocess_cpus": args.preprocess_cpus, "postprocess_cpus": args.postprocess_cpus,
                     "stage_memory_gb": args.stage_memory_gb, "memory_sample_interval_s": SAMPLE_INTERVAL_S,
                     "steady_state": "ray: the model stage from the end of its first call to the end of its last "
                                     "(stage traces; report mtimes with --no-trace); sequential: first to last "
                                     "finished volume"},
        "modes": sorted({r["mode"] for r in runs}),
        "runs": runs,
        "ratios": ratios,
        "targets": targets,
    }


def _ray_line(run: dict[str, Any]) -> str:
    st = run["steady"]
    line = (f"  {run['wall_s']:.1f} s ({run['ok']}/{run['volumes']} ok), {run['volumes_per_s']:.3f} vol/s; first "
            f"volume finished after {_fmt(st.get('first_finish_s'), '.1f')} s; steady "
            f"{_fmt(st['volumes_per_s'], '.3f')} vol/s, model busy {_pct(st['busy_fraction'])} "
            f"(whole run {_pct(run['model_busy_fraction'])}); peak {run['peak_rss_mb']:.0f} MB RSS / "
            f"{run['peak_pss_mb']:.0f} MB PSS over {run['peak_processes']} processes")
    tr = run.get("trace") or {}
    if "window_s" in tr:
        line += (f"\n  trace: model first call at {tr['first_model_start_s']:.1f} s; between model calls "
                 f"{tr['mean_gap_s']:.2f} s idle on average ({tr['gap_input_ready_s']:.1f} s in all with the next "
                 f"volume already preprocessed, {tr['gap_starved_s']:.1f} s waiting for preprocess); model call "
                 f"overhead beyond infer {tr['model_call_overhead_s']:.2f} s; preprocess "
                 f"{tr['preprocess_call_s']:.2f} s / postprocess {tr['postprocess_call_s']:.2f} s per call in {tr['preprocess_processes']} / "
                 f"{tr['postprocess_processes']} processes; queue before model {tr['model_queue_s']['mean']:.1f} s, "
                 f"before postprocess {tr['postprocess_queue_s']['mean']:.1f} s (means); at most "
                 f"{tr['max_in_flight']} volumes in flight; first mask written at "
                 f"{tr['first_postprocess_end_s']:.1f} s")
    if run["failed"]:
        line += f"\n  {run['failed']} FAILED: {run['errors']}"
    return line


if __name__ == "__main__":
    main()
