"""The brain T1 workflow chained for the engine: input grid -> template grid (before the model) and back (after).

:func:`prepare_brain` runs on a CPU worker before the model stage and returns the image on the template's 1 mm
grid plus a small :class:`BrainRecord`; the ordinary MRI_BRAIN preprocessing (1.5 mm, crop, percentiles, RAS)
then runs on that image. After the model, :func:`revert_to_input` maps the label map from the template grid onto
the exact input grid with the record. Quality checks (brain volume, correlation with the template) fail the
volume with a clear code instead of passing a misregistered image to the model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import nibabel as nib
import numpy as np

from ..config import BrainConfig
from ..errors import InputError
from ..timing import timed
from .intensity import check_t1_like, n4_bias_correct, normalize_wm_peak
from .registration import normalized_correlation, register_affine, warp_to_template
from .revert import template_to_input_grid
from .skullstrip import atlas_mask, command_mask
from .template import BrainTemplate, load_template

#: levels of the refining registration of the stripped brain (starts from the head registration).
REFINE_LEVELS_MM = (4.0, 2.0)
#: Smallest head scan the workflow accepts, per axis: the registration pyramid shrinks the image down to ~8 mm
#: voxels (ITK needs a few voxels per axis at that level), and an adult brain spans >= ~120 mm on every axis,
#: so a field of view below 80 mm cannot hold one.
MIN_HEAD_VOXELS = 16
MIN_HEAD_EXTENT_MM = 80.0


def check_head_size(shape: tuple[int, ...], affine: np.ndarray, *, uri: str) -> None:
    """Refuse a scan too small to be a whole head before ITK sees it (``too_small``; ITK fails with an
    internal error on e.g. a 6^3 volume)."""
    spacing = np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))
    extent = np.asarray(shape[:3], dtype=np.float64) * spacing
    if min(shape[:3]) < MIN_HEAD_VOXELS or float(extent.min()) < MIN_HEAD_EXTENT_MM:
        raise InputError(
            f"{uri!r} is too small for the brain workflow: shape {tuple(int(n) for n in shape[:3])}, field of view "
            f"{tuple(round(float(e), 1) for e in extent)} mm; a whole-head T1 needs at least {MIN_HEAD_VOXELS} voxels "
            f"and {MIN_HEAD_EXTENT_MM:.0f} mm along every axis.",
            code="too_small",
            hint="Pass the whole-head T1 scan; for an image already aligned to the template use --brain-preprocess none.",
            uri=uri, shape=[int(n) for n in shape[:3]], extent_mm=[round(float(e), 3) for e in extent],
        )


@dataclass
class BrainRecord:
    """What the revert needs and what the manifest reports; small and JSON-serialisable (``to_json``).

    Attributes:
        template_to_input: 4 x 4 RAS world matrix, template point -> input point (apply its inverse to map input
            images onto the template, as the workflow did).
        template_affine, template_shape: the template grid the model saw (1 mm for the shipped templates).
        input_affine, input_shape: the original scan's grid.
        template: template name/URI and ``template_sha256``.
        metric: final Mattes mutual information (lower is better); ``correlation``: registered image vs template
            inside the template brain (1 = identical up to scale); ``brain_ml``: brain-mask volume;
            ``wm_peak``: white-matter intensity (input units, after N4).
        skull_strip: backend used. ``timings``: seconds per brain step.
    """

    template_to_input: list[list[float]]
    template_affine: list[list[float]]
    template_shape: tuple[int, int, int]
    input_affine: list[list[float]]
    input_shape: tuple[int, int, int]
    template: str
    template_sha256: str
    metric: float
    correlation: float
    brain_ml: float
    wm_peak: float
    skull_strip: str
    timings: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _template(cfg: BrainConfig, storage_options: dict[str, Any]) -> BrainTemplate:
    return load_template(cfg.template, cfg.template_mask, json.dumps(storage_options, sort_keys=True, default=str))


def prepare_brain(array: np.ndarray, affine: np.ndarray, image: nib.Nifti1Image, cfg: BrainConfig, *, uri: str,
                  storage_options: dict[str, Any] | None = None) -> tuple[np.ndarray, BrainRecord]:
    """Skull strip, N4, WM-peak normalise and register one T1 head; resample it onto the template grid.

    Args:
        array: (X, Y, Z) float32 input voxels; ``affine``: voxel -> RAS; ``image``: its nibabel image (headers for
            the ``command`` backend).
        cfg: the brain settings; ``uri``: for messages.

    Returns:
        ``(image on the template grid (template X, Y, Z) float32 in [0, 1], record)``.

    Raises:
        InputError: ``too_small`` (see :func:`check_head_size`), ``not_t1_like``, ``skull_strip_failed`` / ``skull_strip_tool_missing``, ``empty_brain_mask``,
        ``registration_failed`` (brain volume or correlation outside the configured range).
    """
    timings: dict[str, float] = {}
    check_t1_like(array, uri=uri)
    check_head_size(array.shape, affine, uri=uri)
    template = _template(cfg, storage_options or {})
    voxel_ml = abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0
    initial = None
    with timed(timings, "skullstrip"):
        if cfg.skull_strip == "atlas":
            head = register_affine(array, affine, template)
            initial = head.template_to_input
            mask = atlas_mask(template, initial, array.shape, affine)
        elif cfg.skull_strip == "command":
            mask = command_mask(array, image, cfg.skull_strip_command or "", timeout_s=cfg.skull_strip_timeout_s, uri=uri)
        else:
            mask = array > 0
    brain_ml = float(mask.sum()) * voxel_ml
    if not mask.any():
        raise InputError(f"{uri}: the skull-stripped brain mask is empty", code="empty_brain_mask")
    if not cfg.min_brain_ml <= brain_ml <= cfg.max_brain_ml:
        raise InputError(f"{uri}: the brain mask holds {brain_ml:.0f} ml, outside the plausible range "
                         f"{cfg.min_brain_ml:.0f}-{cfg.max_brain_ml:.0f} ml: skull stripping or registration failed",
                         code="registration_failed", hint="check that the scan is a whole-head T1; try "
                         "--skull-strip command with mri_synthstrip; the range is brain.min_brain_ml/max_brain_ml")
    brain = np.where(mask, array, 0.0).astype(np.float32)
    if cfg.bias_correction:
        with timed(timings, "bias_correct"):
            brain = n4_bias_correct(brain, affine, mask)
    with timed(timings, "normalize"):
        brain, wm_peak = normalize_wm_peak(brain, mask, uri=uri)
    with timed(timings, "register"):
        reg = register_affine(brain, affine, template, initial=initial,
                              **({"levels_mm": REFINE_LEVELS_MM} if initial is not None else {}))
    with timed(timings, "resample"):
        warped = warp_to_template(brain, affine, template, reg.template_to_input)
    correlation = normalized_correlation(warped, template.image, template.mask)
    if not np.isfinite(reg.metric) or correlation < cfg.min_correlation:
        raise InputError(f"{uri}: registration to the template failed (correlation with the template "
                         f"{correlation:.2f} < {cfg.min_correlation}, metric {reg.metric:.3f})",
                         code="registration_failed",
                         hint="check the scan is a T1 head; the threshold is brain.min_correlation")
    record = BrainRecord(
        template_to_input=reg.template_to_input.tolist(), template_affine=template.affine.tolist(),
        template_shape=template.shape, input_affine=np.asarray(affine, float).tolist(),
        input_shape=tuple(int(s) for s in array.shape), template=template.name,  # type: ignore[arg-type]
        template_sha256=template.sha256, metric=round(reg.metric, 5), correlation=round(correlation, 5),
        brain_ml=round(brain_ml, 1), wm_peak=round(wm_peak, 3), skull_strip=cfg.skull_strip, timings=timings)
    return warped, record


def revert_to_input(labels: np.ndarray, record: BrainRecord) -> np.ndarray:
    """Labels on the template grid -> (X, Y, Z) uint16 labels on the exact input grid (nearest neighbour)."""
    return template_to_input_grid(labels, np.asarray(record.template_affine, float),
                                  np.asarray(record.template_to_input, float), tuple(record.input_shape),
                                  np.asarray(record.input_affine, float), np.uint16)
