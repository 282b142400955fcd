"""Finetuning: TrainConfig defaults, the shipped YAML, transforms, data-list errors before training, and a
2-worker CPU Ray Train run (loss falls, the exported checkpoint segments, a re-run resumes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nvseg_ray.errors import ConfigError
from nvseg_ray.training import config as tc
from nvseg_ray.training.config import TrainConfig

from .model_helpers import save_volume, segment_once

REPO = Path(__file__).resolve().parents[1]
SHAPE = (32, 32, 32)
AFFINE = np.diag([1.5, 1.5, 1.5, 1.0])  # already on the 1.5 mm model grid: ~32³ after resampling


def make_dataset(root: Path, n: int = 4, *, bad: bool = False) -> Path:
    """``n`` volumes 32³ at 1.5 mm: tissue ~100 with a bright sphere (~400) labelled 1 (mapped to global 3).
    Case 0 is fold 0 (validation). With ``bad``, case 1's label has an unmapped value 7 and case 2's
    image is missing."""
    root.mkdir(parents=True, exist_ok=True)
    items = []
    grid = np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij")
    for i in range(n):
        rng = np.random.default_rng(i)
        c = np.array(SHAPE) // 2 + rng.integers(-5, 6, 3)
        blob = sum((g - ci) ** 2 for g, ci in zip(grid, c)) < 7**2
        img = (100.0 + rng.normal(0, 10, SHAPE) + 300.0 * blob).astype(np.float32)
        lab = blob.astype(np.uint8)
        if bad and i == 1:
            lab[0, 0, 0] = 7
        if not (bad and i == 2):
            save_volume(root / f"img{i}.nii.gz", img, AFFINE)
        save_volume(root / f"lab{i}.nii.gz", lab, AFFINE)
        items.append({"image": f"img{i}.nii.gz", "label": f"lab{i}.nii.gz", "fold": 0 if i == 0 else 1})
    path = root / "datalist.json"
    path.write_text(json.dumps({"training": items}))
    return path


def tiny_cfg(tmp: Path, datalist: Path, checkpoint: str, **kw) -> TrainConfig:
    base = dict(datalist=str(datalist), checkpoint=checkpoint, patch_size=(32, 32, 32), epochs=3, num_workers=2,
                loader_workers=0, batch_size=2, learning_rate=1e-3, storage_path=str(tmp / "runs"),
                run_name="tiny", mlflow_tracking_uri=None, output=str(tmp / "out" / "model.pt"), max_failures=0)
    base.update(kw)
    return TrainConfig(**base)


# ------------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------------


def test_defaults_are_pinned():
    cfg = TrainConfig(datalist="d.json", checkpoint="m.pt")
    assert tc.DEFAULT_LEARNING_RATE == 5e-5 and cfg.learning_rate == 5e-5
    assert cfg.label_mapping == ((1, 3),) and cfg.global_ids == (3,) and cfg.expand_subclasses
    assert cfg.patch_size == (128, 128, 128) and cfg.spacing == (1.5, 1.5, 1.5)
    assert (cfg.fold, cfg.num_patches_per_image, cfg.max_point, cfg.val_interval) == (0, 1, 5, 1)
    assert cfg.drop_label_prob == cfg.drop_point_prob == 0.25
    assert cfg.amp and cfg.num_workers == 2 and cfg.use_gpu is None and cfg.mlflow_tracking_uri == "mlruns"
    assert cfg.weight_decay == 0.01 and not cfg.lr_schedule and cfg.loss_smooth_nr == 1e-4 and cfg.loss_smooth_dr == 1e-2


def test_config_validation():
    with pytest.raises(ConfigError, match="multiple of 16"):
        TrainConfig.from_sources(datalist="d", checkpoint="m", patch_size=[192, 198, 128])
    with pytest.raises(ConfigError, match="label_mapping"):
        TrainConfig.from_sources(datalist="d", checkpoint="m", label_mapping=[[0, 3]])
    with pytest.raises(ConfigError, match="unknown_option"):
        TrainConfig.from_sources(datalist="d", checkpoint="m", unknown_option=1)
    cfg = TrainConfig.from_sources(datalist="d", checkpoint="m", label_mapping="[[1, 2], [2, 21]]", batch_size=4)
    assert cfg.global_ids == (2, 21) and not cfg.expand_subclasses and cfg.batch_size == 4


def test_shipped_yaml_validates_and_flags_override():
    import importlib.util

    cfg = TrainConfig.from_sources(REPO / "configs" / "train_finetune.yaml")
    assert cfg.label_mapping == ((1, 3),) and cfg.patch_size == (128, 128, 128) and cfg.run_name
    spec = importlib.util.spec_from_file_location("train_job", REPO / "jobs" / "train.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    args = job.build_parser().parse_args(["--config", str(REPO / "configs" / "train_finetune.yaml"), "--epochs", "7",
                                          "--patch-size", "64,64,32", "--label-mapping", "[[1, 6]]"])
    cfg = job.config_from_args(args)
    assert cfg.epochs == 7 and cfg.patch_size == (64, 64, 32) and cfg.global_ids == (6,)


# ------------------------------------------------------------------------------------------------------
# Transforms and data-list checks (no Ray)
# ------------------------------------------------------------------------------------------------------


def test_transforms_relabel_and_patch(tmp_path, tiny_checkpoint):
    from nvseg_ray.training.run import prepare_run
    from nvseg_ray.training.transforms import build_train_transforms, build_val_transforms

    cfg = tiny_cfg(tmp_path, make_dataset(tmp_path / "data"), tiny_checkpoint, num_patches_per_image=2,
                   patch_size=(16, 16, 16))
    train, val = prepare_run(cfg)
    assert len(train) == 3 and len(val) == 1
    patches = build_train_transforms(cfg)(train[0])
    assert len(patches) == 2
    for p in patches:
        assert p["image"].shape == (1, 16, 16, 16) and p["image"].dtype == torch.float32
        assert p["label"].dtype == torch.int16 and set(p["label"].unique().tolist()) <= {0, 3}
    v = build_val_transforms(cfg)(val[0])
    assert v["image"].shape == (1, *SHAPE) and float(v["image"].max()) == 1.0
    assert set(v["label"].unique().tolist()) == {0, 3}


def test_datalist_errors_reported_before_training(tmp_path, tiny_checkpoint, monkeypatch):
    from nvseg_ray.training import run
    from nvseg_ray.errors import DataListError

    def no_ray(*a, **k):  # training must not start
        raise AssertionError("Ray was started despite a bad data list")

    monkeypatch.setattr("ray.init", no_ray)
    cfg = tiny_cfg(tmp_path, make_dataset(tmp_path / "data", bad=True), tiny_checkpoint)
    with pytest.raises(DataListError) as info:
        run.run_training(cfg)
    text = str(info.value)
    assert "img2" in text and "7" in text  # both problems, at once


# ------------------------------------------------------------------------------------------------------
# Checkpoint files: the typed train state, loaded with the restricted unpickler (no Ray)
# ------------------------------------------------------------------------------------------------------


class _RunsCode:
    """Unpickling this would run ``touch <marker>``: what a writer of a shared checkpoint bucket could plant."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def _worker_ctx(cfg: TrainConfig):
    from nvseg_ray.training.worker import WorkerContext

    return WorkerContext(cfg=cfg, rank=0, world=1, device=torch.device("cpu"), use_amp=False)


def test_train_state_round_trip_restores_optimiser(tmp_path):
    """The optimiser/scheduler/scaler state written after an epoch loads with ``weights_only=True`` and
    restores them exactly; the warmup schedule takes its numbers from the config's defaults."""
    from nvseg_ray.training.checkpoint import STATE_FILE, TrainState, load_train_state, save_train_state
    from nvseg_ray.training.worker import setup_optimizer

    cfg = TrainConfig(datalist="d.json", checkpoint="m.pt", lr_schedule=True, epochs=5, learning_rate=1e-3)
    net = torch.nn.Conv3d(1, 2, 3)
    opt = setup_optimizer(_worker_ctx(cfg), net, TrainState())
    assert opt.scheduler.warmup_steps == tc.DEFAULT_WARMUP_EPOCHS
    assert opt.optimizer.param_groups[0]["lr"] == pytest.approx(tc.DEFAULT_WARMUP_MULTIPLIER * 1e-3)
    net(torch.randn(1, 1, 5, 5, 5)).sum().backward()
    opt.optimizer.step()
    opt.scheduler.step()
    state = TrainState()
    state.record(0, {"epoch": 0.0, "train_loss": 1.0, "val_mean_dice": 0.4})
    state.record(1, {"epoch": 1.0, "train_loss": 0.5, "val_mean_dice": float("nan")})
    assert (state.epoch, state.next_epoch, state.best_metric, state.best_epoch) == (1, 2, 0.4, 0)
    opt.snapshot(state)
    save_train_state(state, tmp_path / STATE_FILE)
    raw = torch.load(tmp_path / STATE_FILE, map_location="cpu", weights_only=True)  # the on-disk format
    assert {"epoch", "optimizer", "scheduler", "scaler", "best_metric", "best_epoch", "history", "config"} <= set(raw)

    loaded = load_train_state(tmp_path / STATE_FILE)
    assert loaded.history[0] == state.history[0] and loaded.best_metric == 0.4 and loaded.next_epoch == 2
    fresh = setup_optimizer(_worker_ctx(cfg), torch.nn.Conv3d(1, 2, 3), loaded)
    assert fresh.scheduler.last_epoch == 1
    assert fresh.optimizer.param_groups[0]["lr"] == pytest.approx(opt.optimizer.param_groups[0]["lr"])
    moments = [s["exp_avg"] for s in fresh.optimizer.state.values()]
    assert moments and all(torch.equal(a, b["exp_avg"]) for a, b in zip(moments, opt.optimizer.state.values()))


def test_malicious_train_state_is_refused_without_running_it(tmp_path, tiny_checkpoint):
    """A ``train_state.pt`` holding a pickled object whose ``__reduce__`` runs a command: the resume path of a
    worker (and the driver's read of the final state) refuses it with a CheckpointError, and nothing runs."""
    import ray.train

    from nvseg_ray.errors import CheckpointError
    from nvseg_ray.training.checkpoint import MODEL_FILE, STATE_FILE, load_train_state
    from nvseg_ray.training.worker import setup_model

    marker = tmp_path / "pwned"
    folder = tmp_path / "checkpoint_000000"
    folder.mkdir()
    (folder / MODEL_FILE).write_bytes(Path(tiny_checkpoint).read_bytes())
    torch.save({"epoch": 0, "optimizer": _RunsCode(marker), "best_metric": 0.0, "best_epoch": 0}, folder / STATE_FILE)

    with pytest.raises(CheckpointError, match="refusing to load training state") as info:
        load_train_state(folder / STATE_FILE)
    assert info.value.code == "invalid_checkpoint" and info.value.hint
    cfg = TrainConfig(datalist="d.json", checkpoint=tiny_checkpoint)
    with pytest.raises(CheckpointError):
        setup_model(_worker_ctx(cfg), ray.train.Checkpoint.from_directory(str(folder)))
    assert not marker.exists(), "the pickled command ran"

    # the payload is real: the full unpickler that was used before runs it
    torch.load(folder / STATE_FILE, map_location="cpu", weights_only=False)
    assert marker.exists()

    torch.save([1, 2, 3], folder / STATE_FILE)  # plain data, but not a training state
    with pytest.raises(CheckpointError, match="not a training state"):
        load_train_state(folder / STATE_FILE)


# ------------------------------------------------------------------------------------------------------
# Ray Train, 2 CPU workers
# ------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_train_two_workers_export_and_resume(tmp_path, tiny_checkpoint, ray_cluster):
    from nvseg_ray.config import InferenceConfig
    from nvseg_ray.model import load_model
    from nvseg_ray.training.run import run_training

    datalist = make_dataset(tmp_path / "data")
    cfg = tiny_cfg(tmp_path, datalist, tiny_checkpoint, epochs=3)
    first = run_training(cfg)
    losses = [h["train_loss"] for h in first.history]
    assert [h["epoch"] for h in first.history] == [0, 1, 2]
    assert losses[-1] < losses[0], losses
    assert all(0.0 <= h["val_dice_3"] <= 1.0 for h in first.history)

    # the export is a plain state dict the inference stack loads unchanged, plus the label sidecar
    sidecar = json.loads(Path(cfg.output + ".labels.json").read_text())
    assert sidecar["label_mapping"] == [[1, 3]] and sidecar["classes"] == [3] and sidecar["expand_subclasses"]
    raw = torch.load(cfg.output, map_location="cpu", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in raw.values())
    assert load_model(cfg.output).architecture.embed_dim == 8
    result = segment_once(InferenceConfig(checkpoint=cfg.output, classes=[3], patch_size=(32, 32, 32)),
                          datalist.parent / "img0.nii.gz")
    assert result.labels.shape == SHAPE and set(np.unique(result.labels).tolist()) <= {0, 3}

    # same run name, more epochs: continues at epoch 3 with the restored history
    second = run_training(cfg.model_copy(update={"epochs": 4}))
    assert [h["epoch"] for h in second.history] == [0, 1, 2, 3]
    assert second.history[:3] == first.history
    assert second.metrics["epoch"] == 3
    # the synthetic class is learnt: validation dice rises above 0.3 and above where it started
    dice = [h["val_dice_3"] for h in second.history]
    assert dice[-1] > 0.3 and dice[-1] > dice[0], dice
