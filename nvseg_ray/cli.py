"""``nvseg`` command line: ``segment``, ``batch``, ``labels``, ``weights``, ``client``.

Exit codes: 0 success; 1 unexpected internal error; 2 invalid options, config, classes or modality;
3 one or more input volumes failed (the others were written); 4 checkpoint / weights problem;
5 storage (path / object-store) problem; 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Callable, Sequence

from .errors import NvsegError


def build_parser() -> argparse.ArgumentParser:
    from .commands import batch, client, labels, segment, weights

    parser = argparse.ArgumentParser(prog="nvseg", description="NV-Segment-CTMR segmentation at any scale")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for internal errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (segment, batch, labels, weights, client):
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["batch"]:  # its own parser (shared with jobs/batch_segment.py), flags passed through as-is
        from .batch.cli import main as batch_main

        return batch_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(message)s")
    return guarded(f"nvseg {args.command}", lambda: args.func(args), debug=args.debug)


def guarded(prog: str, run: Callable[[], int | None], *, debug: bool = False) -> int:
    """Run a command, turning errors into one message and an exit status (never a traceback unless debug).

    :class:`NvsegError` -> its message and ``exit_code``; Ctrl-C -> 130; anything else is a bug -> 1.
    """
    try:
        return int(run() or 0)
    except NvsegError as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: say so plainly, traceback only on --debug
        if debug:
            traceback.print_exc()
        print(f"{prog}: internal error: {type(exc).__name__}: {exc}\n"
              "  hint: re-run with --debug and report the traceback", file=sys.stderr)
        return 1

if __name__ == "__main__":
    sys.exit(main())
