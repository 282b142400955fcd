"""``nvseg client``: talk to a running nvseg HTTP service (the Ray Serve app).

Examples::

    nvseg client ready                                   # exit 0 when ready, 1 when not (yet)
    nvseg client --url http://svc:8000 info
    nvseg client infer --image https://host/ct.nii.gz --classes liver,spleen --out ct_seg.zip
    nvseg client segment ct.nii.gz --modality CT_BODY --out ct_seg.nii.gz
    nvseg client segment ct.nii.gz --classes liver --points 120,95,40 --point-labels 1 --format json
    nvseg client submit --image s3://in/ct.nii.gz --output-uri s3://out/ct_seg.nii.gz --wait
    nvseg client job 3f2a...

The service URL comes from ``--url``, else ``$NVSEG_URL``, else ``http://127.0.0.1:8000``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from ..client import DEFAULT_URL, OUTPUT_FORMATS, NvsegClient
from ..errors import EXIT_VOLUMES_FAILED, ConfigError
from ..io import uri_stem, write_bytes_atomic
from .options import _classes, _ints, _points

#: exit status of ``ready`` when the service is up but not ready (``submit --wait`` / ``job`` waits that end in a
#: failed job exit with :data:`~nvseg_ray.errors.EXIT_VOLUMES_FAILED`, as ``nvseg segment`` when a volume failed).
EXIT_NOT_READY = 1

_SUFFIXES = {"nrrd_zip": "_seg.zip", "nifti": "_seg.nii.gz", "json": "_seg.json", "preview": "_preview.png"}


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected 'Name: value', got '{text}'")
    return name.strip(), value.strip()


def _add_prompt_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--modality", "-m", help="everything-set: CT_BODY, MRI_BODY or MRI_BRAIN (service default)")
    p.add_argument("--classes", type=_classes, help="comma-separated class names or ids, e.g. liver,spleen,3")
    p.add_argument("--points", type=_points,
                   help="point prompts 'i,j,k;i,j,k' in input voxel coordinates (for one class: --classes X)")
    p.add_argument("--point-labels", type=_ints, help="one label per point: 1 positive, 0 negative")


def register(subparsers: Any) -> None:
    """Add the ``client`` subcommand to an ``argparse`` subparsers object."""
    parser = subparsers.add_parser(
        "client",
        help="call a running nvseg HTTP service (health, info, inference, jobs)",
        description="Call a running nvseg HTTP service (Ray Serve app; NIM VISTA-3D compatible API).",
    )
    parser.add_argument("--url", default=os.environ.get("NVSEG_URL") or DEFAULT_URL,
                        help=f"service base URL (default: $NVSEG_URL or {DEFAULT_URL})")
    parser.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds (600)")
    parser.add_argument("--header", type=_header, action="append", default=[], metavar="'NAME: VALUE'",
                        help="extra request header, e.g. 'Authorization: Bearer TOKEN' (repeatable)")
    actions = parser.add_subparsers(dest="client_command", required=True, metavar="ACTION")

    actions.add_parser("live", help="GET /v1/health/live")
    actions.add_parser("ready", help="GET /v1/health/ready; exit 0 when ready, 1 when not")
    actions.add_parser("info", help="GET /v1/vista3d/info (version, model, labels)")

    infer = actions.add_parser("infer", help="segment an image the service fetches by URI (NIM API)")
    infer.add_argument("--image", required=True, help="http(s):// or s3:// URI the service can read")
    _add_prompt_arguments(infer)
    infer.add_argument("--format", choices=OUTPUT_FORMATS, default="nrrd_zip", help="response format (nrrd_zip)")
    infer.add_argument("--out", "-o", help="where to write the mask (default ./<stem>_seg.zip|.nii.gz); "
                       "json is printed unless --out is given")

    segment = actions.add_parser("segment", help="upload a local .nii/.nii.gz and segment it")
    segment.add_argument("file", metavar="FILE", help="local .nii or .nii.gz file")
    _add_prompt_arguments(segment)
    segment.add_argument("--format", choices=OUTPUT_FORMATS, default="nifti", help="response format (nifti)")
    segment.add_argument("--output-uri", help="let the service write the mask there (e.g. s3://...); prints JSON")
    segment.add_argument("--out", "-o", help="where to write the mask (default ./<stem>_seg.nii.gz|.zip)")

    submit = actions.add_parser("submit", help="start a background job (POST /v1/jobs); prints the job id")
    submit.add_argument("--image", required=True, help="http(s):// or s3:// URI the service can read")
    submit.add_argument("--output-uri", required=True, help="mask URI the service writes (e.g. s3://.../x.nii.gz)")
    _add_prompt_arguments(submit)
    submit.add_argument("--wait", action="store_true", help="wait for the job to finish and print its state")
    submit.add_argument("--wait-timeout", type=float, default=3600.0, help="seconds to wait at most (3600)")
    submit.add_argument("--poll", type=float, default=1.0, help="seconds between status polls (1)")

    job = actions.add_parser("job", help="print a job's state (GET /v1/jobs/ID)")
    job.add_argument("job_id", metavar="ID")
    parser.set_defaults(func=run)


def _emit(result: bytes | dict, args: argparse.Namespace, stem: str) -> None:
    """A mask (bytes) or a JSON answer: to ``--out`` when given, JSON otherwise printed."""
    if isinstance(result, bytes):
        _write(result, args.out, stem, args.format)
    elif args.out:
        _write((json.dumps(result, indent=2) + "\n").encode("utf-8"), args.out, "", "json")
    else:
        _print_json(result)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


def _nim_prompts(args: argparse.Namespace) -> tuple[list[int | str] | None, dict[str, list[list[float]]] | None]:
    """``--classes``/``--points`` as NIM prompts: points belong to the one class named by ``--classes``."""
    classes = args.classes
    if args.points is None:
        if args.point_labels is not None:
            raise ConfigError("--point-labels needs --points")
        return classes, None
    if not classes or len(classes) != 1:
        raise ConfigError("--points needs exactly one class in --classes (the class the points belong to)",
                          hint="e.g. --classes liver --points 120,95,40;130,90,41")
    if args.point_labels is not None and len(args.point_labels) != len(args.points):
        raise ConfigError(f"{len(args.points)} points but {len(args.point_labels)} --point-labels")
    return None, {str(classes[0]): [list(p) for p in args.points]}


def _write(data: bytes, out: str | None, stem: str, fmt: str) -> None:
    target = out or f"{stem or 'image'}{_SUFFIXES[fmt]}"
    write_bytes_atomic(data, target)
    print(f"wrote {target} ({len(data)} bytes)")


def _job_exit(state: dict[str, Any]) -> int:
    return EXIT_VOLUMES_FAILED if state.get("status") == "failed" else 0


def run(args: argparse.Namespace) -> int:
    """Run one ``nvseg client`` action; returns the exit status."""
    headers = dict(getattr(args, "header", None) or [])
    with NvsegClient(args.url, timeout_s=args.timeout, headers=headers) as client:
        action = args.client_command
        if action == "live":
            _print_json(client.live())
            return 0
        if action == "ready":
            ready = client.ready()
            print("ready" if ready else "not ready")
            return 0 if ready else EXIT_NOT_READY
        if action == "info":
            _print_json(client.info())
            return 0
        if action == "infer":
            classes, points = _nim_prompts(args)
            result = client.infer(args.image, classes=classes, points=points, modality=args.modality,
                                  output=args.format, point_labels=args.point_labels)
            _emit(result, args, uri_stem(args.image))
            return 0
        if action == "segment":
            result = client.segment_file(args.file, modality=args.modality, classes=args.classes,
                                         points=args.points, point_labels=args.point_labels, output=args.format,
                                         output_uri=args.output_uri)
            _emit(result, args, uri_stem(args.file))
            return 0
        if action == "submit":
            classes, points = _nim_prompts(args)
            job_id = client.submit_job(args.image, args.output_uri, classes=classes, modality=args.modality,
                                       points=points, point_labels=args.point_labels)
            print(job_id)
            if not args.wait:
                return 0
            sys.stdout.flush()
            state = client.wait(job_id, timeout_s=args.wait_timeout, poll_s=args.poll)
            _print_json(state)
            return _job_exit(state)
        if action == "job":
            state = client.job(args.job_id)
            _print_json(state)
            return _job_exit(state)
    raise ConfigError(f"unknown client action {action!r}")  # pragma: no cover - argparse restricts choices
