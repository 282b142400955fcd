"""Ray entry point of evaluation: Dice of a checkpoint on a labelled data list (upstream evaluate.json).

    python jobs/evaluate.py --datalist configs/msd_task09_spleen_folds.json --root /data/Task09_Spleen \\
        --checkpoint models/model.pt --output eval/ --label-mapping '[[1, 3]]' --split validation --fold 0
    ray job submit --working-dir . -- python jobs/evaluate.py ...

Exit status: 0 all cases evaluated; 2 configuration / data-list problem (nothing ran); 3 some cases failed
(their error codes are in per_case.csv and summary.json); other NvsegError families keep their own status
(4 checkpoint, 5 storage).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

try:  # a checkout used without `pip install -e .` (e.g. a bare `ray job submit --working-dir .`)
    import nvseg_ray  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nvseg_ray.boundary import guarded
from nvseg_ray.errors import ConfigError


def _patch(text: str) -> list[int]:
    parts = text.replace("x", ",").split(",")
    try:
        return [int(p) for p in parts if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"patch size must look like 192,192,128, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jobs/evaluate.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--datalist", required=True, help="upstream data-list JSON (path or URI)")
    p.add_argument("--root", help="dataset folder for relative paths (default: the data list's folder)")
    p.add_argument("--checkpoint", required=True, help="model.pt path or URI")
    p.add_argument("--output", required=True, help="folder or URI prefix for the result tables")
    p.add_argument("--label-mapping", help="JSON [[local, global], ...] (default [[1, 3]], upstream evaluate.json)")
    p.add_argument("--split", choices=["validation", "testing", "all"], help="default: validation")
    p.add_argument("--fold", type=int, help="validation fold (default 0)")
    p.add_argument("--patch-size", type=_patch, help="sliding-window patch, e.g. 192,192,128 (default)")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:1, ...")
    p.add_argument("--backend", choices=["auto", "torch", "trt", "compile"],
                   help="auto (default): TensorRT encoder where it can run, else torch (see README, GPU)")
    p.add_argument("--max-actors", type=int, help="model actors (default 1)")
    p.add_argument("--label-catalog", help="project catalog JSON or upstream bundle dir")
    p.add_argument("--storage-options", help="fsspec options as JSON, e.g. '{\"endpoint_url\": \"...\"}'")
    p.add_argument("--debug", action="store_true", help="show tracebacks for internal errors")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, run, print the summary table; return the exit status."""
    args = build_parser().parse_args(argv)

    def run() -> int:
        from nvseg_ray.evaluation import EvaluateConfig, run_evaluation

        try:
            storage = json.loads(args.storage_options) if args.storage_options else None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--storage-options is not JSON: {exc}") from None
        cfg = EvaluateConfig.from_options(
            datalist=args.datalist, root=args.root, checkpoint=args.checkpoint, output=args.output,
            label_mapping=args.label_mapping, split=args.split, fold=args.fold, patch_size=args.patch_size,
            device=args.device, backend=args.backend, max_actors=args.max_actors, label_catalog=args.label_catalog,
            storage_options=storage)
        return run_evaluation(cfg).exit_code

    return guarded("evaluate", run, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
