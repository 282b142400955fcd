"""Command-line options shared by ``nvseg segment`` and ``jobs/batch_segment.py`` (InferenceConfig fields)."""

from __future__ import annotations

import argparse
from typing import Any

def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in _csv(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None


def _classes(text: str) -> list[int | str]:
    from ..labels import parse_class_list

    return parse_class_list(text)


def _points(text: str) -> list[tuple[float, float, float]]:
    points = []
    for chunk in text.split(";"):
        vals = _csv(chunk)
        if len(vals) != 3:
            raise argparse.ArgumentTypeError(f"a point needs 3 voxel coordinates 'i,j,k', got '{chunk}'")
        try:
            points.append(tuple(float(v) for v in vals))
        except ValueError:
            raise argparse.ArgumentTypeError(f"point coordinates must be numbers, got '{chunk}'") from None
    return points  # type: ignore[return-value]


def add_inference_arguments(p: argparse.ArgumentParser) -> None:
    """Flags for every :class:`~nvseg_ray.config.InferenceConfig` field a user sets on the command line."""
    p.add_argument("--checkpoint", "-c", help="model.pt path or URI (see `nvseg weights download`)")
    p.add_argument("--modality", "-m", help="everything-set: CT_BODY, MRI_BODY or MRI_BRAIN; auto: from each DICOM "
                   "series' Modality tag (CT -> CT_BODY, MR -> MRI_BODY)")
    p.add_argument("--classes", type=_classes, help="comma-separated class names or ids, e.g. liver,spleen,3")
    p.add_argument("--points", type=_points, help="point prompts 'i,j,k;i,j,k' in input voxel coordinates")
    p.add_argument("--point-labels", type=_ints, help="one label per point: 1 positive, 0 negative")
    p.add_argument("--no-subclass-expansion", dest="expand_subclasses", action="store_const", const=False,
                   help="do not expand prompts 2/20/21 into their parts (finetuned checkpoints)")
    p.add_argument("--label-catalog", help="catalog JSON or an upstream bundle directory")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--patch-size", type=_ints, help="sliding-window size, default 192,192,128")
    p.add_argument("--overlap", type=float, help="window overlap, default 0.25")
    p.add_argument("--sw-batch-size", help="windows per forward pass, default 1; auto: from the GPU's free memory")
    p.add_argument("--backend", choices=["auto", "torch", "trt", "compile"],
                   help="auto (default): the TensorRT fp16 encoder where it can run (CUDA + TensorRT 10), else torch; "
                   "torch (fp16 autocast on CUDA); trt; compile (torch.compile of the encoder). Fallbacks are reported")
    p.add_argument("--engine-cache-dir", help="node-local folder for TensorRT engines (default "
                   "$NVSEG_ENGINE_CACHE or ~/.cache/nvseg-ray/engines)")
    p.add_argument("--class-chunk-size", type=int, help="classes per logit evaluation, default 16")
    p.add_argument("--no-amp", dest="amp", action="store_const", const=False, help="disable fp16 autocast on CUDA")
    p.add_argument("--output-dtype", help="uint16 (default), uint8, int16, int32, float32 (upstream)")
    p.add_argument("--layout", dest="output_layout", choices=["nested", "flat"], help="output layout")
    p.add_argument("--postfix", dest="output_postfix", help="mask file postfix, default 'trans'")
    p.add_argument("--max-voxels", type=int, help="refuse volumes with more voxels than this")
    p.add_argument("--overwrite", action="store_const", const=True, help="replace existing outputs")
    q = p.add_argument_group("quality control")
    q.add_argument("--preview", action=argparse.BooleanOptionalAction, default=None,
                   help="a PNG per volume (axial, coronal, sagittal slices, labels overlaid) next to the mask "
                   "(default: on in the batch job, off for `nvseg segment`)")
    q.add_argument("--no-qc", dest="qc", action="store_const", const=False,
                   help="leave out the per-structure statistics and QC flags")
    q.add_argument("--no-colour-tables", dest="colour_tables", action="store_const", const=False,
                   help="do not write the 3D Slicer / ITK-SNAP label tables next to each mask")
    d = p.add_argument_group("DICOM")
    d.add_argument("--output-format", choices=["auto", "nifti", "dicom-seg", "both"],
                   help="auto (default): NIfTI + DICOM SEG for DICOM input, NIfTI for NIfTI input")
    d.add_argument("--seg-type", choices=["binary", "labelmap"],
                   help="binary (default): classic Segmentation Storage, read by every viewer and PACS; labelmap: "
                   "the newer Label Map SEG (smaller, faster; needs a recent viewer)")
    d.add_argument("--dicom-resample", action="store_const", const=True,
                   help="resample an irregular DICOM stack (uneven spacing, missing slice, gantry tilt) onto a "
                   "regular grid instead of refusing it; the report says so")
    g = p.add_argument_group("brain T1 workflow (--modality MRI_BRAIN)")
    g.add_argument("--brain-preprocess", choices=["full", "none"],
                   help="full (default): skull strip, N4, normalise, register to the template, revert; "
                   "none: the input is already template-aligned")
    g.add_argument("--skull-strip", choices=["atlas", "command", "none"],
                   help="atlas (default, nothing to install), command (--skull-strip-command), none (already stripped)")
    g.add_argument("--skull-strip-command", help="e.g. 'mri_synthstrip -i {input} -o {output} -m {mask}'")
    g.add_argument("--brain-template", help="template T1 path/URI (e.g. LUMIR_template.nii.gz); default: ICBM152 "
                   "2009a from nilearn")
    g.add_argument("--brain-template-mask", help="template brain mask (default: template > 0)")
    g.add_argument("--no-bias-correction", dest="bias_correction", action="store_const", const=False,
                   help="skip N4 bias-field correction")


_CONFIG_FLAGS = ("checkpoint", "modality", "classes", "points", "point_labels", "expand_subclasses",
                 "label_catalog", "device", "patch_size", "overlap", "sw_batch_size", "class_chunk_size", "amp",
                 "backend", "engine_cache_dir",
                 "output_dtype", "output_layout", "output_postfix", "max_voxels", "overwrite", "output_format")


#: flag dest -> DicomConfig field (InferenceConfig.dicom).
_DICOM_FLAGS = {"seg_type": "seg_type", "dicom_resample": "resample"}


#: flag dest -> QualityConfig field (InferenceConfig.quality).
_QUALITY_FLAGS = {"preview": "preview", "qc": "qc", "colour_tables": "colour_tables"}


#: flag dest -> BrainConfig field (InferenceConfig.brain).
_BRAIN_FLAGS = {"brain_preprocess": "preprocess", "skull_strip": "skull_strip",
                "skull_strip_command": "skull_strip_command", "brain_template": "template",
                "brain_template_mask": "template_mask", "bias_correction": "bias_correction"}


#: InferenceConfig section -> its flags (dest -> field); each section is merged one level deep over the YAML's.
_SECTION_FLAGS = {"brain": _BRAIN_FLAGS, "dicom": _DICOM_FLAGS, "quality": _QUALITY_FLAGS}


def inference_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The InferenceConfig values given as flags (unset flags are None and fall through to YAML/defaults)."""
    overrides: dict[str, Any] = {name: getattr(args, name, None) for name in _CONFIG_FLAGS}
    for section, flags in _SECTION_FLAGS.items():
        given = {field: getattr(args, dest, None) for dest, field in flags.items()}
        overrides[section] = {k: v for k, v in given.items() if v is not None} or None
    return overrides
