"""``nvseg segment``: segment one or more NIfTI volumes in-process (no Ray needed)."""

from __future__ import annotations

import argparse
import sys
import traceback

from ..config import InferenceConfig
from ..errors import EXIT_VOLUMES_FAILED, ConfigError, NvsegError
from ..io import exists, list_volumes
from ..boundary import internal_error_text
from ..redaction import redact_uri
from .options import add_inference_arguments, inference_overrides


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "segment",
        help="segment NIfTI volumes (local paths or fsspec URIs such as s3://)",
        description="Segment one or more NIfTI volumes with NV-Segment-CTMR. Outputs go to "
        "<output-dir>/<stem>/<stem>_trans.nii.gz (upstream layout) with a JSON report next to each mask.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help=".nii/.nii.gz file, or a directory of them")
    p.add_argument("--output-dir", "-o", required=True, help="output directory or URI")
    p.add_argument("--config", help="YAML file with InferenceConfig fields (flags override it)")
    add_inference_arguments(p)
    p.add_argument("--quiet", "-q", action="store_true", help="only print errors")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> InferenceConfig:
    return InferenceConfig.from_sources(args.config, **inference_overrides(args))


def run(args: argparse.Namespace) -> int:
    """Segment every input; a volume that fails (bad file, prompt outside it, internal error) is reported and the
    others still run. Exit 0 when all were written or skipped, 3 when any failed."""
    from ..engine import Segmenter
    from ..output import duplicate_output_error, earlier_claims, mask_uri, write_result

    cfg = config_from_args(args)
    if not cfg.checkpoint:
        raise ConfigError("no checkpoint given", hint="pass --checkpoint models/model.pt "
                          "(get it once with `nvseg weights download --dest models/model.pt`)")
    inputs = [uri for given in args.inputs for uri in list_volumes(given, cfg.storage_options)]
    outputs = [mask_uri(uri, args.output_dir, cfg) for uri in inputs]
    earlier = earlier_claims(zip(inputs, outputs))
    segmenter = Segmenter(cfg)
    segmenter.model  # load the weights once, before any volume: a bad checkpoint stops here (exit 4)
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    debug = bool(getattr(args, "debug", False))
    failed = 0
    for index, (uri, out, first) in enumerate(zip(inputs, outputs, earlier), 1):
        prefix = f"[{index}/{len(inputs)}] {redact_uri(uri)}"
        try:
            if first is not None:  # before the exists check: never "skipped" nor overwriting another patient's mask
                raise duplicate_output_error(uri, first, out)
            if not cfg.overwrite and exists(out, cfg.storage_options):
                say(f"{prefix}: skipped, {redact_uri(out)} exists (use --overwrite to replace it)")
                continue
            result = segmenter.segment(uri)
            model = segmenter.model
            write_result(result, input_uri=uri, output_uri=out, cfg=cfg, model_uri=model.uri, model_sha256=model.sha256)
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
        stages = " ".join(f"{k}={v:.2f}s" for k, v in result.timings.items())
        say(f"{prefix} -> {redact_uri(out)} ({len(result.statistics)} labels; {stages})")
    if failed:
        print(f"{failed} of {len(inputs)} volume(s) failed", file=sys.stderr)
        return EXIT_VOLUMES_FAILED
    return 0
