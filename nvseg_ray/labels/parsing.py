"""Class prompts as typed text, and the lookup keys of class and everything-set names.

The one rule for a list of class prompts given as text, everywhere (``nvseg segment --classes``, ``nvseg batch
--classes``, a manifest's ``classes`` cell, the Serve app's multipart ``classes`` field):

* items are separated by ``,`` or ``;`` (``;`` lets a CSV manifest cell or a form field hold a list without
  quoting), surrounding whitespace is dropped, and empty items are skipped;
* an item of ASCII decimal digits (optionally signed: ``3``, ``+3``, ``-3``) is a class id; anything else is a
  class name, looked up by :meth:`nvseg_ray.labels.LabelCatalog.resolve` (a signed or out-of-range id and an
  unknown name are then refused there, as :class:`~nvseg_ray.errors.PromptError`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

#: A class id typed as text: ASCII decimal digits, optionally signed. ``str.isdigit`` is not the test: ``"²"``
#: passes it but ``int("²")`` raises, and ``\d`` would accept other scripts' digits.
INT_TEXT = re.compile(r"[+-]?[0-9]+")
#: Separators of a class list typed as text.
LIST_SEPARATORS = re.compile(r"[,;]")
_NAME_SEPARATORS = re.compile(r"[\s_\-]+")
_DEPRECATED_MARKER = "(deprecated)"


def parse_class_token(token: str) -> int | str:
    """One class prompt as typed (CLI flag, form field, manifest cell, JSON key): ``"3"`` -> 3, ``" liver "`` ->
    ``"liver"``.

    Only ASCII decimal digits (optionally signed, see :data:`INT_TEXT`) become an int; text that merely passes
    ``str.isdigit()`` but not ``int()`` (``"²"``, ``"3²"``) stays a name, which the catalog then refuses as an
    unknown class (:class:`~nvseg_ray.errors.PromptError`) instead of crashing.
    """
    text = token.strip()
    return int(text) if INT_TEXT.fullmatch(text) else text


def parse_class_list(text: str) -> list[int | str]:
    """``"liver, 3; spleen"`` -> ``["liver", 3, "spleen"]``: separators ``,`` and ``;``, empty items dropped,
    each item read by :func:`parse_class_token` (the module docstring states the rule)."""
    return [parse_class_token(t) for t in LIST_SEPARATORS.split(text) if t.strip()]


def normalize_name(text: str) -> str:
    """Lookup key for a class name: lower case, ``_``/``-``/runs of spaces become one space."""
    return _NAME_SEPARATORS.sub(" ", text.lower()).strip()


def normalize_modality(text: str) -> str:
    """Lookup key for an everything-set name: upper case with ``_`` separators."""
    return _NAME_SEPARATORS.sub("_", text.strip().upper())


def is_deprecated_name(name: str) -> bool:
    """Upstream marks retired classes by a ``(deprecated)`` suffix in the name."""
    return _DEPRECATED_MARKER in name.lower()


def strip_deprecated_marker(name: str) -> str:
    """``"kidney mass (deprecated)"`` -> ``"kidney mass"``."""
    return re.sub(r"\s*\(deprecated\)\s*", " ", name, flags=re.IGNORECASE).strip()


def dedupe(ids: Iterable[int]) -> tuple[int, ...]:
    """Drop repeated ids, keeping the first occurrence."""
    return tuple(dict.fromkeys(ids))
