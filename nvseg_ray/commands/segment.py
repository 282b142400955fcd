"""``nvseg segment``: segment one or more NIfTI volumes in-process (no Ray needed)."""

from __future__ import annotations

import argparse
import sys
import traceback

from ..config import MODALITY_AUTO, InferenceConfig
from ..dicom.series import DicomSeries
from ..errors import EXIT_VOLUMES_FAILED, ConfigError, NvsegError
from ..io import exists, list_volumes
from ..boundary import internal_error_text
from ..redaction import redact_uri
from .options import add_inference_arguments, inference_overrides


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "segment",
        help="segment NIfTI volumes or DICOM series (local paths, fsspec URIs such as s3://, DICOMweb URLs)",
        description="Segment one or more NIfTI volumes with NV-Segment-CTMR. Outputs go to "
        "<output-dir>/<stem>/<stem>_trans.nii.gz (upstream layout) with a JSON report next to each mask.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help=".nii/.nii.gz file or a directory of them; a DICOM folder / prefix / .zip of instances; a "
                   "DICOMweb study, series or QIDO query URL")
    p.add_argument("--output-dir", "-o", required=True,
                   help="output directory or URI; a DICOMweb root (dicomweb+https://host/dicom-web) stores the SEG "
                   "into the source study")
    p.add_argument("--config", help="YAML file with InferenceConfig fields (flags override it)")
    add_inference_arguments(p)
    p.add_argument("--quiet", "-q", action="store_true", help="only print errors")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> InferenceConfig:
    return InferenceConfig.from_sources(args.config, **inference_overrides(args))


def expand_inputs(given: list[str], storage_options: dict | None) -> tuple[list[str | DicomSeries], list[str]]:
    """The volumes named by ``given``: NIfTI files (a file, folder or glob) and DICOM series (a folder, prefix, zip
    or DICOMweb URL of instances; one entry per series). Also returns one line per DICOM source saying what
    discovery skipped (localizers, SR, ...)."""
    from ..dicom.discovery import discover_series, looks_like_dicom_source

    out: list[str | DicomSeries] = []
    notes: list[str] = []
    for uri in given:
        if looks_like_dicom_source(uri, storage_options):
            found = discover_series(uri, storage_options)
            out.extend(found.series)
            if found.skipped:
                notes.append(f"{redact_uri(uri)}: {len(found.series)} series, {found.describe_skipped()}")
        else:
            out.extend(list_volumes(uri, storage_options))
    return out, notes


def _where(source: str | DicomSeries) -> str:
    return redact_uri(source.uri if isinstance(source, DicomSeries) else source)


def run(args: argparse.Namespace) -> int:
    """Segment every input; a volume that fails (bad file, prompt outside it, internal error) is reported and the
    others still run. Exit 0 when all were written or skipped, 3 when any failed.

    DICOM input: every image series found is one volume; with ``--output-dir`` a DICOMweb root, the SEG is stored
    into the source study (STOW-RS) and nothing else is written.
    """
    from ..dicom.dicomweb import is_dicomweb_url
    from ..engine import segment_volume
    from ..model_runner import ModelRunner
    from ..output import (duplicate_output_error, earlier_claims, output_location, output_settings, report_uri,
                          resume_key, seg_uri, write_outputs)
    from ..prompts import resolve_prompts
    from ..stages import VolumeStages

    cfg = config_from_args(args)
    if not cfg.checkpoint:
        raise ConfigError("no checkpoint given", hint="pass --checkpoint models/model.pt "
                          "(get it once with `nvseg weights download --dest models/model.pt`)")
    to_pacs = is_dicomweb_url(args.output_dir)
    if to_pacs and cfg.output_format in ("nifti", "both"):
        raise ConfigError(f"--output-dir {redact_uri(args.output_dir)} is a DICOMweb server, which stores DICOM SEG "
                          f"only; --output-format {cfg.output_format} also asks for NIfTI files",
                          hint="use --output-format dicom-seg (or auto), or a folder / bucket for --output-dir")
    inputs, notes = expand_inputs(args.inputs, cfg.storage_options)
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    for note in notes:
        say(note)
    for source in inputs:  # refuse a NIfTI input with --output-format dicom-seg (or a PACS output) before any work
        cfg.output_formats(dicom=isinstance(source, DicomSeries))
        if to_pacs and not isinstance(source, DicomSeries):
            raise ConfigError(f"{_where(source)} is NIfTI, but --output-dir {redact_uri(args.output_dir)} is a "
                              "DICOMweb server, which takes DICOM SEG only (a SEG needs DICOM source instances)",
                              hint="write NIfTI input to a folder or bucket")
    outputs = [output_location(src, "." if to_pacs else args.output_dir, cfg) for src in inputs]
    earlier = earlier_claims(zip(map(_where, inputs), outputs))
    stages = VolumeStages(cfg)
    # the same prompts for every volume, unless --modality auto (each DICOM series' Modality tag decides); a bad
    # class or modality stops here, before the weights load (exit 2)
    fixed_prompts = (resolve_prompts(cfg, stages.catalog) if (cfg.classes or cfg.modality)
                     and cfg.modality != MODALITY_AUTO else None)
    runner = ModelRunner(cfg, log=say)
    runner.model  # load the weights (and build an accelerated encoder) once, before any volume: a bad checkpoint
    # stops here (exit 4)
    debug = bool(getattr(args, "debug", False))
    failed = 0
    for index, (source, out, first) in enumerate(zip(inputs, outputs, earlier), 1):
        where = _where(source)
        prefix = f"[{index}/{len(inputs)}] {where}"
        is_dicom = isinstance(source, DicomSeries)
        nifti, seg = cfg.output_formats(dicom=is_dicom, to_dicomweb=to_pacs)
        targets = [t for t, wanted in ((out, nifti), (seg_uri(out), seg and not to_pacs)) if wanted]
        try:
            if first is not None:  # before the exists check: never "skipped" nor overwriting another patient's mask
                raise duplicate_output_error(where, first, out)
            if targets and not cfg.overwrite and all(exists(t, cfg.storage_options) for t in targets):
                say(f"{prefix}: skipped, {redact_uri(targets[0])} exists (use --overwrite to replace it)")
                continue
            prompts = fixed_prompts or resolve_prompts(cfg, stages.catalog, uri=where,
                                                       dicom_modality=source.modality if is_dicom else None)
            result = segment_volume(source, stages, runner, prompts)
            model = runner.model
            report = write_outputs(
                result, input_uri=where, output_uri=out if nifti else None, cfg=cfg, model_uri=model.uri,
                model_sha256=model.sha256, seg_target=(args.output_dir if to_pacs else seg_uri(out)) if seg else None,
                seed=resume_key(source.identity() if is_dicom else where,
                                output_settings(cfg, result.prompts, dicom=is_dicom), model.sha256 or model.uri),
                catalog=stages.catalog,
                report_target=None if to_pacs else report_uri(out), extra={"backend": runner.backend_report()})
        except NvsegError as err:
            failed += 1
            print(f"{prefix}: FAILED {err}", file=sys.stderr, flush=True)
            continue
        except Exception as exc:  # a bug on this volume: report it plainly and go on with the others
            failed += 1
            if debug:
                traceback.print_exc()
            print(f"{prefix}: FAILED {internal_error_text(exc)}", file=sys.stderr, flush=True)
            continue
        seconds = " ".join(f"{k}={v:.2f}s" for k, v in result.timings.items())
        written = [redact_uri(out)] if nifti else []
        if seg:
            written.append(report["dicom"]["seg"]["uri"] or "no SEG (nothing found)")
        if "preview" in report:
            written.append(report["preview"]["uri"])
        flags = result.quality.flag_codes if result.quality is not None else []
        qc = f"; QC flags: {', '.join(flags)}" if flags else ""
        say(f"{prefix} -> {', '.join(written)} ({len(result.statistics)} labels; {seconds}{qc})")
    if failed:
        print(f"{failed} of {len(inputs)} volume(s) failed", file=sys.stderr)
        return EXIT_VOLUMES_FAILED
    return 0
