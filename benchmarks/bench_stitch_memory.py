#!/usr/bin/env python
"""Peak memory of the sliding-window stitching against the scan's length: slabs (ours) vs whole-grid stitching.

For each length ``D`` (model-grid slices, 1.5 mm) on an ``H x W`` in-plane model grid, three ways of turning the
windows into an everything-mode (117 classes) label map run, each in a fresh process whose peak resident memory
(``VmHWM``) is the figure:

* ``slabs``: :func:`nvseg_ray.slab_stitching.stitch_in_slabs` (what the engine runs);
* ``whole_grid``: MONAI's ``sliding_window_inference`` over the 48-channel feature map, then the same
  class-chunked argmax (what the engine ran before);
* ``upstream``: MONAI's ``sliding_window_inference`` over 117-channel logits, then an argmax (the upstream
  bundle's memory pattern), skipped where its logits alone would exceed ``--max-gb``.

The network is replaced by a 1 x 1 x 1 convolution with the real model's output channels (48 features, or 117
logits): what is measured is the stitching, whose memory depends on the channels and the grids, not on the
network (the network's own activations per window are the same for every length). The ``ratio`` line is the
largest over the smallest peak per method: flat memory is a ratio near 1. Same windows as upstream
(192 x 192 x 128, overlap 0.25) unless told otherwise.

Run ``python benchmarks/bench_stitch_memory.py --help``; see ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks._common import ints_arg, write_report  # noqa: E402

METHODS = ("slabs", "whole_grid", "upstream")
FEATURES = 48  # VISTA3D's class-head feature channels
CLASSES = 117  # CT_BODY everything


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--in-plane", type=ints_arg, default=(256, 256), help="model-grid H,W (default 256,256: a "
                   "512 x 512 CT at 0.75 mm resampled to 1.5 mm)")
    p.add_argument("--lengths", type=ints_arg, default=(100, 300, 900), help="model-grid slices D to measure")
    p.add_argument("--patch-size", type=ints_arg, default=(192, 192, 128))
    p.add_argument("--overlap", type=float, default=0.25)
    p.add_argument("--class-chunk-size", type=int, default=16)
    p.add_argument("--max-gb", type=float, default=12.0,
                   help="skip a whole-grid method whose stitched output alone would exceed this many GB")
    p.add_argument("--methods", type=lambda t: tuple(t.split(",")), default=METHODS,
                   help=f"which of {','.join(METHODS)} to run (default: all)")
    p.add_argument("--json", help="also write the figures as JSON here")
    p.add_argument("--one", nargs=2, metavar=("METHOD", "LENGTH"), help=argparse.SUPPRESS)  # the child process
    return p.parse_args(argv)


def _run_one(args: argparse.Namespace, method: str, length: int) -> dict[str, float]:
    """In this (fresh) process: stitch one ``method`` over an ``in_plane x length`` grid; its peak RSS and seconds."""
    import torch
    from monai.inferers import sliding_window_inference

    from nvseg_ray.inference import argmax_over_classes
    from nvseg_ray.slab_stitching import stitch_in_slabs
    from nvseg_ray.timing import peak_rss_mb

    torch.set_num_threads(1)
    torch.manual_seed(0)
    image = torch.rand((1, 1, *args.in_plane, length))
    channels = CLASSES if method == "upstream" else FEATURES
    predictor = torch.nn.Conv3d(1, channels, kernel_size=1).eval()
    embeddings = torch.randn(CLASSES, FEATURES)
    ids = list(range(1, CLASSES + 1))
    device = torch.device("cpu")
    base = peak_rss_mb()
    start = time.perf_counter()
    with torch.inference_mode():
        if method == "slabs":
            labels = stitch_in_slabs(image, predictor, lambda f: argmax_over_classes(f, embeddings, ids,
                                                                                     args.class_chunk_size),
                                     args.patch_size, args.overlap, 1, device)
        else:
            out = sliding_window_inference(image, roi_size=args.patch_size, sw_batch_size=1, predictor=predictor,
                                           overlap=args.overlap, mode="constant", padding_mode="replicate")[0]
            if method == "whole_grid":
                labels = argmax_over_classes(out, embeddings, ids, args.class_chunk_size)
            else:
                labels = out.argmax(dim=0)
            del out
    seconds = time.perf_counter() - start
    assert labels.shape == (*args.in_plane, length)
    return {"peak_rss_mb": round(peak_rss_mb(), 1), "baseline_rss_mb": round(base, 1), "seconds": round(seconds, 2)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.one:
        print(json.dumps(_run_one(args, args.one[0], int(args.one[1]))))
        return 0
    h, w = args.in_plane
    methods = [m for m in METHODS if m in args.methods]
    results: dict[str, dict[str, dict[str, float] | None]] = {m: {} for m in methods}
    passthrough = ["--in-plane", f"{h},{w}", "--patch-size", ",".join(map(str, args.patch_size)),
                   "--overlap", str(args.overlap), "--class-chunk-size", str(args.class_chunk_size)]
    for length in args.lengths:
        for method in methods:
            channels = CLASSES if method == "upstream" else FEATURES
            grid_gb = channels * max(h, args.patch_size[0]) * max(w, args.patch_size[1]) * length * 4 / 2**30
            if method != "slabs" and grid_gb > args.max_gb:
                results[method][str(length)] = None  # would not fit: skipped
                print(f"{method:>10} D={length:4d}: skipped (its stitched output alone is {grid_gb:.1f} GB)")
                continue
            done = subprocess.run([sys.executable, __file__, *passthrough, "--one", method, str(length)],
                                  capture_output=True, text=True, check=True)
            figures = json.loads(done.stdout.strip().splitlines()[-1])
            results[method][str(length)] = figures
            print(f"{method:>10} D={length:4d}: peak {figures['peak_rss_mb']:8.0f} MB  {figures['seconds']:6.1f} s")
    ratios = {}
    for method in methods:
        peaks = [f["peak_rss_mb"] for f in results[method].values() if f]
        ratios[method] = round(max(peaks) / min(peaks), 3) if len(peaks) > 1 else None
    longest = str(max(args.lengths))
    vs = {m: (round(results[m][longest]["peak_rss_mb"] / results["slabs"][longest]["peak_rss_mb"], 2)
              if results.get(m, {}).get(longest) and "slabs" in results else None) for m in ("whole_grid", "upstream")}
    print(f"ratio largest/smallest peak over D={list(args.lengths)}: "
          + ", ".join(f"{m} {r}" for m, r in ratios.items()))
    print(f"at D={longest}: whole_grid/slabs {vs['whole_grid']}, upstream/slabs {vs['upstream']} "
          "(None: skipped, would not fit)")
    write_report({"format": "nvseg-bench-stitch-memory/1", "in_plane": [h, w], "patch_size": list(args.patch_size),
                  "overlap": args.overlap, "results": results, "flatness": ratios, "at_longest_vs_slabs": vs},
                 args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
