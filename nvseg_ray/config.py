"""Typed configuration for inference, with named defaults.

One :class:`InferenceConfig` drives the CLI, the batch job and the Serve app. Its defaults are the
upstream NV-Segment-CTMR ``configs/inference.json`` values *as they actually take effect* (see
docs/upstream.md, Inference, and Upstream bugs, item 4: the configured overlap 0.3 never reaches the
inferer, 0.25 does). Values come, in increasing priority, from these defaults, a YAML file, and explicit
overrides (CLI flags).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import math
import re

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from .errors import ConfigError, PromptError

# --- upstream-exact preprocessing / inferer defaults -------------------------------------------------
DEFAULT_SPACING_MM: tuple[float, float, float] = (1.5, 1.5, 1.5)
DEFAULT_CROP_MARGIN = 10
DEFAULT_PERCENTILES: tuple[float, float] = (1.0, 99.0)
DEFAULT_PATCH_SIZE: tuple[int, int, int] = (192, 192, 128)
DEFAULT_OVERLAP = 0.25
DEFAULT_SW_BATCH_SIZE = 1
#: fp16 autocast on CUDA, as upstream's evaluator (ignored on CPU).
DEFAULT_AMP = True
#: patch dimensions must be divisible by 2 ** (len(blocks_down) - 1) for SegResNetDS2.
PATCH_DIVISOR = 16
#: Largest patch edge. MONAI pads an image smaller than the patch up to the patch, so the patch alone sets the
#: memory of every window: 512 is 2.7x upstream's largest edge (192).
MAX_PATCH_EDGE = 512
#: Largest patch volume: 256^3 = 16.8 M voxels, 3.6x upstream's 192x192x128 (4.7 M). The first encoder stage
#: alone holds 48 channels per voxel (~3 GiB in float32 at this size), so larger patches exhaust memory
#: before the first window finishes.
MAX_PATCH_VOXELS = 256**3
#: Largest window overlap. The window step is patch x (1 - overlap): at 0.9 every voxel is already covered
#: by ~1000 windows in 3-D; above it the number of windows (and the run time) grows without bound.
MAX_OVERLAP = 0.9
#: Most windows run in one forward pass (each is a full patch of activations).
MAX_SW_BATCH_SIZE = 64
#: Longest output postfix (a file-name fragment).
MAX_POSTFIX_LENGTH = 64
_POSTFIX = re.compile(r"[A-Za-z0-9._-]*")
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?|mps")
DEVICE_CHOICES = "auto (cuda when available), cpu, cuda, cuda:N (N = GPU index), mps"
#: InferenceConfig fields whose problems are prompt problems (PromptError, ``invalid_prompt``).
PROMPT_FIELDS = frozenset({"classes", "points", "point_labels"})

# --- our own defaults ---------------------------------------------------------------------------------
#: classes whose logits are materialised at once when taking the argmax (memory vs. speed).
DEFAULT_CLASS_CHUNK_SIZE = 16
#: 'auto': the GPU when there is one, else the CPU.
DEFAULT_DEVICE = "auto"
#: How the network runs (:mod:`nvseg_ray.backends`): ``auto`` = TensorRT for the image encoder where it can run
#: (a CUDA device, TensorRT 10.x, polygraphy, onnx: upstream's fastest path, 1.5x its AMP per volume), else
#: PyTorch (fp16 autocast on CUDA, as upstream); every fallback is reported with its reason.
DEFAULT_BACKEND = "auto"
Backend = Literal["auto", "torch", "trt", "compile"]
#: ``--sw-batch-size auto``: windows per forward pass chosen from the device's free memory (1 on CPU).
SW_BATCH_AUTO = "auto"
#: every one of the 345 label ids fits; a quarter of upstream's float32 file (docs/upstream.md, Outputs).
DEFAULT_OUTPUT_DTYPE = "uint16"
DEFAULT_OUTPUT_POSTFIX = "trans"
DEFAULT_COMPRESSLEVEL = 1
#: Largest volume accepted, in voxels (the input grid and the resampled model grid alike; CLI ``--max-voxels``):
#: 2**29 = 536,870,912 voxels, a 2 GiB float32 array. Covers the largest routine scans (whole-body CT at
#: 512 x 512 x 2000 = 524 M voxels) while refusing accidental giants (e.g. a 1024^3 micro-CT) that would
#: exhaust host/GPU memory during resampling and sliding-window inference. :mod:`nvseg_ray.io` also applies it
#: to a header's declared size before inflating a ``.nii.gz``.
DEFAULT_MAX_VOXELS = 1024**3 // 2

Modality = Literal["CT_BODY", "MRI_BODY", "MRI_BRAIN"]
#: ``--modality auto``: each DICOM series' Modality tag picks the everything-set (CT -> CT_BODY, MR -> MRI_BODY;
#: MRI_BRAIN only when asked for by name). NIfTI carries no modality, so ``auto`` is refused for NIfTI input.
MODALITY_AUTO = "AUTO"
#: What is written per volume: ``auto`` = NIfTI + DICOM SEG for DICOM input, NIfTI for NIfTI input (a SEG needs
#: the source instances it references, which NIfTI input does not have).
OutputFormat = Literal["auto", "nifti", "dicom-seg", "both"]
DEFAULT_OUTPUT_FORMAT = "auto"
#: BINARY (the classic Segmentation Storage SOP class) is what every viewer and PACS reads; LABELMAP (2024) is
#: smaller and faster to write but older viewers, PACS and dciodvfy do not know it yet.
DEFAULT_SEG_TYPE = "binary"
OutputDType = Literal["uint8", "uint16", "int16", "int32", "float32"]


def check_patch_size(v: tuple[int, int, int]) -> tuple[int, int, int]:
    """Every patch dimension a positive multiple of 16 (SegResNetDS2 downsamples 4 times), at most
    :data:`MAX_PATCH_EDGE`, and at most :data:`MAX_PATCH_VOXELS` voxels in all."""
    if any(s <= 0 or s % PATCH_DIVISOR for s in v):
        raise ValueError(f"every patch dimension must be a positive multiple of {PATCH_DIVISOR}, got {list(v)} "
                         "(upstream's training patch [192, 198, 128] is a typo for [192, 192, 128])")
    if max(v) > MAX_PATCH_EDGE:
        raise ValueError(f"every patch dimension must be at most {MAX_PATCH_EDGE}, got {list(v)} (the patch sets the "
                         "memory of every window; upstream uses 192, 192, 128)")
    if math.prod(v) > MAX_PATCH_VOXELS:
        raise ValueError(f"the patch {list(v)} has {math.prod(v):,} voxels, above the limit of {MAX_PATCH_VOXELS:,} "
                         "(256^3; each voxel holds 48+ feature channels per window); upstream uses 192, 192, 128")
    return v


def check_sw_batch_size(v: Any) -> Any:
    """``"auto"`` or an integer 1..:data:`MAX_SW_BATCH_SIZE` (a numeric string from a flag or YAML is accepted)."""
    if isinstance(v, str) and v.strip().lower() == SW_BATCH_AUTO:
        return SW_BATCH_AUTO
    try:
        n = int(v) if not isinstance(v, bool) and float(v) == int(float(v)) else None
    except (TypeError, ValueError):
        n = None
    if n is None or not 1 <= n <= MAX_SW_BATCH_SIZE:
        raise ValueError(f"sw_batch_size must be 'auto' or an integer 1..{MAX_SW_BATCH_SIZE}, got {v!r}")
    return n


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
    (:mod:`nvseg_ray.brain`; docs/upstream.md, Brain T1 workflow)."""

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


class DicomConfig(BaseModel):
    """How DICOM series are read and DICOM SEG objects written (:mod:`nvseg_ray.dicom`)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    resample: bool = Field(False, description="resample an irregular stack (uneven spacing, a missing slice, gantry "
                           "tilt) onto a regular grid instead of refusing it; the report says so")
    seg_type: Literal["binary", "labelmap"] = Field(DEFAULT_SEG_TYPE, description="binary: classic Segmentation "
                                                    "Storage (every viewer); labelmap: Label Map SEG (smaller, newer)")


class QualityConfig(BaseModel):
    """What is computed and written next to each mask to judge it (:mod:`nvseg_ray.quality`). None of it changes
    the mask, so none of it is part of a volume's resume key."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    qc: bool = Field(True, description="per-structure statistics (volume, intensities in the input's units, bounding "
                     "box, cut by the field of view) and the QC flags, in the JSON report; costs well under a second "
                     "per volume next to several CPU-seconds of the other stages")
    preview: bool | None = Field(None, description="one PNG per volume (axial, coronal, sagittal slices with the "
                                 "labels overlaid) next to the mask; None = on in the batch job (a run of thousands "
                                 "of volumes is judged from pictures), off for `nvseg segment` and Serve (which "
                                 "returns it on request)")
    colour_tables: bool = Field(True, description="a 3D Slicer colour table (.ctbl) and an ITK-SNAP label "
                                "description (.itksnap.txt) next to each NIfTI mask, so viewers show names and "
                                "colours")

    @property
    def needs_voxels(self) -> bool:
        """Whether the input's voxels must outlive ``prepare`` (intensity statistics, the intensity flag, the
        preview's grey background); otherwise they are dropped before the model runs."""
        return self.qc or bool(self.preview)


class InferenceConfig(BaseModel):
    """Everything that decides what the engine computes and where it writes.

    Attributes that change the *mask* (spacing .. classes) are part of the output's resume key in the
    batch job; attributes that only change speed (device, sw_batch_size, class_chunk_size) are not.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    checkpoint: str | None = Field(None, description="model.pt path or fsspec URI")
    modality: Modality | Literal["AUTO"] | None = Field(
        None, description="everything-set when no classes are given; AUTO: from each DICOM series' Modality tag")
    classes: list[StrictInt | str] | None = Field(None, description="class ids or names; None = everything")
    points: list[tuple[float, float, float]] | None = Field(
        None, description="point prompts, voxel coordinates (i, j, k) of the INPUT image; finite, and inside "
        "the volume (checked per volume)"
    )
    point_labels: list[StrictInt] | None = Field(None, description="1 = positive, 0 = negative, one per point")
    expand_subclasses: bool | None = Field(
        None, description="expand prompts 2/20/21 into their parts (upstream); None = what the checkpoint's "
        "<checkpoint>.labels.json sidecar says (finetuned models), else true")
    label_catalog: str | None = Field(None, description="project catalog JSON or upstream bundle dir")

    spacing: tuple[float, float, float] = DEFAULT_SPACING_MM
    crop_margin: int = Field(DEFAULT_CROP_MARGIN, ge=0)
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES
    patch_size: tuple[int, int, int] = DEFAULT_PATCH_SIZE
    overlap: float = Field(DEFAULT_OVERLAP, description="window overlap fraction in [0, 0.9]")
    sw_batch_size: int | Literal["auto"] = Field(DEFAULT_SW_BATCH_SIZE, description=f"windows per forward pass, 1.."
                                                 f"{MAX_SW_BATCH_SIZE}; 'auto': from the GPU's free memory")
    class_chunk_size: int = Field(DEFAULT_CLASS_CHUNK_SIZE, ge=1)
    device: str = Field(DEFAULT_DEVICE, description="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', 'mps'")
    amp: bool = Field(DEFAULT_AMP, description="fp16 autocast on CUDA, as upstream; ignored on CPU")
    backend: Backend = Field(DEFAULT_BACKEND, description="auto (TensorRT encoder when it can run, else torch), "
                             "torch, trt (TensorRT fp16 encoder), compile (torch.compile of the encoder)")
    engine_cache_dir: str | None = Field(None, description="node-local folder of TensorRT engines; None = "
                                         "$NVSEG_ENGINE_CACHE or ~/.cache/nvseg-ray/engines")

    output_dtype: OutputDType = DEFAULT_OUTPUT_DTYPE
    output_layout: Literal["nested", "flat"] = "nested"
    output_postfix: str = Field(DEFAULT_OUTPUT_POSTFIX, description="mask file-name fragment: letters, digits, "
                                "'.', '_', '-' (no path separators), at most 64 characters; '' for none")
    output_format: OutputFormat = Field(DEFAULT_OUTPUT_FORMAT, description="nifti, dicom-seg, both, or auto (both "
                                        "for DICOM input, nifti for NIfTI input)")
    dicom: DicomConfig = Field(default_factory=DicomConfig, description="DICOM series reading and SEG writing")
    compresslevel: int = Field(DEFAULT_COMPRESSLEVEL, ge=0, le=9)
    overwrite: bool = False
    max_voxels: int = Field(DEFAULT_MAX_VOXELS, ge=1)
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options, e.g. S3 endpoint")
    brain: BrainConfig = Field(default_factory=BrainConfig, description="brain T1 workflow (modality MRI_BRAIN)")
    quality: QualityConfig = Field(default_factory=QualityConfig, description="QC statistics, flags, preview and "
                                   "viewer colour tables next to each mask")

    _check_patch = field_validator("patch_size")(lambda cls, v: check_patch_size(v))
    _check_spacing = field_validator("spacing")(lambda cls, v: check_spacing(v))
    _check_percentiles = field_validator("percentiles")(lambda cls, v: check_percentiles(v))

    @field_validator("modality", mode="before")
    @classmethod
    def _upper_modality(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v

    @field_validator("classes", mode="before")
    @classmethod
    def _no_boolean_classes(cls, v: Any) -> Any:
        """``true`` is an int in Python (and would prompt class 1, the liver): refuse booleans outright."""
        if isinstance(v, (list, tuple)) and any(isinstance(item, bool) for item in v):
            raise PydanticCustomError("invalid_prompt", "class prompts must be class ids (integers) or names "
                                      "(strings), got a boolean in {classes}", {"classes": list(v)})
        return v

    @field_validator("points")
    @classmethod
    def _finite_points(cls, v: list[tuple[float, float, float]] | None) -> Any:
        for point in v or ():
            if not all(math.isfinite(c) for c in point):
                raise PydanticCustomError("invalid_prompt", "point {point} has a NaN/Inf coordinate; points are voxel "
                                          "indices i,j,k of the input image", {"point": list(point)})
        return v

    @field_validator("output_postfix")
    @classmethod
    def _safe_postfix(cls, v: str) -> str:
        if len(v) > MAX_POSTFIX_LENGTH or not _POSTFIX.fullmatch(v) or v.strip(".") == "" and v:
            raise ValueError(f"the output postfix must be a file-name fragment of at most {MAX_POSTFIX_LENGTH} "
                             f"letters, digits, '.', '_' or '-' (no '/', '\\' or '..'-only names), got {v!r}; "
                             "e.g. --postfix seg")
        return v

    @field_validator("sw_batch_size", mode="before")
    @classmethod
    def _window_batch(cls, v: Any) -> Any:
        return check_sw_batch_size(v)

    @field_validator("overlap")
    @classmethod
    def _bounded_overlap(cls, v: float) -> float:
        if not 0.0 <= v <= MAX_OVERLAP:  # also NaN
            raise ValueError(f"overlap must be between 0 and {MAX_OVERLAP}, got {v}: the window step is patch x "
                             "(1 - overlap), so near 1 the number of windows grows without bound (upstream: 0.25)")
        return v

    @field_validator("device")
    @classmethod
    def _known_device(cls, v: str) -> str:
        if not _DEVICE.fullmatch(v.strip().lower()):
            raise ValueError(f"unknown device {v!r}; use {DEVICE_CHOICES}")
        return v.strip().lower()

    @model_validator(mode="after")
    def _points_consistent(self) -> InferenceConfig:
        def bad(message: str) -> PydanticCustomError:
            return PydanticCustomError("invalid_prompt", message)

        if self.points is not None:
            labels = self.point_labels if self.point_labels is not None else [1] * len(self.points)
            if len(labels) != len(self.points):
                raise bad(f"{len(self.points)} points but {len(labels)} point labels")
            if any(lbl not in (0, 1) for lbl in labels):
                raise bad(f"point labels must be 1 (positive) or 0 (negative), got {labels}")
            if not self.points:
                raise bad("points is an empty list")
        elif self.point_labels is not None:
            raise bad("point_labels given without points")
        return self

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_sources(cls, yaml_path: str | Path | None = None, **overrides: Any) -> InferenceConfig:
        """Defaults < YAML file < overrides (``None`` overrides are ignored, so unset CLI flags fall through)."""
        data: dict[str, Any] = load_yaml_mapping(yaml_path) if yaml_path is not None else {}
        return validate_config(cls, merge_overrides(data, overrides), source=str(yaml_path) if yaml_path else "options")

    def output_formats(self, *, dicom: bool, to_dicomweb: bool = False) -> tuple[bool, bool]:
        """``(write_nifti, write_seg)`` for a DICOM series (``dicom``) or a NIfTI volume; ``to_dicomweb``: the SEGs
        go to a DICOMweb server, so ``auto`` means the SEG only.

        Raises:
            ConfigError: ``dicom-seg`` / ``both`` for NIfTI input (a SEG references source instances).
        """
        fmt = self.output_format
        if fmt == "auto":
            return not (dicom and to_dicomweb), dicom
        if not dicom and fmt != "nifti":
            raise ConfigError(f"--output-format {fmt} needs DICOM input: a DICOM SEG references the source series' "
                              "instances, which a NIfTI volume does not have",
                              hint="use --output-format nifti (the default for NIfTI input), or give the DICOM series")
        return fmt in ("nifti", "both"), fmt in ("dicom-seg", "both")

    def uses_brain_workflow(self, modality: str | None = None) -> bool:
        """Whether a volume of ``modality`` (default: the configured one) runs the brain T1 workflow."""
        return (modality or self.modality) == "MRI_BRAIN" and self.brain.preprocess == "full"

    def resume_key_fields(self, modality: str | None = None, *, dicom: bool = False) -> dict[str, Any]:
        """The settings that change the outputs of a volume of ``modality`` (default: the configured one); hashed
        into batch-job output keys. The brain settings count only for MRI_BRAIN volumes, the DICOM settings and the
        output format only for DICOM series."""
        fields = {"modality", "classes", "points", "point_labels", "expand_subclasses", "spacing", "crop_margin",
                  "percentiles", "patch_size", "overlap", "output_dtype", "label_catalog"}
        if (modality or self.modality) == "MRI_BRAIN":
            fields.add("brain")
        if dicom:
            fields |= {"dicom", "output_format"}
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


def is_prompt_problem(err: Any) -> bool:
    """Whether one pydantic error dict concerns the prompts (class list, points, point labels)."""
    loc = err.get("loc") or ()
    return err.get("type") == "invalid_prompt" or bool(loc) and loc[0] in PROMPT_FIELDS


def validate_config(model: type[BaseModel], data: dict[str, Any], *, source: str) -> Any:
    """Validate ``data`` against a pydantic model, turning errors into one readable error.

    Raises:
        PromptError: every problem is in the prompts (``classes``, ``points``, ``point_labels``).
        ConfigError: otherwise.
    """
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = []
        errors = exc.errors()
        for err in errors:
            where = ".".join(str(p) for p in err["loc"]) or "(config)"
            problems.append(f"{where}: {err['msg']}")
        if all(is_prompt_problem(err) for err in errors):
            raise PromptError(f"invalid prompts in {source}: " + "; ".join(problems),
                              hint="classes are ids or names (`nvseg labels --search WORD`); points are voxel "
                              "indices 'i,j,k' of the input, each with a label 1 (positive) or 0 (negative)") from None
        raise ConfigError(f"invalid configuration in {source}: " + "; ".join(problems)) from None
