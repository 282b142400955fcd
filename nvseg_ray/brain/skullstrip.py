"""Skull stripping backends: ``atlas`` (default), ``command`` (an installed tool such as mri_synthstrip), ``none``.

Each returns a bool brain mask on the input grid ((X, Y, Z), same shape as the input array).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile

import nibabel as nib
import numpy as np

from ..errors import InputError
from .revert import template_to_input_grid
from .template import BrainTemplate


def atlas_mask(template: BrainTemplate, template_to_input: np.ndarray, shape: tuple[int, int, int],
               affine: np.ndarray) -> np.ndarray:
    """The template's brain mask brought onto the input grid through a head -> template registration, refined:
    the largest connected component with its holes filled."""
    from scipy.ndimage import binary_fill_holes, label

    mask = template_to_input_grid(template.mask.astype(np.uint8), template.affine, template_to_input, shape, affine,
                                  np.uint8) > 0
    components, n = label(mask)
    if n > 1:
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        mask = components == int(sizes.argmax())
    return binary_fill_holes(mask)


def command_mask(array: np.ndarray, image: nib.Nifti1Image, command: str, *, timeout_s: float, uri: str) -> np.ndarray:
    """Run an installed skull-stripping tool on the volume and read back its mask.

    ``command`` holds ``{input}``, ``{output}`` and optionally ``{mask}``; it is split like a shell would but run
    without one. The mask is the tool's ``{mask}`` file when given, else its stripped output > 0.

    Raises:
        InputError: ``skull_strip_tool_missing`` (executable not on PATH), ``skull_strip_failed`` (non-zero exit,
        timeout, or no readable output).
    """
    argv0 = shlex.split(command)[0]
    if shutil.which(argv0) is None:
        raise InputError(f"{uri}: skull-stripping tool '{argv0}' is not installed or not on PATH",
                         code="skull_strip_tool_missing",
                         hint="install it (e.g. FreeSurfer's mri_synthstrip) on every CPU node, or use "
                         "--skull-strip atlas")
    with tempfile.TemporaryDirectory(prefix="nvseg-strip-") as tmp:
        paths = {"input": os.path.join(tmp, "input.nii.gz"), "output": os.path.join(tmp, "stripped.nii.gz"),
                 "mask": os.path.join(tmp, "mask.nii.gz")}
        nib.save(nib.Nifti1Image(array.astype(np.float32), image.affine, image.header), paths["input"])
        argv = [part.format(**paths) for part in shlex.split(command)]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise InputError(f"{uri}: '{argv0}' did not finish within {timeout_s:.0f} s",
                             code="skull_strip_failed") from None
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise InputError(f"{uri}: '{argv0}' exited with status {done.returncode}: {' | '.join(tail)}",
                             code="skull_strip_failed")
        source = paths["mask"] if "{mask}" in command else paths["output"]
        try:
            mask = np.asanyarray(nib.load(source).dataobj) > 0
        except (OSError, nib.filebasedimages.ImageFileError) as exc:
            raise InputError(f"{uri}: '{argv0}' wrote no readable {os.path.basename(source)}: {exc}",
                             code="skull_strip_failed") from None
    mask = mask[..., 0] if mask.ndim == 4 else mask
    if mask.shape != array.shape:
        raise InputError(f"{uri}: '{argv0}' returned a mask of shape {mask.shape} for an image of shape {array.shape}",
                         code="skull_strip_failed")
    return mask
