"""Ray Train entry point of finetuning / continual learning.

    python jobs/train.py --config configs/train_finetune.yaml
    python jobs/train.py --datalist data/folds.json --checkpoint models/model.pt --label-mapping '[[1, 3]]' \\
        --epochs 5 --num-workers 2 --run-name spleen --output models/model_spleen.pt
    ray job submit --working-dir . -- python jobs/train.py --config configs/train_finetune.yaml

Every data-list problem (missing/unreadable files, grid mismatches, unmapped label values) is reported
at once before training starts. Re-running with the same ``--run-name`` and ``--storage-path`` resumes
from the last checkpoint. Exit status: 0 success; 2 bad options or data list; 4 checkpoint; 5 storage;
6 training failed; 1 internal error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

try:  # a checkout used without `pip install -e .`
    import nvseg_ray  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nvseg_ray.boundary import guarded
from nvseg_ray.training.config import TrainConfig


def _bool(value: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {value!r}")


def _triplet(kind: type) -> Callable[[str], tuple]:
    def parse(value: str) -> tuple:
        parts = [p for p in value.replace("x", ",").split(",") if p.strip()]
        if len(parts) == 1:
            parts = parts * 3
        if len(parts) != 3:
            raise argparse.ArgumentTypeError(f"expected 3 values like 128,128,128, got {value!r}")
        return tuple(kind(p) for p in parts)

    return parse


#: flag dest -> (type, help); every dest is a TrainConfig field. The help's "(default ...)" comes from the
#: field (:func:`_with_default`), so TrainConfig stays the one source of each default.
_FLAGS: dict[str, tuple[object, str]] = {
    "datalist": (str, "data list JSON (path or URI) with training items {image, label, fold}"),
    "root": (str, "folder/prefix relative data-list paths are joined to (default: the data list's)"),
    "fold": (int, "validation fold"),
    "label_mapping": (str, "JSON [[local, global], ...]"),
    "checkpoint": (str, "pretrained model.pt to start from"),
    "epochs": (int, "total epochs (a resume continues up to this number)"),
    "learning_rate": (float, "AdamW learning rate"),
    "weight_decay": (float, "AdamW weight decay"),
    "lr_schedule": (_bool, "WarmupCosineSchedule per epoch"),
    "batch_size": (int, "patches per step and worker"),
    "num_patches_per_image": (int, "patches sampled per volume"),
    "max_point": (int, "max positive/negative points per prompt"),
    "drop_label_prob": (float, "probability of training a point-only prompt"),
    "drop_point_prob": (float, "probability of training a class-only prompt"),
    "patch_size": (_triplet(int), "training/validation patch, e.g. 128,128,128"),
    "spacing": (_triplet(float), "resampling spacing in mm"),
    "amp": (_bool, "fp16 autocast on CUDA"),
    "val_interval": (int, "validate every N epochs"),
    "cache_rate": (float, "share of preprocessed volumes cached per worker"),
    "seed": (int, "random seed (per rank: seed + rank)"),
    "num_workers": (int, "Ray Train workers / DDP ranks"),
    "loader_workers": (int, "DataLoader processes per worker"),
    "use_gpu": (_bool, "one GPU per worker (default: when the cluster has GPUs)"),
    "device": (str, "'auto' or 'cpu'"),
    "cpus_per_worker": (float, "CPUs reserved per worker"),
    "storage_path": (str, "local folder or s3:// URI for checkpoints"),
    "run_name": (str, "run name; re-run with the same name to resume (default: a timestamp)"),
    "max_failures": (int, "automatic restarts from the last checkpoint (-1 unlimited)"),
    "mlflow_tracking_uri": (str, "MLflow server URL or local folder; '' disables"),
    "experiment_name": (str, "MLflow experiment"),
    "output": (str, "final model.pt path/URI (+ .labels.json sidecar)"),
    "ray_address": (str, "Ray cluster address (default: RAY_ADDRESS or a local Ray)"),
}


def _with_default(dest: str, text: str) -> str:
    """``text`` + ``(default X)`` from the TrainConfig field (none for required fields, ``None`` defaults and
    texts that already explain their default)."""
    info = TrainConfig.model_fields[dest]
    if info.is_required() or info.default is None or "(default" in text:
        return text
    value = info.default
    if isinstance(value, bool):
        shown = str(value).lower()
    elif isinstance(value, tuple) and value and all(isinstance(v, tuple) for v in value):
        shown = json.dumps([list(v) for v in value])
    elif isinstance(value, tuple):
        shown = ",".join(map(str, value))
    else:
        shown = str(value)
    return f"{text} (default {shown})"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jobs/train.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML with TrainConfig fields (flags override)")
    for dest, (kind, text) in _FLAGS.items():
        p.add_argument("--" + dest.replace("_", "-"), dest=dest, type=kind, help=_with_default(dest, text))
    p.add_argument("--s3-endpoint", help="S3-compatible endpoint URL (sets AWS_ENDPOINT_URL for all workers)")
    p.add_argument("--debug", action="store_true", help="show tracebacks for internal errors")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults < ``--config`` YAML < flags (``--mlflow-tracking-uri ''`` disables MLflow)."""
    overrides = {dest: getattr(args, dest, None) for dest in _FLAGS}
    return TrainConfig.from_sources(args.config, **overrides)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.s3_endpoint:
        os.environ["AWS_ENDPOINT_URL"] = args.s3_endpoint
    def run() -> int:
        from nvseg_ray.training.run import run_training

        result = run_training(config_from_args(args))
        print(json.dumps({"run_name": result.run_name, "output": result.output, "metrics": result.metrics,
                          "checkpoint": result.checkpoint_path, "seconds": round(result.seconds, 1)}, indent=2))
        return 0

    return guarded("train", run, debug=args.debug)

if __name__ == "__main__":
    sys.exit(main())
