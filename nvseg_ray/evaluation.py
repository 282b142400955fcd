"""Evaluation of a checkpoint on a labelled data list: Dice per case and class, on the ORIGINAL grid.

This is upstream ``evaluate.json`` (docs/upstream.md, Training and evaluation) on Ray: every case is segmented
by the engine (which already inverts the prediction back onto the input voxel grid, nearest-neighbour), its
ground truth is relabelled local -> global with the label mapping (default ``[[1, 3]]``, MSD spleen -> spleen), and the Dice
of every mapped global class is computed at the original spacing, exactly where upstream computes it.

Differences from upstream, on purpose:

* Every mapped class counts in the means. Upstream's ``MeanDice(include_background=False)`` on a K-class
  index map skips the last class (docs/upstream.md, Upstream bugs, item 11).
* A class absent from both prediction and truth of a case has an undefined Dice: it is reported as NaN
  (``null`` in JSON) and left out of the means, instead of counting as 1 or 0.
* Per-case failures (unreadable file, label off the image grid, ...) do not stop the run: the case is
  recorded with its error code and the job exits 3.

Outputs (``<output>/``): ``per_case.parquet`` and ``per_case.csv`` (one row per case and class),
``per_class.csv`` and ``summary.json``.
"""

from __future__ import annotations

import io
import json
import math
import time
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Callable, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .config import DEFAULT_DEVICE, DEFAULT_PATCH_SIZE, InferenceConfig, check_patch_size, validate_config
from .engine import Prompts, Segmenter
from .errors import EXIT_VOLUMES_FAILED, InputError, NvsegError
from .io import join_uri, write_bytes_atomic, write_json
from .labels import LabelCatalog
from .training.datalist import (
    DataItem,
    DataListError,
    global_ids,
    inspect_item,
    load_datalist,
    parse_label_mapping,
    relabel,
    split_folds,
)

__all__ = [
    "CASE_COLUMNS",
    "EvaluateConfig",
    "EvaluationResult",
    "dice",
    "evaluate_case",
    "format_summary",
    "run_evaluation",
    "select_items",
    "summarize",
]

#: default label mapping of upstream evaluate.json (MSD Task09 spleen 1 -> global 3).
DEFAULT_LABEL_MAPPING: list[tuple[int, int]] = [(1, 3)]
CODE_INTERNAL = "internal_error"
CODE_MULTICHANNEL = "unsupported_multichannel"
CODE_PIPELINE_ERROR = "pipeline_error"
#: columns of per_case.parquet / per_case.csv, in order.
CASE_COLUMNS = ("case_id", "class_id", "class_name", "dice", "pred_voxels", "true_voxels", "status",
                "error_code", "error_message", "image", "label", "fold")

Split = Literal["validation", "testing", "all"]


# --------------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------------


def dice(pred: np.ndarray, truth: np.ndarray, class_ids: Iterable[int]) -> dict[int, float]:
    """Dice coefficient per class between two label maps on the same voxel grid.

    Args:
        pred: predicted label map, any integer dtype, shape S (global ids).
        truth: ground-truth label map, same shape S (global ids).
        class_ids: the classes to score (0/background is scored only if listed).

    Returns:
        ``{class_id: 2|P∩T| / (|P| + |T|)}`` with P, T the voxel sets of the class. When the class is absent
        from both maps the Dice is undefined and reported as ``nan`` (callers exclude it from means).

    Raises:
        ValueError: the shapes differ.
    """
    pred = np.asarray(pred)
    truth = np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} != ground-truth shape {truth.shape}")
    out: dict[int, float] = {}
    for cid in class_ids:
        p = pred == cid
        t = truth == cid
        denom = int(p.sum()) + int(t.sum())
        out[int(cid)] = float("nan") if denom == 0 else 2.0 * int(np.logical_and(p, t).sum()) / denom
    return out


def evaluate_case(segmenter: Segmenter, item: DataItem, mapping: Any, catalog: LabelCatalog) -> list[dict]:
    """Segment one case and score it against its relabelled ground truth on the original grid.

    Args:
        segmenter: the engine (its checkpoint is loaded on first use).
        item: the case; one image channel (the engine reads one volume) and a label.
        mapping: ``[[local, global], ...]``; the mapped global ids are the prompts and the scored classes.
        catalog: for class names.

    Returns:
        One dict per mapped global class, in mapping order: ``case_id``, ``class_id``, ``class_name``,
        ``dice`` (float, NaN when the class is absent from both), ``pred_voxels``, ``true_voxels``.

    Raises:
        DataListError: the item's files fail :func:`~nvseg_ray.training.datalist.check_items`.
        NvsegError: reading/validating the image or inference failed (``code`` says why).
    """
    pairs = parse_label_mapping(mapping)
    classes = global_ids(pairs)
    if len(item.image) != 1:
        raise InputError(f"{item.case_id}: {len(item.image)} image channels; the engine segments one volume per "
                         "case", code=CODE_MULTICHANNEL,
                         hint="evaluate single-channel data lists (upstream input_channels 1)")
    problems, voxels = inspect_item(item, pairs, storage_options=segmenter.cfg.storage_options)
    if problems:
        raise DataListError(problems, source=item.case_id, case_id=item.case_id)
    assert voxels is not None
    truth = relabel(voxels, pairs)
    prompts = Prompts(class_ids=classes, requested=list(classes), modality=None)
    pred = np.asarray(segmenter.segment(item.image[0], prompts).labels)
    if pred.shape != truth.shape:  # the engine's grid is the image's, which check_items matched to the label
        raise DataListError([f"{item.case_id}: prediction shape {pred.shape} != label shape {truth.shape}"],
                            source=item.case_id)
    scores = dice(pred, truth, classes)
    return [{"case_id": item.case_id, "class_id": cid, "class_name": catalog.name(cid), "dice": scores[cid],
             "pred_voxels": int((pred == cid).sum()), "true_voxels": int((truth == cid).sum())} for cid in classes]


def _finite(values: Iterable[float]) -> list[float]:
    return [float(v) for v in values if v is not None and not math.isnan(float(v))]


def summarize(rows: Iterable[dict]) -> dict[str, Any]:
    """Aggregate per-case rows (as returned by :func:`evaluate_case`) into per-class and overall Dice.

    Rows with ``status == "failed"`` are counted as failed cases and otherwise ignored.

    Returns:
        ``{"classes": [{"class_id", "class_name", "mean_dice", "std_dice", "n_cases", "n_undefined"}],
        "mean_dice", "n_cases", "n_failed"}``. ``mean_dice`` of a class is the mean over cases where its Dice
        is defined (``n_cases``; ``n_undefined`` cases had it in neither map). The overall ``mean_dice`` is
        the mean of the per-class means over ALL classes (the last one included, unlike upstream:
        docs/upstream.md, Upstream bugs, item 11); a class that is undefined in every case has ``mean_dice`` NaN and cannot enter it. NaN stays NaN here
        (``summary.json`` writes ``null``).
    """
    per_class: dict[int, dict[str, Any]] = {}
    cases: set[str] = set()
    failed: set[str] = set()
    for row in rows:
        case = str(row["case_id"])
        if row.get("status", "ok") == "failed":
            failed.add(case)
            continue
        cases.add(case)
        entry = per_class.setdefault(int(row["class_id"]), {"class_name": row.get("class_name", ""), "values": []})
        entry["values"].append(row["dice"])
    classes = []
    for cid, entry in per_class.items():
        vals = _finite(entry["values"])
        classes.append({
            "class_id": cid, "class_name": entry["class_name"],
            "mean_dice": float(np.mean(vals)) if vals else float("nan"),
            "std_dice": float(np.std(vals)) if vals else float("nan"),
            "n_cases": len(vals), "n_undefined": len(entry["values"]) - len(vals),
        })
    means = _finite(c["mean_dice"] for c in classes)
    return {"classes": classes, "mean_dice": float(np.mean(means)) if means else float("nan"),
            "n_cases": len(cases), "n_failed": len(failed - cases)}


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as a small text table (one line per class, then the overall mean)."""
    def fmt(v: Any) -> str:
        return "   n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:6.4f}"

    lines = [f"{'class':>5}  {'name':<28} {'dice':>6}  {'std':>6}  cases  undefined"]
    for c in summary["classes"]:
        lines.append(f"{c['class_id']:>5}  {str(c['class_name'])[:28]:<28} {fmt(c['mean_dice'])}  "
                     f"{fmt(c['std_dice'])}  {c['n_cases']:>5}  {c['n_undefined']:>9}")
    lines.append(f"mean dice over {len(summary['classes'])} class(es): {fmt(summary['mean_dice']).strip()}   "
                 f"cases: {summary['n_cases']} ok, {summary['n_failed']} failed")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------


class EvaluateConfig(BaseModel):
    """What to evaluate, with which checkpoint, and where to write the tables."""

    model_config = ConfigDict(extra="forbid")

    datalist: str = Field(..., description="upstream data-list JSON (path or URI)")
    root: str | None = Field(None, description="dataset folder for relative paths; default: the data list's folder")
    checkpoint: str = Field(..., description="model.pt path or URI")
    output: str = Field(..., description="folder (or URI prefix) for per_case/per_class/summary files")
    label_mapping: list[tuple[int, int]] = Field(default_factory=lambda: list(DEFAULT_LABEL_MAPPING),
                                                 description="[[local, global], ...] (upstream label_mappings)")
    split: Split = Field("validation", description="'validation' = training items of fold `fold`; 'testing' = "
                         "testing items; 'all' = every training item plus labelled testing items")
    fold: int = Field(0, ge=0)
    patch_size: tuple[int, int, int] = DEFAULT_PATCH_SIZE
    device: str = DEFAULT_DEVICE
    max_actors: int = Field(1, ge=1, description="model actors (each loads the checkpoint once)")
    actor_cpus: float = Field(1.0, gt=0, description="CPUs reserved per model actor")
    label_catalog: str | None = None
    storage_options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("label_mapping", mode="before")
    @classmethod
    def _mapping(cls, v: Any) -> Any:
        try:
            return [list(p) for p in parse_label_mapping(v)]
        except NvsegError as exc:
            raise ValueError(exc.message) from None

    _check_patch = field_validator("patch_size")(lambda cls, v: check_patch_size(v))  # the engine's own rule

    @classmethod
    def from_options(cls, **options: Any) -> EvaluateConfig:
        """Validate options (``None`` values are dropped), raising one readable ConfigError."""
        return validate_config(cls, {k: v for k, v in options.items() if v is not None}, source="options")

    def inference_config(self) -> InferenceConfig:
        """The engine configuration: the mapped global ids as class prompts, no subclass expansion."""
        return InferenceConfig(checkpoint=self.checkpoint, classes=list(global_ids(self.label_mapping)),
                               expand_subclasses=False, patch_size=self.patch_size, device=self.device,
                               label_catalog=self.label_catalog, storage_options=self.storage_options)


def select_items(cfg: EvaluateConfig) -> list[DataItem]:
    """The labelled items of ``cfg.split`` (see :class:`EvaluateConfig`).

    Raises:
        DataListError: the data list is malformed, the selection is empty, or a selected item has no label.
    """
    data = load_datalist(cfg.datalist, cfg.root, cfg.storage_options)
    if cfg.split == "validation":
        _, items = split_folds(data.training, cfg.fold)
        if not items:
            folds = sorted({it.fold for it in data.training if it.fold is not None})
            raise DataListError([f"fold {cfg.fold} has no training items (folds present: {folds})"],
                                source=cfg.datalist)
    elif cfg.split == "testing":
        items = list(data.testing)
    else:
        items = list(data.training) + [it for it in data.testing if it.label is not None]
    if not items:
        raise DataListError([f"split {cfg.split!r} selects no items"], source=cfg.datalist)
    unlabelled = [it.case_id for it in items if it.label is None]
    if unlabelled:
        raise DataListError([f"{c}: no label (evaluation needs ground truth)" for c in unlabelled],
                            source=cfg.datalist, hint="upstream testing items carry no labels; evaluate a "
                            "validation fold (--split validation --fold K) or add 'label' entries")
    ids = [it.case_id for it in items]
    dupes = sorted({c for c in ids if ids.count(c) > 1})
    if dupes:
        raise DataListError([f"case id {c!r} (image file stem) occurs more than once" for c in dupes],
                            source=cfg.datalist)
    return items


# --------------------------------------------------------------------------------------------------------
# Ray Data pipeline
# --------------------------------------------------------------------------------------------------------


@dataclass
class EvaluationResult:
    """What :func:`run_evaluation` returns."""

    per_case: Any  # pandas.DataFrame with CASE_COLUMNS
    summary: dict[str, Any]
    exit_code: int


def _case_row(item: DataItem) -> dict[str, Any]:
    return {"case_id": item.case_id, "image": list(item.image), "label": item.label or "",
            "fold": -1 if item.fold is None else item.fold, "status": "pending", "error_code": "",
            "error_message": "", "results": "[]", "seconds": 0.0}


def _item_of(row: dict[str, Any]) -> DataItem:
    fold = int(row["fold"])
    return DataItem(image=tuple(str(p) for p in row["image"]), label=row["label"] or None,
                    fold=None if fold < 0 else fold, case_id=str(row["case_id"]))


def _fail(row: dict[str, Any], exc: BaseException) -> dict[str, Any]:
    row["status"] = "failed"
    if isinstance(exc, NvsegError):
        row["error_code"] = exc.code
        row["error_message"] = exc.message + (f" (hint: {exc.hint})" if exc.hint else "")
    else:
        while exc.__cause__ is not None:
            exc = exc.__cause__
        last = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
        where = f" at {last[0].filename.rsplit('/', 1)[-1]}:{last[0].lineno}" if last else ""
        row["error_code"] = CODE_INTERNAL
        row["error_message"] = f"{type(exc).__name__}: {exc}{where}"
    return row


class _EvalActor:
    """Ray Data actor: loads the checkpoint once, then evaluates one case per row (errors stay in the row)."""

    def __init__(self, cfg_json: str, threads: int) -> None:
        import torch

        torch.set_num_threads(max(1, threads))
        self.cfg = EvaluateConfig.model_validate_json(cfg_json)
        self.segmenter = Segmenter(self.cfg.inference_config())
        self.segmenter.model  # noqa: B018 - load the weights now, once per actor

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        row = dict(row)
        start = time.perf_counter()
        try:
            results = evaluate_case(self.segmenter, _item_of(row), self.cfg.label_mapping, self.segmenter.catalog)
            row["results"] = json.dumps(results)
            row["status"] = "ok"
        except Exception as exc:  # noqa: BLE001 - per-case isolation
            _fail(row, exc)
        row["seconds"] = time.perf_counter() - start
        return row


def _to_frame(done: Sequence[dict[str, Any]], classes: Sequence[int], catalog: LabelCatalog) -> Any:
    import pandas as pd

    records: list[dict[str, Any]] = []
    for row in done:
        base = {"status": row["status"], "error_code": row["error_code"], "error_message": row["error_message"],
                "image": ",".join(row["image"]), "label": row["label"], "fold": int(row["fold"])}
        if row["status"] == "ok":
            for res in json.loads(row["results"]):
                dice_value = res["dice"]
                records.append({**res, "dice": float("nan") if dice_value is None else float(dice_value), **base})
        else:  # one NaN row per class, so every case appears for every class
            for cid in classes:
                records.append({"case_id": row["case_id"], "class_id": cid, "class_name": catalog.name(cid),
                                "dice": float("nan"), "pred_voxels": None, "true_voxels": None, **base})
    frame = pd.DataFrame.from_records(records, columns=list(CASE_COLUMNS))
    frame = frame.astype({"class_id": "int64", "dice": "float64", "pred_voxels": "Int64", "true_voxels": "Int64",
                          "fold": "int64"})
    return frame.sort_values(["case_id", "class_id"], kind="stable").reset_index(drop=True)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _write_outputs(frame: Any, summary: dict[str, Any], cfg: EvaluateConfig) -> dict[str, str]:
    import pandas as pd

    uris = {name: join_uri(cfg.output, name) for name in ("per_case.parquet", "per_case.csv", "per_class.csv",
                                                          "summary.json")}
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    write_bytes_atomic(buf.getvalue(), uris["per_case.parquet"], cfg.storage_options)
    write_bytes_atomic(frame.to_csv(index=False).encode(), uris["per_case.csv"], cfg.storage_options)
    per_class = pd.DataFrame(summary["classes"], columns=["class_id", "class_name", "mean_dice", "std_dice",
                                                          "n_cases", "n_undefined"])
    write_bytes_atomic(per_class.to_csv(index=False).encode(), uris["per_class.csv"], cfg.storage_options)
    write_json(_jsonable(summary), uris["summary.json"], cfg.storage_options)
    return uris


def run_evaluation(cfg: EvaluateConfig, *, echo: Callable[[str], None] = print) -> EvaluationResult:
    """Evaluate ``cfg.checkpoint`` on the selected cases with Ray Data and write the tables to ``cfg.output``.

    One row per case flows through an actor pool (``max_actors`` actors, each loading the checkpoint once
    through :class:`~nvseg_ray.engine.Segmenter`); a failing case becomes a ``failed`` row with its error code.
    Uses the running Ray instance, or starts/joins one (:func:`nvseg_ray.batch.pipeline.ensure_ray`).

    Returns:
        The per-case frame, the summary (``summarize`` plus run metadata and the failures) and the exit
        status: 0, or :data:`~nvseg_ray.errors.EXIT_VOLUMES_FAILED` when some case failed.

    Raises:
        NvsegError: configuration, data-list, label-mapping or class problems (before any case runs).
    """
    import ray

    from .batch.pipeline import _forwarded_env, ensure_ray

    started = time.monotonic()
    items = select_items(cfg)
    inf_cfg = cfg.inference_config()
    catalog = LabelCatalog.load(inf_cfg.label_catalog)
    classes = global_ids(cfg.label_mapping)
    catalog.resolve_prompts(list(classes), modality=None, expand_subclasses=False)  # unknown/deprecated -> error
    echo(f"[nvseg-eval] {len(items)} case(s), classes {list(classes)}, split {cfg.split}"
         + (f" fold {cfg.fold}" if cfg.split == "validation" else ""))

    ensure_ray()
    ctx = ray.data.DataContext.get_current()
    if hasattr(ctx, "wait_for_min_actors_s"):
        ctx.wait_for_min_actors_s = 600
    env = _forwarded_env()
    rows = [_case_row(it) for it in items]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    ds = ds.map(_EvalActor, fn_constructor_kwargs={"cfg_json": cfg.model_dump_json(),
                                                   "threads": int(max(1, cfg.actor_cpus))},
                compute=ray.data.ActorPoolStrategy(min_size=1, max_size=min(cfg.max_actors, len(rows))),
                num_cpus=cfg.actor_cpus, runtime_env={"env_vars": env} if env else None)
    done: list[dict[str, Any]] = []
    try:
        for row in ds.iter_rows():
            done.append(dict(row))
    except Exception as exc:  # noqa: BLE001 - the pipeline broke: keep what finished, fail the rest
        message = exc.message if isinstance(exc, NvsegError) else f"{type(exc).__name__}: {str(exc)[:500]}"
        seen = {r["case_id"] for r in done}
        for row in rows:
            if row["case_id"] not in seen:
                row.update(status="failed", error_code=CODE_PIPELINE_ERROR,
                           error_message=f"not evaluated: the pipeline stopped: {message}")
                done.append(row)

    frame = _to_frame(done, classes, catalog)
    summary = summarize(frame.to_dict("records"))
    summary.update({
        "datalist": cfg.datalist, "checkpoint": cfg.checkpoint, "split": cfg.split,
        "fold": cfg.fold if cfg.split == "validation" else None,
        "label_mapping": [list(p) for p in cfg.label_mapping], "n_selected": len(items),
        "failed": [{"case_id": r["case_id"], "error_code": r["error_code"], "error_message": r["error_message"]}
                   for r in done if r["status"] == "failed"],
        "wall_s": round(time.monotonic() - started, 3),
    })
    summary["outputs"] = _write_outputs(frame, summary, cfg)
    echo(format_summary(summary))
    for fail in summary["failed"]:
        echo(f"[nvseg-eval] FAILED {fail['case_id']}: [{fail['error_code']}] {fail['error_message']}")
    return EvaluationResult(frame, summary, EXIT_VOLUMES_FAILED if summary["failed"] else 0)

