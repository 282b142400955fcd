"""Command line of the batch job (``jobs/batch_segment.py`` and ``nvseg batch``).

    python jobs/batch_segment.py --input s3://bkt/ct/ --output s3://bkt/masks/ \\
        --modality CT_BODY --checkpoint s3://bkt/models/model.pt
    ray job submit --working-dir . -- python jobs/batch_segment.py ...       # on a running cluster

Starts a local Ray when none is reachable (``RAY_ADDRESS`` / ``--ray-address`` select a cluster). Exit
status: 0 when no more than ``--max-failures`` volumes failed, 3 otherwise; 2 bad options; 4 checkpoint;
5 storage; 1 internal error. The run manifest (Parquet) and summary (JSON) land in
``<output>/_nvseg_runs/<run>/``, with the statistics table (``structures.parquet``) and the browsable run report
(``report.html``; rebuild it with ``nvseg report RUN_DIR``).
"""

from __future__ import annotations

import argparse
import os

from ..boundary import guarded
from ..commands.options import add_inference_arguments, inference_overrides
from .config import BatchConfig

#: the prefix of the job's messages (``nvseg batch`` says ``nvseg batch``, see :mod:`nvseg_ray.commands.batch`).
JOB_PROG = "batch_segment"

_BATCH_FLAGS = ("input", "output", "run_dir", "recursive", "preprocess_cpus", "postprocess_cpus", "stage_memory_gb", "model_cpus", "model_gpus",
                "min_actors", "max_actors", "model_node_resource", "cpu_node_resource", "max_in_flight", "max_attempts",
                "max_failures", "actors_per_gpu", "progress_interval_s", "progress_bars", "wait_for_resources", "run_name",
                "ray_address", "run_report", "cost_per_node_hour")


def add_batch_arguments(p: argparse.ArgumentParser) -> None:
    """Every option of the batch job: the one argument builder of ``nvseg batch`` and ``jobs/batch_segment.py``.

    ``--debug`` leaves the namespace untouched when absent (``argparse.SUPPRESS``), so ``nvseg --debug batch``
    keeps the top-level flag; read it as ``getattr(args, "debug", False)``.
    """
    p.add_argument("--input", "-i", help="folder/prefix (recursive), glob, file, or manifest .csv/.jsonl/.parquet; "
                   "a DICOM folder / prefix / .zip, or a DICOMweb study, series or QIDO query URL (one row per series)")
    p.add_argument("--output", "-o", help="output folder/prefix (mirrors the input's relative folders); a DICOMweb "
                   "root (dicomweb+https://host/dicom-web) stores each SEG into its study (then give --run-dir)")
    p.add_argument("--run-dir", help="manifests and reports when --output is a DICOMweb server")
    p.add_argument("--config", help="YAML with BatchConfig fields and an 'inference:' mapping (flags override)")
    p.add_argument("--no-recursive", dest="recursive", action="store_const", const=False,
                   help="only volumes directly in --input")
    add_inference_arguments(p)
    g = p.add_argument_group("resources and scheduling")
    g.add_argument("--preprocess-cpus", type=float, help="CPUs per read/preprocess task (default 1)")
    g.add_argument("--postprocess-cpus", type=float, help="CPUs per invert/encode/write task (default 1)")
    g.add_argument("--stage-memory-gb", type=float, help="memory reserved per CPU-stage task (default 2)")
    g.add_argument("--model-cpus", type=float, help="CPUs per model actor (default 1)")
    g.add_argument("--model-gpus", type=float, help="GPUs per model actor (default: 1 if the cluster has GPUs)")
    g.add_argument("--actors-per-gpu", type=int, choices=[1, 2],
                   help="model actors sharing a GPU when --model-gpus is not given (default 1; 2 overlaps host work "
                   "and compute; raise --max-actors to match)")
    g.add_argument("--min-actors", type=int, help="model actors started up front (default 1)")
    g.add_argument("--max-actors", type=int, help="model actor pool ceiling (default 1)")
    g.add_argument("--model-node-resource", help="custom resource naming model nodes, e.g. nvseg_model_node")
    g.add_argument("--cpu-node-resource", help="custom resource naming preprocessing nodes")
    g.add_argument("--max-in-flight", type=int,
                   help="most volumes between read and written mask; bounds memory (default 3 per actor + CPU-stage slots)")
    g.add_argument("--max-attempts", type=int, help="model attempts per volume when actors die (default 3)")
    g.add_argument("--max-failures", type=int, help="failed volumes tolerated with exit 0 (default 0; -1 any)")
    g.add_argument("--progress-interval-s", type=float, help="seconds between status lines (default 10)")
    g.add_argument("--no-progress-bars", dest="progress_bars", action="store_const", const=False,
                   help="leave the per-stage counts out of the status lines")
    g.add_argument("--wait-for-resources", action=argparse.BooleanOptionalAction, default=None,
                   help="let requests no node can satisfy (--model-gpus, --stage-memory-gb, ...) wait for an "
                        "autoscaler instead of failing at once with exit 2 (default: wait only under KubeRay)")
    g.add_argument("--run-name", help="manifest folder name under <output>/_nvseg_runs/")
    g.add_argument("--no-run-report", dest="run_report", action="store_const", const=False,
                   help="do not write <output>/_nvseg_runs/<run>/report.html")
    g.add_argument("--cost-per-node-hour", type=float,
                   help="price of a node-hour: the summary and the run report show the cost per volume")
    g.add_argument("--ray-address", help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    g.add_argument("--s3-endpoint", help="S3-compatible endpoint URL (sets AWS_ENDPOINT_URL for all workers)")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show tracebacks for internal errors")


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``jobs/batch_segment.py`` (``nvseg batch`` registers the same options as a sub-command)."""
    p = argparse.ArgumentParser(prog="jobs/batch_segment.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_batch_arguments(p)
    return p


def config_from_args(args: argparse.Namespace) -> BatchConfig:
    overrides = {name: getattr(args, name, None) for name in _BATCH_FLAGS}
    return BatchConfig.from_sources(args.config, inference=inference_overrides(args), **overrides)


def run(args: argparse.Namespace) -> int:
    """Run the batch job from parsed options; the exit status of :func:`nvseg_ray.batch.run_batch` (0 or 3).

    Ray is imported only here, when a run starts (``nvseg --help`` stays fast and Ray-free).
    """
    from . import run_batch

    if getattr(args, "s3_endpoint", None):
        os.environ["AWS_ENDPOINT_URL"] = args.s3_endpoint
    return run_batch(config_from_args(args)).exit_code


def main(argv: list[str] | None = None) -> int:
    """``jobs/batch_segment.py``: parse, run behind the error boundary, return the exit status."""
    args = build_parser().parse_args(argv)
    return guarded(JOB_PROG, lambda: run(args), debug=getattr(args, "debug", False))
