"""The driver of a finetuning run (:func:`run_training`).

Read and check the data list (every problem reported at once, before any worker starts) -> ``TorchTrainer``
running :func:`~.worker.train_loop_per_worker` (one DDP rank per worker, gloo on CPU / nccl on GPU) ->
export the last checkpoint's ``model.pt`` + ``model.pt.labels.json`` to ``cfg.output``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, TrainingError
from .checkpoint import LABELS_SUFFIX, MODEL_FILE, STATE_FILE, load_train_state
from .config import TrainConfig
from .tracking import ensure_experiment, resolve_tracking_uri
from .worker import FAULT_INJECTION_ENV, train_loop_per_worker


@dataclass
class TrainResult:
    """What a finished run produced."""

    run_name: str
    output: str
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    checkpoint_path: str | None = None
    seconds: float = 0.0


def _local_abs(path: str) -> str:
    """A relative local path made absolute (URIs unchanged): Ray Train workers run in another working
    directory."""
    return path if "://" in path else str(Path(path).expanduser().resolve())


def _item_dicts(items: list) -> list[dict[str, Any]]:
    return [{"image": [_local_abs(p) for p in it.image], "label": _local_abs(it.label), "case_id": it.case_id}
            for it in items]


def prepare_run(cfg: TrainConfig) -> tuple[list[dict], list[dict]]:
    """Read the data list, split the fold and check every file; raises one ``DataListError`` listing all
    problems. Returns ``(train_items, val_items)`` as transform-ready dicts."""
    from ..io import exists
    from .datalist import DataListError, check_items, load_datalist, split_folds

    datalist = load_datalist(cfg.datalist, root=cfg.root, storage_options=cfg.storage_options or None)
    train, val = split_folds(datalist.training, cfg.fold)
    if not train:
        raise DataListError([f"no training items: every item has fold {cfg.fold}"], source=cfg.datalist,
                            hint="choose another --fold, or add items of other folds")
    check_items(train + val, cfg.label_mapping, storage_options=cfg.storage_options or None,
                check_values=cfg.check_values)
    if not exists(cfg.checkpoint, cfg.storage_options or None):
        from ..errors import CheckpointError

        raise CheckpointError(f"pretrained checkpoint {cfg.checkpoint} does not exist",
                              hint="download it with `nvseg weights download --dest models/model.pt`")
    return _item_dicts(train), _item_dicts(val)


def run_training(cfg: TrainConfig) -> TrainResult:
    """Check the data, train on Ray, export the final ``model.pt`` (+ sidecar) to ``cfg.output``."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from ..io import write_bytes_atomic

    t0 = time.perf_counter()
    train_items, val_items = prepare_run(cfg)
    cfg = cfg.model_copy(update={"checkpoint": _local_abs(cfg.checkpoint)})  # workers have another cwd
    tracking_uri, artifact_location = resolve_tracking_uri(cfg.mlflow_tracking_uri)
    if tracking_uri:
        try:
            import mlflow  # noqa: F401
        except ImportError:
            raise ConfigError("MLflow tracking is configured but mlflow is not installed",
                              hint="pip install 'mlflow>=3', or pass --mlflow-tracking-uri '' to disable") from None
        ensure_experiment(tracking_uri, cfg.experiment_name, artifact_location)
    run_name = cfg.resolved_run_name()
    if not ray.is_initialized():
        ray.init(address=cfg.ray_address or os.environ.get("RAY_ADDRESS") or None, logging_level="WARNING")
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    if cfg.device == "cpu":
        use_gpu = False
    storage_path = _local_abs(cfg.storage_path)
    loop_config = {"train": cfg.model_dump(mode="json"), "train_items": train_items, "val_items": val_items,
                   "run_name": run_name, "tracking_uri": tracking_uri, "use_gpu": use_gpu}
    if os.environ.get(FAULT_INJECTION_ENV):  # tests only
        from ..io import join_uri

        loop_config["fault_inject"] = os.environ[FAULT_INJECTION_ENV]
        loop_config["fault_marker"] = join_uri(storage_path, run_name, ".nvseg_fault_injected")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name=run_name, storage_path=storage_path,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.num_to_keep)),
    )
    try:
        result = trainer.fit()
    except Exception as exc:  # TrainingFailedError / WorkerGroupError
        raise TrainingError(f"training run {run_name} failed: {type(exc).__name__}: "
                            f"{(str(exc).splitlines() or [''])[0][:500]}",
                            hint=f"re-run with --run-name {run_name} to resume from the last checkpoint") from exc
    if result.checkpoint is None:
        raise TrainingError(f"training run {run_name} finished without a checkpoint")
    with result.checkpoint.as_directory() as folder:
        state = load_train_state(Path(folder) / STATE_FILE)
        weights = (Path(folder) / MODEL_FILE).read_bytes()
        sidecar = (Path(folder) / (MODEL_FILE + LABELS_SUFFIX)).read_bytes()
    write_bytes_atomic(weights, cfg.output, cfg.storage_options or None)
    write_bytes_atomic(sidecar, cfg.output + LABELS_SUFFIX, cfg.storage_options or None)
    return TrainResult(run_name=run_name, output=cfg.output, metrics=dict(result.metrics or {}),
                       history=list(state.history), checkpoint_path=result.checkpoint.path,
                       seconds=time.perf_counter() - t0)
