"""Brain test data: the nilearn ICBM152 template at 2 mm written as a user template, and synthetic heads."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from nvseg_ray.brain.phantom import rigid_scale_matrix, synthetic_head
from nvseg_ray.brain.template import BrainTemplate, load_template

#: (rotation deg, translation mm, scale, head grid spacing mm, head grid rotation deg): anisotropic, oblique grids.
HEAD_CASES = {
    "rot-scale-oblique": ((12, -8, 15), (6, -10, 4), (1.08, 0.95, 1.02), (1.2, 1.0, 1.4), (5, 10, -7)),
    "thick-slices-shrunk": ((-15, 5, 0), (-12, 8, 15), (0.92, 0.92, 0.92), (0.9, 0.9, 3.0), (0, 0, 25)),
    "aligned-iso": ((0, 0, 0), (0, 0, 0), (1, 1, 1), (1.0, 1.0, 1.0), (0, 0, 0)),
}
#: extra synthetic_head arguments per case: a neck moves the head's centre of mass off the brain's.
HEAD_OPTIONS = {"thick-slices-shrunk": {"neck_mm": 70.0}}


def write_template_2mm(folder: Path) -> tuple[str, str]:
    """The ICBM152 2009a template and brain mask at 2 mm (nilearn), saved as files: ``(template, mask)`` paths."""
    from nilearn.datasets import load_mni152_brain_mask, load_mni152_template

    folder.mkdir(parents=True, exist_ok=True)
    t1, mask = load_mni152_template(resolution=2), load_mni152_brain_mask(resolution=2)
    paths = (folder / "template_2mm.nii.gz", folder / "template_2mm_mask.nii.gz")
    nib.save(nib.Nifti1Image(np.asanyarray(t1.dataobj, dtype=np.float32), t1.affine), paths[0])
    nib.save(nib.Nifti1Image(np.asanyarray(mask.dataobj).astype(np.uint8), mask.affine), paths[1])
    return str(paths[0]), str(paths[1])


def template_of(paths: tuple[str, str]) -> BrainTemplate:
    return load_template(paths[0], paths[1])


def brain_center(template: BrainTemplate) -> np.ndarray:
    return template.affine[:3, :3] @ (np.array(template.shape) / 2.0) + template.affine[:3, 3]


def brain_corners(template: BrainTemplate) -> np.ndarray:
    """(8, 3) RAS corners of the template brain's bounding box."""
    idx = np.array(np.nonzero(template.mask))
    lo, hi = idx.min(1), idx.max(1)
    corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])], float)
    return corners @ template.affine[:3, :3].T + template.affine[:3, 3]


def make_head(template: BrainTemplate, case: str, **kw):
    """The synthetic head of ``HEAD_CASES[case]`` (``spacing=`` overrides the case's grid spacing)."""
    rotation, translation, scale, spacing, grid_rotation = HEAD_CASES[case]
    matrix = rigid_scale_matrix(rotation, translation, scale, brain_center(template))
    return synthetic_head(template, matrix, spacing=kw.pop("spacing", spacing), grid_rotation_deg=grid_rotation,
                          **{**HEAD_OPTIONS.get(case, {}), **kw})


def save_head(path: Path, head) -> Path:
    image = nib.Nifti1Image(head.array, head.affine)
    image.set_qform(head.affine, code=1)
    image.set_sform(head.affine, code=1)
    nib.save(image, path)
    return path
