"""Plumbing shared by the benchmark scripts: a work folder, progress lines and the JSON report."""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any


#: embedding width of the generated checkpoints (the released model uses 48).
TINY_WIDTH = 8


def write_tiny_checkpoint(path: Path, seed: int = 0, width: int = TINY_WIDTH) -> Path:
    """A randomly initialised ``vista3d132`` state dict (the real architecture, narrower convolutions), saved like
    upstream's ``model.pt`` (the same as ``tests.model_helpers.make_tiny_state_dict``)."""
    import torch
    from monai.networks.nets import vista3d132

    torch.manual_seed(seed)
    torch.save(vista3d132(encoder_embed_dim=width, in_channels=1).state_dict(), path)
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
    """argparse type: ``"liver,spleen,3"`` -> ``["liver", "spleen", 3]``."""
    return [int(t) if t.strip().isdigit() else t.strip() for t in text.split(",") if t.strip()]


def save_like_a_converter(path: Path, array: Any, spacing: Sequence[float]) -> Path:
    """Save a generated CT as DICOM converters do: LPS-flipped axes centred on the volume, qform = sform (code 1)."""
    import nibabel as nib
    import numpy as np

    shape = array.shape
    sx, sy, sz = (float(s) for s in spacing)
    affine = np.diag([-sx, -sy, sz, 1.0])
    affine[:3, 3] = [(shape[0] - 1) / 2 * sx, (shape[1] - 1) / 2 * sy, -(shape[2] - 1) / 2 * sz]
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, 1)
    img.set_sform(affine, 1)
    nib.save(img, str(path))
    return path


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
