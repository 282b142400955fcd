"""Plumbing shared by the benchmark scripts: a work folder, progress lines and the JSON report."""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def work_folder(path: str | None, prefix: str) -> Iterator[Path]:
    """``path`` (created, kept) when given, else a temporary folder removed afterwards."""
    if path:
        work = Path(path)
        work.mkdir(parents=True, exist_ok=True)
        yield work
    else:
        with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
            yield Path(tmp)


def log(args: argparse.Namespace, msg: str) -> None:
    """A progress line unless ``--quiet``."""
    if not args.quiet:
        print(msg, flush=True)


def write_report(report: dict[str, Any], path: str | None) -> None:
    """Write ``report`` as JSON to ``path`` (``--json``), if given."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"wrote {path}")
