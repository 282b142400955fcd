"""The in-process path: every stage of one volume in this process, timed (the CLI, evaluation, notebooks).

The parts live where they say what they are: :mod:`nvseg_ray.stages` (model-free: read, prepare, finish),
:mod:`nvseg_ray.model_runner` (load once, infer) and :mod:`nvseg_ray.output` (write). The batch job and the Serve
app run the same parts in separate workers; :func:`segment_volume` only chains them.
"""

from __future__ import annotations

from .dicom.series import DicomSeries
from .model_runner import ModelRunner
from .prompts import Prompts, resolve_prompts
from .stages import SegmentationResult, VolumeStages
from .timing import StageTimings


def segment_volume(source: str | DicomSeries, stages: VolumeStages, runner: ModelRunner,
                   prompts: Prompts | None = None) -> SegmentationResult:
    """Read, prepare, infer and finish one volume (a NIfTI URI or a DICOM series), in-process.

    Args:
        source: the volume.
        stages: the CPU stages (their ``cfg`` and ``catalog`` also resolve default prompts).
        runner: the model (loaded on its first use, then kept).
        prompts: what to segment; None: ``stages.cfg``'s classes / modality (:func:`~nvseg_ray.prompts.resolve_prompts`,
            which raises :class:`~nvseg_ray.errors.PromptError` for nothing to segment or a bad prompt).

    Returns:
        The mask on the input grid; its ``timings`` is a :class:`~nvseg_ray.timing.StageTimings` (wall seconds, CPU
        seconds and peak memory of read, preprocess, infer and postprocess, plus any brain steps).
    """
    if prompts is None:
        prompts = resolve_prompts(stages.cfg, stages.catalog)
    timings = StageTimings()
    volume = stages.read(source, timings)
    prepared = stages.prepare(volume, timings, modality=prompts.modality)
    if not stages.keeps_voxels:  # the input is not needed past prepare: free it before the model runs
        volume = volume.without_voxels()
    labels = runner.infer(prepared, prompts, timings)
    return stages.finish(labels, prepared, volume, prompts, timings)
