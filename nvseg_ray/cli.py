"""``nvseg`` command line: ``segment``, ``batch``, ``report``, ``labels``, ``weights``, ``client``.

Exit codes (:mod:`nvseg_ray.errors`, ``EXIT_*``): 0 success; 1 unexpected internal error; 2 invalid options,
config, classes or modality; 3 one or more input volumes failed (the others were written); 4 checkpoint /
weights problem; 5 storage (path / object-store) problem; 130 interrupted.

Every sub-command is an ordinary argparse sub-parser (``commands/<name>.py``: ``register``), run behind the one
error boundary :func:`nvseg_ray.boundary.guarded`; ``--debug`` works before or after the sub-command.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from .boundary import guarded


def build_parser() -> argparse.ArgumentParser:
    from .commands import batch, client, labels, report, segment, weights

    parser = argparse.ArgumentParser(prog="nvseg", description="NV-Segment-CTMR segmentation at any scale")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for internal errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (segment, batch, report, labels, weights, client):
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    debug = bool(getattr(args, "debug", False))
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(message)s")
    return guarded(f"nvseg {args.command}", lambda: args.func(args), debug=debug)


if __name__ == "__main__":
    sys.exit(main())
