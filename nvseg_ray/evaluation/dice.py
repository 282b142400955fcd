"""Dice per case and class, on the original voxel grid, and its per-class summary (no Ray here).

Every mapped class counts in the means, and a class absent from both prediction and truth of a case has an
undefined Dice (NaN, left out of the means); see :mod:`nvseg_ray.evaluation`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from ..engine import segment_volume
from ..errors import InputError
from ..labels import LabelCatalog
from ..model_runner import ModelRunner
from ..prompts import Prompts
from ..stages import VolumeStages
from ..training.datalist import DataItem, DataListError, global_ids, inspect_item, parse_label_mapping, relabel

CODE_MULTICHANNEL = "unsupported_multichannel"
#: columns of per_case.parquet / per_case.csv, in order.
CASE_COLUMNS = ("case_id", "class_id", "class_name", "dice", "pred_voxels", "true_voxels", "status",
                "error_code", "error_message", "image", "label", "fold")


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


def evaluate_case(stages: VolumeStages, runner: ModelRunner, item: DataItem, mapping: Any,
                  catalog: LabelCatalog) -> list[dict]:
    """Segment one case and score it against its relabelled ground truth on the original grid.

    Args:
        stages: the CPU stages (read, prepare, finish).
        runner: the model (its checkpoint is loaded on first use).
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
    problems, voxels = inspect_item(item, pairs, storage_options=stages.cfg.storage_options)
    if problems:
        raise DataListError(problems, source=item.case_id, case_id=item.case_id)
    assert voxels is not None
    truth = relabel(voxels, pairs)
    prompts = Prompts(class_ids=classes, requested=list(classes), modality=None)
    pred = np.asarray(segment_volume(item.image[0], stages, runner, prompts).labels)
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
