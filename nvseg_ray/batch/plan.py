"""Work planning on the driver: output locations, resume keys and skip decisions (no volume is read)."""

from __future__ import annotations

import json
import pickle
from collections.abc import Sequence

from ..config import InferenceConfig
from ..errors import NvsegError
from ..io import split_uri
from ..labels import LabelCatalog
from ..output import output_location, output_settings, report_uri, resume_key, seg_uri
from ..prompts import resolve_prompts
from .inputs import WorkItem
from .rows import STATUS_FAILED, STATUS_PENDING, STATUS_SKIPPED, new_row

#: error codes of rows that fail during planning.
CODE_OUTPUT_CONFLICT = "output_conflict"
CODE_DUPLICATE_OUTPUT = "duplicate_output"
CODE_INVALID_OUTPUT_NAME = "invalid_output_name"


def output_name_problem(name: str) -> str | None:
    """Why a manifest row's ``output_name`` is not a plain file-name stem (None when it is one).

    Refused: path separators (``/``, ``\\``), ``.``/``..`` and other names starting with a dot, ``:`` (a URI
    scheme such as ``s3://``, fsspec's ``::`` chaining, a drive letter), ``~`` and control characters -- any of
    which could place the mask outside ``--output``.
    """
    if any(ch in name for ch in "/\\:") or name.startswith((".", "~")) or any(ord(ch) < 32 for ch in name):
        return (f"output_name {name!r} is not a plain file name: paths, '..', URI schemes and '::' could write "
                "outside --output")
    return None


def checkpoint_identity(uri: str, storage_options: dict | None = None) -> str:
    """A cheap identity of the weights for resume keys: the provenance sha256 when a ``<ckpt>.json`` sidecar
    from ``nvseg weights download`` exists, else size + modification time / ETag (the file is not read)."""
    fs, path = split_uri(uri, storage_options)
    try:
        sidecar = json.loads(fs.cat_file(path + ".json"))
        if isinstance(sidecar, dict) and sidecar.get("sha256"):
            return f"sha256:{sidecar['sha256']}"
    except Exception:  # no sidecar: fall through
        pass
    try:
        info = fs.info(path)
    except FileNotFoundError:
        from ..errors import CheckpointError

        raise CheckpointError(f"checkpoint not found: {uri}",
                              hint="download it with `nvseg weights download --dest ...`") from None
    stamp = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or ""
    return f"{uri}|{info.get('size')}|{stamp}"


def plan_rows(items: Sequence[WorkItem], output: str, cfg: InferenceConfig, catalog: LabelCatalog,
              model_identity: str, *, seg_root: str | None = None) -> list[dict]:
    """One row per item: pending, skipped (finished with the same key) or failed (bad prompt / conflicts).

    Finished outputs are recognised by their JSON report (written after the mask and the SEG, so its presence
    means they are complete) carrying the same resume key. Reports are fetched concurrently. A DICOM series' key
    covers its SeriesInstanceUID and the set of its SOP Instance UIDs (a series that gained instances is redone).

    ``output`` is where masks and reports go; ``seg_root`` a DICOMweb root that receives the SEGs instead of files
    next to the masks.
    """
    rows: list[dict] = []
    seen: dict[str, str] = {}
    for item in items:
        row = new_row(item.uri, item.rel_dir)
        series = item.series
        if series is not None:
            row.update(series.summary())
            row["series"] = pickle.dumps(series, protocol=5)
        problem = output_name_problem(item.output_name) if item.output_name else None
        if problem:
            rows.append(_fail(row, CODE_INVALID_OUTPUT_NAME, f"{item.uri}: {problem}",
                              "give output_name as a bare stem such as 'case_0042' (letters, digits, '_', '-', '.')"))
            continue
        row["output_uri"] = output_location(series or item.uri, output, cfg, item.rel_dir, item.output_name)
        try:
            _, seg = cfg.output_formats(dicom=series is not None)
            prompts = resolve_prompts(cfg, catalog, classes=item.classes, modality=item.modality,
                                      dicom_modality=series.modality if series else None, uri=item.uri)
        except NvsegError as err:
            rows.append(_fail(row, err.code, err.message))
            continue
        if seg:
            row["seg_uri"] = seg_root or seg_uri(row["output_uri"])
        row["class_ids"] = list(prompts.class_ids)
        row["modality"] = prompts.modality or ""
        row["requested"] = json.dumps(prompts.requested)
        settings = output_settings(cfg, prompts, dicom=series is not None)
        row["resume_key"] = resume_key(series.identity() if series else item.uri, settings, model_identity)
        if series is not None:  # the same series and settings with other instances is redone, not a conflict
            row["settings_key"] = resume_key(series.key, settings, model_identity)
        if row["output_uri"] in seen:
            rows.append(_fail(row, CODE_DUPLICATE_OUTPUT,
                              f"{item.uri} and {seen[row['output_uri']]} would both write {row['output_uri']}",
                              "rename one input or give manifest rows distinct output_name values"))
            continue
        seen[row["output_uri"]] = item.uri
        rows.append(row)
    _apply_resume(rows, cfg)
    return rows


def _apply_resume(rows: list[dict], cfg: InferenceConfig) -> None:
    pending = [r for r in rows if r["status"] == STATUS_PENDING]
    if not pending or cfg.overwrite:
        return
    fs, _ = split_uri(pending[0]["output_uri"], cfg.storage_options)
    paths = {split_uri(report_uri(r["output_uri"]), cfg.storage_options)[1]: r for r in pending}
    found = fs.cat(list(paths), on_error="omit") if paths else {}
    for path, raw in found.items():
        row = paths.get(path) or paths.get(path.rstrip("/"))
        if row is None:
            continue
        try:
            report = json.loads(raw)
            previous = report.get("resume_key")
        except (ValueError, AttributeError):
            report, previous = {}, None
        if previous == row["resume_key"]:
            row["status"] = STATUS_SKIPPED
            _carry_quality(row, report)
        elif row["settings_key"] and row["settings_key"] == _report_field(raw, "settings_key"):
            continue  # a DICOM series that gained or lost instances since its outputs were written: redo it
        else:
            _fail(row, CODE_OUTPUT_CONFLICT,
                  f"{row['output_uri']} already exists from a run with other settings, model or input",
                  "pass --overwrite to replace it, or write to another --output")


def _carry_quality(row: dict, report: dict) -> None:
    """A resumed volume's QC columns, from the report its earlier run wrote (no thumbnail: the preview is linked)."""
    from ..quality.assess import manifest_columns

    row["report_uri"] = report_uri(row["output_uri"])
    row["preview_uri"] = (report.get("preview") or {}).get("uri") or ""
    if isinstance(report.get("quality"), dict):
        row.update(manifest_columns(report["quality"]))


def _report_field(raw: bytes, name: str) -> str | None:
    try:
        return json.loads(raw).get(name)
    except (ValueError, AttributeError):
        return None


def _fail(row: dict, code: str, message: str, hint: str | None = None) -> dict:
    row["status"] = STATUS_FAILED
    row["error_code"] = code
    row["error_message"] = message + (f" (hint: {hint})" if hint else "")
    return row
