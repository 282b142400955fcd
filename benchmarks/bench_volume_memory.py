#!/usr/bin/env python
"""Whole-process peak memory of segmenting one CT against its length: nvseg-ray's stages vs upstream's chain.

For each length (input slices) a synthetic int16 CT of ``--in-plane`` voxels at ``--spacing`` mm is written as
``.nii.gz``, then each side segments it, everything-mode CT_BODY (117 classes), in a fresh process whose peak
resident memory (the kernel's ``VmHWM``) is the figure:

* ``ours``: :class:`nvseg_ray.stages.VolumeStages` read -> prepare -> :class:`nvseg_ray.model_runner.ModelRunner`
  infer -> finish -> :func:`nvseg_ray.output.write_result` (what ``nvseg segment`` runs per volume);
* ``upstream``: :mod:`nvseg_ray.upstream` -- the bundle's MONAI chain (LoadImaged .. SaveImaged), skipped where
  its stitched logits alone would exceed ``--max-gb``.

Both sides run the same stand-in network: VISTA3D's interface with a 1 x 1 x 1 convolution for the image encoder
(48 feature channels, like the real class head's input) and the real class-head arithmetic. What is measured is
everything around the network -- reading, the model grid, stitching, inversion, writing -- whose memory grows
with the scan; the real network's activations per window are the same for every length, so they add a constant.
The ``flatness`` line is the largest over the smallest peak per side: flat memory is a ratio near 1.

Run ``python benchmarks/bench_volume_memory.py --help``; see ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks._common import floats_arg, ints_arg, write_report  # noqa: E402

SIDES = ("ours", "upstream")
CLASSES = 117  # CT_BODY everything


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--in-plane", type=ints_arg, default=(512, 512), help="input in-plane voxels (default 512,512)")
    p.add_argument("--spacing", type=floats_arg, default=(0.75, 0.75, 1.5), help="input voxel mm (default "
                   "0.75,0.75,1.5: a 256 x 256 in-plane model grid, one model slice per input slice)")
    p.add_argument("--lengths", type=ints_arg, default=(100, 300, 900), help="input slices to measure")
    p.add_argument("--patch-size", type=ints_arg, default=(192, 192, 128))
    p.add_argument("--max-gb", type=float, default=12.0,
                   help="skip upstream where its stitched 117-class logits alone would exceed this many GB")
    p.add_argument("--sides", type=lambda t: tuple(t.split(",")), default=SIDES, help="ours,upstream (default both)")
    p.add_argument("--json", help="also write the figures as JSON here")
    p.add_argument("--one", nargs=3, metavar=("SIDE", "INPUT", "OUTDIR"), help=argparse.SUPPRESS)  # the child
    return p.parse_args(argv)


def stand_in_network(features: int = 48, n_ids: int = 512):  # noqa: ANN201 - a torch module, imported lazily
    """A VISTA3D-shaped network whose encoder is one 1 x 1 x 1 convolution: ``image_encoder(x) -> (None, [B, F,
    ...])``, ``class_head`` with ``class_embeddings`` / ``image_post_mapping``, and ``forward(x, class_vector)`` ->
    [1, n_classes, ...] logits (``e_c . features``) for upstream's sliding-window inferer."""
    import torch

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv3d(1, features, kernel_size=1)

        def forward(self, x, with_point=False, with_label=True):  # noqa: ANN001, ANN201, ARG002
            return None, self.conv(x)

    class Head(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.class_embeddings = torch.nn.Embedding(n_ids, features)
            self.use_mlp = False
            self.image_post_mapping = torch.nn.Identity()

    class StandIn(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.image_encoder = Encoder()
            self.class_head = Head()

        def forward(self, x, patch_coords=None, class_vector=None, **_):  # noqa: ANN001, ANN003, ANN201, ARG002
            feats = self.image_encoder(x)[1]  # [B, F, ...]
            emb = self.class_head.class_embeddings(class_vector[:, 0].long())  # [n, F]
            return torch.einsum("nf,bf...->bn...", emb, feats)

    torch.manual_seed(0)
    return StandIn().eval()


def _run_one(side: str, path: str, out_dir: str, patch_size: tuple[int, ...]) -> dict[str, float]:
    """In this (fresh) process: segment ``path`` on one side; peak RSS, seconds and facts."""
    from types import SimpleNamespace

    import torch

    from nvseg_ray.config import InferenceConfig
    from nvseg_ray.timing import peak_rss_mb

    torch.set_num_threads(1)
    network = stand_in_network()
    cfg = InferenceConfig(modality="CT_BODY", patch_size=patch_size, device="cpu")
    base = peak_rss_mb()
    start = time.perf_counter()
    if side == "ours":
        from nvseg_ray.engine import segment_volume
        from nvseg_ray.model import LoadedModel
        from nvseg_ray.model_runner import ModelRunner
        from nvseg_ray.output import write_result
        from nvseg_ray.stages import VolumeStages

        model = LoadedModel(network, SimpleNamespace(in_channels=1), "stand-in", "0" * 64)  # type: ignore[arg-type]
        result = segment_volume(path, VolumeStages(cfg), ModelRunner(cfg, model=model))
        write_result(result, input_uri=path, output_uri=str(Path(out_dir) / "mask.nii.gz"), cfg=cfg,
                     model_uri="stand-in", model_sha256="0" * 64)
        shape, foreground = result.labels.shape, int((result.labels > 0).sum())
        # each stage resets the kernel's high-water mark (per-stage peaks): the process peak is their maximum
        stage_peaks = dict(result.timings.peak_rss_mb)
    else:
        from nvseg_ray.prompts import resolve_prompts
        from nvseg_ray.labels import LabelCatalog
        from nvseg_ray.upstream import upstream_infer, upstream_postprocessing, upstream_preprocessing

        ids = resolve_prompts(cfg, LabelCatalog.load(None)).class_ids
        pre = upstream_preprocessing("cpu")
        data = upstream_infer(pre({"image": path, "label_prompt": list(ids)}), network, patch_size)
        data = upstream_postprocessing(pre, output_dir=out_dir)(data)
        shape, foreground = tuple(data["pred"].shape[1:]), int((data["pred"] > 0).sum())
        stage_peaks = {}
        del data
    seconds = time.perf_counter() - start
    peak = max([peak_rss_mb(), *stage_peaks.values()])
    return {"peak_rss_mb": round(peak, 1), "baseline_rss_mb": round(base, 1), "seconds": round(seconds, 2),
            "stage_peak_rss_mb": {k: round(v, 1) for k, v in stage_peaks.items()}, "shape": list(shape),
            "foreground_voxels": foreground}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.one:
        print(json.dumps(_run_one(args.one[0], args.one[1], args.one[2], tuple(args.patch_size))))
        return 0
    from nvseg_ray.synthetic import write_torso_ct

    sides = [s for s in SIDES if s in args.sides]
    results: dict[str, dict[str, dict | None]] = {s: {} for s in sides}
    with tempfile.TemporaryDirectory(prefix="nvseg-volume-memory-") as work:
        for length in args.lengths:
            path = Path(work) / f"ct_{length}.nii.gz"
            write_torso_ct(path, (*args.in_plane, length), args.spacing)
            model_voxels = 1.0
            for n, mm in zip((*args.in_plane, length), args.spacing):
                model_voxels *= n * mm / 1.5
            for side in sides:
                logits_gb = CLASSES * model_voxels * 4 / 2**30
                if side == "upstream" and logits_gb > args.max_gb:
                    results[side][str(length)] = None
                    print(f"{side:>9} {length:4d} slices: skipped (its logits alone are ~{logits_gb:.1f} GB)")
                    continue
                out_dir = Path(work) / f"{side}_{length}"
                out_dir.mkdir()
                done = subprocess.run([sys.executable, __file__, "--patch-size", ",".join(map(str, args.patch_size)),
                                       "--one", side, str(path), str(out_dir)], capture_output=True, text=True)
                if done.returncode != 0:
                    raise SystemExit(f"{side} at {length} slices failed:\n{done.stderr[-3000:]}")
                figures = json.loads(done.stdout.strip().splitlines()[-1])
                results[side][str(length)] = figures
                print(f"{side:>9} {length:4d} slices: peak {figures['peak_rss_mb']:8.0f} MB  "
                      f"{figures['seconds']:6.1f} s")
            path.unlink()
    flatness = {}
    for side in sides:
        peaks = [f["peak_rss_mb"] for f in results[side].values() if f]
        flatness[side] = round(max(peaks) / min(peaks), 3) if len(peaks) > 1 else None
    shared = [k for k in results.get("upstream", {}) if results["upstream"][k] and results.get("ours", {}).get(k)]
    vs = {k: round(results["upstream"][k]["peak_rss_mb"] / results["ours"][k]["peak_rss_mb"], 2) for k in shared}
    print("flatness (largest/smallest peak over lengths " + ", ".join(map(str, args.lengths)) + "): "
          + ", ".join(f"{s} {r}" for s, r in flatness.items()))
    print("upstream/ours peak per length: " + (", ".join(f"{k} slices {v}x" for k, v in vs.items()) or "-"))
    write_report({"format": "nvseg-bench-volume-memory/1", "in_plane": list(args.in_plane),
                  "spacing_mm": list(args.spacing), "patch_size": list(args.patch_size), "results": results,
                  "flatness": flatness, "upstream_over_ours": vs}, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
