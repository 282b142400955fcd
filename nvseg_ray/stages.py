"""The model-free stages of segmenting one volume: read -> prepare -> (the model) -> finish -> write.

:class:`VolumeStages` holds what the CPU stages need (configuration, label catalog, the volume limits) and no network or weights, so CPU workers of the batch job, Serve gateways, the CLI
and evaluation all build one cheaply. The model's part, between :meth:`VolumeStages.prepare` and
:meth:`VolumeStages.finish`, is :class:`nvseg_ray.model_runner.ModelRunner`; the write stage is
:func:`nvseg_ray.output.write_result` / :func:`~nvseg_ray.output.write_outputs`; :func:`nvseg_ray.engine.segment_volume`
chains them in-process. Each stage is timed into the ``timings`` it is given (see :data:`~nvseg_ray.timing.STAGES`).

Coordinate spaces: the *input grid* is the volume's own voxel grid (``ValidatedVolume.array``, (X, Y, Z), with
its voxel -> RAS mm affine); the *model grid* is the RAS grid of ``cfg.spacing`` mm voxels (1.5 mm by default)
that :meth:`VolumeStages.prepare` resamples, crops and reorients onto (``PreparedVolume.image``, [1, H, W, D]).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import nibabel as nib
import numpy as np

from .config import InferenceConfig
from .dicom.series import DicomSeries
from .errors import PromptError
from .inference import check_window_count
from .labels import LabelCatalog
from .postprocess import cast_labels, check_output_dtype, invert_labels, label_statistics
from .preprocess import PreparedVolume, prepare
from .prompts import Prompts
from .timing import timed
from .validation import ValidatedVolume, VolumeLimits, check_model_input, read_and_validate, validate_nifti


@dataclass
class SegmentationResult:
    """A finished mask on the input grid.

    Attributes:
        labels: (X, Y, Z) label map in the output dtype, global class ids, on the input voxel grid.
        volume: the validated input (its nibabel header/affine are reused for the output file).
        prompts: what was segmented.
        statistics: per-label ``{"id", "name", "voxels", "volume_ml"}``.
        timings: wall seconds per stage (see :data:`~nvseg_ray.timing.STAGES`); a
            :class:`~nvseg_ray.timing.StageTimings` (CPU seconds and peak memory per stage too) when the stages were
            run by :func:`nvseg_ray.engine.segment_volume` or the batch job.
        brain: the brain workflow record as JSON (:class:`nvseg_ray.brain.BrainRecord`), or None.
        quality: statistics per structure, QC flags and the preview (:class:`nvseg_ray.quality.assess.QualityRecord`),
            or None when ``cfg.quality`` asks for none of them.
    """

    labels: np.ndarray
    volume: ValidatedVolume
    prompts: Prompts
    statistics: list[dict]
    timings: dict[str, float] = field(default_factory=dict)
    brain: dict | None = None
    quality: Any = None  # QualityRecord; Any keeps nvseg_ray.quality out of this module's imports


class VolumeStages:
    """The CPU stages for any number of volumes under one configuration (no model).

    Args:
        cfg: inference configuration (its preprocessing, limits, output dtype and storage options are used here;
            its checkpoint only for the finetuned label sidecar, never for weights).
        catalog: label catalog; defaults to ``cfg.label_catalog`` or the packaged one.
    """

    def __init__(self, cfg: InferenceConfig, catalog: LabelCatalog | None = None) -> None:
        self.cfg = cfg
        self.catalog = catalog or LabelCatalog.load(cfg.label_catalog)
        self.limits = VolumeLimits(max_voxels=cfg.max_voxels)

    @property
    def keeps_voxels(self) -> bool:
        """Whether the input's voxels must reach :meth:`finish` (QC intensities, the preview); when False, callers
        drop them after :meth:`prepare` (``ValidatedVolume.without_voxels``) so they are not held while the model
        runs."""
        return self.cfg.quality.needs_voxels

    def read(self, source: str | DicomSeries, timings: dict[str, float] | None = None) -> ValidatedVolume:
        """Read and validate one NIfTI volume, or assemble and validate one DICOM series (CPU).

        A DICOM series is assembled onto its own grid (:func:`nvseg_ray.dicom.assembly.load_series`: slices ordered
        along the normal, LPS -> RAS, rescale applied), then checked by the same rules as a NIfTI file; the
        returned volume's ``dicom`` holds the source headers (no pixel data) for the DICOM SEG.

        Returns:
            The volume on its input grid: ``array`` (X, Y, Z) float32, ``affine`` voxel -> RAS mm.
        """
        with timed(timings if timings is not None else {}, "read"):
            if isinstance(source, str):
                return read_and_validate(source, self.cfg.storage_options, self.limits)
            from .dicom.assembly import load_series

            assembled = load_series(source, self.cfg.storage_options, resample=self.cfg.dicom.resample,
                                    max_voxels=self.cfg.max_voxels)
            # through the header, as a NIfTI file of the series would hold it (float32 sform): the mask of a series
            # then equals, voxel for voxel, the mask of the same series converted to NIfTI
            header = nib.Nifti1Header(binaryblock=assembled.image.header.binaryblock)
            image = nib.Nifti1Image(assembled.image.dataobj, header.get_best_affine(), header=header)
            volume = validate_nifti(image, uri=source.uri, limits=self.limits)
            return dataclasses.replace(volume, source_dtype=assembled.source_dtype,
                                       dicom=assembled.without_voxels())

    def prepare(self, volume: ValidatedVolume, timings: dict[str, float] | None = None,
                modality: str | None = None) -> PreparedVolume:
        """Resample, crop, scale and reorient onto the model grid (CPU).

        Refused before any heavy work (:class:`~nvseg_ray.errors.InputError` / ``PromptError``): an empty or
        constant volume, point prompts outside it, a resampled grid above ``max_voxels``, and a model grid needing
        more than :data:`~nvseg_ray.inference.MAX_SLIDING_WINDOWS` windows.

        For ``MRI_BRAIN`` (``modality``, else the configured one) with ``brain.preprocess: full``, the brain T1
        workflow runs first (skull strip, N4, normalisation, registration onto the template grid; its step times
        land in ``timings`` as ``brain_<step>``), and the model grid is built from the template-space image.

        Returns:
            The model input: ``image`` [1, H, W, D] float32 on the model grid (``cfg.spacing`` mm, RAS axis order,
            intensities in [0, 1]), point prompts in model-grid voxels, and the record :meth:`finish` inverts with.
        """
        timings = timings if timings is not None else {}
        with timed(timings, "preprocess"):
            check_model_input(volume.array, uri=volume.uri)  # empty_volume / constant_volume
            if not self.cfg.uses_brain_workflow(modality):
                prepared = prepare(volume.array, volume.affine, self.cfg, uri=volume.uri)
                check_window_count(prepared.model_shape, self.cfg, uri=volume.uri)
                return prepared
            from .brain import prepare_brain

            if self.cfg.points is not None:
                raise PromptError("point prompts are input-voxel coordinates and cannot follow the brain workflow's "
                                  "registration", hint="use --brain-preprocess none for point prompts on a brain")
            warped, record = prepare_brain(volume.array, volume.affine, volume.image, self.cfg.brain, uri=volume.uri,
                                           storage_options=self.cfg.storage_options)
            timings.update({f"brain_{step}": seconds for step, seconds in record.timings.items()})
            prepared = prepare(warped, np.asarray(record.template_affine), self.cfg, uri=volume.uri)
            check_window_count(prepared.model_shape, self.cfg, uri=volume.uri)
            prepared.brain = record
            return prepared

    def finish(self, labels: np.ndarray, prepared: PreparedVolume, volume: ValidatedVolume, prompts: Prompts,
               timings: dict[str, float] | None = None) -> SegmentationResult:
        """Invert to the input grid, cast to the output dtype and count labels (CPU).

        Args:
            labels: [H, W, D] global class ids on the model grid of ``prepared``, a numpy integer array in the compact
                dtype :meth:`nvseg_ray.model_runner.ModelRunner.infer` returns (any integer dtype works).
            prepared: the model input the labels were computed from (its inversion record is enough: voxels are
                not read).
            volume: the validated input the mask lands on.
            prompts: what was segmented (names and the output dtype's range come from its class ids).

        With ``cfg.quality`` (on by default) the mask's QC follows, timed as ``qc``: statistics per structure (with
        intensities from ``volume.array`` when the voxels were kept, see :attr:`keeps_voxels`), the QC flags, and the
        preview when ``cfg.quality.preview`` is true.

        Returns:
            The mask on the input grid, (X, Y, Z) in ``cfg.output_dtype``, with its label statistics and QC record.
        """
        timings = timings if timings is not None else {}
        with timed(timings, "postprocess"):
            max_label = max(prompts.class_ids, default=0)
            dtype = check_output_dtype(self.cfg.output_dtype, max_label)  # refused before any work
            on_input = invert_labels(labels, prepared, dtype)  # gathered straight into the output dtype
            if prepared.brain is not None:  # template grid -> the exact input grid
                from .brain import revert_to_input

                with timed(timings, "brain_revert"):
                    on_input = revert_to_input(on_input, prepared.brain)
            out = cast_labels(on_input, self.cfg.output_dtype, max_label)  # no copy unless the brain path changed it
            names = {i: self.catalog.name(i) for i in prompts.class_ids}
            stats = label_statistics(on_input, volume.affine, names)
        quality = self.assess(out, volume, prompts, timings)
        if quality is not None:
            cut = {s.id for s in quality.structures if s.cut_by_fov}
            for entry in stats:  # a structure cut by the field of view: its volume is a lower bound
                entry["cut_by_fov"] = entry["id"] in cut
        return SegmentationResult(labels=out, volume=volume, prompts=prompts, statistics=stats, timings=timings,
                                  brain=prepared.brain.to_json() if prepared.brain is not None else None,
                                  quality=quality)

    def assess(self, labels: np.ndarray, volume: ValidatedVolume, prompts: Prompts,
               timings: dict[str, float] | None = None) -> Any:
        """The QC of a finished mask (``labels`` (X, Y, Z) on ``volume``'s grid): a
        :class:`~nvseg_ray.quality.assess.QualityRecord`, or None when ``cfg.quality`` asks for nothing."""
        settings = self.cfg.quality
        if not (settings.qc or settings.preview):
            return None
        from .quality.assess import QualityRecord, assess, render_result_preview

        intensities = volume.array if volume.array.size else None
        with timed(timings if timings is not None else {}, "qc"):
            record = (assess(labels, intensities, volume.affine, self.catalog, prompts) if settings.qc
                      else QualityRecord(structures=[], flags=[]))
            if settings.preview:
                record.preview = render_result_preview(labels, intensities, volume.affine, self.catalog,
                                                       prompts.modality, record.structures if settings.qc else None)
        return record
