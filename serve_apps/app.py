"""The nvseg-ray HTTP service on Ray Serve: a FastAPI ingress and an independently scaled model deployment.

    serve run serve_apps/config.yaml                      # import path serve_apps.app:build_app

* ``Gateway`` (ingress, CPU): parses requests, fetches images (allow-listed), decodes, validates and
  preprocesses, calls the model, inverts and encodes responses; admission control (503 + Retry-After),
  request timeouts (504) and JSON errors for every user error.
* ``Model`` (GPU when present): loads the weights once per replica and only runs inference.
* ``JobStore``: state of asynchronous jobs (results go to object storage).

Routes: ``GET /v1/health/live``, ``GET /v1/health/ready``, ``GET /v1/vista3d/info``,
``POST /v1/vista3d/inference`` (NIM-compatible), ``POST /v1/segment`` (multipart upload),
``POST /v1/jobs``, ``GET /v1/jobs/{id}``, ``GET /v1/jobs/{id}/result``; OpenAPI at ``/docs``.
"""

# no `from __future__ import annotations`: FastAPI must see real types after Serve re-imports the class

import asyncio
import json
import logging
import threading
import time
import uuid
from typing import Any

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.exceptions import RayError, RayTaskError
from ray.serve.exceptions import BackPressureError, RayServeException
from starlette.exceptions import HTTPException as StarletteHTTPException

from nvseg_ray import __version__
from nvseg_ray.errors import (
    ConfigError,
    JobNotFinished,
    JobNotFound,
    JobsFull,
    ModelUnavailable,
    NvsegError,
    PayloadTooLarge,
    PromptError,
    RequestTimeout,
    ServiceUnavailable,
)
from nvseg_ray.dicom.dicomweb import is_dicomweb_url
from nvseg_ray.dicom.series import DicomSeries
from nvseg_ray.output import mask_image, refuse_existing, write_result
from nvseg_ray.serving.dicom_input import dicomweb_series, is_zip_upload, seg_response_bytes, with_uploaded_series
from nvseg_ray.redaction import redact, redact_text, redact_uri
from nvseg_ray.serving.auth import AuthGate, BearerAuthMiddleware
from nvseg_ray.quality.assess import preview_png
from nvseg_ray.serving.encode import MEDIA_TYPES, content_disposition, nifti_gz, nrrd_zip
from nvseg_ray.serving.fetch import check_source, fetch_image
from nvseg_ray.serving.prefixes import check_output_uri
from nvseg_ray.serving.jobs import JobTable
from nvseg_ray.serving import limits as body_limits
from nvseg_ray.serving.service import (
    InferenceRequest,
    JobRequest,
    ModelWorker,
    PreparedRequest,
    RequestProcessor,
    ServeSettings,
    check_points,
    error_body,
    parse_form_labels,
    parse_form_list,
    parse_form_points,
    prompt_fields,
)

log = logging.getLogger("nvseg_ray.serve")
api = FastAPI(title="nvseg-ray", version=__version__,
              description="NV-Segment-CTMR (VISTA3D) segmentation; NIM-compatible inference API.")
# body caps (413 before/while a body arrives), configured from ServeSettings when the Gateway starts
api.add_middleware(body_limits.BodyLimit)
#: bearer-token check of this process's app (ServeSettings.auth_tokens_file), set when the Gateway starts; added
#: last, so it is the outermost middleware: a request without a valid token is answered before its body is read.
AUTH = AuthGate()
api.add_middleware(BearerAuthMiddleware, gate=AUTH)


#: Starlette/FastAPI's own HTTP errors (unknown route, wrong method, unparsable body) as our error codes.
_HTTP_ERRORS: dict[int, tuple[str, str, str]] = {
    400: ("bad_request", "the request body could not be parsed",
          "uploads: multipart/form-data with a boundary (curl -F file=@scan.nii.gz); other routes: a JSON object"),
    404: ("not_found", "no such route", "see /docs for the routes of this service"),
    405: ("method_not_allowed", "this route does not accept that method", "see /docs for the routes' methods"),
    413: ("payload_too_large", "the request body is too large", "send a smaller body"),
}


def error_response(err: NvsegError, retry_after_s: float | None = None) -> JSONResponse:
    status = err.http_status
    headers = {"Retry-After": str(max(1, round(retry_after_s)))} if status == 503 and retry_after_s is not None else None
    return JSONResponse(error_body(err, status), status_code=status, headers=headers)


@api.exception_handler(NvsegError)
async def _nvseg_error(_: Request, err: NvsegError) -> JSONResponse:
    return error_response(err)


@api.exception_handler(RequestValidationError)
async def _invalid_request(_: Request, err: RequestValidationError) -> JSONResponse:
    problems = err.errors()
    if any(p.get("type") == "json_invalid" for p in problems):
        body = {"error": {"code": "invalid_json", "message": "the request body is not valid JSON",
                          "hint": "send Content-Type: application/json with a JSON object"}}
        return JSONResponse(body, status_code=400)
    details = [f"{'.'.join(str(x) for x in p.get('loc', ()) if x != 'body')}: {p.get('msg')}" for p in problems]
    body = {"error": {"code": "invalid_request", "message": "; ".join(details),
                      "hint": "see /docs for the request schema"}}
    return JSONResponse(body, status_code=422)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    code, message, hint = _HTTP_ERRORS.get(err.status_code, (f"http_{err.status_code}", "the request failed",
                                                             "see /docs for the API"))
    if err.status_code == 404:
        message = f"no route {request.method} {request.url.path[:200]}"
    elif err.status_code == 405:
        message = f"{request.url.path[:200]} does not accept {request.method}"
        allowed = (err.headers or {}).get("Allow")
        hint = f"use {allowed}" if allowed else hint
    return JSONResponse({"error": {"code": code, "message": message, "hint": hint}}, status_code=err.status_code,
                        headers=err.headers)


def internal_error_response(err: BaseException) -> JSONResponse:
    """500 without the exception's text (it is logged, redacted, under a request id the client can quote)."""
    request_id = uuid.uuid4().hex[:16]
    log.error("internal error (request id %s): %s", request_id, redact_text(f"{type(err).__name__}: {err}"))
    body = {"error": {"code": "internal_error", "message": "the service failed on this request",
                      "hint": f"tell the operator, quoting request id {request_id}", "request_id": request_id}}
    return JSONResponse(body, status_code=500, headers={"X-Request-ID": request_id})


@api.exception_handler(Exception)
async def _internal(_: Request, err: Exception) -> JSONResponse:
    return internal_error_response(err)


def model_error(err: BaseException) -> NvsegError:
    """A Ray/Serve failure of the model call as a user-facing error: the replica's own NvsegError (a
    RayTaskError wraps it), else 503 ``model_unavailable`` without internals (logged under a request id)."""
    cause = getattr(err, "cause", None)
    if isinstance(err, RayTaskError) and isinstance(cause, NvsegError):
        return cause
    request_id = uuid.uuid4().hex[:16]
    log.error("model call failed (request id %s): %s", request_id,
              redact_text(f"{type(err).__name__}: {err}")[:4000])
    return ModelUnavailable(f"the model replica could not complete this request (request id {request_id})",
                            hint="retry after the Retry-After delay; if it persists, tell the operator")


# Deployment options live here, in the decorators, and only here (serve_apps/config.yaml sets replicas, autoscaling
# and resources; tests/test_cluster_manifests.py fails if it repeats an option set in code). Ray Serve lets a
# config's `deployments:` entry override any of them per cluster.
#
# Model: 2 requests at once per replica (one runs on the GPU while the next is handed over; more only queue
# activations in GPU memory); at most 8 waiting per replica, beyond which the Gateway answers 503 + Retry-After
# instead of letting latency grow; a health check every 10 s (check_health: the weights are still loaded).
@serve.deployment(name="Model", max_ongoing_requests=2, max_queued_requests=8, health_check_period_s=10)
class ModelDeployment:
    """Loads the weights once per replica; runs only inference (GPU when the replica has one)."""

    def __init__(self, args: dict[str, Any]) -> None:
        self.worker = ModelWorker(ServeSettings.from_args(args))

    async def infer(self, prepared, prompts, deadline: float | None = None):  # noqa: ANN001 - PreparedVolume, Prompts
        """Runs in a thread; a cancelled request (its caller timed out or went away) stops at the next window."""
        stop = threading.Event()
        try:
            return await asyncio.to_thread(self.worker.infer, prepared, prompts, deadline, stop)
        except asyncio.CancelledError:
            stop.set()
            raise

    def info(self) -> dict[str, Any]:
        return self.worker.info()

    def check_health(self) -> None:
        self.worker.runner.model  # raises if the weights are gone


# JobStore: exactly one replica (the job table is in its memory, shared by every Gateway replica); its calls are
# dictionary look-ups, so 100 at once.
@serve.deployment(name="JobStore", num_replicas=1, max_ongoing_requests=100)
class JobStore:
    """In-memory job table shared by all ingress replicas (results themselves live in object storage)."""

    def __init__(self, args: dict[str, Any] | None = None) -> None:
        settings = ServeSettings.from_args(args) if args else None
        self.table = JobTable(lease_s=settings.job_lease_s if settings else 60.0)

    def put(self, job: dict[str, Any]) -> None:
        self.table.put(redact(job))  # image / output_uri / error texts: no user-info, no signatures (GET /v1/jobs)

    def heartbeat(self, owner: str) -> None:
        self.table.heartbeat(owner)

    def get(self, job_id: str) -> dict[str, Any] | None:
        return self.table.get(job_id)


# Gateway: 32 requests per replica reach the app, so that beyond ServeSettings.max_inflight (default 4) in progress
# the app itself answers 503 + Retry-After as JSON, instead of requests queueing unseen in Serve.
@serve.deployment(name="Gateway", max_ongoing_requests=32)
@serve.ingress(api)
class Gateway:
    def __init__(self, model: Any, jobs: Any, args: dict[str, Any]) -> None:
        self.settings = ServeSettings.from_args(args)
        self.processor = RequestProcessor(self.settings)
        self.policy = self.settings.fetch_policy()
        AUTH.configure(self.settings.auth_tokens_file)  # a configured but unusable tokens file: the replica fails
        self.model, self.jobs = model, jobs
        self.inflight = 0
        self._tasks: set[asyncio.Task] = set()
        body_limits.configure(json_limit=int(self.settings.max_json_kb * 1024),
                              upload_limit=int(self.settings.max_upload_mb * 2**20),
                              upload_paths=frozenset({"/v1/segment"}))
        self.owner = uuid.uuid4().hex  # this replica, as the owner of the jobs it runs
        self._job_slots: asyncio.Semaphore | None = None
        self._heartbeat: asyncio.Task | None = None

    async def _beat(self) -> None:
        """Tell the JobStore this replica is alive (its jobs are orphaned when the beats stop)."""
        while True:
            try:
                await self.jobs.heartbeat.remote(self.owner)
            except Exception:  # noqa: BLE001 - the JobStore restarting; beat again next period
                log.warning("job heartbeat failed", exc_info=True)
            await asyncio.sleep(max(0.2, self.settings.job_lease_s / 4))

    # -- plumbing -----------------------------------------------------------------------------------
    async def _admitted(self, work):  # noqa: ANN001, ANN202 - coroutine factory taking the deadline
        """Admission control + request timeout around one request's work (``work(deadline)``, a time.time())."""
        if self.inflight >= self.settings.max_inflight:
            return error_response(ServiceUnavailable(
                f"the service is busy ({self.inflight} requests in progress on this replica)",
                hint="retry after the Retry-After delay, or use POST /v1/jobs for large volumes"),
                retry_after_s=self.settings.retry_after_s)
        self.inflight += 1
        try:
            return await asyncio.wait_for(work(time.time() + self.settings.request_timeout_s),
                                          timeout=self.settings.request_timeout_s)
        except asyncio.TimeoutError:
            return error_response(RequestTimeout(f"the request took longer than {self.settings.request_timeout_s:g}s",
                                                 hint="use POST /v1/jobs for large volumes"))
        except NvsegError as err:
            return error_response(err, retry_after_s=self.settings.retry_after_s)
        finally:
            self.inflight -= 1

    async def _segment(self, raw: bytes | None, name: str, fields: dict[str, Any],  # noqa: ANN202
                       deadline: float | None = None, series: DicomSeries | None = None):
        """Prepare (NIfTI bytes ``raw``, a zip of one DICOM series, or a DICOMweb ``series``), infer, finish."""
        if series is not None:
            cfg, prompts = self.processor.config_for(fields, series.modality, redact_uri(series.uri))
            request = await asyncio.to_thread(self.processor.prepare_series, series, cfg, prompts)
        elif is_zip_upload(raw, name):
            def prepare_zip(found: DicomSeries) -> PreparedRequest:
                cfg, prompts = self.processor.config_for(fields, found.modality, f"upload:{name}")
                return self.processor.prepare_series(found, cfg, prompts)

            request = await asyncio.to_thread(with_uploaded_series, raw, name, prepare_zip)
        else:
            cfg, prompts = self.processor.config_for(fields)
            request = await asyncio.to_thread(self.processor.prepare, raw, name, cfg, prompts)
        prompts = request.prompts
        try:
            labels, infer_s = await self.model.infer.remote(request.prepared, prompts, deadline)
        except BackPressureError:
            raise ServiceUnavailable("the model replicas are saturated (max_queued_requests reached)",
                                     hint="retry after the Retry-After delay") from None
        except (RayError, RayServeException) as err:
            raise model_error(err) from None
        request.timings["infer"] = infer_s
        result = await asyncio.to_thread(self.processor.finish, request, labels)
        return request, result

    async def _fetch(self, uri: str) -> bytes:
        return await asyncio.to_thread(fetch_image, uri, self.policy, self.settings.storage_options)

    async def _check_output_uri(self, uri: str) -> str:
        """The canonical output_uri: 403 output_not_allowed outside allowed_output_prefixes (or '..', not .nii.gz);
        409 output_exists when the mask or its report exists and allow_overwrite is off (checked again, atomically,
        when writing)."""
        canonical = check_output_uri(uri, self.settings.allowed_output_prefixes)
        if not self.settings.allow_overwrite:
            await asyncio.to_thread(refuse_existing, canonical, self.settings.storage_options)
        return canonical

    async def _write(self, result, request: PreparedRequest, output_uri: str, source: str) -> dict[str, Any]:
        """Mask + report; 409 output_exists when either exists, unless allow_overwrite."""
        cfg = request.cfg.model_copy(update={"storage_options": self.settings.storage_options})
        return await asyncio.to_thread(write_result, result, input_uri=source, output_uri=output_uri, cfg=cfg,
                                       model_uri=self.settings.checkpoint, model_sha256=None,
                                       overwrite=self.settings.allow_overwrite)

    def _respond(self, result, request: PreparedRequest, fmt: str) -> Response:
        table = result.statistics
        if fmt == "dicom-seg":
            body = seg_response_bytes(result, request.cfg, catalog=self.processor.catalog,
                                      model_identity=self.settings.checkpoint or "")
            return Response(body, media_type="application/dicom",
                            headers={"Content-Disposition": content_disposition(f"{request.name}_seg.dcm")})
        if fmt == "json":
            return JSONResponse({"labels": table, "prompts": {"class_ids": list(result.prompts.class_ids)},
                                 "modality": result.prompts.modality, "shape": list(result.labels.shape),
                                 "timings_s": {k: round(v, 4) for k, v in result.timings.items()},
                                 **({"quality": result.quality.to_json()} if result.quality is not None else {})})
        if fmt == "preview":  # rendered on request (the input's voxels are still held by the request)
            png = preview_png(result, self.processor.catalog)
            return Response(png, media_type=MEDIA_TYPES["preview"],
                            headers={"Content-Disposition": content_disposition(f"{request.name}_preview.png")})
        if fmt == "nifti":
            names = json.dumps({str(r["id"]): r["name"] for r in table}, separators=(",", ":"))
            return Response(nifti_gz(mask_image(result)), media_type=MEDIA_TYPES["nifti"],
                            headers={"X-Nvseg-Labels": names,
                                     "Content-Disposition": content_disposition(f"{request.name}_seg.nii.gz")})
        body = nrrd_zip(result.labels, mask_image(result).affine, request.name, table)
        return Response(body, media_type=MEDIA_TYPES["nrrd_zip"],
                        headers={"Content-Disposition": content_disposition(f"{request.name}_seg.zip")})

    # -- routes ---------------------------------------------------------------------------------------
    @api.get("/v1/health/live")
    def live(self) -> dict[str, str]:
        return {"status": "live"}

    @api.get("/v1/health/ready")
    async def ready(self) -> JSONResponse:
        try:
            await asyncio.wait_for(self.model.info.remote(), timeout=5)
        except Exception:
            return JSONResponse({"status": "not ready"}, status_code=503,
                                headers={"Retry-After": str(max(1, round(self.settings.retry_after_s)))})
        return JSONResponse({"status": "ready"})

    @api.get("/v1/vista3d/info")
    async def info(self) -> dict[str, Any]:
        catalog = self.processor.catalog
        return {"name": "nvseg-ray", "version": __version__, "model": await self.model.info.remote(),
                "default_modality": self.settings.default_modality,
                "modalities": {m: list(ids) for m, ids in catalog.everything.items()},
                "labels": [c.to_dict() for c in catalog.classes.values()]}

    @api.post("/v1/vista3d/inference")
    async def inference(self, body: InferenceRequest) -> Response:
        async def work(deadline: float) -> Response:
            fields = prompt_fields(body.prompts, body.modality, self.settings.default_modality,
                                   self.settings.max_points)
            if is_dicomweb_url(body.image):  # a DICOMweb series: the URL passes the fetch policy first
                series = await asyncio.to_thread(dicomweb_series, body.image, self.policy)
                request, result = await self._segment(None, body.image, fields, deadline, series=series)
                return self._respond(result, request, body.output.format)
            self.processor.config_for(fields)  # unknown classes fail before any download
            raw = await self._fetch(body.image)
            request, result = await self._segment(raw, body.image, fields, deadline)
            return self._respond(result, request, body.output.format)

        return await self._admitted(work)

    @api.post("/v1/segment")
    async def segment(self, file: UploadFile = File(...), modality: str | None = Form(None),
                      classes: str | None = Form(None), points: str | None = Form(None),
                      point_labels: str | None = Form(None), output: str = Form("nifti"),
                      output_uri: str | None = Form(None)) -> Response:
        async def work(deadline: float) -> Response:
            limit = int(self.settings.max_upload_mb * 2**20)  # the whole body is capped by the BodyLimits middleware
            raw = await file.read(limit + 1)
            if len(raw) > limit:
                raise PayloadTooLarge(f"upload exceeds the limit of {limit} bytes",
                                      hint="send a gzip-compressed volume, or POST /v1/jobs with an s3:// URI")
            if output not in ("nifti", "nrrd_zip", "json", "dicom-seg", "preview"):
                raise ConfigError(f"unknown output '{output}'", hint="use nifti, nrrd_zip, json, preview (a PNG) or "
                                  "dicom-seg (for a zip of a DICOM series)")
            pts = parse_form_points(points)
            labels = parse_form_labels(point_labels)
            if labels is not None and pts is None:
                raise PromptError("point_labels given without points", hint="add points=i,j,k;i,j,k")
            fields = prompt_fields(None, modality, self.settings.default_modality)
            if parse_form_list(classes):
                fields["classes"] = parse_form_list(classes)
            if pts is not None:
                check_points(pts, labels, self.settings.max_points)
                fields |= {"points": pts, "point_labels": labels or [1] * len(pts)}
            target = await self._check_output_uri(output_uri) if output_uri else None  # canonical
            request, result = await self._segment(raw, file.filename or "upload.nii.gz", fields, deadline)
            if target:
                report = await self._write(result, request, target, f"upload:{file.filename}")
                return JSONResponse({"output_uri": target, "report": report, "labels": result.statistics})
            return self._respond(result, request, output)

        return await self._admitted(work)

    @api.post("/v1/jobs", status_code=202)
    async def submit(self, body: JobRequest) -> JSONResponse:
        if len(self._tasks) >= self.settings.max_jobs:  # admission: refuse now rather than fail later
            return error_response(JobsFull(
                f"this service replica already holds {len(self._tasks)} queued or running jobs "
                f"(limit {self.settings.max_jobs})", hint="retry after the Retry-After delay"),
                retry_after_s=self.settings.retry_after_s)
        if is_dicomweb_url(body.image):
            raise ConfigError("POST /v1/jobs takes NIfTI image URIs; a DICOMweb series is segmented by POST "
                              "/v1/vista3d/inference (or, for whole studies and archives, by the batch job)",
                              hint="send the DICOMweb series URL to /v1/vista3d/inference with "
                              '"output": {"format": "dicom-seg"}')
        fields = prompt_fields(body.prompts, body.modality, self.settings.default_modality, self.settings.max_points)
        self.processor.config_for(fields)
        body.output_uri = await self._check_output_uri(body.output_uri)  # the canonical URI is what gets written
        await asyncio.to_thread(check_source, body.image, self.policy)  # file://, loopback ... refused now
        if self._heartbeat is None or self._heartbeat.done():
            self._heartbeat = asyncio.create_task(self._beat())
        job_id = uuid.uuid4().hex
        await self.jobs.put.remote({"job_id": job_id, "status": "queued", "image": body.image, "owner": self.owner,
                                    "output_uri": body.output_uri, "created": time.time()})
        task = asyncio.create_task(self._run_job(job_id, body, fields))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return JSONResponse({"job_id": job_id, "status": "queued", "status_url": f"/v1/jobs/{job_id}"},
                            status_code=202)

    async def _run_job(self, job_id: str, body: JobRequest, fields: dict[str, Any]) -> None:
        if self._job_slots is None:
            self._job_slots = asyncio.Semaphore(self.settings.job_concurrency)
        try:
            async with self._job_slots:  # at most job_concurrency jobs per replica reach the model at once
                await self.jobs.put.remote({"job_id": job_id, "status": "running", "owner": self.owner})
                raw = await self._fetch(body.image)
                request, result = await self._segment(raw, body.image, fields)
                report = await self._write(result, request, body.output_uri, body.image)
            await self.jobs.put.remote({"job_id": job_id, "status": "succeeded", "report": report,
                                        "report_uri": body.output_uri[: -len(".nii.gz")] + ".json"})
        except NvsegError as err:
            await self.jobs.put.remote({"job_id": job_id, "status": "failed",
                                        "error": error_body(err)["error"]})
        except Exception as exc:  # noqa: BLE001 - recorded on the job, never lost; text only in the log
            body_ = json.loads(internal_error_response(exc).body)
            await self.jobs.put.remote({"job_id": job_id, "status": "failed", "error": body_["error"]})

    @api.get("/v1/jobs/{job_id}")
    async def job(self, job_id: str) -> dict[str, Any]:
        job = await self.jobs.get.remote(job_id)
        if job is None:
            raise JobNotFound(f"no job {job_id}", hint="job ids are returned by POST /v1/jobs")
        return job

    @api.get("/v1/jobs/{job_id}/result")
    async def job_result(self, job_id: str) -> dict[str, Any]:
        job = await self.job(job_id)
        if job["status"] != "succeeded":
            raise JobNotFinished(f"job {job_id} is {job['status']}", hint="poll GET /v1/jobs/{id} until succeeded")
        return {"job_id": job_id, "output_uri": job["output_uri"], "report_uri": job["report_uri"],
                "labels": job["report"]["labels"]}


def build_app(args: dict[str, Any]) -> serve.Application:
    """Serve application builder (``import_path: serve_apps.app:build_app``; ``args`` = ServeSettings)."""
    settings = ServeSettings.from_args(args)
    gpus = settings.model_gpus
    if gpus is None:  # auto: one GPU per model replica when the cluster has GPUs
        import ray

        gpus = 1.0 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) else 0.0
    options: dict[str, Any] = {"ray_actor_options": {"num_gpus": gpus}} if gpus else {}
    settings_args = dict(args)
    model = ModelDeployment.options(**options).bind(settings_args)
    return Gateway.bind(model, JobStore.bind(settings_args), settings_args)
