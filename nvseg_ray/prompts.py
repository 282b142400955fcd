"""Prompts: what to segment in one volume, as global class ids (no model, no voxels).

:func:`resolve_prompts` turns the configured (or per-volume) class names/ids and modality into a
:class:`Prompts`; the model-free stages (:mod:`nvseg_ray.stages`) and the model runner
(:mod:`nvseg_ray.model_runner`) both take one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .config import MODALITY_AUTO, InferenceConfig
from .errors import PromptError
from .labels import LabelCatalog
from .model import checkpoint_label_info


@dataclass
class Prompts:
    """Resolved prompts for one volume: global class ids in prompt order, plus optional points."""

    class_ids: tuple[int, ...]
    requested: list[int | str] | None
    modality: str | None
    with_points: bool = False
    expand_subclasses: bool = True


def expands_subclasses(cfg: InferenceConfig) -> bool:
    """Whether prompts 2/20/21 expand: the explicit setting, else a finetuned checkpoint's sidecar, else true."""
    if cfg.expand_subclasses is not None:
        return cfg.expand_subclasses
    return bool(checkpoint_label_info(cfg.checkpoint, cfg.storage_options).get("expand_subclasses", True))


def auto_modality(dicom_modality: str | None, *, classes_given: bool, uri: str = "") -> str | None:
    """The everything-set ``--modality auto`` picks for a volume whose DICOM Modality tag is ``dicom_modality``
    (None: a NIfTI volume). With explicit classes the modality only matters for the brain workflow, so an unknown
    one is then no error.

    Raises:
        PromptError: ``auto`` for NIfTI input, or a DICOM modality other than CT / MR (``unsupported_modality``).
    """
    from .dicom.series import AUTO_MODALITY

    if dicom_modality is None:
        if classes_given:
            return None
        raise PromptError(f"--modality auto needs DICOM input (the Modality tag decides); {uri or 'this input'} is "
                          "NIfTI, which records no modality",
                          hint="give --modality CT_BODY, MRI_BODY or MRI_BRAIN for NIfTI volumes")
    picked = AUTO_MODALITY.get(dicom_modality.upper())
    if picked is None and not classes_given:
        raise PromptError(f"{uri or 'this series'} has Modality {dicom_modality!r}; nvseg-ray segments CT and MR "
                          "series only (--modality auto maps CT to CT_BODY and MR to MRI_BODY)",
                          hint="give --modality explicitly if this really is a CT or MR image, or leave the series out",
                          code="unsupported_modality", modality=dicom_modality)
    return picked


def resolve_prompts(cfg: InferenceConfig, catalog: LabelCatalog, *, classes: Sequence[int | str] | None = None,
                    modality: str | None = None, dicom_modality: str | None = None, uri: str = "") -> Prompts:
    """Turn the configured (or per-volume) class names/ids / modality into global ids.

    ``modality`` (per volume) wins over ``cfg.modality``; ``AUTO`` is resolved from ``dicom_modality`` (the
    series' Modality tag; None for NIfTI input) by :func:`auto_modality`.

    Raises:
        PromptError: unknown class, refused id, unknown modality, ``auto`` without a usable DICOM modality, or
            neither classes nor modality.
    """
    classes = list(classes) if classes is not None else cfg.classes
    modality = modality or cfg.modality
    if modality is not None and modality.upper() == MODALITY_AUTO:
        modality = auto_modality(dicom_modality, classes_given=bool(classes), uri=uri)
    with_points = cfg.points is not None
    if not classes and not modality:
        raise PromptError(
            "nothing to segment: give --modality (CT_BODY, MRI_BODY or MRI_BRAIN) for everything-segmentation "
            "or --classes for specific structures",
            hint="upstream silently defaults to MRI_BODY; nvseg-ray asks instead",
        )
    if with_points and not classes:
        raise PromptError("point prompts need exactly one class: add --classes NAME_OR_ID")
    expand = expands_subclasses(cfg)
    ids = catalog.resolve_prompts(classes or None, modality=modality, expand_subclasses=expand,
                                  with_points=with_points)
    return Prompts(class_ids=tuple(ids), requested=list(classes) if classes else None, modality=modality,
                   with_points=with_points, expand_subclasses=expand)
