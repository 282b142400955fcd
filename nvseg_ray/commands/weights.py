"""``nvseg weights``: download and verify the pretrained NV-Segment-CTMR weights.

Usage::

    nvseg weights download --dest PATH_OR_URI [--revision REV] [--sha256 HEX] [--endpoint URL] [--overwrite]
    nvseg weights verify PATH_OR_URI

The Hub token is never taken on the command line (it would show in process lists); the
huggingface_hub library reads ``HF_TOKEN`` / its stored login itself. Remote destinations use the
fsspec driver's usual credentials (e.g. ``AWS_*`` environment variables for ``s3://``).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..errors import ConfigError
from ..weights import HF_REVISION, WeightsRecord, download_weights, verify_weights


def register(subparsers: Any) -> None:
    """Add the ``weights`` command (with ``download`` and ``verify``) to a subparsers object."""
    parser = subparsers.add_parser(
        "weights",
        help="download / verify the pretrained weights",
        description="Download the pretrained NV-Segment-CTMR weights from the Hugging Face Hub, or verify a copy.",
    )
    actions = parser.add_subparsers(dest="weights_command", metavar="{download,verify}")
    actions.required = True
    _add_download(actions)
    _add_verify(actions)
    parser.set_defaults(func=run)


def _add_download(actions: Any) -> None:
    """``nvseg weights download``."""
    parser = actions.add_parser(
        "download",
        help="download and verify the weights (no-op if DEST already holds verified weights)",
    )
    parser.add_argument("--dest", required=True, help="target file: a local path or an fsspec URI (s3://...)")
    parser.add_argument("--revision", default=HF_REVISION, help="Hub revision (default: the pinned %(default)s)")
    parser.add_argument("--sha256", default=None, metavar="HEX", help="sha256 the file must have")
    parser.add_argument("--endpoint", default=None, metavar="URL", help="Hub endpoint / mirror (default: HF_ENDPOINT)")
    parser.add_argument("--overwrite", action="store_true", help="download again even if DEST is already verified")
    parser.add_argument("--json", action="store_true", help="print the provenance record as JSON")


def _add_verify(actions: Any) -> None:
    """``nvseg weights verify``."""
    parser = actions.add_parser("verify", help="recompute the sha256 of a weights file and compare with its sidecar")
    parser.add_argument("path", metavar="PATH_OR_URI", help="weights file (its <file>.json sidecar is read too)")
    parser.add_argument("--json", action="store_true", help="print the provenance record as JSON")


def run(args: argparse.Namespace) -> int:
    """Execute ``nvseg weights <action>``; returns the exit status (errors are raised as NvsegError)."""
    action = getattr(args, "weights_command", None)
    if action == "download":
        record = download_weights(
            args.dest,
            revision=args.revision,
            expected_sha256=args.sha256,
            endpoint=args.endpoint,
            overwrite=args.overwrite,
        )
        status = "cached (already present and verified; Hub not contacted)" if record.cached else "downloaded"
    elif action == "verify":
        record = verify_weights(args.path)
        status = "verified (sha256 matches the provenance sidecar)"
    else:
        raise ConfigError(f"unknown weights action {action!r}", hint="use `nvseg weights download` or `verify`")
    print(json.dumps(record.to_dict(), indent=2) if args.json else format_record(record, status))
    return 0


def format_record(record: WeightsRecord, status: str) -> str:
    """Short human summary of a weights record."""
    revision = record.revision
    if record.commit_hash and record.commit_hash != record.revision:
        revision += f" (commit {record.commit_hash})"
    checks = ", ".join(record.verified_against) or "none available"
    lines = [
        f"weights:  {record.dest}",
        f"size:     {record.size / 1e6:.1f} MB ({record.size} bytes)",
        f"sha256:   {record.sha256}",
        f"source:   {record.repo_id}/{record.filename} @ {revision}",
        f"checked:  {checks} (at download, {record.downloaded_at})",
        f"status:   {status}",
    ]
    return "\n".join(lines)
