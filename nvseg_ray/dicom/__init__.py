"""DICOM in and out: series discovery (headers only), volume assembly, DICOM SEG writing and DICOMweb.

Nothing heavy is imported here: pydicom / highdicom / dicomweb-client load when a DICOM function is first used
(install them with ``pip install 'nvseg-ray[dicom]'``).
"""

from .series import AUTO_MODALITY, DicomInstance, DicomSeries

__all__ = ["AUTO_MODALITY", "DicomInstance", "DicomSeries"]
