"""The segmentation engine: read -> validate -> prepare -> infer -> finish, each stage timed.

The stages are separate methods so that the Ray batch job and the Serve app can run the CPU stages
(read, prepare, finish, write) in their own workers and only :meth:`Segmenter.infer` in the model
actor; :meth:`Segmenter.segment` runs them all in-process for the CLI.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import nibabel as nib
import numpy as np
import torch

from .config import MODALITY_AUTO, InferenceConfig
from .dicom.series import DicomSeries
from .errors import ConfigError, PromptError
from .inference import ShouldStop, check_window_count, resolve_device, segment_classes, segment_points
from .labels import LabelCatalog
from .model import LoadedModel, checkpoint_label_info, load_model
from .postprocess import cast_labels, invert_labels, label_statistics
from .preprocess import PreparedVolume, build_preprocessing, prepare
from .timing import STAGES, StageTimings, timed
from .validation import ValidatedVolume, VolumeLimits, check_model_input, read_and_validate, validate_nifti



@dataclass
class Prompts:
    """Resolved prompts for one volume: global class ids in prompt order, plus optional points."""

    class_ids: tuple[int, ...]
    requested: list[int | str] | None
    modality: str | None
    with_points: bool = False
    expand_subclasses: bool = True


@dataclass
class SegmentationResult:
    """A finished mask on the input grid.

    Attributes:
        labels: (X, Y, Z) label map in the output dtype, global class ids, on the input voxel grid.
        volume: the validated input (its nibabel header/affine are reused for the output file).
        prompts: what was segmented.
        statistics: per-label ``{"id", "name", "voxels", "volume_ml"}``.
        timings: wall seconds per stage (see :data:`STAGES`); a :class:`~nvseg_ray.timing.StageTimings` (CPU seconds
            and peak memory per stage too) when the stages were run by :meth:`Segmenter.segment` or the batch job.
        brain: the brain workflow record as JSON (:class:`nvseg_ray.brain.BrainRecord`), or None.
    """

    labels: np.ndarray
    volume: ValidatedVolume
    prompts: Prompts
    statistics: list[dict]
    timings: dict[str, float] = field(default_factory=dict)
    brain: dict | None = None


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


class Segmenter:
    """Holds one loaded model and runs the stages for any number of volumes.

    Args:
        cfg: inference configuration (``cfg.checkpoint`` is loaded unless ``model`` is given).
        model: an already loaded model (e.g. shared by a Ray actor).
        catalog: label catalog; defaults to ``cfg.label_catalog`` or the packaged one.
    """

    def __init__(self, cfg: InferenceConfig, model: LoadedModel | None = None,
                 catalog: LabelCatalog | None = None) -> None:
        self.cfg = cfg
        self.catalog = catalog or LabelCatalog.load(cfg.label_catalog)
        # per-volume under --modality auto (each DICOM series' Modality tag decides)
        self.prompts = (resolve_prompts(cfg, self.catalog) if (cfg.classes or cfg.modality)
                        and cfg.modality != MODALITY_AUTO else None)
        self.transforms = build_preprocessing(cfg)
        self.limits = VolumeLimits(max_voxels=cfg.max_voxels)
        self._model = model
        self._device: torch.device | None = None

    # -- model --------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        if self._device is None:
            self._device = resolve_device(self.cfg.device)
        return self._device

    @property
    def model(self) -> LoadedModel:
        """The loaded model, moved to :attr:`device` (loaded on first use)."""
        if self._model is None:
            if not self.cfg.checkpoint:
                raise ConfigError("no checkpoint given", hint="pass --checkpoint PATH_OR_URI "
                                  "(download the weights once with `nvseg weights download --dest models/model.pt`)")
            self._model = load_model(self.cfg.checkpoint, storage_options=self.cfg.storage_options)
        if next(self._model.network.parameters()).device != self.device:
            self._model.network.to(self.device)
        return self._model

    # -- stages -------------------------------------------------------------------------------------
    def read(self, source: str | DicomSeries, timings: dict[str, float] | None = None) -> ValidatedVolume:
        """Read and validate one NIfTI volume, or assemble and validate one DICOM series (CPU).

        A DICOM series is assembled onto its own grid (:func:`nvseg_ray.dicom.assembly.load_series`: slices ordered
        along the normal, LPS -> RAS, rescale applied), then checked by the same rules as a NIfTI file; the
        returned volume's ``dicom`` holds the source headers (no pixel data) for the DICOM SEG.
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
        """
        timings = timings if timings is not None else {}
        with timed(timings, "preprocess"):
            check_model_input(volume.array, uri=volume.uri)  # empty_volume / constant_volume
            if not self.cfg.uses_brain_workflow(modality):
                prepared = prepare(volume.array, volume.affine, self.cfg, self.transforms, uri=volume.uri)
                check_window_count(prepared.model_shape, self.cfg, uri=volume.uri)
                return prepared
            from .brain import prepare_brain

            if self.cfg.points is not None:
                raise PromptError("point prompts are input-voxel coordinates and cannot follow the brain workflow's "
                                  "registration", hint="use --brain-preprocess none for point prompts on a brain")
            warped, record = prepare_brain(volume.array, volume.affine, volume.image, self.cfg.brain, uri=volume.uri,
                                           storage_options=self.cfg.storage_options)
            timings.update({f"brain_{step}": seconds for step, seconds in record.timings.items()})
            prepared = prepare(warped, np.asarray(record.template_affine), self.cfg, self.transforms, uri=volume.uri)
            check_window_count(prepared.model_shape, self.cfg, uri=volume.uri)
            prepared.brain = record
            return prepared

    def infer(self, prepared: PreparedVolume, prompts: Prompts | None = None,
              timings: dict[str, float] | None = None, should_stop: ShouldStop | None = None) -> torch.Tensor:
        """Run the network (GPU when available). Returns [H, W, D] int64 global ids on the CPU.

        ``should_stop`` is polled before every window; True raises :class:`~nvseg_ray.inference.StopRequested`.
        """
        prompts = self._prompts(prompts)
        model = self.model  # load outside the timer on first use
        with timed(timings if timings is not None else {}, "infer"):
            image = prepared.image.as_tensor()[None]
            in_channels = model.architecture.in_channels
            if image.shape[1] != in_channels:
                raise ConfigError(f"checkpoint expects {in_channels} input channels, the volume has {image.shape[1]}")
            if prompts.with_points:
                assert prepared.points is not None and prepared.point_labels is not None
                labels = segment_points(model.network, image, prompts.class_ids[0], prepared.points,
                                        prepared.point_labels, self.cfg, self.device, should_stop=should_stop)
            else:
                labels = segment_classes(model.network, image, prompts.class_ids, self.cfg, self.device,
                                         should_stop=should_stop)
            return labels.cpu()

    def finish(self, labels: torch.Tensor, prepared: PreparedVolume, volume: ValidatedVolume,
               prompts: Prompts | None = None, timings: dict[str, float] | None = None) -> SegmentationResult:
        """Invert to the input grid, cast to the output dtype and count labels (CPU)."""
        prompts = self._prompts(prompts)
        timings = timings if timings is not None else {}
        with timed(timings, "postprocess"):
            on_input = invert_labels(labels, prepared, self.transforms)
            if prepared.brain is not None:  # template grid -> the exact input grid
                from .brain import revert_to_input

                with timed(timings, "brain_revert"):
                    on_input = revert_to_input(on_input, prepared.brain)
            out = cast_labels(on_input, self.cfg.output_dtype, max(prompts.class_ids, default=0))
            names = {i: self.catalog.name(i) for i in prompts.class_ids}
            stats = label_statistics(on_input, volume.affine, names)
        return SegmentationResult(labels=out, volume=volume, prompts=prompts, statistics=stats, timings=timings,
                                  brain=prepared.brain.to_json() if prepared.brain is not None else None)

    def segment(self, uri: str | DicomSeries, prompts: Prompts | None = None) -> SegmentationResult:
        """All stages for one volume (a NIfTI URI or a DICOM series), in-process."""
        timings = StageTimings()  # wall seconds, CPU seconds and peak memory per stage
        volume = self.read(uri, timings)
        prepared = self.prepare(volume, timings, modality=(prompts or self._prompts(None)).modality)
        labels = self.infer(prepared, prompts, timings)
        return self.finish(labels, prepared, volume, prompts, timings)

    def _prompts(self, prompts: Prompts | None) -> Prompts:
        if prompts is not None:
            return prompts
        if self.prompts is None:
            self.prompts = resolve_prompts(self.cfg, self.catalog)  # raises the "nothing to segment" error
        return self.prompts
