"""Asynchronous jobs of the HTTP service, independent of Ray Serve (``serve_apps/app.py`` wires them).

* :class:`JobTable` -- the job records (the ``JobStore`` deployment holds one). Each queued/running job names
  its ``owner`` (the Gateway replica running it); owners heart-beat, and a job whose owner has been silent for
  longer than the lease is reported ``failed`` with code :data:`CODE_JOB_ORPHANED` (the Gateway crashed or was
  replaced; the job will never finish).
* :class:`~nvseg_ray.errors.JobsFull` -- 503 at submit when a Gateway already holds its bound of queued + running jobs.
"""

from __future__ import annotations

import time
from typing import Any

from ..redaction import redact

CODE_JOB_ORPHANED = "job_orphaned"
#: statuses a job can leave; the others (succeeded, failed) are final.
ACTIVE_STATUSES = ("queued", "running")


class JobTable:
    """Job records keyed by id, with owner leases (all times: ``time.time()`` seconds).

    Args:
        lease_s: a queued/running job whose owner has not heart-beaten for this long is orphaned.
    """

    def __init__(self, lease_s: float) -> None:
        self.lease_s = float(lease_s)
        self.jobs: dict[str, dict[str, Any]] = {}
        self.beats: dict[str, float] = {}  # owner id -> last heartbeat

    def heartbeat(self, owner: str, now: float | None = None) -> None:
        self.beats[owner] = time.time() if now is None else now

    def put(self, job: dict[str, Any], now: float | None = None) -> None:
        """Create or update ``job["job_id"]`` (a record with an ``owner`` also counts as that owner's heartbeat)."""
        now = time.time() if now is None else now
        if job.get("owner"):
            self.beats[job["owner"]] = now
        job = redact(job)  # image / output_uri / error texts: no user-info, no signatures (shown by GET /v1/jobs)
        self.jobs[job["job_id"]] = {**self.jobs.get(job["job_id"], {}), **job, "updated": now}

    def get(self, job_id: str, now: float | None = None) -> dict[str, Any] | None:
        """The job's record (without its owner id), failed as :data:`CODE_JOB_ORPHANED` when its owner is gone."""
        now = time.time() if now is None else now
        job = self.jobs.get(job_id)
        if job is None:
            return None
        if job.get("status") in ACTIVE_STATUSES:
            last = self.beats.get(job.get("owner", ""), job.get("updated", now))
            if now - last > self.lease_s:
                job.update(status="failed", updated=now, error={
                    "code": CODE_JOB_ORPHANED,
                    "message": f"the service replica running this job stopped (no heartbeat for {now - last:.0f}s)",
                    "hint": "submit the job again"})
        return {k: v for k, v in job.items() if k != "owner"}
