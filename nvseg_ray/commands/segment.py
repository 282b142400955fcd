"""``nvseg segment``: segment one or more NIfTI volumes in-process (no Ray needed)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..config import InferenceConfig
from ..errors import ConfigError, NvsegError
from ..io import exists, list_volumes

#: exit status when at least one volume failed (others may have succeeded).
EXIT_VOLUME_FAILED = 3


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in _csv(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None


def _classes(text: str) -> list[int | str]:
    return [int(t) if t.isdigit() else t for t in _csv(text)]


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


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "segment",
        help="segment NIfTI volumes (local paths or fsspec URIs such as s3://)",
        description="Segment one or more NIfTI volumes with NV-Segment-CTMR. Outputs go to "
        "<output-dir>/<stem>/<stem>_trans.nii.gz (upstream layout) with a JSON report next to each mask.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help=".nii/.nii.gz file, or a directory of them")
    p.add_argument("--output-dir", "-o", required=True, help="output directory or URI")
    p.add_argument("--checkpoint", "-c", help="model.pt path or URI (see `nvseg weights download`)")
    p.add_argument("--config", help="YAML file with InferenceConfig fields (flags override it)")
    p.add_argument("--modality", "-m", help="everything-set: CT_BODY, MRI_BODY or MRI_BRAIN")
    p.add_argument("--classes", type=_classes, help="comma-separated class names or ids, e.g. liver,spleen,3")
    p.add_argument("--points", type=_points, help="point prompts 'i,j,k;i,j,k' in input voxel coordinates")
    p.add_argument("--point-labels", type=_ints, help="one label per point: 1 positive, 0 negative")
    p.add_argument("--no-subclass-expansion", dest="expand_subclasses", action="store_const", const=False,
                   help="do not expand prompts 2/20/21 into their parts (finetuned checkpoints)")
    p.add_argument("--label-catalog", help="catalog JSON or an upstream bundle directory")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--patch-size", type=_ints, help="sliding-window size, default 192,192,128")
    p.add_argument("--overlap", type=float, help="window overlap, default 0.25")
    p.add_argument("--sw-batch-size", type=int, help="windows per forward pass, default 1")
    p.add_argument("--class-chunk-size", type=int, help="classes per logit evaluation, default 16")
    p.add_argument("--no-amp", dest="amp", action="store_const", const=False, help="disable fp16 autocast on CUDA")
    p.add_argument("--output-dtype", help="uint16 (default), uint8, int16, int32, float32 (upstream)")
    p.add_argument("--layout", dest="output_layout", choices=["nested", "flat"], help="output layout")
    p.add_argument("--postfix", dest="output_postfix", help="mask file postfix, default 'trans'")
    p.add_argument("--max-voxels", type=int, help="refuse volumes with more voxels than this")
    p.add_argument("--overwrite", action="store_const", const=True, help="replace existing outputs")
    p.add_argument("--quiet", "-q", action="store_true", help="only print errors")
    p.set_defaults(func=run)


_CONFIG_FLAGS = ("checkpoint", "modality", "classes", "points", "point_labels", "expand_subclasses",
                 "label_catalog", "device", "patch_size", "overlap", "sw_batch_size", "class_chunk_size", "amp",
                 "output_dtype", "output_layout", "output_postfix", "max_voxels", "overwrite")


def config_from_args(args: argparse.Namespace) -> InferenceConfig:
    overrides: dict[str, Any] = {name: getattr(args, name, None) for name in _CONFIG_FLAGS}
    return InferenceConfig.from_sources(args.config, **overrides)


def run(args: argparse.Namespace) -> int:
    from ..engine import Segmenter
    from ..output import mask_uri, write_result

    cfg = config_from_args(args)
    if not cfg.checkpoint:
        raise ConfigError("no checkpoint given", hint="pass --checkpoint models/model.pt "
                          "(get it once with `nvseg weights download --dest models/model.pt`)")
    inputs = [uri for given in args.inputs for uri in list_volumes(given, cfg.storage_options)]
    segmenter = Segmenter(cfg)
    segmenter.model  # load the weights once, before any volume: a bad checkpoint stops here (exit 4)
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    failed = 0
    for index, uri in enumerate(inputs, 1):
        out = mask_uri(uri, args.output_dir, cfg)
        prefix = f"[{index}/{len(inputs)}] {uri}"
        if not cfg.overwrite and exists(out, cfg.storage_options):
            say(f"{prefix}: skipped, {out} exists (use --overwrite to replace it)")
            continue
        try:
            result = segmenter.segment(uri)
            model = segmenter.model
            write_result(result, input_uri=uri, output_uri=out, cfg=cfg, model_uri=model.uri, model_sha256=model.sha256)
        except NvsegError as err:
            if err.exit_code in (2, 4):  # configuration / checkpoint problems affect every volume: stop
                raise
            failed += 1
            print(f"{prefix}: FAILED {err}", file=sys.stderr, flush=True)
            continue
        stages = " ".join(f"{k}={v:.2f}s" for k, v in result.timings.items())
        say(f"{prefix} -> {out} ({len(result.statistics)} labels; {stages})")
    if failed:
        print(f"{failed} of {len(inputs)} volume(s) failed", file=sys.stderr)
        return EXIT_VOLUME_FAILED
    return 0
