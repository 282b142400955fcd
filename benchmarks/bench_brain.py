#!/usr/bin/env python
"""Brain T1 workflow: seconds per stage per scan (skull strip, N4, normalisation, registration, resampling, model
preprocessing, inference, inversion, revert, write) on synthetic heads.

The heads are built from the brain template (default: the ICBM152 2009a 1 mm template shipped in nilearn) plus a
generated skull/scalp shell, moved by known rotations/translations/scalings onto anisotropic, oblique grids
(``nvseg_ray.brain.phantom``), so every run also reports the registration residual at the brain's bounding-box
corners against the known transform. Inference uses a tiny generated checkpoint (width 8) unless
``--checkpoint`` is given; it is not the subject here (on a GPU with the real model it is well under a second).

Run ``python benchmarks/bench_brain.py --help``; see ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks._common import classes_arg, ints_arg, log, work_folder, write_report, write_tiny_checkpoint  # noqa: E402

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402

#: (rotation deg, translation mm, scale, grid spacing mm, grid rotation deg) per generated head.
HEADS = [
    ((12, -8, 15), (6, -10, 4), (1.08, 0.95, 1.02), (1.0, 1.0, 1.2), (5, 10, -7)),
    ((-15, 5, 0), (-12, 8, 15), (0.92, 0.92, 0.92), (0.9, 0.9, 3.0), (0, 0, 25)),
    ((4, 6, -3), (2, 0, -6), (1.0, 1.03, 0.98), (1.2, 1.2, 1.2), (0, 0, 0)),
]
BRAIN_STEPS = ("brain_skullstrip", "brain_bias_correct", "brain_normalize", "brain_register", "brain_resample")
COLUMNS = ("read", *BRAIN_STEPS, "model_prep", "infer", "invert", "brain_revert", "write")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=3, help="number of heads (cycles through 3 geometries)")
    p.add_argument("--checkpoint", help="model weights (default: a tiny generated checkpoint)")
    p.add_argument("--classes", type=classes_arg, help="classes instead of the MRI_BRAIN everything-set, e.g. 214,215")
    p.add_argument("--patch-size", type=ints_arg, default=(192, 192, 128))
    p.add_argument("--device", default="cpu")
    p.add_argument("--brain-template", help="template path/URI (default: ICBM152 2009a from nilearn)")
    p.add_argument("--brain-template-mask")
    p.add_argument("--skip-infer", action="store_true", help="stop after the brain preprocessing")
    p.add_argument("--workdir", help="keep the heads and masks here")
    p.add_argument("--json", help="write every number here")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from nvseg_ray.brain.phantom import rigid_scale_matrix, synthetic_head
    from nvseg_ray.brain.registration import map_points
    from nvseg_ray.brain.template import load_template
    from nvseg_ray.config import InferenceConfig
    from nvseg_ray.model_runner import ModelRunner
    from nvseg_ray.output import write_result
    from nvseg_ray.prompts import resolve_prompts
    from nvseg_ray.stages import VolumeStages

    args = parse_args(argv)
    template = load_template(args.brain_template, args.brain_template_mask)
    centre = template.affine[:3, :3] @ (np.array(template.shape) / 2) + template.affine[:3, 3]
    idx = np.array(np.nonzero(template.mask))
    corners = np.array([[a, b, c] for a in (idx.min(1)[0], idx.max(1)[0]) for b in (idx.min(1)[1], idx.max(1)[1])
                        for c in (idx.min(1)[2], idx.max(1)[2])], float) @ template.affine[:3, :3].T \
        + template.affine[:3, 3]
    rows = []
    with work_folder(args.workdir, "nvseg-bench-brain-") as work:
        checkpoint = args.checkpoint
        if checkpoint is None:
            checkpoint = str(write_tiny_checkpoint(work / "tiny.pt"))
        cfg = InferenceConfig(checkpoint=checkpoint, modality="MRI_BRAIN", classes=args.classes or None,
                              device=args.device, patch_size=args.patch_size,
                              brain={"template": args.brain_template, "template_mask": args.brain_template_mask})
        stages, runner = VolumeStages(cfg), ModelRunner(cfg)  # the weights load on the first infer
        prompts = resolve_prompts(cfg, stages.catalog)
        for i in range(args.n):
            rot, shift, scale, spacing, grid_rot = HEADS[i % len(HEADS)]
            truth = rigid_scale_matrix(rot, shift, scale, centre)
            head = synthetic_head(template, truth, spacing=spacing, grid_rotation_deg=grid_rot, seed=i)
            path = work / f"head_{i}.nii.gz"
            nib.save(nib.Nifti1Image(head.array, head.affine), path)
            t: dict[str, float] = {}
            volume = stages.read(str(path), t)
            prepared = stages.prepare(volume, t)
            t["model_prep"] = t["preprocess"] - sum(t[s] for s in BRAIN_STEPS if s in t)
            residual = np.linalg.norm(map_points(np.asarray(prepared.brain.template_to_input), corners)
                                      - map_points(truth, corners), axis=1).max()
            row = {"head": i, "shape": list(head.array.shape), "spacing": list(spacing),
                   "residual_mm": round(float(residual), 3), "correlation": prepared.brain.correlation,
                   "brain_ml": prepared.brain.brain_ml, "true_brain_ml": round(float(
                       head.brain_mask.sum() * abs(np.linalg.det(head.affine[:3, :3])) / 1000), 1)}
            if not args.skip_infer:
                labels = runner.infer(prepared, prompts, t)
                result = stages.finish(labels, prepared, volume, prompts, t)
                t["invert"] = t["postprocess"] - t.get("brain_revert", 0.0)
                write_result(result, input_uri=str(path), output_uri=str(work / f"head_{i}_trans.nii.gz"), cfg=cfg,
                             model_uri=checkpoint, model_sha256=None)
                t["write"] = result.timings["write"]
            row.update({c: round(t[c], 3) for c in COLUMNS if c in t})
            rows.append(row)
            log(args, f"head {i}: {head.array.shape} @ {spacing} mm, residual {residual:.2f} mm, "
                      + ", ".join(f"{c} {t[c]:.2f}" for c in COLUMNS if c in t))
    present = [c for c in COLUMNS if all(c in r for r in rows)]
    print("\nseconds per stage per scan (template %s, %s)" % (template.name, "tiny model" if args.checkpoint is None
                                                                 else args.checkpoint))
    print("head  shape            " + "  ".join(f"{c.replace('brain_', ''):>11}" for c in present)
          + "  residual mm  corr")
    for r in rows:
        print(f"{r['head']:>4}  {str(tuple(r['shape'])):<15}  " + "  ".join(f"{r[c]:>11.2f}" for c in present)
              + f"  {r['residual_mm']:>11.2f}  {r['correlation']:.3f}")
    print("mean  " + " " * 15 + "  " + "  ".join(f"{np.mean([r[c] for r in rows]):>11.2f}" for c in present))
    write_report({"template": template.name, "rows": rows}, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
