"""The error boundary of every command line (``nvseg ...``, ``jobs/*.py``): errors -> one message + exit status.

It sits below every entry point that uses it (it imports only :mod:`.errors` and :mod:`.redaction`), so a
sub-command module never needs to import :mod:`nvseg_ray.cli`.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable

from .errors import EXIT_INTERNAL, EXIT_INTERRUPTED, NvsegError
from .redaction import redact_text

__all__ = ["describe_exception", "guarded", "internal_error_text"]

#: what a user is asked to do about an internal error (a bug).
DEBUG_HINT = "re-run with --debug and report the traceback"


def describe_exception(exc: BaseException) -> str:
    """``"Type: message at file.py:line"`` of an untyped error's root cause (not MONAI's "applying transform"
    wrapper), redacted: the ``error_message`` of a failed batch or evaluation row."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    last = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    where = f" at {last[0].filename.rsplit('/', 1)[-1]}:{last[0].lineno}" if last else ""
    return f"{type(exc).__name__}: {redact_text(str(exc))}{where}"


def internal_error_text(exc: BaseException) -> str:
    """The one-message form of an unexpected exception (a bug): its type and redacted text, plus the hint."""
    return f"internal error: {type(exc).__name__}: {redact_text(str(exc))}\n  hint: {DEBUG_HINT}"


def guarded(prog: str, run: Callable[[], int | None], *, debug: bool = False) -> int:
    """Run a command, turning errors into one message on stderr and an exit status (a traceback only on debug).

    Args:
        prog: what the user ran, the prefix of every message (``nvseg batch``, ``jobs/train.py``).
        run: the command; its return value (``None`` = 0) is the exit status.
        debug: print the traceback of an internal error.

    Returns:
        ``run()``'s status; an :class:`NvsegError`'s ``exit_code``; 130 on Ctrl-C; 1 for anything else (a bug).
    """
    try:
        return int(run() or 0)
    except NvsegError as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug: say so plainly, traceback only on --debug
        if debug:
            traceback.print_exc()
        print(f"{prog}: {internal_error_text(exc)}", file=sys.stderr)
        return EXIT_INTERNAL
