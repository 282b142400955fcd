"""``--sw-batch-size auto``: how many sliding windows one forward pass runs, from the device's free memory.

The estimate is per window voxel, for the released network (encoder width 48) under fp16 autocast: the encoder's
first stage alone holds 48 channels per voxel, and the decoder, skip connections and the float32 window output
(48 channels, stitched on the device) come on top. It is deliberately conservative -- a window batch that does
not fit fails the volume, one that is too small only costs some speed (upstream's reviewers found ~14 best on an
A100-80GB, with diminishing returns past a handful).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

#: device bytes one window voxel needs during a forward pass of the released network (fp16 activations of the
#: encoder and decoders plus the float32 48-channel output): ~1 KB, i.e. ~4.7 GB for a 192 x 192 x 128 window.
BYTES_PER_WINDOW_VOXEL = 1024
#: share of the free device memory the window batch may take: the stitched feature slabs, the class-chunked
#: logits and the allocator's fragmentation need the rest.
FREE_MEMORY_FRACTION = 0.5
#: most windows per pass ``auto`` picks: past ~8 the GPU is saturated and a larger batch only costs memory.
MAX_AUTO_WINDOW_BATCH = 8


def window_batch_for_memory(free_bytes: int, patch_size: Sequence[int]) -> int:
    """The window batch that fits ``FREE_MEMORY_FRACTION`` of ``free_bytes``: 1 .. :data:`MAX_AUTO_WINDOW_BATCH`."""
    per_window = BYTES_PER_WINDOW_VOXEL * math.prod(int(p) for p in patch_size)
    fits = int(FREE_MEMORY_FRACTION * max(0, free_bytes) // per_window)
    return max(1, min(MAX_AUTO_WINDOW_BATCH, fits))


def resolve_window_batch(setting: int | str, device: torch.device, patch_size: Sequence[int]) -> int:
    """``setting`` as an integer: itself, or for ``"auto"`` the batch that fits the free memory of a CUDA
    ``device`` (:func:`window_batch_for_memory`), 1 elsewhere (a CPU gains nothing from batching windows)."""
    if setting != "auto":
        return int(setting)
    if device.type != "cuda" or not torch.cuda.is_available():
        return 1
    free, _total = torch.cuda.mem_get_info(device)
    return window_batch_for_memory(free, patch_size)
