"""Brain T1 MRI workflow as plain functions over arrays (upstream ``brain_t1_preprocess``; docs/upstream.md,
Brain T1 workflow).

    skull strip -> N4 bias correction -> white-matter-peak normalisation -> affine registration to the
    brain template (world coordinates) -> resample onto the template's 1 mm grid
    ... the ordinary MRI_BRAIN inference on the template-space image ...
    revert: labels on the template grid -> nearest neighbour onto the exact input grid (integer dtype)

Modules: :mod:`.template` (LUMIR from a path/URI or the ICBM152 2009 template shipped in nilearn),
:mod:`.images` (NIfTI-style array + RAS affine <-> SimpleITK image), :mod:`.intensity` (N4, WM peak, T1 check),
:mod:`.registration` (affine registration, warping), :mod:`.skullstrip` (``atlas`` / ``command`` / ``none``),
:mod:`.revert`, and :mod:`.workflow`, which chains them for :class:`nvseg_ray.stages.VolumeStages`.

SimpleITK (N4 and registration) and nilearn (default template) are optional dependencies, imported lazily:
``pip install "nvseg-ray[brain]"``.
"""

from .workflow import BrainRecord, prepare_brain, revert_to_input

__all__ = ["BrainRecord", "prepare_brain", "revert_to_input"]
