#!/usr/bin/env python
"""What the quality control costs per volume, next to the CPU stages every volume pays anyway.

One synthetic CT (by default the 44 M-voxel torso of ``bench_stages``: 488 x 404 x 224 at 0.75 x 0.75 x 1.5 mm, in
HU) and a plausible label map on the same grid (:func:`nvseg_ray.synthetic.torso_labels`, plus ``--blobs`` small
extra structures so the mask has about as many structures as a CT_BODY everything-set run finds). Measured, in
CPU seconds of this process (``time.process_time``) and wall seconds, on ``--threads`` threads:

* QC: ``structure_statistics`` (voxels, ml, HU statistics, bounding box, FOV cut, connected components),
  ``qc_flags``, ``render_preview`` (the PNG), ``thumbnail`` (the run report's) and the two viewer colour tables;
* the CPU stages outside the model, with QC off: ``VolumeStages.read``, ``prepare``, ``finish`` (inversion of a
  model-grid stand-in mask: the foreground of the model input) and ``write_result``.

Prints both and the ratio QC / CPU stages. ``--json`` writes the figures.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402

from benchmarks._common import floats_arg, ints_arg, log, work_folder, write_report  # noqa: E402

QC_STEPS = ("statistics", "flags", "preview", "thumbnail", "colour_tables")
CPU_STAGES = ("read", "preprocess", "postprocess", "write")


def _timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """``fn()``, its wall seconds and this process's CPU seconds (all threads)."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def add_blobs(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """``n`` small spheres (radius 4-9 voxels) of ids 100.. inside the body's bounding box, where no organ is: the
    many small structures (vessels, muscles, vertebrae) of a real everything-set mask."""
    rng = np.random.default_rng(seed)
    shape = np.array(labels.shape)
    for index in range(n):
        r = int(rng.integers(4, 10))
        centre = rng.integers(shape // 4, 3 * shape // 4)
        lo, hi = np.maximum(centre - r, 0), np.minimum(centre + r + 1, shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        grid = np.ogrid[box]
        ball = sum((g - c) ** 2 for g, c in zip(grid, centre)) <= r * r
        region = labels[box]
        region[ball & (region == 0)] = 100 + index
    return labels


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch

    from nvseg_ray.config import InferenceConfig
    from nvseg_ray.labels import LabelCatalog
    from nvseg_ray.output import mask_uri, write_result
    from nvseg_ray.prompts import Prompts
    from nvseg_ray.quality.colour_tables import itksnap_label_description, slicer_color_table
    from nvseg_ray.quality.flags import qc_flags
    from nvseg_ray.quality.preview import render_preview, thumbnail
    from nvseg_ray.quality.statistics import structure_statistics
    from nvseg_ray.stages import VolumeStages
    from nvseg_ray.synthetic import save_like_a_converter, torso_ct, torso_labels

    torch.set_num_threads(args.threads)
    shape, spacing = tuple(args.shape), tuple(args.spacing)
    ct = torso_ct(shape, spacing)
    labels = add_blobs(torso_labels(shape, spacing).astype(np.uint16), args.blobs)
    affine = np.diag([-spacing[0], spacing[1], spacing[2], 1.0])  # the grid torso_labels is anatomical on
    catalog = LabelCatalog.default()
    ids = [int(i) for i in np.unique(labels) if i]
    names = {i: catalog.name(i) for i in ids}
    log(args, f"volume {shape} @ {spacing} mm ({np.prod(shape) / 1e6:.1f} M voxels), {len(ids)} structures, "
              f"{args.threads} thread(s)")

    qc: dict[str, dict[str, float]] = {}
    stats, wall, cpu = _timed(lambda: structure_statistics(labels, ct, affine, names))
    qc["statistics"] = {"wall_s": wall, "cpu_s": cpu}
    flags, wall, cpu = _timed(lambda: qc_flags(stats, labels, ct, affine, modality="CT_BODY", prompted_ids=ids,
                                               everything=True))
    qc["flags"] = {"wall_s": wall, "cpu_s": cpu}
    largest = [(s.id, s.voxels) for s in stats]
    png, wall, cpu = _timed(lambda: render_preview(labels, ct, affine, catalog, modality="CT_BODY", largest=largest))
    qc["preview"] = {"wall_s": wall, "cpu_s": cpu}
    thumb, wall, cpu = _timed(lambda: thumbnail(png))
    qc["thumbnail"] = {"wall_s": wall, "cpu_s": cpu}
    _, wall, cpu = _timed(lambda: (slicer_color_table(catalog, ids), itksnap_label_description(catalog, ids)))
    qc["colour_tables"] = {"wall_s": wall, "cpu_s": cpu}

    # the CPU stages outside the model on the same CT, QC off (what every volume pays without it)
    path = save_like_a_converter(work / "ct.nii.gz", ct, spacing)
    del ct
    cfg = InferenceConfig(checkpoint="unused.pt", modality="CT_BODY", device="cpu",
                          quality={"qc": False, "preview": False, "colour_tables": False})
    stages = VolumeStages(cfg, catalog)
    prompts = Prompts(class_ids=(1,), requested=None, modality="CT_BODY")
    cpu_stages: dict[str, dict[str, float]] = {}
    volume, wall, cpu = _timed(lambda: stages.read(str(path)))
    cpu_stages["read"] = {"wall_s": wall, "cpu_s": cpu}
    prepared, wall, cpu = _timed(lambda: stages.prepare(volume))
    cpu_stages["preprocess"] = {"wall_s": wall, "cpu_s": cpu}
    model_labels = (prepared.image[0].numpy() > 0.5).astype(np.uint8)  # stand-in model output: the foreground
    volume = volume.without_voxels()
    result, wall, cpu = _timed(lambda: stages.finish(model_labels, prepared, volume, prompts))
    cpu_stages["postprocess"] = {"wall_s": wall, "cpu_s": cpu}
    out = mask_uri(str(path), str(work / "out"), cfg)
    _, wall, cpu = _timed(lambda: write_result(result, input_uri=str(path), output_uri=out, cfg=cfg, model_uri=None,
                                               model_sha256=None))
    cpu_stages["write"] = {"wall_s": wall, "cpu_s": cpu}

    qc_cpu = sum(v["cpu_s"] for v in qc.values())
    stages_cpu = sum(v["cpu_s"] for v in cpu_stages.values())
    return {
        "volume": {"shape": list(shape), "spacing_mm": list(spacing), "structures": len(ids)},
        "threads": args.threads,
        "qc": qc, "cpu_stages": cpu_stages,
        "qc_cpu_s": round(qc_cpu, 4), "cpu_stages_cpu_s": round(stages_cpu, 4),
        "ratio": round(qc_cpu / stages_cpu, 4) if stages_cpu else None,
        "flags": [f.code for f in flags],
        "preview_bytes": len(png), "thumbnail_bytes": len(thumb),
    }


def print_report(report: dict[str, Any]) -> None:
    print(f"{'QC step':<16}{'CPU s':>8}{'wall s':>8}    {'CPU stage':<12}{'CPU s':>8}{'wall s':>8}")
    rows = max(len(QC_STEPS), len(CPU_STAGES))
    for i in range(rows):
        left = right = ""
        if i < len(QC_STEPS):
            s = report["qc"][QC_STEPS[i]]
            left = f"{QC_STEPS[i]:<16}{s['cpu_s']:>8.3f}{s['wall_s']:>8.3f}"
        if i < len(CPU_STAGES):
            s = report["cpu_stages"][CPU_STAGES[i]]
            right = f"{CPU_STAGES[i]:<12}{s['cpu_s']:>8.3f}{s['wall_s']:>8.3f}"
        print(f"{left:<32}    {right}")
    print(f"{'QC total':<16}{report['qc_cpu_s']:>8.3f}{'':>8}    {'stages total':<12}{report['cpu_stages_cpu_s']:>8.3f}")
    print(f"ratio QC / CPU stages outside the model: {report['ratio']:.2f}x; preview {report['preview_bytes'] / 1e3:.0f} "
          f"KB, thumbnail {report['thumbnail_bytes'] / 1e3:.1f} KB; flags on this phantom: "
          f"{', '.join(report['flags']) or 'none'}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=ints_arg, default=(488, 404, 224), help="voxels X,Y,Z (default 488,404,224)")
    p.add_argument("--spacing", type=floats_arg, default=(0.75, 0.75, 1.5), help="mm (default 0.75,0.75,1.5)")
    p.add_argument("--blobs", type=int, default=90, help="extra small structures (default 90: ~100 in all)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as a CPU worker)")
    p.add_argument("--work", help="folder for the temporary NIfTI (default: a temporary folder)")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    with work_folder(args.work, "nvseg-bench-quality-") as work:
        report = measure(args, work)
    print_report(report)
    write_report(report, args.json)
    return report


if __name__ == "__main__":
    main()
