"""Viewer colour tables for a finished mask: a 3D Slicer ``.ctbl`` and an ITK-SNAP label description.

Both tables give every class of the mask the colour the project's DICOM SEG writer gives it (the recommended
display colour of :func:`nvseg_ray.labels.codes.segment_coding`), so a mask looks the same in Slicer, ITK-SNAP,
a SEG viewer and the QC preview (:mod:`.preview`). :func:`label_colours` is the one place that colour is read.

File formats (text, ``\\n`` line ends, ASCII-safe when the catalog's names are):

* 3D Slicer colour table (Slicer developer guide, "Colors" module, "Color table file format (.txt, .ctbl)"):
  ``#`` header lines starting with ``# Color table file``, then one ``index name R G B A`` line per colour,
  integers 0-255, spaces in names replaced by ``_``. Background is ``0 background 0 0 0 0``.
* ITK-SNAP label description (the file ITK-SNAP's "Export label descriptions" writes): a ``#`` comment block
  headed ``ITK-SnAP Label Description File``, then ``IDX -R- -G- -B- -A-- VIS MSH "LABEL"`` lines, colour
  0-255, alpha a float 0..1, visibility and mesh flags 0/1, the label in double quotes. The first line is
  index 0 ``"Clear Label"`` with all values 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from nvseg_ray.labels.codes import segment_coding

if TYPE_CHECKING:
    from nvseg_ray.labels.catalog import LabelCatalog

#: File-name suffixes of the tables; the writer appends them to the mask's name without ``.nii.gz``.
COLOUR_TABLE_SUFFIXES: dict[str, str] = {"slicer": ".ctbl", "itksnap": ".itksnap.txt"}

#: Colour of background (class 0), which no viewer draws (alpha 0).
BACKGROUND_COLOUR: tuple[int, int, int] = (0, 0, 0)

#: Name Slicer's built-in label tables use for index 0 (lower-case like the catalog's names).
SLICER_BACKGROUND_NAME = "background"

#: ITK-SNAP's own name of label 0 (it always exists there and cannot be drawn).
ITKSNAP_CLEAR_LABEL = "Clear Label"

_ITKSNAP_HEADER = (
    "################################################",
    "# ITK-SnAP Label Description File",
    "# File format: ",
    "# IDX   -R-  -G-  -B-  -A--  VIS MSH  LABEL",
    "# Fields: ",
    "#    IDX:   Zero-based index ",
    "#    -R-:   Red color component (0..255)",
    "#    -G-:   Green color component (0..255)",
    "#    -B-:   Blue color component (0..255)",
    "#    -A-:   Label transparency (0.00 .. 1.00)",
    "#    VIS:   Label visibility (0 or 1)",
    "#    IDX:   Label mesh visibility (0 or 1)",
    "#  LABEL:   Label description ",
    "################################################",
)


def label_colours(catalog: LabelCatalog, ids: Iterable[int]) -> dict[int, tuple[int, int, int]]:
    """Display colour of each class id: the DICOM SEG writer's recommended colour.

    Args:
        catalog: the label catalog the ids belong to (``LabelCatalog.default()`` or a loaded one).
        ids: global class ids (any order, duplicates allowed); 0 maps to :data:`BACKGROUND_COLOUR`.

    Returns:
        ``{class_id: (r, g, b)}`` sRGB 0-255 ints, ascending ids.

    Raises:
        PromptError: an id is outside the model's label space (0..511).
    """
    colours: dict[int, tuple[int, int, int]] = {}
    for class_id in sorted({int(i) for i in ids}):
        if class_id == 0:
            colours[0] = BACKGROUND_COLOUR
        else:
            red, green, blue = segment_coding(catalog, class_id).color
            colours[class_id] = (int(red), int(green), int(blue))
    return colours


def _table_ids(ids: Iterable[int]) -> list[int]:
    """The mask's class ids with background added: ascending, no duplicates, 0 first."""
    return sorted({0, *(int(i) for i in ids)})


def slicer_name(name: str) -> str:
    """A class name as a Slicer colour-table name: whitespace runs become ``_`` (the format splits on spaces)."""
    return "_".join(name.split()) or "unnamed"


def slicer_color_table(catalog: LabelCatalog, ids: Sequence[int]) -> str:
    """The 3D Slicer colour table (``.ctbl``) text for a mask holding class ``ids``.

    Args:
        catalog: the catalog of the mask's ids (names and colours).
        ids: the mask's class ids; background (0) is added, the lines are ascending and unique.

    Returns:
        ``# Color table file`` header, ``# N values``, then ``index name R G B A`` lines, starting with
        ``0 background 0 0 0 0``; every other class has alpha 255.
    """
    table_ids = _table_ids(ids)
    colours = label_colours(catalog, table_ids)
    lines = ["# Color table file nvseg-ray", f"# {len(table_ids)} values"]
    for class_id in table_ids:
        if class_id == 0:
            lines.append(f"0 {SLICER_BACKGROUND_NAME} 0 0 0 0")
            continue
        red, green, blue = colours[class_id]
        lines.append(f"{class_id} {slicer_name(catalog.name(class_id))} {red} {green} {blue} 255")
    return "\n".join(lines) + "\n"


def itksnap_name(name: str) -> str:
    """A class name as an ITK-SNAP label: double quotes (the field delimiter) become single quotes."""
    return " ".join(name.replace('"', "'").split())


def itksnap_label_description(catalog: LabelCatalog, ids: Sequence[int]) -> str:
    """The ITK-SNAP label description file text for a mask holding class ``ids``.

    Args:
        catalog: the catalog of the mask's ids (names and colours).
        ids: the mask's class ids; background (0, ``"Clear Label"``) is added, lines ascending and unique.

    Returns:
        The comment block ITK-SNAP writes, then one ``IDX R G B A VIS MSH "LABEL"`` line per id: alpha 1,
        visible, shown in the mesh; index 0 is ``0 0 0 0 0 0 0 "Clear Label"``.
    """
    table_ids = _table_ids(ids)
    colours = label_colours(catalog, table_ids)
    lines = list(_ITKSNAP_HEADER)
    for class_id in table_ids:
        if class_id == 0:
            lines.append(f'{0:5d} {0:5d} {0:4d} {0:4d} {0:8g} {0:2d} {0:2d}    "{ITKSNAP_CLEAR_LABEL}"')
            continue
        red, green, blue = colours[class_id]
        name = itksnap_name(catalog.name(class_id))
        lines.append(f'{class_id:5d} {red:5d} {green:4d} {blue:4d} {1:8g} {1:2d} {1:2d}    "{name}"')
    return "\n".join(lines) + "\n"
