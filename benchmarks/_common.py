"""Plumbing shared by the benchmark scripts: a work folder, progress lines and the JSON report."""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nvseg_ray.labels import parse_class_list
from nvseg_ray.synthetic import TINY_WIDTH, tiny_state_dict


def write_tiny_checkpoint(path: Path, seed: int = 0, width: int = TINY_WIDTH) -> Path:
    """A randomly initialised ``vista3d132`` state dict (:func:`nvseg_ray.synthetic.tiny_state_dict`: the real
    architecture, narrower convolutions), saved like upstream's ``model.pt``."""
    import torch

    torch.save(tiny_state_dict(seed=seed, width=width), path)
    return path


def floats_arg(text: str) -> tuple[float, ...]:
    """argparse type: ``"0.78,0.78,1.25"`` -> ``(0.78, 0.78, 1.25)``."""
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got '{text}'") from None


def ints_arg(text: str) -> tuple[int, ...]:
    """argparse type: ``"192,192,128"`` -> ``(192, 192, 128)``."""
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None


def classes_arg(text: str) -> list[int | str]:
    """argparse type: ``"liver,spleen,3"`` -> ``["liver", "spleen", 3]`` (the one class-list rule,
    :func:`nvseg_ray.labels.parse_class_list`)."""
    return parse_class_list(text)


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
