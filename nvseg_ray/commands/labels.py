"""``nvseg labels``: list, filter and search the model's label classes.

Examples::

    nvseg labels                         # all classes, ascending ids
    nvseg labels --modality MRI_BODY     # the MRI_BODY everything-set, in the order it is segmented
    nvseg labels --search kidney         # classes whose name contains "kidney"
    nvseg labels --json                  # machine-readable list of class objects
    nvseg labels --catalog path/to/bundle   # a finetuned bundle or another catalog file
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from nvseg_ray.labels import MODALITIES, LabelCatalog, LabelClass

_HEADERS = ("id", "name", "modalities", "deprecated")


def register(subparsers: Any) -> None:
    """Add the ``labels`` subcommand to an ``argparse`` subparsers object."""
    parser = subparsers.add_parser(
        "labels",
        help="list and search the label classes (ids, names, modalities)",
        description="List the model's label classes; filter by everything-set or by text.",
    )
    parser.add_argument(
        "--modality",
        metavar="MODALITY",
        help=f"only the everything-set of this modality ({', '.join(MODALITIES)}), in its segmentation order",
    )
    parser.add_argument(
        "--search",
        metavar="TEXT",
        help="case-insensitive filter: name substring, exact id or training-dataset name (e.g. LUMIR)",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON list of class objects instead of a table")
    parser.add_argument("--dicom-codes", action="store_true",
                        help="with --json: include each class's DICOM SEG coding (SNOMED CT category, type, "
                        "laterality, colour; docs/dicom-codes.md)")
    parser.add_argument(
        "--catalog",
        metavar="PATH",
        help="project catalog .json, upstream bundle folder, or its label_dict.json/metadata.json "
        "(default: the packaged catalog)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the selected classes; returns the exit status (0)."""
    catalog = LabelCatalog.load(getattr(args, "catalog", None))
    modality = getattr(args, "modality", None)
    search = getattr(args, "search", None)
    selected = select_classes(catalog, modality=modality, search=search)
    if getattr(args, "json", False):
        rows = [label.to_dict() for label in selected]
        if getattr(args, "dicom_codes", False):
            from ..labels.codes import segment_coding

            for row in rows:  # any catalog: its own coding, else the packaged class of that name, else generic
                if row["id"] != 0:
                    row["dicom"] = segment_coding(catalog, row["id"]).to_dict()
        print(json.dumps(rows, indent=2))
        return 0
    print(format_table(selected))
    print(count_line(catalog, selected, modality=modality, search=search))
    return 0


def select_classes(catalog: LabelCatalog, *, modality: str | None, search: str | None) -> list[LabelClass]:
    """Classes to show: an everything-set in its order (or all by id), filtered by ``search``."""
    if modality is not None:
        labels = [catalog.classes[cid] for cid in catalog.everything_ids(modality)]
    else:
        labels = list(catalog.classes.values())
    if search is not None:
        hits = {label.id for label in catalog.search(search)}
        labels = [label for label in labels if label.id in hits]
    return labels


def _row(label: LabelClass) -> tuple[str, str, str, str]:
    """Table cells of one class."""
    return (str(label.id), label.name, ",".join(label.modalities) or "-", "yes" if label.deprecated else "")


def format_table(labels: Sequence[LabelClass]) -> str:
    """Aligned text table, one row per class, with a header line."""
    rows = [_HEADERS, *(_row(label) for label in labels)]
    widths = [max(len(row[col]) for row in rows) for col in range(len(_HEADERS))]
    lines = []
    for row in rows:
        cells = [row[0].rjust(widths[0])] + [cell.ljust(width) for cell, width in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def count_line(
    catalog: LabelCatalog, labels: Sequence[LabelClass], *, modality: str | None, search: str | None
) -> str:
    """Trailing summary, e.g. ``345 classes (16 deprecated)`` or ``3 of 50 MRI_BODY classes match 'kidney'``."""
    deprecated = sum(label.deprecated for label in labels)
    suffix = f" ({deprecated} deprecated)" if deprecated else ""
    scope = "classes"
    total = len(catalog.classes)
    if modality is not None:
        scope = f"{modality.strip().upper()} everything-set classes"
        total = len(catalog.everything_ids(modality))
    if search is not None:
        return f"{len(labels)} of {total} {scope} match {search!r}{suffix}"
    return f"{len(labels)} {scope}{suffix}"
