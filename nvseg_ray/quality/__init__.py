"""Quality control of finished masks: per-structure statistics, automated QC flags, preview images and
viewer colour tables (no Ray here).

* :mod:`.statistics` -- voxels, volume, intensity statistics in the input's units, bounding box, field-of-view cut.
* :mod:`.flags` -- the QC flags (``empty``, ``few_labels``, ``cut_by_fov``, ``laterality``, ``volume_outlier``,
  ``intensity_mismatch``, ``fragmented``), each with a short reason. A flag never fails a volume.
* :mod:`.preview` -- one PNG of axial, coronal and sagittal slices with the labels overlaid.
* :mod:`.colour_tables` -- a 3D Slicer colour table and an ITK-SNAP label description for a mask.

Every function works on the mask on the *input grid* (``labels`` (X, Y, Z) integer class ids, ``affine`` voxel ->
RAS mm) and, where intensities are used, the input's voxels in the input's own units (HU for CT).
"""
