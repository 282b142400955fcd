"""Viewer colour tables (nvseg_ray.quality.colour_tables): parsed back, they give the catalog's names and the
DICOM SEG writer's colours for exactly the mask's ids, background first."""

from __future__ import annotations

import re

import pytest

from nvseg_ray.errors import PromptError
from nvseg_ray.labels import LabelCatalog
from nvseg_ray.labels.codes import segment_coding
from nvseg_ray.quality.colour_tables import (
    COLOUR_TABLE_SUFFIXES,
    itksnap_label_description,
    itksnap_name,
    label_colours,
    slicer_color_table,
    slicer_name,
)

CATALOG = LabelCatalog.default()

#: (ids as a mask may report them, the ids the table must hold)
ID_SETS = [
    ([1, 3, 5, 6, 14], [0, 1, 3, 5, 6, 14]),
    ([300, 2, 2, 0, 133], [0, 2, 133, 300]),  # unsorted, duplicate, background given, long/deprecated names
    ([511], [0, 511]),  # a zero-shot class (generic coding)
    ([], [0]),
]

_ITKSNAP_LINE = re.compile(r'^\s*(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+([0-9.]+)\s+([01])\s+([01])\s+"([^"]*)"\s*$')


def parse_slicer(text: str) -> list[tuple[int, str, tuple[int, int, int], int]]:
    """``(index, name, (r, g, b), alpha)`` per data line of a Slicer colour table."""
    rows = []
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        fields = line.split(" ")
        assert len(fields) == 6, line
        index, name, red, green, blue, alpha = fields
        rows.append((int(index), name, (int(red), int(green), int(blue)), int(alpha)))
    return rows


def parse_itksnap(text: str) -> list[tuple[int, tuple[int, int, int], float, int, int, str]]:
    """``(index, (r, g, b), alpha, visible, mesh, label)`` per data line of an ITK-SNAP label description."""
    rows = []
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        match = _ITKSNAP_LINE.match(line)
        assert match, line
        index, red, green, blue, alpha, visible, mesh, label = match.groups()
        rows.append((int(index), (int(red), int(green), int(blue)), float(alpha), int(visible), int(mesh), label))
    return rows


def test_label_colours_are_the_dicom_seg_colours():
    colours = label_colours(CATALOG, [14, 1, 0, 1])
    assert list(colours) == [0, 1, 14]
    assert colours[0] == (0, 0, 0)
    for class_id in (1, 14):
        assert colours[class_id] == tuple(segment_coding(CATALOG, class_id).color)
        assert all(isinstance(c, int) and 0 <= c <= 255 for c in colours[class_id])


@pytest.mark.parametrize(("ids", "expected"), ID_SETS)
def test_slicer_table_round_trip(ids, expected):
    text = slicer_color_table(CATALOG, ids)
    assert text.startswith("# Color table file")
    assert f"# {len(expected)} values" in text.splitlines()[1]
    rows = parse_slicer(text)
    assert [index for index, *_ in rows] == expected
    assert rows[0] == (0, "background", (0, 0, 0), 0)
    colours = label_colours(CATALOG, expected)
    for index, name, colour, alpha in rows[1:]:
        assert " " not in name
        assert name == CATALOG.name(index).replace(" ", "_")
        assert colour == colours[index]
        assert alpha == 255


@pytest.mark.parametrize(("ids", "expected"), ID_SETS)
def test_itksnap_description_round_trip(ids, expected):
    text = itksnap_label_description(CATALOG, ids)
    assert "# ITK-SnAP Label Description File" in text.splitlines()[1]
    assert "# IDX   -R-  -G-  -B-  -A--  VIS MSH  LABEL" in text
    rows = parse_itksnap(text)
    assert [index for index, *_ in rows] == expected
    assert rows[0] == (0, (0, 0, 0), 0.0, 0, 0, "Clear Label")
    colours = label_colours(CATALOG, expected)
    for index, colour, alpha, visible, mesh, label in rows[1:]:
        assert label == CATALOG.name(index)  # spaces kept, inside double quotes
        assert colour == colours[index]
        assert (alpha, visible, mesh) == (1.0, 1, 1)


def test_names_are_made_safe_for_each_format():
    assert slicer_name("left  kidney\tcortex") == "left_kidney_cortex"
    assert itksnap_name('the "big" one') == "the 'big' one"


def test_ids_outside_the_label_space_are_refused():
    with pytest.raises(PromptError):
        slicer_color_table(CATALOG, [1, 600])
    with pytest.raises(PromptError):
        itksnap_label_description(CATALOG, [600])


def test_suffixes():
    assert COLOUR_TABLE_SUFFIXES == {"slicer": ".ctbl", "itksnap": ".itksnap.txt"}
