"""The row schema that flows through the batch pipeline and ends up in the run manifest.

Rows are plain dicts with a fixed set of columns (every stage keeps every column, so manifest rows
always share one schema). Heavy payloads travel as bytes columns and are emptied once consumed:
``model_input`` (float32 voxels, preprocess -> model), ``labels`` (uint16 model-grid labels,
model -> postprocess), ``intensities`` (the input's voxels for the QC, preprocess -> postprocess, as an object of
its own beside the row); ``inversion`` and ``volume`` are small records (a few KB).
"""

from __future__ import annotations

from typing import Any

from ..timing import STAGES

STATUS_PENDING = "pending"
STATUS_OK = "ok"
STATUS_SKIPPED = "skipped"
STATUS_FAILED = "failed"

# every stage of :data:`~nvseg_ray.timing.STAGES` has a wall-seconds, a CPU-seconds and a peak-memory column
#: per-stage timing columns, wall seconds.
TIMING_COLUMNS = tuple(f"t_{stage}" for stage in STAGES)
#: per-stage process CPU seconds (all threads of the worker) and peak resident memory of the worker (MB).
COST_COLUMNS = (*(f"cpu_{stage}" for stage in STAGES), *(f"rss_mb_{stage}" for stage in STAGES))
#: brain T1 workflow (MRI_BRAIN rows): seconds per step (skull strip .. resample are part of ``t_preprocess``, the
#: revert of ``t_postprocess``) and the registration quality figures; 0 for other rows.
BRAIN_TIMING_COLUMNS = ("t_brain_skullstrip", "t_brain_bias_correct", "t_brain_normalize", "t_brain_register",
                        "t_brain_resample", "t_brain_revert")
BRAIN_QUALITY_COLUMNS = ("registration_metric", "registration_correlation", "brain_ml")
#: the input's voxels (stored dtype, pickled) for the QC, preprocess -> postprocess; the pipeline sends them as a
#: separate object, so the model actor never receives them.
INTENSITIES_COLUMN = "intensities"
#: payload columns dropped before the manifest is written (``series``: the pickled DicomSeries of a DICOM row).
PAYLOAD_COLUMNS = ("model_input", "inversion", "volume", "labels", "series", INTENSITIES_COLUMN)
#: DICOM rows: the series' identity (no patient identifiers) and where its SEG went; empty for NIfTI rows.
DICOM_COLUMNS = ("study_instance_uid", "series_instance_uid", "dicom_modality", "series_description", "n_instances",
                 "seg_uri")
#: quality control (:mod:`nvseg_ray.quality`): the volume's JSON report and preview, the QC flag codes
#: (comma-separated, "" = none), their reasons (JSON list of ``{"flag", "reason", "structures"}``) and the largest
#: structures' volumes (JSON list of ``{"name", "ml", "cut_by_fov"}``; a cut one's ml is a lower bound). Strings, so
#: every run's manifest has one Parquet schema; ``thumbnail`` is a small PNG of the preview for the run report.
QC_COLUMNS = ("report_uri", "preview_uri", "qc_flags", "qc_reasons", "key_volumes")
#: how the network ran (:mod:`nvseg_ray.backends`): the backend used, why (a fallback's code and reason) and the
#: window batch.
BACKEND_COLUMNS = ("backend", "backend_code", "backend_reason", "window_batch")
#: the structures' statistics rows of a finished volume (JSON bytes), gathered by the driver into the run's
#: statistics table; not a manifest column.
STRUCTURES_COLUMN = "structure_rows"
#: manifest columns, in order.
MANIFEST_COLUMNS = (
    "uri", "rel_dir", "status", "error_code", "error_message", "output_uri", "modality", "requested",
    "class_ids", "input_shape", "input_voxels", "labelled_voxels", "n_labels", *QC_COLUMNS, *TIMING_COLUMNS,
    *COST_COLUMNS,
    *BRAIN_TIMING_COLUMNS, *BRAIN_QUALITY_COLUMNS, *DICOM_COLUMNS, "preprocess_node", "model_node", "model_actor", "postprocess_node", *BACKEND_COLUMNS, "attempts", "model_sha256", "resume_key", "settings_key",
    "thumbnail",
)


def new_row(uri: str, rel_dir: str = "") -> dict[str, Any]:
    """A pending row with every column present."""
    row: dict[str, Any] = {
        "uri": uri, "rel_dir": rel_dir, "status": STATUS_PENDING, "error_code": "", "error_message": "",
        "output_uri": "", "modality": "", "requested": "null", "class_ids": [], "input_shape": [],
        "input_voxels": 0, "labelled_voxels": 0, "n_labels": 0,
        "preprocess_node": "", "model_node": "", "model_actor": "", "postprocess_node": "", "attempts": 0,
        "model_sha256": "", "resume_key": "", "settings_key": "",
    }
    row.update({name: 0.0 for name in (*TIMING_COLUMNS, *COST_COLUMNS, *BRAIN_TIMING_COLUMNS,
                                       *BRAIN_QUALITY_COLUMNS)})
    row.update({name: b"" for name in PAYLOAD_COLUMNS})
    row.update({name: "" for name in QC_COLUMNS})
    row["qc_reasons"] = row["key_volumes"] = "[]"
    row["thumbnail"] = row[STRUCTURES_COLUMN] = b""
    row.update(backend="", backend_code="", backend_reason="", window_batch=0)
    row.update({name: "" for name in DICOM_COLUMNS})
    row["n_instances"] = 0
    return row


def fail_row(row: dict[str, Any], code: str, message: str) -> dict[str, Any]:
    """Mark a row failed and drop its payloads."""
    row["status"] = STATUS_FAILED
    row["error_code"] = code
    row["error_message"] = message
    for name in PAYLOAD_COLUMNS:
        row[name] = b""
    return row
