"""The model runner: loads the network once and runs inference on prepared volumes (GPU when available).

This is the only part of segmenting a volume that needs the weights; everything before and after it is in
:class:`nvseg_ray.stages.VolumeStages`, which CPU workers run without a model. What crosses from here to
:meth:`~nvseg_ray.stages.VolumeStages.finish` (through the batch job's rows or a Serve response) is one compact
label array on the model grid.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .config import InferenceConfig
from .errors import ConfigError
from .inference import ShouldStop, StopRequested, resolve_device, segment_classes, segment_points
from .model import LoadedModel, load_model
from .preprocess import PreparedVolume
from .prompts import Prompts
from .timing import timed

_LOG = logging.getLogger(__name__)


def engine_cache_root(cfg: InferenceConfig) -> str:
    """Where TensorRT engines go: ``cfg.engine_cache_dir``, else ``$NVSEG_ENGINE_CACHE``, else the default
    node-local folder (:func:`nvseg_ray.backends.engine_cache.default_cache_dir`)."""
    from .backends.engine_cache import default_cache_dir

    return os.path.expanduser(cfg.engine_cache_dir) if cfg.engine_cache_dir else str(default_cache_dir())


class ModelRunner:
    """Holds one model (loaded on first use, once) and segments any number of prepared volumes.

    On first use the weights load, move to the device, and ``cfg.backend`` is applied
    (:mod:`nvseg_ray.backends`: the choice, with its reason, is :attr:`backend`; a TensorRT or ``torch.compile``
    build happens then, so a model actor that touches :attr:`model` in its start-up takes work warm). A backend
    that fails at run time falls back to plain PyTorch for that volume and every later one.

    Args:
        cfg: inference configuration: ``cfg.checkpoint`` is loaded unless ``model`` is given; ``cfg.device`` picks
            the device; the sliding-window settings (patch size, window batch, overlap, AMP, class chunks) apply.
        model: an already loaded model (e.g. shared by a Ray actor or a test).
        log: where the backend choice is told (default: logging at INFO, ``nvseg_ray.model_runner``).
    """

    def __init__(self, cfg: InferenceConfig, model: LoadedModel | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        self.cfg = cfg
        self._model = model
        self._device: torch.device | None = None
        self._backend: Any = None  # BackendChoice once the model is ready
        self._env: Any = None  # the BackendEnvironment it was chosen for
        self._window_batch: int | None = None
        self._log = log or _LOG.info

    @property
    def window_batch(self) -> int:
        """Windows per forward pass: ``cfg.sw_batch_size``, or for ``auto`` from the device's free memory."""
        if self._window_batch is None:
            from .backends.window_batch import resolve_window_batch

            self._window_batch = resolve_window_batch(self.cfg.sw_batch_size, self.device, self.cfg.patch_size)
        return self._window_batch

    @property
    def backend(self) -> Any:
        """The :class:`~nvseg_ray.backends.choice.BackendChoice` in use (requested, backend, code, reason); loads
        the model when it is not loaded yet."""
        self.model  # noqa: B018 - the choice is made when the model is made ready
        return self._backend

    def backend_report(self) -> dict[str, Any]:
        """What reports, manifests and ``/v1/vista3d/info`` say about how the network runs."""
        return {**self.backend.to_json(), "window_batch": self.window_batch, "device": str(self.device),
                "amp": bool(self.cfg.amp and self.device.type == "cuda")}

    @property
    def device(self) -> torch.device:
        """The device inference runs on (``cfg.device``; ``auto``: CUDA when available, else CPU)."""
        if self._device is None:
            self._device = resolve_device(self.cfg.device)
        return self._device

    def _mark_engine_failed(self, reason: str) -> None:
        """Leave the failure marker of this runner's engine (best effort: the marker is advice for later starts)."""
        from .backends.accelerate import engine_key
        from .backends.engine_cache import EngineCache

        try:
            model = self._model
            key = engine_key(self._env, checkpoint_sha256=model.sha256 or "", patch_size=self.cfg.patch_size,
                             window_batch=self.window_batch, in_channels=model.architecture.in_channels)
            EngineCache(engine_cache_root(self.cfg)).mark_failed(key, "runtime_error", reason)
        except Exception as exc:  # noqa: BLE001 - never let the marker hide the fallback itself
            self._log(f"[nvseg] could not record the engine failure: {type(exc).__name__}: {exc}")

    @property
    def model(self) -> LoadedModel:
        """The loaded model, moved to :attr:`device` (loaded on first use).

        Raises:
            ConfigError: no checkpoint configured.
        """
        if self._model is None:
            if not self.cfg.checkpoint:
                raise ConfigError("no checkpoint given", hint="pass --checkpoint PATH_OR_URI "
                                  "(download the weights once with `nvseg weights download --dest models/model.pt`)")
            self._model = load_model(self.cfg.checkpoint, storage_options=self.cfg.storage_options)
        if next(self._model.network.parameters()).device != self.device:
            self._model.network.to(self.device)
        if self._backend is None:
            self._accelerate(self._model, self.cfg.backend)
        return self._model

    def _accelerate(self, model: LoadedModel, requested: str) -> None:
        """Choose the backend for ``requested`` on this device and apply it to ``model.network`` (a build runs
        here); the choice and any fallback are told through ``log``."""
        from .backends.accelerate import accelerate
        from .backends.choice import BackendEnvironment, choose_backend
        from .backends.engine_cache import EngineCache

        env = BackendEnvironment.probe(self.device)
        choice = choose_backend(requested, env)
        cache = EngineCache(engine_cache_root(self.cfg)) if choice.backend == "trt" else None
        model.network, choice = accelerate(
            model.network, choice, patch_size=tuple(self.cfg.patch_size), window_batch=self.window_batch,
            in_channels=model.architecture.in_channels, device=self.device, cache=cache,
            checkpoint_sha256=model.sha256 or "", env=env, amp=self.cfg.amp, log=self._log)
        self._backend, self._env = choice, env
        self._log(f"[nvseg] backend {choice.backend} (asked for {choice.requested}; {choice.code}: {choice.reason})")

    def _fall_back_to_torch(self, exc: BaseException) -> None:
        """A TensorRT / compiled encoder failed while running: reload the plain network and use torch from now on."""
        reason = f"the {self._backend.backend} encoder failed while running ({type(exc).__name__}: {exc}); " \
                 "running the plain PyTorch network from now on"
        if self._backend.backend == "trt":  # possibly a sticky CUDA error: later starts on this node go to torch
            self._mark_engine_failed(reason)
        choice = self._backend.fall_back("runtime_error", reason)
        self._model = None
        self._backend = choice  # set before reloading, so the reload applies no backend
        self._model = self.model
        self._log(f"[nvseg] backend torch ({choice.code}: {reason})")

    def infer(self, prepared: PreparedVolume, prompts: Prompts, timings: dict[str, float] | None = None,
              should_stop: ShouldStop | None = None) -> np.ndarray:
        """Run the network on one prepared volume.

        Args:
            prepared: the model input from :meth:`nvseg_ray.stages.VolumeStages.prepare`: ``image`` [C, H, W, D]
                float32 on the model grid; with point prompts, ``points`` [N, 3] in model-grid voxels.
            prompts: the global class ids to segment (one class with point prompts).
            timings: ``"infer"`` wall seconds land here (the first call's model load is not counted).
            should_stop: polled before every window; True raises :class:`~nvseg_ray.inference.StopRequested`.

        Returns:
            [H, W, D] global class ids on the model grid (the same H, W, D as ``prepared.image``), 0 background, a
            CPU numpy array in the integer dtype inference produces (passed through, not widened).

        Raises:
            ConfigError: no checkpoint, or the checkpoint's input channels differ from the volume's.
        """
        model = self.model  # load (and build an accelerated encoder) outside the timer on first use
        try:
            return self._infer(model, prepared, prompts, timings, should_stop)
        except (StopRequested, ConfigError):
            raise
        except Exception as exc:  # noqa: BLE001 - only an accelerated backend gets a second chance, in torch
            if self._backend is None or self._backend.backend == "torch":
                raise
            self._fall_back_to_torch(exc)
            return self._infer(self.model, prepared, prompts, timings, should_stop)

    def _infer(self, model: LoadedModel, prepared: PreparedVolume, prompts: Prompts,
               timings: dict[str, float] | None, should_stop: ShouldStop | None) -> np.ndarray:
        cfg = self.cfg if self.cfg.sw_batch_size == self.window_batch else self.cfg.model_copy(
            update={"sw_batch_size": self.window_batch})
        with timed(timings if timings is not None else {}, "infer"):
            image = prepared.image.as_tensor()[None]
            in_channels = model.architecture.in_channels
            if image.shape[1] != in_channels:
                raise ConfigError(f"checkpoint expects {in_channels} input channels, the volume has {image.shape[1]}")
            if prompts.with_points:
                assert prepared.points is not None and prepared.point_labels is not None
                labels = segment_points(model.network, image, prompts.class_ids[0], prepared.points,
                                        prepared.point_labels, cfg, self.device, should_stop=should_stop)
            else:
                labels = segment_classes(model.network, image, prompts.class_ids, cfg, self.device,
                                         should_stop=should_stop, fixed_batch=self._backend.backend == "compile")
            return labels.cpu().numpy()
