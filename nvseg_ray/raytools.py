"""Ray job plumbing shared by the batch pipeline (:mod:`.batch.pipeline`) and evaluation (:mod:`.evaluation.runner`).

Importing this module does not import Ray (:func:`ensure_ray` does, when a run starts). Credentials never
travel through Ray's ``runtime_env`` (which shows up in Ray's logs and dashboard APIs): workers read them from
their own environment (a local Ray inherits the driver's; cluster pods get them from a Kubernetes Secret or an
instance role); only non-secret settings are forwarded (:func:`forwarded_env`).
"""

from __future__ import annotations

import os
from typing import Any

from .errors import NvsegError
from .redaction import is_secret_env

#: environment variables forwarded to Ray workers when this process starts or joins a cluster -- except the
#: secret ones (:func:`nvseg_ray.redaction.is_secret_env`: keys, tokens, passwords, credential files).
FORWARDED_ENV_PREFIXES = ("AWS_", "HF_", "NVSEG_")
#: error code of the rows a broken pipeline left unfinished (:func:`stopped_message`).
CODE_PIPELINE_ERROR = "pipeline_error"


def forwarded_env() -> dict[str, str]:
    """The non-secret ``AWS_*``/``HF_*``/``NVSEG_*`` variables of this process (endpoint, region, NVSEG settings).

    Secrets (``AWS_SECRET_ACCESS_KEY``, ``AWS_ACCESS_KEY_ID``, ``AWS_SESSION_TOKEN``, ``HF_TOKEN``, credential
    file paths, ...) are never forwarded: Ray records a runtime_env in its logs and dashboard APIs.
    """
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES) and not is_secret_env(k)}


def runtime_env(env: dict[str, str]) -> dict[str, Any] | None:
    """The ``runtime_env`` option carrying ``env`` (from :func:`forwarded_env`), or ``None`` when it is empty."""
    return {"env_vars": env} if env else None


def ensure_ray(address: str | None = None) -> None:
    """Connect to ``address`` / ``RAY_ADDRESS`` (as inside ``ray job submit``), or start a local Ray.

    A local Ray's workers inherit this process's environment (credentials included); a cluster's workers use
    their own (Kubernetes Secret, instance role, ``AWS_SHARED_CREDENTIALS_FILE`` on every node).
    """
    import ray

    if ray.is_initialized():
        return
    ray.init(address=address, log_to_driver=True, logging_level="WARNING", configure_logging=True)


def stopped_message(exc: BaseException, what: str) -> str:
    """The ``error_message`` of a row left unfinished because the pipeline itself broke with ``exc``
    (cluster lost, no model actor, ...): ``"not <what>: the pipeline stopped: <reason>"``."""
    reason = exc.message if isinstance(exc, NvsegError) else f"{type(exc).__name__}: {str(exc)[:500]}"
    return f"not {what}: the pipeline stopped: {reason}"
