"""Typed, user-facing errors: the one error hierarchy of the package, the HTTP service and the CLIs.

Every failure a user can cause (bad input file, unknown class, missing checkpoint, a refused URL, ...) is raised
as a subclass of :class:`NvsegError`. Each carries a stable machine-readable ``code`` (used in run manifests,
HTTP error bodies and CLI exit codes), a human message that says *what* went wrong and *where*, and a ``hint``
that says how to fix it. The CLI prints ``str(err)`` and never a traceback.

Every family declares, as class attributes, the CLI ``exit_code`` (the ``EXIT_*`` constants below, README "Exit
codes") and the ``http_status`` the Serve app answers with. An instance may refine both ``code`` and
``http_status`` through the keyword arguments of :class:`NvsegError` (e.g. a fetch the remote refused is a 422,
a fetch that broke is a 502), and a family may map its ``reason`` detail onto a status
(:attr:`NvsegError.status_by_reason`, e.g. a storage ``not_found`` is a 404). The Serve app reads
``err.http_status`` and nothing else.

All error classes live here, grouped by family: core (config, prompt, input, checkpoint, weights, storage),
training, serving (fetch, auth, locations, jobs, model, encoding) and the HTTP client.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

# --------------------------------------------------------------------------------------------------------
# Exit codes (README "Exit codes"; pinned there by tests/test_architecture.py)
# --------------------------------------------------------------------------------------------------------

EXIT_OK = 0
#: an unexpected internal error (a bug).
EXIT_INTERNAL = 1
#: invalid options, config file, class, modality or point prompt.
EXIT_INVALID = 2
#: one or more volumes failed (``nvseg segment``, ``nvseg batch`` beyond ``--max-failures``, evaluation cases,
#: a service job); the others were written.
EXIT_VOLUMES_FAILED = 3
#: checkpoint or weights problem.
EXIT_CHECKPOINT = 4
#: storage (path / object-store) problem.
EXIT_STORAGE = 5
#: a training run failed.
EXIT_TRAINING_FAILED = 6
#: interrupted (Ctrl-C).
EXIT_INTERRUPTED = 130

#: Values of the ``reason`` detail on :class:`StorageError` (machine-readable sub-code).
REASON_NOT_FOUND = "not_found"
REASON_PERMISSION_DENIED = "permission_denied"
REASON_IS_A_DIRECTORY = "is_a_directory"
REASON_NO_CREDENTIALS = "no_credentials"
REASON_MISSING_PACKAGE = "missing_package"
REASON_UNSUPPORTED_SCHEME = "unsupported_scheme"
REASON_IO_ERROR = "io_error"


class NvsegError(Exception):
    """Base class of all user-facing errors.

    Args:
        message: what went wrong and where (name the file, class or option).
        hint: how to fix it; optional.
        code: refines the family's ``code`` for this instance (e.g. ``too_large`` for an :class:`InputError`).
        http_status: overrides the status this instance is answered with over HTTP.
        details: extra structured facts for manifests / JSON error bodies.

    Class attributes (declared per family):
        code: stable machine-readable code.
        exit_code: CLI exit status (``EXIT_*``).
        http_status: HTTP status of the Serve app's answer (500: a server-side problem).
        status_by_reason: ``details["reason"]`` -> HTTP status, consulted when no ``http_status`` is passed.
    """

    code: str = "error"
    exit_code: int = EXIT_INTERNAL
    http_status: int = 500
    status_by_reason: ClassVar[Mapping[str, int]] = {}

    def __init__(self, message: str, *, hint: str | None = None, code: str | None = None,
                 http_status: int | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.details = details
        if code:
            self.code = code
        if http_status is not None:
            self.http_status = int(http_status)
        elif str(details.get("reason")) in self.status_by_reason:
            self.http_status = self.status_by_reason[str(details["reason"])]

    def __str__(self) -> str:
        text = f"[{self.code}] {self.message}"
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form: ``{"code", "message", "hint", **details}``."""
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.hint:
            out["hint"] = self.hint
        out.update({k: v for k, v in self.details.items() if v is not None})
        return out


# --------------------------------------------------------------------------------------------------------
# Core: options, prompts, inputs, checkpoints, weights, storage
# --------------------------------------------------------------------------------------------------------


class ConfigError(NvsegError):
    """An option, config file or flag combination is invalid."""

    code = "invalid_config"
    exit_code = EXIT_INVALID
    http_status = 400


class PromptError(NvsegError):
    """A class/point prompt or modality is unknown or not allowed."""

    code = "invalid_prompt"
    exit_code = EXIT_INVALID
    http_status = 422


class InputError(NvsegError):
    """An input volume cannot be used. ``code`` is refined per failure (see :mod:`nvseg_ray.validation`)."""

    code = "invalid_input"
    exit_code = EXIT_VOLUMES_FAILED
    http_status = 422


class DicomError(InputError):
    """A DICOM source or series cannot be used (not DICOM, no image series, unsupported modality, unreadable
    instance). ``details`` name the series (``series_uid``) and, where one is at fault, the instance."""

    code = "dicom_error"


class DicomGeometryError(DicomError):
    """The instances of one series do not form one regular 3-D grid. Each fault is its own subclass; ``details``
    carry ``series_uid`` and the offending slice positions (mm along the slice normal, LPS)."""

    code = "dicom_geometry"


class DicomMissingSlice(DicomGeometryError):
    """One or more slices are missing from an otherwise regular stack (a gap of a whole multiple of the step)."""

    code = "dicom_missing_slice"


class DicomUnevenSpacing(DicomGeometryError):
    """Slice spacing varies along the stack (not a whole multiple of one step)."""

    code = "dicom_uneven_spacing"


class DicomGantryTilt(DicomGeometryError):
    """The stack is sheared: slice positions do not follow the slice normal (gantry tilt)."""

    code = "dicom_gantry_tilt"


class DicomMixedGeometry(DicomGeometryError):
    """Instances of one series differ in orientation, matrix size or pixel spacing."""

    code = "dicom_mixed_geometry"


class DicomDuplicatePosition(DicomGeometryError):
    """Two or more instances share one slice position."""

    code = "dicom_duplicate_position"


class DicomSingleSlice(DicomGeometryError):
    """The series has a single slice: no slice spacing, no 3-D volume."""

    code = "dicom_single_slice"


class DicomNoPixelData(DicomError):
    """An instance of an image series carries no pixel data (or it cannot be decoded)."""

    code = "dicom_no_pixel_data"


class CheckpointError(NvsegError):
    """A checkpoint is missing, unreadable, unsafe or does not match the network."""

    code = "invalid_checkpoint"
    exit_code = EXIT_CHECKPOINT


class WeightsDownloadError(NvsegError):
    """Downloading or verifying the pretrained weights failed."""

    code = "weights_download_failed"
    exit_code = EXIT_CHECKPOINT


class StorageError(NvsegError):
    """Reading from or writing to a path / object-storage URI failed (``details["reason"]``: a ``REASON_*``).

    Over HTTP: 404 not found, 403 permission denied, otherwise 422 (the client named an unusable location).
    """

    code = "storage_error"
    exit_code = EXIT_STORAGE
    http_status = 422
    status_by_reason = {REASON_NOT_FOUND: 404, REASON_PERMISSION_DENIED: 403}


class OutputExists(StorageError):
    """A write that must not replace anything found its target already there (HTTP 409)."""

    code = "output_exists"
    http_status = 409
    status_by_reason = {}


# --------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------


class DataListError(ConfigError):
    """A data list, or the files it names, cannot be used.

    ``message`` lists every problem found (one per line); ``details["problems"]`` holds them as a list.
    """

    code = "invalid_datalist"

    def __init__(self, problems: Sequence[str], *, source: str = "data list", hint: str | None = None,
                 **details: Any) -> None:
        problems = list(problems)
        noun = "problem" if len(problems) == 1 else "problems"
        message = f"{source}: {len(problems)} {noun}:\n" + "\n".join(f"  - {p}" for p in problems)
        super().__init__(message, hint=hint, problems=problems, **details)


class LabelMappingError(ConfigError):
    """A ``label_mappings`` value is malformed; the message lists every problem."""

    code = "invalid_label_mapping"


class TrainingError(NvsegError):
    """The training run failed (a worker raised, or retries were exhausted)."""

    code = "training_failed"
    exit_code = EXIT_TRAINING_FAILED


# --------------------------------------------------------------------------------------------------------
# Batch job (:mod:`nvseg_ray.batch`)
# --------------------------------------------------------------------------------------------------------


class ModelActorsUnavailable(NvsegError):
    """No model actor of the batch job could be started (every constructor failed)."""

    code = "pipeline_error"
    exit_code = EXIT_CHECKPOINT

    def __init__(self) -> None:
        super().__init__("no model actor could be started (their constructor failed; see the Ray worker logs)",
                         hint="check that --checkpoint is readable from the model nodes and that the model nodes "
                              "have the memory/GPU the actors ask for (--model-cpus, --model-gpus)")


# --------------------------------------------------------------------------------------------------------
# Serving: image fetching (:mod:`nvseg_ray.serving.fetch`)
# --------------------------------------------------------------------------------------------------------


class FetchError(NvsegError):
    """Base of the fetch errors; a fetch the remote refused is answered 422 (``http_status=422``), else 502."""

    code = "image_fetch_failed"
    exit_code = EXIT_STORAGE
    http_status = 502


class FetchRefused(FetchError):
    """The URI is not allowed by the policy (scheme, host, bucket or a private address). Nothing was sent."""

    code = "url_not_allowed"
    http_status = 403


class PayloadTooLarge(FetchError):
    """The image (or a request body) is larger than the configured cap (declared or while streaming)."""

    code = "payload_too_large"
    http_status = 413


class FetchFailed(FetchError):
    """The image could not be fetched: 422 when the remote said no (4xx, not found), 502 otherwise."""

    code = "image_fetch_failed"
    http_status = 502


class FetchTimeout(FetchError):
    """The fetch did not finish within ``FetchPolicy.timeout_s``."""

    code = "image_fetch_timeout"
    http_status = 504


# --------------------------------------------------------------------------------------------------------
# Serving: authentication, storage locations, output encoding
# --------------------------------------------------------------------------------------------------------


class AuthRequired(NvsegError):
    """401: no or an unknown bearer token."""

    code = "unauthorized"
    http_status = 401
    exit_code = EXIT_INVALID


class AuthUnavailable(NvsegError):
    """503: the tokens file could not be re-read; nobody is let in until it can."""

    code = "auth_unavailable"
    http_status = 503
    exit_code = EXIT_STORAGE


class LocationNotAllowed(NvsegError):
    """A client-named storage URI is malformed, ambiguous or outside the operator's allowed prefixes (403)."""

    code = "location_not_allowed"
    http_status = 403
    exit_code = EXIT_INVALID


class EncodeError(NvsegError):
    """A label map cannot be encoded (negative labels, ids above 65535, not 3-D). A server-side bug."""

    code = "encode_failed"
    http_status = 500


# --------------------------------------------------------------------------------------------------------
# Serving: admission, deadlines, jobs, the model deployment
# --------------------------------------------------------------------------------------------------------


class ServiceUnavailable(NvsegError):
    """503: the Gateway is at its admission bound (answered with ``Retry-After``)."""

    code = "overloaded"
    http_status = 503


class JobsFull(ServiceUnavailable):
    """This Gateway replica holds ``max_jobs`` queued + running jobs."""


class RequestTimeout(NvsegError):
    """504: the request did not finish within its deadline."""

    code = "request_timeout"
    http_status = 504


class WorkAbandoned(RequestTimeout):
    """Model work was refused or stopped because its request is gone (deadline passed or cancelled)."""


class JobNotFound(NvsegError):
    """404: no job with that id (on this service)."""

    code = "job_not_found"
    http_status = 404


class JobNotFinished(NvsegError):
    """409: the job's result was asked for before the job succeeded."""

    code = "job_not_finished"
    http_status = 409


class ModelUnavailable(NvsegError):
    """The model replica died, restarted or failed on the request (details only in the server log)."""

    code = "model_unavailable"
    http_status = 503


# --------------------------------------------------------------------------------------------------------
# The HTTP client (:mod:`nvseg_ray.client`)
# --------------------------------------------------------------------------------------------------------


class ServiceError(NvsegError):
    """The service answered with an error, or could not be reached.

    Attributes:
        status: HTTP status (``None`` when no answer came back: unreachable, timeout, wait timeout).
        code: the service's error code (``invalid_prompt``, ``url_not_allowed``, ...), ``http_<status>`` when
            the body had none, or ``service_unreachable`` / ``service_timeout`` / ``job_wait_timeout``.
        retry_after: seconds to wait before retrying (the ``Retry-After`` header, e.g. on 503), or ``None``.
        exit_code: 2 when the service said the request was invalid (4xx), else 1.
    """

    code = "service_error"

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None,
                 hint: str | None = None, retry_after: float | None = None, **details: Any) -> None:
        super().__init__(message, hint=hint, code=code, **details)
        self.status = status
        self.retry_after = retry_after
        if status is not None and 400 <= status < 500:
            self.exit_code = EXIT_INVALID  # the request was invalid (same family as bad options / prompts)

    def __str__(self) -> str:
        where = f"HTTP {self.status}: " if self.status is not None else ""
        text = f"[{self.code}] {where}{self.message}"
        if self.retry_after is not None:
            text += f" (retry after {self.retry_after:g} s)"
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text
