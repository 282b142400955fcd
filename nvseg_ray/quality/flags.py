"""Automated QC flags for a finished mask: cheap checks that point a reader at results worth a second look.

A flag is advice, never a failure: every ``flag_<code>`` function returns a :class:`QCFlag` or ``None`` and
none raises for odd input (no intensities, no structures, an unknown modality, NaNs, a singular affine);
a check that cannot be made is skipped.

Inputs (as in :mod:`nvseg_ray.quality.statistics`): ``stats`` from
:func:`~nvseg_ray.quality.statistics.structure_statistics`; ``labels`` the (X, Y, Z) integer mask on the input
grid; ``intensities`` the input's (X, Y, Z) voxels in its own units (HU for CT), any numeric dtype, or ``None``;
``affine`` the 4x4 voxel -> RAS+ mm matrix (+x = patient's Right, +y = Anterior, +z = Superior: the patient's
right side has the *larger* world x).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .statistics import StructureStatistics

FLAG_CODES = ("empty", "few_labels", "cut_by_fov", "laterality", "volume_outlier", "intensity_mismatch", "fragmented")


@dataclass(frozen=True)
class QCFlag:
    """One QC finding.

    Attributes:
        code: one of :data:`FLAG_CODES`.
        reason: one short sentence for a radiologist, with the numbers.
        structures: names of the structures concerned (empty for volume-wide flags).
    """

    code: str
    reason: str
    structures: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """``{"code": str, "reason": str, "structures": [str, ...]}``."""
        return {"code": self.code, "reason": self.reason, "structures": list(self.structures)}


# --------------------------------------------------------------------------------------------------- few_labels

#: Only everything-set runs that prompted at least this many classes are checked: a run that asked for a few
#: classes legitimately finds few.
FEW_LABELS_MIN_PROMPTED = 10

#: Fraction of the everything-set expected per 100 mm of cranio-caudal coverage. A whole-body CT (vertex to
#: knees, ~1500 mm) shows ~100 of the 117 CT_BODY classes (TotalSegmentator-style data), i.e. 100 / 117 / 15 ~
#: 0.057 per 100 mm. Structures are denser in the trunk than in the legs, so this *under*-estimates a chest or
#: abdomen scan -- the check errs towards silence.
EVERYTHING_FRACTION_PER_100MM = 100.0 / 117.0 / 15.0

#: Flag when fewer than this fraction of the expected count were found (well below the estimate's scatter).
FEW_LABELS_FRACTION = 0.3

# ------------------------------------------------------------------------------------------------- laterality

#: Left/right pairs checked, as (what to call it, names on the patient's right, names on the patient's left);
#: names are looked up in the default label catalog once, and a group's centroid is the voxel-weighted mean of
#: its members' centroids. Liver vs spleen is not strictly a left/right pair but holds outside situs inversus.
LATERALITY_PAIRS: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("liver/spleen", ("liver",), ("spleen",)),
    ("kidneys", ("right kidney",), ("left kidney",)),
    ("lungs", ("right lung", "right lung upper lobe", "right lung middle lobe", "right lung lower lobe"),
     ("left lung", "left lung upper lobe", "left lung lower lobe")),
    ("femurs", ("right femur",), ("left femur",)),
    ("hips", ("right hip",), ("left hip",)),
    ("humeri", ("right humerus",), ("left humerus",)),
    ("cerebral white matter", ("Right-Cerebral-White-Matter",), ("Left-Cerebral-White-Matter",)),
)

#: Pairs whose centroids differ by less than this along world x are ignored: a tilted patient, a partial
#: structure or a small segmentation error can shift a centroid by a centimetre; a flipped header moves the
#: right organ ~100 mm or more to the wrong side.
LATERALITY_MARGIN_MM = 15.0

# --------------------------------------------------------------------------------------------- volume_outlier

#: Adult reference volumes, name -> (low ml, high ml, source). Ranges are about mean +- 2.5 SD (or wider) of
#: published CT/MR volumetry of adults, so only clearly abnormal volumes -- or a wrong voxel size, a wrong
#: organ, a mostly missed organ -- are flagged:
#:
#: * liver: Kromrey ML et al. 2018, Eur J Radiol 106:32-37 (MRI, SHIP, n = 2773): 1505 +- 385 ml -> 543-2468.
#: * spleen: Caglar V et al. 2014, Folia Morphol (CT, n = 212): 198 +- 88 ml -> high 418; the low end is set
#:   below the smallest normal spleen of Prassopoulos P et al. 1997, Eur Radiol 7:246-248 (CT, n = 140,
#:   107-315 ml), since mean - 2.5 SD is negative.
#: * kidneys: J Clin Med 2024;13(3):769 (MRI, SHIP, n = 1815): right kidney median 138 ml (women, 5th
#:   percentile 99) and 174 ml (men, IQR 154-197, 5th percentile 126) -> SD ~ 32 ml, median + 2.5 SD ~ 255.
#: * pancreas: Saisho Y et al. 2007, Clin Anat 20:933-942 (CT, n = 1886 adults): 72.4 +- 25.8 ml aged 20-60 ->
#:   high 137; low end 20 ml (atrophy with age makes smaller glands common after 60).
REFERENCE_VOLUMES_ML: dict[str, tuple[float, float, str]] = {
    "liver": (540.0, 2500.0, "Kromrey et al. 2018, Eur J Radiol 106:32-37 (MRI, n=2773): 1505 +- 385 ml"),
    "spleen": (50.0, 420.0, "Caglar et al. 2014, Folia Morphol (CT, n=212): 198 +- 88 ml; "
                            "Prassopoulos et al. 1997, Eur Radiol 7:246-248: 107-315 ml"),
    "right kidney": (70.0, 300.0, "J Clin Med 2024;13(3):769 (MRI, n=1815): median 138 ml (women), 174 ml (men)"),
    "left kidney": (70.0, 300.0, "J Clin Med 2024;13(3):769 (MRI, n=1815): median 144 ml (women), 180 ml (men)"),
    "pancreas": (20.0, 140.0, "Saisho et al. 2007, Clin Anat 20:933-942 (CT, n=1886): 72.4 +- 25.8 ml"),
}

# ----------------------------------------------------------------------------------------- intensity_mismatch

#: The intensity checks read every INTENSITY_STRIDE-th voxel along each axis (1/64 of the volume: ~0.7 M
#: values for a 44 M voxel CT, plenty for percentiles at 0.1 %).
INTENSITY_STRIDE = 4

#: CT: the 1st percentile must be below this. Every body CT has air around the patient, in the lungs or in the
#: bowel at ~ -1000 HU (and fat at ~ -100); a 1st percentile above -200 HU means almost no air: not HU data
#: (MR, or CT stored without its rescale intercept, whose air sits at ~0).
CT_P1_MAX_HU = -200.0

#: CT: the 99.9th percentile must be below this. Cortical bone is ~1000-2000 HU, dense contrast and metal reach
#: the 12-bit ceiling 3071; more than 0.1 % of voxels above 5000 means the values are not HU (a wrong rescale
#: slope, or raw counts).
CT_P999_MAX_HU = 5000.0

#: CT: apart from padding (the volume's minimum value, which scanners write outside the reconstruction circle,
#: often -2048 or -3024), the 0.1st percentile must be above this: nothing in a patient is below air (-1000).
CT_MIN_HU = -2000.0

#: MR: flag when more than this fraction of voxels is below :data:`MR_HU_AIR_BELOW` -- MR magnitude images are
#: non-negative (normalised ones dip to a few units below zero), while air in HU fills 10-50 % of a CT.
MR_MAX_FRACTION_HU_AIR = 0.05

#: MR: values below this look like air in HU (-1000).
MR_HU_AIR_BELOW = -500.0

# ------------------------------------------------------------------------------------------------- fragmented

#: Structures smaller than this (ml) are not checked: small structures are often legitimately split by
#: partial-volume effects, and their fragments matter little.
FRAGMENTED_MIN_ML = 10.0

#: Flag when the largest 26-connected component holds less than this fraction of the structure's voxels: an
#: organ is one piece; a stray island of a few percent is common, an organ in two halves is not.
FRAGMENTED_MAX_FRACTION = 0.6

#: Names containing any of these words are naturally multi-part (several lesions, vessels, loops) and skipped.
MULTIPART_WORDS = ("lesion", "tumor", "tumour", "cyst", "nodule", "mass", "metasta", "cancer", "primaries",
                   "vessel", "cartilages", "discs", "bowel", "colon", "airway", "zero-shot")

#: Group classes that cover paired or scattered structures by definition, skipped by exact name.
MULTIPART_NAMES = frozenset({"kidney", "lung", "bone"})


# ------------------------------------------------------------------------------------------------------ flags


def flag_empty(stats: Sequence[StructureStatistics]) -> QCFlag | None:
    """``empty`` when no structure was segmented."""
    if stats:
        return None
    return QCFlag("empty", "Nothing was segmented: the mask is all background.")


def cranio_caudal_extent_mm(shape: Sequence[int], affine: np.ndarray) -> float:
    """Extent in mm along world z (cranio-caudal) of the box covered by a ``shape`` grid (voxel edges)."""
    a = np.asarray(affine, dtype=np.float64)
    return float(sum(abs(a[2, axis]) * int(n) for axis, n in enumerate(tuple(shape)[:3])))


def flag_few_labels(
    stats: Sequence[StructureStatistics],
    shape: Sequence[int],
    affine: np.ndarray,
    *,
    prompted_ids: Sequence[int],
    everything: bool,
) -> QCFlag | None:
    """``few_labels`` when an everything-set run found far fewer structures than its field of view implies.

    Expected = ``len(prompted_ids)`` x min(1, :data:`EVERYTHING_FRACTION_PER_100MM` x extent / 100 mm), with the
    cranio-caudal extent from ``shape`` (X, Y, Z) and ``affine``; flagged when the structures found among the
    prompted ids number fewer than :data:`FEW_LABELS_FRACTION` x expected. Not checked for runs with
    fewer than :data:`FEW_LABELS_MIN_PROMPTED` prompted classes, nor when nothing was found (``empty`` says so).
    """
    prompted = set(int(i) for i in prompted_ids)
    if not everything or len(prompted) < FEW_LABELS_MIN_PROMPTED:
        return None
    found = sum(1 for s in stats if s.id in prompted)
    if found == 0:
        return None
    extent = cranio_caudal_extent_mm(shape, affine)
    if not np.isfinite(extent) or extent <= 0:
        return None
    expected = len(prompted) * min(1.0, EVERYTHING_FRACTION_PER_100MM * extent / 100.0)
    if found >= FEW_LABELS_FRACTION * expected:
        return None
    return QCFlag(
        "few_labels",
        f"Only {found} of {len(prompted)} requested structures were found in a {extent:.0f} mm scan, "
        f"where about {expected:.0f} are expected.",
    )


_AXIS_WORDS = (("left", "right"), ("posterior", "anterior"), ("inferior", "superior"))


def _face_direction(face: str, affine: np.ndarray | None) -> str:
    """The anatomical side (e.g. ``"superior"``) a grid face (e.g. ``"k_max"``) faces, or the face name."""
    if affine is None:
        return face
    try:
        axis = "ijk".index(face[0])
        vector = np.asarray(affine, dtype=np.float64)[:3, axis] * (1.0 if face.endswith("max") else -1.0)
        if not np.all(np.isfinite(vector)) or not np.any(vector):
            return face
        world = int(np.argmax(np.abs(vector)))
        return _AXIS_WORDS[world][int(vector[world] > 0)]
    except (ValueError, IndexError):
        return face


def flag_cut_by_fov(stats: Sequence[StructureStatistics], affine: np.ndarray | None = None) -> QCFlag | None:
    """``cut_by_fov``: one flag listing the structures that touch a face of the grid (volume is a lower
    bound); with ``affine`` the faces are named by anatomical side (superior, left, ...)."""
    cut = [s for s in stats if s.cut_by_fov]
    if not cut:
        return None
    parts = [f"{s.name} ({', '.join(dict.fromkeys(_face_direction(f, affine) for f in s.cut_sides))})" for s in cut]
    return QCFlag(
        "cut_by_fov",
        f"{len(cut)} structure{'s' if len(cut) > 1 else ''} reach the edge of the scan, so "
        f"{'their volumes are' if len(cut) > 1 else 'its volume is'} a lower bound: {'; '.join(parts)}.",
        tuple(s.name for s in cut),
    )


@functools.cache
def _laterality_ids() -> tuple[tuple[str, frozenset[int], frozenset[int]], ...]:
    """:data:`LATERALITY_PAIRS` with names resolved to ids in the default catalog (unknown names dropped)."""
    from nvseg_ray.labels import LabelCatalog

    catalog = LabelCatalog.default()

    def ids(names: tuple[str, ...]) -> frozenset[int]:
        found = set()
        for name in names:
            try:
                found.add(catalog.resolve(name))
            except Exception:  # noqa: BLE001 -- a catalog without the name: that side is simply not checked
                continue
        return frozenset(found)

    return tuple((what, ids(right), ids(left)) for what, right, left in LATERALITY_PAIRS)


def _group_x(stats: Sequence[StructureStatistics], ids: frozenset[int]) -> float | None:
    members = [s for s in stats if s.id in ids and np.isfinite(s.centroid_ras[0])]
    voxels = sum(s.voxels for s in members)
    if not members or voxels <= 0:
        return None
    return sum(s.centroid_ras[0] * s.voxels for s in members) / voxels


def flag_laterality(stats: Sequence[StructureStatistics]) -> QCFlag | None:
    """``laterality`` when right/left pairs (:data:`LATERALITY_PAIRS`) lie on the wrong sides in RAS world x
    (the right member must have the larger x), by more than :data:`LATERALITY_MARGIN_MM`."""
    wrong, right_way = [], []
    names: list[str] = []
    for what, right_ids, left_ids in _laterality_ids():
        xr, xl = _group_x(stats, right_ids), _group_x(stats, left_ids)
        if xr is None or xl is None or abs(xr - xl) < LATERALITY_MARGIN_MM:
            continue
        if xr < xl:
            wrong.append(f"{what} by {xl - xr:.0f} mm")
            names += [s.name for s in stats if s.id in right_ids | left_ids]
        else:
            right_way.append(what)
    if not wrong:
        return None
    if right_way:
        reason = (f"Right and left are swapped for the {', '.join(wrong)}, but not for the {', '.join(right_way)}: "
                  "a segmentation error (or situs inversus) is suspected.")
    else:
        reason = (f"Right and left are swapped for the {', '.join(wrong)}: a left/right-flipped orientation "
                  "header is suspected.")
    return QCFlag("laterality", reason, tuple(names))


def flag_volume_outlier(stats: Sequence[StructureStatistics]) -> QCFlag | None:
    """``volume_outlier`` for organs outside :data:`REFERENCE_VOLUMES_ML` (matched by name, case-insensitive).
    A structure cut by the field of view only counts when above the range (its volume is a lower bound)."""
    found = []
    for s in stats:
        ref = REFERENCE_VOLUMES_ML.get(s.name.lower())
        if ref is None or not np.isfinite(s.volume_ml):
            continue
        low, high, _ = ref
        if s.volume_ml > high:
            found.append((s.name, f"{s.name} {s.volume_ml:.0f} ml (adult range {low:.0f}-{high:.0f} ml)"))
        elif s.volume_ml < low and not s.cut_by_fov:
            found.append((s.name, f"{s.name} {s.volume_ml:.0f} ml (adult range {low:.0f}-{high:.0f} ml)"))
    if not found:
        return None
    return QCFlag(
        "volume_outlier",
        f"Organ volume outside the adult reference range: {'; '.join(text for _, text in found)}.",
        tuple(name for name, _ in found),
    )


def _sample(intensities: np.ndarray) -> np.ndarray:
    """Finite float32 values of every :data:`INTENSITY_STRIDE`-th voxel (all spatial axes)."""
    arr = np.asarray(intensities)
    if arr.ndim >= 3:
        arr = arr[::INTENSITY_STRIDE, ::INTENSITY_STRIDE, ::INTENSITY_STRIDE]
    values = arr.astype(np.float32, copy=False).ravel()
    return values[np.isfinite(values)]


def flag_intensity_mismatch(intensities: np.ndarray | None, modality: str | None) -> QCFlag | None:
    """``intensity_mismatch`` when ``intensities`` do not look like ``modality``.

    CT (modality starting with ``CT``): flagged when the 1st percentile is above :data:`CT_P1_MAX_HU` (no air:
    not HU), the 99.9th above :data:`CT_P999_MAX_HU`, or the 0.1st (padding excluded) below :data:`CT_MIN_HU`
    (wrong rescale). MR (``MRI...``): flagged when more than :data:`MR_MAX_FRACTION_HU_AIR` of the voxels are
    below :data:`MR_HU_AIR_BELOW` (looks like HU). Skipped without intensities, modality, or numeric values.
    """
    if intensities is None or modality is None:
        return None
    kind = modality.upper()
    if not (kind.startswith("CT") or kind.startswith("MR")):
        return None
    try:
        values = _sample(intensities)
    except (TypeError, ValueError):
        return None
    if values.size == 0:
        return None
    if kind.startswith("CT"):
        p1, p999 = (float(v) for v in np.percentile(values, [1.0, 99.9]))
        if p1 > CT_P1_MAX_HU:
            return QCFlag("intensity_mismatch",
                          f"The volume was sent as CT but has almost no air (1st percentile {p1:.0f}, "
                          f"expected near -1000 HU): it does not look like HU data, e.g. an MR image.")
        if p999 > CT_P999_MAX_HU:
            return QCFlag("intensity_mismatch",
                          f"The volume was sent as CT but 0.1% of its values exceed {p999:.0f}, far above the "
                          f"HU range (up to ~3071): a wrong rescale is suspected.")
        body = values[values > values.min()]
        if body.size:
            p001 = float(np.percentile(body, 0.1))
            if p001 < CT_MIN_HU:
                return QCFlag("intensity_mismatch",
                              f"The volume was sent as CT but has values down to {p001:.0f}, below air "
                              f"(-1000 HU): a wrong rescale is suspected.")
        return None
    fraction = float(np.count_nonzero(values < MR_HU_AIR_BELOW)) / values.size
    if fraction > MR_MAX_FRACTION_HU_AIR:
        return QCFlag("intensity_mismatch",
                      f"The volume was sent as MR but {100 * fraction:.0f}% of its voxels are below "
                      f"{MR_HU_AIR_BELOW:.0f}, like air in CT Hounsfield units: it looks like a CT.")
    return None


def _multipart(name: str) -> bool:
    lowered = name.lower()
    return lowered in MULTIPART_NAMES or any(word in lowered for word in MULTIPART_WORDS)


def flag_fragmented(stats: Sequence[StructureStatistics]) -> QCFlag | None:
    """``fragmented`` for structures of at least :data:`FRAGMENTED_MIN_ML` whose largest connected component
    holds less than :data:`FRAGMENTED_MAX_FRACTION` of their voxels (naturally multi-part names skipped)."""
    found = [s for s in stats if s.volume_ml >= FRAGMENTED_MIN_ML
             and s.largest_component_fraction < FRAGMENTED_MAX_FRACTION and not _multipart(s.name)]
    if not found:
        return None
    parts = [f"{s.name} ({100 * s.largest_component_fraction:.0f}% of {s.volume_ml:.0f} ml)" for s in found]
    return QCFlag(
        "fragmented",
        f"The largest connected piece holds well under the whole structure for: {'; '.join(parts)}.",
        tuple(s.name for s in found),
    )


def qc_flags(
    stats: Sequence[StructureStatistics],
    labels: np.ndarray,
    intensities: np.ndarray | None,
    affine: np.ndarray,
    *,
    modality: str | None,
    prompted_ids: Sequence[int],
    everything: bool,
) -> list[QCFlag]:
    """All QC flags of one finished mask, in :data:`FLAG_CODES` order.

    Args:
        stats: :func:`~nvseg_ray.quality.statistics.structure_statistics` of ``labels``.
        labels: the (X, Y, Z) integer mask on the input grid (only its shape is read here).
        intensities: the input's (X, Y, Z) voxels in its own units, or ``None`` (intensity check skipped).
        affine: 4x4 voxel -> RAS+ mm.
        modality: ``"CT_BODY"``, ``"MRI_BODY"``, ``"MRI_BRAIN"`` or ``None`` (intensity check skipped).
        prompted_ids: the class ids the network was asked for.
        everything: whether ``prompted_ids`` is the modality's everything-set.
    """
    affine = np.asarray(affine, dtype=np.float64)
    flags = [
        flag_empty(stats),
        flag_few_labels(stats, np.shape(labels), affine, prompted_ids=prompted_ids, everything=everything),
        flag_cut_by_fov(stats, affine),
        flag_laterality(stats),
        flag_volume_outlier(stats),
        flag_intensity_mismatch(intensities, modality),
        flag_fragmented(stats),
    ]
    return [f for f in flags if f is not None]
