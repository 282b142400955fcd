"""Where masks go and what is written next to them.

Layout (upstream's ``SaveImaged`` with ``separate_folder`` and postfix ``trans``):

* ``nested`` (default): ``<output_dir>/<rel_dir>/<stem>/<stem>_<postfix>.nii.gz``
* ``flat``:             ``<output_dir>/<rel_dir>/<stem>_<postfix>.nii.gz``

Next to every mask: ``<mask name without .nii.gz>.json`` with the label table, prompts, model
checksum, timings, versions and the QC record (statistics per structure, QC flags); ``.preview.png`` (when the
preview is on); ``.ctbl`` (3D Slicer colour table) and ``.itksnap.txt`` (ITK-SNAP label description), so the mask
opens in those viewers with names and colours.

A DICOM series is named by its SeriesInstanceUID inside a folder of its StudyInstanceUID
(``<output_dir>/<study uid>/<series uid>/<series uid>_<postfix>.nii.gz``), never by anything from the patient; its
DICOM SEG is ``<mask name without .nii.gz>.seg.dcm`` next to the mask, or is stored into the source study with
STOW-RS when the output is a DICOMweb root.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from collections.abc import Iterable
from importlib import metadata
from typing import Any

import nibabel as nib
import numpy as np

from .config import InferenceConfig
from .dicom.series import DicomSeries
from .engine import Prompts, SegmentationResult
from .errors import InputError, OutputExists
from .labels import LabelCatalog
from .io import encode_nifti, exists, join_uri, uri_stem, write_bytes_atomic, write_json
from .redaction import redact_uri
from .timing import StageTimings, timed

NIFTI_SUFFIX = ".nii.gz"
SEG_SUFFIX = ".seg.dcm"
PREVIEW_SUFFIX = ".preview.png"
REPORT_FORMAT = "nvseg-segmentation-report/1"


#: error code of an input whose mask another input of the same run already writes.
CODE_DUPLICATE_OUTPUT = "duplicate_output"


def _safe_part(part: str) -> str:
    """A path component that cannot leave its folder: ``"."``/``".."`` (e.g. the stem of ``...nii.gz``) -> ``"_"``s."""
    return part.replace(".", "_") if part in (".", "..") else part


def mask_uri(input_uri: str, output_dir: str, cfg: InferenceConfig, rel_dir: str = "") -> str:
    """The output mask URI for ``input_uri`` under ``output_dir`` (see module docstring).

    Always below ``output_dir``: the postfix is a plain file-name fragment (checked by InferenceConfig) and
    ``.``/``..`` components of the stem or ``rel_dir`` become ``_``/``__``.
    """
    stem = _safe_part(uri_stem(input_uri))
    name = f"{stem}_{cfg.output_postfix}{NIFTI_SUFFIX}" if cfg.output_postfix else f"{stem}{NIFTI_SUFFIX}"
    parts = [_safe_part(p) for p in rel_dir.strip("/").split("/") if p]
    if cfg.output_layout == "nested":
        parts.append(stem)
    return join_uri(output_dir, *parts, name)


def output_location(source: str | DicomSeries, output_dir: str, cfg: InferenceConfig, rel_dir: str = "",
                    output_name: str | None = None) -> str:
    """The mask URI of a NIfTI input or a DICOM series (see the module docstring); ``output_name`` replaces the
    stem (batch manifests)."""
    if isinstance(source, DicomSeries):
        stem = output_name or source.key
        return mask_uri(f"{stem}{NIFTI_SUFFIX}", output_dir, cfg, rel_dir=rel_dir or source.study_instance_uid)
    return mask_uri(f"{output_name}{NIFTI_SUFFIX}" if output_name else source, output_dir, cfg, rel_dir)


def output_settings(cfg: InferenceConfig, prompts: Prompts, *, dicom: bool) -> dict[str, Any]:
    """The settings that decide a volume's outputs (the resolved prompts included), for :func:`resume_key`."""
    return cfg.resume_key_fields(prompts.modality, dicom=dicom) | {"modality": prompts.modality,
                                                                  "classes": list(prompts.class_ids)}


def resume_key(input_identity: str, settings: dict[str, Any], model_identity: str) -> str:
    """Deterministic key of one volume's outputs: the input (a NIfTI URI, or a DICOM series' identity over its
    SOP Instance UIDs), the output-changing settings and the model. The batch job resumes by it, and a DICOM SEG's
    Series / SOP Instance UIDs derive from it (the same input, settings and model give the same SEG object)."""
    payload = json.dumps({"input": input_identity, "settings": settings, "model": model_identity}, sort_keys=True,
                         default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def seg_uri(mask: str) -> str:
    """``.../scan_trans.nii.gz`` -> ``.../scan_trans.seg.dcm``."""
    return (mask[: -len(NIFTI_SUFFIX)] if mask.endswith(NIFTI_SUFFIX) else mask) + SEG_SUFFIX


def earlier_claims(pairs: Iterable[tuple[str, str]]) -> list[str | None]:
    """For each ``(input_uri, output_uri)`` in order: None when it is the first to write ``output_uri``, else the
    earlier input that writes it (e.g. ``a/scan.nii.gz`` and ``b/scan.nii.gz`` both map to ``out/scan/...``).

    Shared by ``nvseg segment`` and the batch planner, so both refuse the later duplicates instead of skipping
    them as "exists" or overwriting one patient's mask with another's.
    """
    seen: dict[str, str] = {}
    out: list[str | None] = []
    for input_uri, output_uri in pairs:
        out.append(seen.get(output_uri))
        seen.setdefault(output_uri, input_uri)
    return out


def duplicate_output_error(input_uri: str, earlier_uri: str, output_uri: str) -> InputError:
    """The ``duplicate_output`` error of ``input_uri`` whose mask ``earlier_uri`` already writes."""
    return InputError(
        f"{redact_uri(input_uri)} and {redact_uri(earlier_uri)} would both write {redact_uri(output_uri)}; "
        f"{redact_uri(input_uri)} was not segmented (the first one's mask is kept).",
        code=CODE_DUPLICATE_OUTPUT,
        hint="Rename one of the inputs, segment them into different --output-dir folders, or give batch manifest "
        "rows distinct output_name values.",
        uri=redact_uri(input_uri), output_uri=redact_uri(output_uri), duplicate_of=redact_uri(earlier_uri),
    )


def _sibling(mask: str, suffix: str) -> str:
    """``.../scan_trans.nii.gz`` -> ``.../scan_trans<suffix>`` (a report path ``.json`` loses its suffix too)."""
    for known in (NIFTI_SUFFIX, ".json"):
        if mask.endswith(known):
            return mask[: -len(known)] + suffix
    return mask + suffix


def report_uri(mask: str) -> str:
    """``.../scan_trans.nii.gz`` -> ``.../scan_trans.json``."""
    return mask[: -len(NIFTI_SUFFIX)] + ".json" if mask.endswith(NIFTI_SUFFIX) else mask + ".json"


def preview_uri(mask: str) -> str:
    """``.../scan_trans.nii.gz`` (or its ``.json`` report) -> ``.../scan_trans.preview.png``."""
    return _sibling(mask, PREVIEW_SUFFIX)


def colour_table_uris(mask: str) -> dict[str, str]:
    """The viewer label tables of a NIfTI mask: ``{"slicer": ....ctbl, "itksnap": ....itksnap.txt}``."""
    from .quality.colour_tables import COLOUR_TABLE_SUFFIXES

    return {viewer: _sibling(mask, suffix) for viewer, suffix in COLOUR_TABLE_SUFFIXES.items()}


def write_colour_tables(mask: str, class_ids: Iterable[int], catalog: LabelCatalog, *,
                        storage_options: dict[str, Any] | None = None, overwrite: bool = True) -> dict[str, str]:
    """Write the 3D Slicer colour table and the ITK-SNAP label description of a mask of ``class_ids`` next to it
    (the catalog's names and the DICOM SEG's display colours); returns their URIs by viewer."""
    from .quality.colour_tables import itksnap_label_description, slicer_color_table

    ids = sorted({int(i) for i in class_ids})
    texts = {"slicer": slicer_color_table(catalog, ids), "itksnap": itksnap_label_description(catalog, ids)}
    uris = colour_table_uris(mask)
    for viewer, text in texts.items():
        write_bytes_atomic(text.encode(), uris[viewer], storage_options, overwrite=overwrite)
    return {viewer: redact_uri(uri) for viewer, uri in uris.items()}


def mask_image(result: SegmentationResult) -> nib.Nifti1Image:
    """The label map as a NIfTI image on the input's exact grid.

    The input header is copied, so shape, pixdim, qform (+code) and sform (+code) are the input's;
    scaling is reset (labels are stored verbatim) and the intent is set to ``label``.
    """
    src = result.volume.image
    header = src.header.copy()
    header.set_data_dtype(result.labels.dtype)
    header.set_data_shape(result.labels.shape)
    header.set_slope_inter(1.0, 0.0)
    header["cal_min"], header["cal_max"] = 0, 0
    header.set_intent("label")
    qform, qcode = src.header.get_qform(coded=True)
    sform, scode = src.header.get_sform(coded=True)
    image = type(src)(np.asarray(result.labels), affine=None, header=header)
    if qform is not None:
        image.set_qform(qform, int(qcode))
    if sform is not None:
        image.set_sform(sform, int(scode))
    if qform is None and sform is None:  # neither code set: keep the (fallback) affine MONAI/nibabel used
        image.set_sform(result.volume.affine, 2)
    return image


def package_versions() -> dict[str, str]:
    """Versions that decide the output, recorded in every report."""
    out = {"python": platform.python_version()}
    for dist in ("nvseg-ray", "torch", "monai", "nibabel", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def build_report(result: SegmentationResult, *, input_uri: str, output_uri: str, cfg: InferenceConfig,
                 model_uri: str | None, model_sha256: str | None) -> dict[str, Any]:
    """The per-volume JSON report (pure function of its arguments, plus the clock and versions).

    URIs are recorded redacted (:func:`nvseg_ray.redaction.redact_uri`): no user-info, no signature/token values.
    """
    vol = result.volume
    return {
        "format": REPORT_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "input": {"uri": redact_uri(input_uri), "shape": list(vol.shape),
                  "spacing_mm": [round(float(s), 6) for s in vol.spacing], "dtype": vol.source_dtype},
        "output": {"uri": redact_uri(output_uri), "dtype": str(result.labels.dtype), "layout": cfg.output_layout},
        "modality": result.prompts.modality,
        "prompts": {"requested": result.prompts.requested, "class_ids": list(result.prompts.class_ids),
                    "points": [list(p) for p in cfg.points] if cfg.points else None,
                    "point_labels": cfg.point_labels, "expand_subclasses": result.prompts.expand_subclasses},
        "labels": result.statistics,
        "model": {"uri": redact_uri(model_uri) if model_uri else model_uri, "sha256": model_sha256},
        "settings": {"spacing": list(cfg.spacing), "patch_size": list(cfg.patch_size), "overlap": cfg.overlap,
                     "sw_batch_size": cfg.sw_batch_size, "class_chunk_size": cfg.class_chunk_size,
                     "device": cfg.device, "amp": cfg.amp},
        "timings_s": {k: round(v, 4) for k, v in result.timings.items()},
        # process CPU seconds (all threads) and peak resident memory (MB) per stage, where they were measured
        **({"cpu_s": {k: round(v, 4) for k, v in result.timings.cpu_s.items()},
            "peak_rss_mb": {k: round(v, 1) for k, v in result.timings.peak_rss_mb.items()}}
           if isinstance(result.timings, StageTimings) else {}),
        "versions": package_versions(),
        # statistics per structure (intensities in the input's units), the QC flags with their reasons
        **({"quality": result.quality.to_json()} if result.quality is not None and cfg.quality.qc else {}),
        # brain workflow: the template, the world transform (template -> input, 4x4 RAS) and the quality figures,
        # so other images of the same scan can be mapped the same way
        **({"brain": result.brain} if result.brain is not None else {}),
    }


def refuse_existing(output_uri: str, storage_options: dict[str, Any] | None = None, *,
                    with_report: bool = True) -> None:
    """Raise :class:`~nvseg_ray.errors.OutputExists` (409) when ``output_uri`` or (``with_report``) its report exists.

    Raises:
        OutputExists: either exists.
        StorageError: the storage could not be asked.
    """
    for target in (output_uri, report_uri(output_uri)) if with_report else (output_uri,):
        if exists(target, storage_options):
            raise OutputExists(f"Refusing to write {redact_uri(target)!r}: it already exists.",
                               hint="Choose a new output_uri (existing masks and reports are never replaced).",
                               uri=redact_uri(target))


def write_seg(result: SegmentationResult, *, target: str, cfg: InferenceConfig, seed: str,
              model_sha256: str | None, catalog: LabelCatalog, overwrite: bool = True) -> dict[str, Any]:
    """Build the DICOM SEG of ``result`` (a DICOM series' mask) and write it to ``target``: a file URI, or a
    DICOMweb root (stored into the source study with STOW-RS). Returns the report's ``dicom.seg`` entry.

    ``seed`` (the batch resume key, or the input identity) fixes the SEG's Series and SOP Instance UIDs, so writing
    the same result again replaces the same object instead of adding a series to the PACS.
    """
    from .dicom.dicomweb import is_dicomweb_url, public_url, store
    from .dicom.seg import build_seg, encode_seg, segment_class_ids

    assembled = result.volume.dicom
    if not np.any(result.labels):  # a SEG needs at least one segment: say so in the report instead of failing
        return {"uri": None, "seg_type": cfg.dicom.seg_type, "segments": 0,
                "skipped": "no structure was found in this series, so there is no segment to store"}
    version = package_versions().get("nvseg-ray", "unknown")
    ds = build_seg(np.asarray(result.labels), assembled, catalog=catalog, seg_type=cfg.dicom.seg_type, seed=seed,
                   model_sha256=model_sha256, algorithm_version=version)
    if is_dicomweb_url(target):
        store(target, [ds])
        where = f"{public_url(target).rstrip('/')}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        nbytes = None
    else:
        data = encode_seg(ds)
        write_bytes_atomic(data, target, cfg.storage_options, overwrite=overwrite)
        where, nbytes = target, len(data)
    return {"uri": redact_uri(where), "seg_type": cfg.dicom.seg_type, "series_instance_uid": str(ds.SeriesInstanceUID),
            "sop_instance_uid": str(ds.SOPInstanceUID), "segments": len(segment_class_ids(ds)), "bytes": nbytes}


def dicom_report(result: SegmentationResult) -> dict[str, Any] | None:
    """The report's ``dicom`` section of a DICOM series (series facts, no patient identifiers), else None."""
    assembled = result.volume.dicom
    if assembled is None:
        return None
    return {**assembled.series.summary(), "resampled": bool(assembled.resampled), "notes": list(assembled.notes)}


def write_outputs(result: SegmentationResult, *, input_uri: str, output_uri: str | None, cfg: InferenceConfig,
                  model_uri: str | None, model_sha256: str | None, overwrite: bool = True,
                  seg_target: str | None = None, seed: str = "", catalog: LabelCatalog | None = None,
                  report_target: str | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write what the configured output format asks for -- the NIfTI mask (``output_uri``; None: not wanted), the
    DICOM SEG (``seg_target``; None: not wanted) -- then the JSON report (``report_target``, default next to the
    mask; None with no mask: not written). Returns the report. ``extra`` entries are added to the report.

    The report is written last, so a report's presence means every output it lists is complete. With
    ``overwrite=False`` nothing existing is replaced (see :func:`refuse_existing`).
    """
    if report_target is None and output_uri is not None:
        report_target = report_uri(output_uri)
    preview = result.quality.preview if result.quality is not None else None
    preview_target = preview_uri(output_uri or report_target) if preview and (output_uri or report_target) else None
    tables = output_uri is not None and cfg.quality.colour_tables
    written: dict[str, Any] = {}
    with timed(result.timings, "write"):
        if not overwrite:
            extra_targets = list(colour_table_uris(output_uri).values()) if tables else []
            for target in (output_uri, report_target, seg_target, preview_target, *extra_targets):
                if target and not _is_dicomweb(target):
                    refuse_existing(target, cfg.storage_options, with_report=False)
        if output_uri is not None:
            data = encode_nifti(mask_image(result), compresslevel=cfg.compresslevel)
            write_bytes_atomic(data, output_uri, cfg.storage_options, overwrite=overwrite)
        if preview_target is not None:
            write_bytes_atomic(preview, preview_target, cfg.storage_options, overwrite=overwrite)
            written["preview"] = {"uri": redact_uri(preview_target), "bytes": len(preview)}
        if tables:
            written["viewer_tables"] = write_colour_tables(
                output_uri, result.prompts.class_ids, catalog or LabelCatalog.load(cfg.label_catalog),
                storage_options=cfg.storage_options, overwrite=overwrite)
    seg = None
    if seg_target is not None:  # timed on its own: building a SEG costs more than encoding a NIfTI
        with timed(result.timings, "seg"):
            seg = write_seg(result, target=seg_target, cfg=cfg, seed=seed or input_uri, model_sha256=model_sha256,
                            catalog=catalog or LabelCatalog.load(cfg.label_catalog), overwrite=overwrite)
    report = build_report(result, input_uri=input_uri, output_uri=output_uri or "", cfg=cfg, model_uri=model_uri,
                          model_sha256=model_sha256)
    dicom = dicom_report(result)
    if dicom is not None:
        report["dicom"] = {**dicom, **({"seg": seg} if seg else {})}
    report.update(written)
    report.update(extra or {})
    if report_target is not None:
        write_json(report, report_target, cfg.storage_options, overwrite=overwrite)
    return report


def _is_dicomweb(uri: str) -> bool:
    from .dicom.dicomweb import is_dicomweb_url

    return is_dicomweb_url(uri)


def write_result(result: SegmentationResult, *, input_uri: str, output_uri: str, cfg: InferenceConfig,
                 model_uri: str | None, model_sha256: str | None, overwrite: bool = True) -> dict[str, Any]:
    """Encode and write the NIfTI mask, then its JSON report (each atomically); returns the report.

    ``overwrite=False`` (the HTTP service's default): :class:`~nvseg_ray.errors.OutputExists` when the mask
    or its report already exists. Both are checked before anything is written, and each write is itself
    exclusive (see :func:`nvseg_ray.io.write_bytes_atomic`), so an existing object is never replaced.
    """
    return write_outputs(result, input_uri=input_uri, output_uri=output_uri, cfg=cfg, model_uri=model_uri,
                         model_sha256=model_sha256, overwrite=overwrite)
