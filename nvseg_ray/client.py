"""Python client of the nvseg HTTP service (the Ray Serve app; NIM VISTA-3D compatible API).

Example::

    from nvseg_ray.client import NvsegClient

    with NvsegClient("http://127.0.0.1:8000") as client:
        client.ready()                                             # True once the model is loaded
        zipped = client.infer("https://host/scan.nii.gz", classes=["liver", "spleen"])   # NIM-style zip
        mask = client.segment_file("scan.nii.gz", modality="CT_BODY")                     # .nii.gz bytes
        job_id = client.submit_job("s3://in/scan.nii.gz", "s3://out/scan_seg.nii.gz")
        client.wait(job_id)                                        # {"status": "succeeded", ...}

Every non-2xx answer becomes a :class:`ServiceError` carrying the HTTP ``status``, the service's error
``code``/``message``/``hint`` (from the body ``{"error": {...}}``) and, when sent, ``retry_after`` seconds.
A service that cannot be reached raises ``ServiceError`` with code ``service_unreachable``.

Only ``httpx`` is needed (no torch, no Ray): ``pip install httpx``.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx

from .errors import ConfigError, ServiceError, StorageError

__all__ = [
    "DEFAULT_URL",
    "OUTPUT_FORMATS",
    "TERMINAL_JOB_STATUSES",
    "NvsegClient",
    "ServiceError",
    "error_from_response",
    "format_points",
    "parse_retry_after",
]

DEFAULT_URL = "http://127.0.0.1:8000"
#: ``output.format`` values of the inference API.
OUTPUT_FORMATS = ("nrrd_zip", "nifti", "json", "preview")
#: Job states after which :meth:`NvsegClient.wait` returns.
TERMINAL_JOB_STATUSES = ("succeeded", "failed")

_UNREACHABLE_HINT = (
    "Check the service URL (--url / NVSEG_URL), that the app is deployed and healthy (`serve status` on the "
    "Ray head) and that this machine can reach it (port-forward, firewall)."
)
_RESERVED = frozenset({"code", "message", "hint", "status", "retry_after"})


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header: delay-seconds (``"5"``) or an HTTP date; ``None`` if absent/bad."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - (now or datetime.now(timezone.utc))).total_seconds())


def _detail_message(detail: Any) -> str:
    """FastAPI's default ``{"detail": ...}`` (e.g. request validation errors) as one line."""
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, Mapping):
                loc = ".".join(str(p) for p in item.get("loc", ()) if p != "body")
                parts.append(f"{loc}: {item.get('msg', item)}" if loc else str(item.get("msg", item)))
            else:
                parts.append(str(item))
        return "; ".join(parts)
    return str(detail)


def _where(response: httpx.Response) -> str:
    """`` (POST /v1/segment)`` for messages; empty when the response carries no request."""
    try:
        return f" ({response.request.method} {response.request.url.path})"
    except RuntimeError:
        return ""


def error_from_response(response: httpx.Response) -> ServiceError:
    """The :class:`ServiceError` for a non-2xx ``response`` (``{"error": {"code", "message", "hint"?}}``)."""
    status = response.status_code
    retry_after = parse_retry_after(response.headers.get("retry-after"))
    code = f"http_{status}"
    message = f"{response.reason_phrase or 'error'}{_where(response)}"
    hint: str | None = None
    details: dict[str, Any] = {}
    try:
        body: Any = response.json()
    except ValueError:
        body = None
    if isinstance(body, Mapping) and isinstance(body.get("error"), Mapping):
        error = body["error"]
        code = str(error.get("code") or code)
        message = str(error.get("message") or message)
        hint = str(error["hint"]) if error.get("hint") else None
        details = {str(k): v for k, v in error.items() if k not in _RESERVED}
    elif isinstance(body, Mapping) and "detail" in body:
        message = _detail_message(body["detail"])
    elif response.text.strip():
        message = response.text.strip()[:500]
    if status == 503 and hint is None:
        hint = "The service is busy or still starting; retry later" + (
            f" (after {retry_after:g} s)." if retry_after is not None else ".")
    return ServiceError(message, status=status, code=code, hint=hint, retry_after=retry_after, **details)


def _number(value: float) -> str:
    """``12`` for 12.0, else the shortest round-tripping float text."""
    number = float(value)
    return str(int(number)) if number.is_integer() else repr(number)


def format_points(points: Sequence[Sequence[float]]) -> str:
    """``[(1, 2, 3), (4, 5.5, 6)]`` -> ``"1,2,3;4,5.5,6"`` (the multipart ``points`` field)."""
    chunks = []
    for point in points:
        if len(point) != 3:
            raise ConfigError(f"a point needs 3 voxel coordinates (i, j, k), got {tuple(point)!r}")
        chunks.append(",".join(_number(v) for v in point))
    return ";".join(chunks)


def _check_format(output: str) -> None:
    if output not in OUTPUT_FORMATS:
        raise ConfigError(f"unknown output format {output!r}", hint=f"use one of {', '.join(OUTPUT_FORMATS)}")


class NvsegClient:
    """Client of one nvseg service.

    Args:
        base_url: e.g. ``http://127.0.0.1:8000`` (a path prefix such as ``https://gw/nvseg`` is kept).
        timeout_s: per-request network timeout (connect/read/write), seconds. Synchronous inference of a
            large volume can take minutes; use :meth:`submit_job` for long cases.
        headers: extra headers on every request (e.g. ``{"Authorization": "Bearer ..."}`` for a gateway).
        transport: an ``httpx`` transport (tests: ``httpx.MockTransport``); default = real network.
    """

    def __init__(self, base_url: str, timeout_s: float = 600, headers: dict[str, str] | None = None, *,
                 transport: httpx.BaseTransport | None = None) -> None:
        url = (base_url or "").strip().rstrip("/")
        if not url.lower().startswith(("http://", "https://")):
            raise ConfigError(f"the service URL must start with http:// or https://, got {base_url!r}",
                              hint=f"e.g. {DEFAULT_URL}")
        self.base_url = url
        self.timeout_s = float(timeout_s)
        self._http = httpx.Client(base_url=url, timeout=self.timeout_s, headers=dict(headers or {}),
                                  transport=transport)

    # -- plumbing -------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> NvsegClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"NvsegClient({self.base_url!r})"

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request; network failures become ``ServiceError`` (HTTP errors are left to the caller)."""
        try:
            return self._http.request(method, path, **kwargs)
        except httpx.ConnectTimeout as exc:
            raise self._unreachable(exc) from exc
        except httpx.TimeoutException as exc:
            raise ServiceError(
                f"{method} {self.base_url}{path} got no answer within {self.timeout_s:g} s "
                f"({type(exc).__name__}).",
                code="service_timeout",
                hint="Raise the client timeout (--timeout), or use the jobs API (submit_job / "
                "`nvseg client submit`) for large volumes.",
            ) from exc
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc

    def _unreachable(self, exc: Exception) -> ServiceError:
        return ServiceError(f"cannot reach the service at {self.base_url}: {type(exc).__name__}: {exc}",
                            code="service_unreachable", hint=_UNREACHABLE_HINT)

    def _request(self, method: str, path: str, *, expect: Sequence[int] | None = None,
                 **kwargs: Any) -> httpx.Response:
        """A request that must succeed (2xx, or one of ``expect``); otherwise raises ``ServiceError``."""
        response = self._send(method, path, **kwargs)
        ok = response.status_code in expect if expect is not None else response.is_success
        if not ok:
            if response.is_success:
                raise ServiceError(f"{method} {path} answered HTTP {response.status_code}, expected "
                                   f"{'/'.join(str(s) for s in expect or ())}", status=response.status_code,
                                   code="invalid_response")
            raise error_from_response(response)
        return response

    @staticmethod
    def _json(response: httpx.Response) -> Any:
        try:
            return response.json()
        except ValueError as exc:
            raise ServiceError(f"the service did not answer JSON{_where(response)} "
                               f"(Content-Type {response.headers.get('content-type')!r})",
                               status=response.status_code, code="invalid_response") from exc

    @staticmethod
    def _payload(image: str, classes: Sequence[int | str] | None, points: Mapping[str, Any] | None,
                 modality: str | None, point_labels: Sequence[int] | None) -> dict[str, Any]:
        payload: dict[str, Any] = {"image": image}
        prompts: dict[str, Any] = {}
        if classes is not None:
            prompts["classes"] = list(classes)
        if points is not None:
            prompts["points"] = {str(name): [list(p) for p in pts] for name, pts in points.items()}
        if point_labels is not None:
            prompts["point_labels"] = [int(v) for v in point_labels]
        if prompts:
            payload["prompts"] = prompts
        if modality is not None:
            payload["modality"] = modality
        return payload

    # -- health and info --------------------------------------------------------------------------------------

    def live(self) -> dict[str, Any]:
        """``GET /v1/health/live`` (the process answers)."""
        return self._json(self._request("GET", "/v1/health/live"))

    def ready(self) -> bool:
        """``GET /v1/health/ready``: ``True`` on 200, ``False`` on 503 (model not loaded / draining)."""
        response = self._send("GET", "/v1/health/ready")
        if response.status_code == 200:
            return True
        if response.status_code == 503:
            return False
        raise error_from_response(response)

    def info(self) -> dict[str, Any]:
        """``GET /v1/vista3d/info``: version, model and label classes."""
        return self._json(self._request("GET", "/v1/vista3d/info"))

    # -- synchronous inference ----------------------------------------------------------------------------------

    def infer(self, image: str, classes: list[int | str] | None = None,
              points: dict[str, list[list[float]]] | None = None, modality: str | None = None,
              output: str = "nrrd_zip", *, point_labels: list[int] | None = None) -> bytes | dict[str, Any]:
        """``POST /v1/vista3d/inference`` (NIM request shape) for the image at URI ``image``.

        Args:
            image: ``http(s)://`` or ``s3://`` URI the *service* can fetch.
            classes: class names or ids; ``None`` = the modality's everything-set.
            points: ``{class: [[i, j, k], ...]}`` voxel points of one class (input grid).
            modality: ``CT_BODY``, ``MRI_BODY`` or ``MRI_BRAIN`` (service default when ``None``).
            output: ``nrrd_zip`` (zip with ``<stem>_seg.nrrd``), ``nifti`` (``.nii.gz``) or ``json``.
            point_labels: extension: 1 (positive) / 0 (negative) per point.

        Returns:
            The body bytes, or the parsed JSON for ``output="json"``.
        """
        _check_format(output)
        payload = self._payload(image, classes, points, modality, point_labels)
        payload["output"] = {"format": output}
        response = self._request("POST", "/v1/vista3d/inference", json=payload)
        return self._json(response) if output == "json" else response.content

    def segment_file(self, path: str | Path, *, modality: str | None = None,
                     classes: list[int | str] | None = None,
                     points: list[tuple[float, float, float]] | None = None,
                     point_labels: list[int] | None = None, output: str = "nifti",
                     output_uri: str | None = None) -> bytes | dict[str, Any]:
        """``POST /v1/segment``: upload a local ``.nii``/``.nii.gz`` (multipart field ``file``).

        Returns:
            The mask bytes (``nifti`` / ``nrrd_zip``), or the JSON answer when ``output="json"`` or
            ``output_uri`` is given (the service then writes the mask there).
        """
        _check_format(output)
        file_path = Path(path)
        if not file_path.is_file():
            raise StorageError(f"cannot upload {str(file_path)!r}: no such file", uri=str(file_path),
                               reason="not_found", hint="pass the path of a local .nii/.nii.gz file")
        form: dict[str, str] = {}
        if modality is not None:
            form["modality"] = modality
        if classes is not None:
            form["classes"] = ",".join(str(c) for c in classes)
        if points is not None:
            form["points"] = format_points(points)
        if point_labels is not None:
            form["point_labels"] = ",".join(str(int(v)) for v in point_labels)
        form["output"] = output
        if output_uri is not None:
            form["output_uri"] = output_uri
        with file_path.open("rb") as fh:
            response = self._request("POST", "/v1/segment", data=form,
                                     files={"file": (file_path.name, fh, "application/octet-stream")})
        if output == "json" or output_uri is not None:
            return self._json(response)
        return response.content

    # -- asynchronous jobs -------------------------------------------------------------------------------------

    def submit_job(self, image: str, output_uri: str, classes: list[int | str] | None = None,
                   modality: str | None = None, points: dict[str, list[list[float]]] | None = None, *,
                   point_labels: list[int] | None = None, output: str | None = None) -> str:
        """``POST /v1/jobs`` (202): segment ``image`` in the background, writing the mask to ``output_uri``.

        Returns:
            The ``job_id`` to pass to :meth:`job` / :meth:`wait`.
        """
        payload = self._payload(image, classes, points, modality, point_labels)
        if output is not None:
            _check_format(output)
            payload["output"] = {"format": output}
        payload["output_uri"] = output_uri
        body = self._json(self._request("POST", "/v1/jobs", json=payload, expect=(200, 201, 202)))
        job_id = body.get("job_id") if isinstance(body, Mapping) else None
        if not job_id:
            raise ServiceError(f"POST /v1/jobs answered without a job_id: {body!r}", code="invalid_response")
        return str(job_id)

    def job(self, job_id: str) -> dict[str, Any]:
        """``GET /v1/jobs/{job_id}``: ``{"job_id", "status", ...}``."""
        return self._json(self._request("GET", f"/v1/jobs/{quote(str(job_id), safe='')}"))

    def wait(self, job_id: str, timeout_s: float = 600, poll_s: float = 0.5) -> dict[str, Any]:
        """Poll :meth:`job` until its status is ``succeeded`` or ``failed``; returns the last answer.

        Raises:
            ServiceError: ``job_wait_timeout`` after ``timeout_s`` seconds (the job keeps running).
        """
        deadline = time.monotonic() + float(timeout_s)
        while True:
            state = self.job(job_id)
            status = state.get("status")
            if status in TERMINAL_JOB_STATUSES:
                return state
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ServiceError(f"job {job_id} is still {status!r} after {float(timeout_s):g} s",
                                   code="job_wait_timeout", job_id=job_id, job_status=status,
                                   hint=f"it keeps running; check it later with `nvseg client job {job_id}`")
            time.sleep(max(0.0, min(float(poll_s), remaining)))
