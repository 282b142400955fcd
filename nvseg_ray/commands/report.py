"""``nvseg report RUN_DIR``: rebuild a batch run's browsable ``report.html`` from its manifest and summary.

Usage::

    nvseg report <output>/_nvseg_runs/<run> [--cost-per-node-hour X]

RUN_DIR may be a local path or an fsspec URI (``s3://...``, the driver's usual credentials). The written URI is
printed; a missing run folder or manifest is a storage error (exit 5).
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from ..errors import ConfigError


def register(subparsers: Any) -> None:
    """Add the ``report`` command to a subparsers object."""
    parser = subparsers.add_parser(
        "report",
        help="rebuild a batch run's report.html (summary, per-volume table, QC flags, previews)",
        description="Rebuild RUN_DIR/report.html, a self-contained static page (no server, works offline or from "
                    "a bucket), from the run's manifest.parquet and summary.json.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run folder <output>/_nvseg_runs/<run> (path or URI)")
    parser.add_argument("--cost-per-node-hour", type=float, default=None, metavar="X",
                        help="price of one Ray node-hour: adds the cost per volume (wins over the summary's value)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Execute ``nvseg report``; returns the exit status (errors are raised as NvsegError)."""
    from ..batch.run_report import write_run_report

    rate = args.cost_per_node_hour
    if rate is not None and (not math.isfinite(rate) or rate < 0):
        raise ConfigError(f"--cost-per-node-hour must be a finite number >= 0, got {rate}",
                          hint="give the price of one node-hour, e.g. --cost-per-node-hour 3.06")
    print(write_run_report(args.run_dir, cost_per_node_hour=rate))
    return 0
