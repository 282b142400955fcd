"""Synthetic data shared by the tests and the benchmarks: CT-like phantoms, the writers that save them the way
real files arrive, and tiny randomly initialised checkpoints. Nothing here is downloaded; every generator is
seeded, so a (shape, seed) pair always gives the same array.

* :func:`body_phantom` -- a small int16 CT with organs of different HU (air around an ellipsoid body, "liver",
  "spleen", "spine"): the volume most engine, batch and Serve tests segment.
* :func:`tissue_phantom` -- a float64 body with a smooth 0..300 HU gradient, of any rank (extra axes repeat the
  volume): for header/dtype tests, whose values must survive a cast to any on-disk dtype.
* :func:`torso_ct` -- an int16 CT with adult-torso proportions in mm (fat layer, organs, vertebral column, lungs,
  gas), built slab by slab so that benchmark-sized volumes (hundreds of M voxels) fit in little memory.
* :func:`torso_labels` -- a uint8 label map (global class ids) with :func:`torso_ct`'s body outline and in-plane
  organ positions, adult-sized organs, anatomically correct for the affine ``diag(-sx, sy, sz)`` (QC tests).
* :func:`save_volume` / :func:`save_like_a_converter` -- NIfTI writers (qform = sform, code 1).
* :func:`tiny_state_dict` -- the real ``vista3d132`` architecture with narrow convolutions (~6 M parameters);
  :func:`tiny_network` builds it.

Synthetic brain T1 heads (registered to a template) live in :mod:`nvseg_ray.brain.phantom`, next to the template
code they need.

Arrays are indexed (i, j, k) = (x, y, z) voxel axes; HU values are CT Hounsfield units.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np

if TYPE_CHECKING:
    import torch

#: Embedding width of the tiny generated network (the released model uses 48); 8 is the smallest the point head
#: accepts.
TINY_WIDTH = 8


def body_phantom(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """A CT-like int16 (X, Y, Z) volume of ``shape``: air (-1000 HU) around an ellipsoidal body (30) with a
    "liver" (120), a "spleen" (60) and a "spine" (700); ``seed`` draws the noise (sigma 15 HU, inside the body)."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    x, y, z = grids
    vol = np.full(shape, -1000.0)
    body = x**2 / 0.8 + y**2 / 0.6 + z**2 < 0.9
    vol[body] = 30.0
    vol[body & ((x - 0.3) ** 2 + y**2 + z**2 < 0.12)] = 120.0  # "liver"
    vol[body & ((x + 0.35) ** 2 + (y - 0.1) ** 2 + z**2 < 0.05)] = 60.0  # "spleen"
    vol[body & (x**2 + (y + 0.45) ** 2 < 0.02)] = 700.0  # "spine"
    vol += rng.normal(0, 15, shape) * body
    return vol.astype(np.int16)


def tissue_phantom(shape: Sequence[int], seed: int = 0) -> np.ndarray:
    """CT-like float64 volume of ``shape`` (spatial axes first): -1000 HU air outside an ellipsoid body,
    soft tissue 0..300 HU inside (a smooth gradient plus a little noise); extra axes repeat the volume."""
    spatial = tuple(int(n) for n in shape[:3])
    axes = [np.linspace(-1.0, 1.0, n) if n > 1 else np.zeros(1) for n in spatial]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    inside = (x / 0.8) ** 2 + (y / 0.7) ** 2 + (z / 0.9) ** 2 <= 1.0
    rng = np.random.default_rng(seed)
    tissue = 150.0 + 100.0 * x + 40.0 * z + rng.normal(0.0, 5.0, spatial)
    vol = np.where(inside, np.clip(tissue, 0.0, 300.0), -1000.0)
    extra = tuple(int(n) for n in shape[3:])
    return np.broadcast_to(vol.reshape(spatial + (1,) * len(extra)), spatial + extra).copy()


def torso_ct(shape: Sequence[int], spacing: Sequence[float], seed: int = 0) -> np.ndarray:
    """A CT-like int16 volume in HU with adult-torso proportions, built slab by slab (little memory).

    An elliptic-cylinder body (at most 340 x 240 mm, less in a small field of view) with a subcutaneous
    fat layer (-100 HU), soft tissue (40), liver (60), spleen (50), kidneys (30), aorta (45), a vertebral
    column (cancellous 300, cortical 900), lungs (-850) in the upper quarter, a few gas pockets (-900),
    air (-1000) around it, and Gaussian noise (sigma 15 HU) everywhere. The crop on HU > 0 therefore keeps
    the body's bounding box, as on a real abdominal CT.

    Args:
        shape: (X, Y, Z) voxels.
        spacing: voxel size in mm per axis (sets the body's size in voxels).
        seed: draws the gas pockets and the noise, so the volumes of a benchmark run are not identical.
    """
    nx, ny, nz = (int(s) for s in shape)
    sx, sy, sz = (float(s) for s in spacing)
    a = min(170.0, 0.42 * nx * sx)  # lateral semi-axis, mm
    b = min(120.0, 0.30 * ny * sy)  # antero-posterior semi-axis, mm
    u = (((np.arange(nx) - (nx - 1) / 2) * sx) / a).astype(np.float32)[:, None, None]
    v = (((np.arange(ny) - (ny - 1) / 2) * sy) / b).astype(np.float32)[None, :, None]
    w_all = np.linspace(-1, 1, nz, dtype=np.float32)  # normalised cranio-caudal position, +1 = cranial
    fat = 0.12  # fat layer thickness relative to the semi-axes

    body = (u**2 + v**2) < 1.0
    inner = (u / (1 - fat)) ** 2 + (v / (1 - fat)) ** 2 < 1.0
    r_vert, r_aorta = 0.16 * b, 0.1 * b  # circles in mm: vertebral body, aorta
    r_spine = (u * a / r_vert) ** 2 + ((v + 0.62) * b / r_vert) ** 2
    aorta = ((u - 0.05) * a / r_aorta) ** 2 + ((v + 0.32) * b / r_aorta) ** 2 < 1.0
    rng = np.random.default_rng(seed)
    gas = [(rng.uniform(-0.5, 0.5), rng.uniform(-0.2, 0.5), rng.uniform(-0.8, 0.0), rng.uniform(0.04, 0.09))
           for _ in range(6)]

    out = np.empty((nx, ny, nz), dtype=np.int16)
    slab = 16
    for z0 in range(0, nz, slab):
        w = w_all[None, None, z0 : z0 + slab]
        k = w.shape[2]
        vol = np.where(body, np.where(inner, 40.0, -100.0), -1000.0).astype(np.float32)
        vol = np.broadcast_to(vol, (nx, ny, k)).copy()

        def put(mask: np.ndarray, hu: float, vol: np.ndarray = vol) -> None:
            vol[np.broadcast_to(mask & inner, vol.shape)] = hu

        put(((u + 0.4) / 0.38) ** 2 + ((v - 0.15) / 0.5) ** 2 + ((w - 0.25) / 0.3) ** 2 < 1, 60.0)  # liver
        put(((u - 0.55) / 0.15) ** 2 + ((v + 0.1) / 0.25) ** 2 + ((w - 0.3) / 0.15) ** 2 < 1, 50.0)  # spleen
        for side in (-1, 1):  # kidneys
            put(((u - side * 0.35) / 0.12) ** 2 + ((v + 0.45) / 0.18) ** 2 + (w / 0.15) ** 2 < 1, 30.0)
        put(aorta & (w < 0.6), 45.0)
        for gu, gv, gw, gr in gas:
            put((u - gu) ** 2 + (v - gv) ** 2 + (w - gw) ** 2 < gr**2, -900.0)
        for side in (-1, 1):  # lungs, upper quarter
            put((((u - side * 0.45) / 0.33) ** 2 + ((v - 0.1) / 0.55) ** 2 < 1) & (w > 0.5), -850.0)
        put(r_spine < 1.0, 900.0)
        put(r_spine < 0.6, 300.0)
        vol += rng.standard_normal(vol.shape, dtype=np.float32) * 15.0
        out[:, :, z0 : z0 + k] = np.clip(np.rint(vol), -1024, 3071).astype(np.int16)
    return out


def torso_labels(shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """A plausible uint8 (X, Y, Z) label map of global class ids for the same geometry as :func:`torso_ct`.

    The body outline (elliptic cylinder, fat layer) and the in-plane organ centres are those of
    :func:`torso_ct` (so the labels overlay its organs in-plane), but organ *sizes* and cranio-caudal positions
    are in absolute mm (torso_ct's scale with the field of view, so its organ HU only partly coincide with these
    labels), sized to adult volumes, and every structure ends inside the scan when it covers
    at least ~235 mm cranio-caudally and ~340 x 240 mm in-plane (e.g. shape (240, 200, 160) at 1.5 mm): then no
    structure touches the grid's border. A shorter scan cuts the organs off, as a real one would. Organs are
    clipped to the body's inner (non-fat) region; later ones overwrite earlier ones (liver, spleen, kidneys,
    aorta, vertebrae, lungs). Volumes at (240, 200, 160) x 1.5 mm: liver ~1.5 l, spleen ~0.2 l, kidneys
    ~0.17 l each.

    Ids (default catalog): liver 1, spleen 3, right kidney 5, left kidney 14, aorta 6, vertebrae L2 36, L1 37,
    T12 38, left lung lower lobe 29, right lung lower lobe 32.

    Orientation: with the affine ``diag(-sx, sy, sz, 1)`` (any translation) -- i increases towards the
    patient's Left, j towards Anterior, k towards Superior -- the phantom is anatomically correct in RAS+
    world coordinates: the liver, right kidney and right lung lie at low i = *larger* world x (the patient's
    right), the spleen, left kidney and left lung at high i (smaller world x), the spine posterior (low j) with
    the aorta in front of it and slightly to the left, the lungs cranial (high k). (:func:`write_torso_ct`'s
    converter affine ``diag(-sx, -sy, sz)`` gives the same left/right but puts the spine anterior.)

    Args:
        shape: (X, Y, Z) voxels.
        spacing: voxel size in mm per axis.
    """
    nx, ny, nz = (int(s) for s in shape)
    sx, sy, sz = (float(s) for s in spacing)
    a = min(170.0, 0.42 * nx * sx)  # body semi-axes in mm, as in torso_ct
    b = min(120.0, 0.30 * ny * sy)
    fat = 0.12
    centre = np.array([(nx - 1) / 2, (ny - 1) / 2, (nz - 1) / 2])
    step = np.array([sx, sy, sz])
    u = (((np.arange(nx) - centre[0]) * sx) / a).astype(np.float32)[:, None]
    v = (((np.arange(ny) - centre[1]) * sy) / b).astype(np.float32)[None, :]
    inner = (u / (1 - fat)) ** 2 + (v / (1 - fat)) ** 2 < 1.0  # (X, Y)
    out = np.zeros((nx, ny, nz), dtype=np.uint8)

    def put(label: int, c_mm: Sequence[float], semi_mm: Sequence[float], cylinder_z: tuple[float, float] | None = None
            ) -> None:
        """Fill an ellipsoid (or, with ``cylinder_z`` = (z0, z1) mm, an elliptic cylinder) centred at ``c_mm``
        (mm from the grid centre), clipped to ``inner``, evaluated inside its own index box only."""
        c, r = np.asarray(c_mm, dtype=float), np.asarray(semi_mm, dtype=float)
        lo_mm, hi_mm = c - r, c + r
        if cylinder_z is not None:
            lo_mm[2], hi_mm[2] = cylinder_z
        lo = np.maximum(np.floor(lo_mm / step + centre), 0).astype(int)
        hi = np.minimum(np.ceil(hi_mm / step + centre), np.array([nx, ny, nz]) - 1).astype(int)
        if np.any(hi < lo):
            return
        axes = [((np.arange(lo[d], hi[d] + 1) - centre[d]) * step[d] - c[d]) / r[d] for d in range(3)]
        x, y, z = axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]
        if cylinder_z is None:
            inside = x**2 + y**2 + z**2 < 1.0
        else:
            zz = axes[2] * r[2] + c[2]
            inside = (x**2 + y**2 < 1.0) & ((zz >= cylinder_z[0]) & (zz <= cylinder_z[1]))[None, None, :]
        inside &= inner[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, None]
        out[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1][inside] = label

    put(1, (-0.4 * a, 0.15 * b, 15.0), (80.0, 70.0, 65.0))  # liver, patient's right (low i)
    put(3, (0.55 * a, -0.1 * b, 35.0), (25.0, 45.0, 45.0))  # spleen, left (high i)
    put(5, (-0.35 * a, -0.45 * b, -30.0), (30.0, 25.0, 55.0))  # right kidney
    put(14, (0.35 * a, -0.45 * b, -25.0), (30.0, 25.0, 55.0))  # left kidney (a little higher, as usual)
    r_aorta, r_vert = 0.1 * b, 0.16 * b
    put(6, (0.05 * a, -0.32 * b, 0.0), (r_aorta, r_aorta, 1.0), cylinder_z=(-90.0, 85.0))  # aorta
    for label, (z0, z1) in ((36, (-48.0, -23.0)), (37, (-20.0, 5.0)), (38, (8.0, 31.0))):  # L2, L1, T12
        put(label, (0.0, -0.62 * b, 0.0), (r_vert, r_vert, 1.0), cylinder_z=(z0, z1))
    put(32, (-0.45 * a, 0.1 * b, 95.0), (0.33 * a, 0.55 * b, 20.0))  # right lung lower lobe (base)
    put(29, (0.45 * a, 0.1 * b, 95.0), (0.33 * a, 0.55 * b, 20.0))  # left lung lower lobe (base)
    return out


def write_torso_ct(path: Path, shape: Sequence[int], spacing: Sequence[float], seed: int = 0) -> Path:
    """Save :func:`torso_ct` as a DICOM converter would (:func:`save_like_a_converter`)."""
    return save_like_a_converter(path, torso_ct(shape, spacing, seed), spacing)


def save_volume(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    """Save with qform and sform both set (code 1 = scanner), as scanners' converters do."""
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, 1)
    img.set_sform(affine, 1)
    nib.save(img, str(path))
    return path


def save_like_a_converter(path: Path, array: np.ndarray, spacing: Sequence[float]) -> Path:
    """Save a generated CT as DICOM converters do: LPS-flipped axes centred on the volume, qform = sform (code 1)."""
    shape = array.shape
    sx, sy, sz = (float(s) for s in spacing)
    affine = np.diag([-sx, -sy, sz, 1.0])
    affine[:3, 3] = [(shape[0] - 1) / 2 * sx, (shape[1] - 1) / 2 * sy, -(shape[2] - 1) / 2 * sz]
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, 1)
    img.set_sform(affine, 1)
    nib.save(img, str(path))
    return path


def tiny_state_dict(seed: int = 0, in_channels: int = 1, width: int = TINY_WIDTH) -> dict[str, torch.Tensor]:
    """A randomly initialised ``vista3d132`` state dict (~6 M parameters at width 8), the same for the same seed."""
    import torch
    from monai.networks.nets import vista3d132

    torch.manual_seed(seed)
    return vista3d132(encoder_embed_dim=width, in_channels=in_channels).state_dict()


def tiny_network(seed: int = 0, in_channels: int = 1, width: int = TINY_WIDTH) -> "torch.nn.Module":
    """The network of :func:`tiny_state_dict` (CPU, eval mode): for tests of the network's own paths (export,
    compile, predictor) that need no checkpoint file."""
    from monai.networks.nets import vista3d132

    net = vista3d132(encoder_embed_dim=width, in_channels=in_channels)
    net.load_state_dict(tiny_state_dict(seed=seed, in_channels=in_channels, width=width))
    return net.eval()
