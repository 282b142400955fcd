"""One finished mask -> its quality record: statistics per structure, QC flags, and (when asked) its preview.

:func:`assess` is what :meth:`nvseg_ray.stages.VolumeStages.finish` runs after inversion; the record travels in
:class:`nvseg_ray.stages.SegmentationResult` to the JSON report, the batch manifest's QC columns, the run's
statistics table and the Serve responses. A flag never fails a volume.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..labels import LabelCatalog
from ..prompts import Prompts
from .flags import QCFlag, qc_flags
from .statistics import StructureStatistics, statistics_rows, structure_statistics

#: structures listed in a batch manifest's ``key_volumes`` column and the run report (the largest, by volume):
#: enough to see at a glance that the liver, lungs and so on came out at a plausible size.
KEY_STRUCTURES = 6

__all__ = ["KEY_STRUCTURES", "QualityRecord", "assess", "manifest_columns", "preview_png", "render_result_preview"]


def manifest_columns(quality: dict[str, Any]) -> dict[str, Any]:
    """The batch manifest's QC columns from a report's ``quality`` section (:meth:`QualityRecord.to_json`): the flag
    codes (comma-separated), their reasons (JSON) and the :data:`KEY_STRUCTURES` largest structures' volumes (JSON
    ``{"name", "ml", "cut_by_fov"}``; a cut structure's ml is a lower bound). Strings, so every row of any run
    shares one Parquet schema; a resumed volume gets them from its earlier report."""
    flags = quality.get("flags") or []
    largest = sorted(quality.get("structures") or [], key=lambda s: -int(s.get("voxels", 0)))[:KEY_STRUCTURES]
    key = [{"name": s.get("name", ""), "ml": round(float(s.get("volume_ml", 0.0)), 1),
            "cut_by_fov": bool(s.get("cut_by_fov"))} for s in largest]
    reasons = [{"flag": str(f.get("code", "")), "reason": str(f.get("reason", "")),
                "structures": list(f.get("structures") or [])} for f in flags]
    return {"qc_flags": ",".join(r["flag"] for r in reasons),
            "qc_reasons": json.dumps(reasons, separators=(",", ":")),
            "key_volumes": json.dumps(key, separators=(",", ":"))}


@dataclass
class QualityRecord:
    """The QC of one mask.

    Attributes:
        structures: one record per structure present (ascending id): voxels, ml, intensity statistics in the
            input's units, bounding box (input voxels), ``cut_by_fov``.
        flags: the QC flags raised, each with its reason (empty: nothing suspect).
        preview: the preview PNG, when it was rendered.
    """

    structures: list[StructureStatistics]
    flags: list[QCFlag]
    preview: bytes | None = None

    @property
    def flag_codes(self) -> list[str]:
        return [flag.code for flag in self.flags]

    def to_json(self) -> dict[str, Any]:
        """The report's ``quality`` section."""
        return {"flags": [flag.to_json() for flag in self.flags],
                "volume_is_lower_bound": [s.name for s in self.structures if s.cut_by_fov],
                "structures": [s.to_json() for s in self.structures]}

    def manifest_columns(self) -> dict[str, Any]:
        """The batch manifest's QC columns (see :func:`manifest_columns`)."""
        return manifest_columns(self.to_json())

    def table_rows(self, volume: dict[str, Any]) -> list[dict[str, Any]]:
        """One row per structure for the run's statistics table, each prefixed with ``volume``'s columns."""
        return statistics_rows(volume, self.structures)


def _inputs(labels: np.ndarray, intensities: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Integer labels (``--output-dtype float32``, upstream's file type, holds exact integers) and the intensities
    when they cover the mask's grid (a voxel-free volume, shape (0, 0, 0), has none)."""
    if not np.issubdtype(labels.dtype, np.integer):
        labels = labels.astype(np.int32)
    if intensities is not None and intensities.shape != labels.shape:
        intensities = None
    return labels, intensities


def assess(labels: np.ndarray, intensities: np.ndarray | None, affine: np.ndarray, catalog: LabelCatalog,
           prompts: Prompts) -> QualityRecord:
    """Statistics and QC flags of one mask.

    Args:
        labels: (X, Y, Z) integer class ids on the input grid (0 = background).
        intensities: (X, Y, Z) input voxels in the input's units (HU for CT), any numeric dtype; None when they were
            not kept (intensity statistics and the intensity flag are then left out).
        affine: (4, 4) input voxel -> RAS+ mm.
        catalog: names of the ids.
        prompts: what was segmented (its modality picks the intensity check; an everything-set run, no explicit
            classes, is what ``few_labels`` judges).
    """
    labels, intensities = _inputs(labels, intensities)
    names = {int(i): catalog.name(int(i)) for i in prompts.class_ids}
    stats = structure_statistics(labels, intensities, affine, names)
    flags = qc_flags(stats, labels, intensities, affine, modality=prompts.modality, prompted_ids=prompts.class_ids,
                     everything=prompts.requested is None and not prompts.with_points)
    return QualityRecord(structures=stats, flags=flags)


def render_result_preview(labels: np.ndarray, intensities: np.ndarray | None, affine: np.ndarray,
                          catalog: LabelCatalog, modality: str | None,
                          structures: list[StructureStatistics] | None = None) -> bytes:
    """The preview PNG of one mask (see :func:`nvseg_ray.quality.preview.render_preview`); ``structures`` (when
    already computed) ranks the legend without counting the labels again."""
    from .preview import render_preview

    labels, intensities = _inputs(labels, intensities)
    largest = [(s.id, s.voxels) for s in structures] if structures is not None else None
    return render_preview(labels, intensities, affine, catalog, modality=modality, largest=largest)


def preview_png(result: Any, catalog: LabelCatalog) -> bytes:
    """The preview of a :class:`~nvseg_ray.stages.SegmentationResult`: the one rendered by the stages when there is
    one, else rendered now from its mask and the input voxels it still holds (black background without them)."""
    quality = result.quality
    if quality is not None and quality.preview:
        return quality.preview
    volume = result.volume
    return render_result_preview(np.asarray(result.labels), volume.array if volume.array.size else None,
                                 volume.affine, catalog, result.prompts.modality,
                                 quality.structures if quality is not None and quality.structures else None)
