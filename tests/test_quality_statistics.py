"""nvseg_ray.quality.statistics: per-structure statistics against hand-computed values on small arrays."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from nvseg_ray.quality import statistics as S
from nvseg_ray.quality.statistics import (
    STRUCTURE_COLUMNS,
    StructureStatistics,
    largest_component_fraction,
    statistics_rows,
    statistics_table,
    structure_statistics,
)
from nvseg_ray.synthetic import torso_ct, torso_labels


def _volume() -> tuple[np.ndarray, np.ndarray]:
    """(10, 8, 6) labels with a box of id 2 inside, a box of id 5 touching i_min and k_max; int16 intensities."""
    labels = np.zeros((10, 8, 6), dtype=np.uint8)
    labels[2:5, 3:7, 1:3] = 2  # 3 x 4 x 2 = 24 voxels, inside
    labels[0:2, 0:1, 4:6] = 5  # 2 x 1 x 2 = 4 voxels, touches i_min, j_min, k_max
    rng = np.random.default_rng(0)
    intensities = rng.integers(-1000, 1500, labels.shape).astype(np.int16)
    return labels, intensities


def test_voxels_volume_bbox_and_sides_by_hand():
    labels, intensities = _volume()
    affine = np.diag([0.5, 2.0, 3.0, 1.0])  # anisotropic: 3 mm^3 per voxel
    stats = structure_statistics(labels, intensities, affine, {2: "spleen"})
    assert [s.id for s in stats] == [2, 5]
    inside, edge = stats
    assert (inside.name, edge.name) == ("spleen", "class 5")
    assert inside.voxels == 24 and edge.voxels == 4
    assert inside.volume_ml == pytest.approx(24 * 3.0 / 1000)
    assert edge.volume_ml == pytest.approx(4 * 3.0 / 1000)
    assert inside.bbox == ((2, 4), (3, 6), (1, 2))
    assert edge.bbox == ((0, 1), (0, 0), (4, 5))
    assert not inside.cut_by_fov and inside.cut_sides == ()
    assert edge.cut_by_fov and edge.cut_sides == ("i_min", "j_min", "k_max")


@pytest.mark.parametrize(
    ("bbox", "shape", "sides"),
    [
        (((1, 2), (1, 2), (1, 2)), (4, 4, 4), ()),
        (((0, 2), (1, 2), (1, 2)), (4, 4, 4), ("i_min",)),
        (((1, 3), (1, 2), (1, 2)), (4, 4, 4), ("i_max",)),
        (((1, 2), (0, 3), (1, 2)), (4, 4, 4), ("j_min", "j_max")),
        (((1, 2), (1, 2), (0, 0)), (4, 4, 1), ("k_min", "k_max")),
    ],
)
def test_cut_sides(bbox, shape, sides):
    assert S.cut_sides(bbox, shape) == sides


def test_intensity_statistics_match_numpy_on_the_mask():
    labels, intensities = _volume()
    stats = structure_statistics(labels, intensities, np.eye(4), {})
    for s in stats:
        values = intensities[labels == s.id].astype(np.float64)
        assert s.mean == pytest.approx(values.mean())
        assert s.std == pytest.approx(values.std())
        assert s.median == pytest.approx(np.median(values))
        assert s.p5 == pytest.approx(np.percentile(values, 5))
        assert s.p95 == pytest.approx(np.percentile(values, 95))


def test_no_intensities_gives_none_fields():
    labels, _ = _volume()
    for s in structure_statistics(labels, None, np.eye(4), {}):
        assert (s.mean, s.std, s.median, s.p5, s.p95) == (None, None, None, None, None)
        assert s.voxels > 0


def test_centroid_in_world_mm_with_a_non_identity_affine():
    labels = np.zeros((6, 6, 6), dtype=np.int16)
    labels[1, 2, 3] = 7
    labels[3, 2, 3] = 7  # centroid in voxels (2, 2, 3)
    affine = np.array([[0.0, -2.0, 0.0, 10.0],  # a permuting, flipping, scaling affine
                       [1.5, 0.0, 0.0, -5.0],
                       [0.0, 0.0, 3.0, 100.0],
                       [0.0, 0.0, 0.0, 1.0]])
    (s,) = structure_statistics(labels, None, affine, {})
    expected = affine @ np.array([2.0, 2.0, 3.0, 1.0])
    assert s.centroid_ras == pytest.approx(tuple(expected[:3]))
    assert s.volume_ml == pytest.approx(2 * 9.0 / 1000)  # |det| = 2 * 1.5 * 3


def test_two_components_give_the_fraction():
    labels = np.zeros((12, 5, 5), dtype=np.uint8)
    labels[1:4, 1:4, 1:4] = 3  # 27 voxels
    labels[6:11, 1:4, 1:4] = 3  # 45 voxels, separated by two empty slices
    labels[8, 4, 4] = 9  # a single voxel of another id: one piece
    stats = {s.id: s for s in structure_statistics(labels, None, np.eye(4), {})}
    assert stats[3].largest_component_fraction == pytest.approx(45 / 72)
    assert stats[9].largest_component_fraction == 1.0


def test_diagonal_neighbours_are_connected():
    mask = np.zeros((3, 3, 3), dtype=bool)
    mask[0, 0, 0] = mask[1, 1, 1] = mask[2, 2, 2] = True  # 26-connected chain
    assert largest_component_fraction(mask) == 1.0


@pytest.mark.parametrize("gap", [3, 6])
def test_large_structures_use_blocks_and_keep_the_fraction(monkeypatch, gap):
    monkeypatch.setattr(S, "COMPONENTS_BLOCK_ABOVE_VOXELS", 100)
    mask = np.zeros((30, 9, 9), dtype=bool)
    mask[0:10, :, :] = True
    mask[10 + gap : 30, :, :] = True
    exact = (30 - 10 - gap) / (30 - gap)
    assert largest_component_fraction(mask) == pytest.approx(exact)


def test_blocks_can_only_merge_close_components(monkeypatch):
    monkeypatch.setattr(S, "COMPONENTS_BLOCK_ABOVE_VOXELS", 10)
    mask = np.zeros((21, 4, 4), dtype=bool)
    mask[0:10] = True
    mask[11:21] = True  # one empty slice between: separate at full resolution, merged in blocks
    assert largest_component_fraction(mask) == 1.0


def test_empty_labels_give_no_statistics():
    assert structure_statistics(np.zeros((4, 4, 4), dtype=np.uint8), None, np.eye(4), {}) == []


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="3-D"):
        structure_statistics(np.zeros((4, 4), dtype=np.uint8), None, np.eye(4), {})
    with pytest.raises(ValueError, match="integer"):
        structure_statistics(np.zeros((4, 4, 4), dtype=np.float32), None, np.eye(4), {})
    with pytest.raises(ValueError, match="shape"):
        structure_statistics(np.zeros((4, 4, 4), dtype=np.uint8), np.zeros((4, 4, 3)), np.eye(4), {})


def test_to_json_is_plain_and_rounded():
    labels, intensities = _volume()
    s = structure_statistics(labels, intensities.astype(np.float32) + 0.123456, np.diag([0.7, 0.7, 1.3, 1]), {})[0]
    js = s.to_json()
    assert json.loads(json.dumps(js)) == js
    assert js["volume_ml"] == round(s.volume_ml, 3)
    assert js["mean"] == round(s.mean, 2) and js["p95"] == round(s.p95, 2)
    assert js["bbox"] == [[2, 4], [3, 6], [1, 2]]
    assert isinstance(js["voxels"], int) and isinstance(js["cut_by_fov"], bool)
    none_js = structure_statistics(labels, None, np.eye(4), {})[0].to_json()
    assert none_js["mean"] is None and none_js["std"] is None


def test_rows_prefix_the_volume_columns_and_flatten_bbox_and_centroid():
    labels, intensities = _volume()
    stats = structure_statistics(labels, intensities, np.eye(4), {2: "spleen"})
    rows = statistics_rows({"uri": "s3://b/in.nii.gz", "output_uri": "s3://b/out.nii.gz"}, stats)
    assert len(rows) == 2
    assert list(rows[0])[:2] == ["uri", "output_uri"]
    assert list(rows[0])[2:] == [name for name, _ in STRUCTURE_COLUMNS]
    assert (rows[0]["bbox_i0"], rows[0]["bbox_i1"], rows[0]["bbox_k1"]) == (2, 4, 2)
    assert rows[1]["cut_sides"] == "i_min,j_min,k_max"
    assert (rows[0]["centroid_x"], rows[0]["centroid_y"], rows[0]["centroid_z"]) == pytest.approx((3.0, 4.5, 1.5))


@pytest.mark.parametrize("n_rows", [0, 2])
def test_table_schema_is_stable(n_rows):
    pa = pytest.importorskip("pyarrow")
    labels, intensities = _volume()
    stats = structure_statistics(labels, intensities, np.eye(4), {})[:n_rows]
    rows = statistics_rows({"uri": "a", "output_uri": "b"}, stats)
    table = statistics_table(rows, volume_columns=("uri", "output_uri"))
    assert table.num_rows == n_rows
    assert table.schema.field("uri").type == pa.string()
    assert table.schema.field("id").type == pa.int32()
    assert table.schema.field("voxels").type == pa.int64()
    assert table.schema.field("volume_ml").type == pa.float64()
    assert table.schema.field("mean").type == pa.float64()
    assert table.schema.field("bbox_k1").type == pa.int32()
    assert table.schema.field("cut_by_fov").type == pa.bool_()
    assert table.column_names == ["uri", "output_uri"] + [name for name, _ in STRUCTURE_COLUMNS]
    if n_rows:
        assert table.column("voxels").to_pylist() == [24, 4]
        assert table.column("uri").to_pylist() == ["a", "a"]


def test_table_with_missing_intensities_keeps_float_columns():
    pa = pytest.importorskip("pyarrow")
    labels, _ = _volume()
    table = statistics_table(statistics_rows({"uri": "x"}, structure_statistics(labels, None, np.eye(4), {})))
    assert table.schema.field("mean").type == pa.float64()
    assert table.column("mean").null_count == 2


def test_torso_labels_are_plausible_and_inside_the_scan():
    shape, spacing = (240, 200, 160), (1.5, 1.5, 1.5)
    labels = torso_labels(shape, spacing)
    assert labels.shape == shape and labels.dtype == np.uint8
    stats = {s.id: s for s in structure_statistics(labels, None, np.diag([-1.5, 1.5, 1.5, 1.0]), {})}
    assert set(stats) == {1, 3, 5, 6, 14, 29, 32, 36, 37, 38}
    assert not any(s.cut_by_fov for s in stats.values())
    assert 1200 < stats[1].volume_ml < 1800  # liver
    assert 150 < stats[3].volume_ml < 300  # spleen
    assert 130 < stats[5].volume_ml < 220 and 130 < stats[14].volume_ml < 220  # kidneys
    # affine diag(-sx, sy, sz): the patient's right (liver, right kidney, right lung) has the larger world x
    assert stats[1].centroid_ras[0] > stats[3].centroid_ras[0]
    assert stats[5].centroid_ras[0] > stats[14].centroid_ras[0]
    assert stats[32].centroid_ras[0] > stats[29].centroid_ras[0]
    assert stats[6].centroid_ras[1] > stats[37].centroid_ras[1]  # aorta anterior to the spine
    assert stats[29].centroid_ras[2] > stats[1].centroid_ras[2] > stats[5].centroid_ras[2]  # lungs, liver, kidneys


def test_torso_labels_overlay_torso_ct_in_plane():
    shape, spacing = (120, 100, 80), (3.0, 3.0, 3.0)
    labels, ct = torso_labels(shape, spacing), torso_ct(shape, spacing)
    stats = {s.id: s for s in structure_statistics(labels, ct, np.diag([-3.0, 3.0, 3.0, 1.0]), {})}
    assert stats[37].median > 250  # vertebra over the CT's spine
    assert 20 < stats[5].median < 60 and 20 < stats[14].median < 60  # kidneys over the CT's kidneys (30 HU)
    assert 30 < stats[6].median < 60  # aorta (45 HU)


def test_timing_print_for_a_benchmark_sized_volume():
    """Not an assertion on time: prints the cost on a 488 x 404 x 224 volume for the record."""
    shape, spacing = (488, 404, 224), (0.75, 0.75, 0.75)
    labels, ct = torso_labels(shape, spacing), torso_ct(shape, spacing)
    start = time.perf_counter()
    stats = structure_statistics(labels, ct, np.diag([-0.75, 0.75, 0.75, 1.0]), {})
    print(f"structure_statistics on {shape}: {time.perf_counter() - start:.3f} s, {len(stats)} structures")
    assert all(isinstance(s, StructureStatistics) for s in stats)


def test_non_finite_and_bool_intensities():
    labels = np.zeros((4, 4, 4), dtype=np.uint8)
    labels[1:3, 1:3, 1:3] = 1
    labels[0, 0, 0] = 2
    values = np.full(labels.shape, 10.0)
    values[1, 1, 1] = np.nan
    values[0, 0, 0] = np.inf
    one, two = structure_statistics(labels, values, np.eye(4), {})
    assert one.mean == 10.0 and one.p95 == 10.0 and one.voxels == 8
    assert two.mean is None and two.voxels == 1
    json.dumps(one.to_json(), allow_nan=False)
    (flagged, _) = structure_statistics(labels, labels > 0, np.eye(4), {})
    assert flagged.mean == 1.0
