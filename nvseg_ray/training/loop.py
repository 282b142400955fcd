"""Ray Train (V2) finetuning of VISTA3D: the per-worker loop and the driver that starts it.

Driver (:func:`run_training`): read and check the data list (every problem reported at once, before
any worker starts) -> ``TorchTrainer`` (one DDP rank per worker, gloo on CPU / nccl on GPU) ->
export the last checkpoint's ``model.pt`` + ``model.pt.labels.json`` to ``cfg.output``.

Worker (:func:`train_loop_per_worker`), per epoch:

* per sample of each batch, prompts from ``monai.apps.vista3d.sampler.sample_prompt_pairs``: class
  prompts for the mapped global ids present in the patch, background prompts for the absent ones, up to
  ``max_point`` positive/negative points per present class; label or point prompts dropped with
  ``drop_label_prob`` / ``drop_point_prob``. Loss: ``DiceCELoss`` (sigmoid, squared_pred) of every
  prompt's logits against ``label == prompt class``, averaged over prompts and samples. Samples of a
  batch are forwarded one by one (VISTA3D's heads take one patch); gradients are accumulated under
  ``no_sync`` and all-reduced once per optimiser step.
* validation every ``val_interval`` epochs (and the last): automatic branch, sliding window over each
  validation volume on the model grid, class prompts = mapped global ids, mask = logit > 0; per-class
  Dice summed on every rank over its share of the volumes and all-reduced.
* ``ray.train.report`` every epoch with a checkpoint from rank 0 (``model.pt`` plain state dict,
  ``model.pt.labels.json``, ``train_state.pt`` with optimizer/scheduler/scaler/epoch/best/history);
  ``ray.train.get_checkpoint()`` resumes (after a worker failure, or a re-run with the same run name).
* MLflow (rank 0 only): params, config artifact, per-epoch metrics, final model artifacts; one MLflow
  run per Ray run name (a resume continues the same MLflow run).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, NvsegError
from .config import TrainConfig

MODEL_FILE = "model.pt"
LABELS_SUFFIX = ".labels.json"
STATE_FILE = "train_state.pt"
MLFLOW_RUN_TAG = "nvseg.ray_run_name"
#: Tests only: ``"<rank>:<epoch>"`` makes that rank exit abruptly (``os._exit(1)``, like an OOM kill) at the
#: start of that epoch, once per run (a marker file in the run's storage folder keeps the restart alive).
#: Read by the driver and handed to the workers in ``train_loop_config`` (see :func:`_maybe_inject_fault`).
FAULT_INJECTION_ENV = "NVSEG_FAULT_INJECT_TRAIN_EXIT"


class TrainingError(NvsegError):
    """The training run failed (a worker raised, or retries were exhausted)."""

    code = "training_failed"
    exit_code = 6


# ------------------------------------------------------------------------------------------------------
# Pieces shared by the worker and the driver
# ------------------------------------------------------------------------------------------------------


def labels_sidecar(cfg: TrainConfig, *, epoch: int | None = None, metrics: dict[str, float] | None = None) -> dict:
    """Content of ``model.pt.labels.json``: what the finetuned checkpoint was trained to segment."""
    return {
        "label_mapping": [list(p) for p in cfg.label_mapping],
        "classes": list(cfg.global_ids),
        "expand_subclasses": cfg.expand_subclasses,
        "pretrained_checkpoint": cfg.checkpoint,
        "datalist": cfg.datalist,
        "fold": cfg.fold,
        "spacing": list(cfg.spacing),
        "patch_size": list(cfg.patch_size),
        "epoch": epoch,
        "metrics": metrics or {},
    }


def _local_abs(path: str) -> str:
    """A relative local path made absolute: Ray Train workers run in another working directory."""
    return path if "://" in path else str(Path(path).expanduser().resolve())


def _item_dicts(items: list) -> list[dict[str, Any]]:
    return [{"image": [_local_abs(p) for p in it.image], "label": _local_abs(it.label), "case_id": it.case_id}
            for it in items]


def dice_sums(logits: torch.Tensor, label: torch.Tensor, class_ids: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Per-class Dice of ``logits > 0`` against ``label == class`` for one volume.

    Args:
        logits: [n, H, W, D] float, one channel per entry of ``class_ids``.
        label: [H, W, D] integer global ids.

    Returns:
        ``(dice, valid)``: float64 [n] Dice values and [n] 1.0/0.0 flags; a class absent from both the
        prediction and the ground truth is not counted (valid 0), as MONAI's ``DiceMetric(ignore_empty)``.
    """
    dice = np.zeros(len(class_ids))
    valid = np.zeros(len(class_ids))
    for i, cid in enumerate(class_ids):
        pred = logits[i] > 0
        gt = label == cid
        denom = float(pred.sum() + gt.sum())
        if gt.any():
            dice[i] = 2.0 * float((pred & gt).sum()) / denom
            valid[i] = 1.0
    return dice, valid


def _all_reduce(values: np.ndarray) -> np.ndarray:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    t = torch.as_tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.cpu().numpy()


# ------------------------------------------------------------------------------------------------------
# MLflow (rank 0)
# ------------------------------------------------------------------------------------------------------


def resolve_tracking_uri(uri: str | None) -> tuple[str | None, str | None]:
    """Resolve ``mlflow_tracking_uri`` to ``(tracking_uri, artifact_location)``.

    A scheme-less value is a local folder (upstream's ``mlruns/``). MLflow 3 refuses its file store, so
    the folder holds an SQLite store ``mlflow.db`` and the artifacts under ``artifacts/`` (absolute, so
    Ray workers whose working directory differs write to the same place). URIs pass through unchanged
    (artifact location: the server's default). ``None``/empty disables tracking.
    """
    if not uri:
        return None, None
    if "://" in uri or uri.startswith(("sqlite:", "databricks")):
        return uri, None
    folder = Path(uri).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}", (folder / "artifacts").as_uri()


def ensure_experiment(tracking_uri: str, name: str, artifact_location: str | None) -> str:
    """Create the MLflow experiment once, in the driver (workers then only look it up)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location)


class _Tracker:
    """Thin MLflow wrapper: a no-op when disabled or on ranks > 0."""

    def __init__(self, cfg: TrainConfig, tracking_uri: str | None, run_name: str, enabled: bool) -> None:
        self.mlflow = None
        if not (enabled and tracking_uri):
            return
        import mlflow

        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_experiment(cfg.experiment_name)
        found = mlflow.search_runs(filter_string=f"tags.`{MLFLOW_RUN_TAG}` = '{run_name}'", output_format="list",
                                   max_results=1)
        if found:
            mlflow.start_run(run_id=found[0].info.run_id)
        else:
            mlflow.start_run(run_name=run_name, tags={MLFLOW_RUN_TAG: run_name})
            params = {k: json.dumps(v) if isinstance(v, (list, tuple, dict)) else v
                      for k, v in cfg.model_dump(mode="json").items() if k != "storage_options"}
            mlflow.log_params(params)
            mlflow.log_dict(cfg.model_dump(mode="json", exclude={"storage_options"}), "train_config.json")
        self.mlflow = mlflow

    def metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.mlflow is not None:
            self.mlflow.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)}, step=step)

    def artifacts(self, folder: str, subdir: str) -> None:
        if self.mlflow is not None:
            self.mlflow.log_artifacts(folder, subdir)

    def end(self, status: str = "FINISHED") -> None:
        if self.mlflow is not None:
            self.mlflow.end_run(status=status)
            self.mlflow = None


# ------------------------------------------------------------------------------------------------------
# The worker
# ------------------------------------------------------------------------------------------------------


def _device(cfg: TrainConfig, use_gpu: bool) -> torch.device:
    if use_gpu and cfg.device != "cpu":
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cpu")


def _validate(net: torch.nn.Module, loader: Any, cfg: TrainConfig, device: torch.device) -> dict[str, float]:
    """All-reduced per-class and mean Dice of the automatic branch over this rank's validation volumes."""
    from ..config import InferenceConfig
    from ..inference import class_embeddings, stitched_features

    icfg = InferenceConfig(patch_size=cfg.patch_size, overlap=cfg.val_overlap, amp=cfg.amp)
    ids = cfg.global_ids
    sums = np.zeros(2 * len(ids))
    net.eval()
    with torch.inference_mode():
        emb = class_embeddings(net, ids, device)  # [n, F]
        for batch in loader:
            for b in range(batch["image"].shape[0]):
                feats = stitched_features(net, batch["image"][b : b + 1].float(), icfg, device)  # [F, H, W, D]
                logits = torch.einsum("nf,fhwd->nhwd", emb, feats)
                dice, valid = dice_sums(logits.cpu(), batch["label"][b, 0].long(), ids)
                sums += np.concatenate([dice, valid])
    net.train()
    sums = _all_reduce(sums)
    dice_sum, count = sums[: len(ids)], sums[len(ids) :]
    out: dict[str, float] = {}
    per_class = []
    for cid, s, c in zip(ids, dice_sum, count):
        value = float(s / c) if c > 0 else float("nan")
        out[f"val_dice_{cid}"] = value
        per_class.append(value)
    finite = [v for v in per_class if math.isfinite(v)]
    out["val_mean_dice"] = float(np.mean(finite)) if finite else float("nan")
    return out


def _maybe_inject_fault(config: dict[str, Any], rank: int, epoch: int) -> None:
    """Tests only (:data:`FAULT_INJECTION_ENV`): kill this worker process at the chosen rank and epoch, once.

    Waits a few seconds first so Ray Train's controller (polling every 2 s) has collected the previous
    epoch's report: the restart then resumes deterministically from that checkpoint."""
    spec, marker = config.get("fault_inject"), config.get("fault_marker")
    if not spec or not marker or spec != f"{rank}:{epoch}":
        return
    from ..io import exists, write_bytes_atomic

    if exists(marker):
        return
    write_bytes_atomic(spec.encode(), marker)
    time.sleep(5.0)
    os._exit(1)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point. ``config``: ``{"train": TrainConfig dump, "train_items": [...], "val_items":
    [...], "run_name": str, "tracking_uri": str | None, "use_gpu": bool}``."""
    import ray.train
    import ray.train.torch
    from monai.apps.vista3d.sampler import sample_prompt_pairs
    from monai.data import CacheDataset, DataLoader
    from monai.losses import DiceCELoss
    from monai.optimizers import WarmupCosineSchedule
    from torch.utils.data.distributed import DistributedSampler

    from ..model import build_network, load_state_dict_from_uri, unwrap_state_dict
    from .transforms import build_train_transforms, build_val_transforms

    cfg = TrainConfig.model_validate(config["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = _device(cfg, bool(config.get("use_gpu")))
    use_amp = cfg.amp and device.type == "cuda"
    if cfg.seed is not None:
        import random

        random.seed(cfg.seed + rank)
        np.random.seed(cfg.seed + rank)
        torch.manual_seed(cfg.seed + rank)

    # -- model, optimiser, resume -------------------------------------------------------------------
    state_dict, _ = load_state_dict_from_uri(cfg.checkpoint, storage_options=cfg.storage_options)
    net = build_network(state_dict, source=cfg.checkpoint)
    del state_dict
    train_state: dict[str, Any] | None = None
    resume = ray.train.get_checkpoint()
    if resume is not None:
        with resume.as_directory() as folder:
            net.load_state_dict(unwrap_state_dict(torch.load(Path(folder) / MODEL_FILE, map_location="cpu",
                                                             weights_only=True)), strict=True)
            train_state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=False)
    net.train()
    model = ray.train.torch.prepare_model(net, move_to_device=device,
                                          parallel_strategy_kwargs={"find_unused_parameters": True})
    base: torch.nn.Module = model.module if hasattr(model, "module") else model
    optimizer = torch.optim.AdamW(base.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = (WarmupCosineSchedule(optimizer, warmup_steps=min(3, cfg.epochs), t_total=cfg.epochs,
                                      warmup_multiplier=0.1) if cfg.lr_schedule else None)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    start_epoch, best, best_epoch, history = 0, -1.0, -1, []
    if train_state is not None:
        optimizer.load_state_dict(train_state["optimizer"])
        if scheduler is not None and train_state.get("scheduler"):
            scheduler.load_state_dict(train_state["scheduler"])
        if train_state.get("scaler"):
            scaler.load_state_dict(train_state["scaler"])
        start_epoch = int(train_state["epoch"]) + 1
        best, best_epoch = float(train_state["best_metric"]), int(train_state["best_epoch"])
        history = list(train_state.get("history", []))

    # -- data -----------------------------------------------------------------------------------------
    train_tf = build_train_transforms(cfg)
    if cfg.seed is not None:
        train_tf.set_random_state(seed=cfg.seed + 1000 * rank + start_epoch)
    train_ds = CacheDataset(config["train_items"], train_tf, cache_rate=cfg.cache_rate, num_workers=None,
                            progress=False)
    train_dl = DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=True, num_workers=cfg.loader_workers,
                          persistent_workers=cfg.loader_workers > 0, drop_last=False)
    train_dl = ray.train.torch.prepare_data_loader(train_dl, move_to_device=False)
    val_items = list(config["val_items"])[rank::world]
    val_dl = DataLoader(CacheDataset(val_items, build_val_transforms(cfg), cache_rate=cfg.cache_rate,
                                     progress=False), batch_size=1, num_workers=0) if val_items else []

    loss_fn = DiceCELoss(sigmoid=True, include_background=True, squared_pred=True, smooth_nr=cfg.loss_smooth_nr,
                         smooth_dr=cfg.loss_smooth_dr, to_onehot_y=False)
    is_ddp = model is not base
    tracker = _Tracker(cfg, config.get("tracking_uri"), config["run_name"], enabled=rank == 0)
    last_metrics: dict[str, float] = dict(history[-1]) if history else {}
    try:
        for epoch in range(start_epoch, cfg.epochs):
            _maybe_inject_fault(config, rank, epoch)
            t0 = time.perf_counter()
            if isinstance(getattr(train_dl, "sampler", None), DistributedSampler):
                train_dl.sampler.set_epoch(epoch)
            loss_total, steps, prompts_total = 0.0, 0, 0
            for batch in train_dl:
                images = batch["image"].to(device).float()  # [B, C, *patch]
                labels = batch["label"].to(device).long()  # [B, 1, *patch] global ids
                n = images.shape[0]
                optimizer.zero_grad(set_to_none=True)
                step_loss = 0.0
                for i in range(n):
                    label_prompt, point, point_label, prompt_class = sample_prompt_pairs(
                        labels[i : i + 1], list(cfg.global_ids), max_prompt=None, max_foreprompt=None,
                        max_backprompt=None, max_point=cfg.max_point, include_background=False,
                        drop_label_prob=cfg.drop_label_prob, drop_point_prob=cfg.drop_point_prob)
                    if prompt_class is None:  # impossible with a non-empty label_set and no back-prompt cap
                        raise RuntimeError("prompt sampling returned no prompt")
                    sync = model.no_sync() if (is_ddp and i < n - 1) else contextlib.nullcontext()
                    with sync:
                        with torch.autocast("cuda", dtype=torch.float16, enabled=use_amp):
                            logits = model(input_images=images[i : i + 1], point_coords=point,
                                           point_labels=point_label, class_vector=label_prompt,
                                           prompt_class=prompt_class)  # [P, 1, *patch]
                        target = (labels[i : i + 1, 0] == prompt_class.view(-1, 1, 1, 1).to(device)).unsqueeze(1)
                        loss = loss_fn(logits.float(), target.float())
                        scaler.scale(loss / n).backward()
                    step_loss += float(loss.detach()) / n
                    prompts_total += int(prompt_class.shape[0])
                scaler.step(optimizer)
                scaler.update()
                loss_total += step_loss
                steps += 1
            if scheduler is not None:
                scheduler.step()
            reduced = _all_reduce(np.array([loss_total, steps]))
            metrics: dict[str, float] = {
                "epoch": float(epoch),
                "train_loss": float(reduced[0] / max(reduced[1], 1)),
                "lr": float(optimizer.param_groups[0]["lr"]),
                "steps": float(reduced[1]),
            }
            if val_dl is not None and config["val_items"] and (
                    (epoch + 1) % cfg.val_interval == 0 or epoch == cfg.epochs - 1):
                metrics.update(_validate(base, val_dl, cfg, device))
                if math.isfinite(metrics["val_mean_dice"]) and metrics["val_mean_dice"] > best:
                    best, best_epoch = metrics["val_mean_dice"], epoch
            metrics["best_metric"], metrics["best_epoch"] = float(best), float(best_epoch)
            metrics["epoch_time_s"] = time.perf_counter() - t0
            history.append(metrics)
            last_metrics = metrics
            tracker.metrics(metrics, step=epoch)
            state = {"epoch": epoch, "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict() if scheduler is not None else None,
                     "scaler": scaler.state_dict(), "best_metric": best, "best_epoch": best_epoch,
                     "history": history, "config": cfg.model_dump(mode="json")}
            _report(metrics, base.state_dict() if rank == 0 else None, state, cfg, rank, epoch)
        if start_epoch >= cfg.epochs and resume is not None:
            # nothing left to train (a re-run of a finished run): re-report the restored checkpoint.
            with resume.as_directory() as folder, tempfile.TemporaryDirectory() as tmp:
                ckpt = None
                if rank == 0:
                    shutil.copytree(folder, tmp, dirs_exist_ok=True)
                    ckpt = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report(last_metrics, checkpoint=ckpt)
        if rank == 0 and tracker.mlflow is not None:
            with tempfile.TemporaryDirectory() as tmp:
                torch.save(base.state_dict(), Path(tmp) / MODEL_FILE)
                (Path(tmp) / (MODEL_FILE + LABELS_SUFFIX)).write_text(
                    json.dumps(labels_sidecar(cfg, epoch=cfg.epochs - 1, metrics=last_metrics), indent=2))
                tracker.artifacts(tmp, "model")
        tracker.end()
    except BaseException:
        tracker.end("FAILED")
        raise


def _report(metrics: dict[str, float], weights: dict[str, torch.Tensor] | None, state: dict, cfg: TrainConfig,
            rank: int, epoch: int) -> None:
    """``ray.train.report`` on every rank; rank 0 attaches the checkpoint folder."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if rank == 0 and weights is not None:
            folder = Path(tmp)
            torch.save(weights, folder / MODEL_FILE)
            (folder / (MODEL_FILE + LABELS_SUFFIX)).write_text(
                json.dumps(labels_sidecar(cfg, epoch=epoch, metrics=metrics), indent=2))
            torch.save(state, folder / STATE_FILE)
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=ckpt)


# ------------------------------------------------------------------------------------------------------
# The driver
# ------------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What a finished run produced."""

    run_name: str
    output: str
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    checkpoint_path: str | None = None
    seconds: float = 0.0


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


def _storage_path(path: str) -> str:
    return path if "://" in path else str(Path(path).expanduser().resolve())


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
    loop_config = {"train": cfg.model_dump(mode="json"), "train_items": train_items, "val_items": val_items,
                   "run_name": run_name, "tracking_uri": tracking_uri, "use_gpu": use_gpu}
    if os.environ.get(FAULT_INJECTION_ENV):  # tests only
        from ..io import join_uri

        loop_config["fault_inject"] = os.environ[FAULT_INJECTION_ENV]
        loop_config["fault_marker"] = join_uri(_storage_path(cfg.storage_path), run_name, ".nvseg_fault_injected")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name=run_name, storage_path=_storage_path(cfg.storage_path),
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
        weights = (Path(folder) / MODEL_FILE).read_bytes()
        sidecar = (Path(folder) / (MODEL_FILE + LABELS_SUFFIX)).read_bytes()
        state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=False)
    write_bytes_atomic(weights, cfg.output, cfg.storage_options or None)
    write_bytes_atomic(sidecar, cfg.output + LABELS_SUFFIX, cfg.storage_options or None)
    return TrainResult(run_name=run_name, output=cfg.output, metrics=dict(result.metrics or {}),
                       history=list(state.get("history", [])), checkpoint_path=result.checkpoint.path,
                       seconds=time.perf_counter() - t0)
