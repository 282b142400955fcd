"""``nvseg batch ...``: the Ray batch job as a sub-command (same options as ``python jobs/batch_segment.py``)."""

from __future__ import annotations

import argparse

from ..batch.cli import __doc__ as BATCH_DOC  # noqa: N812 - the job's usage text, shown by `nvseg batch --help`
from ..batch.cli import add_batch_arguments, run


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("batch", help="segment a whole folder/prefix/manifest on Ray "
                              "(same as python jobs/batch_segment.py)", description=BATCH_DOC,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_batch_arguments(p)
    p.set_defaults(func=run)
