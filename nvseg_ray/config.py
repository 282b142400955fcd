"""Typed configuration for inference, with named defaults.

One :class:`InferenceConfig` drives the CLI, the batch job and the Serve app. Its defaults are the
upstream NV-Segment-CTMR ``configs/inference.json`` values *as they actually take effect* (see
UPSTREAM.md §5 and §12.4: the configured overlap 0.3 never reaches the inferer, 0.25 does). Values
come, in increasing priority, from these defaults, a YAML file, and explicit overrides (CLI flags).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError

# --- upstream-exact preprocessing / inferer defaults -------------------------------------------------
DEFAULT_SPACING_MM: tuple[float, float, float] = (1.5, 1.5, 1.5)
DEFAULT_CROP_MARGIN = 10
DEFAULT_PERCENTILES: tuple[float, float] = (1.0, 99.0)
DEFAULT_PATCH_SIZE: tuple[int, int, int] = (192, 192, 128)
DEFAULT_OVERLAP = 0.25
DEFAULT_SW_BATCH_SIZE = 1
#: patch dimensions must be divisible by 2 ** (len(blocks_down) - 1) for SegResNetDS2.
PATCH_DIVISOR = 16

# --- our own defaults ---------------------------------------------------------------------------------
#: classes whose logits are materialised at once when taking the argmax (memory vs. speed).
DEFAULT_CLASS_CHUNK_SIZE = 16
DEFAULT_OUTPUT_DTYPE = "uint16"
DEFAULT_OUTPUT_POSTFIX = "trans"
DEFAULT_COMPRESSLEVEL = 1
DEFAULT_MAX_VOXELS = 1024**3 // 2

Modality = Literal["CT_BODY", "MRI_BODY", "MRI_BRAIN"]
OutputDType = Literal["uint8", "uint16", "int16", "int32", "float32"]


def check_patch_size(v: tuple[int, int, int]) -> tuple[int, int, int]:
    """Every patch dimension a positive multiple of 16 (SegResNetDS2 downsamples 4 times)."""
    if any(s <= 0 or s % PATCH_DIVISOR for s in v):
        raise ValueError(f"every patch dimension must be a positive multiple of {PATCH_DIVISOR}, got {list(v)} "
                         "(upstream's training patch [192, 198, 128] is a typo for [192, 192, 128])")
    return v


def check_spacing(v: tuple[float, float, float]) -> tuple[float, float, float]:
    if any(s <= 0 for s in v):
        raise ValueError(f"spacing must be positive, got {list(v)}")
    return v


def check_percentiles(v: tuple[float, float]) -> tuple[float, float]:
    if not 0.0 <= v[0] < v[1] <= 100.0:
        raise ValueError(f"percentiles must satisfy 0 <= lower < upper <= 100, got {list(v)}")
    return v


class InferenceConfig(BaseModel):
    """Everything that decides what the engine computes and where it writes.

    Attributes that change the *mask* (spacing .. classes) are part of the output's resume key in the
    batch job; attributes that only change speed (device, sw_batch_size, class_chunk_size) are not.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    checkpoint: str | None = Field(None, description="model.pt path or fsspec URI")
    modality: Modality | None = Field(None, description="everything-set when no classes are given")
    classes: list[int | str] | None = Field(None, description="class ids or names; None = everything")
    points: list[tuple[float, float, float]] | None = Field(
        None, description="point prompts, voxel coordinates (i, j, k) of the INPUT image"
    )
    point_labels: list[int] | None = Field(None, description="1 = positive, 0 = negative, one per point")
    expand_subclasses: bool | None = Field(
        None, description="expand prompts 2/20/21 into their parts (upstream); None = what the checkpoint's "
        "<checkpoint>.labels.json sidecar says (finetuned models), else true")
    label_catalog: str | None = Field(None, description="project catalog JSON or upstream bundle dir")

    spacing: tuple[float, float, float] = DEFAULT_SPACING_MM
    crop_margin: int = Field(DEFAULT_CROP_MARGIN, ge=0)
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES
    patch_size: tuple[int, int, int] = DEFAULT_PATCH_SIZE
    overlap: float = Field(DEFAULT_OVERLAP, ge=0.0, lt=1.0)
    sw_batch_size: int = Field(DEFAULT_SW_BATCH_SIZE, ge=1)
    class_chunk_size: int = Field(DEFAULT_CLASS_CHUNK_SIZE, ge=1)
    device: str = Field("auto", description="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...")
    amp: bool = Field(True, description="fp16 autocast on CUDA, as upstream; ignored on CPU")

    output_dtype: OutputDType = DEFAULT_OUTPUT_DTYPE
    output_layout: Literal["nested", "flat"] = "nested"
    output_postfix: str = DEFAULT_OUTPUT_POSTFIX
    compresslevel: int = Field(DEFAULT_COMPRESSLEVEL, ge=0, le=9)
    overwrite: bool = False
    max_voxels: int = Field(DEFAULT_MAX_VOXELS, ge=1)
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options, e.g. S3 endpoint")

    _check_patch = field_validator("patch_size")(lambda cls, v: check_patch_size(v))
    _check_spacing = field_validator("spacing")(lambda cls, v: check_spacing(v))
    _check_percentiles = field_validator("percentiles")(lambda cls, v: check_percentiles(v))

    @field_validator("modality", mode="before")
    @classmethod
    def _upper_modality(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v

    @model_validator(mode="after")
    def _points_consistent(self) -> InferenceConfig:
        if self.points is not None:
            labels = self.point_labels if self.point_labels is not None else [1] * len(self.points)
            if len(labels) != len(self.points):
                raise ValueError(f"{len(self.points)} points but {len(labels)} point labels")
            if any(lbl not in (0, 1) for lbl in labels):
                raise ValueError(f"point labels must be 1 (positive) or 0 (negative), got {labels}")
            if not self.points:
                raise ValueError("points is an empty list")
        elif self.point_labels is not None:
            raise ValueError("point_labels given without points")
        return self

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_sources(cls, yaml_path: str | Path | None = None, **overrides: Any) -> InferenceConfig:
        """Defaults < YAML file < overrides (``None`` overrides are ignored, so unset CLI flags fall through)."""
        data: dict[str, Any] = {}
        if yaml_path is not None:
            data.update(load_yaml_mapping(yaml_path))
        data.update({k: v for k, v in overrides.items() if v is not None})
        return validate_config(cls, data, source=str(yaml_path) if yaml_path else "options")

    def resume_key_fields(self) -> dict[str, Any]:
        """The settings that change the mask; hashed into batch-job output keys."""
        return self.model_dump(
            include={"modality", "classes", "points", "point_labels", "expand_subclasses", "spacing", "crop_margin",
                     "percentiles", "patch_size", "overlap", "output_dtype", "label_catalog"}
        )


def load_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, raising :class:`ConfigError` with the file name on any problem."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option: value, got {type(data).__name__}")
    return data


def validate_config(model: type[BaseModel], data: dict[str, Any], *, source: str) -> Any:
    """Validate ``data`` against a pydantic model, turning errors into one readable :class:`ConfigError`."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(config)"
            problems.append(f"{where}: {err['msg']}")
        raise ConfigError(f"invalid configuration in {source}: " + "; ".join(problems)) from None
