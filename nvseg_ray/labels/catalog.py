"""The label catalog: class ids, names, everything-sets, and the rules that turn prompts into class ids.

:class:`LabelCatalog` is built from the packaged catalog (:mod:`.schema` format), a project catalog file, or an
upstream bundle's label files (:mod:`.bundle`); every lookup is driven by the loaded data.
"""

from __future__ import annotations

import difflib
import functools
import json
import numbers
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

from nvseg_ray.errors import ConfigError, PromptError

from .bundle import UPSTREAM_FILES, detect_kind, find_upstream_folder, parse_upstream
from .codes import SegmentCoding
from .parsing import INT_TEXT, dedupe, normalize_modality, normalize_name, parse_class_token, strip_deprecated_marker
from .printing import format_json
from .schema import CATALOG_FORMAT, LabelClass, parse_project, read_json

#: The everything-segmentation modes, i.e. the keys of :attr:`LabelCatalog.everything`.
MODALITIES: tuple[str, ...] = ("CT_BODY", "MRI_BODY", "MRI_BRAIN")

#: Highest class id the point head accepts. Upstream's evaluator accepts label prompts < 512; ids
#: above the trained classes are "zero-shot" classes that only the point head can segment.
MAX_POINT_PROMPT_ID = 511

_PACKAGED_RESOURCE = "label_catalog.json"
_SEARCH_HINT = "run `nvseg labels --search WORD` to look up class names and ids"


@dataclass(frozen=True)
class LabelCatalog:
    """The label space of a model: classes, everything-sets, subclass groups, training mappings.

    Build one with :meth:`default`, :meth:`load`, :meth:`from_file`, :meth:`from_upstream_bundle`
    or :meth:`from_dict`. Instances are immutable (mappings are read-only views) and compare equal
    when their content is equal.

    Attributes:
        classes: class id -> :class:`LabelClass`, ascending ids.
        everything: everything-set name (``CT_BODY``, ``MRI_BODY``, ``MRI_BRAIN``) -> ordered ids.
        subclasses: group prompt id -> the ids it expands to.
        label_mappings: training dataset -> ``((local_label, global_label), ...)``.
        source: provenance (upstream bundle name/version and sha256 of the files it was built from).
    """

    classes: Mapping[int, LabelClass]
    everything: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    subclasses: Mapping[int, tuple[int, ...]] = field(default_factory=dict)
    label_mappings: Mapping[str, tuple[tuple[int, int], ...]] = field(default_factory=dict)
    source: Mapping[str, Any] = field(default_factory=dict)
    _name_index: Mapping[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        classes = {int(cid): self.classes[cid] for cid in sorted(self.classes)}
        everything = {key: tuple(int(i) for i in ids) for key, ids in self.everything.items()}
        subclasses = {int(k): tuple(int(i) for i in v) for k, v in sorted(self.subclasses.items())}
        mappings = {
            key: tuple((int(local), int(glob)) for local, glob in pairs)
            for key, pairs in sorted(self.label_mappings.items())
        }
        object.__setattr__(self, "classes", MappingProxyType(classes))
        object.__setattr__(self, "everything", MappingProxyType(everything))
        object.__setattr__(self, "subclasses", MappingProxyType(subclasses))
        object.__setattr__(self, "label_mappings", MappingProxyType(mappings))
        object.__setattr__(self, "source", MappingProxyType(json.loads(json.dumps(dict(self.source)))))
        self._check_consistency()
        object.__setattr__(self, "_name_index", MappingProxyType(self._build_name_index()))

    def __repr__(self) -> str:
        sets = ", ".join(f"{key}: {len(ids)}" for key, ids in self.everything.items())
        return f"LabelCatalog({len(self.classes)} classes, everything={{{sets}}})"

    # ---------------------------------------------------------------- construction checks

    def _check_consistency(self) -> None:
        """Every id referenced by an everything-set or a subclass group must be a known class."""
        for cid, label in self.classes.items():
            if not isinstance(label, LabelClass) or label.id != cid:
                raise ConfigError(f"label catalog: class entry for id {cid} does not carry id {cid}")
            if cid < 1:
                raise ConfigError(f"label catalog: class id {cid} is invalid; ids start at 1 (0 is background)")
        for key, ids in self.everything.items():
            self._check_known(ids, f"everything-set {key!r}")
        for parent, children in self.subclasses.items():
            self._check_known((parent, *children), f"subclass group {parent}")

    def _check_known(self, ids: Iterable[int], where: str) -> None:
        missing = sorted(set(ids) - set(self.classes))
        if missing:
            raise ConfigError(
                f"label catalog: {where} refers to unknown class ids {missing}",
                hint="every id in an everything-set or subclass group must be listed under 'classes'",
            )

    def _build_name_index(self) -> dict[str, int]:
        """Normalized name -> id, plus aliases without the ``(deprecated)`` suffix."""
        index: dict[str, int] = {}
        for cid, label in self.classes.items():
            key = normalize_name(label.name)
            if not key:
                raise ConfigError(f"label catalog: class {cid} has an empty name")
            if key in index:
                raise ConfigError(
                    f"label catalog: classes {index[key]} and {cid} have the same name {label.name!r}",
                    hint="class names must be unique (ignoring case, '_', '-' and extra spaces)",
                )
            index[key] = cid
        for cid, label in self.classes.items():
            alias = normalize_name(strip_deprecated_marker(label.name))
            index.setdefault(alias, cid)
        return index

    # ---------------------------------------------------------------- constructors

    @classmethod
    @functools.cache
    def default(cls) -> LabelCatalog:
        """The packaged catalog of the released NV-Segment-CTMR model (loaded once, cached)."""
        resource = resources.files("nvseg_ray").joinpath("resources", _PACKAGED_RESOURCE)
        try:
            text = resource.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"packaged label catalog nvseg_ray/resources/{_PACKAGED_RESOURCE} is missing: {exc}",
                hint="regenerate it with `python scripts/build_label_catalog.py`",
            ) from exc
        return cls._from_project_data(json.loads(text), origin=f"packaged {_PACKAGED_RESOURCE}")

    @classmethod
    def from_file(cls, path: str | Path) -> LabelCatalog:
        """Read a project-format catalog file (``nvseg-label-catalog/1``)."""
        path = Path(path)
        data, _ = read_json(path)
        return cls._from_project_data(data, origin=str(path))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LabelCatalog:
        """Build a catalog from the project-format dict that :meth:`to_dict` returns."""
        return cls._from_project_data(data, origin="label catalog")

    @classmethod
    def from_upstream_bundle(cls, path: str | Path) -> LabelCatalog:
        """Read an upstream bundle's label files.

        Args:
            path: the bundle root, its ``configs/`` folder, or any folder holding ``label_dict.json``
                and/or ``metadata.json`` (either one is enough) and, optionally,
                ``label_mappings.json``.

        Names come from metadata ``channel_def`` (falling back to ``label_dict``); modality tags
        and training datasets from ``label_dict``. The MRI everything-sets come from
        ``label_mappings.json``, or, without it, from the key order of metadata
        ``everything_labels`` (identical on the released bundle). CT_BODY and the subclass
        groups come from :data:`CT_BODY_EXCLUDED` and :data:`SUBCLASSES`.
        """
        folder = find_upstream_folder(Path(path))
        files = {name: folder / name for name in UPSTREAM_FILES if (folder / name).is_file()}
        return cls._from_upstream_files(files, origin=str(folder))

    @classmethod
    def load(cls, path: str | Path | None) -> LabelCatalog:
        """Load whatever ``path`` points at.

        ``None`` -> :meth:`default`; a folder -> :meth:`from_upstream_bundle`; a ``.json`` file in
        project format -> :meth:`from_file`; an upstream ``label_dict.json`` or ``metadata.json``
        (any file name) -> read together with the upstream files next to it.
        """
        if path is None:
            return cls.default()
        path = Path(path)
        if path.is_dir():
            return cls.from_upstream_bundle(path)
        data, _ = read_json(path)
        kind = detect_kind(data)
        if kind == "project":
            return cls._from_project_data(data, origin=str(path))
        if kind is None:
            raise ConfigError(
                f"{path} is not a label catalog: expected a project catalog ({CATALOG_FORMAT}), "
                "an upstream label_dict.json or an upstream metadata.json",
                hint="pass an upstream bundle folder, or build a catalog with scripts/build_label_catalog.py",
            )
        files = {name: path.parent / name for name in UPSTREAM_FILES if (path.parent / name).is_file()}
        files[kind] = path
        return cls._from_upstream_files(files, origin=str(path))

    @classmethod
    def _from_project_data(cls, data: Any, *, origin: str) -> LabelCatalog:
        """Parse the project format, reporting problems as :class:`ConfigError` naming ``origin``."""
        try:
            return parse_project(cls, data)
        except ConfigError as exc:
            raise ConfigError(f"{origin}: {exc.message}", hint=exc.hint) from exc

    @classmethod
    def _from_upstream_files(cls, files: Mapping[str, Path], *, origin: str) -> LabelCatalog:
        """Parse upstream label files (keys: the upstream file names), naming ``origin`` on error."""
        loaded = {name: read_json(path) for name, path in files.items()}
        data = {name: content for name, (content, _) in loaded.items()}
        digests = {name: digest for name, (_, digest) in loaded.items()}
        try:
            return parse_upstream(cls, data, digests)
        except ConfigError as exc:
            raise ConfigError(f"{origin}: {exc.message}", hint=exc.hint) from exc

    # ---------------------------------------------------------------- lookups

    @property
    def deprecated_ids(self) -> tuple[int, ...]:
        """Ids of deprecated classes; class prompts for them are refused."""
        return tuple(cid for cid, label in self.classes.items() if label.deprecated)

    def name(self, class_id: int) -> str:
        """Display name of ``class_id``; ``"background"`` for 0, ``"zero-shot class N"`` for unknown N < 512."""
        if class_id in self.classes:
            return self.classes[class_id].name
        if class_id == 0:
            return "background"
        if 0 < class_id <= MAX_POINT_PROMPT_ID:
            return f"zero-shot class {class_id}"
        raise PromptError(
            f"class id {class_id} is outside the model's label space (0..{MAX_POINT_PROMPT_ID})",
            hint=_SEARCH_HINT,
            prompt=class_id,
        )

    def resolve(self, prompt: int | str) -> int:
        """Turn one prompt into a class id, without checking that the id may be prompted.

        Accepts an int, a numeric string, or a class name (case-insensitive; ``_``, ``-`` and extra
        spaces are ignored; a deprecated class also matches without its ``(deprecated)`` suffix).
        Unknown names raise :class:`PromptError` with up to three "did you mean" suggestions.
        """
        if isinstance(prompt, numbers.Integral) and not isinstance(prompt, bool):
            return int(prompt)
        if not isinstance(prompt, str):
            raise PromptError(
                f"class prompt {prompt!r} must be a class id (integer) or a class name (string)",
                hint=_SEARCH_HINT,
                prompt=repr(prompt),
            )
        token = parse_class_token(prompt)
        if isinstance(token, int):
            return token
        found = self._name_index.get(normalize_name(token))
        if found is None:
            raise self._unknown_name_error(prompt)
        return found

    def suggest(self, text: str, limit: int = 3) -> list[LabelClass]:
        """Classes whose names are closest to ``text`` (difflib), best first; substring matches as fallback."""
        key = normalize_name(text)
        matches = difflib.get_close_matches(key, list(self._name_index), n=limit * 2, cutoff=0.6)
        ids = dedupe(self._name_index[m] for m in matches)
        if not ids and key:
            ids = dedupe(cid for name, cid in self._name_index.items() if key in name)
        return [self.classes[cid] for cid in ids[:limit]]

    def _unknown_name_error(self, prompt: str) -> PromptError:
        suggestions = self.suggest(prompt)
        message = f"unknown class name {prompt!r}"
        if suggestions:
            listed = ", ".join(f"{label.name!r} ({label.id})" for label in suggestions)
            message += f"; did you mean {listed}?"
        word = shlex.quote(prompt.strip()) if prompt.strip() else "WORD"
        return PromptError(
            message,
            hint=f"run `nvseg labels --search {word}` to look up class names and ids",
            prompt=prompt,
            suggestions=[label.id for label in suggestions],
        )

    def everything_ids(self, modality: str) -> tuple[int, ...]:
        """The ordered class ids of an everything-set (``CT_BODY``, ``MRI_BODY``, ``MRI_BRAIN``; any case)."""
        if isinstance(modality, str):
            wanted = normalize_modality(modality)
            for key, ids in self.everything.items():
                if normalize_modality(key) == wanted:
                    return ids
        valid = ", ".join(self.everything) or "none (this catalog defines no everything-sets)"
        raise PromptError(
            f"unknown modality {modality!r}; valid modalities: {valid}",
            hint="pass one of the listed modalities (e.g. --modality CT_BODY), or give explicit class prompts",
            modality=str(modality),
        )

    def search(self, text: str) -> list[LabelClass]:
        """Classes matching ``text``, ascending ids.

        A class matches when ``text`` is a case-insensitive substring of its name (``_``/``-``
        treated as spaces), equals its id, or equals (case-insensitive) one of its training
        dataset names (e.g. ``LUMIR``). Empty text matches everything.
        """
        key = normalize_name(text)
        raw = text.strip().lower()
        return [label for label in self.classes.values() if _matches(label, key, raw)]

    # ---------------------------------------------------------------- prompt resolution

    def resolve_prompts(
        self,
        prompts: Sequence[int | str] | None,
        *,
        modality: str | None = None,
        expand_subclasses: bool = True,
        with_points: bool = False,
    ) -> tuple[int, ...]:
        """Resolve user class prompts into the class ids sent to the network.

        Rules (upstream ``VistaPreTransformd`` + evaluator prompt checks):

        * No prompts (``None``/empty) and no points: the everything-set of ``modality``; a missing
          modality is a :class:`PromptError`. ``modality`` is only consulted in this case.
        * Class prompts without points: each prompt is resolved (:meth:`resolve`), must be a known
          class (1..345 for the released model) and must not be deprecated. Group ids (2 kidney,
          20 lung, 21 bone) are then expanded into their parts unless ``expand_subclasses`` is
          false (use that for finetuned models that reuse those ids), and repeats are dropped,
          keeping the first occurrence.
        * With points (``with_points=True``): exactly one class after resolution (repeats of the same
          class are fine); ids 1..511 are accepted (ids above the trained classes are zero-shot for
          the point head); deprecated classes are still refused; subclass expansion is not applied,
          so a group id (2/20/21) is refused unless ``expand_subclasses`` is false. No class prompt
          with points is refused too.

        Difference from upstream (docs/upstream.md, Inference: class prompts): upstream's no-points check
        refuses the deprecated ids {16, 129, 130, 131, 133, 137..145, 162} but accepts deprecated 155
        ("ascending aorta"), which has no training data. Here every class flagged deprecated (including 155)
        is refused.

        Returns:
            The ordered, de-duplicated class ids.

        Raises:
            PromptError: naming the offending prompt, the reason and how to fix it.
        """
        items = [prompts] if isinstance(prompts, (str, numbers.Integral)) else list(prompts or ())
        if not items:
            return self._no_class_prompts(modality, with_points)
        resolved = [(prompt, self.resolve(prompt)) for prompt in items]
        for prompt, cid in resolved:
            self._check_prompt(prompt, cid, with_points=with_points)
        if with_points:
            return self._single_point_class(resolved, expand_subclasses)
        ids = (cid for _, cid in resolved)
        if expand_subclasses:
            ids = (part for cid in ids for part in self.subclasses.get(cid, (cid,)))
        return dedupe(ids)

    def _no_class_prompts(self, modality: str | None, with_points: bool) -> tuple[int, ...]:
        if with_points:
            raise PromptError(
                "point prompts need exactly one class prompt, but none was given",
                hint="add one class id or name for the clicked object (e.g. a zero-shot id such as 400)",
            )
        if modality is None:
            raise PromptError(
                "no class prompts and no modality given, so there is no everything-set to segment",
                hint=f"pass a modality ({', '.join(self.everything) or ', '.join(MODALITIES)}) "
                "or at least one class prompt",
            )
        return self.everything_ids(modality)

    def _check_prompt(self, prompt: int | str, cid: int, *, with_points: bool) -> None:
        """Refuse ids that cannot be prompted; the message names ``prompt`` as the user gave it."""
        what = _describe(prompt, cid)
        if cid < 1:
            raise PromptError(
                f"{what} is not a class: class ids start at 1 (0 is background)",
                hint=_SEARCH_HINT,
                prompt=_jsonable(prompt),
            )
        if cid in self.classes and self.classes[cid].deprecated:
            name = self.classes[cid].name
            raise PromptError(
                f"{what} is the deprecated class {name!r}: it has no training data, so it cannot be prompted",
                hint="choose a current class instead; `nvseg labels` lists all classes and flags deprecated ones",
                prompt=_jsonable(prompt),
            )
        if with_points:
            if cid > MAX_POINT_PROMPT_ID:
                raise PromptError(
                    f"{what} is outside the point head's range 1..{MAX_POINT_PROMPT_ID}",
                    hint="use a known class id, or a zero-shot id up to 511",
                    prompt=_jsonable(prompt),
                )
        elif cid not in self.classes:
            raise PromptError(self._unknown_id_message(what, cid), hint=_SEARCH_HINT, prompt=_jsonable(prompt))

    def _unknown_id_message(self, what: str, cid: int) -> str:
        known = f"1..{max(self.classes)}" if self.classes else "none"
        message = f"{what} is not a class of this model (known class ids: {known})"
        if cid <= MAX_POINT_PROMPT_ID:
            message += "; ids up to 511 without a trained class are zero-shot and need point prompts"
        return message

    def _single_point_class(
        self, resolved: Sequence[tuple[int | str, int]], expand_subclasses: bool
    ) -> tuple[int, ...]:
        ids = dedupe(cid for _, cid in resolved)
        if len(ids) != 1:
            given = ", ".join(repr(prompt) for prompt, _ in resolved)
            raise PromptError(
                f"point prompts segment one object, but {len(ids)} classes were given ({given})",
                hint="give exactly one class prompt with points, or drop the points to segment several classes",
                prompt=[_jsonable(prompt) for prompt, _ in resolved],
            )
        cid = ids[0]
        if expand_subclasses and cid in self.subclasses:
            parts = ", ".join(str(part) for part in self.subclasses[cid])
            prompt = resolved[0][0]
            raise PromptError(
                f"{_describe(prompt, cid)} is the group {self.name(cid)!r} of classes {parts}, and groups "
                "are not expanded with point prompts",
                hint="prompt one of the member classes with the points, or drop the points",
                prompt=_jsonable(prompt),
            )
        return ids

    # ---------------------------------------------------------------- serialisation

    def with_codings(self, codings: Mapping[int, SegmentCoding | None]) -> LabelCatalog:
        """A copy whose classes carry these DICOM SEG codings (class id -> coding; read by :mod:`.codes`).

        Classes not in ``codings`` keep theirs; an id that is not a class is a :class:`ConfigError`.
        """
        unknown = sorted(set(codings) - set(self.classes))
        if unknown:
            raise ConfigError(f"label catalog: DICOM codings given for unknown class ids {unknown}")
        classes = {cid: replace(label, dicom=codings.get(cid, label.dicom)) for cid, label in self.classes.items()}
        return replace(self, classes=classes)

    def to_dict(self) -> dict[str, Any]:
        """The project-format dict (what ``scripts/build_label_catalog.py`` writes)."""
        ordered_sets = [key for key in MODALITIES if key in self.everything]
        ordered_sets += sorted(key for key in self.everything if key not in MODALITIES)
        return {
            "format": CATALOG_FORMAT,
            "source": json.loads(json.dumps(dict(self.source))),
            "classes": [label.to_dict(with_dicom=True) for label in self.classes.values()],
            "everything": {key: list(self.everything[key]) for key in ordered_sets},
            "subclasses": {str(parent): list(parts) for parent, parts in self.subclasses.items()},
            "label_mappings": {
                key: [[local, glob] for local, glob in pairs] for key, pairs in self.label_mappings.items()
            },
        }

    def to_json(self) -> str:
        """Deterministic, pretty-printed JSON text of :meth:`to_dict`, ending in a newline."""
        return format_json(self.to_dict()) + "\n"


# --------------------------------------------------------------------------------------------
# Prompt helpers
# --------------------------------------------------------------------------------------------


def _describe(prompt: int | str, cid: int) -> str:
    """How a refused prompt is named in messages: ``class id 16`` or ``class 'kidney mass' (id 129)``."""
    if isinstance(prompt, str) and not INT_TEXT.fullmatch(prompt.strip()):
        return f"class prompt {prompt!r} (id {cid})"
    return f"class id {cid}"


def _jsonable(prompt: Any) -> Any:
    """A prompt as it can go into error details."""
    return prompt if isinstance(prompt, (str, int)) else repr(prompt)


def _matches(label: LabelClass, key: str, raw: str) -> bool:
    """Search predicate of :meth:`LabelCatalog.search`."""
    if key in normalize_name(label.name) or raw == str(label.id):
        return True
    return any(raw == name.lower() for names in label.datasets.values() for name in names)
