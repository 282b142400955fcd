"""Tiny VISTA3D checkpoints and phantom volumes for tests (generated, never downloaded).

The generators live in :mod:`nvseg_ray.synthetic` (shared with the benchmarks); the names are re-exported here
so the tests keep importing them from one place.
"""

from __future__ import annotations

from nvseg_ray.synthetic import TINY_WIDTH, body_phantom, save_volume
from nvseg_ray.synthetic import tiny_state_dict as make_tiny_state_dict

__all__ = ["TEST_PATCH", "TINY_WIDTH", "body_phantom", "make_tiny_state_dict", "save_volume"]

#: small sliding-window patch for CPU tests (multiple of 16, like the real 192x192x128).
TEST_PATCH = (48, 48, 32)
