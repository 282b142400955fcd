"""Configuration of continual-learning / finetuning runs (``jobs/train.py``).

Defaults are upstream NV-Segment-CTMR ``train.json`` + ``train_continual.json`` as they take effect
(docs/upstream.md, Training and evaluation), except where upstream is broken (docs/upstream.md, Upstream
bugs, item 3: the patch [192, 198, 128] is not divisible by 16 and crashes; we use the documented finetuning
patch 128³) or limited (batch size 1 only: here any batch size works because prompts are sampled per sample).
Values come, in increasing priority, from these defaults, a YAML file and explicit overrides (CLI flags),
exactly like :class:`BatchConfig`.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..config import (
    DEFAULT_CROP_MARGIN,
    DEFAULT_OVERLAP,
    DEFAULT_PERCENTILES,
    check_patch_size,
    check_percentiles,
    check_spacing,
    load_yaml_mapping,
    validate_config,
)

# --- upstream train.json / train_continual.json values (pinned by tests/test_training.py) --------------
DEFAULT_EPOCHS = 5
DEFAULT_LEARNING_RATE = 5e-5  # train_continual.json (train.json: 1e-4)
DEFAULT_WEIGHT_DECAY = 0.01  # train_continual redefines AdamW with lr only -> torch's default
DEFAULT_LABEL_MAPPING: tuple[tuple[int, int], ...] = ((1, 3),)  # MSD spleen 1 -> global 3 (spleen)
DEFAULT_FOLD = 0
DEFAULT_NUM_PATCHES_PER_IMAGE = 1
DEFAULT_MAX_POINT = 5
DEFAULT_DROP_LABEL_PROB = 0.25
DEFAULT_DROP_POINT_PROB = 0.25
DEFAULT_VAL_INTERVAL = 1
DEFAULT_SPACING = 1.5
DEFAULT_LOSS_SMOOTH_NR = 1e-4  # train_continual override
DEFAULT_LOSS_SMOOTH_DR = 1e-2  # train_continual override
#: train.json's ``WarmupCosineSchedule(warmup_steps=3, warmup_multiplier=0.1)``, stepped once per epoch. Used
#: only with ``lr_schedule`` (train_continual.json trains without a scheduler); the warmup is capped at ``epochs``.
DEFAULT_WARMUP_EPOCHS = 3
DEFAULT_WARMUP_MULTIPLIER = 0.1  # the first epoch runs at 0.1 x learning_rate
DEFAULT_INTENSITY_AUG_PROB = 0.2  # RandScale/RandShift/RandGaussianNoise/RandGaussianSmooth (train_continual)

# --- our own defaults ----------------------------------------------------------------------------------
#: upstream's [192, 198, 128] is a typo that crashes SegResNetDS2; docs/finetune says 128³.
DEFAULT_TRAIN_PATCH_SIZE: tuple[int, int, int] = (128, 128, 128)
DEFAULT_BATCH_SIZE = 1
DEFAULT_NUM_WORKERS = 2  # Ray Train workers (one DDP rank each)
DEFAULT_LOADER_WORKERS = 2  # DataLoader processes per rank
DEFAULT_CACHE_RATE = 1.0  # train_continual: CacheDataset cache_rate 1.0
DEFAULT_FLIP_PROB = 0.0  # off: left/right classes (kidneys, lungs, ...) would swap meaning
DEFAULT_MAX_FAILURES = 1
DEFAULT_NUM_TO_KEEP = 2
DEFAULT_MLFLOW_TRACKING_URI = "mlruns"  # upstream: a local file store under the bundle
DEFAULT_EXPERIMENT_NAME = "nvseg-finetune"
DEFAULT_STORAGE_PATH = "runs/train"
DEFAULT_OUTPUT = "models/model_finetune.pt"  # upstream key_metric_filename
DEFAULT_SEED = 0
#: mapping targets that inference would expand into parts unless ``expand_subclasses`` is false.
SUBCLASS_GROUP_IDS: frozenset[int] = frozenset({2, 20, 21})


class TrainConfig(BaseModel):
    """Everything a finetuning run needs; serialisable to a plain dict for ``train_loop_config``."""

    model_config = ConfigDict(extra="forbid")

    # data
    datalist: str = Field(..., description="data list JSON (local path or fsspec URI) with training/testing items")
    root: str | None = Field(None, description="base folder/prefix joined to relative paths; default: the datalist's")
    fold: int = Field(DEFAULT_FOLD, ge=0, description="items with this fold validate, all others train")
    label_mapping: tuple[tuple[int, int], ...] = Field(DEFAULT_LABEL_MAPPING,
                                                       description="[[local, global], ...] label ids")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options, e.g. S3 endpoint")
    check_values: bool = Field(True, description="read every label before training to check its values")

    # model / optimisation
    checkpoint: str = Field(..., description="pretrained model.pt to start from (path or fsspec URI)")
    epochs: int = Field(DEFAULT_EPOCHS, ge=1)
    learning_rate: float = Field(DEFAULT_LEARNING_RATE, gt=0)
    weight_decay: float = Field(DEFAULT_WEIGHT_DECAY, ge=0)
    lr_schedule: bool = Field(False, description="WarmupCosineSchedule per epoch (off in train_continual)")
    batch_size: int = Field(DEFAULT_BATCH_SIZE, ge=1, description="patches per optimiser step and rank")
    num_patches_per_image: int = Field(DEFAULT_NUM_PATCHES_PER_IMAGE, ge=1)
    max_point: int = Field(DEFAULT_MAX_POINT, ge=1)
    drop_label_prob: float = Field(DEFAULT_DROP_LABEL_PROB, ge=0, le=1)
    drop_point_prob: float = Field(DEFAULT_DROP_POINT_PROB, ge=0, le=1)
    loss_smooth_nr: float = Field(DEFAULT_LOSS_SMOOTH_NR, ge=0)
    loss_smooth_dr: float = Field(DEFAULT_LOSS_SMOOTH_DR, ge=0)
    amp: bool = Field(True, description="fp16 autocast + GradScaler on CUDA; ignored on CPU")
    seed: int | None = Field(DEFAULT_SEED, description="per-rank seed = seed + rank; None = nondeterministic")

    # preprocessing / augmentation
    patch_size: tuple[int, int, int] = DEFAULT_TRAIN_PATCH_SIZE
    spacing: tuple[float, float, float] = (DEFAULT_SPACING,) * 3
    crop_margin: int = Field(DEFAULT_CROP_MARGIN, ge=0)
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES
    flip_prob: float = Field(DEFAULT_FLIP_PROB, ge=0, le=1, description="per-axis RandFlip probability")
    intensity_aug_prob: float = Field(DEFAULT_INTENSITY_AUG_PROB, ge=0, le=1)
    cache_rate: float = Field(DEFAULT_CACHE_RATE, ge=0, le=1, description="share of preprocessed volumes cached")

    # validation
    val_interval: int = Field(DEFAULT_VAL_INTERVAL, ge=1, description="validate every N epochs (and the last)")
    val_overlap: float = Field(DEFAULT_OVERLAP, ge=0, lt=1)

    # Ray Train
    num_workers: int = Field(DEFAULT_NUM_WORKERS, ge=1, description="Ray Train workers (DDP ranks)")
    loader_workers: int = Field(DEFAULT_LOADER_WORKERS, ge=0, description="DataLoader processes per rank")
    use_gpu: bool | None = Field(None, description="one GPU per worker; None = when the cluster has GPUs")
    device: str = Field("auto", description="'auto' = the worker's GPU when use_gpu, else CPU; or 'cpu'")
    cpus_per_worker: float = Field(1.0, gt=0)
    storage_path: str = Field(DEFAULT_STORAGE_PATH, description="local folder or s3:// URI for Ray checkpoints")
    run_name: str | None = Field(None, description="re-run with the same name to resume; default: a timestamp")
    max_failures: int = Field(DEFAULT_MAX_FAILURES, ge=-1, description="worker-group restarts (-1 = unlimited)")
    num_to_keep: int = Field(DEFAULT_NUM_TO_KEEP, ge=1, description="Ray checkpoints kept")
    ray_address: str | None = Field(None, description="Ray cluster address; default: RAY_ADDRESS or a local Ray")

    # tracking / export
    mlflow_tracking_uri: str | None = Field(DEFAULT_MLFLOW_TRACKING_URI,
                                            description="MLflow URI or local folder; empty/None disables MLflow")
    experiment_name: str = DEFAULT_EXPERIMENT_NAME
    output: str = Field(DEFAULT_OUTPUT, description="final model.pt (path or fsspec URI) + .labels.json sidecar")

    @field_validator("label_mapping", mode="before")
    @classmethod
    def _parse_mapping(cls, v: Any) -> Any:
        from ..errors import NvsegError
        from .datalist import parse_label_mapping

        try:
            return parse_label_mapping(v)
        except NvsegError as err:  # pydantic only collects ValueErrors
            raise ValueError(err.message) from None

    _check_patch = field_validator("patch_size")(lambda cls, v: check_patch_size(v))

    @field_validator("spacing", mode="before")
    @classmethod
    def _spacing_triplet(cls, v: Any) -> Any:
        if isinstance(v, (int, float)):
            v = (float(v),) * 3
        return v

    _check_spacing = field_validator("spacing")(lambda cls, v: check_spacing(v))
    _check_percentiles = field_validator("percentiles")(lambda cls, v: check_percentiles(v))

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if not self.label_mapping:
            raise ValueError("label_mapping is empty: give at least one [local, global] pair")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
        return self

    # -- derived -----------------------------------------------------------------------------------
    @property
    def global_ids(self) -> tuple[int, ...]:
        """Distinct global class ids trained (the class prompts), in mapping order."""
        return tuple(dict.fromkeys(g for _, g in self.label_mapping))

    @property
    def expand_subclasses(self) -> bool:
        """False when a trained class is a group id (2/20/21) that inference would otherwise expand."""
        return not (set(self.global_ids) & SUBCLASS_GROUP_IDS)

    def resolved_run_name(self) -> str:
        return self.run_name or _dt.datetime.now().strftime("train-%Y%m%d-%H%M%S")

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_sources(cls, yaml_path: str | Path | None = None, **overrides: Any) -> TrainConfig:
        """Defaults < YAML < overrides (``None`` overrides are ignored, so unset CLI flags fall through)."""
        data: dict[str, Any] = load_yaml_mapping(yaml_path) if yaml_path is not None else {}
        data.update({k: v for k, v in overrides.items() if v is not None})
        return validate_config(cls, data, source=str(yaml_path) if yaml_path else "options")
