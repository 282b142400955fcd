"""Ray Train (V2) worker of VISTA3D finetuning: :func:`train_loop_per_worker`, one DDP rank.

Steps: :func:`setup_worker` (rank, device, seeds) -> :func:`setup_model` (pretrained weights, or the
resumed checkpoint's with its :class:`~.checkpoint.TrainState`) -> :func:`setup_optimizer` (AdamW, optional
warmup-cosine schedule, AMP scaler, loss; restored on resume) -> :func:`setup_data` (cached datasets, this
rank's share) -> per epoch :func:`train_epoch`, validation, report. Per epoch:

* per sample of each batch, prompts from ``monai.apps.vista3d.sampler.sample_prompt_pairs``: class
  prompts for the mapped global ids present in the patch, background prompts for the absent ones, up to
  ``max_point`` positive/negative points per present class; label or point prompts dropped with
  ``drop_label_prob`` / ``drop_point_prob``. Loss: ``DiceCELoss`` (sigmoid, squared_pred) of every
  prompt's logits against ``label == prompt class``, averaged over prompts and samples. Samples of a
  batch are forwarded one by one (VISTA3D's heads take one patch); gradients are accumulated under
  ``no_sync`` and all-reduced once per optimiser step.
* validation every ``val_interval`` epochs (and the last): :func:`~.metrics.validate`.
* ``ray.train.report`` every epoch with a checkpoint from rank 0 (:mod:`.checkpoint`);
  ``ray.train.get_checkpoint()`` resumes (after a worker failure, or a re-run with the same run name).
* MLflow (rank 0 only, :mod:`.tracking`): per-epoch metrics, final model artifacts.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import (
    LABELS_SUFFIX,
    MODEL_FILE,
    STATE_FILE,
    TrainState,
    labels_sidecar,
    load_train_state,
    write_checkpoint,
)
from .config import DEFAULT_WARMUP_EPOCHS, DEFAULT_WARMUP_MULTIPLIER, TrainConfig
from .metrics import all_reduce, validate
from .tracking import Tracker

#: Tests only: ``"<rank>:<epoch>"`` makes that rank exit abruptly (``os._exit(1)``, like an OOM kill) at the
#: start of that epoch, once per run (a marker file in the run's storage folder keeps the restart alive).
#: Read by the driver and handed to the workers in ``train_loop_config`` (see :func:`_maybe_inject_fault`).
FAULT_INJECTION_ENV = "NVSEG_FAULT_INJECT_TRAIN_EXIT"


@dataclass
class WorkerContext:
    """This rank: the validated config, its place in the worker group and its device."""

    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    use_amp: bool  # fp16 autocast + GradScaler: cfg.amp on a CUDA device


@dataclass
class ModelParts:
    """The network twice: ``model`` runs forward/backward (the DDP wrapper with several workers), ``net`` is
    the unwrapped network (state dict, validation)."""

    model: torch.nn.Module
    net: torch.nn.Module

    @property
    def is_ddp(self) -> bool:
        return self.model is not self.net


@dataclass
class Optimisation:
    """What turns a loss into a weight update."""

    optimizer: torch.optim.Optimizer
    scheduler: Any | None  # monai WarmupCosineSchedule (per epoch) when cfg.lr_schedule
    scaler: torch.amp.GradScaler
    loss_fn: torch.nn.Module  # DiceCELoss(logits [P, 1, *patch], target [P, 1, *patch] 0/1)

    def restore(self, state: TrainState) -> None:
        if state.optimizer is not None:
            self.optimizer.load_state_dict(state.optimizer)
        if self.scheduler is not None and state.scheduler:
            self.scheduler.load_state_dict(state.scheduler)
        if state.scaler:
            self.scaler.load_state_dict(state.scaler)

    def snapshot(self, state: TrainState) -> None:
        """Copy the current optimizer/scheduler/scaler state dicts into ``state`` (before a checkpoint)."""
        state.optimizer = self.optimizer.state_dict()
        state.scheduler = self.scheduler.state_dict() if self.scheduler is not None else None
        state.scaler = self.scaler.state_dict()


@dataclass
class Data:
    """This rank's loaders. ``val`` holds only this rank's share of the validation volumes (maybe none);
    ``validates`` says whether the run has any, i.e. whether every rank takes part in validation."""

    train: Any  # DataLoader of {"image": [B, C, *patch] float, "label": [B, 1, *patch] global ids}
    val: Any  # DataLoader of whole volumes on the model grid (batch 1), or []
    validates: bool


def setup_worker(config: dict[str, Any]) -> WorkerContext:
    """Rank, world size and device of this worker; seeds ``random``/numpy/torch with ``seed + rank``."""
    import ray.train

    cfg = TrainConfig.model_validate(config["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if bool(config.get("use_gpu")) and cfg.device != "cpu":
        import ray.train.torch

        device = ray.train.torch.get_device()
    else:
        device = torch.device("cpu")
    if cfg.seed is not None:
        import random

        random.seed(cfg.seed + rank)
        np.random.seed(cfg.seed + rank)
        torch.manual_seed(cfg.seed + rank)
    return WorkerContext(cfg=cfg, rank=rank, world=world, device=device, use_amp=cfg.amp and device.type == "cuda")


def setup_model(ctx: WorkerContext, resume: Any | None) -> tuple[ModelParts, TrainState]:
    """The pretrained network (``cfg.checkpoint``), or with a Ray checkpoint to ``resume`` from its
    ``model.pt`` weights and its training state; prepared for DDP on ``ctx.device``.

    Returns the model and the state to continue from (a fresh :class:`TrainState` without ``resume``).

    Raises:
        CheckpointError: the resumed ``train_state.pt`` holds anything but plain data (see :mod:`.checkpoint`).
    """
    import ray.train.torch

    from ..model import build_network, load_state_dict_from_uri, unwrap_state_dict

    cfg = ctx.cfg
    state_dict, _ = load_state_dict_from_uri(cfg.checkpoint, storage_options=cfg.storage_options)
    net = build_network(state_dict, source=cfg.checkpoint)
    del state_dict
    state = TrainState()
    if resume is not None:
        with resume.as_directory() as folder:
            state = load_train_state(Path(folder) / STATE_FILE)  # first: refuse a tampered folder early
            weights = torch.load(Path(folder) / MODEL_FILE, map_location="cpu", weights_only=True)
            net.load_state_dict(unwrap_state_dict(weights), strict=True)
    net.train()
    model = ray.train.torch.prepare_model(net, move_to_device=ctx.device,
                                          parallel_strategy_kwargs={"find_unused_parameters": True})
    return ModelParts(model=model, net=model.module if hasattr(model, "module") else model), state


def setup_optimizer(ctx: WorkerContext, net: torch.nn.Module, state: TrainState) -> Optimisation:
    """AdamW over ``net``'s parameters, the optional per-epoch warmup-cosine schedule, the AMP scaler and
    the loss; their state restored from ``state`` on resume."""
    from monai.losses import DiceCELoss
    from monai.optimizers import WarmupCosineSchedule

    cfg = ctx.cfg
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = (WarmupCosineSchedule(optimizer, warmup_steps=min(DEFAULT_WARMUP_EPOCHS, cfg.epochs),
                                      t_total=cfg.epochs, warmup_multiplier=DEFAULT_WARMUP_MULTIPLIER)
                 if cfg.lr_schedule else None)
    loss_fn = DiceCELoss(sigmoid=True, include_background=True, squared_pred=True, smooth_nr=cfg.loss_smooth_nr,
                         smooth_dr=cfg.loss_smooth_dr, to_onehot_y=False)
    opt = Optimisation(optimizer=optimizer, scheduler=scheduler,
                       scaler=torch.amp.GradScaler("cuda", enabled=ctx.use_amp), loss_fn=loss_fn)
    opt.restore(state)
    return opt


def setup_data(ctx: WorkerContext, config: dict[str, Any], start_epoch: int) -> Data:
    """Cached train/validation datasets: Ray's distributed sampler splits the training items over the
    ranks, rank ``r`` validates items ``r::world``. The augmentation seed depends on rank and start epoch,
    so a resumed run does not replay the first run's patches."""
    import ray.train.torch
    from monai.data import CacheDataset, DataLoader

    from .transforms import build_train_transforms, build_val_transforms

    cfg = ctx.cfg
    train_tf = build_train_transforms(cfg)
    if cfg.seed is not None:
        train_tf.set_random_state(seed=cfg.seed + 1000 * ctx.rank + start_epoch)
    train_ds = CacheDataset(config["train_items"], train_tf, cache_rate=cfg.cache_rate, num_workers=None,
                            progress=False)
    train_dl = DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=True, num_workers=cfg.loader_workers,
                          persistent_workers=cfg.loader_workers > 0, drop_last=False)
    train_dl = ray.train.torch.prepare_data_loader(train_dl, move_to_device=False)
    val_items = list(config["val_items"])[ctx.rank :: ctx.world]
    val_dl = DataLoader(CacheDataset(val_items, build_val_transforms(cfg), cache_rate=cfg.cache_rate,
                                     progress=False), batch_size=1, num_workers=0) if val_items else []
    return Data(train=train_dl, val=val_dl, validates=bool(config["val_items"]))


def train_epoch(ctx: WorkerContext, parts: ModelParts, opt: Optimisation, data: Data, epoch: int) -> dict[str, float]:
    """One pass over this rank's training patches (module docstring); steps the scheduler.

    Returns ``epoch``, ``train_loss`` (mean per optimiser step over all ranks), ``lr`` (after the
    scheduler step) and ``steps`` (over all ranks), as floats."""
    from monai.apps.vista3d.sampler import sample_prompt_pairs
    from torch.utils.data.distributed import DistributedSampler

    cfg, device = ctx.cfg, ctx.device
    if isinstance(getattr(data.train, "sampler", None), DistributedSampler):
        data.train.sampler.set_epoch(epoch)
    loss_total, steps = 0.0, 0
    for batch in data.train:
        images = batch["image"].to(device).float()  # [B, C, *patch]
        labels = batch["label"].to(device).long()  # [B, 1, *patch] global ids
        n = images.shape[0]
        opt.optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for i in range(n):
            label_prompt, point, point_label, prompt_class = sample_prompt_pairs(
                labels[i : i + 1], list(cfg.global_ids), max_prompt=None, max_foreprompt=None,
                max_backprompt=None, max_point=cfg.max_point, include_background=False,
                drop_label_prob=cfg.drop_label_prob, drop_point_prob=cfg.drop_point_prob)
            if prompt_class is None:  # impossible with a non-empty label_set and no back-prompt cap
                raise RuntimeError("prompt sampling returned no prompt")
            sync = parts.model.no_sync() if (parts.is_ddp and i < n - 1) else contextlib.nullcontext()
            with sync:
                with torch.autocast("cuda", dtype=torch.float16, enabled=ctx.use_amp):
                    logits = parts.model(input_images=images[i : i + 1], point_coords=point,
                                         point_labels=point_label, class_vector=label_prompt,
                                         prompt_class=prompt_class)  # [P, 1, *patch]
                target = (labels[i : i + 1, 0] == prompt_class.view(-1, 1, 1, 1).to(device)).unsqueeze(1)
                loss = opt.loss_fn(logits.float(), target.float())
                opt.scaler.scale(loss / n).backward()
            step_loss += float(loss.detach()) / n
        opt.scaler.step(opt.optimizer)
        opt.scaler.update()
        loss_total += step_loss
        steps += 1
    if opt.scheduler is not None:
        opt.scheduler.step()
    reduced = all_reduce(np.array([loss_total, steps]))
    return {
        "epoch": float(epoch),
        "train_loss": float(reduced[0] / max(reduced[1], 1)),
        "lr": float(opt.optimizer.param_groups[0]["lr"]),
        "steps": float(reduced[1]),
    }


def _validation_due(cfg: TrainConfig, epoch: int) -> bool:
    return (epoch + 1) % cfg.val_interval == 0 or epoch == cfg.epochs - 1


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point. ``config``: ``{"train": TrainConfig dump, "train_items": [...], "val_items":
    [...], "run_name": str, "tracking_uri": str | None, "use_gpu": bool}`` (+ the test-only
    ``fault_inject``/``fault_marker``)."""
    import ray.train

    ctx = setup_worker(config)
    cfg = ctx.cfg
    resume = ray.train.get_checkpoint()
    parts, state = setup_model(ctx, resume)
    opt = setup_optimizer(ctx, parts.net, state)
    start_epoch = state.next_epoch
    data = setup_data(ctx, config, start_epoch)
    tracker = Tracker(cfg, config.get("tracking_uri"), config["run_name"], enabled=ctx.rank == 0)
    try:
        for epoch in range(start_epoch, cfg.epochs):
            _maybe_inject_fault(config, ctx.rank, epoch)
            t0 = time.perf_counter()
            metrics = train_epoch(ctx, parts, opt, data, epoch)
            if data.validates and _validation_due(cfg, epoch):
                metrics.update(validate(parts.net, data.val, cfg, ctx.device))
            metrics["epoch_time_s"] = time.perf_counter() - t0
            state.record(epoch, metrics)
            tracker.metrics(metrics, step=epoch)
            _report(ctx, metrics, parts.net, opt, state)
        if start_epoch >= cfg.epochs and resume is not None:
            _report_restored(ctx, resume, state.last_metrics)
        if ctx.rank == 0 and tracker.active:
            with tempfile.TemporaryDirectory() as tmp:
                torch.save(parts.net.state_dict(), Path(tmp) / MODEL_FILE)
                (Path(tmp) / (MODEL_FILE + LABELS_SUFFIX)).write_text(
                    json.dumps(labels_sidecar(cfg, epoch=cfg.epochs - 1, metrics=state.last_metrics), indent=2))
                tracker.artifacts(tmp, "model")
        tracker.end()
    except BaseException:
        tracker.end("FAILED")
        raise


def _report(ctx: WorkerContext, metrics: dict[str, float], net: torch.nn.Module, opt: Optimisation,
            state: TrainState) -> None:
    """``ray.train.report`` on every rank; rank 0 attaches the checkpoint folder."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if ctx.rank == 0:
            opt.snapshot(state)
            state.config = ctx.cfg.model_dump(mode="json", exclude={"storage_options"})  # may hold credentials
            write_checkpoint(tmp, net.state_dict(), state, ctx.cfg, epoch=state.epoch, metrics=metrics)
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=ckpt)


def _report_restored(ctx: WorkerContext, resume: Any, metrics: dict[str, float]) -> None:
    """Nothing left to train (a re-run of a finished run): re-report the restored checkpoint."""
    import ray.train

    with resume.as_directory() as folder, tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if ctx.rank == 0:
            shutil.copytree(folder, tmp, dirs_exist_ok=True)
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=ckpt)


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
