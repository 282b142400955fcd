"""The QC preview PNG (nvseg_ray.quality.preview): small, fast, the catalog's colours, radiological orientation
worked out from the affine (a flipped, permuted or slightly oblique storage gives the same picture)."""

from __future__ import annotations

import io
import sys
import time

import numpy as np
import pytest
from PIL import Image

from nvseg_ray.errors import ConfigError
from nvseg_ray.labels import LabelCatalog
from nvseg_ray.quality import preview
from nvseg_ray.quality.colour_tables import label_colours
from nvseg_ray.quality.preview import (
    LEGEND_ENTRIES,
    OVERLAY_ALPHA,
    PANEL_HEIGHT,
    THUMBNAIL_HEIGHT,
    legend_entries,
    preview_layout,
    render_preview,
    thumbnail,
    window,
)
from nvseg_ray.synthetic import torso_ct

CATALOG = LabelCatalog.default()
LIVER, SPLEEN, RIGHT_KIDNEY, AORTA, LEFT_KIDNEY = 1, 3, 5, 6, 14

#: Small grid (few enough voxels that the centroid is computed on every voxel, not a sample).
SHAPE = (90, 80, 60)
SPACING = (2.0, 2.0, 3.0)
AFFINE = np.diag([*SPACING, 1.0])


def decode(png: bytes) -> np.ndarray:
    """PNG -> (rows, cols, 3) uint8."""
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def boxes(shape, affine) -> dict[str, tuple[int, int, int, int]]:
    return {name: (left, top, width, height) for name, left, top, width, height in preview_layout(shape, affine)}


def panel(pixels: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    left, top, width, height = box
    return pixels[top:top + height, left:left + width]


def blended(class_id: int, grey: float = 0.0) -> np.ndarray:
    colour = np.asarray(label_colours(CATALOG, [class_id])[class_id], dtype=np.float64)
    return OVERLAY_ALPHA * colour + (1 - OVERLAY_ALPHA) * grey


def where_colour(pixels: np.ndarray, colour: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of the pixels within +-1 of ``colour``."""
    return np.nonzero(np.all(np.abs(pixels.astype(int) - np.rint(colour).astype(int)) <= 1, axis=-1))


def ellipsoid(shape, centre, radii) -> np.ndarray:
    x, y, z = np.ogrid[:shape[0], :shape[1], :shape[2]]
    return ((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + ((z - centre[2]) / radii[2]) ** 2 < 1


def organ_labels(shape) -> np.ndarray:
    """Ellipsoids of liver, spleen, both kidneys and aorta, placed relative to ``shape`` (uint8 ids)."""
    nx, ny, nz = shape
    labels = np.zeros(shape, dtype=np.uint8)
    for class_id, centre, radii in (
        (LIVER, (0.68, 0.5, 0.55), (0.16, 0.15, 0.18)),  # high x: patient's right
        (SPLEEN, (0.3, 0.55, 0.55), (0.07, 0.07, 0.1)),
        (RIGHT_KIDNEY, (0.64, 0.64, 0.45), (0.05, 0.05, 0.1)),
        (LEFT_KIDNEY, (0.36, 0.64, 0.45), (0.05, 0.05, 0.1)),
        (AORTA, (0.5, 0.4, 0.5), (0.025, 0.025, 0.35)),
    ):
        c = (centre[0] * nx, centre[1] * ny, centre[2] * nz)
        labels[ellipsoid(shape, c, (radii[0] * nx, radii[1] * ny, radii[2] * nz))] = class_id
    return labels


# --------------------------------------------------------------------------------------------------------
# A realistic size: 488 x 404 x 224 CT phantom
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torso_case():
    shape, spacing = (488, 404, 224), (0.8, 0.8, 1.5)
    return torso_ct(shape, spacing), organ_labels(shape), np.diag([*spacing, 1.0])


def test_phantom_preview_is_small_fast_and_names_the_structures(torso_case):
    ct, labels, affine = torso_case
    render_preview(labels, ct, affine, CATALOG, modality="CT")  # warm-up (imports, font)
    start = time.perf_counter()
    png = render_preview(labels, ct, affine, CATALOG, modality="CT")
    seconds = time.perf_counter() - start
    assert len(png) < 300_000
    assert seconds < 1.0  # ~0.08 s measured on 2 CPUs; generous for loaded CI machines
    pixels = decode(png)
    assert pixels.shape[0] == PANEL_HEIGHT
    assert pixels.shape[1] < 1800
    # Every organ is cut by at least one panel, and its overlay is the catalog colour blended with grey:
    # somewhere the pixel is within reach of alpha * colour + (1 - alpha) * grey for a grey in 0..255.
    for class_id in (LIVER, SPLEEN, RIGHT_KIDNEY, LEFT_KIDNEY, AORTA):
        colour = np.asarray(label_colours(CATALOG, [class_id])[class_id], dtype=np.float64)
        grey = (pixels.astype(np.float64) - OVERLAY_ALPHA * colour) / (1 - OVERLAY_ALPHA)
        consistent = np.all(np.abs(grey - grey.mean(axis=-1, keepdims=True)) <= 2.5, axis=-1)
        consistent &= np.all((grey > -2) & (grey < 257), axis=-1)
        assert consistent.sum() > 20, class_id


def test_phantom_overlay_matches_the_grey_under_it(torso_case):
    """A labelled pixel equals the alpha blend of the catalog colour with the pixel of the same render without
    that label (same slices: the labelled centroid is kept by swapping the liver's id only)."""
    ct, labels, affine = torso_case
    relabelled = np.where(labels == LIVER, AORTA, labels).astype(np.uint8)  # same voxels labelled, other id
    with_liver = decode(render_preview(labels, ct, affine, CATALOG, modality="CT"))
    without = decode(render_preview(relabelled, ct, affine, CATALOG, modality="CT"))
    aorta = np.asarray(label_colours(CATALOG, [AORTA])[AORTA], dtype=np.float64)
    liver = np.asarray(label_colours(CATALOG, [LIVER])[LIVER], dtype=np.float64)
    sagittal = boxes(labels.shape, affine)["sagittal"]
    changed = np.any(with_liver != without, axis=-1)
    changed[:, sagittal[0] + sagittal[2]:] = False  # the panels only (the legend's swatch changes too)
    rows, cols = np.nonzero(changed)
    assert rows.size > 1000
    grey = (without[rows, cols].astype(np.float64) - OVERLAY_ALPHA * aorta) / (1 - OVERLAY_ALPHA)
    expected = OVERLAY_ALPHA * liver + (1 - OVERLAY_ALPHA) * grey
    assert np.abs(with_liver[rows, cols] - expected).max() <= 2


# --------------------------------------------------------------------------------------------------------
# Colours
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("class_id", [LIVER, SPLEEN, RIGHT_KIDNEY, AORTA, LEFT_KIDNEY, 300])
def test_black_background_gives_the_exact_blended_colour(class_id):
    labels = np.zeros(SHAPE, dtype=np.int32)
    labels[25:65, 20:60, 15:45] = class_id
    pixels = decode(render_preview(labels, None, AFFINE, CATALOG, modality=None))
    for name, box in boxes(SHAPE, AFFINE).items():
        left, top, width, height = box
        centre = pixels[top + height // 2, left + width // 2]
        assert tuple(centre) == tuple(np.rint(blended(class_id)).astype(int)), name
        assert tuple(pixels[top + 1, left + 1]) == (0, 0, 0)  # unlabelled corner: black


def test_ct_window_and_blend_on_a_uniform_volume():
    """40 HU is the window's level -> grey 127.5; a labelled pixel is alpha * colour + (1 - alpha) * 127.5."""
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[25:65, 20:60, 15:45] = SPLEEN
    intensities = np.full(SHAPE, 40, dtype=np.int16)
    pixels = decode(render_preview(labels, intensities, AFFINE, CATALOG, modality="CT"))
    for box in boxes(SHAPE, AFFINE).values():
        left, top, width, height = box
        labelled = pixels[top + height // 2, left + width // 2].astype(float)
        assert np.abs(labelled - blended(SPLEEN, 127.5)).max() <= 1
        assert np.abs(pixels[top + 1, left + 1].astype(float) - 127.5).max() <= 1


def test_windows():
    assert window("CT", []) == (-160.0, 240.0)
    assert window("ct_body", []) == (-160.0, 240.0)
    values = np.arange(1001, dtype=np.float32)
    for modality in ("MRI_T1", "MR", None):
        low, high = window(modality, [values[:500], values[500:]])
        assert low == pytest.approx(10.0) and high == pytest.approx(990.0)
    assert window("MRI", [np.zeros(10)]) == (0.0, 1.0)  # flat image: no division by zero


def test_mr_window_uses_the_shown_slices():
    """MR in arbitrary units (0..3000): the percentile window spans black to white; a CT window would not."""
    rng = np.random.default_rng(0)
    intensities = rng.uniform(0, 3000, size=SHAPE).astype(np.float32)
    labels = np.zeros(SHAPE, dtype=np.uint8)
    boxes_ = boxes(SHAPE, AFFINE)
    mr = panel(decode(render_preview(labels, intensities, AFFINE, CATALOG, modality="MRI")), boxes_["axial"])
    assert mr.min() == 0 and mr.max() == 255
    assert 0.005 < np.mean(mr[..., 0] == 255) < 0.05  # ~1 % of voxels above the 99th percentile
    ct = panel(decode(render_preview(labels, intensities, AFFINE, CATALOG, modality="CT")), boxes_["axial"])
    assert np.mean(ct[..., 0] == 255) > 0.9  # 240 HU and above saturate


# --------------------------------------------------------------------------------------------------------
# Orientation
# --------------------------------------------------------------------------------------------------------


def marker_labels(shape) -> np.ndarray:
    """Slabs on the patient's right (high x, spleen id), anterior (high y, right kidney id) and superior
    (high z, left kidney id) on an RAS-stored grid."""
    labels = np.zeros(shape, dtype=np.uint8)
    labels[-12:, :, :] = SPLEEN
    labels[:, -12:, :] = RIGHT_KIDNEY
    labels[:, :, -8:] = LEFT_KIDNEY
    return labels


def centre_of(pixels: np.ndarray, box, class_id: int) -> tuple[float, float, float, float]:
    """(row, col) mean of ``class_id``'s overlay pixels in ``box`` (black background), and the box's middle."""
    rows, cols = where_colour(panel(pixels, box), blended(class_id))
    assert rows.size > 50, class_id
    return rows.mean(), cols.mean(), box[3] / 2, box[2] / 2


def test_radiological_orientation():
    labels = marker_labels(SHAPE)
    pixels = decode(render_preview(labels, None, AFFINE, CATALOG, modality=None))
    layout = boxes(SHAPE, AFFINE)
    # axial: patient's right on the image's left, anterior at the top
    row, col, mid_row, mid_col = centre_of(pixels, layout["axial"], SPLEEN)
    assert col < mid_col / 3
    row, col, mid_row, mid_col = centre_of(pixels, layout["axial"], RIGHT_KIDNEY)
    assert row < mid_row / 3
    # coronal: right on the left, superior at the top
    row, col, mid_row, mid_col = centre_of(pixels, layout["coronal"], SPLEEN)
    assert col < mid_col / 3
    row, col, mid_row, mid_col = centre_of(pixels, layout["coronal"], LEFT_KIDNEY)
    assert row < mid_row / 3
    # sagittal: anterior on the left, superior at the top
    row, col, mid_row, mid_col = centre_of(pixels, layout["sagittal"], RIGHT_KIDNEY)
    assert col < mid_col / 3
    row, col, mid_row, mid_col = centre_of(pixels, layout["sagittal"], LEFT_KIDNEY)
    assert row < mid_row / 3


def test_panels_have_the_physical_aspect_ratio():
    layout = boxes(SHAPE, AFFINE)  # RAS extents: 180 x 160 x 180 mm
    axial, coronal, sagittal = layout["axial"], layout["coronal"], layout["sagittal"]
    assert axial[2] / axial[3] == pytest.approx(180 / 160, rel=0.02)
    assert coronal[2] / coronal[3] == pytest.approx(180 / 180, rel=0.02)
    assert sagittal[2] / sagittal[3] == pytest.approx(160 / 180, rel=0.02)
    assert max(coronal[3], sagittal[3]) == PANEL_HEIGHT


def stored_as(volume: np.ndarray, how: str) -> tuple[np.ndarray, np.ndarray]:
    """``volume`` (RAS-stored with :data:`AFFINE`) stored another way, and that storage's affine."""
    nx, ny, _ = volume.shape
    if how == "lps":  # voxel axes toward Left and Posterior: diag(-1, -1, 1) directions
        affine = np.diag([-SPACING[0], -SPACING[1], SPACING[2], 1.0])
        affine[:3, 3] = [(nx - 1) * SPACING[0], (ny - 1) * SPACING[1], 0.0]
        return volume[::-1, ::-1, :], affine
    if how == "zyx":  # axes permuted: voxel axis 0 runs S, 1 runs A, 2 runs R
        affine = np.zeros((4, 4))
        affine[0, 2], affine[1, 1], affine[2, 0], affine[3, 3] = SPACING[0], SPACING[1], SPACING[2], 1.0
        return np.ascontiguousarray(volume.transpose(2, 1, 0)), affine
    if how == "oblique":  # rotated 8 degrees about S: the closest axis orientation is still RAS
        angle = np.deg2rad(8.0)
        rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
        affine = np.eye(4)
        affine[:3, :3] = rotation @ np.diag(SPACING)
        return volume, affine
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["lps", "zyx", "oblique"])
def test_storage_does_not_change_the_picture(how):
    rng = np.random.default_rng(1)
    labels = marker_labels(SHAPE)
    labels[30:50, 30:45, 20:40] = LIVER
    intensities = rng.normal(100, 30, size=SHAPE).astype(np.float32)
    reference = decode(render_preview(labels, intensities, AFFINE, CATALOG, modality="MR"))
    stored_labels, affine = stored_as(labels, how)
    stored_intensities, _ = stored_as(intensities, how)
    picture = decode(render_preview(stored_labels, stored_intensities, affine, CATALOG, modality="MR"))
    assert picture.shape == reference.shape
    assert np.array_equal(picture, reference)


# --------------------------------------------------------------------------------------------------------
# Edge cases, legend, thumbnail
# --------------------------------------------------------------------------------------------------------


def test_empty_labels_still_give_a_preview():
    labels = np.zeros(SHAPE, dtype=np.uint8)
    for intensities, modality in ((None, None), (np.full(SHAPE, -1000, np.int16), "CT")):
        pixels = decode(render_preview(labels, intensities, AFFINE, CATALOG, modality=modality))
        assert pixels.shape[0] == PANEL_HEIGHT
        assert pixels.max() == 0  # nothing labelled, air (or no intensities) is black, empty legend


def test_empty_labels_slice_through_the_body():
    """Nothing labelled: the slices pass through the body's centre (CT voxels above -500 HU)."""
    intensities = np.full(SHAPE, -1000, dtype=np.int16)
    intensities[60:80, 10:30, 5:20] = 40  # off-centre body
    pixels = decode(render_preview(np.zeros(SHAPE, np.uint8), intensities, AFFINE, CATALOG, modality="CT"))
    for name, box in boxes(SHAPE, AFFINE).items():
        assert panel(pixels, box).max() > 100, name  # each panel cuts the body


def test_legend_ranks_the_largest_and_uses_largest_when_given():
    ranked = [(class_id, 1000 + class_id) for class_id in range(1, 30)] + [(0, 10**9), (31, 0)]
    entries = legend_entries(CATALOG, ranked)
    assert len(entries) == LEGEND_ENTRIES
    assert [class_id for class_id, _ in entries] == list(range(29, 29 - LEGEND_ENTRIES, -1))
    assert entries[0] == (29, CATALOG.name(29))
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[25:65, 20:60, 15:45] = LIVER
    default = render_preview(labels, None, AFFINE, CATALOG, modality=None)
    more = render_preview(labels, None, AFFINE, CATALOG, modality=None, largest=[(1, 10), (3, 5), (200, 1)])
    legend_x = boxes(SHAPE, AFFINE)["sagittal"][0] + boxes(SHAPE, AFFINE)["sagittal"][2]
    assert np.array_equal(decode(default)[:, :legend_x], decode(more)[:, :legend_x])  # same panels
    spleen_swatch = where_colour(decode(more)[:, legend_x:], np.asarray(label_colours(CATALOG, [3])[3]))
    assert spleen_swatch[0].size >= 100  # the 14 x 14 swatch of a class named only through ``largest``
    assert where_colour(decode(default)[:, legend_x:], np.asarray(label_colours(CATALOG, [3])[3]))[0].size == 0


def test_thumbnail():
    labels = organ_labels(SHAPE)
    png = render_preview(labels, None, AFFINE, CATALOG, modality=None)
    full = decode(png)
    small = thumbnail(png)
    with Image.open(io.BytesIO(small)) as image:
        assert image.height == THUMBNAIL_HEIGHT
        assert image.width == pytest.approx(full.shape[1] * THUMBNAIL_HEIGHT / full.shape[0], abs=1)
    assert len(small) < 20_000
    with Image.open(io.BytesIO(thumbnail(png, max_height=40))) as image:
        assert image.height == 40
    with Image.open(io.BytesIO(thumbnail(png, max_height=1000))) as image:
        assert image.size == (full.shape[1], full.shape[0])  # never enlarged


def test_bad_arguments():
    with pytest.raises(ValueError, match="3-D"):
        render_preview(np.zeros((4, 4), np.uint8), None, AFFINE, CATALOG, modality=None)
    with pytest.raises(ValueError, match="intensities"):
        render_preview(np.zeros(SHAPE, np.uint8), np.zeros((4, 4, 4)), AFFINE, CATALOG, modality=None)
    with pytest.raises(ValueError, match="4x4"):
        render_preview(np.zeros(SHAPE, np.uint8), None, np.eye(3), CATALOG, modality=None)


def test_missing_pillow_is_a_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)  # makes ``from PIL import ...`` raise ImportError
    with pytest.raises(ConfigError, match="Pillow") as raised:
        preview.render_preview(np.zeros(SHAPE, np.uint8), None, AFFINE, CATALOG, modality=None)
    assert "pip install" in (raised.value.hint or "")
