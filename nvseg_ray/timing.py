"""Stage timing: one helper every stage uses (the engine, the brain workflow, the batch job's write stage).

It sits below everything that times a stage (it imports nothing from the package), so that e.g.
:mod:`nvseg_ray.brain` can time its steps without importing :mod:`nvseg_ray.engine`.

:func:`timed` adds a stage's wall seconds to a plain ``dict``. Given a :class:`StageTimings` (a ``dict`` of wall
seconds that also carries ``cpu_s`` and ``peak_rss_mb``), it also records the stage's CPU seconds (process time:
every thread of the process, torch's intra-op threads included) and the process's peak resident memory during
the stage (Linux: the kernel's high-water mark, reset at the start of the stage through
``/proc/self/clear_refs``; elsewhere the process's lifetime peak, which is an upper bound).
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["STAGES", "StageTimings", "peak_rss_mb", "timed"]

#: The stages every volume goes through, in order (reports, CLI summaries and the batch manifest's columns).
STAGES = ("read", "preprocess", "infer", "postprocess", "qc", "write", "seg")

_CLEAR_REFS = "/proc/self/clear_refs"
_STATUS = "/proc/self/status"


class StageTimings(dict):
    """Wall seconds per stage (the ``dict`` itself), plus ``cpu_s`` (process CPU seconds per stage) and
    ``peak_rss_mb`` (peak resident memory of the process during each stage, MB). Picklable (Ray rows)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.cpu_s: dict[str, float] = {}
        self.peak_rss_mb: dict[str, float] = {}
        self._open: list[str] = []  # stages running now, outermost first
        self._inner_peak: dict[str, float] = {}  # highest peak of the stages nested in each open stage

    def __reduce__(self):  # noqa: ANN204 - pickle protocol
        return (_rebuild, (dict(self), self.cpu_s, self.peak_rss_mb))


def _rebuild(wall: dict, cpu: dict, peak: dict) -> StageTimings:
    out = StageTimings(wall)
    out.cpu_s.update(cpu)
    out.peak_rss_mb.update(peak)
    return out


def _reset_peak() -> None:
    """Reset the kernel's resident-memory high-water mark of this process (Linux >= 4.0; elsewhere a no-op)."""
    try:
        with open(_CLEAR_REFS, "w") as handle:
            handle.write("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    """The process's peak resident memory in MB: ``VmHWM`` (since the last reset), else ``ru_maxrss``."""
    try:
        with open(_STATUS) as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024.0  # bytes on macOS, KB on Linux


@contextmanager
def timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    """Add the wall-clock seconds (``time.perf_counter``) spent in the block to ``timings[stage]``; for a
    :class:`StageTimings`, also its CPU seconds and peak memory (see the module docstring).

    The figures are added even when the block raises, so a failed stage still shows what it cost. Nested stages
    (the brain steps inside ``preprocess``) each reset the memory mark, so the outer stage's peak is the largest
    of what was measured after its last inner stage and the inner stages' own peaks (kept for it).
    """
    measure = isinstance(timings, StageTimings)
    if measure:
        timings._open.append(stage)
        _reset_peak()
        cpu = time.process_time()
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start
        if measure:
            timings._open.pop()
            timings.cpu_s[stage] = timings.cpu_s.get(stage, 0.0) + time.process_time() - cpu
            peak = max(peak_rss_mb(), timings._inner_peak.pop(stage, 0.0))
            timings.peak_rss_mb[stage] = max(timings.peak_rss_mb.get(stage, 0.0), peak)
            for outer in timings._open:  # an inner stage reset the mark: its outer stages keep its peak
                timings._inner_peak[outer] = max(timings._inner_peak.get(outer, 0.0), peak)
