#!/usr/bin/env python
"""Latency and throughput of the HTTP service (Ray Serve app) against calling the engine in-process.

In ONE run, on the same generated volume, the same weights and the same settings:

* **direct**: one loaded :class:`nvseg_ray.model_runner.ModelRunner` in this process; a request is
  ``engine.segment_volume(path, stages, runner, prompts)`` on the local file (read, preprocess, infer,
  postprocess; no output encoding). At concurrency C, C worker threads call it with the same
  :class:`~nvseg_ray.stages.VolumeStages` and ``ModelRunner`` at once (C=1: one worker
  thread, like the model replica's ``asyncio.to_thread``). Both sides use ``--torch-threads`` intra-op
  threads per call (default 1, what Ray gives a 1-CPU replica).
* **http**: ``POST /v1/vista3d/inference`` with ``{"image": <URL>, "prompts": {"classes": [...]},
  "output": {"format": "nifti"}}``; the image is served by a file server thread in this process
  (127.0.0.1), which the Gateway fetches through its SSRF-guarded fetcher. C client threads share one
  ``httpx.Client`` (keep-alive connections).
* **upload**: ``POST /v1/segment`` (multipart upload of the same file, ``output=nifti``), C threads.

The Serve app is the one of ``serve_apps/app.py`` (same ``Gateway`` / ``Model`` / ``JobStore`` classes,
wired like ``build_app``) with deployment options that make C concurrent clients *queue* instead of
being refused with 503: one replica each (no autoscaling), the Model keeps the production
``max_ongoing_requests=2`` but ``max_queued_requests`` is raised, and the Gateway's ``max_inflight`` /
``max_ongoing_requests`` are raised above the highest C.

At C = 1 the paths are interleaved request by request (direct, http, upload, direct, ...) so that the
machine's background load hits all of them alike; at C > 1 each path runs as one block. Every path is
warmed up first. Latency = client-side wall time of one request (p50/p95 over the successful ones,
numpy's linear-interpolated percentiles); req/s = successful requests / wall time of the block.

Run ``python benchmarks/bench_serve.py --help`` for the options; see ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import gzip
import logging
import os
import platform
import socket
import statistics
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python benchmarks/bench_serve.py` from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks._common import classes_arg, ints_arg, log, work_folder, write_report, write_tiny_checkpoint  # noqa: E402

import numpy as np  # noqa: E402

MB = 1024 * 1024
APP_NAME = "nvseg-bench"
PATHS = ("direct", "http", "upload")
PATH_LABELS = {"direct": "direct segment()", "http": "HTTP /v1/vista3d/inference",
               "upload": "HTTP /v1/segment (upload)"}
#: the target this benchmark checks: HTTP p50 at C=1 at most this much above the in-process p50.
TARGET_OVERHEAD_PCT = 15.0

DESCRIPTION = """\
HTTP service latency benchmark: p50/p95 latency and throughput of the Ray Serve app
(POST /v1/vista3d/inference with the image fetched over HTTP, and POST /v1/segment uploads; nifti output)
against the same work done in-process by one loaded model, at several client concurrencies, plus the
p50 overhead of HTTP over direct at C=1 (target: <= 15 % for a 64^3 volume) and where that overhead goes.

By default a synthetic CT (64^3 voxels at 1.5 mm, so the model grid is at most 64^3) and a tiny randomly
initialised checkpoint (width 8) are generated. The script starts its own local Ray (ray.init(address=
"local")) and Serve on a free loopback port, and shuts both down at the end.
"""


# ------------------------------------------------------------------------------------------------------------
# Options
# ------------------------------------------------------------------------------------------------------------



def _levels(text: str) -> tuple[int, ...]:
    if text.strip().lower() in ("", "none", "off"):
        return ()
    return ints_arg(text)



def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_serve.py", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=64, help="synthetic CT edge in voxels (size^3, default 64)")
    p.add_argument("--spacing", type=float, default=1.5, help="synthetic CT voxel size in mm (default 1.5 = model grid)")
    p.add_argument("--input", help="benchmark this .nii/.nii.gz instead of a synthetic CT")
    p.add_argument("--checkpoint", help="model.pt instead of a generated tiny one (width 8)")
    p.add_argument("--classes", type=classes_arg, default=["liver", "spleen", 3],
                   help="class prompts (default liver,spleen,3)")
    p.add_argument("--patch-size", type=ints_arg, default=(64, 64, 64), help="sliding window (default 64,64,64)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda (both sides)")
    p.add_argument("--requests", type=int, default=24,
                   help="requests per path and concurrency level (at least C; default 24)")
    p.add_argument("--concurrency", type=_levels, default=(1, 4, 16),
                   help="client concurrency levels (default 1,4,16; 1 is always measured)")
    p.add_argument("--upload-concurrency", default="1",
                   help="levels at which the upload route /v1/segment is measured too (default 1; 'all' = every "
                   "level, 'none' = skip); each level costs another --requests model runs")
    p.add_argument("--warmup", type=int, default=2, help="untimed requests per path before measuring (default 2)")
    p.add_argument("--breakdown", type=int, default=5,
                   help="samples per component of the C=1 overhead breakdown (default 5; 0 = skip)")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="torch intra-op threads on BOTH sides: this process and every Ray worker (OMP_NUM_THREADS); "
                   "default 1 = what Ray gives a 1-CPU Serve replica (serve_apps/config.yaml)")
    p.add_argument("--ray-cpus", type=int, default=4,
                   help="logical CPUs of the local Ray (default 4; scheduling only, see the README)")
    p.add_argument("--json", dest="json_out", help="also write every number (and every latency) to this JSON file")
    p.add_argument("--workdir", help="keep the generated inputs here (default: a deleted temp dir)")
    p.add_argument("--quiet", "-q", action="store_true", help="print only the tables and the verdict")
    return p


# ------------------------------------------------------------------------------------------------------------
# Measurement helpers
# ------------------------------------------------------------------------------------------------------------


def _pct(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else None


def _median(values: Sequence[float]) -> float | None:
    return float(statistics.median(values)) if len(values) else None


def latency_stats(latencies_s: Sequence[float], wall_s: float, n: int, errors: Sequence[str]) -> dict[str, Any]:
    ok = len(latencies_s)
    ms = [v * 1000 for v in latencies_s]
    return {"requests": n, "ok": ok, "errors": len(errors), "error_samples": list(errors[:3]),
            "p50_ms": _pct(ms, 50), "p95_ms": _pct(ms, 95), "mean_ms": float(np.mean(ms)) if ms else None,
            "max_ms": max(ms) if ms else None, "wall_s": wall_s, "rps": ok / wall_s if wall_s > 0 else None,
            "latencies_ms": [round(v, 2) for v in ms]}


def run_load(call: Callable[[], Any], n: int, concurrency: int) -> dict[str, Any]:
    """``n`` calls of ``call`` from ``concurrency`` threads; client-side latency of each successful call."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def one(_: int) -> None:
        t0 = time.perf_counter()
        try:
            call()
        except Exception as exc:  # noqa: BLE001 - counted and reported, never hidden
            with lock:
                errors.append(f"{type(exc).__name__}: {exc}"[:300])
            return
        elapsed = time.perf_counter() - t0
        with lock:
            latencies.append(elapsed)

    start = time.perf_counter()
    if concurrency <= 1:
        for i in range(n):
            one(i)
    else:
        with cf.ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="client") as pool:
            list(pool.map(one, range(n)))
    return latency_stats(latencies, time.perf_counter() - start, n, errors)


def run_interleaved(calls: dict[str, Callable[[], Any]], n: int) -> dict[str, dict[str, Any]]:
    """C=1: one request of every path in turn, ``n`` rounds (the same background load hits all paths)."""
    lat: dict[str, list[float]] = {k: [] for k in calls}
    err: dict[str, list[str]] = {k: [] for k in calls}
    busy: dict[str, float] = {k: 0.0 for k in calls}
    pairs: list[dict[str, float]] = []
    for _ in range(n):
        row: dict[str, float] = {}
        for name, call in calls.items():
            t0 = time.perf_counter()
            try:
                call()
            except Exception as exc:  # noqa: BLE001
                err[name].append(f"{type(exc).__name__}: {exc}"[:300])
                busy[name] += time.perf_counter() - t0
                continue
            elapsed = time.perf_counter() - t0
            busy[name] += elapsed
            lat[name].append(elapsed)
            row[name] = elapsed
        pairs.append(row)
    out = {k: latency_stats(lat[k], busy[k], n, err[k]) for k in calls}
    for k in calls:  # per-round ratio against direct: robust to slow drifts of the background load
        if k != "direct":
            ratios = [r[k] / r["direct"] for r in pairs if k in r and r.get("direct")]
            out[k]["paired_ratio_median"] = _median(ratios)
    return out


def _time_samples(fn: Callable[[], Any], k: int) -> list[float]:
    out = []
    for _ in range(k):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _QuietFiles(SimpleHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:  # no access log on stderr
        pass


@contextlib.contextmanager
def file_server(directory: Path) -> Iterator[str]:
    """A threaded static file server on 127.0.0.1 (free port) in this process; yields its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0),
                                 lambda *a, **k: _QuietFiles(*a, directory=str(directory), **k))
    thread = threading.Thread(target=server.serve_forever, name="file-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# ------------------------------------------------------------------------------------------------------------
# The Serve app
# ------------------------------------------------------------------------------------------------------------


def serve_args(checkpoint: str, patch_size: Sequence[int], device: str, max_c: int) -> dict[str, Any]:
    """ServeSettings for measuring: admission control above the highest concurrency, long timeout."""
    return {"checkpoint": checkpoint, "patch_size": list(patch_size), "device": device,
            "max_inflight": max(2 * max_c, 8), "request_timeout_s": 900.0,
            "allowed_hosts": ["127.0.0.1"], "allow_private_networks": True, "allowed_output_prefixes": []}


def deployment_options(max_c: int) -> dict[str, dict[str, Any]]:
    from serve_apps.app import Gateway, ModelDeployment

    return {
        # production value (the decorator in serve_apps/app.py): 2 inferences at a time per model replica; the
        # queue is what grows with C (production: 8, which would answer 503 to 16 clients)
        "Model": {"num_replicas": 1, "max_ongoing_requests": ModelDeployment.max_ongoing_requests,
                  "max_queued_requests": max(4 * max_c, 16)},
        "Gateway": {"num_replicas": 1, "max_ongoing_requests": max(2 * max_c, Gateway.max_ongoing_requests),
                    "ray_actor_options": {"num_cpus": 1}},
        "JobStore": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0}},
    }


def build_bench_app(args: dict[str, Any], options: dict[str, dict[str, Any]]) -> Any:
    """``serve_apps.app.build_app``'s graph with explicit deployment options (fixed replicas, deeper queues)."""
    from serve_apps.app import Gateway, JobStore, ModelDeployment

    model_opts = dict(options["Model"])
    settings_gpus = args.get("model_gpus")
    if settings_gpus is None:
        import ray

        settings_gpus = 1.0 if ray.cluster_resources().get("GPU", 0) else 0.0
    if settings_gpus:
        model_opts["ray_actor_options"] = {"num_gpus": settings_gpus}
    model = ModelDeployment.options(**model_opts).bind(dict(args))
    jobs = JobStore.options(**options["JobStore"]).bind()
    return Gateway.options(**options["Gateway"]).bind(model, jobs, dict(args))


def wait_ready(url: str, timeout_s: float = 240.0) -> float:
    import httpx

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/v1/health/ready", timeout=5).status_code == 200:
                return time.monotonic() - t0
        time.sleep(0.5)
    raise RuntimeError(f"the Serve app at {url} did not become ready within {timeout_s:.0f} s")


# ------------------------------------------------------------------------------------------------------------
# Reporting
# ------------------------------------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _table(cols: list[str], rows: list[list[str]], left: int = 1) -> list[str]:
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]

    def line(cells: list[str]) -> str:
        return "  ".join(v.ljust(w) if i < left else v.rjust(w) for i, (v, w) in enumerate(zip(cells, widths)))

    return [line(cols), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]


def format_table(report: dict[str, Any]) -> str:
    rows = []
    for r in report["results"]:
        rows.append([PATH_LABELS[r["path"]], str(r["concurrency"]), _fmt(r["p50_ms"], ".0f"), _fmt(r["p95_ms"], ".0f"),
                     _fmt(r["rps"], ".2f"), f"{r['ok']}/{r['requests']}"])
    return "\n".join(_table(["path", "C", "p50 ms", "p95 ms", "req/s", "ok"], rows))


def format_verdict(report: dict[str, Any]) -> str:
    ov = report["overhead"]
    lines = [f"p50 overhead of HTTP over direct at C=1: {ov['http_p50_ms']:.0f} ms / {ov['direct_p50_ms']:.0f} ms "
             f"= {ov['ratio']:.3f}x ({ov['percent']:+.1f} %; paired per-round median {ov['paired_ratio_median']:.3f}x) "
             f"-> target <= {TARGET_OVERHEAD_PCT:g} % for a {report['input']['label']} volume: "
             f"{'PASS' if ov['pass'] else 'FAIL'}"]
    if ov.get("upload_ratio") is not None:
        lines.append(f"upload route /v1/segment at C=1: {ov['upload_p50_ms']:.0f} ms = {ov['upload_ratio']:.3f}x "
                     f"({ov['upload_percent']:+.1f} %) of direct")
    m = report.get("machine", {})
    if m.get("loadavg_start_1min") is not None:
        lines.append(f"(load average {m['loadavg_start_1min']:.1f} -> {m['loadavg_end_1min']:.1f} on {m['cpu_count']} CPUs "
                     f"during the run; above ~{m['cpu_count']} other processes compete and every number is noisy)")
    return "\n".join(lines)


def format_breakdown(report: dict[str, Any]) -> str:
    bd = report.get("breakdown")
    if not bd:
        return ""
    rows = [[c["component"], _fmt(c.get("direct_ms"), ".1f"), _fmt(c.get("service_ms"), ".1f"),
             _fmt(c.get("extra_ms"), "+.1f"), c.get("how", "")] for c in bd["components"]]
    out = ["", f"where the C=1 overhead goes (medians of {bd['samples']} samples; extra = service - direct):"]
    out += _table(["component", "direct ms", "service ms", "extra ms", "measured how"], rows)
    out.append(f"sum of the measured extras {bd['measured_extra_ms']:+.1f} ms; p50 difference http - direct "
               f"{bd['p50_difference_ms']:+.1f} ms; unattributed {bd['unattributed_ms']:+.1f} ms "
               "(request/response bodies, pydantic, the Gateway's thread hand-offs, waiting for a core, noise)")
    out.append(f"json-output route at C=1 (no mask encoding, small response): p50 {bd['json_route_p50_ms']:.0f} ms; "
               f"model-grid {bd['model_grid']}, prepared volume {bd['prepared_mb']:.2f} MB to the model replica, "
               f"labels {bd['labels_mb']:.2f} MB back, response {bd['response_kb']:.0f} kB")
    return "\n".join(out)


def machine_info() -> dict[str, Any]:
    from importlib import metadata

    import torch

    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    with contextlib.suppress(Exception):
        info["mem_total_gb"] = round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 1024**3, 1)
    for dist in ("torch", "monai", "ray", "fastapi", "httpx", "nvseg-ray"):
        try:
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info[dist] = None
    return info


# ------------------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    args.concurrency = tuple(sorted(set((1, *args.concurrency))))
    upload = args.upload_concurrency.strip().lower()
    args.upload_concurrency = args.concurrency if upload == "all" else _levels(upload)
    if len(args.patch_size) != 3:
        raise SystemExit("--patch-size needs 3 values")
    if args.requests < 1 or args.size < 8:
        raise SystemExit("--requests must be >= 1 and --size >= 8")
    import ray

    if ray.is_initialized():
        raise SystemExit("bench_serve.py starts its own local Ray and Serve: run it in a fresh process "
                         "(e.g. `RAY_ADDRESS=local python benchmarks/bench_serve.py`), not inside a Ray session")
    warnings.filterwarnings("ignore", category=FutureWarning)
    with work_folder(args.workdir, "nvseg-bench-serve-") as work:
        report = _run(args, work)
    if not args.quiet:
        print()
    print(format_table(report))
    print(format_verdict(report))
    text = format_breakdown(report)
    if text:
        print(text)
    write_report(report, args.json_out)
    return report


def _run(args: argparse.Namespace, work: Path) -> dict[str, Any]:  # noqa: PLR0915 - one linear script
    import torch

    from nvseg_ray.synthetic import write_torso_ct
    from nvseg_ray.engine import segment_volume
    from nvseg_ray.model_runner import ModelRunner
    from nvseg_ray.serving.service import RequestProcessor, ServeSettings
    from nvseg_ray.stages import VolumeStages

    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]
    torch.set_num_threads(args.torch_threads)
    if args.input:
        src = Path(args.input).resolve()
        served = work / "served"
        served.mkdir(exist_ok=True)
        path = served / src.name
        if not path.exists():
            os.symlink(src, path)
        synthetic_input = False
    else:
        served = work / "served"
        served.mkdir(exist_ok=True)
        path = write_torso_ct(served / "ct.nii.gz", (args.size,) * 3, (args.spacing,) * 3)
        synthetic_input = True
    ckpt = args.checkpoint or str(write_tiny_checkpoint(work / "tiny_model.pt"))
    file_bytes = path.read_bytes()

    max_c = max(args.concurrency)
    sargs = serve_args(str(Path(ckpt).resolve()), args.patch_size, args.device, max_c)
    settings = ServeSettings.from_args(sargs)
    fields = {"modality": settings.default_modality, "classes": list(args.classes)}
    processor = RequestProcessor(settings)
    cfg, prompts = processor.config_for(fields)

    # -- direct: one loaded model in this process ----------------------------------------------------
    stages, runner = VolumeStages(cfg, catalog=processor.catalog), ModelRunner(cfg)

    def segment() -> Any:
        return segment_volume(str(path), stages, runner, prompts)

    t0 = time.perf_counter()
    runner.model  # noqa: B018 - load before any clock
    load_s = time.perf_counter() - t0
    direct_result = segment()  # first call: also a warm-up
    for _ in range(max(args.warmup - 1, 0)):
        segment()
    prepared = processor.prepare(file_bytes, path.name, cfg, prompts)
    model_grid = list(prepared.prepared.image.shape[1:])
    in_shape = list(direct_result.volume.shape)
    n_params = sum(p.numel() for p in runner.model.network.parameters())
    log(args, f"input: {path.name} {in_shape} @ {args.spacing if synthetic_input else 'given'} mm, "
               f"{len(file_bytes) / 1024:.0f} kB; model grid {model_grid}; patch {list(cfg.patch_size)}")
    log(args, f"model: {'tiny generated' if not args.checkpoint else ckpt}, "
               f"{n_params / 1e6:.1f} M parameters (loaded in {load_s:.1f} s); {len(prompts.class_ids)} classes; "
               f"device {runner.device}; {torch.get_num_threads()} torch threads")
    if load_start > 0.5 * (os.cpu_count() or 1):
        log(args, f"note: load average {load_start:.1f} on {os.cpu_count()} CPUs: other processes compete, "
                   "latencies will be noisy (C=1 is interleaved request by request to share the noise)")

    # -- Ray + Serve ----------------------------------------------------------------------------------
    # Ray sets OMP_NUM_THREADS = num_cpus (1) in a Serve replica unless it is already set: set it to this
    # process's torch thread count (the raylet and every worker inherit the environment, and the job's
    # runtime_env says it again), so that the Model replica and the Gateway run torch with as many threads
    # as the direct path does.
    threads = str(args.torch_threads)
    saved_omp = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = threads
    import ray
    from ray import serve

    for name in ("ray", "ray.serve"):
        logging.getLogger(name).setLevel(logging.WARNING)
    report: dict[str, Any] = {}
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=args.ray_cpus, include_dashboard=False, logging_level="WARNING",
             log_to_driver=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": threads}})
    try:
        with file_server(served) as files_url:
            port = _free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            options = deployment_options(max_c)
            serve.run(build_bench_app(sargs, options), name=APP_NAME, route_prefix="/", blocking=False)
            url = f"http://127.0.0.1:{port}"
            wait_ready(url)
            startup_s = time.perf_counter() - t0
            log(args, f"Ray ({args.ray_cpus} logical CPUs) + Serve app ready in {startup_s:.1f} s at {url}; "
                       f"image served from {files_url}/{path.name}")
            report = _measure(args, url, f"{files_url}/{path.name}", path, file_bytes, segment, processor,
                              settings, cfg, prompts, fields, prepared, direct_result, options)
            report["input"] = {"synthetic": synthetic_input, "path_name": path.name, "shape": in_shape,
                               "spacing_mm": args.spacing if synthetic_input else None, "bytes": len(file_bytes),
                               "model_grid": model_grid,
                               "label": "x".join(str(s) for s in in_shape) if len(set(in_shape)) > 1
                               else f"{in_shape[0]}^3"}
            report["model"] = {"synthetic": not args.checkpoint, "parameters": n_params, "load_s": load_s}
            report["settings"].update({"ray_cpus": args.ray_cpus, "omp_num_threads": int(threads),
                                       "serve_args": sargs, "deployments": options, "startup_s": startup_s})
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
        if saved_omp is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved_omp
    report["machine"] = {**machine_info(), "loadavg_start_1min": round(load_start, 2),
                         "loadavg_end_1min": round(os.getloadavg()[0], 2)}
    report["total_s"] = time.perf_counter() - t_start
    log(args, f"done in {report['total_s']:.0f} s (load average {load_start:.1f} -> {os.getloadavg()[0]:.1f})")
    return report


def _measure(args: argparse.Namespace, url: str, image_url: str, path: Path, file_bytes: bytes,
             segment: Callable[[], Any],
             processor: Any, settings: Any, cfg: Any, prompts: Any, fields: dict[str, Any], prepared: Any,
             direct_result: Any, options: dict[str, Any]) -> dict[str, Any]:
    import httpx
    import nibabel as nib
    from ray import serve

    from nvseg_ray.output import mask_image
    from nvseg_ray.serving.encode import nifti_gz
    from nvseg_ray.serving.fetch import fetch_image
    from nvseg_ray.stages import VolumeStages

    max_c = max(args.concurrency)
    client = httpx.Client(timeout=httpx.Timeout(900.0, connect=30.0),
                                         limits=httpx.Limits(max_connections=max_c + 4,
                                                             max_keepalive_connections=max_c + 4))
    classes = list(args.classes)
    body = {"image": image_url, "prompts": {"classes": classes}, "output": {"format": "nifti"}}
    form = {"classes": ",".join(str(c) for c in classes), "output": "nifti"}

    def check(resp: httpx.Response) -> httpx.Response:
        if resp.status_code != 200 or not resp.content:
            raise RuntimeError(f"HTTP {resp.status_code}: {resp.text[:200]}")
        return resp

    def direct() -> Any:
        return segment()

    def http() -> httpx.Response:
        return check(client.post(f"{url}/v1/vista3d/inference", json=body))

    def upload() -> httpx.Response:
        return check(client.post(f"{url}/v1/segment", data=form,
                                 files={"file": (path.name, file_bytes, "application/octet-stream")}))

    def live() -> httpx.Response:
        return check(client.get(f"{url}/v1/health/live"))

    def http_json() -> httpx.Response:
        return check(client.post(f"{url}/v1/vista3d/inference", json={**body, "output": {"format": "json"}}))

    # The model replica runs inference in a worker thread (asyncio.to_thread); so does the direct path, also
    # at C=1 (with OpenMP, torch in the main thread and in other threads can behave differently).
    direct_thread = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="direct")

    def direct_c1() -> Any:
        return direct_thread.submit(direct).result()

    calls = {"direct": direct_c1, "http": http, "upload": upload}
    try:
        # -- warm-up (direct was warmed up before Serve started) and a correctness check --------------
        first = http()
        served = np.asanyarray(nib.Nifti1Image.from_bytes(gzip.decompress(first.content)).dataobj)
        labels_equal = bool(np.array_equal(served, direct_result.labels))
        response_bytes = len(first.content)
        for _ in range(max(args.warmup - 1, 0)):
            http()
        for _ in range(max(args.warmup, 1)):
            upload()
        http_json()
        log(args, f"warm-up done; HTTP mask == direct labels: {labels_equal}; nifti response {response_bytes} B")

        # -- load ----------------------------------------------------------------------------------
        results: list[dict[str, Any]] = []
        for c in args.concurrency:
            n = max(args.requests, c)
            paths = [p for p in PATHS if p != "upload" or c in args.upload_concurrency]
            if c == 1:
                log(args, f"C=1: {n} rounds of {', '.join(paths)} (interleaved) ...")
                measured = run_interleaved({p: calls[p] for p in paths}, n)
            else:
                measured = {}
                for p in paths:
                    log(args, f"C={c}: {n} x {p} ...")
                    measured[p] = run_load(direct if p == "direct" else calls[p], n, c)
            for p in paths:
                r = measured[p]
                results.append({"path": p, "concurrency": c, **r})
                log(args, f"  {p:7s} C={c:<3d} p50 {_fmt(r['p50_ms'], '.0f')} ms  p95 {_fmt(r['p95_ms'], '.0f')} ms  "
                           f"{_fmt(r['rps'], '.2f')} req/s  ({r['ok']}/{r['requests']} ok)")

        by = {(r["path"], r["concurrency"]): r for r in results}
        d1, h1 = by[("direct", 1)], by[("http", 1)]
        ratio = h1["p50_ms"] / d1["p50_ms"] if h1["p50_ms"] and d1["p50_ms"] else float("nan")
        overhead: dict[str, Any] = {
            "concurrency": 1, "direct_p50_ms": d1["p50_ms"], "http_p50_ms": h1["p50_ms"], "ratio": ratio,
            "percent": (ratio - 1) * 100, "paired_ratio_median": h1.get("paired_ratio_median") or float("nan"),
            "target_percent": TARGET_OVERHEAD_PCT, "pass": bool((ratio - 1) * 100 <= TARGET_OVERHEAD_PCT),
            "labels_equal": labels_equal}
        if ("upload", 1) in by and by[("upload", 1)]["p50_ms"]:
            u1 = by[("upload", 1)]
            overhead.update(upload_p50_ms=u1["p50_ms"], upload_ratio=u1["p50_ms"] / d1["p50_ms"],
                            upload_percent=(u1["p50_ms"] / d1["p50_ms"] - 1) * 100,
                            upload_paired_ratio_median=u1.get("paired_ratio_median"))

        breakdown = None
        if args.breakdown > 0:
            log(args, "overhead breakdown ...")
            breakdown = _breakdown(args.breakdown, image_url, settings, processor, cfg, prompts, fields,
                                   prepared, direct_result, http_json, live, d1, h1, response_bytes, direct_c1,
                                   fetch_image, nifti_gz, mask_image, VolumeStages, serve)
    finally:
        client.close()
        direct_thread.shutdown()
    return {"format": "nvseg-bench-serve/1", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "paths": sorted({r["path"] for r in results}, key=PATHS.index), "results": results,
            "overhead": overhead, "breakdown": breakdown,
            "settings": {"requests": args.requests, "concurrency": list(args.concurrency),
                         "upload_concurrency": list(args.upload_concurrency), "warmup": args.warmup,
                         "classes": classes, "class_ids": list(prompts.class_ids),
                         "patch_size": list(cfg.patch_size), "device": args.device,
                         "torch_threads": args.torch_threads,
                         "direct_concurrency": "C threads calling segment() on one shared ModelRunner "
                                               "(C=1: sequential, interleaved with the HTTP requests)"}}


def _breakdown(k: int, image_url: str, settings: Any, processor: Any, cfg: Any, prompts: Any,
               fields: dict[str, Any], prepared: Any, direct_result: Any, http_json: Callable[[], Any],
               live: Callable[[], Any], d1: dict[str, Any], h1: dict[str, Any], response_bytes: int,
               direct: Callable[[], Any],
               fetch_image: Any, nifti_gz: Any, mask_image: Any, stages_cls: Any, serve: Any) -> dict[str, Any]:
    """Per-component medians at C=1: the service's own stage timings (``output=json`` answers), the same
    stages in-process, and the service-only steps timed in this process (fetch, encode, per-request setup)
    or through a handle to the model replica (the Gateway -> Model call without the HTTP front)."""
    import pickle

    # stages in-process (fresh samples, interleaved with the json route below)
    direct_t: dict[str, list[float]] = {s: [] for s in ("read", "preprocess", "infer", "postprocess")}
    service_t: dict[str, list[float]] = {s: [] for s in direct_t}
    json_wall: list[float] = []
    for _ in range(k):
        res = direct()
        for s in direct_t:
            direct_t[s].append(res.timings.get(s, 0.0))
        t0 = time.perf_counter()
        resp = http_json()
        json_wall.append(time.perf_counter() - t0)
        timings = resp.json()["timings_s"]
        for s in service_t:
            service_t[s].append(float(timings.get(s, 0.0)))
    policy = settings.fetch_policy()
    fetch_s = _time_samples(lambda: fetch_image(image_url, policy, settings.storage_options), k)
    setup_s = _time_samples(lambda: (processor.config_for(fields), processor.config_for(fields),
                                     stages_cls(cfg, catalog=processor.catalog),
                                     stages_cls(cfg, catalog=processor.catalog)), k)
    encode_s = _time_samples(lambda: nifti_gz(mask_image(direct_result)), k)
    handle = serve.get_deployment_handle("Model", app_name=APP_NAME)
    handle_extra: list[float] = []
    labels_nbytes = 0
    for _ in range(k):
        t0 = time.perf_counter()
        labels, infer_s = handle.infer.remote(prepared.prepared, prompts).result()
        handle_extra.append(time.perf_counter() - t0 - infer_s)
        labels_nbytes = labels.nbytes
    prepared_mb = len(pickle.dumps(prepared.prepared, protocol=5)) / MB

    def med_ms(values: Sequence[float]) -> float:
        return float(statistics.median(values)) * 1000

    live_s = _time_samples(live, k)

    comps: list[dict[str, Any]] = [
        {"component": "HTTP front: proxy + Gateway (GET /v1/health/live)", "direct_ms": 0.0,
         "service_ms": med_ms(live_s), "how": "round trip of a request that does no work, from here"},
        {"component": "fetch image over HTTP", "direct_ms": 0.0, "service_ms": med_ms(fetch_s),
         "how": "fetch_image() against the file server, in this process"},
    ]
    names = {"read": "read (disk) / decode (bytes) + validate", "preprocess": "preprocess",
             "infer": "infer (in-process / in model replica)", "postprocess": "postprocess (invert, cast, stats)"}
    for s in ("read", "preprocess", "infer", "postprocess"):
        comps.append({"component": names[s], "direct_ms": med_ms(direct_t[s]), "service_ms": med_ms(service_t[s]),
                      "how": "stage timers: segment() / the service's json timings_s"})
    comps += [
        {"component": "Gateway -> Model call (serialise, route, return)", "direct_ms": 0.0,
         "service_ms": med_ms(handle_extra), "how": "handle.infer.remote() round trip minus its infer_s, from here"},
        {"component": "per-request setup (2x config_for, 2x VolumeStages)", "direct_ms": 0.0,
         "service_ms": med_ms(setup_s), "how": "timed in this process"},
        {"component": "encode nifti (uint16, gzip 1)", "direct_ms": 0.0, "service_ms": med_ms(encode_s),
         "how": "nifti_gz(mask_image()) in this process"},
    ]
    for c in comps:
        c["extra_ms"] = c["service_ms"] - c["direct_ms"]
    measured = sum(c["extra_ms"] for c in comps)
    diff = h1["p50_ms"] - d1["p50_ms"]
    return {"samples": k, "components": comps, "measured_extra_ms": measured, "p50_difference_ms": diff,
            "unattributed_ms": diff - measured, "json_route_p50_ms": med_ms(json_wall),
            "json_route_samples_ms": [round(v * 1000, 2) for v in json_wall],
            "model_grid": list(prepared.prepared.image.shape[1:]), "prepared_mb": prepared_mb,
            "labels_mb": labels_nbytes / MB, "response_kb": response_bytes / 1024}


if __name__ == "__main__":
    main()
