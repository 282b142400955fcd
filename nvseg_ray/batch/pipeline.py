"""The Ray Data wiring of the batch job: a thin layer over :mod:`.stages`.

    plan (driver) -> admit (0-CPU gate) -> read+preprocess (CPU tasks) -> model (actor pool, GPU when present)
                  -> invert+encode+write (CPU tasks, frees the slot) -> manifest (driver)

Rows carry URIs and compact payloads, one volume per block. The gate (:mod:`.admission`) keeps at most
``max_in_flight`` volumes between "read starts" and "mask written", so memory stays flat however many volumes
there are. Per-row error handling lives in the stages; this module adds placement (resources), retries of
crashed model actors (bounded per volume through an attempt counter actor), progress reporting and the
manifest.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

from ..config import InferenceConfig
from ..engine import Segmenter
from ..errors import EXIT_VOLUMES_FAILED, NvsegError
from ..labels import LabelCatalog
from .admission import InFlightLimiter, admit, default_in_flight, release
from .config import BatchConfig
from .inputs import discover
from .manifest import Progress, format_summary, manifest_frame, run_uris, summarize, write_manifest
from .plan import checkpoint_identity, plan_rows
from .rows import STATUS_PENDING, fail_row
from .stages import ModelStage, postprocess_row, preprocess_row

#: environment variables forwarded to Ray workers when this process starts or joins a cluster.
FORWARDED_ENV_PREFIXES = ("AWS_", "HF_", "NVSEG_")
CODE_PIPELINE_ERROR = "pipeline_error"
#: fault injection (tests only): a model actor exits abruptly when a volume URI contains this value.
FAULT_INJECTION_ENV = "NVSEG_FAULT_INJECT_ACTOR_EXIT"


@dataclass
class BatchResult:
    """What :func:`run_batch` returns: the manifest table, the summary and the job's exit status."""

    manifest: Any  # pandas.DataFrame
    summary: dict[str, Any]
    exit_code: int


@lru_cache(maxsize=4)
def _segmenter(cfg_json: str) -> Segmenter:
    """One Segmenter (catalog + transforms, no model) per worker process and config."""
    return Segmenter(InferenceConfig.model_validate_json(cfg_json))


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _preprocess(row: dict[str, Any], cfg_json: str) -> dict[str, Any]:
    row = preprocess_row(dict(row), _segmenter(cfg_json))
    row["preprocess_node"] = _node_id()
    return row


def _postprocess(row: dict[str, Any], cfg_json: str, limiter: Any) -> dict[str, Any]:
    try:
        row = postprocess_row(dict(row), _segmenter(cfg_json))
        row["postprocess_node"] = _node_id()
    finally:
        release(row, limiter)  # the mask and report are written (or the row failed): admit the next volume
    return row


class _ModelActor:
    """Ray Data actor: loads the weights once, then segments rows."""

    def __init__(self, cfg_json: str, tracker: Any, max_attempts: int, threads: int) -> None:
        import ray
        import torch

        torch.set_num_threads(max(1, threads))
        self._ray = ray
        self._tracker = tracker
        self.stage = ModelStage(InferenceConfig.model_validate_json(cfg_json), attempt=self._attempt,
                                max_attempts=max_attempts, on_start=_maybe_inject_fault)
        ctx = ray.get_runtime_context()
        self.node, self.actor = ctx.get_node_id(), ctx.get_actor_id()

    def _attempt(self, key: str) -> int:
        return self._ray.get(self._tracker.start.remote(key))

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        row = self.stage.run(dict(row))
        row["model_node"], row["model_actor"] = self.node, self.actor
        return row


def _maybe_inject_fault(row: dict[str, Any]) -> None:
    """Tests only: exit the worker abruptly, like an OOM kill, when the volume URI matches the env value."""
    crash_on = os.environ.get(FAULT_INJECTION_ENV)
    if crash_on and crash_on in row["uri"]:
        os._exit(137)


class _AttemptTracker:
    """Counts model attempts per volume across actor restarts (lives on the driver's node, 0 CPUs)."""

    def __init__(self) -> None:
        self.attempts: dict[str, int] = {}

    def start(self, key: str) -> int:
        self.attempts[key] = self.attempts.get(key, 0) + 1
        return self.attempts[key]


def _forwarded_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}


def ensure_ray(address: str | None = None) -> None:
    """Connect to ``address`` / ``RAY_ADDRESS`` (as inside ``ray job submit``), or start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    env = _forwarded_env()
    runtime_env = {"env_vars": env} if env and not os.environ.get("RAY_JOB_ID") else None
    ray.init(address=address, runtime_env=runtime_env, log_to_driver=True,
             logging_level="WARNING", configure_logging=True)


def _placement(resource: str) -> dict[str, Any]:
    """Remote args that pin a stage to nodes advertising ``resource`` (any node when empty)."""
    return {"resources": {resource: 0.001}} if resource else {}


def run_batch(cfg: BatchConfig, *, echo: Callable[[str], None] = print) -> BatchResult:
    """Segment every volume of ``cfg.input`` into ``cfg.output`` on the current Ray cluster.

    Returns the manifest, the summary and the exit status (0, or :data:`EXIT_VOLUMES_FAILED` when more than
    ``cfg.max_failures`` volumes failed). Configuration, checkpoint and storage problems raise
    :class:`~nvseg_ray.errors.NvsegError` before any volume is processed.
    """
    started = time.monotonic()
    inf = cfg.inference
    run_name = cfg.run_name or time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    items = discover(cfg.input, inf.storage_options, recursive=cfg.recursive, suffixes=cfg.suffixes)
    catalog = LabelCatalog.load(inf.label_catalog)
    rows = plan_rows(items, cfg.output, inf, catalog, checkpoint_identity(inf.checkpoint, inf.storage_options))
    pending = [r for r in rows if r["status"] == STATUS_PENDING]
    finished = [r for r in rows if r["status"] != STATUS_PENDING]
    progress = Progress(total=len(rows))
    for row in finished:
        progress.add(row, planned=True)
    echo(f"[nvseg] {len(rows)} input(s): {len(pending)} to segment, "
         f"{len(finished)} skipped or refused before processing")
    n_actors = 0
    in_flight: dict[str, int] = {}
    if pending:
        n_actors = cfg.max_actors
        done, in_flight = _run_pipeline(cfg, pending, progress, echo)
        finished.extend(done)
    frame = manifest_frame(finished)
    wall = time.monotonic() - started
    summary = summarize(frame, wall_s=wall, run_name=run_name, manifest_uri=run_uris(cfg.output, run_name)[0],
                        n_actors=n_actors)
    summary["in_flight"] = in_flight
    write_manifest(frame, summary, cfg.output, run_name, inf.storage_options)
    echo(format_summary(frame, summary))
    too_many = cfg.max_failures >= 0 and summary["failed"] > cfg.max_failures
    return BatchResult(frame, summary, EXIT_VOLUMES_FAILED if too_many else 0)


def _run_pipeline(cfg: BatchConfig, pending: list[dict], progress: Progress,
                  echo: Callable[[str], None]) -> tuple[list[dict], dict[str, int]]:
    """Stream ``pending`` through the stages; returns the finished rows and the limiter's in-flight stats."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ensure_ray(cfg.ray_address)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = cfg.progress_bars
    cfg_json = cfg.inference.model_dump_json()
    gpus = cfg.model_gpus if cfg.model_gpus is not None else (1.0 if ray.cluster_resources().get("GPU", 0) else 0.0)
    # the job's bookkeeping actors live on the driver's node (the head under `ray job submit`): a worker node
    # that dies must not take them along, and losing the driver's node ends the job anyway
    on_driver = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    tracker = ray.remote(num_cpus=0, scheduling_strategy=on_driver)(_AttemptTracker).remote()
    limit = cfg.max_in_flight or default_in_flight(cfg.max_actors, _cpu_task_slots(cfg))
    limiter = ray.remote(num_cpus=0, scheduling_strategy=on_driver)(InFlightLimiter).remote(limit)

    ds = ray.data.from_items(pending, override_num_blocks=len(pending))
    # The gate below bounds the work in flight, so Ray Data's per-operator reservations are not needed, and
    # they deadlock with it on small clusters: with 2 CPUs (1 held by the model actor), the reservation
    # keeps the last CPU for preprocessing while it still has upstream input, i.e. while the gate waits for
    # postprocessing to free a slot, and postprocessing never gets a CPU. Without reservations each stage
    # runs whenever the cluster has room. (Set on this dataset's own context, not the process-wide one.)
    ds.context.op_resource_reservation_enabled = False
    # One gate task at a time, 0 CPUs: it waits for a free slot without holding a core (see .admission).
    ds = ds.map(admit, fn_kwargs={"limiter": limiter}, num_cpus=0, compute=ray.data.TaskPoolStrategy(size=1))
    # CPU stages reserve memory per volume (Ray then never packs more volumes on a node than fit); their
    # resource request differing from the model actors' also keeps Ray Data from fusing the two stages,
    # so preprocessing scales on its own instead of running inside the model actors.
    env = _forwarded_env()  # reaches the workers even when Ray was started before these were set
    runtime_env = {"env_vars": env} if env else None
    cpu_args = {"memory": int(cfg.stage_memory_gb * 2**30), "runtime_env": runtime_env,
                **_placement(cfg.cpu_node_resource)}
    ds = ds.map(_preprocess, fn_kwargs={"cfg_json": cfg_json}, num_cpus=cfg.preprocess_cpus, **cpu_args)
    ds = ds.map(_ModelActor, fn_constructor_kwargs={"cfg_json": cfg_json, "tracker": tracker,
                                                    "max_attempts": cfg.max_attempts,
                                                    "threads": int(max(1, cfg.model_cpus))},
                compute=ray.data.ActorPoolStrategy(min_size=cfg.min_actors, max_size=cfg.max_actors),
                num_cpus=cfg.model_cpus, num_gpus=gpus, runtime_env=runtime_env, **_placement(cfg.model_node_resource))
    ds = ds.map(_postprocess, fn_kwargs={"cfg_json": cfg_json, "limiter": limiter},
                num_cpus=cfg.postprocess_cpus, **cpu_args)

    done: list[dict] = []
    stop = threading.Event()
    ticker = threading.Thread(target=_tick, args=(stop, progress, cfg.progress_interval_s, echo), daemon=True)
    ticker.start()
    try:
        for row in ds.iter_rows():
            row = dict(row)
            done.append(row)
            progress.add(row)
    except Exception as exc:  # the pipeline itself broke (cluster lost, ...): record, don't lose the manifest
        message = exc.message if isinstance(exc, NvsegError) else f"{type(exc).__name__}: {str(exc)[:500]}"
        finished_uris = {r["uri"] for r in done}
        for row in pending:
            if row["uri"] not in finished_uris:
                done.append(fail_row(dict(row), CODE_PIPELINE_ERROR, f"not processed: the pipeline stopped: {message}"))
    finally:
        stop.set()
        ticker.join(timeout=1)
        in_flight = _limiter_stats(limiter)
        ray.kill(tracker)
        ray.kill(limiter)
    echo(progress.line() + (f"; at most {in_flight['peak']} of {limit} volumes in flight" if in_flight else ""))
    return done, in_flight


def _cpu_task_slots(cfg: BatchConfig) -> int:
    """How many preprocessing tasks the cluster can run at once now: its CPUs (on ``cpu_node_resource`` nodes
    when set), less those the model actors take when nothing keeps them on other nodes, per task."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if cfg.cpu_node_resource:
        nodes = [n for n in nodes if cfg.cpu_node_resource in n.get("Resources", {})]
    cpus = sum(n.get("Resources", {}).get("CPU", 0.0) for n in nodes)
    if not cfg.cpu_node_resource and not cfg.model_node_resource:
        cpus -= cfg.max_actors * cfg.model_cpus
    return max(0, int(cpus // cfg.preprocess_cpus))


def _limiter_stats(limiter: Any) -> dict[str, int]:
    import ray

    try:
        return ray.get(limiter.stats.remote(), timeout=10)
    except Exception:  # the cluster is gone: the stats are a nicety, the manifest is what matters
        return {}


def _tick(stop: threading.Event, progress: Progress, interval: float, echo: Callable[[str], None]) -> None:
    while not stop.wait(interval):
        echo(progress.line())
