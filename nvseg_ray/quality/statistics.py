"""Per-structure statistics of a finished mask: voxels, volume, intensity statistics in the input's units,
bounding box, field-of-view cut, world centroid and connectedness.

Inputs, shared by every function here:

* ``labels`` -- (X, Y, Z) integer array (any integer dtype) of global class ids on the *input* voxel grid,
  0 = background;
* ``intensities`` -- the input's voxels, same (X, Y, Z) shape, any numeric dtype, in the input's own units (HU
  for CT), or ``None``;
* ``affine`` -- 4x4 float voxel index (i, j, k) -> world mm in RAS+ (nibabel's convention: +x points to the
  patient's Right, +y Anterior, +z Superior), so that ``affine @ (i, j, k, 1)`` is a point in mm. The patient's
  right side therefore has the *larger* world x.

Cost: one :func:`scipy.ndimage.find_objects` pass over the volume, then every per-structure computation runs on
that structure's bounding-box crop only, so the total is about one pass plus the sum of the crops.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import ndimage

if TYPE_CHECKING:
    import pyarrow

#: Above this many voxels a structure's connected components are counted on 2x2x2 blocks (a block belongs to
#: the structure if any of its 8 voxels does; each block is weighted by its voxel count, so the fraction is still
#: in voxels). Labelling a 10 M voxel crop costs ~0.3 s; blocks cut that by ~8x. Blocks can only *merge*
#: components that come within 2 voxels of each other, never split one, so the fraction can only be
#: over-estimated -- the ``fragmented`` flag errs towards silence.
COMPONENTS_BLOCK_ABOVE_VOXELS = 500_000

#: Percentiles reported, in percent (numpy's default linear interpolation).
PERCENTILES = (5.0, 50.0, 95.0)

#: Names of the six faces of the voxel grid, in (axis, low/high) order.
FACES = ("i_min", "i_max", "j_min", "j_max", "k_min", "k_max")

_FULL_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity


@dataclass(frozen=True)
class StructureStatistics:
    """Statistics of one label id of a mask.

    Attributes:
        id: global class id (> 0).
        name: display name.
        voxels: number of voxels carrying ``id``.
        volume_ml: ``voxels`` x voxel volume (|det affine[:3, :3]| mm^3) / 1000. A lower bound when
            ``cut_by_fov``.
        mean, std, median, p5, p95: intensity statistics over the structure's voxels, in the input's units
            (HU for CT); ``std`` is the population standard deviation; non-finite values are left out; ``None``
            without intensities (or without a finite value).
        bbox: inclusive voxel index ranges ((i0, i1), (j0, j1), (k0, k1)) on the input grid.
        cut_by_fov: the structure touches a face of the voxel grid (first/last slice or the in-plane border),
            so part of it may lie outside the field of view.
        cut_sides: the faces touched, from :data:`FACES` (e.g. ``("i_min", "k_max")``).
        centroid_ras: voxel-weighted centre of mass in RAS world mm.
        largest_component_fraction: voxels of the largest 26-connected component / ``voxels`` (1.0 for one
            piece); approximate above :data:`COMPONENTS_BLOCK_ABOVE_VOXELS`.
    """

    id: int
    name: str
    voxels: int
    volume_ml: float
    mean: float | None
    std: float | None
    median: float | None
    p5: float | None
    p95: float | None
    bbox: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]
    cut_by_fov: bool
    cut_sides: tuple[str, ...]
    centroid_ras: tuple[float, float, float]
    largest_component_fraction: float

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types: ml to 3 decimals, intensities to 2, mm to 2, the fraction to 4."""
        return {
            "id": self.id,
            "name": self.name,
            "voxels": self.voxels,
            "volume_ml": round(self.volume_ml, 3),
            "mean": _round(self.mean, 2),
            "std": _round(self.std, 2),
            "median": _round(self.median, 2),
            "p5": _round(self.p5, 2),
            "p95": _round(self.p95, 2),
            "bbox": [list(r) for r in self.bbox],
            "cut_by_fov": self.cut_by_fov,
            "cut_sides": list(self.cut_sides),
            "centroid_ras": [round(c, 2) for c in self.centroid_ras],
            "largest_component_fraction": round(self.largest_component_fraction, 4),
        }


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def voxel_volume_ml(affine: np.ndarray) -> float:
    """Volume of one voxel in ml for a 4x4 voxel -> mm ``affine``: |det(affine[:3, :3])| / 1000."""
    return float(abs(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0


def structure_statistics(
    labels: np.ndarray,
    intensities: np.ndarray | None,
    affine: np.ndarray,
    names: Mapping[int, str],
) -> list[StructureStatistics]:
    """One :class:`StructureStatistics` per label id present in ``labels`` (ascending id).

    Args:
        labels: (X, Y, Z) integer class ids on the input grid, 0 = background.
        intensities: the input's (X, Y, Z) voxels in its own units, any numeric dtype, or ``None`` (the
            intensity fields are then ``None``).
        affine: 4x4 voxel -> RAS+ mm.
        names: class id -> display name; missing ids are named ``f"class {id}"``.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"labels must be 3-D (X, Y, Z), got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must have an integer dtype, got {labels.dtype}")
    if intensities is not None:
        intensities = np.asarray(intensities)
        if intensities.shape != labels.shape:
            raise ValueError(f"intensities shape {intensities.shape} differs from labels shape {labels.shape}")
    affine = np.asarray(affine, dtype=np.float64)
    if labels.size == 0:
        return []
    if labels.dtype.kind == "i" and labels.min() < 0:
        raise ValueError("labels must not be negative")
    work = labels
    voxel_ml = voxel_volume_ml(affine)
    boxes = ndimage.find_objects(work)
    out = []
    for index, box in enumerate(boxes):
        if box is None:
            continue
        cid = index + 1
        out.append(_one_structure(cid, names.get(cid, f"class {cid}"), work, intensities, affine, voxel_ml, box))
    return out


def _one_structure(
    cid: int,
    name: str,
    labels: np.ndarray,
    intensities: np.ndarray | None,
    affine: np.ndarray,
    voxel_ml: float,
    box: tuple[slice, slice, slice],
) -> StructureStatistics:
    mask = labels[box] == cid
    voxels = int(np.count_nonzero(mask))
    bbox = tuple((int(s.start), int(s.stop) - 1) for s in box)
    sides = cut_sides(bbox, labels.shape)  # type: ignore[arg-type]
    mean = std = median = p5 = p95 = None
    if intensities is not None:
        values = intensities[box][mask]
        if values.dtype == np.bool_:
            values = values.view(np.uint8)
        elif values.dtype.kind in "fc":
            values = values.real
            values = values[np.isfinite(values)]  # NaN/inf voxels say nothing about the tissue
        if values.size:
            mean, std = float(values.mean(dtype=np.float64)), float(values.std(dtype=np.float64))
            p5, median, p95 = (float(v) for v in np.percentile(values, PERCENTILES))
    return StructureStatistics(
        id=cid,
        name=name,
        voxels=voxels,
        volume_ml=voxels * voxel_ml,
        mean=mean,
        std=std,
        median=median,
        p5=p5,
        p95=p95,
        bbox=bbox,  # type: ignore[arg-type]
        cut_by_fov=bool(sides),
        cut_sides=sides,
        centroid_ras=_centroid_ras(mask, box, voxels, affine),
        largest_component_fraction=largest_component_fraction(mask),
    )


def cut_sides(bbox: Sequence[tuple[int, int]], shape: Sequence[int]) -> tuple[str, ...]:
    """The faces of a ``shape`` voxel grid that an inclusive ``bbox`` touches (names from :data:`FACES`)."""
    sides = []
    for axis, ((lo, hi), n) in enumerate(zip(bbox, shape)):
        if lo <= 0:
            sides.append(FACES[2 * axis])
        if hi >= n - 1:
            sides.append(FACES[2 * axis + 1])
    return tuple(sides)


def _centroid_ras(
    mask: np.ndarray, box: tuple[slice, slice, slice], voxels: int, affine: np.ndarray
) -> tuple[float, float, float]:
    """Voxel-weighted centroid of ``mask`` (a crop starting at ``box``'s corner) in world mm."""
    index = []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        counts = mask.sum(axis=others, dtype=np.int64)
        index.append(box[axis].start + float(np.dot(counts, np.arange(counts.size))) / voxels)
    world = affine[:3, :3] @ np.asarray(index) + affine[:3, 3]
    return (float(world[0]), float(world[1]), float(world[2]))


def largest_component_fraction(mask: np.ndarray) -> float:
    """Voxels of the largest 26-connected component of boolean ``mask`` / all its voxels (1.0 if empty).

    Above :data:`COMPONENTS_BLOCK_ABOVE_VOXELS` voxels the components are found on 2x2x2 blocks (see there).
    """
    total = int(np.count_nonzero(mask))
    if total == 0:
        return 1.0
    if total > COMPONENTS_BLOCK_ABOVE_VOXELS:
        weights = _block_counts(mask)
        components, n = ndimage.label(weights > 0, structure=_FULL_CONNECTIVITY)
        if n <= 1:
            return 1.0
        sizes = np.bincount(components.ravel(), weights=weights.ravel())[1:]
    else:
        components, n = ndimage.label(mask, structure=_FULL_CONNECTIVITY)
        if n <= 1:
            return 1.0
        sizes = np.bincount(components.ravel())[1:]
    return float(sizes.max()) / total


def _block_counts(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` in each 2x2x2 block (the crop padded to even sizes), as uint8."""
    pad = [(0, n % 2) for n in mask.shape]
    m = np.pad(mask, pad) if any(p for _, p in pad) else mask
    x, y, z = (n // 2 for n in m.shape)
    return m.view(np.uint8).reshape(x, 2, y, 2, z, 2).sum(axis=(1, 3, 5), dtype=np.uint8)


#: Column name -> pyarrow type name of :func:`statistics_table` (after the per-volume columns).
STRUCTURE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("id", "int32"),
    ("name", "string"),
    ("voxels", "int64"),
    ("volume_ml", "float64"),
    ("mean", "float64"),
    ("std", "float64"),
    ("median", "float64"),
    ("p5", "float64"),
    ("p95", "float64"),
    ("bbox_i0", "int32"),
    ("bbox_i1", "int32"),
    ("bbox_j0", "int32"),
    ("bbox_j1", "int32"),
    ("bbox_k0", "int32"),
    ("bbox_k1", "int32"),
    ("cut_by_fov", "bool_"),
    ("cut_sides", "string"),
    ("centroid_x", "float64"),
    ("centroid_y", "float64"),
    ("centroid_z", "float64"),
    ("largest_component_fraction", "float64"),
)


def statistics_rows(volume: Mapping[str, Any], stats: Sequence[StructureStatistics]) -> list[dict[str, Any]]:
    """Flat table rows, one per structure: ``volume``'s per-volume columns (e.g. ``uri``, ``output_uri``)
    first, then :data:`STRUCTURE_COLUMNS` (bbox as 6 int columns, the RAS centroid in mm as 3 columns,
    ``cut_sides`` joined with ``","``). Values are rounded as in :meth:`StructureStatistics.to_json`."""
    rows = []
    for s in stats:
        js = s.to_json()
        row = dict(volume)
        row.update({k: js[k] for k in ("id", "name", "voxels", "volume_ml", "mean", "std", "median", "p5", "p95")})
        for (axis, (lo, hi)) in zip("ijk", s.bbox):
            row[f"bbox_{axis}0"], row[f"bbox_{axis}1"] = lo, hi
        row["cut_by_fov"] = s.cut_by_fov
        row["cut_sides"] = ",".join(s.cut_sides)
        row["centroid_x"], row["centroid_y"], row["centroid_z"] = js["centroid_ras"]
        row["largest_component_fraction"] = js["largest_component_fraction"]
        rows.append(row)
    return rows


def statistics_table(rows: Sequence[Mapping[str, Any]], volume_columns: Sequence[str] = ()) -> pyarrow.Table:
    """A ``pyarrow.Table`` of :func:`statistics_rows` rows with an explicit schema: the per-volume columns as
    strings (``volume_columns``, or those found in the first row), then :data:`STRUCTURE_COLUMNS` with fixed
    types, so that 0 rows and n rows give the same column types."""
    import pyarrow as pa

    structure_names = {name for name, _ in STRUCTURE_COLUMNS}
    if not volume_columns and rows:
        volume_columns = [k for k in rows[0] if k not in structure_names]
    fields = [pa.field(name, pa.string()) for name in volume_columns]
    fields += [pa.field(name, getattr(pa, type_name)()) for name, type_name in STRUCTURE_COLUMNS]
    schema = pa.schema(fields)
    columns = {
        f.name: [None if r.get(f.name) is None else (str(r[f.name]) if f.name in volume_columns else r[f.name])
                 for r in rows]
        for f in schema
    }
    return pa.Table.from_pydict(columns, schema=schema)
