"""Request handling for the HTTP service, independent of Ray Serve (``serve_apps/app.py`` wires it).

One :class:`ServeSettings` (the Serve config's application ``args``) configures everything. Requests use
the NVIDIA NIM VISTA-3D shape (``{"image": URI, "prompts": {"classes": [...], "points": {...}}}``) so NIM
clients work unchanged; CPU-heavy steps (fetch, decode, validate, preprocess, invert, encode) run in the
ingress replicas, only :meth:`ModelWorker.infer` in the model replicas.
"""

from __future__ import annotations

import math
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, field_validator

from ..config import (
    MODALITY_AUTO,
    DEFAULT_AMP,
    DEFAULT_BACKEND,
    DEFAULT_CLASS_CHUNK_SIZE,
    DEFAULT_DEVICE,
    DEFAULT_MAX_VOXELS,
    DEFAULT_OUTPUT_DTYPE,
    DEFAULT_PATCH_SIZE,
    DEFAULT_SW_BATCH_SIZE,
    Backend,
    BrainConfig,
    InferenceConfig,
    Modality,
    OutputDType,
    check_patch_size,
    check_sw_batch_size,
    validate_config,
)
from ..dicom.series import DicomSeries
from ..inference import StopRequested
from ..errors import NvsegError, PromptError, WorkAbandoned
from ..io import decode_nifti, uri_stem
from ..labels import MODALITIES, LabelCatalog, parse_class_list, parse_class_token
from ..model import LoadedModel
from ..model_runner import ModelRunner
from ..preprocess import PreparedVolume
from ..prompts import Prompts, resolve_prompts
from ..validation import VolumeLimits, validate_nifti
from ..redaction import redact
from ..stages import SegmentationResult, VolumeStages
from .fetch import FetchPolicy
from .prefixes import parse_prefixes
from .limits import DEFAULT_MAX_JSON_KB

#: ``dicom-seg``: the DICOM SEG (application/dicom) of a DICOM input (an uploaded zip or a DICOMweb series).
OutputFormat = Literal["nrrd_zip", "nifti", "json", "dicom-seg", "preview"]

# Named defaults of the service (pinned by tests/test_serve.py); the engine's own defaults live in nvseg_ray.config.
#: everything-set of a request that gives no prompts (NIM's CT default; upstream's silent MRI_BODY default is
#: a bug: docs/upstream.md, Upstream bugs, item 1).
DEFAULT_MODALITY = "CT_BODY"
DEFAULT_MAX_UPLOAD_MB = 512
DEFAULT_REQUEST_TIMEOUT_S = 300.0
DEFAULT_MAX_INFLIGHT = 4
DEFAULT_RETRY_AFTER_S = 5.0
#: each point prompt runs its own patch window through the point head; 800 points kept a CPU replica busy ~4 min.
DEFAULT_MAX_POINTS = 64
#: queued + running async jobs per ingress replica (beyond: 503 at submit, not a failure later).
DEFAULT_MAX_JOBS = 16
#: jobs of one ingress replica that run at once (the rest wait "queued"; keeps the model queue from overflowing).
DEFAULT_JOB_CONCURRENCY = 2
#: a queued/running job whose ingress replica has not heart-beaten for this long is failed as job_orphaned.
DEFAULT_JOB_LEASE_S = 60.0


class ServeSettings(BaseModel):
    """Application settings (``applications[].args`` of ``serve_apps/config.yaml``)."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str = Field(..., description="model.pt path or URI, loaded once per model replica")
    default_modality: Modality = Field(DEFAULT_MODALITY, description="everything-set of a request without prompts")
    label_catalog: str | None = None
    device: str = DEFAULT_DEVICE
    model_gpus: float | None = Field(None, ge=0, description="GPUs per model replica; None = 1 if the cluster has GPUs")
    # the engine's settings: defaults and bounds are InferenceConfig's (nvseg_ray.config), checked at startup
    patch_size: tuple[int, int, int] = DEFAULT_PATCH_SIZE
    sw_batch_size: int | Literal["auto"] = DEFAULT_SW_BATCH_SIZE
    backend: Backend = DEFAULT_BACKEND
    engine_cache_dir: str | None = None
    class_chunk_size: int = Field(DEFAULT_CLASS_CHUNK_SIZE, ge=1)
    amp: bool = DEFAULT_AMP
    output_dtype: OutputDType = DEFAULT_OUTPUT_DTYPE
    max_voxels: int = Field(DEFAULT_MAX_VOXELS, ge=1)
    max_upload_mb: float = Field(DEFAULT_MAX_UPLOAD_MB, gt=0, description="413 above this (uploads and fetches)")
    request_timeout_s: float = Field(DEFAULT_REQUEST_TIMEOUT_S, gt=0, description="504 after this")
    max_inflight: int = Field(DEFAULT_MAX_INFLIGHT, ge=1, description="per ingress replica; 503 beyond")
    max_json_kb: float = Field(DEFAULT_MAX_JSON_KB, gt=0, description="413 for larger JSON request bodies")
    max_points: int = Field(DEFAULT_MAX_POINTS, ge=1, description="422 for more point prompts in one request")
    max_jobs: int = Field(DEFAULT_MAX_JOBS, ge=1, description="queued + running jobs per ingress replica; 503 beyond")
    job_concurrency: int = Field(DEFAULT_JOB_CONCURRENCY, ge=1, description="jobs running at once per ingress replica")
    job_lease_s: float = Field(DEFAULT_JOB_LEASE_S, gt=0, description="jobs of a silent ingress replica fail after this")
    retry_after_s: float = Field(DEFAULT_RETRY_AFTER_S, ge=0, description="Retry-After on 503")
    allowed_schemes: tuple[str, ...] = ("http", "https", "s3")
    allowed_hosts: tuple[str, ...] = Field((), description="exact or *.suffix; empty = any public host")
    allow_private_networks: bool = Field(False, description="allow URLs resolving to private/loopback addresses")
    allowed_input_prefixes: tuple[str, ...] = Field(
        (), description="s3://bucket/dir or /abs/dir prefixes object-store/local images must lie within; empty = none")
    allowed_output_prefixes: tuple[str, ...] = Field(
        (), description="prefixes output_uri must lie within (segment-wise); empty = no output_uri accepted")
    allow_overwrite: bool = Field(False, description="let output_uri replace an existing mask or report")
    auth_tokens_file: str | None = Field(
        None, description="file with one bearer token per line (a mounted Secret); None = no authentication")
    storage_options: dict[str, Any] = Field(default_factory=dict)
    brain: BrainConfig = Field(default_factory=BrainConfig, description="brain T1 workflow for MRI_BRAIN requests")

    _check_patch = field_validator("patch_size")(lambda cls, v: check_patch_size(v))
    _check_window_batch = field_validator("sw_batch_size", mode="before")(lambda cls, v: check_sw_batch_size(v))

    @field_validator("allowed_input_prefixes", "allowed_output_prefixes")
    @classmethod
    def _valid_prefixes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        """Normalised prefixes (ValueError for one that is malformed or admits everything, e.g. ``s3://``)."""
        try:
            return tuple(p.uri for p in parse_prefixes(value))
        except NvsegError as err:
            raise ValueError(err.message) from None

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> ServeSettings:
        return validate_config(cls, dict(args), source="serve application args")

    def fetch_policy(self) -> FetchPolicy:
        return FetchPolicy(allowed_schemes=tuple(self.allowed_schemes), allowed_hosts=tuple(self.allowed_hosts),
                           allow_private_networks=self.allow_private_networks,
                           allowed_prefixes=tuple(self.allowed_input_prefixes),
                           max_bytes=int(self.max_upload_mb * 2**20), timeout_s=min(self.request_timeout_s, 120.0))

    def inference_config(self, **prompt_fields: Any) -> InferenceConfig:
        return InferenceConfig(checkpoint=self.checkpoint, label_catalog=self.label_catalog, device=self.device,
                               patch_size=self.patch_size, sw_batch_size=self.sw_batch_size, backend=self.backend,
                               engine_cache_dir=self.engine_cache_dir,
                               class_chunk_size=self.class_chunk_size, amp=self.amp, output_dtype=self.output_dtype,
                               max_voxels=self.max_voxels, storage_options=self.storage_options, brain=self.brain,
                               **prompt_fields)


#: a point label: exactly the integer 1 (positive) or 0 (negative); 1.0, "1", true are refused.
PointLabel = Annotated[int, Field(strict=True, ge=0, le=1)]


class PromptsIn(BaseModel):
    """NIM ``prompts``: class names/ids, and/or points keyed by one class (voxel coords of the input)."""

    model_config = ConfigDict(extra="forbid")
    classes: list[int | str] | None = None
    points: dict[str, list[tuple[FiniteFloat, FiniteFloat, FiniteFloat]]] | None = None
    point_labels: list[PointLabel] | None = Field(None, description="extension: 1/0 per point (default all 1)")


class OutputIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: OutputFormat = "nrrd_zip"


class InferenceRequest(BaseModel):
    """``POST /v1/vista3d/inference`` body (NIM-compatible; ``modality`` and ``output`` are extensions)."""

    model_config = ConfigDict(extra="ignore")  # NIM clients may send local_working_dir etc.
    image: str = Field(..., min_length=1, description="http(s)://, s3:// ... URI of a .nii/.nii.gz volume, or a "
                       "DICOMweb series URL (<root>/studies/<uid>/series/<uid>)")
    prompts: PromptsIn | None = None
    modality: str | None = None
    output: OutputIn = Field(default_factory=OutputIn)


class JobRequest(InferenceRequest):
    """``POST /v1/jobs``: like an inference request, plus where the mask goes."""

    output_uri: str = Field(..., description="mask URI (.nii.gz) in object storage; the report lands next to it")


def check_points(points: list[tuple[float, float, float]], labels: list[int] | None, max_points: int) -> None:
    """Refuse more than ``max_points`` points, non-finite coordinates, labels other than 0/1 or a count mismatch.

    Raises:
        PromptError: 422.
    """
    if len(points) > max_points:
        raise PromptError(f"{len(points)} point prompts exceed this service's limit of {max_points}",
                          hint="a few points per object are enough; split the work over several requests")
    if not all(math.isfinite(c) for p in points for c in p):
        raise PromptError("point coordinates must be finite numbers (got NaN or Infinity)",
                          hint="give voxel coordinates i,j,k of the input volume")
    if labels is not None:
        if any(type(x) is not int or x not in (0, 1) for x in labels):
            raise PromptError(f"point_labels must be 0 or 1, got {labels[:10]}", hint="1 = positive, 0 = negative")
        if len(labels) != len(points):
            raise PromptError(f"{len(points)} points but {len(labels)} point_labels",
                              hint="give one label per point, or none (all positive)")


def prompt_fields(prompts: PromptsIn | None, modality: str | None, default_modality: str,
                  max_points: int = DEFAULT_MAX_POINTS) -> dict[str, Any]:
    """InferenceConfig prompt fields for a request (points keyed by class become class + points).

    Raises:
        PromptError: unknown modality, points for more than one class, too many / non-finite points, bad labels,
            point_labels without points.
    """
    if modality is not None and modality.upper() not in (*MODALITIES, MODALITY_AUTO):
        raise PromptError(f"unknown modality '{modality}'",
                          hint=f"use one of {', '.join(MODALITIES)}, or auto for DICOM input (its Modality tag)")
    fields: dict[str, Any] = {"modality": (modality or default_modality).upper()}
    if prompts is None:
        return fields
    if prompts.points:
        if len(prompts.points) != 1:
            raise PromptError(f"points must be given for exactly one class, got {len(prompts.points)}",
                              hint='e.g. "points": {"liver": [[120, 95, 40]]}')
        (name, pts), = prompts.points.items()
        cls = parse_class_token(name)
        check_points(pts, prompts.point_labels, max_points)
        labels = prompts.point_labels or [1] * len(pts)
        return fields | {"classes": [cls], "points": [tuple(p) for p in pts], "point_labels": labels}
    if prompts.point_labels is not None:
        raise PromptError("point_labels given without points", hint='add "points": {"<class>": [[i, j, k], ...]}')
    if prompts.classes:
        fields["classes"] = list(prompts.classes)
    return fields


def parse_form_list(text: str | None) -> list[int | str] | None:
    """``"liver, 3"`` -> ``["liver", 3]`` (multipart form fields; the one class-list rule,
    :func:`nvseg_ray.labels.parse_class_list`); None when nothing is listed."""
    return parse_class_list(text or "") or None


def parse_form_points(text: str | None) -> list[tuple[float, float, float]] | None:
    """``"10,20,5; 12,20,5"`` -> ``[(10.0, 20.0, 5.0), (12.0, 20.0, 5.0)]`` (voxel i,j,k of the input volume).

    Raises:
        PromptError: a point without exactly 3 finite numbers.
    """
    if not text or not text.strip():
        return None
    points = []
    for chunk in text.split(";"):
        values = [v for v in chunk.split(",") if v.strip()]
        try:
            if len(values) != 3:
                raise ValueError
            point = tuple(float(v) for v in values)
        except ValueError:
            raise PromptError(f"a point needs 3 voxel coordinates 'i,j,k', got '{chunk[:80]}'",
                              hint="e.g. points=120,95,40;118,97,41") from None
        if not all(math.isfinite(c) for c in point):
            raise PromptError(f"point coordinates must be finite numbers, got '{chunk[:80]}'",
                              hint="give voxel coordinates i,j,k of the input volume")
        points.append(point)
    return points  # type: ignore[return-value]


def parse_form_labels(text: str | None) -> list[int] | None:
    """``"1,0,1"`` -> ``[1, 0, 1]``; anything but the digits 0 and 1 is refused.

    Raises:
        PromptError: a label other than ``0`` or ``1`` (``1.5``, ``yes``, ``²``).
    """
    if not text or not text.strip():
        return None
    labels = [t.strip() for t in re.split(r"[,;]", text) if t.strip()]
    if any(t not in ("0", "1") for t in labels):
        raise PromptError(f"point_labels must be 0 or 1, got '{text[:80]}'", hint="1 = positive, 0 = negative, "
                          "one per point, e.g. point_labels=1,1,0")
    return [int(t) for t in labels]


@dataclass
class PreparedRequest:
    """Everything the ingress keeps between the model call and the response."""

    cfg: InferenceConfig
    prompts: Prompts
    prepared: PreparedVolume
    volume: Any
    name: str
    timings: dict[str, float] = field(default_factory=dict)


class RequestProcessor:
    """The CPU side of a request (runs in ingress replicas; no model)."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.catalog = LabelCatalog.load(settings.label_catalog)
        self.limits = VolumeLimits(max_voxels=settings.max_voxels)

    def config_for(self, fields: dict[str, Any], dicom_modality: str | None = None,
                   uri: str = "") -> tuple[InferenceConfig, Prompts]:
        """Validate prompt fields early (unknown class -> PromptError before any download). ``dicom_modality``:
        the Modality tag of a DICOM input, which ``modality: auto`` maps to an everything-set."""
        from pydantic import ValidationError

        try:
            cfg = self.settings.inference_config(**fields)
        except ValidationError as exc:
            raise PromptError("invalid prompts: " + "; ".join(e["msg"] for e in exc.errors()),
                              hint="see /docs for the prompt fields and GET /v1/vista3d/info for the classes") from None
        return cfg, resolve_prompts(cfg, self.catalog, dicom_modality=dicom_modality, uri=uri)

    def prepare(self, raw: bytes, name: str, cfg: InferenceConfig, prompts: Prompts) -> PreparedRequest:
        """Decode, validate and preprocess (raises InputError for bad volumes)."""
        timings: dict[str, float] = {}
        start = time.perf_counter()
        volume = validate_nifti(decode_nifti(raw, uri=name, max_voxels=self.limits.max_voxels), uri=name, limits=self.limits)
        timings["read"] = time.perf_counter() - start
        prepared = VolumeStages(cfg, catalog=self.catalog).prepare(volume, timings, modality=prompts.modality)
        return PreparedRequest(cfg, prompts, prepared, volume, uri_stem(name) or "image", timings)

    def prepare_series(self, series: DicomSeries, cfg: InferenceConfig, prompts: Prompts) -> PreparedRequest:
        """Assemble, validate and preprocess one DICOM series (raises DicomError / InputError for bad series)."""
        timings: dict[str, float] = {}
        stages = VolumeStages(cfg.model_copy(update={"max_voxels": self.limits.max_voxels,
                                                     "storage_options": self.settings.storage_options}),
                              catalog=self.catalog)
        volume = stages.read(series, timings)
        prepared = stages.prepare(volume, timings, modality=prompts.modality)
        return PreparedRequest(cfg, prompts, prepared, volume, series.key, timings)

    def finish(self, request: PreparedRequest, labels: np.ndarray) -> SegmentationResult:
        """Invert ``labels`` ([H, W, D] global ids on the request's model grid, as :meth:`ModelWorker.infer` returns
        them) onto the input grid, cast and count."""
        return VolumeStages(request.cfg, catalog=self.catalog).finish(labels, request.prepared, request.volume,
                                                                      request.prompts, request.timings)


class ModelWorker:
    """The model side: one :class:`~nvseg_ray.model_runner.ModelRunner`, segmenting prepared volumes (runs in model
    replicas)."""

    def __init__(self, settings: ServeSettings, model: LoadedModel | None = None) -> None:
        self.runner = ModelRunner(settings.inference_config(modality=settings.default_modality), model=model)
        self.runner.model  # load once per replica, at start-up

    def infer(self, prepared: PreparedVolume, prompts: Prompts, deadline: float | None = None,
              stop: threading.Event | None = None) -> tuple[np.ndarray, float]:
        """[H, W, D] global class ids on the model grid (numpy, the runner's compact integer dtype) and the seconds
        spent.

        Args:
            deadline: ``time.time()`` after which the request is gone (its caller timed out): work not started by
                then is refused, and running work stops at its next window.
            stop: set when the caller went away (cancelled); running work stops at its next window.

        Raises:
            WorkAbandoned: the deadline passed or ``stop`` was set (504; nobody waits for the result).
        """
        def should_stop() -> bool:
            return (stop is not None and stop.is_set()) or (deadline is not None and time.time() > deadline)

        if should_stop():
            raise WorkAbandoned("the request's deadline passed before the model started on it",
                                hint="retry later, or use POST /v1/jobs for large volumes")
        timings: dict[str, float] = {}
        # the point path reads cfg.points via the prepared volume; the runner's cfg only sets sizes/device
        try:
            labels = self.runner.infer(prepared, prompts, timings, should_stop=should_stop)
        except StopRequested:
            raise WorkAbandoned("the request timed out or was cancelled; the model stopped working on it",
                                hint="use POST /v1/jobs for large volumes") from None
        return labels, timings.get("infer", 0.0)

    def info(self) -> dict[str, Any]:
        model = self.runner.model
        return {"uri": model.uri, "sha256": model.sha256, "in_channels": model.architecture.in_channels,
                "embed_dim": model.architecture.embed_dim, "device": str(self.runner.device),
                "backend": self.runner.backend_report()}


#: hints for errors raised without one, by code, then by HTTP status family (every error body has a hint).
DEFAULT_HINTS: dict[str, str] = {
    "invalid_prompt": "see GET /v1/vista3d/info for the class names and ids of each modality",
    "invalid_config": "see /docs for the request fields and their allowed values",
    "invalid_input": "send a readable 3-D NIfTI volume (.nii or .nii.gz)",
    "storage_error": "check the URI, that the object exists and that the service may read/write it",
    "image_fetch_failed": "check that the image URI exists and is reachable from the service",
    "url_not_allowed": "use an allowed scheme and host (ask the operator for the allow-list)",
    "payload_too_large": "send a smaller (gzip-compressed) volume or use an object-storage URI with POST /v1/jobs",
    "request_timeout": "use POST /v1/jobs for large volumes",
    "overloaded": "retry after the Retry-After delay",
    "model_unavailable": "retry after the Retry-After delay; if it persists, tell the operator",
    "internal_error": "tell the operator, quoting the request id",
}


def default_hint(err: NvsegError, status: int | None = None) -> str:
    """``err.hint``, else a hint for its code, else one for its HTTP status family (default ``err.http_status``)."""
    status = err.http_status if status is None else status
    if err.hint:
        return err.hint
    if err.code in DEFAULT_HINTS:
        return DEFAULT_HINTS[err.code]
    if status >= 500:
        return DEFAULT_HINTS["model_unavailable" if status == 503 else "internal_error"]
    return "check the request against the API description at /docs"


def error_body(err: NvsegError, status: int | None = None, request_id: str | None = None) -> dict[str, Any]:
    """``{"error": {"code", "message", "hint", ...details}}`` -- always with a hint; ``request_id`` when given.

    ``status`` (default ``err.http_status``) picks the fallback hint of an error raised without one.
    """
    out = err.to_dict()
    out["hint"] = default_hint(err, status)
    if request_id:
        out["request_id"] = request_id
    return {"error": redact(out)}  # every URI in it: no user-info, no signature/token values
