"""Admission control for the batch pipeline: at most ``limit`` volumes between "read starts" and "mask written".

Ray's own backpressure is byte-based (an object-store budget) and, with one small volume per task, lets every
volume of a large job be read and preprocessed long before the model catches up (measured with Ray Data: all
80 of 80 volumes in flight, first mask after 73 % of the run). This module bounds the pipeline by *count*.

The bound is kept by the driver (:mod:`.pipeline`), which is the only place that submits work: it starts
a volume's read/preprocess task only when :meth:`InFlightWindow.acquire` succeeds and calls
:meth:`InFlightWindow.release` when that volume's last stage returned -- written, failed in any stage, or
lost with its worker. No task ever waits for a slot, so nothing a scheduler does to downstream work
(backpressure, queueing, retries) can wedge admission.

(An earlier design gated admission inside the Ray Data pipeline, with a 0-CPU map task blocking on a
semaphore actor that only the last stage released. Ray Data's downstream-capacity backpressure then held
the last stage's queued tasks while the gate task waited for them: a deadlock, hit whenever failed
volumes -- which reach the last stage quickly and in bursts -- outnumbered the bound.)

Memory then stays flat however many volumes a job has: at most ``limit`` model inputs, label maps and
inversion records exist at any time (plus the URI rows, a few hundred bytes each).
"""

from __future__ import annotations

#: volumes in flight per model actor (one running, one queued for it, one being written) ...
IN_FLIGHT_PER_ACTOR = 3
#: ... plus one per CPU-stage task the cluster can run at once, and at least this many.
IN_FLIGHT_EXTRA = 2


def default_in_flight(max_actors: int, cpu_task_slots: int = 0) -> int:
    """The default bound: enough to keep ``max_actors`` model actors fed and ``cpu_task_slots`` CPU-stage tasks
    busy (slow CPU stages, such as the brain workflow's registration, need every core), but independent of the
    number of volumes."""
    return IN_FLIGHT_PER_ACTOR * max_actors + max(IN_FLIGHT_EXTRA, cpu_task_slots)


class InFlightWindow:
    """A keyed, non-blocking counting window: at most ``limit`` distinct keys held at once (driver-side).

    Keys are volumes' output URIs. :meth:`acquire` never waits: it says whether the key got (or already
    had) a slot. Both calls are idempotent per key, so a volume handled twice never leaks or double-counts.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self.limit = limit
        self.held: set[str] = set()
        self.peak = 0

    def has_room(self) -> bool:
        """Whether a new key would get a slot now."""
        return len(self.held) < self.limit

    def acquire(self, key: str) -> bool:
        """Take a slot for ``key`` when one is free (True at once if ``key`` already holds one); False when full."""
        if key not in self.held:
            if not self.has_room():
                return False
            self.held.add(key)
            self.peak = max(self.peak, len(self.held))
        return True

    def release(self, key: str) -> int:
        """Free ``key``'s slot (no-op when it holds none); returns the count still held."""
        self.held.discard(key)
        return len(self.held)

    def stats(self) -> dict[str, int]:
        """``{"limit", "held", "peak"}``: the bound, the slots held now, the most ever held at once."""
        return {"limit": self.limit, "held": len(self.held), "peak": self.peak}
