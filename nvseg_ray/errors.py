"""Typed, user-facing errors.

Every failure a user can cause (bad input file, unknown class, missing checkpoint, ...) is raised as a
subclass of :class:`NvsegError`. Each carries a stable machine-readable ``code`` (used in run
manifests, HTTP error bodies and CLI exit codes), a human message that says *what* went wrong and
*where*, and a ``hint`` that says how to fix it. The CLI prints ``str(err)`` and never a traceback.
"""

from __future__ import annotations

from typing import Any


class NvsegError(Exception):
    """Base class of all user-facing errors.

    Args:
        message: what went wrong and where (name the file, class or option).
        hint: how to fix it; optional.
        details: extra structured facts for manifests / JSON error bodies.
    """

    code: str = "error"
    #: CLI exit status for this family of errors (see README "Exit codes").
    exit_code: int = 1

    def __init__(self, message: str, *, hint: str | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.details = details

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


class ConfigError(NvsegError):
    """An option, config file or flag combination is invalid."""

    code = "invalid_config"
    exit_code = 2


class PromptError(NvsegError):
    """A class/point prompt or modality is unknown or not allowed."""

    code = "invalid_prompt"
    exit_code = 2


class InputError(NvsegError):
    """An input volume cannot be used. ``code`` is refined per failure (see :mod:`nvseg_ray.validation`)."""

    code = "invalid_input"
    exit_code = 3

    def __init__(self, message: str, *, code: str | None = None, hint: str | None = None, **details: Any):
        super().__init__(message, hint=hint, **details)
        if code:
            self.code = code


class CheckpointError(NvsegError):
    """A checkpoint is missing, unreadable, unsafe or does not match the network."""

    code = "invalid_checkpoint"
    exit_code = 4


class WeightsDownloadError(NvsegError):
    """Downloading or verifying the pretrained weights failed."""

    code = "weights_download_failed"
    exit_code = 4


class StorageError(NvsegError):
    """Reading from or writing to a path / object-storage URI failed."""

    code = "storage_error"
    exit_code = 5


class OutputExists(StorageError):
    """A write that must not replace anything found its target already there (HTTP 409)."""

    code = "output_exists"
    http_status = 409
