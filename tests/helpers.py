"""Synthetic NIfTI volumes for tests (importable: ``from tests.helpers import make_nifti``).

All images are built the way real files arrive: serialised to bytes, header fields patched at the byte
level (so even invalid headers -- NaN/zero voxel sizes, shears, slope/intercept on integer data -- can be
produced), then parsed back with ``from_bytes`` so that ``img.dataobj`` is a lazy ``ArrayProxy``.
"""

from __future__ import annotations

import gzip
import re
import io
from collections.abc import Sequence

import nibabel as nib
import numpy as np
from nibabel.spatialimages import HeaderDataError

from nvseg_ray.synthetic import tissue_phantom

#: A typical CT affine: 0.8 mm in-plane, 2.5 mm slices, LPS DICOM flipped to RAS+, origin off-centre.
CT_AFFINE = np.array(
    [
        [-0.8, 0.0, 0.0, 100.0],
        [0.0, -0.8, 0.0, 120.0],
        [0.0, 0.0, 2.5, -300.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)

AffineSpec = bool | np.ndarray


def _cast(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Cast phantom values to ``dtype``: shift/clip into integer ranges, build RGB triplets, etc."""
    if dtype.fields is not None:  # RGB24 and friends
        out = np.zeros(values.shape, dtype=dtype)
        grey = np.clip((values + 1000.0) / 1300.0 * 255.0, 0, 255).astype(np.uint8)
        for name in dtype.names:
            out[name] = grey
        return out
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        shifted = values + 1024.0 if dtype.kind == "u" else values
        return np.clip(np.round(shifted), info.min, info.max).astype(dtype)
    return values.astype(dtype)


def _set_transform(header: nib.Nifti1Header, which: str, spec: AffineSpec, affine: np.ndarray) -> None:
    """Set the qform/sform: True -> ``affine`` with code 1 (scanner), an array -> that array with code 1,
    False -> code 0 (the qform still stores ``affine`` when it is decomposable, as nibabel does)."""
    setter = header.set_qform if which == "qform" else header.set_sform
    if isinstance(spec, np.ndarray):
        setter(spec, code=1)
    elif spec:
        setter(affine, code=1)
    elif which == "qform":
        try:
            with np.errstate(invalid="ignore", divide="ignore"):
                setter(affine, code=0)
        except HeaderDataError:  # not decomposable (zero/NaN voxel size): leave the identity qform
            setter(None, code=0)
    else:
        setter(None, code=0)


def make_nifti(
    shape: Sequence[int],
    affine: np.ndarray | None = None,
    dtype: np.dtype | type | str = np.float32,
    data: np.ndarray | None = None,
    qform: AffineSpec = True,
    sform: AffineSpec = True,
    *,
    scl_slope: float | None = None,
    scl_inter: float | None = None,
    zooms: Sequence[float] | None = None,
    nifti2: bool = False,
) -> nib.Nifti1Image:
    """Build a small lazily-loaded NIfTI image.

    Args:
        shape: data shape, e.g. (16, 12, 10) or (16, 12, 10, 1).
        affine: voxel -> RAS+ mm (4, 4); default :data:`CT_AFFINE`. May be invalid (zero/NaN/sheared).
        dtype: on-disk voxel dtype (int16, uint8, complex64, an RGB structured dtype, ...).
        data: voxel values (stored as given, cast to ``dtype``); default :func:`nvseg_ray.synthetic.tissue_phantom`.
        qform / sform: True, False or an explicit (4, 4) affine (see :func:`_set_transform`).
        scl_slope / scl_inter: written into the header as-is; the stored values are *not* rescaled.
        zooms: overrides pixdim[1:4] after the transforms are set (to make pixdim disagree with them).
        nifti2: build a NIfTI-2 image instead of NIfTI-1.

    Returns:
        A :class:`nibabel.Nifti1Image` / :class:`nibabel.Nifti2Image` parsed from bytes (``dataobj`` is an
        ``ArrayProxy``; scaling, if any, is applied when read).
    """
    affine = CT_AFFINE if affine is None else np.asarray(affine, dtype=np.float64)
    dtype = np.dtype(dtype)
    values = tissue_phantom(shape) if data is None else np.asarray(data)
    stored = values if values.dtype == dtype else _cast(values, dtype)
    klass = nib.Nifti2Image if nifti2 else nib.Nifti1Image
    raw = bytearray(klass(stored, np.eye(4)).to_bytes())
    header = klass.header_class.from_fileobj(io.BytesIO(bytes(raw)))
    _set_transform(header, "qform", qform, affine)
    _set_transform(header, "sform", sform, affine)
    if zooms is not None:
        header["pixdim"][1 : 1 + len(zooms)] = zooms
    if scl_slope is not None or scl_inter is not None:
        header["scl_slope"] = 1.0 if scl_slope is None else scl_slope
        header["scl_inter"] = 0.0 if scl_inter is None else scl_inter
    block = header.binaryblock
    raw[: len(block)] = block
    return klass.from_bytes(bytes(raw))


def nifti_bytes(img: nib.Nifti1Image, *, gz: bool = False) -> bytes:
    """The on-disk bytes of ``img`` (``.nii``, or ``.nii.gz`` when ``gz``), header fields untouched."""
    holder = img.file_map["image"].fileobj
    raw = holder.getvalue() if isinstance(holder, io.BytesIO) else img.to_bytes()
    return gzip.compress(raw, compresslevel=1, mtime=0) if gz else raw


def write_nifti_file(path: str, img: nib.Nifti1Image) -> str:
    """Write ``img``'s exact bytes to ``path`` (gzip when it ends in .gz); return ``path``."""
    with open(path, "wb") as fh:
        fh.write(nifti_bytes(img, gz=str(path).endswith(".gz")))
    return str(path)


# ------------------------------------------------------------------------------------------------------
# Runnable commands in the Markdown docs (README.md, docs/*.md), for the tests that run them as written
# ------------------------------------------------------------------------------------------------------

_BASH_BLOCK = re.compile(r"```bash\n(.*?)```", re.S)
#: the lines a user would run: the CLI wrapper and the Ray jobs.
RUNNABLE = ("scripts/nvseg ", "python jobs/")
#: the README section whose commands tests/test_training_e2e.py runs (the others: tests/test_readme.py).
FINETUNE_SECTION = "### Finetuning and evaluation"


def markdown_sections(text: str) -> dict[str, str]:
    """``{heading line: body}`` for every Markdown heading (``#`` .. ``####``) of ``text`` outside code fences
    (a ``# comment`` in a bash block is not a heading); text before the first heading is under ``""``."""
    sections: dict[str, list[str]] = {"": []}
    current, fenced = "", False
    for line in text.splitlines(keepends=True):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,4} ", line):
            current = line.strip()
            sections[current] = []
            continue
        sections[current].append(line)
    return {head: "".join(body) for head, body in sections.items()}


def runnable_commands(text: str) -> list[str]:
    """Every ``scripts/nvseg ...`` / ``python jobs/...`` line of the bash blocks of ``text``, in order, with
    backslash continuations joined and whitespace normalised."""
    commands = []
    for block in _BASH_BLOCK.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = " ".join(line.split())
            if line.startswith(RUNNABLE):
                commands.append(line)
    return commands


_PYTHON_BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def python_blocks(text: str) -> list[str]:
    """The source of every ``python`` code block of ``text``, in order (tests run them as written)."""
    return _PYTHON_BLOCK.findall(text)


def readme_section(text: str, prefix: str) -> str:
    """The body of the first section whose heading starts with ``prefix``."""
    return next(body for head, body in markdown_sections(text).items() if head.startswith(prefix))


def stop_process_group(proc, timeout_s: float = 10.0) -> None:
    """SIGTERM a subprocess started with ``start_new_session=True`` (e.g. ``ray start --block``) and its
    children; SIGKILL them if they are still there after ``timeout_s``."""
    import os
    import signal
    import subprocess

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
