"""The brain template that images are registered to.

* A user-supplied template (upstream's ``LUMIR_template.nii.gz``, or any skull-stripped T1 template) from a path
  or fsspec URI, with an optional brain mask (default: template > 0).
* Otherwise the default: the ICBM 2009a nonlinear symmetric T1 template (MNI152, 1 mm, 197 x 233 x 189,
  skull-stripped) and its brain mask, which ship *inside* the nilearn wheel (no download).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ..errors import ConfigError, InputError
from ..io import read_nifti

DEFAULT_TEMPLATE_NAME = "nilearn:MNI152-2009a-1mm"


@dataclass(frozen=True)
class BrainTemplate:
    """A skull-stripped T1 template.

    Attributes:
        image: (X, Y, Z) float32 T1 intensities, 0 outside the brain.
        mask: (X, Y, Z) bool brain mask on the same grid.
        affine: 4 x 4 voxel -> RAS world mm.
        name: where it came from (path/URI, or :data:`DEFAULT_TEMPLATE_NAME`).
        sha256: digest of the voxels, the mask and the affine (recorded next to every output).
    """

    image: np.ndarray
    mask: np.ndarray
    affine: np.ndarray
    name: str
    sha256: str

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.image.shape)  # type: ignore[return-value]

    @property
    def brain_ml(self) -> float:
        return float(self.mask.sum() * abs(np.linalg.det(self.affine[:3, :3])) / 1000.0)


def _digest(image: np.ndarray, mask: np.ndarray, affine: np.ndarray) -> str:
    h = hashlib.sha256(np.ascontiguousarray(image, np.float32).tobytes())
    h.update(np.packbits(mask.astype(bool)).tobytes())
    h.update(np.asarray(affine, np.float64).tobytes())
    return h.hexdigest()


def _make(image: np.ndarray, mask: np.ndarray, affine: np.ndarray, name: str) -> BrainTemplate:
    image = np.asarray(image, np.float32)
    if image.ndim != 3 or mask.shape != image.shape:
        raise InputError(f"brain template {name}: expected a 3-D image and a mask of the same shape, got "
                         f"{image.shape} and {mask.shape}", code="brain_template_invalid")
    if not mask.any():
        raise InputError(f"brain template {name}: the brain mask is empty", code="brain_template_invalid")
    return BrainTemplate(image=image, mask=mask.astype(bool), affine=np.asarray(affine, float), name=name,
                         sha256=_digest(image, mask, affine))


@lru_cache(maxsize=4)
def load_template(uri: str | None = None, mask_uri: str | None = None,
                  storage_options_json: str = "{}") -> BrainTemplate:
    """The template at ``uri`` (mask: ``mask_uri``, else ``image > 0``), or the nilearn default when ``uri`` is None.

    Cached per process: Ray workers load it once.
    """
    import json

    if uri is None:
        return _nilearn_template()
    options = json.loads(storage_options_json)
    image = read_nifti(uri, options)
    array = np.asanyarray(image.dataobj, dtype=np.float32)
    array = array[..., 0] if array.ndim == 4 and array.shape[3] == 1 else array
    if mask_uri:
        mask = np.asanyarray(read_nifti(mask_uri, options).dataobj) > 0
        mask = mask[..., 0] if mask.ndim == 4 else mask
    else:
        mask = array > 0
    return _make(array, mask, image.affine, uri)


def _nilearn_template() -> BrainTemplate:
    try:
        from nilearn.datasets import load_mni152_brain_mask, load_mni152_template
    except ImportError:
        raise ConfigError("no --brain-template given and nilearn (which ships the default ICBM152 template) is not "
                          "installed", hint='pip install "nvseg-ray[brain]", or pass --brain-template PATH_OR_URI '
                          "(e.g. upstream's LUMIR_template.nii.gz)") from None
    t1 = load_mni152_template(resolution=1)
    mask = load_mni152_brain_mask(resolution=1)
    return _make(np.asanyarray(t1.dataobj, dtype=np.float32), np.asanyarray(mask.dataobj) > 0, t1.affine,
                 DEFAULT_TEMPLATE_NAME)
