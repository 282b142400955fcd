"""Admission control for the batch pipeline: at most ``limit`` volumes between "read starts" and "mask written".

Ray Data's own backpressure is byte-based (an object-store budget per operator) and, with one small volume per
block, lets every volume of a large job be read and preprocessed long before the model catches up (measured:
all 80 of 80 volumes in flight, first mask after 73 % of the run). This module bounds the pipeline by *count*:

* :class:`InFlightLimiter` is a keyed counting semaphore (plain asyncio, hosted by a Ray actor). A key is a
  volume's output URI; ``acquire`` waits until fewer than ``limit`` keys are held, ``release`` frees a key.
  Both are idempotent per key, so Ray's retries (a re-executed task after a worker died) never leak or
  double-count a slot.
* :func:`admit` is a 0-CPU gate stage placed before read/preprocess: it blocks on ``acquire`` and passes the
  row through. Because it reserves no CPU, waiting in it never takes a core from postprocessing, which is
  what frees the slots (:func:`release` runs at the end of the write stage).

Memory then stays flat however many volumes a job has: at most ``limit`` model inputs, label maps and
inversion records exist at any time (plus the URI rows, a few hundred bytes each).
"""

from __future__ import annotations

import asyncio
from typing import Any

#: volumes in flight per model actor (one running, one queued for it, one being written) ...
IN_FLIGHT_PER_ACTOR = 3
#: ... plus one per CPU-stage task the cluster can run at once, and at least this many.
IN_FLIGHT_EXTRA = 2


def default_in_flight(max_actors: int, cpu_task_slots: int = 0) -> int:
    """The default bound: enough to keep ``max_actors`` model actors fed and ``cpu_task_slots`` CPU-stage tasks
    busy (slow CPU stages, such as the brain workflow's registration, need every core), but independent of the
    number of volumes."""
    return IN_FLIGHT_PER_ACTOR * max_actors + max(IN_FLIGHT_EXTRA, cpu_task_slots)


class InFlightLimiter:
    """A keyed counting semaphore: at most ``limit`` distinct keys held at once (use as an async Ray actor)."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self.limit = limit
        self.held: set[str] = set()
        self.peak = 0
        self._changed = asyncio.Condition()

    async def acquire(self, key: str) -> int:
        """Wait for a free slot and take it for ``key`` (at once if ``key`` already holds one); returns the count."""
        async with self._changed:
            await self._changed.wait_for(lambda: key in self.held or len(self.held) < self.limit)
            self.held.add(key)
            self.peak = max(self.peak, len(self.held))
            return len(self.held)

    async def release(self, key: str) -> int:
        """Free ``key``'s slot (no-op when it holds none); returns the count."""
        async with self._changed:
            self.held.discard(key)
            self._changed.notify_all()
            return len(self.held)

    async def stats(self) -> dict[str, int]:
        """``{"limit", "held", "peak"}``: the bound, the slots held now, the most ever held at once."""
        return {"limit": self.limit, "held": len(self.held), "peak": self.peak}


def admit(row: dict[str, Any], limiter: Any) -> dict[str, Any]:
    """Gate stage (Ray Data map, 0 CPUs): block until ``limiter`` (an :class:`InFlightLimiter` actor handle)
    gives ``row`` a slot, then pass the row on unchanged."""
    import ray

    ray.get(limiter.acquire.remote(row["output_uri"]))
    return row


def release(row: dict[str, Any], limiter: Any) -> None:
    """Free ``row``'s slot once its mask and report are written (or it failed)."""
    import ray

    ray.get(limiter.release.remote(row["output_uri"]))
