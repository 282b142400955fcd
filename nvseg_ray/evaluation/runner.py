"""The Ray part of evaluation: one row per case through a Ray Data actor pool, then the tables.

Each model actor loads the checkpoint once; a failing case becomes a ``failed`` row with its error code, and a
broken pipeline fails the cases it left unfinished (``pipeline_error``). Ray is imported when a run starts.
"""

from __future__ import annotations

import io
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable

from ..boundary import describe_exception
from ..errors import EXIT_VOLUMES_FAILED, NvsegError
from ..io import join_uri, write_bytes_atomic, write_json
from ..labels import LabelCatalog
from ..model_runner import ModelRunner
from ..raytools import CODE_PIPELINE_ERROR, ensure_ray, forwarded_env, runtime_env, stopped_message
from ..stages import VolumeStages
from ..training.datalist import DataItem, global_ids
from .config import EvaluateConfig, select_items
from .dice import CASE_COLUMNS, evaluate_case, format_summary, summarize

CODE_INTERNAL = "internal_error"


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
        row["error_code"] = CODE_INTERNAL
        row["error_message"] = describe_exception(exc)
    return row


class _EvalActor:
    """Ray Data actor: loads the checkpoint once, then evaluates one case per row (errors stay in the row)."""

    def __init__(self, cfg_json: str, threads: int) -> None:
        import torch

        torch.set_num_threads(max(1, threads))
        self.cfg = EvaluateConfig.model_validate_json(cfg_json)
        inference = self.cfg.inference_config()
        self.stages = VolumeStages(inference)
        self.runner = ModelRunner(inference)
        self.runner.model  # noqa: B018 - load the weights now, once per actor

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        row = dict(row)
        start = time.perf_counter()
        try:
            results = evaluate_case(self.stages, self.runner, _item_of(row), self.cfg.label_mapping,
                                    self.stages.catalog)
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
    through :class:`~nvseg_ray.model_runner.ModelRunner`); a failing case becomes a ``failed`` row with its error code.
    Uses the running Ray instance, or starts/joins one (:func:`nvseg_ray.raytools.ensure_ray`).

    Returns:
        The per-case frame, the summary (``summarize`` plus run metadata and the failures) and the exit
        status: 0, or :data:`~nvseg_ray.errors.EXIT_VOLUMES_FAILED` when some case failed.

    Raises:
        NvsegError: configuration, data-list, label-mapping or class problems (before any case runs).
    """
    import ray

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
    env = forwarded_env()
    rows = [_case_row(it) for it in items]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    ds = ds.map(_EvalActor, fn_constructor_kwargs={"cfg_json": cfg.model_dump_json(),
                                                   "threads": int(max(1, cfg.actor_cpus))},
                compute=ray.data.ActorPoolStrategy(min_size=1, max_size=min(cfg.max_actors, len(rows))),
                num_cpus=cfg.actor_cpus, runtime_env=runtime_env(env))
    done: list[dict[str, Any]] = []
    try:
        for row in ds.iter_rows():
            done.append(dict(row))
    except Exception as exc:  # noqa: BLE001 - the pipeline broke: keep what finished, fail the rest
        message = stopped_message(exc, "evaluated")
        seen = {r["case_id"] for r in done}
        for row in rows:
            if row["case_id"] not in seen:
                row.update(status="failed", error_code=CODE_PIPELINE_ERROR, error_message=message)
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
