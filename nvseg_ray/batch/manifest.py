"""Run manifest (Parquet, one row per input) and summary (JSON + a printed table)."""

from __future__ import annotations

import io as _io
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ..io import join_uri, write_bytes_atomic, write_json
from ..redaction import redact_text, redact_uri
from .rows import MANIFEST_COLUMNS, STATUS_FAILED, STATUS_OK, STATUS_SKIPPED, TIMING_COLUMNS

#: folder under the output prefix holding one sub-folder per run.
RUNS_DIR = "_nvseg_runs"
#: the run's manifest (Parquet, one row per input) and summary (JSON) inside its folder.
MANIFEST_NAME = "manifest.parquet"
SUMMARY_NAME = "summary.json"
#: the run's statistics table: one row per volume segmented in the run and structure (pandas / DuckDB ready).
STRUCTURES_NAME = "structures.parquet"


@dataclass
class Progress:
    """Counts and throughput for the periodic one-line status."""

    total: int
    started: float = field(default_factory=time.monotonic)
    counts: Counter = field(default_factory=Counter)
    processed: int = 0  # ok + failed among rows that went through the pipeline

    def add(self, row: dict[str, Any], *, planned: bool = False) -> None:
        self.counts[row["status"]] += 1
        if not planned:
            self.processed += 1

    @property
    def done(self) -> int:
        return sum(self.counts.values())

    def line(self) -> str:
        elapsed = time.monotonic() - self.started
        rate = self.processed / elapsed if elapsed > 0 else 0.0
        remaining = self.total - self.done
        eta = f"{remaining / rate:.0f}s" if rate > 0 and remaining else ("0s" if not remaining else "?")
        return (f"[nvseg] {self.done}/{self.total} done (ok {self.counts[STATUS_OK]}, skipped "
                f"{self.counts[STATUS_SKIPPED]}, failed {self.counts[STATUS_FAILED]}) | {rate:.2f} vol/s | "
                f"elapsed {elapsed:.0f}s | ETA {eta}")


def manifest_frame(rows: list[dict[str, Any]]):
    """A pandas DataFrame with exactly :data:`MANIFEST_COLUMNS`, sorted by input URI.

    URIs and error messages are redacted (:mod:`nvseg_ray.redaction`: user-info and signed query strings
    become ``***``), as everything printed from the frame (the summary table) then is.
    """
    import pandas as pd

    frame = pd.DataFrame([_redacted({c: r.get(c) for c in MANIFEST_COLUMNS}) for r in rows],
                         columns=list(MANIFEST_COLUMNS))
    frame["t_total"] = frame[list(TIMING_COLUMNS)].sum(axis=1)
    return frame.sort_values("uri", kind="stable").reset_index(drop=True)


def _redacted(row: dict[str, Any]) -> dict[str, Any]:
    for column in ("uri", "output_uri"):
        row[column] = redact_uri(row[column] or "")
    row["error_message"] = redact_text(row["error_message"] or "")
    return row


def summarize(frame, *, wall_s: float, run_name: str, manifest_uri: str, n_actors: int, nodes: int = 1,
              cost_per_node_hour: float | None = None) -> dict[str, Any]:
    """Counts, throughput, per-stage totals, QC flag counts and (with ``cost_per_node_hour``) the cost of a run.

    The cost is the run's node-hours (``wall_s`` x ``nodes``, the Ray nodes that ran a stage) at the given price,
    per volume segmented."""
    counts = frame["status"].value_counts().to_dict()
    processed = frame[frame["status"] == STATUS_OK]
    infer_s = float(processed["t_infer"].sum())
    flags = Counter(code for codes in processed["qc_flags"] for code in str(codes or "").split(",") if code)
    cost = None if cost_per_node_hour is None else round(wall_s / 3600 * nodes * cost_per_node_hour, 6)
    return {
        "run": run_name,
        "manifest": redact_uri(manifest_uri),
        "total": int(len(frame)),
        "ok": int(counts.get(STATUS_OK, 0)),
        "skipped": int(counts.get(STATUS_SKIPPED, 0)),
        "failed": int(counts.get(STATUS_FAILED, 0)),
        "wall_s": round(wall_s, 3),
        "volumes_per_s": round(len(processed) / wall_s, 4) if wall_s > 0 else 0.0,
        "stage_seconds": {c: round(float(processed[c].sum()), 3) for c in TIMING_COLUMNS},
        "model_busy_fraction": round(infer_s / (wall_s * max(n_actors, 1)), 4) if wall_s > 0 else 0.0,
        "errors": frame.loc[frame["status"] == STATUS_FAILED, "error_code"].value_counts().to_dict(),
        "qc_flags": dict(sorted(flags.items())),
        "flagged": int(sum(bool(codes) for codes in processed["qc_flags"])),
        "nodes": int(nodes),
        "cost_per_node_hour": cost_per_node_hour,
        "cost": cost,
        "cost_per_volume": round(cost / len(processed), 6) if cost is not None and len(processed) else None,
    }


def run_uris(output: str, run_name: str) -> tuple[str, str]:
    """``(<output>/_nvseg_runs/<run>/manifest.parquet, .../summary.json)``."""
    base = run_folder(output, run_name)
    return join_uri(base, MANIFEST_NAME), join_uri(base, SUMMARY_NAME)


def run_folder(output: str, run_name: str) -> str:
    """``<output>/_nvseg_runs/<run>``: the run's manifest, summary, statistics table and report."""
    return join_uri(output, RUNS_DIR, run_name)


def write_structures_table(rows: list[dict[str, Any]], output: str, run_name: str,
                           storage_options: dict | None = None) -> str:
    """Write the run's statistics table (:data:`STRUCTURES_NAME`, one row per volume and structure) atomically;
    returns its URI. ``rows`` are :meth:`nvseg_ray.quality.assess.QualityRecord.table_rows` rows."""
    import pyarrow.parquet as pq

    from ..quality.statistics import statistics_table

    uri = join_uri(run_folder(output, run_name), STRUCTURES_NAME)
    buffer = _io.BytesIO()
    pq.write_table(statistics_table(rows), buffer)
    write_bytes_atomic(buffer.getvalue(), uri, storage_options)
    return uri


def write_manifest(frame, summary: dict[str, Any], output: str, run_name: str,
                   storage_options: dict | None = None) -> tuple[str, str]:
    """Write the run's manifest (Parquet) and summary (JSON) atomically; returns both URIs."""
    manifest_uri, summary_uri = run_uris(output, run_name)
    buffer = _io.BytesIO()
    frame.to_parquet(buffer, index=False)
    write_bytes_atomic(buffer.getvalue(), manifest_uri, storage_options)
    write_json(summary, summary_uri, storage_options)
    return manifest_uri, summary_uri


def format_summary(frame, summary: dict[str, Any], *, max_failures_shown: int = 20) -> str:
    """The end-of-run table printed by the job."""
    lines = [
        f"nvseg batch run {summary['run']}: {summary['total']} volume(s) -- ok {summary['ok']}, "
        f"skipped {summary['skipped']}, failed {summary['failed']} in {summary['wall_s']:.1f}s "
        f"({summary['volumes_per_s']:.3f} vol/s, model busy {summary['model_busy_fraction']:.0%})",
        "stage seconds (sum over processed volumes): "
        + ", ".join(f"{k[2:]} {v:.1f}" for k, v in summary["stage_seconds"].items()),
    ]
    if summary.get("flagged"):
        lines.append(f"QC: {summary['flagged']} volume(s) flagged -- "
                     + ", ".join(f"{code} {n}" for code, n in summary["qc_flags"].items()))
    if summary.get("cost_per_volume") is not None:
        lines.append(f"cost: {summary['cost']:.4f} for the run, {summary['cost_per_volume']:.4f} per volume "
                     f"({summary['nodes']} node(s) at {summary['cost_per_node_hour']:g} per node-hour)")
    failed = frame[frame["status"] == STATUS_FAILED]
    for _, row in failed.head(max_failures_shown).iterrows():
        lines.append(f"  FAILED {row['uri']}: [{row['error_code']}] {row['error_message']}")
    if len(failed) > max_failures_shown:
        lines.append(f"  ... and {len(failed) - max_failures_shown} more (see the manifest)")
    lines.append(f"manifest: {summary['manifest']}")
    if summary.get("report"):
        lines.append(f"run report: {summary['report']}")
    return "\n".join(lines)
