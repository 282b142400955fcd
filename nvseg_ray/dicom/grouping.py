"""Group instance headers into series (one stack each): the rules shared by file discovery
(:mod:`.discovery`) and DICOMweb discovery (:mod:`.dicomweb`).

Instances are grouped by SeriesInstanceUID and, inside a series, by FrameOfReferenceUID, ImageOrientationPatient
and Rows x Columns (each enhanced multi-frame instance on its own). Skipped and counted: DICOMDIR, objects without
an image (:data:`NON_IMAGE_MODALITIES`), localizers (ImageType contains LOCALIZER) and duplicate SOP instances.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from typing import Any

from .series import DicomInstance, DicomSeries

#: Modalities of objects that carry no image to segment.
NON_IMAGE_MODALITIES = frozenset({"SR", "PR", "KO", "SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "RTIMAGE",
                                  "REG", "DOC", "PLAN", "FID", "AU", "ECG", "HD", "RWV", "OT-SR"})
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
#: Skip reasons (keys of :attr:`nvseg_ray.dicom.discovery.Discovery.skipped`).
SKIP_NOT_DICOM = "not_dicom"
SKIP_DICOMDIR = "dicomdir"
SKIP_NO_IMAGE = "no_image"
SKIP_LOCALIZER = "localizer"


def _text(ds: Any, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _orientation(ds: Any) -> tuple[float, ...]:
    iop = ds.get("ImageOrientationPatient")
    if iop is None:
        try:
            iop = ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
        except (AttributeError, IndexError, KeyError):
            iop = None
    return tuple(round(float(v), 4) for v in iop) if iop is not None else ()


def _skip_reason(ds: Any) -> str | None:
    sop_class = _text(ds, "SOPClassUID") or _text(getattr(ds, "file_meta", {}), "MediaStorageSOPClassUID")
    if sop_class == DICOMDIR_SOP_CLASS or "DirectoryRecordSequence" in ds:
        return SKIP_DICOMDIR
    modality = _text(ds, "Modality").upper()
    if modality in NON_IMAGE_MODALITIES or not ds.get("Rows"):
        return f"{SKIP_NO_IMAGE}:{modality or 'unknown'}"
    if not _text(ds, "SeriesInstanceUID") or not _text(ds, "SOPInstanceUID"):
        return SKIP_NOT_DICOM
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    if "LOCALIZER" in image_type:
        return SKIP_LOCALIZER
    return None


def group_series(source: str, headers: Iterable[tuple[str, Any]], skipped: Counter) -> list[DicomSeries]:
    """Group ``(locator, header)`` pairs into :class:`DicomSeries` (see the module docstring for the rules)."""
    stacks: dict[str, dict[tuple, list[tuple[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for located, ds in headers:
        reason = _skip_reason(ds)
        if reason:
            skipped[reason] += 1
            continue
        n_frames = int(ds.get("NumberOfFrames") or 1)
        key = (_text(ds, "FrameOfReferenceUID"), _orientation(ds), int(ds.Rows), int(ds.get("Columns") or 0),
               _text(ds, "SOPInstanceUID") if n_frames > 1 else "")
        stacks[_text(ds, "SeriesInstanceUID")][key].append((located, ds))
    out: list[DicomSeries] = []
    for series_uid, groups in stacks.items():
        ordered = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))
        for index, (_, members) in enumerate(ordered, 1):
            first = members[0][1]
            seen: set[str] = set()
            instances = []
            for located, ds in sorted(members, key=lambda m: _text(m[1], "SOPInstanceUID")):
                uid = _text(ds, "SOPInstanceUID")
                if uid in seen:  # the same instance twice (a copy in another folder): read it once
                    skipped["duplicate_instance"] += 1
                    continue
                seen.add(uid)
                instances.append(DicomInstance(uri=located, sop_instance_uid=uid,
                                               n_frames=int(ds.get("NumberOfFrames") or 1)))
            out.append(DicomSeries(
                source=source, series_instance_uid=series_uid, study_instance_uid=_text(first, "StudyInstanceUID"),
                modality=_text(first, "Modality").upper(), series_description=_text(first, "SeriesDescription"),
                frame_of_reference_uid=_text(first, "FrameOfReferenceUID"), sop_class_uid=_text(first, "SOPClassUID"),
                instances=tuple(instances), split=str(index) if len(ordered) > 1 else ""))
    return sorted(out, key=lambda s: (s.study_instance_uid, s.series_instance_uid, s.split))
