"""Stage timing: one helper every stage uses (the engine, the brain workflow, the batch job's write stage).

It sits below everything that times a stage (it imports nothing from the package), so that e.g.
:mod:`nvseg_ray.brain` can time its steps without importing :mod:`nvseg_ray.engine`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["timed"]


@contextmanager
def timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    """Add the wall-clock seconds (``time.perf_counter``) spent in the block to ``timings[stage]``.

    The time is added even when the block raises, so a failed stage still shows how long it ran.
    """
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start
