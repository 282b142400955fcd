"""Deterministic, diff-friendly JSON layout of a label catalog (``LabelCatalog.to_json``)."""

from __future__ import annotations

import json
from typing import Any

#: A short object (or one flat list) stays on one line when it fits this width.
_INLINE_WIDTH = 100


def _is_scalar(value: Any) -> bool:
    return not isinstance(value, (dict, list))


def _is_flat_list(value: Any) -> bool:
    """A list of scalars or of lists of scalars (ids, dataset names, [local, global] pairs)."""
    return isinstance(value, list) and all(
        _is_scalar(item) or (isinstance(item, list) and all(_is_scalar(sub) for sub in item)) for item in value
    )


def format_json(value: Any, depth: int = 0) -> str:
    """Indented JSON where id/name lists and short objects stay on one line."""
    compact = json.dumps(value, ensure_ascii=False)
    if not isinstance(value, (dict, list)) or _is_flat_list(value):
        return compact
    if isinstance(value, dict) and len(compact) + 2 * depth <= _INLINE_WIDTH:
        return compact
    pad = "  " * (depth + 1)
    if isinstance(value, dict):
        if not value:
            return "{}"
        rows = [f"{pad}{json.dumps(key)}: {format_json(item, depth + 1)}" for key, item in value.items()]
        return "{\n" + ",\n".join(rows) + "\n" + "  " * depth + "}"
    rows = [f"{pad}{format_json(item, depth + 1)}" for item in value]
    return "[\n" + ",\n".join(rows) + "\n" + "  " * depth + "]"
