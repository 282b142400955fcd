"""nvseg_ray.quality.flags: QC flags on constructed cases (torso torso, crops, flipped headers, wrong modality)."""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
import pytest

from nvseg_ray.labels import LabelCatalog
from nvseg_ray.quality import flags as F
from nvseg_ray.quality.flags import FLAG_CODES, REFERENCE_VOLUMES_ML, QCFlag, qc_flags
from nvseg_ray.quality.statistics import StructureStatistics, structure_statistics
from nvseg_ray.synthetic import torso_ct, torso_labels

SHAPE, SPACING = (240, 200, 160), 1.5
CATALOG = LabelCatalog.default()
NAMES = {cid: label.name for cid, label in CATALOG.classes.items()}
CT_EVERYTHING = CATALOG.everything_ids("CT_BODY")


def _affine(shape=SHAPE, spacing=SPACING) -> np.ndarray:
    """The torso's anatomically correct affine: i -> patient's left (-x), j -> anterior, k -> superior."""
    affine = np.diag([-spacing, spacing, spacing, 1.0])
    affine[:3, 3] = [(shape[0] - 1) / 2 * spacing, -(shape[1] - 1) / 2 * spacing, -(shape[2] - 1) / 2 * spacing]
    return affine


@pytest.fixture(scope="module")
def torso() -> tuple[np.ndarray, np.ndarray]:
    return torso_labels(SHAPE, (SPACING,) * 3), torso_ct(SHAPE, (SPACING,) * 3)


def _flags(labels, intensities, affine, modality="CT_BODY", prompted=CT_EVERYTHING, everything=True):
    stats = structure_statistics(labels, intensities, affine, NAMES)
    return stats, qc_flags(stats, labels, intensities, affine, modality=modality, prompted_ids=prompted,
                           everything=everything)


def _codes(flags: list[QCFlag]) -> list[str]:
    return [f.code for f in flags]


def _stat(name: str, cid: int = 1, *, voxels: int = 1000, ml: float = 100.0, x: float = 0.0, cut: bool = False,
          fraction: float = 1.0) -> StructureStatistics:
    return StructureStatistics(
        id=cid, name=name, voxels=voxels, volume_ml=ml, mean=None, std=None, median=None, p5=None, p95=None,
        bbox=((1, 2), (1, 2), (1, 2)), cut_by_fov=cut, cut_sides=("k_max",) if cut else (),
        centroid_ras=(x, 0.0, 0.0), largest_component_fraction=fraction,
    )


def test_normal_torso_phantom_has_no_flags(torso):
    labels, ct = torso
    stats, flags = _flags(labels, ct, _affine())
    assert len(stats) == 10
    assert flags == []


def test_phantom_cut_at_the_top_flags_the_cut_structures_but_no_small_cut_organ(torso):
    labels, ct = torso
    keep = 66  # slices kept from the bottom: z up to ~ -20 mm of the 240 mm scan; the liver mostly lies above
    labels, ct = labels[:, :, :keep], ct[:, :, :keep]
    stats, flags = _flags(labels, ct, _affine(labels.shape))
    by_name = {s.name: s for s in stats}
    liver = by_name["liver"]
    assert liver.cut_by_fov and liver.cut_sides == ("k_max",)
    assert liver.volume_ml < REFERENCE_VOLUMES_ML["liver"][0]  # too small -- but only a lower bound
    assert _codes(flags) == ["cut_by_fov"]
    (cut,) = flags
    assert {"liver", "right kidney", "left kidney", "aorta"} <= set(cut.structures)
    assert set(cut.structures) == {s.name for s in stats if s.cut_by_fov}
    assert "vertebrae L2" not in cut.structures  # ends below the cut
    assert "liver (superior)" in cut.reason and "lower bound" in cut.reason


def test_flipped_x_header_flags_laterality(torso):
    labels, ct = torso
    flipped = np.diag([-1.0, 1.0, 1.0, 1.0]) @ _affine()  # world x negated: right and left swapped
    _, flags = _flags(labels, ct, flipped)
    assert _codes(flags) == ["laterality"]
    (flag,) = flags
    assert "left/right-flipped orientation header is suspected" in flag.reason
    for pair in ("liver/spleen", "kidneys", "lungs"):
        assert pair in flag.reason
    assert {"liver", "spleen", "right kidney", "left kidney"} <= set(flag.structures)


@pytest.mark.parametrize(
    ("stats", "expected"),
    [
        ([_stat("liver", 1, x=-80.0), _stat("spleen", 3, x=90.0)], "liver/spleen by 170 mm"),  # swapped
        ([_stat("liver", 1, x=80.0), _stat("spleen", 3, x=-90.0)], None),  # right = larger x: correct
        ([_stat("liver", 1, x=5.0), _stat("spleen", 3, x=10.0)], None),  # within the margin
        ([_stat("right kidney", 5, x=60.0), _stat("left kidney", 14, x=-60.0)], None),
        ([_stat("right kidney", 5, x=-60.0), _stat("left kidney", 14, x=60.0)], "kidneys by 120 mm"),
        ([_stat("right kidney", 5, x=-60.0)], None),  # no partner
    ],
)
def test_laterality_pairs(stats, expected):
    flag = F.flag_laterality(stats)
    if expected is None:
        assert flag is None
    else:
        assert flag is not None and expected in flag.reason


def test_lung_lobes_are_grouped_for_laterality():
    lobes = [_stat("right lung upper lobe", 30, voxels=100, x=-100.0), _stat("right lung lower lobe", 32,
             voxels=300, x=-80.0), _stat("left lung upper lobe", 28, voxels=200, x=90.0)]
    flag = F.flag_laterality(lobes)
    assert flag is not None and "lungs by 175 mm" in flag.reason  # right group centroid -85, left +90


def test_mixed_laterality_blames_the_segmentation_not_the_header():
    stats = [_stat("liver", 1, x=-80.0), _stat("spleen", 3, x=90.0),
             _stat("right kidney", 5, x=60.0), _stat("left kidney", 14, x=-60.0)]
    flag = F.flag_laterality(stats)
    assert flag is not None and "segmentation error" in flag.reason and "header" not in flag.reason


def test_mr_sent_as_ct_flags_intensity_mismatch(torso):
    labels, _ = torso
    mr = np.random.default_rng(1).integers(0, 1500, labels.shape).astype(np.int16)
    _, flags = _flags(labels, mr, _affine(), modality="CT_BODY")
    assert _codes(flags) == ["intensity_mismatch"]
    assert "almost no air" in flags[0].reason


def test_ct_sent_as_mr_flags_intensity_mismatch(torso):
    labels, ct = torso
    mr_everything = CATALOG.everything_ids("MRI_BODY")
    _, flags = _flags(labels, ct, _affine(), modality="MRI_BODY", prompted=mr_everything)
    assert _codes(flags) == ["intensity_mismatch"]
    assert "looks like a CT" in flags[0].reason


def _small_torso() -> np.ndarray:
    return torso_ct((60, 50, 40), (6.0, 6.0, 6.0))


@pytest.mark.parametrize(
    ("make", "modality", "flagged"),
    [
        (lambda: _small_torso(), "CT_BODY", None),
        (lambda: np.where(_circle_outside(), np.int16(-3024), _small_torso()), "CT_BODY", None),  # scanner padding
        (lambda: _small_torso().astype(np.int32) * 10, "CT_BODY", "wrong rescale"),  # wrong slope: -10000 air
        (lambda: np.where(np.random.default_rng(0).random((60, 50, 40)) < 0.01, 20000, _small_torso()), "CT_BODY",
         "far above the HU range"),  # 1 % of values at 20000
        (lambda: np.clip(_small_torso().astype(np.int32) + 1024, 0, None), "CT_BODY", "almost no air"),  # no intercept
        (lambda: _small_torso().astype(np.int32) - 1024 - np.random.default_rng(0).integers(0, 50, (60, 50, 40)),
         "CT_BODY", "below air"),  # intercept applied twice
        (lambda: _small_torso().astype(np.float32), "CT", None),  # any CT* modality string
        (lambda: np.random.default_rng(0).normal(0, 1, (20, 20, 20)), "MRI_BODY", None),  # z-scored MR
        (lambda: np.random.default_rng(0).uniform(0, 900, (20, 20, 20)), "MRI_BRAIN", None),
        (lambda: _small_torso(), "MRI_BRAIN", "looks like a CT"),
        (lambda: _small_torso(), None, None),  # no modality: skipped
        (lambda: None, "CT_BODY", None),  # no intensities: skipped
        (lambda: _small_torso(), "PET", None),  # unknown modality: skipped
        (lambda: np.full((8, 8, 8), np.nan), "CT_BODY", None),  # nothing finite
        (lambda: np.zeros((0, 4, 4)), "MRI_BODY", None),  # empty
    ],
)
def test_intensity_mismatch_cases(make, modality, flagged):
    flag = F.flag_intensity_mismatch(make(), modality)
    if flagged is None:
        assert flag is None
    else:
        assert flag is not None and flag.code == "intensity_mismatch" and flagged in flag.reason


def _circle_outside() -> np.ndarray:
    i, j = np.meshgrid(np.linspace(-1, 1, 60), np.linspace(-1, 1, 50), indexing="ij")
    return np.broadcast_to(((i**2 + j**2) > 1.0)[:, :, None], (60, 50, 40))


def test_empty_result_flags_only_empty():
    labels = np.zeros((40, 40, 200), dtype=np.uint8)
    ct = np.full(labels.shape, -1000, dtype=np.int16)
    stats, flags = _flags(labels, ct, np.diag([2.0, 2.0, 2.0, 1.0]))
    assert stats == []
    assert _codes(flags) == ["empty"]
    assert _codes(qc_flags([], labels, None, np.zeros((4, 4)), modality=None, prompted_ids=(), everything=True)) \
        == ["empty"]


def test_few_labels_on_an_everything_run_with_two_structures_in_400_mm():
    labels = np.zeros((40, 40, 200), dtype=np.uint8)
    labels[10:20, 10:20, 50:60] = 1
    labels[22:30, 10:20, 50:60] = 3
    affine = np.diag([2.0, 2.0, 2.0, 1.0])  # 200 slices x 2 mm = 400 mm
    stats = structure_statistics(labels, None, affine, NAMES)
    flag = F.flag_few_labels(stats, labels.shape, affine, prompted_ids=CT_EVERYTHING, everything=True)
    assert flag is not None and flag.code == "few_labels"
    assert "Only 2 of 117" in flag.reason and "400 mm" in flag.reason and "about 27" in flag.reason
    assert F.flag_few_labels(stats, labels.shape, affine, prompted_ids=CT_EVERYTHING, everything=False) is None
    assert F.flag_few_labels(stats, labels.shape, affine, prompted_ids=(1, 3, 5), everything=True) is None
    # a 40 mm slab: expected ~3, so 2 found is no alarm
    assert F.flag_few_labels(stats, (40, 40, 20), affine, prompted_ids=CT_EVERYTHING, everything=True) is None
    assert "few_labels" in _codes(qc_flags(stats, labels, None, affine, modality="CT_BODY",
                                           prompted_ids=CT_EVERYTHING, everything=True))


@pytest.mark.parametrize(
    ("extent_mm", "found", "flagged"),
    [(1500, 20, True), (1500, 40, False), (200, 3, True), (200, 5, False), (3000, 30, True), (3000, 40, False)],
)
def test_few_labels_thresholds(extent_mm, found, flagged):
    stats = [_stat(f"class {cid}", cid) for cid in CT_EVERYTHING[:found]]
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    flag = F.flag_few_labels(stats, (10, 10, extent_mm), affine, prompted_ids=CT_EVERYTHING, everything=True)
    assert (flag is not None) == flagged


def test_fragmented_structure_split_in_two_halves(torso):
    labels, ct = torso
    labels = labels.copy()
    liver = labels == 1
    i_mid = int(np.median(np.nonzero(liver)[0]))
    labels[i_mid - 3 : i_mid + 3][liver[i_mid - 3 : i_mid + 3]] = 0  # a 9 mm gap through the liver
    _, flags = _flags(labels, ct, _affine())
    assert _codes(flags) == ["fragmented"]
    assert flags[0].structures == ("liver",)
    assert "liver (" in flags[0].reason


@pytest.mark.parametrize(
    ("name", "ml", "fraction", "flagged"),
    [
        ("spleen", 200.0, 0.5, True),
        ("spleen", 200.0, 0.7, False),
        ("spleen", 5.0, 0.5, False),  # too small to judge
        ("liver tumor", 200.0, 0.3, False),  # naturally multi-part
        ("bone lesion", 200.0, 0.3, False),
        ("left kidney cyst", 200.0, 0.3, False),
        ("kidney", 300.0, 0.5, False),  # group class: both kidneys
        ("costal cartilages", 50.0, 0.1, False),
        ("small bowel", 500.0, 0.4, False),
    ],
)
def test_fragmented_cases(name, ml, fraction, flagged):
    flag = F.flag_fragmented([_stat(name, ml=ml, fraction=fraction)])
    assert (flag is not None) == flagged


@pytest.mark.parametrize(
    ("name", "ml", "cut", "flagged"),
    [
        ("liver", 1500.0, False, False),
        ("liver", 300.0, False, True),  # too small and complete
        ("liver", 300.0, True, False),  # too small but cut: only a lower bound
        ("liver", 4000.0, True, True),  # too large even though cut
        ("Spleen", 900.0, False, True),  # names match case-insensitively
        ("spleen", 200.0, False, False),
        ("right kidney", 40.0, False, True),
        ("pancreas", 80.0, False, False),
        ("aorta", 5000.0, False, False),  # no reference
    ],
)
def test_volume_outlier_cases(name, ml, cut, flagged):
    flag = F.flag_volume_outlier([_stat(name, ml=ml, cut=cut)])
    assert (flag is not None) == flagged
    if flag:
        assert f"{ml:.0f} ml" in flag.reason and "adult range" in flag.reason


def test_reference_volumes_are_sane_and_cited():
    for name, (low, high, source) in REFERENCE_VOLUMES_ML.items():
        assert 0 < low < high, name
        assert any(ch.isdigit() for ch in source) and len(source) > 20, name
        assert CATALOG.resolve(name) > 0  # every name is a catalog class


def test_cut_by_fov_reason_names_the_sides():
    stats = [_stat("liver", cut=True), _stat("spleen", 3)]
    flag = F.flag_cut_by_fov(stats, np.diag([-1.0, 1.0, 2.0, 1.0]))
    assert flag is not None and flag.structures == ("liver",)
    assert "liver (superior)" in flag.reason and "its volume is a lower bound" in flag.reason
    assert "liver (k_max)" in F.flag_cut_by_fov(stats).reason  # without an affine: the face name
    sides = dataclasses.replace(stats[0], cut_sides=("i_min", "i_max", "j_min"))
    reason = F.flag_cut_by_fov([sides], np.diag([-1.0, 1.0, 1.0, 1.0])).reason
    assert "liver (right, left, posterior)" in reason


def test_flags_never_raise_for_odd_input():
    odd = [_stat("liver", ml=float("nan"), x=float("nan"))]
    for affine in (np.zeros((4, 4)), np.full((4, 4), np.nan), np.eye(4)):
        flags = qc_flags(odd, np.zeros((3, 3, 3), dtype=np.uint8), np.zeros((3, 3, 3)), affine,
                         modality="CT_BODY", prompted_ids=CT_EVERYTHING, everything=True)
        assert all(f.code in FLAG_CODES for f in flags)


def test_flag_json_and_codes():
    flag = QCFlag("cut_by_fov", "x", ("liver",))
    assert json.loads(json.dumps(flag.to_json())) == {"code": "cut_by_fov", "reason": "x", "structures": ["liver"]}
    assert set(FLAG_CODES) == {"empty", "few_labels", "cut_by_fov", "laterality", "volume_outlier",
                               "intensity_mismatch", "fragmented"}
    for code in FLAG_CODES:
        assert callable(getattr(F, f"flag_{code}"))


def test_timing_print_statistics_and_flags_on_a_benchmark_sized_pair():
    """Not an assertion on time: prints the cost of statistics + flags on 488 x 404 x 224 at 0.75 mm."""
    shape, spacing = (488, 404, 224), 0.75
    labels, ct = torso_labels(shape, (spacing,) * 3), torso_ct(shape, (spacing,) * 3)
    affine = _affine(shape, spacing)
    start = time.perf_counter()
    stats = structure_statistics(labels, ct, affine, NAMES)
    middle = time.perf_counter()
    flags = qc_flags(stats, labels, ct, affine, modality="CT_BODY", prompted_ids=CT_EVERYTHING, everything=True)
    end = time.perf_counter()
    print(f"statistics {middle - start:.3f} s + flags {end - middle:.3f} s on {shape}: {_codes(flags)}")
    assert all(f.code in FLAG_CODES for f in flags)
