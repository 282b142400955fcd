"""What a DICOM series is to nvseg-ray: a light, picklable description built from headers only.

A :class:`DicomSeries` names its instances (where each one is read from) and the header facts discovery,
planning and manifests need. It carries no pixel data and no patient identifiers (never PatientName,
PatientID or PatientBirthDate): it travels in batch rows, manifests and logs.

Locators (:attr:`DicomInstance.uri`):

* a file: a local path or any fsspec URI (``s3://bucket/study/1.dcm``);
* a member of a zip archive: ``zip://<member>::<archive uri>`` (fsspec's chained zip syntax);
* a DICOMweb instance: ``<root>/studies/<study>/series/<series>/instances/<sop>`` (``http(s)://``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

#: Modality -> the everything-segmentation prompt ``--modality auto`` picks (MRI_BRAIN only when asked).
AUTO_MODALITY: dict[str, str] = {"CT": "CT_BODY", "MR": "MRI_BODY"}


@dataclass(frozen=True)
class DicomInstance:
    """One instance of a series: where to read it and its SOP Instance UID."""

    uri: str
    sop_instance_uid: str
    #: frames in the instance (1 for classic single-frame CT/MR; >1 for enhanced multi-frame objects).
    n_frames: int = 1


@dataclass(frozen=True)
class DicomSeries:
    """One image series, as discovered from headers.

    Attributes:
        source: the folder, prefix, zip or DICOMweb URL the user named (redacted before it is shown).
        series_instance_uid / study_instance_uid / frame_of_reference_uid: as in the headers.
        modality: the Modality tag (``"CT"``, ``"MR"``, ...).
        series_description: SeriesDescription ("" when absent).
        sop_class_uid: SOP Class UID of the instances (CT Image Storage, Enhanced MR Image Storage, ...).
        instances: the series' instances, sorted by SOP Instance UID (their slice order is decided on assembly).
        split: "" for a whole series, else a short tag (``"2"``, ``"3"``) when one SeriesInstanceUID held several
            stacks (different orientation / matrix / frame of reference) that became separate rows.
    """

    source: str
    series_instance_uid: str
    study_instance_uid: str
    modality: str
    series_description: str = ""
    frame_of_reference_uid: str = ""
    sop_class_uid: str = ""
    instances: tuple[DicomInstance, ...] = field(default_factory=tuple)
    split: str = ""

    @property
    def uri(self) -> str:
        """A readable locator of the series for messages and manifests: ``<source>#series=<uid>[.<split>]``."""
        return f"{self.source}#series={self.key}"

    @property
    def key(self) -> str:
        """The series UID, plus the split tag when one series became several stacks."""
        return f"{self.series_instance_uid}.{self.split}" if self.split else self.series_instance_uid

    @property
    def n_instances(self) -> int:
        return len(self.instances)

    def identity(self) -> str:
        """sha256 over the series UID (+ split) and the sorted SOP Instance UIDs: changes when the series gains,
        loses or replaces instances, so batch resume redoes exactly those series."""
        digest = hashlib.sha256(self.key.encode())
        for uid in sorted(i.sop_instance_uid for i in self.instances):
            digest.update(b"\0" + uid.encode())
        return digest.hexdigest()

    def summary(self) -> dict[str, Any]:
        """The manifest / report columns (no patient identifiers)."""
        return {"study_instance_uid": self.study_instance_uid, "series_instance_uid": self.series_instance_uid,
                "dicom_modality": self.modality, "series_description": self.series_description,
                "n_instances": self.n_instances}
