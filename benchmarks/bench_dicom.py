#!/usr/bin/env python
"""DICOM in and out, side by side in one run:

1. **discover** -- seconds (and requests, bytes downloaded) to find the series of ``--discover-instances``
   instances under an ``s3://`` prefix of a moto S3 server started here on 127.0.0.1:
   :func:`nvseg_ray.dicom.discovery.discover_series` (one ranged request per object for its head, headers only)
   against a naive reader that downloads every object whole and parses it with ``pydicom.dcmread``.
2. **assemble** -- seconds and peak memory to turn a ``--shape`` (default 512 x 512 x 300) CT series in a local
   folder into a volume: ours (``discover_series`` + :func:`nvseg_ray.dicom.assembly.load_series`, in a
   subprocess so its peak RSS is its own) against the ``dcm2niix`` binary converting the same folder (wall time of
   the whole process, nothing excluded), and whether both volumes agree after ``nibabel.as_closest_canonical``.
3. **seg** -- seconds and bytes to write the DICOM SEG of a synthetic ``--seg-classes``-label map (default the
   117 CT_BODY classes) on that grid: :func:`nvseg_ray.dicom.seg.build_seg` + ``encode_seg`` as LABELMAP (RLE)
   and as BINARY.

Every size is a flag (``--help``); ``--parts`` picks the parts. See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks._common import floats_arg, ints_arg, log, work_folder, write_report  # noqa: E402

import numpy as np  # noqa: E402

FORMAT = "nvseg-bench-dicom/1"
PARTS = ("discover", "assemble", "seg")
S3_KEY = S3_SECRET = "testing"
S3_REGION = "us-east-1"
BUCKET = "nvseg-bench-dicom"
PREFIX = "archive"
#: Objects per ``fs.cat`` call of the naive reader (bounds its memory to ~this many whole instances).
NAIVE_CHUNK = 256
#: Upload threads for the generated instances (setup, untimed).
UPLOAD_THREADS = 8
#: The label map is drawn on a grid this many times coarser per axis, then repeated (nearest) to full size.
LABEL_COARSE = 4
SEG_SEED = "bench-dicom"
MB = 1e6
#: Path on the moto server where :class:`_Traffic` answers its counts (never forwarded to moto).
CONTROL_PATH = "/__nvseg_bench_traffic__"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"comma-separated subset of {','.join(PARTS)} (default: all)")
    g = p.add_argument_group("1. discover on S3")
    g.add_argument("--discover-instances", type=int, default=2000, help="instances under the prefix (default 2000)")
    g.add_argument("--discover-series", type=int, default=10,
                   help="split the instances into this many series of one study (default 10)")
    g.add_argument("--discover-matrix", type=int, default=512,
                   help="rows = columns of each instance (default 512: a CT slice, ~0.5 MB per object)")
    g.add_argument("--s3-server", choices=("thread", "process"), default="thread",
                   help="run moto in a thread of this process (default; it competes with the client for the GIL) "
                   "or in a child process on its own")
    g = p.add_argument_group("2. assemble")
    g.add_argument("--shape", type=ints_arg, default=(512, 512, 300), help="X,Y,Z = columns,rows,slices")
    g.add_argument("--spacing", type=floats_arg, default=(0.78, 0.78, 1.25), help="column,row,slice mm")
    g.add_argument("--transfer-syntax", default="explicit",
                   help="transfer syntax of the series (explicit, implicit, deflated, jpeg2000, jpegls, rle)")
    g.add_argument("--dcm2niix", help="the dcm2niix binary (default: next to this Python, else on PATH)")
    g.add_argument("--dcm2niix-compress", default="n", choices=("n", "y"),
                   help="dcm2niix -z: n = .nii (default), y = .nii.gz; ours writes the same kind of file")
    g = p.add_argument_group("3. SEG")
    g.add_argument("--seg-classes", type=int, default=117,
                   help="classes in the label map (the first N CT_BODY classes; default 117 = all)")
    g.add_argument("--seg-slices", type=int,
                   help="slices of the SEG's grid (default: --shape's Z, the assembled series itself; fewer "
                   "writes a second series of that many slices)")
    g.add_argument("--seg-types", default="labelmap,binary", help="comma-separated SEG types (default both)")
    p.add_argument("--repeat", type=int, default=1,
                   help="rounds of parts 1 and 2, alternating the sides; best time (and worst memory) reported")
    p.add_argument("--workdir", help="keep the generated series and outputs here")
    p.add_argument("--json", help="write every number here")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    args.parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        p.error(f"unknown part(s) {','.join(unknown)}; choose from {','.join(PARTS)}")
    args.seg_types = [s.strip() for s in args.seg_types.split(",") if s.strip()]
    if len(args.shape) != 3 or len(args.spacing) != 3:
        p.error("--shape and --spacing take three values")
    if args.discover_series < 1 or args.discover_instances < 2 * args.discover_series:
        p.error("--discover-instances must be at least 2 per series")
    return args


# --------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    from importlib import metadata

    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpu_count": os.cpu_count()}
    with contextlib.suppress(Exception):
        info["mem_total_gb"] = round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 1024**3, 1)
    for dist in ("pydicom", "highdicom", "nibabel", "moto", "s3fs", "pylibjpeg-openjpeg", "nvseg-ray"):
        try:
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info[dist] = None
    return info


def _ratio(slow: float | None, fast: float | None) -> float | None:
    if slow is None or fast is None or fast <= 0:
        return None
    return round(slow / fast, 2)


def _fmt_ratio(r: float | None) -> str:
    return "n/a" if r is None else f"{r:.2f}x"


def _dir_bytes(paths: Iterable[Path]) -> int:
    return sum(p.stat().st_size for p in paths)


def _flat_volume(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """A cheap (X, Y, Z) int16 CT-like volume (HU): a body disc with a gradient, no noise. Only for discovery,
    which never looks at pixels; keeps generating 2,000 full-size instances fast."""
    nx, ny, nz = shape
    u = (np.arange(nx) - (nx - 1) / 2)[:, None] / (0.42 * nx)
    v = (np.arange(ny) - (ny - 1) / 2)[None, :] / (0.30 * ny)
    plane = np.where(u**2 + v**2 < 1, 40 + seed + (20 * u).astype(np.int16), -1000).astype(np.int16)
    return np.broadcast_to(plane[:, :, None], (nx, ny, nz))


def find_dcm2niix(explicit: str | None) -> str | None:
    if explicit:
        return explicit
    beside = Path(sys.executable).parent / "dcm2niix"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("dcm2niix")


# --------------------------------------------------------------------------------------------------------
# 1. discovery on S3
# --------------------------------------------------------------------------------------------------------


class _Traffic:
    """WSGI middleware around the moto app: counts requests and response-body bytes (what clients download)."""

    def __init__(self, app: Callable[..., Any]) -> None:
        self.app = app
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.requests: dict[str, int] = defaultdict(int)
            self.bytes_out = 0

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {"requests": dict(self.requests), "n_requests": sum(self.requests.values()),
                    "bytes_downloaded": self.bytes_out}

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == CONTROL_PATH:  # --s3-server process: the parent reads / resets the counts
            if environ.get("QUERY_STRING") == "reset":
                self.reset()
            body = json.dumps(self.snapshot()).encode()
            start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        with self.lock:
            self.requests[environ.get("REQUEST_METHOD", "?")] += 1
        return _CountingBody(self, self.app(environ, start_response))


class _CountingBody:
    def __init__(self, traffic: _Traffic, body: Iterable[bytes]) -> None:
        self.traffic, self.body = traffic, body

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.body:
            with self.traffic.lock:
                self.traffic.bytes_out += len(chunk)
            yield chunk

    def close(self) -> None:
        close = getattr(self.body, "close", None)
        if close is not None:
            close()


class _RemoteTraffic:
    """The :class:`_Traffic` counts of a moto server in a child process, read over its control path."""

    def __init__(self, endpoint: str) -> None:
        import urllib.request

        self.url = endpoint + CONTROL_PATH
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def _get(self, query: str = "") -> dict[str, Any]:
        with self.opener.open(self.url + query, timeout=30) as resp:
            return json.loads(resp.read())

    def reset(self) -> None:
        self._get("?reset")

    def snapshot(self) -> dict[str, Any]:
        return self._get()


#: Child process of ``--s3-server process``: serve, print the endpoint, stop when stdin closes.
_MOTO_CHILD = r"""
import sys
from benchmarks.bench_dicom import moto_s3
with moto_s3() as (endpoint, _):
    print(endpoint, flush=True)
    sys.stdin.read()
"""


@contextlib.contextmanager
def s3_server(mode: str) -> Iterator[tuple[str, Any]]:
    """``(endpoint, traffic counter)`` of a moto S3 server: in a thread of this process (``"thread"``: it shares
    this process's GIL with the client) or in a child process of its own (``"process"``)."""
    if mode == "thread":
        with moto_s3() as served:
            yield served
        return
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.Popen([sys.executable, "-c", _MOTO_CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env, cwd=REPO_ROOT)
    try:
        endpoint = proc.stdout.readline().strip() if proc.stdout else ""
        if not endpoint.startswith("http://"):
            raise SystemExit("the moto S3 server process did not start")
        yield endpoint, _RemoteTraffic(endpoint)
    finally:
        if proc.stdin:
            proc.stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def moto_s3() -> Iterator[tuple[str, _Traffic]]:
    """A moto S3 server on 127.0.0.1 (free port) with a traffic counter; stopped on exit."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        traffic = _Traffic(server._server.app)  # the werkzeug server's WSGI app
        server._server.app = traffic
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}", traffic
    finally:
        server.stop()


def s3_options(endpoint: str) -> dict[str, Any]:
    """s3fs options for the moto server; a fresh filesystem object (no instance or listing cache) per call, so
    every timed round starts cold."""
    return {"key": S3_KEY, "secret": S3_SECRET, "endpoint_url": endpoint,
            "client_kwargs": {"region_name": S3_REGION}, "skip_instance_cache": True, "use_listings_cache": False}


def write_archive(args: argparse.Namespace, folder: Path) -> list[Path]:
    """``--discover-instances`` single-frame CT instances of ``--discover-matrix``^2, in ``--discover-series``
    series of one study, under ``folder``."""
    from nvseg_ray.dicom.synthetic import uid, write_series

    n, k = args.discover_instances, args.discover_series
    shutil.rmtree(folder, ignore_errors=True)  # a kept --workdir may hold an earlier run's archive
    sizes = [n // k + (1 if s < n % k else 0) for s in range(k)]
    study = uid("bench-dicom", "study")
    paths: list[Path] = []
    for s, nz in enumerate(sizes):
        m = args.discover_matrix
        fx = write_series(folder / f"series{s:03d}", _flat_volume((m, m, nz), s), spacing=(0.7, 0.7, 1.0),
                          study_uid=study, seed=1000 + s, series_number=s + 1)
        paths.extend(fx.paths)
    return paths


def upload(endpoint: str, folder: Path, paths: list[Path]) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=S3_KEY, aws_secret_access_key=S3_SECRET,
                          region_name=S3_REGION)
    client.create_bucket(Bucket=BUCKET)

    def put(path: Path) -> None:
        client.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{path.relative_to(folder).as_posix()}",
                          Body=path.read_bytes())

    with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
        list(pool.map(put, paths))


def warm_up(uri: str, options: dict[str, Any]) -> None:
    """Untimed: import both sides' modules and make one S3 call (botocore loads its service models once per
    process; whichever side ran first would pay for it)."""
    import pydicom  # noqa: F401

    import nvseg_ray.dicom.dicomweb  # noqa: F401
    import nvseg_ray.dicom.discovery  # noqa: F401
    from nvseg_ray.io import split_uri

    fs, _ = split_uri(uri, options)
    fs.ls(BUCKET)


def discover_ours(uri: str, options: dict[str, Any]) -> dict[str, int]:
    """``discover_series``: {series UID: instances}."""
    from nvseg_ray.dicom.discovery import discover_series

    found = discover_series(uri, options)
    counts: dict[str, int] = defaultdict(int)
    for s in found.series:
        counts[s.series_instance_uid] += len(s.instances)
    return dict(counts)


def discover_naive(uri: str, options: dict[str, Any]) -> dict[str, int]:
    """List the prefix, download every object whole, ``pydicom.dcmread`` each and group by SeriesInstanceUID:
    {series UID: instances}. Downloads go through the same concurrent fsspec call discovery uses
    (``cat_ranges``, here with open ends: one GET per object), in chunks of :data:`NAIVE_CHUNK` objects
    (``fs.cat`` of a list would add a HEAD per object)."""
    import pydicom

    from nvseg_ray.io import split_uri

    fs, root = split_uri(uri, options)
    paths = sorted(fs.find(root))
    counts: dict[str, int] = defaultdict(int)
    for start in range(0, len(paths), NAIVE_CHUNK):
        chunk = paths[start:start + NAIVE_CHUNK]
        blobs = fs.cat_ranges(chunk, [0] * len(chunk), [None] * len(chunk))
        for path, blob in zip(chunk, blobs):
            if not isinstance(blob, (bytes, bytearray)):
                raise SystemExit(f"naive: could not read {path}: {blob!r}")
            ds = pydicom.dcmread(io.BytesIO(blob))
            counts[str(ds.SeriesInstanceUID)] += 1
    return dict(counts)


def bench_discover(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    folder = work / "s3-archive"
    t0 = time.perf_counter()
    paths = write_archive(args, folder)
    gen_s = time.perf_counter() - t0
    total_bytes = _dir_bytes(paths)
    log(args, f"[discover] wrote {len(paths)} instances ({total_bytes / MB:.1f} MB) in {gen_s:.1f} s")
    out: dict[str, Any] = {"instances": len(paths), "series": args.discover_series,
                           "matrix": [args.discover_matrix] * 2, "object_bytes_total": total_bytes,
                           "object_bytes_mean": round(total_bytes / len(paths)), "generate_s": round(gen_s, 2)}
    out["s3_server"] = args.s3_server
    with s3_server(args.s3_server) as (endpoint, traffic):
        t0 = time.perf_counter()
        upload(endpoint, folder, paths)
        out["upload_s"] = round(time.perf_counter() - t0, 2)
        log(args, f"[discover] uploaded to moto S3 in {out['upload_s']:.1f} s")
        uri = f"s3://{BUCKET}/{PREFIX}"
        warm_up(uri, s3_options(endpoint))
        sides = {"ours": discover_ours, "naive": discover_naive}
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in sides}
        counts: dict[str, dict[str, int]] = {}
        for r in range(max(1, args.repeat)):
            order = list(sides) if r % 2 == 0 else list(reversed(sides))
            for name in order:
                traffic.reset()
                t0 = time.perf_counter()
                counts[name] = sides[name](uri, s3_options(endpoint))
                seconds = time.perf_counter() - t0
                run = {"seconds": round(seconds, 3), **traffic.snapshot()}
                runs[name].append(run)
                log(args, f"[discover] round {r + 1} {name}: {seconds:.2f} s, {run['n_requests']} requests, "
                          f"{run['bytes_downloaded'] / MB:.1f} MB downloaded")
    expected = len(paths)
    for name, c in counts.items():
        if sum(c.values()) != expected or len(c) != args.discover_series:
            raise SystemExit(f"discover: {name} found {sum(c.values())} instances in {len(c)} series, "
                             f"expected {expected} in {args.discover_series}")
    out["agree"] = counts["ours"] == counts["naive"]
    for name, rs in runs.items():
        best = min(rs, key=lambda x: x["seconds"])
        out[name] = {**best, "runs": rs}
    out["ratio_seconds"] = _ratio(out["naive"]["seconds"], out["ours"]["seconds"])
    out["ratio_bytes"] = _ratio(out["naive"]["bytes_downloaded"], out["ours"]["bytes_downloaded"])
    return out


# --------------------------------------------------------------------------------------------------------
# 2. assembly: ours vs dcm2niix
# --------------------------------------------------------------------------------------------------------

#: Run in a subprocess (its own peak RSS): discover + load_series + save. argv: folder, output path.
_OURS_CODE = r"""
import json, re, sys, time
import nibabel as nib
import pydicom, pydicom.pixels  # imported before the baseline: part of the interpreter's cost, not the work's
from nvseg_ray.dicom.assembly import load_series
from nvseg_ray.dicom.discovery import discover_series
def hwm_kb():  # this process's own RSS high-water mark (VmHWM: per address space, unlike ru_maxrss)
    return int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1))
folder, out = sys.argv[1], sys.argv[2]
base = hwm_kb()
t0 = time.perf_counter()
found = discover_series(folder)
t1 = time.perf_counter()
(series,) = found.series
assembled = load_series(series)
t2 = time.perf_counter()
peak = hwm_kb()
nib.save(assembled.image, out)
t3 = time.perf_counter()
print(json.dumps({"discover_s": t1 - t0, "load_s": t2 - t1, "write_s": t3 - t2, "baseline_rss_kb": base,
                  "peak_rss_kb": peak, "peak_rss_with_write_kb": hwm_kb(),
                  "shape": list(assembled.image.shape), "dtype": str(assembled.image.get_data_dtype()),
                  "source_dtype": assembled.source_dtype, "instances": len(series.instances)}))
"""


#: Runs argv[2:] as its child and writes "<wall s> <child ru_maxrss kB> <exit code>" to argv[1]. Started with
#: ``python -S`` and importing nothing else, it is ~10 MB: Linux carries the RSS high-water mark of the memory a
#: process had before ``exec`` into its ``ru_maxrss``, so a command started straight from this (large) benchmark
#: process would report at least the benchmark's own peak; started from this small launcher it reports its own.
_LAUNCHER = r"""
import os, sys, time
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as fh:
    fh.write(f"{time.perf_counter() - t0} {usage.ru_maxrss} {os.waitstatus_to_exitcode(status)}")
"""


def _run_measured(cmd: list[str], work: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd``; ``{"wall_s", "peak_rss_mb" (that process's own), "stdout", "stderr", "returncode"}``."""
    result = work / "launcher.out"
    result.unlink(missing_ok=True)
    proc = subprocess.run([sys.executable, "-S", "-c", _LAUNCHER, str(result), *cmd], capture_output=True,
                          text=True, env=env, cwd=REPO_ROOT)
    if not result.exists():
        raise SystemExit(f"could not run {cmd[0]}: {proc.stderr[-2000:]}")
    wall, rss_kb, rc = result.read_text().split()
    return {"wall_s": float(wall), "peak_rss_mb": int(rss_kb) / 1024, "returncode": int(rc),
            "stdout": proc.stdout, "stderr": proc.stderr}


def write_ct_series(args: argparse.Namespace, folder: Path, shape: tuple[int, int, int]) -> Any:
    from nvseg_ray.dicom.synthetic import write_series

    shutil.rmtree(folder, ignore_errors=True)
    return write_series(folder, shape=shape, spacing=args.spacing, transfer_syntax=args.transfer_syntax, seed=7)


def compare_volumes(ours_path: Path, theirs_path: Path) -> dict[str, Any]:
    """Both NIfTI files after ``as_closest_canonical``: same shape, affines within 1e-3, voxels equal (float32)."""
    import nibabel as nib

    a = nib.as_closest_canonical(nib.load(str(ours_path)))
    b = nib.as_closest_canonical(nib.load(str(theirs_path)))
    out: dict[str, Any] = {"ours_shape": list(a.shape), "dcm2niix_shape": list(b.shape),
                           "dcm2niix_dtype": str(b.get_data_dtype())}
    if a.shape != b.shape:
        out.update(affine_max_diff=None, voxels_equal=False, max_abs_diff=None, ok=False)
        return out
    out["affine_max_diff"] = float(np.abs(a.affine - b.affine).max())
    va = np.asarray(a.get_fdata(dtype=np.float32))
    vb = np.asarray(b.get_fdata(dtype=np.float32))
    out["max_abs_diff"] = float(np.abs(va - vb).max())
    out["voxels_equal"] = bool(np.array_equal(va, vb))
    out["ok"] = bool(out["affine_max_diff"] <= 1e-3 and out["voxels_equal"])
    return out


def _ours_once(folder: Path, ours_path: Path, work: Path) -> dict[str, Any]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    run = _run_measured([sys.executable, "-c", _OURS_CODE, str(folder), str(ours_path)], work, env)
    if run["returncode"] != 0:
        raise SystemExit(f"assemble: our subprocess failed ({run['returncode']}):\n{run['stderr'][-4000:]}")
    r = json.loads(run["stdout"].strip().splitlines()[-1])
    return {"discover_s": round(r["discover_s"], 3), "load_s": round(r["load_s"], 3),
            "seconds": round(r["discover_s"] + r["load_s"], 3), "write_s": round(r["write_s"], 3),
            "seconds_with_write": round(r["discover_s"] + r["load_s"] + r["write_s"], 3),
            "process_wall_s": round(run["wall_s"], 3), "baseline_rss_mb": round(r["baseline_rss_kb"] / 1024, 1),
            "peak_rss_mb": round(r["peak_rss_kb"] / 1024, 1),
            "peak_rss_above_baseline_mb": round((r["peak_rss_kb"] - r["baseline_rss_kb"]) / 1024, 1),
            "peak_rss_with_write_mb": round(r["peak_rss_with_write_kb"] / 1024, 1),
            "process_peak_rss_mb": round(run["peak_rss_mb"], 1), "output_dtype": r["dtype"],
            "source_dtype": r["source_dtype"], "output_bytes": ours_path.stat().st_size}


def _dcm2niix_once(binary: str, compress: str, folder: Path, work: Path) -> dict[str, Any]:
    d_out = work / "dcm2niix"
    if d_out.exists():
        shutil.rmtree(d_out)
    d_out.mkdir()
    cmd = [binary, "-z", compress, "-f", "dcm2niix", "-o", str(d_out), str(folder)]
    run = _run_measured(cmd, work)
    nii = sorted(p for p in d_out.iterdir() if p.name.endswith((".nii", ".nii.gz")))
    return {"seconds": round(run["wall_s"], 3), "peak_rss_mb": round(run["peak_rss_mb"], 1),
            "returncode": run["returncode"], "command": " ".join(["dcm2niix", *cmd[1:-3], "-o", "OUT", "SERIES"]),
            "outputs": [str(p) for p in nii], "output_bytes": nii[0].stat().st_size if nii else None,
            "stderr": run["stderr"][-2000:], "stdout": run["stdout"][-2000:]}


def _best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest run, with the largest peak memory of all runs."""
    best = dict(min(runs, key=lambda r: r["seconds"]))
    for key in [k for k in best if "rss" in k and "baseline" not in k]:
        best[key] = max(r[key] for r in runs)
    best["all_seconds"] = [r["seconds"] for r in runs]
    return best


def bench_assemble(args: argparse.Namespace, work: Path, folder: Path) -> dict[str, Any]:
    ext = ".nii.gz" if args.dcm2niix_compress == "y" else ".nii"
    files = sorted(folder.glob("*.dcm"))
    out: dict[str, Any] = {"shape": list(args.shape), "spacing": list(args.spacing),
                           "transfer_syntax": args.transfer_syntax, "instances": len(files),
                           "series_bytes": _dir_bytes(files), "output": ext}
    true = shutil.which("true")
    if true:
        out["launcher_floor_rss_mb"] = round(_run_measured([true], work)["peak_rss_mb"], 1)
    binary = find_dcm2niix(args.dcm2niix)
    if binary is None:
        out["dcm2niix"] = None
        out["note"] = "dcm2niix not found (pip install dcm2niix): its side was skipped"
        log(args, "[assemble] " + out["note"])
    ours_path = work / f"ours{ext}"
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "dcm2niix": []}
    for r in range(max(1, args.repeat)):
        order = ["ours", "dcm2niix"] if r % 2 == 0 else ["dcm2niix", "ours"]
        for side in order:
            if side == "ours":
                o = _ours_once(folder, ours_path, work)
                log(args, f"[assemble] round {r + 1} ours: discover {o['discover_s']:.2f} s + load_series "
                          f"{o['load_s']:.2f} s, write {o['write_s']:.2f} s, peak RSS {o['peak_rss_mb']:.0f} MB")
            elif binary is not None:
                o = _dcm2niix_once(binary, args.dcm2niix_compress, folder, work)
                log(args, f"[assemble] round {r + 1} dcm2niix: {o['seconds']:.2f} s, peak RSS "
                          f"{o['peak_rss_mb']:.0f} MB, rc {o['returncode']}, {len(o['outputs'])} NIfTI file(s)")
            else:
                continue
            runs[side].append(o)
    out["ours"] = _best(runs["ours"])
    if binary is None:
        return out
    last = runs["dcm2niix"][-1]
    d = out["dcm2niix"] = _best(runs["dcm2niix"])
    version = subprocess.run([binary, "-v"], capture_output=True, text=True).stdout.strip().splitlines()
    d["version"] = version[-1] if version else None
    if last["returncode"] != 0 or len(last["outputs"]) != 1:
        out["agreement"] = {"ok": False, "error": f"dcm2niix rc {last['returncode']}, {len(last['outputs'])} "
                            "NIfTI files", "stderr": last["stderr"], "stdout": last["stdout"]}
        return out
    out["agreement"] = compare_volumes(ours_path, Path(last["outputs"][0]))
    o = out["ours"]
    out["ratio_seconds"] = _ratio(d["seconds"], o["seconds"])
    out["ratio_seconds_with_write"] = _ratio(d["seconds"], o["seconds_with_write"])
    out["ratio_peak_rss"] = _ratio(o["peak_rss_mb"], d["peak_rss_mb"])
    out["ratio_peak_rss_with_write"] = _ratio(o["peak_rss_with_write_mb"], d["peak_rss_mb"])
    return out


# --------------------------------------------------------------------------------------------------------
# 3. SEG
# --------------------------------------------------------------------------------------------------------


def synthetic_label_map(shape: tuple[int, int, int], class_ids: list[int], seed: int = 0) -> np.ndarray:
    """(X, Y, Z) uint16 global class ids: every class in ``class_ids`` present as one compact region.

    An elliptic-cylinder body (semi-axes 0.42 X and 0.30 Y) is cut into Voronoi cells around 2 x N random seeds
    (drawn on a grid :data:`LABEL_COARSE` times coarser, then repeated to full size); the first N cells get the
    classes, the others stay 0 (unlabelled tissue), and air around the body is 0. Roughly half the body is
    labelled; each class spans a few dozen slices, like organs in a CT_BODY mask.
    """
    from scipy.spatial import cKDTree

    f = LABEL_COARSE
    cs = tuple(max(1, math.ceil(n / f)) for n in shape)
    u = (np.arange(cs[0]) - (cs[0] - 1) / 2) / (0.42 * cs[0])
    v = (np.arange(cs[1]) - (cs[1] - 1) / 2) / (0.30 * cs[1])
    body2d = (u[:, None] ** 2 + v[None, :] ** 2) < 1
    rng = np.random.default_rng(seed)
    n = len(class_ids)
    inside = np.argwhere(np.broadcast_to(body2d[:, :, None], cs))
    seeds = inside[rng.choice(len(inside), size=min(len(inside), 2 * n), replace=False)].astype(np.float64)
    values = np.zeros(len(seeds), dtype=np.uint16)
    values[:n] = np.asarray(class_ids[:len(seeds)], dtype=np.uint16)
    _, nearest = cKDTree(seeds).query(inside.astype(np.float64), k=1)
    coarse = np.zeros(cs, dtype=np.uint16)
    coarse[tuple(inside.T)] = values[nearest]
    ix, iy, iz = (np.minimum(np.arange(n_full) // f, c - 1) for n_full, c in zip(shape, cs))
    return coarse[ix[:, None, None], iy[None, :, None], iz[None, None, :]]


def bench_seg(args: argparse.Namespace, work: Path, folder: Path) -> dict[str, Any]:
    from nvseg_ray import __version__
    from nvseg_ray.dicom.assembly import load_series
    from nvseg_ray.dicom.discovery import discover_series
    from nvseg_ray.dicom.seg import build_seg, encode_seg, transfer_syntax
    from nvseg_ray.labels import LabelCatalog

    import highdicom  # noqa: F401  -- imported untimed (~0.5 s), as in a long-running worker
    from pydicom.sr.codedict import codes  # noqa: F401
    from pydicom.uid import UID

    from nvseg_ray.labels.codes import segment_coding

    (series,) = discover_series(str(folder)).series
    assembled = load_series(series)
    grid = tuple(int(n) for n in assembled.image.shape[:3])
    catalog = LabelCatalog.default()
    ids = list(catalog.everything_ids("CT_BODY"))[:args.seg_classes]
    for cid in ids:
        segment_coding(catalog, cid)  # the code tables load once per process
    t0 = time.perf_counter()
    labels = synthetic_label_map(grid, ids)  # type: ignore[arg-type]
    present = np.unique(labels)
    log(args, f"[seg] label map {grid}, {len(present) - (present[0] == 0)} classes, "
              f"{np.count_nonzero(labels) / labels.size:.0%} labelled ({time.perf_counter() - t0:.1f} s)")
    out: dict[str, Any] = {"grid": list(grid), "classes": int(np.count_nonzero(present)),
                           "labelled_fraction": round(float(np.count_nonzero(labels) / labels.size), 3),
                           "types": {}}
    # untimed warm-up per type: a one-voxel mask (first-call costs: lazy imports in highdicom, the encoders)
    one = np.zeros(grid, dtype=np.uint16)
    one[grid[0] // 2, grid[1] // 2, grid[2] // 2] = ids[0]
    for seg_type in args.seg_types:
        encode_seg(build_seg(one, assembled, catalog=catalog, seg_type=seg_type, seed=SEG_SEED, model_sha256=None,
                             algorithm_version=__version__))
    del one
    for seg_type in args.seg_types:
        t0 = time.perf_counter()
        ds = build_seg(labels, assembled, catalog=catalog, seg_type=seg_type, seed=SEG_SEED, model_sha256=None,
                       algorithm_version=__version__)
        t1 = time.perf_counter()
        raw = encode_seg(ds)
        t2 = time.perf_counter()
        (work / f"seg-{seg_type}.dcm").write_bytes(raw)
        frames = int(getattr(ds, "NumberOfFrames", 0) or 0)
        out["types"][seg_type] = {"build_s": round(t1 - t0, 3), "encode_s": round(t2 - t1, 3),
                                  "seconds": round(t2 - t0, 3), "bytes": len(raw), "frames": frames,
                                  "segments": len(ds.SegmentSequence),
                                  "transfer_syntax": UID(transfer_syntax(seg_type, grid[1::-1])).name}
        log(args, f"[seg] {seg_type}: build {t1 - t0:.2f} s + encode {t2 - t1:.2f} s, {len(raw) / MB:.2f} MB, "
                  f"{frames} frames")
        del ds, raw
    types = out["types"]
    if "binary" in types and "labelmap" in types:
        out["ratio_seconds"] = _ratio(types["binary"]["seconds"], types["labelmap"]["seconds"])
        out["ratio_bytes"] = _ratio(types["binary"]["bytes"], types["labelmap"]["bytes"])
    return out


# --------------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------------


def render(report: dict[str, Any]) -> str:
    lines = [f"DICOM benchmark ({report['machine']['cpu_count']} CPUs, load average "
             f"{report['machine']['loadavg_start_1min']} -> {report['machine']['loadavg_end'][0]})"]
    d = report.get("discover")
    if d:
        lines += ["", f"1. discover {d['instances']} instances in {d['series']} series on moto S3 "
                      f"(server in a {d['s3_server']}; "
                      f"{d['matrix'][0]}x{d['matrix'][1]}, {d['object_bytes_mean'] / 1000:.0f} kB each, "
                      f"{d['object_bytes_total'] / MB:.0f} MB in all)",
                  f"   {'side':<46}  {'s':>7}  {'requests':>8}  {'MB down':>8}"]
        for name, what in (("ours", "ours: discover_series (ranged head reads)"),
                           ("naive", "naive: download whole + pydicom.dcmread")):
            r = d[name]
            lines.append(f"   {what:<46}  {r['seconds']:>7.2f}  {r['n_requests']:>8}  "
                         f"{r['bytes_downloaded'] / MB:>8.1f}")
        lines.append(f"   ratio naive/ours: {_fmt_ratio(d['ratio_seconds'])} time, {_fmt_ratio(d['ratio_bytes'])} "
                     f"bytes; same series and instance counts: {'yes' if d['agree'] else 'NO'}")
        gbit = {side: d[side]["bytes_downloaded"] * 8 / 1e9 for side in ("ours", "naive")}
        lines.append(f"   (computed, not measured: the bytes alone take ours {gbit['ours']:.1f} s, naive "
                     f"{gbit['naive']:.1f} s over a 1 Gbit/s link; loopback has no such limit)")
    a = report.get("assemble")
    if a:
        o = a["ours"]
        lines += ["", f"2. assemble {'x'.join(map(str, a['shape']))} ({a['instances']} instances, "
                      f"{a['transfer_syntax']}, {a['series_bytes'] / MB:.0f} MB)",
                  f"   {'side':<46}  {'s':>7}  {'peak RSS MB':>11}",
                  f"   {'ours: discover_series + load_series':<46}  {o['seconds']:>7.2f}  {o['peak_rss_mb']:>11.0f}"
                  f"   (discover {o['discover_s']:.2f} + load {o['load_s']:.2f}; +{o['peak_rss_above_baseline_mb']:.0f}"
                  f" MB above the interpreter's {o['baseline_rss_mb']:.0f})",
                  f"   {'ours + writing float32 ' + a['output']:<46}  {o['seconds_with_write']:>7.2f}  "
                  f"{o['peak_rss_with_write_mb']:>11.0f}"]
        t = a.get("dcm2niix")
        if t:
            lines.append(f"   {t['command']:<46}  {t['seconds']:>7.2f}  {t['peak_rss_mb']:>11.0f}")
            lines.append(f"   ratio dcm2niix/ours: {_fmt_ratio(a.get('ratio_seconds'))} time "
                         f"({_fmt_ratio(a.get('ratio_seconds_with_write'))} counting our write); peak RSS ours/"
                         f"dcm2niix {_fmt_ratio(a.get('ratio_peak_rss'))}")
            g = a.get("agreement", {})
            if "error" in g:
                lines.append(f"   agreement: FAIL ({g['error']})")
            else:
                lines.append(f"   agreement after as_closest_canonical: {'PASS' if g['ok'] else 'FAIL'} (shape "
                             f"{g['ours_shape']} vs {g['dcm2niix_shape']}, affine max diff "
                             f"{g['affine_max_diff']:.2g} mm, voxels equal: {g['voxels_equal']}, max |diff| "
                             f"{g['max_abs_diff']:.3g}; dcm2niix stores {g['dcm2niix_dtype']})")
        else:
            lines.append(f"   {a.get('note', 'dcm2niix skipped')}")
    s = report.get("seg")
    if s:
        lines += ["", f"3. SEG of {s['classes']} classes on {'x'.join(map(str, s['grid']))} "
                      f"({s['labelled_fraction']:.0%} of voxels labelled)",
                  f"   {'type':<10}  {'build s':>7}  {'encode s':>8}  {'total s':>7}  {'MB':>7}  {'frames':>6}  "
                  f"transfer syntax"]
        for name, r in s["types"].items():
            lines.append(f"   {name:<10}  {r['build_s']:>7.2f}  {r['encode_s']:>8.2f}  {r['seconds']:>7.2f}  "
                         f"{r['bytes'] / MB:>7.2f}  {r['frames']:>6}  {r['transfer_syntax']}")
        if "ratio_seconds" in s:
            lines.append(f"   ratio binary/labelmap: {_fmt_ratio(s['ratio_seconds'])} time, "
                         f"{_fmt_ratio(s['ratio_bytes'])} bytes")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_start = os.getloadavg()[0]
    report: dict[str, Any] = {"format": FORMAT, "settings": {k: v for k, v in vars(args).items()}}
    ok = True
    with work_folder(args.workdir, "nvseg-bench-dicom-") as work:
        if "discover" in args.parts:
            report["discover"] = bench_discover(args, work)
        folder = work / "series"
        seg_z = args.seg_slices or args.shape[2]
        if "assemble" in args.parts or ("seg" in args.parts and seg_z == args.shape[2]):
            t0 = time.perf_counter()
            write_ct_series(args, folder, tuple(args.shape))
            log(args, f"[assemble] wrote a {'x'.join(map(str, args.shape))} series in {time.perf_counter() - t0:.1f} s")
        if "assemble" in args.parts:
            report["assemble"] = bench_assemble(args, work, folder)
            ok = ok and bool(report["assemble"].get("agreement", {"ok": True}).get("ok"))
        if "seg" in args.parts:
            seg_folder = folder
            if seg_z != args.shape[2]:
                seg_folder = work / "seg-series"
                write_ct_series(args, seg_folder, (args.shape[0], args.shape[1], seg_z))
            report["seg"] = bench_seg(args, work, seg_folder)
    machine = machine_info()
    machine["loadavg_start_1min"] = round(load_start, 2)
    machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    report["machine"] = machine
    if report.get("discover"):
        ok = ok and report["discover"]["agree"]
    print(render(report))
    write_report(report, args.json)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
