"""Request handling for the HTTP service, independent of Ray Serve (``serve_apps/app.py`` wires it).

One :class:`ServeSettings` (the Serve config's application ``args``) configures everything. Requests use
the NVIDIA NIM VISTA-3D shape (``{"image": URI, "prompts": {"classes": [...], "points": {...}}}``) so NIM
clients work unchanged; CPU-heavy steps (fetch, decode, validate, preprocess, invert, encode) run in the
ingress replicas, only :meth:`ModelWorker.infer` in the model replicas.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..config import DEFAULT_PATCH_SIZE, BrainConfig, InferenceConfig, validate_config
from ..engine import Prompts, SegmentationResult, Segmenter, resolve_prompts
from ..errors import NvsegError, PromptError
from ..io import decode_nifti, uri_stem
from ..labels import MODALITIES, LabelCatalog
from ..model import LoadedModel
from ..preprocess import PreparedVolume
from ..validation import VolumeLimits, validate_nifti
from ..redaction import redact
from .fetch import FetchPolicy
from .prefixes import parse_prefixes

OutputFormat = Literal["nrrd_zip", "nifti", "json"]

# Named defaults of the service (pinned by tests/test_serve.py).
DEFAULT_MAX_UPLOAD_MB = 512
DEFAULT_REQUEST_TIMEOUT_S = 300.0
DEFAULT_MAX_INFLIGHT = 4
DEFAULT_RETRY_AFTER_S = 5.0


class ServeSettings(BaseModel):
    """Application settings (``applications[].args`` of ``serve_apps/config.yaml``)."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str = Field(..., description="model.pt path or URI, loaded once per model replica")
    default_modality: Literal["CT_BODY", "MRI_BODY", "MRI_BRAIN"] = "CT_BODY"
    label_catalog: str | None = None
    device: str = "auto"
    model_gpus: float | None = Field(None, ge=0, description="GPUs per model replica; None = 1 if the cluster has GPUs")
    patch_size: tuple[int, int, int] = DEFAULT_PATCH_SIZE
    sw_batch_size: int = Field(1, ge=1)
    class_chunk_size: int = Field(16, ge=1)
    amp: bool = True
    output_dtype: Literal["uint8", "uint16", "int16", "int32", "float32"] = "uint16"
    max_voxels: int = Field(1024**3 // 2, ge=1)
    max_upload_mb: float = Field(DEFAULT_MAX_UPLOAD_MB, gt=0, description="413 above this (uploads and fetches)")
    request_timeout_s: float = Field(DEFAULT_REQUEST_TIMEOUT_S, gt=0, description="504 after this")
    max_inflight: int = Field(DEFAULT_MAX_INFLIGHT, ge=1, description="per ingress replica; 503 beyond")
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
                               patch_size=self.patch_size, sw_batch_size=self.sw_batch_size,
                               class_chunk_size=self.class_chunk_size, amp=self.amp, output_dtype=self.output_dtype,
                               max_voxels=self.max_voxels, storage_options=self.storage_options, brain=self.brain,
                               **prompt_fields)


class PromptsIn(BaseModel):
    """NIM ``prompts``: class names/ids, and/or points keyed by one class (voxel coords of the input)."""

    model_config = ConfigDict(extra="forbid")
    classes: list[int | str] | None = None
    points: dict[str, list[tuple[float, float, float]]] | None = None
    point_labels: list[int] | None = Field(None, description="extension: 1/0 per point (default all 1)")


class OutputIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: OutputFormat = "nrrd_zip"


class InferenceRequest(BaseModel):
    """``POST /v1/vista3d/inference`` body (NIM-compatible; ``modality`` and ``output`` are extensions)."""

    model_config = ConfigDict(extra="ignore")  # NIM clients may send local_working_dir etc.
    image: str = Field(..., min_length=1, description="http(s)://, s3:// ... URI of a .nii/.nii.gz volume")
    prompts: PromptsIn | None = None
    modality: str | None = None
    output: OutputIn = Field(default_factory=OutputIn)


class JobRequest(InferenceRequest):
    """``POST /v1/jobs``: like an inference request, plus where the mask goes."""

    output_uri: str = Field(..., description="mask URI (.nii.gz) in object storage; the report lands next to it")


def prompt_fields(prompts: PromptsIn | None, modality: str | None, default_modality: str) -> dict[str, Any]:
    """InferenceConfig prompt fields for a request (points keyed by class become class + points)."""
    if modality is not None and modality.upper() not in MODALITIES:
        raise PromptError(f"unknown modality '{modality}'", hint=f"use one of {', '.join(MODALITIES)}")
    fields: dict[str, Any] = {"modality": (modality or default_modality).upper()}
    if prompts is None:
        return fields
    if prompts.points:
        if len(prompts.points) != 1:
            raise PromptError(f"points must be given for exactly one class, got {len(prompts.points)}",
                              hint='e.g. "points": {"liver": [[120, 95, 40]]}')
        (name, pts), = prompts.points.items()
        cls: int | str = int(name) if name.isdigit() else name
        labels = prompts.point_labels or [1] * len(pts)
        if len(labels) != len(pts):
            raise PromptError(f"{len(pts)} points but {len(labels)} point_labels")
        return fields | {"classes": [cls], "points": [tuple(p) for p in pts], "point_labels": labels}
    if prompts.classes:
        fields["classes"] = list(prompts.classes)
    return fields


def parse_form_list(text: str | None) -> list[int | str] | None:
    """``"liver, 3"`` -> ``["liver", 3]`` (multipart form fields)."""
    if not text or not text.strip():
        return None
    return [int(t) if t.strip().isdigit() else t.strip() for t in re.split(r"[,;]", text) if t.strip()]


def parse_form_points(text: str | None) -> list[tuple[float, float, float]] | None:
    if not text or not text.strip():
        return None
    points = []
    for chunk in text.split(";"):
        values = [v for v in chunk.split(",") if v.strip()]
        try:
            if len(values) != 3:
                raise ValueError
            points.append(tuple(float(v) for v in values))
        except ValueError:
            raise PromptError(f"a point needs 3 voxel coordinates 'i,j,k', got '{chunk}'") from None
    return points  # type: ignore[return-value]


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

    def config_for(self, fields: dict[str, Any]) -> tuple[InferenceConfig, Prompts]:
        """Validate prompt fields early (unknown class -> PromptError before any download)."""
        from pydantic import ValidationError

        try:
            cfg = self.settings.inference_config(**fields)
        except ValidationError as exc:
            raise PromptError("invalid prompts: " + "; ".join(e["msg"] for e in exc.errors())) from None
        return cfg, resolve_prompts(cfg, self.catalog)

    def prepare(self, raw: bytes, name: str, cfg: InferenceConfig, prompts: Prompts) -> PreparedRequest:
        """Decode, validate and preprocess (raises InputError for bad volumes)."""
        timings: dict[str, float] = {}
        start = time.perf_counter()
        volume = validate_nifti(decode_nifti(raw, uri=name), uri=name, limits=self.limits)
        timings["read"] = time.perf_counter() - start
        prepared = Segmenter(cfg, catalog=self.catalog).prepare(volume, timings, modality=prompts.modality)
        return PreparedRequest(cfg, prompts, prepared, volume, uri_stem(name) or "image", timings)

    def finish(self, request: PreparedRequest, labels: np.ndarray) -> SegmentationResult:
        seg = Segmenter(request.cfg, catalog=self.catalog)
        return seg.finish(torch.from_numpy(labels.astype(np.int64)), request.prepared, request.volume,
                          request.prompts, request.timings)


class ModelWorker:
    """The model side: one loaded network, segmenting prepared volumes (runs in model replicas)."""

    def __init__(self, settings: ServeSettings, model: LoadedModel | None = None) -> None:
        self.segmenter = Segmenter(settings.inference_config(modality=settings.default_modality), model=model)
        self.segmenter.model  # load once per replica, at start-up

    def infer(self, prepared: PreparedVolume, prompts: Prompts) -> tuple[np.ndarray, float]:
        """[H, W, D] uint16 labels on the model grid and the seconds spent."""
        timings: dict[str, float] = {}
        # the point path reads cfg.points via the prepared volume; the engine's cfg only sets sizes/device
        labels = self.segmenter.infer(prepared, prompts, timings)
        return labels.to(torch.int32).numpy().astype(np.uint16), timings.get("infer", 0.0)

    def info(self) -> dict[str, Any]:
        model = self.segmenter.model
        return {"uri": model.uri, "sha256": model.sha256, "in_channels": model.architecture.in_channels,
                "embed_dim": model.architecture.embed_dim, "device": str(self.segmenter.device)}


def error_body(err: NvsegError) -> dict[str, Any]:
    """``{"error": {"code", "message", "hint", ...}}`` with every URI in it redacted (no user-info, no signatures)."""
    return {"error": redact(err.to_dict())}
