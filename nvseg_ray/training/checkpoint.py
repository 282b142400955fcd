"""What a Ray Train checkpoint folder of a finetuning run holds, and reading it back safely.

A checkpoint folder (written by rank 0 after every epoch) holds:

* ``model.pt``: the plain network state dict (``{name: Tensor}``), loadable by the inference stack as is;
* ``model.pt.labels.json``: :func:`labels_sidecar` (what the checkpoint was trained to segment);
* ``train_state.pt``: :class:`TrainState` as a plain dict (``epoch``, ``optimizer``, ``scheduler``, ``scaler``,
  ``best_metric``, ``best_epoch``, ``history``, ``config``): only tensors, numbers, strings, ``None``, lists,
  tuples and dicts, so it is read with ``torch.load(weights_only=True)``. The storage path may be a shared
  bucket: a full unpickler there would run whatever code a writer of that bucket put in the file, on every
  training worker. Anything else in the file is refused with a :class:`~nvseg_ray.errors.CheckpointError`.
"""

from __future__ import annotations

import json
import math
import pickle
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from .config import TrainConfig

MODEL_FILE = "model.pt"
LABELS_SUFFIX = ".labels.json"
STATE_FILE = "train_state.pt"


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


@dataclass
class TrainState:
    """Progress of a run after an epoch: the content of ``train_state.pt`` (field name = dict key).

    ``epoch`` is the last finished epoch (-1: none yet); ``best_metric``/``best_epoch`` the best validation
    mean Dice so far (-1 / -1: none yet); ``history`` one metrics dict per finished epoch. ``optimizer``,
    ``scheduler`` (``None`` without ``lr_schedule``) and ``scaler`` are the torch ``state_dict()`` values;
    ``config`` the run's :class:`TrainConfig` JSON dump (informational).
    """

    epoch: int = -1
    best_metric: float = -1.0
    best_epoch: int = -1
    history: list[dict[str, float]] = field(default_factory=list)
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None
    config: dict[str, Any] | None = None

    @property
    def next_epoch(self) -> int:
        """The first epoch still to train."""
        return self.epoch + 1

    @property
    def last_metrics(self) -> dict[str, float]:
        return dict(self.history[-1]) if self.history else {}

    def record(self, epoch: int, metrics: dict[str, float]) -> None:
        """Account for a finished epoch: best validation Dice (when validated and finite), history.

        Adds ``best_metric``/``best_epoch`` (floats) to ``metrics`` itself, as reported to Ray and MLflow."""
        dice = metrics.get("val_mean_dice")
        if dice is not None and math.isfinite(dice) and dice > self.best_metric:
            self.best_metric, self.best_epoch = float(dice), epoch
        metrics["best_metric"], metrics["best_epoch"] = float(self.best_metric), float(self.best_epoch)
        self.epoch = epoch
        self.history.append(metrics)

    def to_dict(self) -> dict[str, Any]:
        """The ``train_state.pt`` dict; shallow (``dataclasses.asdict`` would deep-copy the optimiser's tensors)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Any, *, source: str) -> TrainState:
        if not isinstance(data, dict) or not {"epoch", "optimizer", "best_metric", "best_epoch"} <= set(data):
            raise CheckpointError(f"{source} is not a training state (expected a dict with epoch, optimizer, "
                                  f"best_metric, best_epoch)",
                                  hint="resume from a checkpoint written by nvseg-ray, or use a new --run-name")
        return cls(epoch=int(data["epoch"]), best_metric=float(data["best_metric"]),
                   best_epoch=int(data["best_epoch"]), history=list(data.get("history") or []),
                   optimizer=data["optimizer"], scheduler=data.get("scheduler") or None,
                   scaler=data.get("scaler") or None, config=data.get("config"))


def save_train_state(state: TrainState, path: str | Path) -> None:
    torch.save(state.to_dict(), path)


def load_train_state(path: str | Path) -> TrainState:
    """Read ``train_state.pt`` with the restricted (``weights_only``) unpickler.

    Raises:
        CheckpointError: the file holds anything but plain tensors/numbers/strings/containers (e.g. a pickled
            object whose ``__reduce__`` would run code: refused before anything runs), or is not a state.
    """
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, ValueError) as exc:
        first = (str(exc).splitlines() or [""])[0][:300]
        raise CheckpointError(f"refusing to load training state {Path(path).name}: it is not a plain tensor/"
                              f"number/container file ({type(exc).__name__}: {first})",
                              hint="the checkpoint storage may have been tampered with; check who can write "
                                   "to --storage-path, or start a new run with another --run-name") from None
    return TrainState.from_dict(data, source=Path(path).name)


def write_checkpoint(folder: str | Path, weights: dict[str, torch.Tensor], state: TrainState, cfg: TrainConfig,
                     *, epoch: int, metrics: dict[str, float]) -> None:
    """Write the three checkpoint files (module docstring) into ``folder``."""
    folder = Path(folder)
    torch.save(weights, folder / MODEL_FILE)
    (folder / (MODEL_FILE + LABELS_SUFFIX)).write_text(json.dumps(labels_sidecar(cfg, epoch=epoch, metrics=metrics),
                                                                  indent=2))
    save_train_state(state, folder / STATE_FILE)
