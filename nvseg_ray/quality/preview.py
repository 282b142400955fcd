"""The preview image of a finished mask: one PNG of an axial, a coronal and a sagittal slice, labels overlaid.

The three slices pass through the centroid of the labelled voxels (the body's centre when nothing is
labelled) and are shown in the radiological display convention:

* axial: the patient's right on the image's left, anterior at the top;
* coronal: the patient's right on the image's left, superior at the top;
* sagittal: anterior on the left, superior at the top.

Geometry comes from the affine alone: :func:`nibabel.orientations.io_orientation` finds the closest RAS axis of
each voxel axis (oblique affines are shown in that closest orientation, not resampled), and only the three
slices are reoriented (:func:`nibabel.orientations.apply_orientation` on one-voxel-thick slabs, views of the
input). Panels are scaled to the physical aspect ratio (voxel spacing from the affine's column norms), one
mm-per-pixel scale for all three, nearest neighbour for labels and intensities alike.

The grey background is ``intensities`` windowed by modality (CT: soft-tissue window; MR / unknown: percentiles of
the shown slices); labels are alpha-blended in the catalog's colours (:func:`.colour_tables.label_colours`, the
DICOM SEG writer's colours); a legend strip on the right names the largest structures.

Only a strided sample of the volume is read (centroid, body centre, legend ranking) plus the three slices, so a
44 M-voxel mask renders in a few tens of milliseconds. Pillow is needed (imported when rendering).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from nibabel.orientations import apply_orientation, io_orientation

from nvseg_ray.errors import ConfigError

from .colour_tables import label_colours

if TYPE_CHECKING:
    from nvseg_ray.labels.catalog import LabelCatalog

#: Height of the panel row in pixels (and the most any panel gets): keeps the PNG to ~1000 x 320 pixels.
PANEL_HEIGHT = 320
#: Widest a single panel may be in pixels (a very wide field of view is scaled down to fit).
MAX_PANEL_WIDTH = 480
#: Gap between panels (background colour), pixels.
PANEL_GAP = 4
#: Width of the legend strip right of the panels, pixels.
LEGEND_WIDTH = 210
#: Structures named in the legend (the largest by voxel count).
LEGEND_ENTRIES = 12
#: Legend geometry: row height, swatch side and left margin, pixels.
LEGEND_ROW = 24
LEGEND_SWATCH = 14
LEGEND_MARGIN = 6
#: Canvas background (between panels, behind the legend) and legend text colour.
CANVAS_COLOUR = (0, 0, 0)
TEXT_COLOUR = (230, 230, 230)

#: Opacity of the label overlay: the anatomy stays readable under the colour, the colour stays recognisable.
OVERLAY_ALPHA = 0.45

#: CT soft-tissue window (HU): abdominal organs, vessels and muscle are separable (liver ~60, spleen ~50, fat
#: -100, kidney ~30 HU) while air and bone saturate; the usual radiology default for abdominal CT.
CT_WINDOW_WIDTH = 400.0
CT_WINDOW_LEVEL = 40.0
#: MR / unknown modality: window between these percentiles of the shown slices' voxels (robust to the few
#: very bright voxels (vessels, fat) and to the background air that dominates an MR field of view).
MR_LOW_PERCENTILE = 1.0
MR_HIGH_PERCENTILE = 99.0

#: At most this many voxels are read to find the centroid, the body and (without ``largest``) rank the legend.
SAMPLE_VOXELS = 2_000_000
#: Body threshold for the "nothing labelled" centre: CT voxels above this HU (soft tissue and denser, not air).
CT_BODY_HU = -500.0
#: Body threshold for other modalities: voxels above this fraction of the sample's 99th percentile.
BODY_FRACTION = 0.1

#: Default height of :func:`thumbnail`, pixels, and its palette size (the thumbnail need not be exact).
THUMBNAIL_HEIGHT = 96
THUMBNAIL_COLOURS = 64

#: RAS axis fixed by each panel, in display order: axial (S), coronal (A), sagittal (R).
PANEL_AXES: tuple[tuple[str, int], ...] = (("axial", 2), ("coronal", 1), ("sagittal", 0))


def _pil() -> tuple[Any, Any, Any]:
    """``(Image, ImageDraw, ImageFont)`` from Pillow, or a :class:`ConfigError` saying how to install it."""
    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError as exc:
        raise ConfigError(f"rendering the QC preview needs Pillow ({exc})", hint="pip install pillow") from None
    return Image, ImageDraw, ImageFont


# --------------------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------------------


def ras_spacing(affine: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """Voxel size in mm along R, A, S (float64 (3,)): the affine's column norms, permuted by ``ornt``."""
    sizes = np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))
    spacing = np.empty(3)
    spacing[ornt[:, 0].astype(int)] = sizes
    return spacing


def _sample_step(shape: Sequence[int]) -> int:
    """Stride per axis so that a ``[::s, ::s, ::s]`` sample has at most about :data:`SAMPLE_VOXELS` voxels."""
    return max(1, math.ceil((math.prod(shape) / SAMPLE_VOXELS) ** (1 / 3)))


def _centre(mask: np.ndarray, step: int, shape: Sequence[int]) -> np.ndarray | None:
    """Centroid (input voxel coordinates, float (3,)) of a sampled boolean mask; ``None`` when it is empty."""
    counts = [mask.sum(axis=axes, dtype=np.int64) for axes in ((1, 2), (0, 2), (0, 1))]
    total = counts[0].sum()
    if total == 0:
        return None
    centre = [float((c * np.arange(len(c))).sum() / total) * step for c in counts]
    return np.minimum(np.asarray(centre), np.asarray(shape) - 1)


def slice_centre(labels: np.ndarray, intensities: np.ndarray | None, *, modality: str | None) -> np.ndarray:
    """The point the three slices pass through, input voxel coordinates (float (3,)).

    The centroid of the labelled voxels; with nothing labelled the centroid of the body (CT: voxels above
    :data:`CT_BODY_HU`; otherwise above :data:`BODY_FRACTION` of the 99th percentile); else the grid's centre.
    Estimated on a strided sample (:data:`SAMPLE_VOXELS`).
    """
    step = _sample_step(labels.shape)
    sample = labels[::step, ::step, ::step]
    centre = _centre(sample != 0, step, labels.shape)
    if centre is None and intensities is not None:
        grey = intensities[::step, ::step, ::step]
        if _is_ct(modality):
            threshold = CT_BODY_HU
        else:
            threshold = BODY_FRACTION * float(np.percentile(grey, 99)) if grey.size else 0.0
        centre = _centre(grey > threshold, step, labels.shape)
    if centre is None:
        centre = (np.asarray(labels.shape, dtype=np.float64) - 1) / 2
    return centre


def oriented_slice(volume: np.ndarray, ornt: np.ndarray, ras_axis: int, centre: np.ndarray) -> np.ndarray:
    """The slice through ``centre`` normal to RAS axis ``ras_axis``, as a display image (rows, cols).

    Args:
        volume: (X, Y, Z) input-grid array (labels or intensities), any dtype.
        ornt: ``io_orientation(affine)`` of the input (closest RAS axis and direction of each voxel axis).
        ras_axis: 0 (sagittal slice, R fixed), 1 (coronal, A fixed) or 2 (axial, S fixed).
        centre: the point the slice passes through, input voxel coordinates.

    Returns:
        A 2-D view/copy in display order: row 0 is anterior (axial) or superior (coronal, sagittal); column 0 is
        the patient's right (axial, coronal) or anterior (sagittal).
    """
    axis = int(np.flatnonzero(ornt[:, 0] == ras_axis)[0])
    last = volume.shape[axis] - 1
    flipped = ornt[axis, 1] < 0
    # Round half up in RAS index space, so a volume stored flipped (e.g. LPS) shows the very same slice.
    ras_index = math.floor((last - float(centre[axis]) if flipped else float(centre[axis])) + 0.5)
    ras_index = min(max(ras_index, 0), last)
    index = last - ras_index if flipped else ras_index
    slab = volume[tuple(slice(index, index + 1) if a == axis else slice(None) for a in range(3))]
    ras = apply_orientation(slab, ornt)  # (R, A, S) with length 1 along ras_axis; indices grow toward R, A, S
    plane = np.take(ras, 0, axis=ras_axis)  # the two remaining RAS axes, in RAS order
    # Every panel: first remaining axis (R or A) -> columns from high to low; second (A or S) -> rows high to low.
    return plane[::-1, ::-1].T


def _panel_spacing(spacing: np.ndarray, ras_axis: int) -> tuple[float, float]:
    """(row, column) pixel size in mm of the panel normal to ``ras_axis``."""
    column_axis, row_axis = (a for a in range(3) if a != ras_axis)
    return float(spacing[row_axis]), float(spacing[column_axis])


def _resize_indices(size: int, out: int) -> np.ndarray:
    """Nearest-neighbour source index of each of ``out`` output pixels over ``size`` input pixels."""
    return np.minimum(((np.arange(out) + 0.5) * size / out).astype(np.intp), size - 1)


def panel_scale(shapes: Sequence[tuple[int, int]], spacings: Sequence[tuple[float, float]]) -> float:
    """Pixels per mm shared by all panels: the tallest fits :data:`PANEL_HEIGHT`, the widest
    :data:`MAX_PANEL_WIDTH`."""
    heights = [n * s for (n, _), (s, _) in zip(shapes, spacings)]
    widths = [n * s for (_, n), (_, s) in zip(shapes, spacings)]
    return min(PANEL_HEIGHT / max(max(heights), 1e-6), MAX_PANEL_WIDTH / max(max(widths), 1e-6))


def preview_layout(shape: Sequence[int], affine: np.ndarray) -> list[tuple[str, int, int, int, int]]:
    """Where each panel lies in the preview of an (X, Y, Z) ``shape`` grid with ``affine`` (voxel -> RAS mm).

    Returns:
        ``(name, left, top, width, height)`` in output pixels for ``"axial"``, ``"coronal"``, ``"sagittal"``,
        left to right; the legend strip starts :data:`PANEL_GAP` right of the last panel.
    """
    affine = np.asarray(affine, dtype=np.float64)
    ornt = io_orientation(affine)
    spacing = ras_spacing(affine, ornt)
    ras_shape = [0, 0, 0]
    for axis, size in enumerate(shape):
        ras_shape[int(ornt[axis, 0])] = int(size)
    plane_shapes, spacings = [], []
    for _, ras_axis in PANEL_AXES:
        column_axis, row_axis = (a for a in range(3) if a != ras_axis)
        plane_shapes.append((ras_shape[row_axis], ras_shape[column_axis]))
        spacings.append(_panel_spacing(spacing, ras_axis))
    scale = panel_scale(plane_shapes, spacings)
    sizes = [(max(1, round(rows * rs * scale)), max(1, round(cols * cs * scale)))
             for (rows, cols), (rs, cs) in zip(plane_shapes, spacings)]
    height = max(PANEL_HEIGHT, *(rows for rows, _ in sizes))
    boxes, left = [], 0
    for (name, _), (rows, cols) in zip(PANEL_AXES, sizes):
        boxes.append((name, left, (height - rows) // 2, cols, rows))
        left += cols + PANEL_GAP
    return boxes


def resize_nearest(plane: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """``plane`` (rows, cols) resized to ``rows`` x ``cols`` pixels with nearest neighbour (same dtype)."""
    return plane[_resize_indices(plane.shape[0], rows)[:, None], _resize_indices(plane.shape[1], cols)[None, :]]


# --------------------------------------------------------------------------------------------------------
# Pixels
# --------------------------------------------------------------------------------------------------------


def _is_ct(modality: str | None) -> bool:
    return modality is not None and modality.strip().upper().startswith("CT")


def window(modality: str | None, slices: Sequence[np.ndarray]) -> tuple[float, float]:
    """(low, high) intensity mapped to black / white: CT soft-tissue window, else percentiles of ``slices``."""
    if _is_ct(modality):
        return CT_WINDOW_LEVEL - CT_WINDOW_WIDTH / 2, CT_WINDOW_LEVEL + CT_WINDOW_WIDTH / 2
    voxels = np.concatenate([np.asarray(s, dtype=np.float32).ravel() for s in slices])
    voxels = voxels[np.isfinite(voxels)]
    if voxels.size == 0:
        return 0.0, 1.0
    low, high = (float(v) for v in np.percentile(voxels, [MR_LOW_PERCENTILE, MR_HIGH_PERCENTILE]))
    return low, (high if high > low else low + 1.0)


def grey_image(plane: np.ndarray, low: float, high: float) -> np.ndarray:
    """Intensities -> float32 grey 0..255 (rows, cols): ``low`` black, ``high`` white, clipped; NaN black."""
    grey = (np.asarray(plane, dtype=np.float32) - low) * (255.0 / (high - low))
    return np.nan_to_num(np.clip(grey, 0.0, 255.0), nan=0.0)


def blend(grey: np.ndarray, labels: np.ndarray, colours: dict[int, tuple[int, int, int]]) -> np.ndarray:
    """RGB uint8 (rows, cols, 3): grey everywhere, ``OVERLAY_ALPHA`` of the class colour where labelled.

    Pixel = round(alpha * colour + (1 - alpha) * grey) per channel where ``labels != 0``, else round(grey).
    """
    rgb = np.repeat(grey[..., None], 3, axis=2)
    ids = np.unique(labels)
    for class_id in ids[ids != 0]:
        where = labels == class_id
        colour = np.asarray(colours[int(class_id)], dtype=np.float32)
        rgb[where] = OVERLAY_ALPHA * colour + (1.0 - OVERLAY_ALPHA) * rgb[where]
    return np.rint(rgb).astype(np.uint8)


def legend_entries(catalog: LabelCatalog, ranked: Sequence[tuple[int, int]]) -> list[tuple[int, str]]:
    """``(class_id, name)`` of the :data:`LEGEND_ENTRIES` largest classes of ``ranked`` ((id, voxels) pairs)."""
    kept = sorted(((int(c), int(n)) for c, n in ranked if int(c) != 0 and int(n) > 0), key=lambda e: (-e[1], e[0]))
    return [(class_id, catalog.name(class_id)) for class_id, _ in kept[:LEGEND_ENTRIES]]


def count_classes(labels: np.ndarray) -> list[tuple[int, int]]:
    """(class_id, voxels) of the labelled classes, estimated on the strided sample (ranks the legend only)."""
    step = _sample_step(labels.shape)
    sample = np.asarray(labels[::step, ::step, ::step]).ravel()
    ids, counts = np.unique(sample[sample != 0], return_counts=True)
    return [(int(i), int(n) * step**3) for i, n in zip(ids, counts)]


def _fit(draw: Any, font: Any, text: str, width: int) -> str:
    """``text`` cut (with an ellipsis) to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def draw_legend(canvas: Any, x0: int, entries: Sequence[tuple[int, str]],
                colours: dict[int, tuple[int, int, int]]) -> None:
    """Colour swatches and names of ``entries`` in a column starting at pixel column ``x0`` of ``canvas``."""
    _, ImageDraw, ImageFont = _pil()
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    text_x = x0 + LEGEND_MARGIN + LEGEND_SWATCH + LEGEND_MARGIN
    text_width = canvas.width - text_x - LEGEND_MARGIN
    for row, (class_id, name) in enumerate(entries):
        top = LEGEND_MARGIN + row * LEGEND_ROW
        box = (x0 + LEGEND_MARGIN, top, x0 + LEGEND_MARGIN + LEGEND_SWATCH - 1, top + LEGEND_SWATCH - 1)
        draw.rectangle(box, fill=colours[class_id])
        draw.text((text_x, top), _fit(draw, font, f"{class_id} {name}", text_width), fill=TEXT_COLOUR, font=font)


def _png(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------


def render_preview(labels: np.ndarray, intensities: np.ndarray | None, affine: np.ndarray,
                   catalog: LabelCatalog, *, modality: str | None,
                   largest: Sequence[tuple[int, int]] | None = None) -> bytes:
    """The QC preview PNG of a mask: axial, coronal and sagittal panels and a legend (module docstring).

    Args:
        labels: (X, Y, Z) integer array of global class ids (0 = background) on the input voxel grid.
        intensities: the input's voxels, same shape, any numeric dtype, input units (HU for CT); ``None`` draws
            a black background.
        affine: 4x4 voxel -> RAS+ mm (nibabel convention: +x toward the patient's Right, +y Anterior,
            +z Superior). Oblique affines are shown in the closest axis orientation.
        catalog: names and colours of the ids (:func:`.colour_tables.label_colours`).
        modality: ``"CT..."`` selects the soft-tissue window; anything else (MR, ``None``) the percentile window.
        largest: ``(class_id, voxels)`` pairs ranking the legend (e.g. from the mask statistics); ``None``
            estimates the counts from a strided sample of ``labels``.

    Returns:
        PNG bytes, RGB, :data:`PANEL_HEIGHT` pixels tall.

    Raises:
        ValueError: ``labels`` is not 3-D, or ``intensities`` / ``affine`` has the wrong shape.
        ConfigError: Pillow is not installed.
        PromptError: a label id is outside the label space (0..511).
    """
    Image, _, _ = _pil()
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"labels must be a 3-D (X, Y, Z) array, got shape {labels.shape}")
    if intensities is not None and np.shape(intensities) != labels.shape:
        raise ValueError(f"intensities shape {np.shape(intensities)} differs from labels shape {labels.shape}")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got shape {affine.shape}")

    ornt = io_orientation(affine)
    centre = slice_centre(labels, intensities, modality=modality)
    label_planes = [oriented_slice(labels, ornt, axis, centre) for _, axis in PANEL_AXES]
    if intensities is None:
        greys = [np.zeros(p.shape, dtype=np.float32) for p in label_planes]
    else:
        planes = [oriented_slice(intensities, ornt, axis, centre) for _, axis in PANEL_AXES]
        low, high = window(modality, planes)
        greys = [grey_image(p, low, high) for p in planes]

    ranked = count_classes(labels) if largest is None else list(largest)
    entries = legend_entries(catalog, ranked)
    shown = set().union(*(np.unique(p).tolist() for p in label_planes)) | {c for c, _ in entries}
    colours = label_colours(catalog, shown)

    boxes = preview_layout(labels.shape, affine)
    height = max(top + rows for _, _, top, _, rows in boxes)
    width = boxes[-1][1] + boxes[-1][3] + PANEL_GAP + LEGEND_WIDTH
    canvas = np.empty((height, width, 3), dtype=np.uint8)
    canvas[:] = CANVAS_COLOUR
    for (_, left, top, cols, rows), lab, grey in zip(boxes, label_planes, greys):
        panel = blend(resize_nearest(grey, rows, cols), resize_nearest(lab, rows, cols), colours)
        canvas[top:top + rows, left:left + cols] = panel
    image = Image.fromarray(canvas)
    draw_legend(image, width - LEGEND_WIDTH, entries, colours)
    return _png(image)


def thumbnail(png: bytes, max_height: int = THUMBNAIL_HEIGHT) -> bytes:
    """A small PNG of ``png`` (a preview) for the run report: at most ``max_height`` pixels tall, aspect kept,
    :data:`THUMBNAIL_COLOURS`-colour palette (a few KB; its colours are approximate)."""
    Image, _, _ = _pil()
    if max_height < 1:
        raise ValueError(f"max_height must be >= 1, got {max_height}")
    with Image.open(io.BytesIO(png)) as source:
        image = source.convert("RGB")
    if image.height > max_height:
        width = max(1, round(image.width * max_height / image.height))
        image = image.resize((width, max_height), Image.Resampling.LANCZOS)
    return _png(image.quantize(colors=THUMBNAIL_COLOURS))
