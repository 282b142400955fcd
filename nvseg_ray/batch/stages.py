"""The batch pipeline's stages as plain functions over rows (no Ray here; see :mod:`.pipeline`).

``preprocess_row`` (CPU): refuse non-regular local files, read + validate + prepare -> ``model_input`` voxels and the small inversion record.
``ModelStage.run`` (GPU/CPU actor): sliding-window inference -> ``labels`` on the model grid (the runner's compact
integer array, as it is).
``postprocess_row`` (CPU): invert to the input grid, cast, statistics, encode, write mask + report.

The CPU stages take a :class:`~nvseg_ray.stages.VolumeStages` (no model); only :class:`ModelStage` holds a
:class:`~nvseg_ray.model_runner.ModelRunner`.

Every stage catches errors per row and turns them into a ``failed`` row with the error code, so a bad
volume never takes a block (or the job) down with it.
"""

from __future__ import annotations

import json
import pickle
from typing import Any

import numpy as np

from ..config import InferenceConfig
from ..dicom.dicomweb import is_dicomweb_url
from ..errors import NvsegError
from ..boundary import describe_exception
from ..output import report_uri, write_outputs
from ..timing import StageTimings
from ..io import check_regular_file
from ..model_runner import ModelRunner
from ..prompts import Prompts, expands_subclasses
from ..stages import SegmentationResult, VolumeStages
from ..redaction import redact_uri
from .rows import (BRAIN_TIMING_COLUMNS, INTENSITIES_COLUMN, PAYLOAD_COLUMNS, STATUS_FAILED, STATUS_OK,
                   STRUCTURES_COLUMN, fail_row)

CODE_INTERNAL = "internal_error"
CODE_MODEL_CRASHED = "model_worker_crashed"


def _failure(row: dict[str, Any], exc: BaseException, stage: str) -> dict[str, Any]:
    if isinstance(exc, NvsegError):
        return fail_row(row, exc.code, exc.message + (f" (hint: {exc.hint})" if exc.hint else ""))
    return fail_row(row, CODE_INTERNAL, f"{stage} failed: {describe_exception(exc)}")


def prompts_of(row: dict[str, Any], cfg: InferenceConfig) -> Prompts:
    """The prompts the planner resolved for this row."""
    return Prompts(class_ids=tuple(int(i) for i in row["class_ids"]), requested=json.loads(row["requested"]),
                   modality=row["modality"] or None, with_points=cfg.points is not None,
                   expand_subclasses=expands_subclasses(cfg))


def preprocess_row(row: dict[str, Any], stages: VolumeStages) -> dict[str, Any]:
    """Read, validate and prepare one volume (CPU). Fills ``model_input``, ``inversion``, ``volume``."""
    if row["status"] == STATUS_FAILED:
        return row
    timings = StageTimings()
    try:
        source = pickle.loads(row["series"]) if row["series"] else row["uri"]
        if not row["series"]:
            check_regular_file(row["uri"])  # a named pipe or a link to /dev/zero would block the read forever
        volume = stages.read(source, timings)
        prepared = stages.prepare(volume, timings, modality=row["modality"] or None)
        voxels, record = prepared.split()
        if prepared.brain is not None:
            row["registration_metric"] = prepared.brain.metric
            row["registration_correlation"] = prepared.brain.correlation
            row["brain_ml"] = prepared.brain.brain_ml
        row["model_input"] = pickle.dumps(voxels, protocol=5)
        row["inversion"] = pickle.dumps(record, protocol=5)
        row["volume"] = pickle.dumps(volume.without_voxels(), protocol=5)
        if stages.keeps_voxels:  # the QC's intensities (statistics, preview): to postprocessing, past the model
            row[INTENSITIES_COLUMN] = pickle.dumps(volume.array, protocol=5)
        row["input_shape"] = list(volume.shape)
        row["input_voxels"] = int(np.prod(volume.shape))
    except Exception as exc:
        return _failure(row, exc, "preprocess")
    finally:
        _record_timings(row, timings, "read", "preprocess")
    return row


def _record_timings(row: dict[str, Any], timings: StageTimings, *stages: str) -> None:
    """``row["t_<stage>"]`` (wall s), ``row["cpu_<stage>"]`` (CPU s) and ``row["rss_mb_<stage>"]`` (peak MB) for
    ``stages`` (0 when absent), and the wall seconds of the brain steps that ran."""
    for stage in stages:
        row[f"t_{stage}"] = timings.get(stage, 0.0)
        row[f"cpu_{stage}"] = timings.cpu_s.get(stage, 0.0)
        row[f"rss_mb_{stage}"] = timings.peak_rss_mb.get(stage, 0.0)
    for column in BRAIN_TIMING_COLUMNS:
        if column[2:] in timings:  # "t_brain_register" <- timings["brain_register"]
            row[column] = timings[column[2:]]


class ModelStage:
    """Holds one :class:`~nvseg_ray.model_runner.ModelRunner`; :meth:`run` segments one prepared row with the
    prompts the planner resolved for it. Used inside a model actor.

    Args:
        cfg: the inference configuration (checkpoint is loaded once, here).
        attempt: optional callable ``(key) -> attempt_number`` that records the start of an attempt and
            returns how many attempts (including this one) were started for that volume; attempts that
            exceed ``max_attempts`` (because earlier ones killed their worker) fail without running.
        on_start: optional callable ``(row) -> None`` run right before inference (fault injection in tests).
    """

    def __init__(self, cfg: InferenceConfig, attempt=None, max_attempts: int = 3, on_start=None) -> None:
        self.cfg = cfg
        self.runner = ModelRunner(cfg)  # weights load on the first volume (once per actor), so a run
        # whose volumes all fail before the model stage (or a re-run with nothing left) loads nothing
        self.attempt = attempt
        self.max_attempts = max_attempts
        self.on_start = on_start

    @property
    def builds_an_engine(self) -> bool:
        """Whether making the model ready may build an accelerated encoder (TensorRT, torch.compile): then the actor
        does it in its start-up, before it takes work, so that the first volume does not pay for the build."""
        import torch

        backend = self.cfg.backend
        return backend in ("trt", "compile") or backend == "auto" and torch.cuda.is_available()

    def warm_up(self) -> None:
        """Load the weights and apply the backend now (see :attr:`builds_an_engine`)."""
        self.runner.model  # noqa: B018

    def run(self, row: dict[str, Any]) -> dict[str, Any]:
        if row["status"] == STATUS_FAILED:
            return row
        number = self.attempt(row["resume_key"] or row["uri"]) if self.attempt else 1
        row["attempts"] = number
        if number > self.max_attempts:
            return fail_row(row, CODE_MODEL_CRASHED,
                            f"the model worker died {number - 1} time(s) while segmenting this volume "
                            f"(out of memory or a crash); gave up after {self.max_attempts} attempt(s)")
        if self.on_start is not None:
            self.on_start(row)
        timings = StageTimings()
        try:
            record = pickle.loads(row["inversion"])
            voxels = pickle.loads(row["model_input"])
            labels = self.runner.infer(record.with_voxels(voxels), prompts_of(row, self.cfg), timings)
            row["labels"] = pickle.dumps(labels, protocol=5)
            row["model_input"] = b""
            row["model_sha256"] = self.runner.model.sha256
            backend = self.runner.backend_report()
            row.update(backend=backend["backend"], backend_code=backend["code"], backend_reason=backend["reason"],
                       window_batch=backend["window_batch"])
        except Exception as exc:
            return _failure(row, exc, "inference")
        finally:
            _record_timings(row, timings, "infer")
        return row


def postprocess_row(row: dict[str, Any], stages: VolumeStages) -> dict[str, Any]:
    """Invert, cast, count, encode and write one mask + its report (CPU). Empties the payload columns."""
    if row["status"] == STATUS_FAILED:
        return row
    timings = StageTimings()
    cfg = stages.cfg
    try:
        record = pickle.loads(row["inversion"])
        volume = pickle.loads(row["volume"])
        if row[INTENSITIES_COLUMN]:
            volume = volume.with_voxels(pickle.loads(row[INTENSITIES_COLUMN]))
        labels = pickle.loads(row["labels"])
        prompts = prompts_of(row, cfg)
        result: SegmentationResult = stages.finish(labels, record, volume, prompts, timings)
        for stage in ("read", "preprocess", "infer"):  # the earlier stages' figures, for the report
            result.timings[stage] = row[f"t_{stage}"]
            result.timings.cpu_s[stage] = row[f"cpu_{stage}"]
            result.timings.peak_rss_mb[stage] = row[f"rss_mb_{stage}"]
        nifti, _ = cfg.output_formats(dicom=bool(row["series"]),
                                      to_dicomweb=bool(row["seg_uri"]) and is_dicomweb_url(row["seg_uri"]))
        # the report is written last: it marks the outputs finished (resume)
        report = write_outputs(result, input_uri=row["uri"], output_uri=row["output_uri"] if nifti else None,
                               cfg=cfg, model_uri=cfg.checkpoint, model_sha256=row["model_sha256"] or None,
                               seg_target=row["seg_uri"] or None, seed=row["resume_key"], catalog=stages.catalog,
                               report_target=report_uri(row["output_uri"]), extra={
                                   "resume_key": row["resume_key"], "settings_key": row["settings_key"],
                                   "backend": {"backend": row["backend"], "code": row["backend_code"],
                                               "reason": row["backend_reason"], "window_batch": row["window_batch"]}})
        if row["seg_uri"]:
            row["seg_uri"] = report["dicom"]["seg"]["uri"] or ""
        row["labelled_voxels"] = int(sum(s["voxels"] for s in result.statistics))
        row["n_labels"] = len(result.statistics)
        row["report_uri"] = report_uri(row["output_uri"])
        _record_quality(row, result, report)
        row["status"] = STATUS_OK
    except Exception as exc:
        return _failure(row, exc, "postprocess")
    finally:
        _record_timings(row, timings, "postprocess", "qc", "write", "seg")
        for name in PAYLOAD_COLUMNS:
            row[name] = b""
    return row


def _record_quality(row: dict[str, Any], result: SegmentationResult, report: dict[str, Any]) -> None:
    """The manifest's QC columns, the preview's thumbnail and the structures' rows for the run's statistics table."""
    quality = result.quality
    if quality is None:
        return
    row.update(quality.manifest_columns())
    if "preview" in report:
        from ..quality.preview import thumbnail

        row["preview_uri"] = report["preview"]["uri"]
        row["thumbnail"] = thumbnail(quality.preview)
    if quality.structures:
        volume = {"uri": redact_uri(row["uri"]), "output_uri": redact_uri(row["output_uri"]),
                  "modality": row["modality"], "series_instance_uid": row["series_instance_uid"]}
        row[STRUCTURES_COLUMN] = json.dumps(quality.table_rows(volume), separators=(",", ":")).encode()
