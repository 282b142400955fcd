"""The Ray wiring of the batch job: a thin layer over :mod:`.stages`, scheduled by the driver.

    plan (driver) -> read+preprocess (CPU tasks) -> model (actor pool, GPU when present)
                  -> invert+encode+write (CPU tasks) -> manifest (driver)

Rows carry URIs and compact payloads, one volume per task; the input's voxels the QC needs (intensity statistics,
the preview) travel as a second object of the preprocess task straight to postprocessing, so the model actor
never receives them. The driver is the only place that submits work:
it keeps at most ``max_in_flight`` volumes between "read starts" and "mask written" (:mod:`.admission`),
hands each preprocessed volume to the least busy model actor and each segmented one to a postprocess task,
passing Ray object references (payloads go worker to worker, the driver only ever fetches the final,
payload-free row). A volume's slot is freed when its last stage returns, whatever the outcome -- written,
failed (a typed or an internal error, both caught per row in :mod:`.stages`) or lost with its worker -- so a
bad volume can never wedge the job and every run ends with a manifest. No task waits on another.

Crashed model actors are restarted by Ray and their calls retried, bounded per volume through an attempt
counter actor. Credentials never travel through Ray's ``runtime_env`` (which shows up in Ray's logs and
dashboard APIs): workers read them from their own environment (a local Ray inherits the driver's; cluster
pods get them from a Kubernetes Secret or an instance role); only non-secret settings are forwarded
(:func:`nvseg_ray.raytools.forwarded_env`).
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

from ..config import InferenceConfig
from ..errors import EXIT_VOLUMES_FAILED, ConfigError, ModelActorsUnavailable
from ..labels import LabelCatalog
from ..boundary import describe_exception
from ..io import write_json
from ..raytools import CODE_PIPELINE_ERROR, ensure_ray, forwarded_env, runtime_env, stopped_message
from ..redaction import redact_text, redact_uri
from ..stages import VolumeStages
from .admission import IN_FLIGHT_PER_ACTOR, InFlightWindow, default_in_flight
from .config import BatchConfig
from .inputs import discover
from .manifest import (Progress, format_summary, manifest_frame, run_folder, run_uris, summarize, write_manifest,
                       write_structures_table)
from .plan import checkpoint_identity, plan_rows
from .rows import INTENSITIES_COLUMN, STATUS_PENDING, STRUCTURES_COLUMN, fail_row
from .stages import CODE_INTERNAL, ModelStage, postprocess_row, preprocess_row

#: a volume's task or actor was lost (its worker or node died) more often than ``max_attempts`` allows.
CODE_WORKER_LOST = "worker_lost"
CODE_UNSATISFIABLE = "unsatisfiable_resources"
#: fault injection (tests only): a model actor exits abruptly when a volume URI contains this value.
FAULT_INJECTION_ENV = "NVSEG_FAULT_INJECT_ACTOR_EXIT"
#: fault injection (tests only): ``stage:substring[,stage:substring...]`` (stage: preprocess, model, postprocess)
#: raises a plain RuntimeError in that stage's Ray task, outside the stages' own error handling, for volumes
#: whose URI contains the substring -- an internal error that escapes a stage.
FAULT_RAISE_ENV = "NVSEG_FAULT_INJECT_RAISE"
#: set by KubeRay in every Ray container: the cluster has an autoscaler that may add nodes for pending work.
KUBERAY_ENV = "KUBERAY_GEN_RAY_START_CMD"
#: model calls queued per actor at most (one running, one waiting), so a free actor gets the next volume.
MODEL_CALLS_PER_ACTOR = IN_FLIGHT_PER_ACTOR - 1
#: Seconds without any finished stage after which the driver looks whether its CPU stages are starved (the
#: cluster's CPUs all held by others: a Serve app, another job) and says so once: a real stage of a large volume
#: takes tens of seconds, so two minutes of silence with no free CPU is not a slow volume but a wait.
STARVED_NOTICE_S = 120.0


@dataclass
class BatchResult:
    """What :func:`run_batch` returns: the manifest table, the summary and the job's exit status."""

    manifest: Any  # pandas.DataFrame
    summary: dict[str, Any]
    exit_code: int


@lru_cache(maxsize=4)
def _stages(cfg_json: str) -> VolumeStages:
    """One :class:`VolumeStages` (catalog + transforms, no model) per worker process and config."""
    return VolumeStages(InferenceConfig.model_validate_json(cfg_json))


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _maybe_raise(stage: str, row: dict[str, Any]) -> None:
    """Tests only: raise an untyped error in ``stage`` when :data:`FAULT_RAISE_ENV` names it and the URI."""
    for spec in filter(None, os.environ.get(FAULT_RAISE_ENV, "").split(",")):
        name, _, needle = spec.partition(":")
        if name == stage and needle and needle in row["uri"]:
            raise RuntimeError(f"injected {stage} fault")


def _preprocess(row: dict[str, Any], cfg_json: str) -> tuple[dict[str, Any], bytes]:
    """Two objects (``num_returns=2``): the row, which goes on to the model actor, and the input's voxels for the
    QC, which go straight to postprocessing (empty when the QC does not need them)."""
    _maybe_raise("preprocess", row)
    row = preprocess_row(dict(row), _stages(cfg_json))
    row["preprocess_node"] = _node_id()
    intensities, row[INTENSITIES_COLUMN] = row[INTENSITIES_COLUMN], b""
    return row, intensities


def _postprocess(row: dict[str, Any], intensities: bytes, cfg_json: str) -> dict[str, Any]:
    row = postprocess_row(dict(row) | {INTENSITIES_COLUMN: intensities}, _stages(cfg_json))
    row["postprocess_node"] = _node_id()
    _maybe_raise("postprocess", row)
    return row


class _ModelActor:
    """Model actor: loads the weights once (on the first volume), then segments rows."""

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
        if self.stage.builds_an_engine:  # an engine build belongs to the start-up, not to the first volume
            self.stage.warm_up()

    def _attempt(self, key: str) -> int:
        return self._ray.get(self._tracker.start.remote(key))

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        _maybe_raise("model", row)
        row = self.stage.run(dict(row))
        row["model_node"], row["model_actor"] = self.node, self.actor
        return row

    def run(self, row: dict[str, Any]) -> dict[str, Any]:
        """The remote entry point (``__call__`` stays overridable, e.g. by the benchmark's tracing)."""
        return self(row)


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


def _placement(resource: str) -> dict[str, float]:
    """Custom resources that pin a stage to nodes advertising ``resource`` (any node when empty)."""
    return {resource: 0.001} if resource else {}


def run_batch(cfg: BatchConfig, *, echo: Callable[[str], None] = print) -> BatchResult:
    """Segment every volume of ``cfg.input`` into ``cfg.output`` on the current Ray cluster.

    Returns the manifest, the summary and the exit status (0, or :data:`EXIT_VOLUMES_FAILED` when more than
    ``cfg.max_failures`` volumes failed). Configuration (including resource requests no node can satisfy),
    checkpoint and storage problems raise :class:`~nvseg_ray.errors.NvsegError` before any volume is processed.
    """
    started = time.monotonic()
    inf = cfg.inference
    run_name = cfg.run_name or time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    notes: list[str] = []
    items = discover(cfg.input, inf.storage_options, recursive=cfg.recursive, suffixes=cfg.suffixes, notes=notes)
    for note in notes:
        echo(f"[nvseg] {note}")
    catalog = LabelCatalog.load(inf.label_catalog)
    rows = plan_rows(items, cfg.files_root, inf, catalog, checkpoint_identity(inf.checkpoint, inf.storage_options),
                     seg_root=cfg.seg_root)
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
    summary = summarize(frame, wall_s=wall, run_name=run_name, manifest_uri=run_uris(cfg.files_root, run_name)[0],
                        n_actors=n_actors, nodes=_nodes_used(frame), cost_per_node_hour=cfg.cost_per_node_hour)
    summary["in_flight"] = in_flight
    structures = [entry for row in finished for entry in json.loads(row.get(STRUCTURES_COLUMN) or b"[]")]
    summary["structures"] = redact_uri(write_structures_table(structures, cfg.files_root, run_name,
                                                              inf.storage_options))
    manifest_uri, summary_uri = write_manifest(frame, summary, cfg.files_root, run_name, inf.storage_options)
    if cfg.run_report:
        summary["report"] = _write_report(run_folder(cfg.files_root, run_name), frame, summary, cfg, echo)
        if summary["report"]:
            write_json(summary, summary_uri, inf.storage_options)
    echo(format_summary(frame, summary))
    too_many = cfg.max_failures >= 0 and summary["failed"] > cfg.max_failures
    return BatchResult(frame, summary, EXIT_VOLUMES_FAILED if too_many else 0)


def _nodes_used(frame: Any) -> int:
    """How many Ray nodes ran a stage of the run (at least 1: the driver's), for the cost per volume."""
    columns = [c for c in ("preprocess_node", "model_node", "postprocess_node") if c in frame]
    used = {node for column in columns for node in frame[column] if node}
    return max(1, len(used))


def _write_report(run_dir: str, frame: Any, summary: dict[str, Any], cfg: BatchConfig,
                  echo: Callable[[str], None]) -> str | None:
    """Write the run's ``report.html`` from the manifest and summary just written (held here, not read back); a
    problem is told, never fatal (the masks and the manifest are what the run is for, and ``nvseg report RUN_DIR``
    writes the report again)."""
    from .run_report import write_run_report

    try:
        return redact_uri(write_run_report(run_dir, cfg.inference.storage_options,
                                           cost_per_node_hour=cfg.cost_per_node_hour, frame=frame, summary=summary))
    except Exception as exc:  # noqa: BLE001 - the report is a convenience over the manifest
        echo(f"[nvseg] the run report could not be written ({redact_text(describe_exception(exc))}); "
             f"rebuild it with: nvseg report {redact_uri(run_dir)}")
        return None


@dataclass
class _Requests:
    """What one task / actor of each stage asks Ray for (``ray.remote`` options)."""

    cpu_stage: dict[str, Any]
    model: dict[str, Any]


def _requests(cfg: BatchConfig, gpus: float, env: dict[str, str]) -> _Requests:
    """Remote options of the stages; ``env`` (non-secret settings only) goes into their runtime_env."""
    env_option = runtime_env(env)
    # CPU stages reserve memory per volume (Ray then never packs more volumes on a node than fit)
    cpu = {"memory": int(cfg.stage_memory_gb * 2**30), "runtime_env": env_option,
           "resources": _placement(cfg.cpu_node_resource), "max_retries": cfg.max_attempts - 1}
    model = {"num_cpus": cfg.model_cpus, "num_gpus": gpus, "runtime_env": env_option,
             "resources": _placement(cfg.model_node_resource), "max_restarts": -1, "max_task_retries": -1}
    return _Requests(cpu, model)


def waits_for_resources(cfg: BatchConfig) -> bool:
    """Whether unsatisfiable resource requests may pend (an autoscaler can add nodes) instead of failing fast:
    ``cfg.wait_for_resources``, or, when unset, whether this runs under KubeRay (:data:`KUBERAY_ENV`)."""
    if cfg.wait_for_resources is not None:
        return cfg.wait_for_resources
    return bool(os.environ.get(KUBERAY_ENV))


def check_resources(cfg: BatchConfig, gpus: float, nodes: list[dict[str, Any]]) -> None:
    """Raise :class:`ConfigError` (``unsatisfiable_resources``, exit 2) when no alive node of ``nodes``
    (``ray.nodes()`` entries) can run one model actor, or one preprocess / postprocess task, as requested.

    Ray would otherwise leave such work pending forever. Memory is ``stage_memory_gb`` GiB per CPU-stage task.
    """
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive")]
    memory = cfg.stage_memory_gb * 2**30
    asks = {
        "a model actor": ({"CPU": cfg.model_cpus, "GPU": gpus} | _placement(cfg.model_node_resource),
                          "--model-cpus / --model-gpus / --model-node-resource"),
        "a preprocess task": ({"CPU": cfg.preprocess_cpus, "memory": memory} | _placement(cfg.cpu_node_resource),
                              "--preprocess-cpus / --stage-memory-gb / --cpu-node-resource"),
        "a postprocess task": ({"CPU": cfg.postprocess_cpus, "memory": memory} | _placement(cfg.cpu_node_resource),
                               "--postprocess-cpus / --stage-memory-gb / --cpu-node-resource"),
    }
    for what, (ask, flags) in asks.items():
        ask = {k: v for k, v in ask.items() if v}
        if any(all(node.get(k, 0.0) >= v for k, v in ask.items()) for node in alive):
            continue
        largest = max(alive, key=lambda n: (n.get("GPU", 0.0), n.get("CPU", 0.0), n.get("memory", 0.0)), default={})
        raise ConfigError(
            f"no node of the Ray cluster can run {what}: it asks for {_format_resources(ask)}, the largest node "
            f"has {_format_resources({k: largest.get(k, 0.0) for k in ask})} "
            f"({len(alive)} node(s); cluster total {_format_resources(_total(alive, ask))})",
            hint=f"lower {flags}, or add a node that has them; on a cluster with an autoscaler pass "
                 "--wait-for-resources to let the request wait for new nodes", code=CODE_UNSATISFIABLE)


def _total(nodes: list[dict[str, float]], keys: dict[str, Any]) -> dict[str, float]:
    return {k: sum(n.get(k, 0.0) for n in nodes) for k in keys}


def _format_resources(res: dict[str, float]) -> str:
    return ", ".join(f"{v / 2**30:.1f} GiB memory" if k == "memory" else f"{v:g} {k}" for k, v in res.items())


@dataclass
class _Actor:
    handle: Any
    ready: Any  # ObjectRef of __ray_ready__, None once ready
    calls: int = 0


@dataclass
class _Volume:
    """A volume in flight: its planned row, the stage it is in and that stage's result reference."""

    row: dict[str, Any]
    stage: str
    ref: Any = None
    actor: _Actor | None = None
    intensities: Any = None  # ObjectRef of the input's voxels (preprocess -> postprocess), held by the driver


def _run_pipeline(cfg: BatchConfig, pending: list[dict], progress: Progress,
                  echo: Callable[[str], None]) -> tuple[list[dict], dict[str, int]]:
    """Stream ``pending`` through the stages; returns the finished rows and the in-flight window's stats."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ensure_ray(cfg.ray_address)
    cfg_json = cfg.inference.model_dump_json()
    has_gpus = bool(ray.cluster_resources().get("GPU", 0))
    gpus = cfg.model_gpus if cfg.model_gpus is not None else (1.0 / cfg.actors_per_gpu if has_gpus else 0.0)
    if not waits_for_resources(cfg):
        check_resources(cfg, gpus, ray.nodes())
    requests = _requests(cfg, gpus, forwarded_env())  # non-secret settings set after Ray started
    # the job's bookkeeping actor lives on the driver's node (the head under `ray job submit`): a worker node
    # that dies must not take it along, and losing the driver's node ends the job anyway
    on_driver = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    tracker = ray.remote(num_cpus=0, scheduling_strategy=on_driver)(_AttemptTracker).remote()
    window = InFlightWindow(cfg.max_in_flight or default_in_flight(cfg.max_actors, _cpu_task_slots(cfg)))
    # module attributes read here, at run time (benchmarks/bench_batch.py swaps in traced versions)
    pre_task = ray.remote(_preprocess).options(num_cpus=cfg.preprocess_cpus, num_returns=2, **requests.cpu_stage)
    post_task = ray.remote(_postprocess).options(num_cpus=cfg.postprocess_cpus, **requests.cpu_stage)
    actor_class = ray.remote(_ModelActor).options(**requests.model)
    actor_args = {"cfg_json": cfg_json, "tracker": tracker, "max_attempts": cfg.max_attempts,
                  "threads": int(max(1, cfg.model_cpus))}
    actors: list[_Actor] = []

    def start_actor() -> None:
        handle = actor_class.remote(**actor_args)
        actors.append(_Actor(handle, handle.__ray_ready__.remote()))

    queue = deque(pending)
    waiting_for_model: deque[_Volume] = deque()
    by_ref: dict[Any, _Volume] = {}
    done: list[dict] = []
    stop = threading.Event()

    def stages() -> str:  # per-stage counts for the status line (--no-progress-bars leaves them out)
        counts = {"preprocess": 0, "model": 0, "postprocess": 0}
        for vol in list(by_ref.values()):
            counts[vol.stage] += 1
        return (f" | in flight: preprocess {counts['preprocess']}, waiting {len(waiting_for_model)}, "
                f"model {counts['model']}, postprocess {counts['postprocess']}; {len(actors)} model actor(s)")

    ticker = threading.Thread(target=_tick, args=(stop, progress, cfg.progress_interval_s, echo,
                                                  stages if cfg.progress_bars else None), daemon=True)
    ticker.start()

    def finish(vol: _Volume, row: dict[str, Any]) -> None:
        window.release(vol.row["output_uri"])
        done.append(row)
        progress.add(row)

    last_event, starved_told = time.monotonic(), False
    try:
        for _ in range(cfg.min_actors):
            start_actor()
        while queue or by_ref or waiting_for_model:
            while queue and window.has_room():  # admit: the only place a volume's work starts
                row = queue.popleft()
                window.acquire(row["output_uri"])
                row_ref, intensities_ref = pre_task.remote(row, cfg_json)
                vol = _Volume(row, "preprocess", row_ref, intensities=intensities_ref)
                by_ref[vol.ref] = vol
            _dispatch_to_model(waiting_for_model, actors, by_ref)
            if (waiting_for_model and len(actors) < cfg.max_actors
                    and all(a.ready is None and a.calls >= MODEL_CALLS_PER_ACTOR for a in actors)):
                start_actor()  # every started actor is busy: grow the pool (up to --max-actors)
            watched = list(by_ref) + [a.ready for a in actors if a.ready is not None]
            ready, _ = ray.wait(watched, num_returns=1, timeout=1.0, fetch_local=False)
            if not ready:
                if not starved_told and time.monotonic() - last_event > STARVED_NOTICE_S:
                    starved_told = _tell_if_starved(cfg, sum(v.stage != "model" for v in by_ref.values()), echo)
                continue
            last_event = time.monotonic()
            ready, _ = ray.wait(watched, num_returns=len(watched), timeout=0, fetch_local=False)
            for ref in ready:
                actor = next((a for a in actors if a.ready == ref), None)
                if actor is not None:
                    _actor_ready(actor, actors)
                    continue
                vol = by_ref.pop(ref)
                if vol.stage == "preprocess":
                    waiting_for_model.append(vol)  # its payload stays in the object store
                elif vol.stage == "model":
                    vol.actor.calls -= 1
                    vol.stage, vol.ref = "postprocess", post_task.remote(ref, vol.intensities, cfg_json)
                    by_ref[vol.ref] = vol
                else:
                    finish(vol, _final_row(vol, ref, cfg))
            if not actors:  # no model actor could be started: the remaining volumes cannot be segmented
                raise ModelActorsUnavailable()
    except Exception as exc:  # the pipeline itself broke (cluster lost, ...): record, don't lose the manifest
        message = redact_text(stopped_message(exc, "processed"))
        left = [v.row for v in by_ref.values()] + [v.row for v in waiting_for_model] + list(queue)
        for row in left:
            done.append(fail_row(dict(row), CODE_PIPELINE_ERROR, message))
            window.release(row["output_uri"])
            progress.add(done[-1])
    finally:
        stop.set()
        ticker.join(timeout=1)
        for ref, vol in by_ref.items():  # only after a failure: work of volumes already marked failed
            if vol.stage != "model":
                ray.cancel(ref, force=True)
        for actor in actors:
            ray.kill(actor.handle)
        ray.kill(tracker)
    stats = window.stats()
    echo(progress.line() + f"; at most {stats['peak']} of {stats['limit']} volumes in flight")
    return done, stats


def _actor_ready(actor: _Actor, actors: list[_Actor]) -> None:
    """``actor``'s constructor finished: use it, or drop it when it failed (the others carry on)."""
    import ray

    try:
        ray.get(actor.ready)
        actor.ready = None
    except Exception:
        actors.remove(actor)


def _dispatch_to_model(waiting: deque, actors: list[_Actor], by_ref: dict[Any, _Volume]) -> None:
    """Hand preprocessed volumes, oldest first, to the least busy started actor with room in its queue."""
    while waiting:
        free = [a for a in actors if a.ready is None and a.calls < MODEL_CALLS_PER_ACTOR]
        if not free:
            return
        actor = min(free, key=lambda a: a.calls)
        vol = waiting.popleft()
        vol.stage, vol.actor = "model", actor
        vol.ref = actor.handle.run.remote(vol.ref)
        actor.calls += 1
        by_ref[vol.ref] = vol


def _final_row(vol: _Volume, ref: Any, cfg: BatchConfig) -> dict[str, Any]:
    """The finished row of ``vol`` (payload-free), or a failed row when a stage raised past its own error
    handling (``internal_error``) or a stage's worker, actor or node was lost (``worker_lost``)."""
    import ray

    try:
        return dict(ray.get(ref))
    except ray.exceptions.RayTaskError as exc:  # an exception escaped a stage function: a bug, one volume
        cause = exc.cause if isinstance(exc.cause, BaseException) else exc
        if not isinstance(cause, ray.exceptions.RayError):
            # "ray::_postprocess() ... ray::_preprocess() (pid=...)": the innermost task is where it was raised
            tasks = _TASK_NAME.findall(str(exc))
            stage = _STAGE_OF.get(tasks[-1].rsplit(".", 1)[-1] if tasks else "", "a stage")
            return fail_row(dict(vol.row), CODE_INTERNAL, redact_text(
                f"{stage} failed: {type(cause).__name__}: {_first_line(cause)}"))
        exc = cause
    except Exception as exc_:  # noqa: BLE001 - every other failure is the loss of a worker or of an object
        exc = exc_
    return fail_row(dict(vol.row), CODE_WORKER_LOST, redact_text(
        f"a worker running this volume was lost ({type(exc).__name__}: {_first_line(exc)}); gave up after "
        f"{cfg.max_attempts} attempt(s) (out of memory, a crash, or a node that left)"))


_TASK_NAME = re.compile(r"ray::([\w.]+)\(")
#: Ray task/method name -> stage named in an internal error's message.
_STAGE_OF = {"_preprocess": "preprocess", "run": "inference", "__call__": "inference", "_postprocess": "postprocess"}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else "")[:300]


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


def _tell_if_starved(cfg: BatchConfig, cpu_stage_tasks: int, echo: Callable[[str], None]) -> bool:
    """Echo (and return True) when ``cpu_stage_tasks`` read/preprocess or postprocess tasks are submitted but the
    cluster has no CPU free for one of them: they pend until others (a Serve app, another job) release CPUs."""
    import ray

    free = ray.available_resources().get("CPU", 0.0)
    need = min(cfg.preprocess_cpus, cfg.postprocess_cpus)
    if not cpu_stage_tasks or free >= need:
        return False
    total = ray.cluster_resources().get("CPU", 0.0)
    echo(f"[nvseg] {cpu_stage_tasks} volume stage(s) wait for a CPU: the cluster has {free:g} of {total:g} CPUs "
         f"free and each task asks for {need:g}; other work (a Serve app, another job, this job's "
         f"{cfg.max_actors} model actor(s) at {cfg.model_cpus:g} CPU each) holds the rest. They start when CPUs "
         "free up; add a node, stop the other work, or lower --model-cpus / --preprocess-cpus / --postprocess-cpus")
    return True


def _tick(stop: threading.Event, progress: Progress, interval: float, echo: Callable[[str], None],
          detail: Callable[[], str] | None = None) -> None:
    while not stop.wait(interval):
        try:
            extra = detail() if detail is not None else ""
        except RuntimeError:  # the driver changed the stage tables while they were read: skip the detail once
            extra = ""
        echo(progress.line() + extra)
