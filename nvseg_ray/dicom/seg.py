"""DICOM SEG output: one Segmentation instance per series, written with highdicom from the mask of the series.

:func:`build_seg` turns a label map on the grid of an :class:`~nvseg_ray.dicom.assembly.AssembledSeries` into a
``highdicom.seg.Segmentation`` that references the source series (per frame, where the grid is the source's), has
one segment per class present (catalog name, SNOMED CT category / type / laterality / anatomic region from
:mod:`nvseg_ray.labels.codes`, recommended display colour, algorithm identification) and copies the patient and
study modules from the source. Its Series and SOP Instance UIDs come from :func:`series_uids` (a hash of the batch
resume key): writing the same series again gives the same UIDs, so a PACS replaces the object instead of growing a
duplicate series. :func:`encode_seg` gives the DICOM Part 10 bytes.

Segmentation types (:data:`SEG_TYPES`):

* ``"binary"`` (default): classic Segmentation Storage (1.2.840.10008.5.1.4.1.1.66.4), one 1-bit frame per
  (segment, slice) holding that segment (empty frames omitted), transfer syntax :data:`BINARY_TRANSFER_SYNTAX`;
  read by every viewer and PACS, checked with ``dciodvfy``.
* ``"labelmap"``: Label Map Segmentation Storage (1.2.840.10008.5.1.4.1.1.66.7, DICOM 2024), one 8/16-bit frame
  per slice whose pixel values are segment numbers, RLE Lossless; smaller and faster, for viewers that know it.

Segment numbers are 1..n in ascending class-id order (a LABELMAP SEG also carries highdicom's background segment
0). The catalog name is the segment label; the class id is kept in the segment's TrackingID (``"nvseg class
<id>"``, with a TrackingUID derived from the seed and the class), and :func:`segment_class_ids` maps segment
numbers back to class ids.

pydicom and highdicom are imported inside the functions (the ``dicom`` extra); importing this module needs
neither. The returned dataset holds patient identifiers copied from the source -- that is where they belong --
and nothing else this module returns or raises does.
"""

from __future__ import annotations

import io as _io
import uuid
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ConfigError, DicomError

if TYPE_CHECKING:  # pragma: no cover
    from ..labels import LabelCatalog
    from .assembly import AssembledSeries

#: Values of ``--seg-type``.
SEG_TYPES: tuple[str, ...] = ("binary", "labelmap")

#: Transfer syntax of BINARY SEGs: JPEG 2000 Lossless, the smallest that Debian's dciodvfy reads. Measured on a
#: 117-class label map of 60 x 256 x 256 (1671 frames; 2 shared cores, build + encode): JPEG 2000 lossless
#: 1.32 MB in 2.7-3.9 s; Explicit VR Little Endian 14.5 MB in 2.1-2.5 s; Deflated Explicit VR Little Endian
#: 0.23 MB in 1.4-2.1 s, but dciodvfy (dicom3tools 2022) cannot read deflated files at all and fewer PACS accept
#: them. highdicom allows no other compressed syntax for BINARY (no RLE, no JPEG-LS).
BINARY_TRANSFER_SYNTAX = "1.2.840.10008.1.2.4.90"
#: BINARY frames smaller than this (rows or columns) are stored uncompressed: openjpeg cannot encode them.
MIN_JPEG2000_FRAME = 32
#: Transfer syntax of LABELMAP SEGs: RLE Lossless.
LABELMAP_TRANSFER_SYNTAX = "1.2.840.10008.1.2.5"
#: Explicit VR Little Endian (uncompressed).
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"

#: Written into the General Equipment / Enhanced General Equipment modules and the algorithm identification.
MANUFACTURER = "nvseg-ray"
MANUFACTURER_MODEL_NAME = "NV-Segment-CTMR"
ALGORITHM_NAME = "NV-Segment-CTMR"
SERIES_DESCRIPTION = "nvseg-ray segmentation"
CONTENT_LABEL = "NVSEG"
CONTENT_DESCRIPTION = "NV-Segment-CTMR automatic segmentation (nvseg-ray)"
#: The SEG's SeriesNumber is the source's plus this offset (so viewers list it next to its source), or the offset
#: alone when the source has none.
SERIES_NUMBER_OFFSET = 1000
#: Prefix of the per-segment TrackingID that carries the global class id.
TRACKING_ID_PREFIX = "nvseg class "

#: Namespace of the name-based (version 5) UUIDs behind :func:`series_uids`; fixed forever, since changing it
#: would give every re-run a new series in the PACS.
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/nvseg-ray/nvseg-ray#dicom-seg")
#: Type-2 attributes highdicom reads from the first source dataset as attributes (absent in some real headers).
_TYPE2_SOURCE_ATTRIBUTES = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber",
                            "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName")


def series_uids(seed: str) -> tuple[str, str]:
    """``(SeriesInstanceUID, SOPInstanceUID)`` of the SEG written for ``seed`` (the batch resume key).

    Deterministic and distinct per role: ``2.25.<int>`` where the integer is a name-based UUID (RFC 4122 version
    5) of ``"series:" + seed`` / ``"instance:" + seed`` (DICOM PS3.5 B.2; at most 44 characters).
    """
    if not isinstance(seed, str) or not seed:
        raise ConfigError("the DICOM SEG UID seed must be a non-empty string (the series' resume key)")
    return (f"2.25.{uuid.uuid5(_UID_NAMESPACE, 'series:' + seed).int}",
            f"2.25.{uuid.uuid5(_UID_NAMESPACE, 'instance:' + seed).int}")


def segment_class_ids(ds: Any) -> dict[int, int]:
    """Segment number -> global class id of a SEG :func:`build_seg` wrote (from the segments' TrackingID; the
    background segment 0 a LABELMAP SEG carries is left out)."""
    out: dict[int, int] = {}
    for item in ds.SegmentSequence:
        number = int(item.SegmentNumber)
        tracking = str(getattr(item, "TrackingID", ""))
        if tracking.startswith(TRACKING_ID_PREFIX):
            out[number] = int(tracking[len(TRACKING_ID_PREFIX):])
        elif number != 0:
            raise DicomError(f"segment {number} carries no nvseg-ray class id (TrackingID {tracking!r})",
                             hint="only SEGs written by nvseg-ray map back to class ids", code="dicom_seg_foreign")
    return out


def transfer_syntax(seg_type: str, frame_shape: tuple[int, ...]) -> str:
    """Transfer syntax UID of a SEG of ``seg_type`` with frames of ``frame_shape`` (rows, columns)."""
    if seg_type == "labelmap":
        return LABELMAP_TRANSFER_SYNTAX
    if min(int(n) for n in frame_shape) < MIN_JPEG2000_FRAME:
        return EXPLICIT_VR_LITTLE_ENDIAN
    return BINARY_TRANSFER_SYNTAX


def _segment_coding(catalog: LabelCatalog, class_id: int) -> Any:
    """:func:`nvseg_ray.labels.codes.segment_coding` (imported when a SEG is built)."""
    from ..labels.codes import segment_coding

    return segment_coding(catalog, class_id)


def _require_highdicom() -> tuple[Any, Any]:
    try:
        import highdicom
        import pydicom
    except ImportError as exc:
        raise ConfigError(f"writing DICOM SEG needs pydicom and highdicom ({exc})",
                          hint="pip install 'nvseg-ray[dicom]'") from None
    return highdicom, pydicom


def _code(hd: Any, coded: Any) -> Any:
    """A :class:`nvseg_ray.labels.codes.Coded` as a highdicom CodedConcept."""
    return hd.sr.CodedConcept(value=str(coded.value), scheme_designator=str(coded.scheme), meaning=str(coded.meaning))


def _source_for_highdicom(pydicom: Any, first: Any) -> Any:
    """A shallow copy of the first source dataset with empty type-2 patient/study attributes where absent
    (highdicom reads them as attributes); the caller's dataset is left untouched."""
    missing = [name for name in _TYPE2_SOURCE_ATTRIBUTES if name not in first]
    if not missing:
        return first
    copy = pydicom.Dataset()
    copy.update(first)
    if hasattr(first, "file_meta"):
        copy.file_meta = first.file_meta
    for name in missing:
        setattr(copy, name, "" if name != "PatientName" else None)
    return copy


def _series_number(first: Any) -> int:
    try:
        number = int(first.get("SeriesNumber") or 0)
    except (TypeError, ValueError):
        number = 0
    return min(max(number, 0) + SERIES_NUMBER_OFFSET, 2**31 - 1)


def _relabel(labels: np.ndarray, class_ids: np.ndarray) -> np.ndarray:
    """(X, Y, Z) class ids -> (Z, Y, X) segment numbers 1..n (0 stays 0), uint8 when n < 256 else uint16."""
    dtype = np.uint8 if len(class_ids) < 256 else np.uint16
    lut = np.zeros(int(class_ids.max()) + 1, dtype=dtype)
    lut[class_ids] = np.arange(1, len(class_ids) + 1, dtype=dtype)
    # frame k is labels[:, :, k].T: (rows = Y, columns = X)
    return np.ascontiguousarray(lut[labels].transpose(2, 1, 0))


def build_seg(labels: np.ndarray, assembled: AssembledSeries, *, catalog: LabelCatalog, seg_type: str = "binary",
              seed: str, model_sha256: str | None, algorithm_version: str) -> Any:
    """The DICOM SEG of ``labels`` for the series ``assembled`` was made from.

    Args:
        labels: (X, Y, Z) integer global class ids (0 = background) on exactly ``assembled.shape``'s voxel grid
            (i = column, j = row, k = slice; same affine). Frame k of the SEG is ``labels[:, :, k].T`` (rows,
            columns).
        assembled: the assembled source series (its ``source_datasets`` are headers without pixel data, in slice
            order; ``frame_numbers`` for a multi-frame source). When ``assembled.resampled`` the grid is not the
            source's: the SEG is written on the mask's own grid (``assembled.lps_affine``, the source's frame of
            reference) and references the source series.
        catalog: label catalog giving segment labels (:meth:`~nvseg_ray.labels.LabelCatalog.name`).
        seg_type: ``"binary"`` (default) or ``"labelmap"`` (:data:`SEG_TYPES`).
        seed: the resume key; :func:`series_uids` derives the Series and SOP Instance UIDs from it.
        model_sha256: sha256 of the checkpoint (recorded as algorithm parameter ``model_sha256``), or None.
        algorithm_version: nvseg-ray version recorded as the algorithm version and software version.

    Returns:
        a ``highdicom.seg.Segmentation`` (a ``pydicom.Dataset``); pass it to :func:`encode_seg`.

    Raises:
        ConfigError: unknown ``seg_type``, or pydicom / highdicom not installed.
        DicomError: ``labels`` does not match the grid (``dicom_seg_grid``) or holds no class
            (``empty_segmentation``: a SEG needs at least one segment).
    """
    hd, pydicom = _require_highdicom()
    seg_type = str(seg_type).lower()
    if seg_type not in SEG_TYPES:
        raise ConfigError(f"unknown DICOM SEG type {seg_type!r}; expected one of {', '.join(SEG_TYPES)}",
                          hint="use --seg-type binary (every viewer) or --seg-type labelmap (smaller, newer)")
    series_uid = assembled.series.series_instance_uid
    labels = np.asarray(labels)
    grid = assembled.shape
    if labels.shape != grid or not np.issubdtype(labels.dtype, np.integer):
        raise DicomError(f"mask of series {assembled.series.key} is {labels.dtype} {labels.shape}, not an integer "
                         f"label map on the series grid {grid}", code="dicom_seg_grid", series_uid=series_uid)
    class_ids = np.unique(labels)
    if class_ids.size and class_ids[0] < 0:
        raise DicomError(f"mask of series {assembled.series.key} holds negative class ids",
                         code="dicom_seg_grid", series_uid=series_uid)
    class_ids = class_ids[class_ids > 0].astype(np.int64)
    if class_ids.size == 0:
        raise DicomError(f"nothing was segmented in series {assembled.series.key}: a DICOM SEG needs a segment",
                         hint="no SEG is written for an empty mask; the NIfTI output still is",
                         code="empty_segmentation", series_uid=series_uid)

    descriptions = _segment_descriptions(hd, catalog, class_ids, seed, model_sha256, algorithm_version)
    segments = _relabel(labels, class_ids)  # (Z, Y, X) segment numbers
    sources = list(assembled.source_datasets)
    sources[0] = _source_for_highdicom(pydicom, sources[0])
    pixel_array = _pixel_array(hd, segments, assembled, sources[0])
    further = None
    if isinstance(pixel_array, hd.Volume) and len(sources) > 1 and int(getattr(sources[0], "NumberOfFrames", 1)) > 1:
        sources, further = sources[:1], sources[1:]  # several multi-frame instances: highdicom takes one
    seg_series_uid, sop_uid = series_uids(seed)
    binary = seg_type == "binary"
    ds = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixel_array,
        segmentation_type="BINARY" if binary else "LABELMAP",
        segment_descriptions=descriptions,
        series_instance_uid=seg_series_uid,
        series_number=_series_number(sources[0]),
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MANUFACTURER_MODEL_NAME,
        software_versions=str(algorithm_version),
        device_serial_number=(model_sha256 or "unknown")[:16],
        transfer_syntax_uid=transfer_syntax(seg_type, segments.shape[1:]),
        content_label=CONTENT_LABEL,
        content_description=CONTENT_DESCRIPTION,
        series_description=SERIES_DESCRIPTION,
        omit_empty_frames=True,
        further_source_images=further,
    )
    if isinstance(pixel_array, hd.Volume):
        _add_frame_references(pydicom, ds, assembled)
    return ds


def _pixel_array(hd: Any, segments: np.ndarray, assembled: AssembledSeries, first: Any) -> Any:
    """What highdicom gets as ``pixel_array``: on the source grid a plain array, one plane per source image /
    frame (so every SEG frame references its source frame); otherwise a Volume on the mask's grid."""
    n_slices = segments.shape[0]
    if not assembled.resampled:
        if assembled.frame_numbers is None and len(assembled.source_datasets) == n_slices:
            return segments  # plane k <-> source_datasets[k]
        frames = int(getattr(first, "NumberOfFrames", 0) or 0)
        numbers = list(assembled.frame_numbers or ())
        if frames == n_slices and sorted(numbers) == list(range(1, frames + 1)):
            out = np.empty_like(segments)
            out[np.asarray(numbers) - 1] = segments  # plane f - 1 <-> source frame f
            return out
    # the mask's own grid: highdicom's Volume indexes (slice, row, column) = (k, j, i); ours is (i, j, k)
    affine = np.asarray(assembled.lps_affine, dtype=np.float64)[:, [2, 1, 0, 3]]
    return hd.Volume(array=segments, affine=affine, coordinate_system="PATIENT",
                     frame_of_reference_uid=str(first.FrameOfReferenceUID))


#: Two planes closer than this (mm) are the same plane.
_PLANE_TOL_MM = 1e-3


def _source_planes(assembled: AssembledSeries) -> list[tuple[Any, int | None, np.ndarray]]:
    """(dataset, 1-based frame number or None, ImagePositionPatient in LPS mm) of every source image plane."""
    out: list[tuple[Any, int | None, np.ndarray]] = []
    for ds in assembled.source_datasets:
        if "PerFrameFunctionalGroupsSequence" in ds:
            shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else None
            for number, frame in enumerate(ds.PerFrameFunctionalGroupsSequence, start=1):
                owner = frame if "PlanePositionSequence" in frame else shared
                if owner is None or "PlanePositionSequence" not in owner:
                    return []
                position = owner.PlanePositionSequence[0].ImagePositionPatient
                out.append((ds, number, np.array(position, dtype=np.float64)))
        elif "ImagePositionPatient" in ds:
            out.append((ds, None, np.array(ds.ImagePositionPatient, dtype=np.float64)))
    return out


def _source_item(pydicom: Any, source: Any, frame: int | None, preserved: bool) -> Any:
    """One Source Image Sequence item (PS3.3 C.7.6.16.2.6): the source image (frame) a SEG frame derives from."""
    item = pydicom.Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    if frame is not None:
        item.ReferencedFrameNumber = frame
    item.SpatialLocationsPreserved = "YES" if preserved else "NO"
    purpose = pydicom.Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator = "121322", "DCM"
    purpose.CodeMeaning = "Source image for image processing operation"
    item.PurposeOfReferenceCodeSequence = [purpose]
    return item


def _add_frame_references(pydicom: Any, ds: Any, assembled: AssembledSeries) -> None:
    """Per-frame source references of a SEG on a resampled grid, where highdicom found none (it only matches
    when every plane coincides with a source plane): a frame in a source plane references that image (locations
    preserved when the positions agree, e.g. not after a tilt correction); an interpolated frame references the
    two source planes it lies between (locations not preserved)."""
    shared = ds.SharedFunctionalGroupsSequence[0]
    cosines = np.array(shared.PlaneOrientationSequence[0].ImageOrientationPatient, dtype=np.float64)
    normal = np.cross(cosines[:3], cosines[3:])
    planes = _source_planes(assembled)
    first = assembled.source_datasets[0]
    if "ImageOrientationPatient" in first:
        source_cosines = np.array(first.ImageOrientationPatient, dtype=np.float64)
    else:
        source_cosines = np.array(first.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
                                  .ImageOrientationPatient, dtype=np.float64)
    if not planes or abs(float(np.dot(np.cross(source_cosines[:3], source_cosines[3:]), normal))) < 1 - 1e-4:
        return  # planes not parallel to the source's: the Referenced Series Sequence is the reference
    depth = np.array([float(np.dot(p, normal)) for _, _, p in planes])
    cache: dict[tuple[float, ...], list[tuple[int, bool]]] = {}
    for frame in ds.PerFrameFunctionalGroupsSequence:
        if "DerivationImageSequence" in frame and len(frame.DerivationImageSequence):
            continue
        position = np.array(frame.PlanePositionSequence[0].ImagePositionPatient, dtype=np.float64)
        key = tuple(np.round(position, 4))
        if key not in cache:
            d = float(np.dot(position, normal))
            same = np.flatnonzero(np.abs(depth - d) < _PLANE_TOL_MM)
            if same.size:
                chosen = [(int(i), bool(np.linalg.norm(planes[i][2] - position) < _PLANE_TOL_MM)) for i in same]
            else:
                below, above = np.flatnonzero(depth < d), np.flatnonzero(depth > d)
                chosen = [(int(side[np.argmin(np.abs(depth[side] - d))]), False)
                          for side in (below, above) if side.size]
            cache[key] = chosen
        item = pydicom.Dataset()
        item.SourceImageSequence = [_source_item(pydicom, planes[i][0], planes[i][1], kept) for i, kept in cache[key]]
        code = pydicom.Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "113076", "DCM", "Segmentation"
        item.DerivationCodeSequence = [code]
        frame.DerivationImageSequence = [item]


def _segment_descriptions(hd: Any, catalog: LabelCatalog, class_ids: np.ndarray, seed: str,
                          model_sha256: str | None, algorithm_version: str) -> list[Any]:
    """One SegmentDescription per class id, numbered 1..n in the order of ``class_ids``."""
    algorithm = hd.AlgorithmIdentificationSequence(
        name=ALGORITHM_NAME,
        family=_ai_family(hd),
        version=str(algorithm_version),
        source=MANUFACTURER,
        parameters={"model_sha256": model_sha256} if model_sha256 else None,
    )
    out = []
    for number, cid in enumerate(class_ids.tolist(), start=1):
        coding = _segment_coding(catalog, cid)
        region = getattr(coding, "region", None)
        item = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=_long_string(catalog.name(cid)),
            segmented_property_category=_code(hd, coding.category),
            segmented_property_type=_code(hd, coding.type),
            algorithm_type="AUTOMATIC",
            algorithm_identification=algorithm,
            tracking_id=f"{TRACKING_ID_PREFIX}{cid}",
            tracking_uid=f"2.25.{uuid.uuid5(_UID_NAMESPACE, f'segment:{cid}:{seed}').int}",
            anatomic_regions=[_code(hd, region)] if region is not None else None,
            display_color=hd.color.CIELabColor.from_rgb(*(int(c) for c in coding.color)),
        )
        if coding.modifier is not None:  # laterality
            item.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
                _code(hd, coding.modifier)]
        out.append(item)
    return out


def _ai_family(hd: Any) -> Any:
    """CID 7162 "Artificial Intelligence" (DCM 123110) as a CodedConcept."""
    from pydicom.sr.codedict import codes

    concept = codes.cid7162.ArtificialIntelligence
    return hd.sr.CodedConcept(concept.value, concept.scheme_designator, concept.meaning)


def _long_string(text: str) -> str:
    """A DICOM LO value: at most 64 characters, no backslash or control characters."""
    clean = "".join(ch if ch.isprintable() and ch != "\\" else " " for ch in str(text))
    return clean[:64]


def encode_seg(ds: Any) -> bytes:
    """DICOM Part 10 bytes (preamble, file meta, dataset) of a SEG from :func:`build_seg`."""
    buffer = _io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
