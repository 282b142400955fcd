#!/usr/bin/env python
"""Generate ``nvseg_ray/resources/label_catalog.json`` from an upstream NV-Segment-CTMR bundle.

The upstream label files (``label_dict.json``, ``metadata.json``, ``label_mappings.json``) are not
part of this repository; this script turns them into the project's own catalog format. Parsing is
done by :meth:`nvseg_ray.labels.LabelCatalog.from_upstream_bundle`, so the packaged catalog and a
catalog loaded at run time from a bundle can never disagree.

Each class also gets its DICOM SEG coding (SNOMED CT category / type, laterality, region, colour) from the
reviewed table ``scripts/data/segment_codes.csv`` (see docs/dicom-codes.md); the table must have one row per
class, named as in the catalog.

Usage::

    python scripts/build_label_catalog.py                      # ../shared/reference/upstream-data
    python scripts/build_label_catalog.py --bundle-dir /path/to/NV-Segment-CTMR
    python scripts/build_label_catalog.py --check              # exit 1 if the committed file is stale
    python scripts/build_label_catalog.py --codes my_codes.csv # another code table
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLE_DIR = REPO_ROOT.parent / "shared" / "reference" / "upstream-data"
DEFAULT_OUTPUT = REPO_ROOT / "nvseg_ray" / "resources" / "label_catalog.json"
DEFAULT_CODES = REPO_ROOT / "scripts" / "data" / "segment_codes.csv"

if str(REPO_ROOT) not in sys.path:  # allow running without an installed package
    sys.path.insert(0, str(REPO_ROOT))

from nvseg_ray.errors import NvsegError  # noqa: E402
from nvseg_ray.labels import LabelCatalog  # noqa: E402
from nvseg_ray.labels.codes import read_code_table  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--bundle-dir",
        type=Path,
        default=DEFAULT_BUNDLE_DIR,
        help="upstream bundle root, its configs/ folder, or a folder with the label json files "
        f"(default: {DEFAULT_BUNDLE_DIR})",
    )
    parser.add_argument(
        "--output", type=Path, default=DEFAULT_OUTPUT, help=f"catalog file to write (default: {DEFAULT_OUTPUT})"
    )
    parser.add_argument(
        "--codes", type=Path, default=DEFAULT_CODES,
        help=f"DICOM SEG code table, one row per class (default: {DEFAULT_CODES})",
    )
    parser.add_argument(
        "--check", action="store_true", help="do not write; exit 1 if the output file differs from a fresh build"
    )
    return parser.parse_args(argv)


def summary(catalog: LabelCatalog) -> str:
    """One line describing what was built."""
    sets = ", ".join(f"{key} {len(ids)}" for key, ids in catalog.everything.items())
    codings = [label.dicom for label in catalog.classes.values() if label.dicom is not None]
    generic = sum(coding.generic for coding in codings)
    return (f"{len(catalog.classes)} classes, {len(catalog.deprecated_ids)} deprecated; everything-sets: {sets}; "
            f"DICOM codes: {len(codings) - generic} specific, {generic} generic")


def main(argv: list[str] | None = None) -> int:
    """Build (or check) the packaged catalog; returns the process exit status."""
    args = parse_args(argv)
    try:
        catalog = LabelCatalog.from_upstream_bundle(args.bundle_dir)
        catalog = catalog.with_codings(read_code_table(args.codes, catalog))
    except NvsegError as exc:
        print(exc, file=sys.stderr)
        return exc.exit_code
    text = catalog.to_json()
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.is_file() else None
        if current != text:
            print(f"{args.output} is out of date; rerun scripts/build_label_catalog.py", file=sys.stderr)
            return 1
        print(f"{args.output} is up to date ({summary(catalog)})")
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {args.output} ({summary(catalog)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
