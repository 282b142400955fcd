"""The browsable report of a batch run: one self-contained static ``report.html`` next to the manifest.

``<output>/_nvseg_runs/<run>/report.html`` is built from the run's ``manifest.parquet`` and ``summary.json``
(:mod:`.manifest`). It is a single file -- inline CSS, plain JavaScript, thumbnails embedded as ``data:`` URIs --
that needs no server, CDN or network: open it from a laptop or straight from the bucket. At the top: counts by
status and error code, throughput, wall time, stage seconds, a seconds-per-volume histogram (inline SVG), the cost
per volume when a node-hour rate is known, and the QC flag counts. Below, one table row per volume (rendered here,
server-side; the script only hides and reorders rows, so 10,000 rows stay usable): status, error, QC flags with
their reasons, preview thumbnail, the largest structures (a structure cut by the field of view shows as a lower
bound, ``≥ 1520 ml``), stage seconds and links to the mask, the volume's JSON report and its preview. Links are
relative to the report's folder when the target lies under the run's output root (so the copied or synced tree
keeps working, local or ``s3://``), absolute otherwise.

Columns added by later versions of the manifest (``t_qc``, ``qc_flags``, ``thumbnail``, ...) are optional: an older
manifest renders with those cells blank. Every value is HTML-escaped.

``nvseg report RUN_DIR`` (:mod:`nvseg_ray.commands.report`) rebuilds the file.
"""

from __future__ import annotations

import base64
import html
import io as _io
import json
import math
import os
import posixpath
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote

from ..errors import REASON_IO_ERROR, REASON_NOT_FOUND, StorageError
from ..io import exists, join_uri, read_bytes, write_bytes_atomic
from .manifest import MANIFEST_NAME, RUNS_DIR, SUMMARY_NAME
from .rows import STATUS_FAILED, STATUS_OK, STATUS_SKIPPED, TIMING_COLUMNS

__all__ = ["MAX_EMBEDDED_THUMBNAILS", "REPORT_NAME", "render_run_report", "write_run_report"]

#: file name of the report inside the run folder.
REPORT_NAME = "report.html"
#: at most this many thumbnails are embedded (``data:`` URIs, a few KB each); later rows link their preview.
MAX_EMBEDDED_THUMBNAILS = 1000
#: bins of the seconds-per-volume histogram.
HISTOGRAM_BINS = 20
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: per-row stage columns shown, in order (those the manifest has: an older run's may lack ``t_qc``).
_STAGE_COLUMNS = TIMING_COLUMNS
_STATUSES = (STATUS_OK, STATUS_SKIPPED, STATUS_FAILED)
#: column headings of the longer stage names.
_SHORT_STAGE = {"preprocess": "prep", "postprocess": "post"}


# --------------------------------------------------------------------------------------------------------
# Reading and writing the run folder
# --------------------------------------------------------------------------------------------------------


def write_run_report(run_dir: str, storage_options: dict | None = None, *,
                     cost_per_node_hour: float | None = None, frame=None, summary: dict | None = None) -> str:
    """Read ``run_dir``'s manifest and summary, write ``run_dir/report.html`` atomically, return its URI.

    ``frame`` and ``summary``: the manifest and summary already in hand (the batch job, which has just written
    them), so they are not read back.

    Args:
        run_dir: the run folder ``<output>/_nvseg_runs/<run>`` (a local path or an fsspec URI).
        storage_options: fsspec options for ``run_dir``'s filesystem.
        cost_per_node_hour: price of one node-hour; wins over the summary's ``cost_per_node_hour``.

    Raises:
        StorageError: no run folder / manifest there (``reason="not_found"``), the manifest is not readable
            Parquet (``code="invalid_manifest"``), or the write failed.
    """
    run_dir = os.fspath(run_dir).rstrip("/") or os.fspath(run_dir)
    if frame is None:
        frame, summary = _read_run(run_dir, storage_options)
    text = render_run_report(frame, summary or {}, run_dir=run_dir, cost_per_node_hour=cost_per_node_hour)
    report_uri = join_uri(run_dir, REPORT_NAME)
    write_bytes_atomic(text.encode("utf-8"), report_uri, storage_options)
    return report_uri


def _read_run(run_dir: str, storage_options: dict | None) -> tuple[Any, dict[str, Any]]:
    """The manifest (a DataFrame) and summary of a run folder (see :func:`write_run_report` for the errors)."""
    import pandas as pd

    manifest_uri = join_uri(run_dir, MANIFEST_NAME)
    summary_uri = join_uri(run_dir, SUMMARY_NAME)
    hint = (f"RUN_DIR is a run folder written by `nvseg batch`: <output>/{RUNS_DIR}/<run>, holding "
            f"{MANIFEST_NAME} and {SUMMARY_NAME}")
    try:
        raw = read_bytes(manifest_uri, storage_options)
    except StorageError as err:
        if err.details.get("reason") != REASON_NOT_FOUND:
            raise
        where = (f"no run folder at {run_dir!r}" if not exists(run_dir, storage_options)
                 else f"no run manifest {MANIFEST_NAME} in {run_dir!r}")
        raise StorageError(f"cannot build the run report: {where}", hint=hint, uri=manifest_uri,
                           reason=REASON_NOT_FOUND) from err
    try:
        frame = pd.read_parquet(_io.BytesIO(raw))
    except Exception as exc:
        raise StorageError(f"cannot build the run report: {manifest_uri!r} is not a readable Parquet manifest "
                           f"({type(exc).__name__}: {exc})", hint=hint, code="invalid_manifest", uri=manifest_uri,
                           reason=REASON_IO_ERROR) from exc
    return frame, _read_summary(summary_uri, storage_options)


def _read_summary(uri: str, storage_options: dict | None) -> dict[str, Any]:
    """The run's summary JSON; ``{}`` when there is none (the report then derives counts from the manifest)."""
    try:
        raw = read_bytes(uri, storage_options)
    except StorageError as err:
        if err.details.get("reason") == REASON_NOT_FOUND:
            return {}
        raise
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise StorageError(f"cannot build the run report: {uri!r} is not valid JSON ({exc})",
                           hint="rerun the batch job, or delete the broken summary.json to report from the manifest "
                                "alone", code="invalid_manifest", uri=uri, reason=REASON_IO_ERROR) from exc
    return value if isinstance(value, dict) else {}


# --------------------------------------------------------------------------------------------------------
# Values: tolerant of missing columns, None, NaN and numpy types
# --------------------------------------------------------------------------------------------------------


def _esc(value: Any) -> str:
    return html.escape(_text(value), quote=True)


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and math.isnan(value):
        return ""
    if isinstance(value, bytes):
        return ""
    return str(value)


def _num(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) or math.isinf(number) else number


def _seconds(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.2f}" if value < 100 else f"{value:.0f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {sec:02d}s" if hours else f"{minutes}m {sec:02d}s"


def _ml(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 10 else f"{value:.1f}"


def _json_list(value: Any) -> list:
    """A JSON-list column (``qc_reasons``, ``key_volumes``): a list, or ``[]`` for blanks and broken JSON."""
    if isinstance(value, (list, tuple)):
        return list(value)
    text = _text(value).strip()
    if not text:
        return []
    try:
        parsed = json.loads(text)
    except ValueError:
        return []
    return parsed if isinstance(parsed, list) else []


def _flags(value: Any) -> list[str]:
    return [f.strip() for f in _text(value).split(",") if f.strip()]


def _shape(value: Any) -> str:
    try:
        dims = [int(v) for v in value]
    except (TypeError, ValueError):
        return ""
    return "×".join(str(d) for d in dims)


# --------------------------------------------------------------------------------------------------------
# Links: relative to the report's folder under the output root, absolute elsewhere
# --------------------------------------------------------------------------------------------------------


def _normalise(uri: str) -> tuple[str, str]:
    """``(scheme, path)`` with ``file://`` and plain local paths as ``("", /abs/path)``."""
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        return scheme.lower(), posixpath.normpath(rest) if rest else rest
    return "", os.path.normpath(os.path.abspath(uri))


class _Linker:
    """Turns artefact URIs into ``href`` values for a report that lives in ``run_dir``."""

    def __init__(self, run_dir: str) -> None:
        self.scheme, self.run_path = _normalise(run_dir)
        parent = posixpath.dirname(self.run_path.rstrip("/"))
        if posixpath.basename(parent) == RUNS_DIR:  # <output>/_nvseg_runs/<run>: climb two folders to <output>
            self.root, self.up = posixpath.dirname(parent), "../../"
        else:  # another layout: only targets inside the run folder itself are relative
            self.root, self.up = self.run_path, ""

    def href(self, uri: str) -> str:
        if not uri:
            return ""
        scheme, path = _normalise(uri)
        root = self.root.rstrip("/")
        if scheme == self.scheme and root and path.startswith(root + "/"):
            return quote(self.up + path[len(root) + 1:], safe="/")
        if scheme in ("", "file"):
            return "file://" + quote(path, safe="/")
        return uri


# --------------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------------


def render_run_report(frame, summary: dict, *, run_dir: str, cost_per_node_hour: float | None = None) -> str:
    """The report's HTML text for a manifest ``frame`` (pandas DataFrame) and its ``summary`` dict.

    ``cost_per_node_hour`` wins over ``summary["cost_per_node_hour"]``; with neither, no cost line.
    """
    records = [dict(r) for r in frame.to_dict("records")] if len(frame) else []
    summary = dict(summary or {})
    linker = _Linker(run_dir)
    stage_columns = [c for c in _STAGE_COLUMNS if c in frame.columns]
    for record in records:
        if _num(record.get("t_total")) is None:
            times = [_num(record.get(c)) for c in TIMING_COLUMNS]
            record["t_total"] = sum(t for t in times if t is not None) if any(t is not None for t in times) else None
    rate = cost_per_node_hour if cost_per_node_hour is not None else _num(summary.get("cost_per_node_hour"))
    title = f"nvseg run {_text(summary.get('run')) or posixpath.basename(run_dir.rstrip('/'))}"
    parts = [
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n",
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n",
        # nothing is fetched: no scripts, styles, fonts or frames from anywhere; images only inline
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
        "style-src 'unsafe-inline'; script-src 'unsafe-inline'\">\n",
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n",
        f"<h1>{html.escape(title)}</h1>\n",
        _render_summary(records, summary, rate),
        _render_table(records, stage_columns, linker),
        f"<script>{_JS}</script>\n</body>\n</html>\n",
    ]
    return "".join(parts)


def _counts(records: list[dict], summary: Mapping[str, Any]) -> dict[str, int]:
    status = Counter(_text(r.get("status")) for r in records)
    out = {"total": int(_num(summary.get("total")) or len(records))}
    for name in _STATUSES:
        value = _num(summary.get(name))
        out[name] = int(value) if value is not None else status.get(name, 0)
    return out


def _render_summary(records: list[dict], summary: Mapping[str, Any], rate: float | None) -> str:
    counts = _counts(records, summary)
    wall = _num(summary.get("wall_s"))
    vps = _num(summary.get("volumes_per_s"))
    busy = _num(summary.get("model_busy_fraction"))
    nodes = _num(summary.get("nodes"))
    out = ["<section id=\"summary\">\n<div class=\"cards\">\n"]
    for name in ("total", *_STATUSES):
        out.append(f"<div class=\"card {name}\"><b id=\"count-{name}\">{counts[name]}</b><span>{name}</span></div>\n")
    out.append("</div>\n<table class=\"facts\">\n")
    facts = [
        ("run", _text(summary.get("run"))),
        ("manifest", _text(summary.get("manifest"))),
        ("wall time", _duration(wall)),
        ("volumes per second", f"{vps:.3f}" if vps is not None else ""),
        ("model busy", f"{busy:.0%}" if busy is not None else ""),
        ("Ray nodes", f"{int(nodes)}" if nodes is not None else ""),
        ("report written", time.strftime("%Y-%m-%d %H:%M:%S %Z")),
    ]
    out.extend(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>\n" for k, v in facts if v)
    cost = _cost_line(wall, nodes, rate, counts[STATUS_OK])
    if cost:
        out.append(f"<tr><th>cost per volume</th><td id=\"cost\">{html.escape(cost)}</td></tr>\n")
    out.append("</table>\n<div class=\"panels\">\n")
    out.append(_render_errors(records, summary))
    out.append(_render_flag_counts(records))
    out.append(_render_stage_seconds(records, summary))
    out.append("</div>\n")
    out.append(_render_histogram([_num(r.get("t_total")) for r in records
                                  if _text(r.get("status")) == STATUS_OK]))
    out.append("</section>\n")
    return "".join(out)


def _cost_line(wall: float | None, nodes: float | None, rate: float | None, ok: int) -> str:
    """``wall_s / 3600 × nodes × rate / max(ok, 1)``, or ``""`` without a rate or a wall time."""
    if rate is None or wall is None:
        return ""
    n = nodes if nodes is not None and nodes > 0 else 1.0
    total = wall / 3600.0 * n * rate
    per = total / max(ok, 1)
    assumed = "" if nodes is not None and nodes > 0 else " (node count unknown: 1 assumed)"
    return (f"{per:.4g} per volume ({total:.4g} for the run: {wall / 3600.0:.3g} h wall × {n:g} node(s) × "
            f"{rate:g} per node-hour, over {ok} ok volume(s)){assumed}")


def _render_errors(records: list[dict], summary: Mapping[str, Any]) -> str:
    errors = summary.get("errors")
    if isinstance(errors, Mapping):
        counts = Counter({_text(k): int(_num(v) or 0) for k, v in errors.items()})
    else:
        counts = Counter(_text(r.get("error_code")) or "(no code)" for r in records
                         if _text(r.get("status")) == STATUS_FAILED)
    rows = "".join(f"<tr><td><code>{_esc(code)}</code></td><td class=\"num\">{n}</td></tr>\n"
                   for code, n in counts.most_common())
    body = rows or "<tr><td colspan=\"2\" class=\"muted\">none</td></tr>\n"
    return f"<div class=\"panel\"><h2>errors by code</h2>\n<table id=\"error-counts\">\n{body}</table></div>\n"


def _render_flag_counts(records: list[dict]) -> str:
    counts: Counter = Counter()
    flagged = 0
    for record in records:
        flags = set(_flags(record.get("qc_flags")))
        flagged += bool(flags)
        counts.update(flags)
    rows = "".join(f"<tr><td><span class=\"flag\">{_esc(code)}</span></td><td class=\"num\">{n}</td></tr>\n"
                   for code, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    body = rows or "<tr><td colspan=\"2\" class=\"muted\">none</td></tr>\n"
    return (f"<div class=\"panel\"><h2>QC flags <small>({flagged} volume(s) flagged)</small></h2>\n"
            f"<table id=\"flag-counts\">\n{body}</table></div>\n")


def _render_stage_seconds(records: list[dict], summary: Mapping[str, Any]) -> str:
    stages = summary.get("stage_seconds")
    if not isinstance(stages, Mapping) or not stages:
        ok = [r for r in records if _text(r.get("status")) == STATUS_OK]
        stages = {c: sum(_num(r.get(c)) or 0.0 for r in ok) for c in _STAGE_COLUMNS if any(c in r for r in ok)}
    total = sum(_num(v) or 0.0 for v in stages.values()) or 1.0
    rows = []
    for name, value in stages.items():
        seconds = _num(value) or 0.0
        label = name[2:] if str(name).startswith("t_") else str(name)
        rows.append(f"<tr><td>{_esc(label)}</td><td class=\"num\">{seconds:.1f}</td><td class=\"bar\">"
                    f"<span style=\"width:{100 * seconds / total:.1f}%\"></span></td></tr>\n")
    body = "".join(rows) or "<tr><td colspan=\"3\" class=\"muted\">none</td></tr>\n"
    return (f"<div class=\"panel\"><h2>stage seconds <small>(sum over ok volumes)</small></h2>\n"
            f"<table id=\"stage-seconds\">\n{body}</table></div>\n")


def _render_histogram(values: Iterable[float | None]) -> str:
    data = sorted(v for v in values if v is not None)
    head = "<div class=\"panel wide\"><h2>seconds per volume <small>(t_total of ok volumes)</small></h2>\n"
    if not data:
        return head + "<p class=\"muted\" id=\"histogram-empty\">no ok volumes</p></div>\n"
    low, high = data[0], data[-1]
    span = (high - low) or max(high, 1.0) * 0.1 or 1.0
    bins = HISTOGRAM_BINS if len(data) > 1 else 1
    width = span / bins
    counts = [0] * bins
    for v in data:
        counts[min(int((v - low) / width), bins - 1)] += 1
    peak = max(counts)
    w, h, pad_left, pad_bottom = 600, 160, 36, 22
    bar_w = (w - pad_left) / bins
    bars = []
    for i, n in enumerate(counts):
        bh = (h - pad_bottom - 8) * n / peak
        x0 = low + i * width
        bars.append(f"<rect class=\"hbar\" x=\"{pad_left + i * bar_w + 1:.1f}\" y=\"{h - pad_bottom - bh:.1f}\" "
                    f"width=\"{max(bar_w - 2, 1):.1f}\" height=\"{bh:.1f}\"><title>{x0:.2f}–{x0 + width:.2f} s: "
                    f"{n} volume(s)</title></rect>")
    median = data[len(data) // 2]
    p90 = data[min(len(data) - 1, int(0.9 * len(data)))]
    axis = (f"<line x1=\"{pad_left}\" y1=\"{h - pad_bottom}\" x2=\"{w}\" y2=\"{h - pad_bottom}\" class=\"axis\"/>"
            f"<text x=\"{pad_left}\" y=\"{h - 6}\">{low:.2f} s</text>"
            f"<text x=\"{w}\" y=\"{h - 6}\" text-anchor=\"end\">{low + span:.2f} s</text>"
            f"<text x=\"{pad_left - 4}\" y=\"14\" text-anchor=\"end\">{peak}</text>"
            f"<text x=\"{pad_left - 4}\" y=\"{h - pad_bottom}\" text-anchor=\"end\">0</text>")
    stats = (f"<p class=\"muted\">{len(data)} volume(s): median {median:.2f} s, p90 {p90:.2f} s, "
             f"max {high:.2f} s</p>")
    return (f"{head}<svg id=\"histogram\" viewBox=\"0 0 {w} {h}\" width=\"{w}\" height=\"{h}\" role=\"img\" "
            f"aria-label=\"histogram of seconds per volume\">{''.join(bars)}{axis}</svg>\n{stats}</div>\n")


def _render_table(records: list[dict], stage_columns: list[str], linker: _Linker) -> str:
    statuses = sorted({_text(r.get("status")) for r in records} | set(_STATUSES))
    options = "".join(f"<option value=\"{_esc(s)}\">{_esc(s)}</option>" for s in statuses if s)
    controls = (
        "<section id=\"volumes\">\n<h2>volumes</h2>\n<div class=\"controls\">"
        "<input id=\"filter\" type=\"search\" placeholder=\"filter: uri, status, error, flag\" autocomplete=\"off\">"
        f"<select id=\"status-filter\"><option value=\"\">any status</option>{options}</select>"
        "<label><input id=\"flagged-only\" type=\"checkbox\"> flagged only</label>"
        f"<span id=\"shown-count\">{len(records)} of {len(records)} shown</span></div>\n"
    )
    # fixed layout (column widths never depend on 10,000 rows of content); volume and error share what is left
    headers = [("#", "num", 44), ("volume", "text", None), ("status", "text", 76), ("error", "text", None),
               ("QC flags", "text", 160), ("preview", None, 108), ("key structures", None, 230),
               *((_SHORT_STAGE.get(c[2:], c[2:]), "num", 52) for c in stage_columns), ("total s", "num", 62),
               ("links", None, 64)]
    titles = ["", "input URI", "", "error code and message", "QC flag codes (hover or open 'why' for the reasons)",
              "", "largest structures; ≥: cut by the field of view, a lower bound",
              *(f"{c[2:]} seconds" for c in stage_columns), "total seconds", "mask, report, preview"]
    head = "".join(
        f"<th data-col=\"{i}\"" + (f" data-sort=\"{kind}\"" if kind else "")
        + (f" title=\"{html.escape(title)}\"" if title else "") + f">{html.escape(name)}</th>"
        for i, ((name, kind, _width), title) in enumerate(zip(headers, titles)))
    cols = "".join(f"<col style=\"width:{width}px\">" if width else "<col>" for _name, _kind, width in headers)
    rows = []
    embedded = 0
    for index, record in enumerate(records, start=1):
        thumb = record.get("thumbnail")
        embed = (isinstance(thumb, (bytes, bytearray)) and bytes(thumb[:8]) == _PNG_SIGNATURE
                 and embedded < MAX_EMBEDDED_THUMBNAILS)
        embedded += embed
        rows.append(_render_row(index, record, stage_columns, linker, embed))
    return (f"{controls}<table id=\"volume-table\">\n<colgroup>{cols}</colgroup>\n<thead><tr>{head}</tr></thead>\n<tbody>\n"
            f"{''.join(rows)}</tbody>\n</table>\n"
            f"<p class=\"muted\">thumbnails embedded: {embedded} (at most {MAX_EMBEDDED_THUMBNAILS}; later rows "
            f"link their preview)</p>\n</section>\n")


def _render_row(index: int, record: Mapping[str, Any], stage_columns: list[str], linker: _Linker,
                embed_thumbnail: bool) -> str:
    uri = _text(record.get("uri"))
    status = _text(record.get("status"))
    code = _text(record.get("error_code"))
    message = _text(record.get("error_message"))
    flags = _flags(record.get("qc_flags"))
    search = " ".join([uri, status, code, message, *flags]).lower()
    cells = [f"<td class=\"num\" data-v=\"{index}\">{index}</td>"]
    detail = " · ".join(p for p in (_text(record.get("modality")), _shape(record.get("input_shape"))) if p)
    cells.append(f"<td class=\"uri\" data-v=\"{_esc(uri)}\"><span class=\"path\">{_esc(uri)}</span>"
                 + (f"<br><small>{_esc(detail)}</small>" if detail else "") + "</td>")
    cells.append(f"<td data-v=\"{_esc(status)}\"><span class=\"status {_esc(status)}\">{_esc(status)}</span></td>")
    error = (f"<code>{_esc(code)}</code> " if code else "") + (f"<span class=\"msg\">{_esc(message)}</span>"
                                                                if message else "")
    cells.append(f"<td class=\"error\" data-v=\"{_esc(code)}\">{error}</td>")
    cells.append(f"<td data-v=\"{_esc(','.join(flags))}\">{_render_flags(flags, record.get('qc_reasons'))}</td>")
    cells.append(f"<td class=\"preview\">{_render_preview(record, linker, embed_thumbnail)}</td>")
    cells.append(f"<td class=\"structures\">{_render_key_volumes(record.get('key_volumes'))}</td>")
    for column in stage_columns:
        value = _num(record.get(column))
        cells.append(f"<td class=\"num\" data-v=\"{'' if value is None else value}\">{_seconds(value)}</td>")
    total = _num(record.get("t_total"))
    cells.append(f"<td class=\"num total\" data-v=\"{'' if total is None else total}\">{_seconds(total)}</td>")
    links = []
    written = status in (STATUS_OK, STATUS_SKIPPED)  # a failed volume's output_uri is where it would have gone
    for label, column in (("mask", "output_uri"), ("report", "report_uri"), ("preview", "preview_uri")):
        target = _text(record.get(column))
        if target and written:
            links.append(f"<a class=\"link-{label}\" href=\"{html.escape(linker.href(target), quote=True)}\" "
                         f"title=\"{_esc(target)}\">{label}</a>")
    cells.append(f"<td class=\"links\">{' '.join(links)}</td>")
    return (f"<tr class=\"volume\" data-status=\"{_esc(status)}\" data-flags=\"{_esc(','.join(flags))}\" "
            f"data-uri=\"{_esc(uri)}\" data-search=\"{html.escape(search, quote=True)}\">{''.join(cells)}</tr>\n")


def _render_flags(flags: list[str], reasons_value: Any) -> str:
    if not flags:
        return ""
    reasons: dict[str, list[str]] = {}
    for item in _json_list(reasons_value):
        if not isinstance(item, Mapping):
            continue
        text = _text(item.get("reason"))
        structures = item.get("structures")
        if isinstance(structures, (list, tuple)) and structures:
            text += f" ({', '.join(_text(s) for s in structures)})"
        reasons.setdefault(_text(item.get("flag")), []).append(text)
    chips = "".join(f"<span class=\"flag\" title=\"{_esc('; '.join(reasons.get(f, [])))}\">{_esc(f)}</span>"
                    for f in flags)
    listed = "".join(f"<li><b>{_esc(flag)}</b>: {_esc(text)}</li>" for flag in flags for text in reasons.get(flag, []))
    if not listed:
        return chips
    return f"{chips}<details class=\"reasons\"><summary>why</summary><ul>{listed}</ul></details>"


def _render_preview(record: Mapping[str, Any], linker: _Linker, embed: bool) -> str:
    preview = _text(record.get("preview_uri"))
    href = html.escape(linker.href(preview), quote=True) if preview else ""
    if embed:
        data = base64.b64encode(bytes(record["thumbnail"])).decode("ascii")
        img = f"<img class=\"thumb\" alt=\"preview\" src=\"data:image/png;base64,{data}\">"
        return f"<a href=\"{href}\">{img}</a>" if href else img
    return f"<a class=\"preview-link\" href=\"{href}\">preview</a>" if href else ""


def _render_key_volumes(value: Any) -> str:
    items = []
    for item in _json_list(value):
        if not isinstance(item, Mapping):
            continue
        ml = _num(item.get("ml"))
        if ml is None:
            continue
        name = _esc(item.get("name"))
        if item.get("cut_by_fov"):
            items.append(f"<li class=\"lower-bound\" title=\"cut by the field of view: a lower bound\">{name} "
                         f"≥ {_ml(ml)} ml</li>")
        else:
            items.append(f"<li>{name} {_ml(ml)} ml</li>")
    return f"<ul class=\"kv\">{''.join(items)}</ul>" if items else ""


# --------------------------------------------------------------------------------------------------------
# Inline CSS and JavaScript (constants: nothing user-provided is ever placed inside them)
# --------------------------------------------------------------------------------------------------------

_CSS = """
body{font:13px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:16px;color:#1d2330;background:#fafbfc}
h1{font-size:20px;margin:0 0 12px}h2{font-size:14px;margin:0 0 6px}small{color:#667}
.cards{display:flex;gap:10px;margin-bottom:10px}.card{background:#fff;border:1px solid #dde;border-radius:6px;
padding:6px 14px;text-align:center}.card b{display:block;font-size:20px}.card.ok b{color:#1a7f37}
.card.failed b{color:#cf222e}.card.skipped b{color:#777}
.facts th{text-align:left;padding-right:12px;color:#556;font-weight:600}.facts td{word-break:break-all}
.panels{display:flex;flex-wrap:wrap;gap:12px;margin:12px 0}.panel{background:#fff;border:1px solid #dde;
border-radius:6px;padding:8px 12px;min-width:200px}.panel.wide{display:inline-block}
.num{text-align:right;font-variant-numeric:tabular-nums}.muted{color:#889}
.bar{width:120px}.bar span{display:block;height:8px;background:#6b8cce;border-radius:2px}
svg text{font-size:10px;fill:#556}.hbar{fill:#6b8cce}.hbar:hover{fill:#31539a}.axis{stroke:#99a}
.controls{display:flex;gap:12px;align-items:center;margin:8px 0}#filter{width:320px;padding:4px}
td.structures{overflow-wrap:anywhere}#volume-table{border-collapse:collapse;background:#fff;width:100%;min-width:1300px;table-layout:fixed}
#volume-table th,#volume-table td{border-bottom:1px solid #e4e6eb;padding:4px 6px;vertical-align:top}
#volume-table th{position:sticky;top:0;background:#eef1f6;text-align:left;white-space:nowrap;overflow:hidden;
text-overflow:ellipsis}
#volume-table th[data-sort]{cursor:pointer}#volume-table th[data-sort]:hover{background:#dde3ee}
th.asc::after{content:" \\25B2"}th.desc::after{content:" \\25BC"}
td.uri{word-break:break-all}td.error,td.links{word-break:break-word}
.status{padding:1px 6px;border-radius:8px;font-size:12px}.status.ok{background:#dafbe1}
.status.failed{background:#ffebe9}.status.skipped{background:#eaeef2}
.flag{display:inline-block;background:#fff1c2;border:1px solid #e3c35a;border-radius:8px;padding:0 6px;
margin:1px;font-size:12px;cursor:help}details.reasons ul{margin:2px 0;padding-left:16px}
.thumb{width:96px;height:auto;display:block;image-rendering:pixelated}
ul.kv{margin:0;padding-left:14px;white-space:nowrap}li.lower-bound{color:#9a3412}td.uri small{white-space:nowrap}
"""

_JS = r"""
(function () {
  "use strict";
  var table = document.getElementById("volume-table");
  var tbody = table.tBodies[0];
  var rows = Array.prototype.slice.call(tbody.rows);
  var filter = document.getElementById("filter");
  var status = document.getElementById("status-filter");
  var flagged = document.getElementById("flagged-only");
  var shown = document.getElementById("shown-count");
  function detached(change) {  /* edit the rows off-document: one layout afterwards, not one per row */
    var parent = tbody.parentNode, next = tbody.nextSibling;
    parent.removeChild(tbody);
    try { change(); } finally { parent.insertBefore(tbody, next); }
  }
  function apply() { detached(filterRows); }
  function filterRows() {
    var words = filter.value.toLowerCase().split(/\s+/).filter(Boolean);
    var want = status.value, onlyFlagged = flagged.checked, n = 0;
    for (var i = 0; i < rows.length; i++) {
      var tr = rows[i], ok = true, text = tr.getAttribute("data-search");
      if (want && tr.getAttribute("data-status") !== want) ok = false;
      if (ok && onlyFlagged && !tr.getAttribute("data-flags")) ok = false;
      for (var w = 0; ok && w < words.length; w++) if (text.indexOf(words[w]) < 0) ok = false;
      tr.hidden = !ok;
      if (ok) n++;
    }
    shown.textContent = n + " of " + rows.length + " shown";
  }
  var timer = null;
  filter.addEventListener("input", function () { clearTimeout(timer); timer = setTimeout(apply, rows.length > 2000 ? 150 : 0); });
  status.addEventListener("change", apply);
  flagged.addEventListener("change", apply);
  var heads = table.tHead.rows[0].cells;
  function sortBy(th) {
    var col = +th.getAttribute("data-col"), numeric = th.getAttribute("data-sort") === "num";
    var dir = th.classList.contains("asc") ? -1 : 1;
    for (var h = 0; h < heads.length; h++) heads[h].classList.remove("asc", "desc");
    th.classList.add(dir > 0 ? "asc" : "desc");
    var keyed = rows.map(function (tr, i) {
      var v = tr.cells[col].getAttribute("data-v");
      if (v === null) v = tr.cells[col].textContent;
      if (numeric) { v = v === "" ? NaN : parseFloat(v); }
      return [v, i, tr];
    });
    keyed.sort(function (a, b) {
      var x = a[0], y = b[0];
      if (numeric) {
        var xn = isNaN(x), yn = isNaN(y);
        if (xn || yn) return xn === yn ? a[1] - b[1] : (xn ? 1 : -1);  /* blanks last, either direction */
        return x === y ? a[1] - b[1] : (x < y ? -dir : dir);
      }
      return x === y ? a[1] - b[1] : (x < y ? -dir : dir);
    });
    rows = keyed.map(function (k) { return k[2]; });
    detached(function () {  /* empty first: moving rows one by one within their parent is quadratic in Blink */
      tbody.textContent = "";
      for (var r = 0; r < rows.length; r++) tbody.appendChild(rows[r]);
    });
  }
  for (var h = 0; h < heads.length; h++) {
    if (heads[h].hasAttribute("data-sort")) heads[h].addEventListener("click", function () { sortBy(this); });
  }
  apply();
})();
"""
