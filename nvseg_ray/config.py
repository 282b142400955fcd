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


class BrainConfig(BaseModel):
    """The brain T1 workflow run before and after the model when the modality is ``MRI_BRAIN``
    (:mod:`nvseg_ray.brain`; UPSTREAM.md §9)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    preprocess: Literal["full", "none"] = Field(
        "full", description="full: skull strip, N4, WM-peak normalisation, registration to the template and revert; "
        "none: the input is already template-aligned (upstream's manual mode)")
    skull_strip: Literal["atlas", "command", "none"] = Field(
        "atlas", description="atlas: register the head to the template and bring its brain mask back; command: run "
        "skull_strip_command; none: the input is already skull-stripped")
    skull_strip_command: str | None = Field(
        None, description="command line with {input}, {output} and optionally {mask} placeholders, e.g. "
        "'mri_synthstrip -i {input} -o {output} -m {mask}'")
    skull_strip_timeout_s: float = Field(300.0, gt=0)
    template: str | None = Field(None, description="template T1 (e.g. LUMIR_template.nii.gz) path or URI; None = the "
                                 "ICBM152 2009a template shipped in nilearn")
    template_mask: str | None = Field(None, description="template brain mask; None = template > 0 (or nilearn's)")
    bias_correction: bool = Field(True, description="N4 bias-field correction")
    min_brain_ml: float = Field(600.0, gt=0, description="smaller brain masks flag a failed strip/registration")
    max_brain_ml: float = Field(2600.0, gt=0, description="larger brain masks flag a failed strip/registration")
    min_correlation: float = Field(0.5, ge=-1, le=1, description="registered image vs template correlation inside "
                                   "the template brain below this flags a failed registration")

    @model_validator(mode="after")
    def _command_given(self) -> BrainConfig:
        if self.skull_strip == "command":
            if not self.skull_strip_command:
                raise ValueError("skull_strip 'command' needs skull_strip_command, e.g. "
                                 "'mri_synthstrip -i {input} -o {output} -m {mask}'")
            if "{input}" not in self.skull_strip_command or "{output}" not in self.skull_strip_command:
                raise ValueError("skull_strip_command must contain the {input} and {output} placeholders")
        if self.min_brain_ml >= self.max_brain_ml:
            raise ValueError(f"min_brain_ml ({self.min_brain_ml}) must be below max_brain_ml ({self.max_brain_ml})")
        return self


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
    brain: BrainConfig = Field(default_factory=BrainConfig, description="brain T1 workflow (modality MRI_BRAIN)")

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
        data: dict[str, Any] = load_yaml_mapping(yaml_path) if yaml_path is not None else {}
        return validate_config(cls, merge_overrides(data, overrides), source=str(yaml_path) if yaml_path else "options")

    def uses_brain_workflow(self, modality: str | None = None) -> bool:
        """Whether a volume of ``modality`` (default: the configured one) runs the brain T1 workflow."""
        return (modality or self.modality) == "MRI_BRAIN" and self.brain.preprocess == "full"

    def resume_key_fields(self, modality: str | None = None) -> dict[str, Any]:
        """The settings that change the mask of a volume of ``modality`` (default: the configured one); hashed
        into batch-job output keys. The brain settings count only for MRI_BRAIN volumes."""
        fields = {"modality", "classes", "points", "point_labels", "expand_subclasses", "spacing", "crop_margin",
                  "percentiles", "patch_size", "overlap", "output_dtype", "label_catalog"}
        if (modality or self.modality) == "MRI_BRAIN":
            fields.add("brain")
        return self.model_dump(include=fields)


def merge_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``data`` updated with the non-None ``overrides``; mapping values (e.g. ``brain``) merge one level deep, so a
    flag overrides one nested field without dropping the others that came from YAML."""
    out = dict(data)
    for key, value in overrides.items():
        if value is None:
            continue
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            value = {**out[key], **{k: v for k, v in value.items() if v is not None}}
        elif isinstance(value, dict):
            value = {k: v for k, v in value.items() if v is not None}
        out[key] = value
    return out


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
