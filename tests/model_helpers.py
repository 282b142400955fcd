"""Tiny VISTA3D checkpoints and phantom volumes for tests (generated, never downloaded)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import torch

#: small sliding-window patch for CPU tests (multiple of 16, like the real 192x192x128).
TEST_PATCH = (48, 48, 32)
#: embedding width of the tiny test network (the real model uses 48); 8 is the smallest the point head accepts.
TINY_WIDTH = 8


def make_tiny_state_dict(seed: int = 0, in_channels: int = 1, width: int = TINY_WIDTH) -> dict[str, torch.Tensor]:
    """A randomly initialised ``vista3d132`` state dict (~6 M parameters at width 8)."""
    from monai.networks.nets import vista3d132

    torch.manual_seed(seed)
    return vista3d132(encoder_embed_dim=width, in_channels=in_channels).state_dict()


def body_phantom(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """A CT-like int16 volume: air (-1000) around an ellipsoidal body with organs of different HU."""
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


def save_volume(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    """Save with qform and sform both set (code 1 = scanner), as scanners' converters do."""
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, 1)
    img.set_sform(affine, 1)
    nib.save(img, str(path))
    return path
