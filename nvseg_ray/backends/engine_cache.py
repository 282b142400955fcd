"""The node-local TensorRT plan cache: keyed plans, one build at a time per key, atomic writes, failure markers.

MONAI's ``trt_compile`` saves its engine as ``<base_path>.<submodule>.plan``: not keyed by GPU model, TensorRT
version or shape, and written in place (a crash mid-write leaves a truncated plan that the next start loads).
Engines do not carry over between GPU models or TensorRT versions, so this cache keys each plan by everything
that makes it valid (:class:`EngineKey`), builds under an exclusive ``fcntl.flock`` (several model actors on one
node share one build: the first builds, the others wait and load its plan), writes to a temporary file in the
same folder and renames it into place (``os.replace``), and remembers a failed build in a JSON marker so that
later starts go straight to PyTorch (:func:`nvseg_ray.backends.choice.choose_backend` ``failed_before=``).

Plans are named ``<EngineKey.file_stem()>.image_encoder.encoder.plan`` (:data:`PLAN_SUFFIX`), which is exactly
the name MONAI derives from ``base_path = <root>/<file_stem>`` and ``submodule="image_encoder.encoder"``; see
:func:`monai_base_path`.

The folder must be node-local (``flock`` is not reliable on every network file system).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: node-local, survives actor restarts; configurable (InferenceConfig.engine_cache_dir / --engine-cache-dir /
#: NVSEG_ENGINE_CACHE)
DEFAULT_ENGINE_CACHE_DIR = "~/.cache/nvseg-ray/engines"
ENGINE_CACHE_ENV = "NVSEG_ENGINE_CACHE"
#: How long a start waits for another process's build of the same engine. An fp16 build of the 175 M-parameter
#: encoder at optimisation level 5 takes minutes (ONNX export plus the TensorRT tactic search); a lock held for
#: longer than half an hour means a stuck (or hung-up) build, and waiting longer only keeps the actor from serving.
DEFAULT_BUILD_TIMEOUT_S = 1800.0
#: The submodule that becomes an engine (upstream's ``configs/inference_trt.json``).
ENGINE_SUBMODULE = "image_encoder.encoder"
#: ``trt_compile`` saves ``f"{base_path}.{submodule}.plan"``; plan files end so, so that base paths line up.
PLAN_SUFFIX = f".{ENGINE_SUBMODULE}.plan"

_POLL_S = 0.05
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class BuildTimeout(TimeoutError):
    """Waiting for another process's build of the same engine (its lock) took longer than ``build_timeout_s``.

    A plain exception (not an :class:`nvseg_ray.errors.NvsegError`): it never reaches a user; the caller
    (:func:`nvseg_ray.backends.accelerate.accelerate`) marks the failure and falls back to PyTorch with code
    ``build_timeout``.
    """


def default_cache_dir() -> Path:
    """``$NVSEG_ENGINE_CACHE`` if set, else :data:`DEFAULT_ENGINE_CACHE_DIR` (user expanded)."""
    return Path(os.environ.get(ENGINE_CACHE_ENV) or DEFAULT_ENGINE_CACHE_DIR).expanduser()


def _safe(text: str) -> str:
    return _UNSAFE.sub("_", str(text)).strip("._-") or "x"


@dataclass(frozen=True)
class EngineKey:
    """Everything a TensorRT plan is valid for: the weights, the GPU, the software, the precision and shapes."""

    checkpoint_sha256: str
    gpu_name: str
    compute_capability: str
    tensorrt_version: str
    monai_version: str
    precision: str
    patch_size: tuple[int, int, int]
    window_batch: int
    in_channels: int

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["patch_size"] = [int(v) for v in self.patch_size]
        out["window_batch"] = int(self.window_batch)
        out["in_channels"] = int(self.in_channels)
        return out

    def digest(self) -> str:
        """Stable across processes and runs: sha256 of the sorted, compact JSON of the fields, first 24 hex."""
        text = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]

    def file_stem(self) -> str:
        """Readable prefix plus the digest, only ``[A-Za-z0-9._-]``: ``vista3d-encoder-trt10.3-fp16-w1-<digest>``."""
        trt = ".".join(str(self.tensorrt_version).split(".")[:2])
        return "-".join(("vista3d-encoder", _safe(f"trt{trt}"), _safe(self.precision),
                         f"w{int(self.window_batch)}", self.digest()))


class EngineCache:
    """Plans under ``root`` (created with its parents as needed), one build per key at a time.

    Args:
        root: the node-local cache folder (``~`` expanded).
        build_timeout_s: how long :meth:`build` waits for another process's build of the same key.
    """

    def __init__(self, root: str | os.PathLike, *, build_timeout_s: float = DEFAULT_BUILD_TIMEOUT_S) -> None:
        self.root = Path(root).expanduser()
        self.build_timeout_s = float(build_timeout_s)

    # -- names --------------------------------------------------------------------------------------------

    def plan_path(self, key: EngineKey) -> Path:
        """``<root>/<file_stem><PLAN_SUFFIX>``: the final plan (only ever a complete one)."""
        return self.root / f"{key.file_stem()}{PLAN_SUFFIX}"

    def lock_path(self, key: EngineKey) -> Path:
        return self.root / f"{key.file_stem()}.lock"

    def marker_path(self, key: EngineKey) -> Path:
        return self.root / f"{key.file_stem()}.failed.json"

    def _temp_path(self, key: EngineKey) -> Path:
        # same folder (os.replace stays a rename); ends with PLAN_SUFFIX so MONAI's naming lines up for it too
        return self.root / f".tmp-{os.getpid()}-{secrets.token_hex(4)}-{key.file_stem()}{PLAN_SUFFIX}"

    # -- failure markers ------------------------------------------------------------------------------------

    def failed_before(self, key: EngineKey) -> dict[str, Any] | None:
        """The marker :meth:`mark_failed` wrote for ``key`` (with ``"marker"``: its path), else None."""
        path = self.marker_path(key)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            data = {"code": "build_failed", "reason": "unreadable failure marker"}
        if not isinstance(data, dict):
            data = {"code": "build_failed", "reason": str(data)}
        data.setdefault("marker", str(path))
        return data

    def mark_failed(self, key: EngineKey, code: str, reason: str) -> None:
        """Write the failure marker for ``key`` atomically (temp file + ``os.replace``)."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.marker_path(key)
        body = {"code": str(code), "reason": str(reason), "time": time.time(), "pid": os.getpid(),
                "marker": str(path), "key": key.to_json()}
        tmp = path.with_name(f".tmp-{os.getpid()}-{secrets.token_hex(4)}-{path.name}")
        try:
            tmp.write_text(json.dumps(body, indent=1, sort_keys=True))
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def clear_failure(self, key: EngineKey) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.marker_path(key).unlink()

    # -- building -------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self, key: EngineKey) -> Iterator[None]:
        """Hold the exclusive lock of ``key``; waiting longer than ``build_timeout_s`` raises :class:`BuildTimeout`."""
        self.root.mkdir(parents=True, exist_ok=True)
        lock = self.lock_path(key)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = time.monotonic() + max(0.0, self.build_timeout_s)
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                        raise
                    if time.monotonic() >= deadline:
                        raise BuildTimeout(
                            f"waited {self.build_timeout_s:g} s for another build of {key.file_stem()} "
                            f"(lock {lock}); it seems stuck") from None
                    time.sleep(_POLL_S)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def build(self, key: EngineKey, build_fn: Callable[[Path], None]) -> Path:
        """The plan of ``key``: the existing one, or built by ``build_fn`` (once per node at a time).

        Under the key's exclusive lock: when the plan exists already it is returned without building; else
        ``build_fn(tmp_path)`` writes the plan to a temporary file in the same folder (its name ends with
        :data:`PLAN_SUFFIX`), which is then renamed into place atomically. A partial plan is never visible under
        the final name.

        Raises:
            BuildTimeout: the lock was not obtained within ``build_timeout_s``.
            Exception: whatever ``build_fn`` raised (its temp file is removed; the caller marks the failure);
                RuntimeError when ``build_fn`` returned without writing a plan.
        """
        final = self.plan_path(key)
        if final.is_file():  # complete by construction (only ever renamed into place)
            return final
        with self.locked(key):
            if final.is_file():  # another process built it while we waited
                return final
            self._remove_stale_temps(key)  # left by a builder that died holding the lock
            tmp = self._temp_path(key)
            try:
                build_fn(tmp)
                if not tmp.is_file() or tmp.stat().st_size == 0:
                    raise RuntimeError(f"the engine build wrote no plan to {tmp}")
                with open(tmp, "rb") as fh:
                    os.fsync(fh.fileno())
                os.replace(tmp, final)
                with contextlib.suppress(OSError):
                    dir_fd = os.open(self.root, os.O_RDONLY)
                    try:
                        os.fsync(dir_fd)
                    finally:
                        os.close(dir_fd)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
        return final

    def _remove_stale_temps(self, key: EngineKey) -> None:
        for stale in self.root.glob(f".tmp-*-{key.file_stem()}{PLAN_SUFFIX}"):
            with contextlib.suppress(OSError):
                stale.unlink()


def monai_base_path(plan_path: str | os.PathLike, submodule: str = ENGINE_SUBMODULE) -> str:
    """The ``base_path`` for which MONAI's ``trt_compile(..., submodule=submodule)`` reads and writes
    ``plan_path`` (it uses ``f"{base_path}.{submodule}.plan"``).

    Raises:
        ValueError: ``plan_path`` does not end with ``.<submodule>.plan``.
    """
    text = str(plan_path)
    suffix = f".{submodule}.plan"
    if not text.endswith(suffix):
        raise ValueError(f"{text} does not end with {suffix}: MONAI's trt_compile would not use it")
    return text[: -len(suffix)]
