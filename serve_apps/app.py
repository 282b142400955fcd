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
import time
import uuid
from typing import Any

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.exceptions import BackPressureError

from nvseg_ray import __version__
from nvseg_ray.errors import ConfigError, InputError, NvsegError, PromptError, StorageError
from nvseg_ray.output import mask_image, refuse_existing, write_result
from nvseg_ray.redaction import redact
from nvseg_ray.serving.auth import AuthGate, BearerAuthMiddleware
from nvseg_ray.serving.encode import MEDIA_TYPES, nifti_gz, nrrd_zip
from nvseg_ray.serving.fetch import PayloadTooLarge, fetch_image
from nvseg_ray.serving.prefixes import check_output_uri
from nvseg_ray.serving.service import (
    InferenceRequest,
    JobRequest,
    ModelWorker,
    PreparedRequest,
    RequestProcessor,
    ServeSettings,
    error_body,
    parse_form_list,
    parse_form_points,
    prompt_fields,
)

api = FastAPI(title="nvseg-ray", version=__version__,
              description="NV-Segment-CTMR (VISTA3D) segmentation; NIM-compatible inference API.")
#: bearer-token check of this process's app (ServeSettings.auth_tokens_file), set when the Gateway starts; added
#: last, so it is the outermost middleware: a request without a valid token is answered before its body is read.
AUTH = AuthGate()
api.add_middleware(BearerAuthMiddleware, gate=AUTH)


class ServiceUnavailable(NvsegError):
    code = "overloaded"
    http_status = 503


class RequestTimeout(NvsegError):
    code = "request_timeout"
    http_status = 504


class OutputNotAllowed(NvsegError):
    code = "output_not_allowed"
    http_status = 403


class JobNotFound(NvsegError):
    code = "job_not_found"
    http_status = 404


class JobNotFinished(NvsegError):
    code = "job_not_finished"
    http_status = 409


def http_status(err: NvsegError) -> int:
    """The HTTP status of a user-facing error (5xx only for server-side problems)."""
    explicit = getattr(err, "http_status", None)
    if explicit:
        return int(explicit)
    if isinstance(err, StorageError):
        return {"not_found": 404, "permission_denied": 403}.get(str(err.details.get("reason")), 422)
    if isinstance(err, (PromptError, InputError)):
        return 422
    if isinstance(err, ConfigError):
        return 400
    return 500


def error_response(err: NvsegError, retry_after_s: float | None = None) -> JSONResponse:
    status = http_status(err)
    headers = {"Retry-After": str(max(1, round(retry_after_s)))} if status == 503 and retry_after_s is not None else None
    return JSONResponse(error_body(err), status_code=status, headers=headers)


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


@api.exception_handler(Exception)
async def _internal(_: Request, err: Exception) -> JSONResponse:
    body = {"error": {"code": "internal_error", "message": f"{type(err).__name__}: {err}"}}
    return JSONResponse(body, status_code=500)


@serve.deployment(name="Model", max_ongoing_requests=2, max_queued_requests=8, health_check_period_s=10)
class ModelDeployment:
    """Loads the weights once per replica; runs only inference (GPU when the replica has one)."""

    def __init__(self, args: dict[str, Any]) -> None:
        self.worker = ModelWorker(ServeSettings.from_args(args))

    async def infer(self, prepared, prompts):  # noqa: ANN001 - PreparedVolume, Prompts
        return await asyncio.to_thread(self.worker.infer, prepared, prompts)

    def info(self) -> dict[str, Any]:
        return self.worker.info()

    def check_health(self) -> None:
        self.worker.segmenter.model  # raises if the weights are gone


@serve.deployment(name="JobStore", num_replicas=1, max_ongoing_requests=100)
class JobStore:
    """In-memory job table shared by all ingress replicas (results themselves live in object storage)."""

    def __init__(self) -> None:
        self.jobs: dict[str, dict[str, Any]] = {}

    def put(self, job: dict[str, Any]) -> None:
        job = redact(job)  # image / output_uri / error texts: no user-info, no signatures (shown by GET /v1/jobs)
        self.jobs[job["job_id"]] = {**self.jobs.get(job["job_id"], {}), **job, "updated": time.time()}

    def get(self, job_id: str) -> dict[str, Any] | None:
        return self.jobs.get(job_id)


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

    # -- plumbing -----------------------------------------------------------------------------------
    async def _admitted(self, work):  # noqa: ANN001, ANN202 - coroutine factory
        """Admission control + request timeout around one request's work."""
        if self.inflight >= self.settings.max_inflight:
            return error_response(ServiceUnavailable(
                f"the service is busy ({self.inflight} requests in progress on this replica)",
                hint="retry after the Retry-After delay, or use POST /v1/jobs for large volumes"),
                retry_after_s=self.settings.retry_after_s)
        self.inflight += 1
        try:
            return await asyncio.wait_for(work(), timeout=self.settings.request_timeout_s)
        except asyncio.TimeoutError:
            return error_response(RequestTimeout(f"the request took longer than {self.settings.request_timeout_s:g}s",
                                                 hint="use POST /v1/jobs for large volumes"))
        except NvsegError as err:
            return error_response(err, retry_after_s=self.settings.retry_after_s)
        finally:
            self.inflight -= 1

    async def _segment(self, raw: bytes, name: str, fields: dict[str, Any]):  # noqa: ANN202
        cfg, prompts = self.processor.config_for(fields)
        request: PreparedRequest = await asyncio.to_thread(self.processor.prepare, raw, name, cfg, prompts)
        try:
            labels, infer_s = await self.model.infer.remote(request.prepared, prompts)
        except BackPressureError:
            raise ServiceUnavailable("the model replicas are saturated (max_queued_requests reached)",
                                     hint="retry after the Retry-After delay") from None
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

    @staticmethod
    def _respond(result, request: PreparedRequest, fmt: str) -> Response:
        table = result.statistics
        if fmt == "json":
            return JSONResponse({"labels": table, "prompts": {"class_ids": list(result.prompts.class_ids)},
                                 "modality": result.prompts.modality, "shape": list(result.labels.shape),
                                 "timings_s": {k: round(v, 4) for k, v in result.timings.items()}})
        if fmt == "nifti":
            names = json.dumps({str(r["id"]): r["name"] for r in table}, separators=(",", ":"))
            return Response(nifti_gz(mask_image(result)), media_type=MEDIA_TYPES["nifti"],
                            headers={"X-Nvseg-Labels": names,
                                     "Content-Disposition": f'attachment; filename="{request.name}_seg.nii.gz"'})
        body = nrrd_zip(result.labels, mask_image(result).affine, request.name, table)
        return Response(body, media_type=MEDIA_TYPES["nrrd_zip"],
                        headers={"Content-Disposition": f'attachment; filename="{request.name}_seg.zip"'})

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
        async def work() -> Response:
            fields = prompt_fields(body.prompts, body.modality, self.settings.default_modality)
            self.processor.config_for(fields)  # unknown classes fail before any download
            raw = await self._fetch(body.image)
            request, result = await self._segment(raw, body.image, fields)
            return self._respond(result, request, body.output.format)

        return await self._admitted(work)

    @api.post("/v1/segment")
    async def segment(self, http: Request, file: UploadFile = File(...), modality: str | None = Form(None),
                      classes: str | None = Form(None), points: str | None = Form(None),
                      point_labels: str | None = Form(None), output: str = Form("nifti"),
                      output_uri: str | None = Form(None)) -> Response:
        async def work() -> Response:
            limit = int(self.settings.max_upload_mb * 2**20)
            declared = int(http.headers.get("content-length") or 0)
            if declared > limit + 64 * 1024:
                raise PayloadTooLarge(f"upload of {declared} bytes exceeds the limit of {limit} bytes")
            raw = await file.read(limit + 1)
            if len(raw) > limit:
                raise PayloadTooLarge(f"upload exceeds the limit of {limit} bytes")
            if output not in ("nifti", "nrrd_zip", "json"):
                raise ConfigError(f"unknown output '{output}'", hint="use nifti, nrrd_zip or json")
            pts = parse_form_points(points)
            labels = [int(x) for x in (parse_form_list(point_labels) or [])] or None
            fields = prompt_fields(None, modality, self.settings.default_modality)
            if parse_form_list(classes):
                fields["classes"] = parse_form_list(classes)
            if pts is not None:
                fields |= {"points": pts, "point_labels": labels or [1] * len(pts)}
            target = await self._check_output_uri(output_uri) if output_uri else None  # canonical
            request, result = await self._segment(raw, file.filename or "upload.nii.gz", fields)
            if target:
                report = await self._write(result, request, target, f"upload:{file.filename}")
                return JSONResponse({"output_uri": target, "report": report, "labels": result.statistics})
            return self._respond(result, request, output)

        return await self._admitted(work)

    @api.post("/v1/jobs", status_code=202)
    async def submit(self, body: JobRequest) -> JSONResponse:
        fields = prompt_fields(body.prompts, body.modality, self.settings.default_modality)
        self.processor.config_for(fields)
        body.output_uri = await self._check_output_uri(body.output_uri)  # the canonical URI is what gets written
        job_id = uuid.uuid4().hex
        await self.jobs.put.remote({"job_id": job_id, "status": "queued", "image": body.image,
                                    "output_uri": body.output_uri, "created": time.time()})
        task = asyncio.create_task(self._run_job(job_id, body, fields))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return JSONResponse({"job_id": job_id, "status": "queued", "status_url": f"/v1/jobs/{job_id}"},
                            status_code=202)

    async def _run_job(self, job_id: str, body: JobRequest, fields: dict[str, Any]) -> None:
        await self.jobs.put.remote({"job_id": job_id, "status": "running"})
        try:
            raw = await self._fetch(body.image)
            request, result = await self._segment(raw, body.image, fields)
            report = await self._write(result, request, body.output_uri, body.image)
            await self.jobs.put.remote({"job_id": job_id, "status": "succeeded", "report": report,
                                        "report_uri": body.output_uri[: -len(".nii.gz")] + ".json"})
        except NvsegError as err:
            await self.jobs.put.remote({"job_id": job_id, "status": "failed", "error": err.to_dict()})
        except Exception as exc:  # noqa: BLE001 - recorded on the job, never lost
            await self.jobs.put.remote({"job_id": job_id, "status": "failed",
                                        "error": {"code": "internal_error", "message": f"{type(exc).__name__}: {exc}"}})

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
    return Gateway.bind(model, JobStore.bind(), settings_args)
