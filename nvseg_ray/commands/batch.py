"""``nvseg batch ...``: the Ray batch job (same options as ``python jobs/batch_segment.py``)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("batch", add_help=False, help="segment a whole folder/prefix/manifest on Ray "
                              "(same as python jobs/batch_segment.py; `nvseg batch --help` for options)")
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..batch.cli import main

    return main(args.args)
