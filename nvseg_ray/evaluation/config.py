"""What an evaluation run evaluates: :class:`EvaluateConfig` and the case selection (no Ray here)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..config import (DEFAULT_BACKEND, DEFAULT_DEVICE, DEFAULT_PATCH_SIZE, Backend, InferenceConfig, check_patch_size,
                      validate_config)
from ..errors import NvsegError
from ..training.datalist import DataItem, DataListError, global_ids, load_datalist, parse_label_mapping, split_folds

#: default label mapping of upstream evaluate.json (MSD Task09 spleen 1 -> global 3).
DEFAULT_LABEL_MAPPING: list[tuple[int, int]] = [(1, 3)]

Split = Literal["validation", "testing", "all"]


class EvaluateConfig(BaseModel):
    """What to evaluate, with which checkpoint, and where to write the tables."""

    model_config = ConfigDict(extra="forbid")

    datalist: str = Field(..., description="upstream data-list JSON (path or URI)")
    root: str | None = Field(None, description="dataset folder for relative paths; default: the data list's folder")
    checkpoint: str = Field(..., description="model.pt path or URI")
    output: str = Field(..., description="folder (or URI prefix) for per_case/per_class/summary files")
    label_mapping: list[tuple[int, int]] = Field(default_factory=lambda: list(DEFAULT_LABEL_MAPPING),
                                                 description="[[local, global], ...] (upstream label_mappings)")
    split: Split = Field("validation", description="'validation' = training items of fold `fold`; 'testing' = "
                         "testing items; 'all' = every training item plus labelled testing items")
    fold: int = Field(0, ge=0)
    patch_size: tuple[int, int, int] = DEFAULT_PATCH_SIZE
    device: str = DEFAULT_DEVICE
    backend: Backend = DEFAULT_BACKEND
    max_actors: int = Field(1, ge=1, description="model actors (each loads the checkpoint once)")
    actor_cpus: float = Field(1.0, gt=0, description="CPUs reserved per model actor")
    label_catalog: str | None = None
    storage_options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("label_mapping", mode="before")
    @classmethod
    def _mapping(cls, v: Any) -> Any:
        try:
            return [list(p) for p in parse_label_mapping(v)]
        except NvsegError as exc:
            raise ValueError(exc.message) from None

    _check_patch = field_validator("patch_size")(lambda cls, v: check_patch_size(v))  # the engine's own rule

    @classmethod
    def from_options(cls, **options: Any) -> EvaluateConfig:
        """Validate options (``None`` values are dropped), raising one readable ConfigError."""
        return validate_config(cls, {k: v for k, v in options.items() if v is not None}, source="options")

    def inference_config(self) -> InferenceConfig:
        """The engine configuration: the mapped global ids as class prompts, no subclass expansion."""
        return InferenceConfig(checkpoint=self.checkpoint, classes=list(global_ids(self.label_mapping)),
                               expand_subclasses=False, patch_size=self.patch_size, device=self.device,
                               backend=self.backend,
                               label_catalog=self.label_catalog, storage_options=self.storage_options)


def select_items(cfg: EvaluateConfig) -> list[DataItem]:
    """The labelled items of ``cfg.split`` (see :class:`EvaluateConfig`).

    Raises:
        DataListError: the data list is malformed, the selection is empty, or a selected item has no label.
    """
    data = load_datalist(cfg.datalist, cfg.root, cfg.storage_options)
    if cfg.split == "validation":
        _, items = split_folds(data.training, cfg.fold)
        if not items:
            folds = sorted({it.fold for it in data.training if it.fold is not None})
            raise DataListError([f"fold {cfg.fold} has no training items (folds present: {folds})"],
                                source=cfg.datalist)
    elif cfg.split == "testing":
        items = list(data.testing)
    else:
        items = list(data.training) + [it for it in data.testing if it.label is not None]
    if not items:
        raise DataListError([f"split {cfg.split!r} selects no items"], source=cfg.datalist)
    unlabelled = [it.case_id for it in items if it.label is None]
    if unlabelled:
        raise DataListError([f"{c}: no label (evaluation needs ground truth)" for c in unlabelled],
                            source=cfg.datalist, hint="upstream testing items carry no labels; evaluate a "
                            "validation fold (--split validation --fold K) or add 'label' entries")
    ids = [it.case_id for it in items]
    dupes = sorted({c for c in ids if ids.count(c) > 1})
    if dupes:
        raise DataListError([f"case id {c!r} (image file stem) occurs more than once" for c in dupes],
                            source=cfg.datalist)
    return items
