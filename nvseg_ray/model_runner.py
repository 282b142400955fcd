"""The model runner: loads the network once and runs inference on prepared volumes (GPU when available).

This is the only part of segmenting a volume that needs the weights; everything before and after it is in
:class:`nvseg_ray.stages.VolumeStages`, which CPU workers run without a model. What crosses from here to
:meth:`~nvseg_ray.stages.VolumeStages.finish` (through the batch job's rows or a Serve response) is one compact
label array on the model grid.
"""

from __future__ import annotations

import numpy as np
import torch

from .config import InferenceConfig
from .errors import ConfigError
from .inference import ShouldStop, resolve_device, segment_classes, segment_points
from .model import LoadedModel, load_model
from .preprocess import PreparedVolume
from .prompts import Prompts
from .timing import timed


class ModelRunner:
    """Holds one model (loaded on first use, once) and segments any number of prepared volumes.

    Args:
        cfg: inference configuration: ``cfg.checkpoint`` is loaded unless ``model`` is given; ``cfg.device`` picks
            the device; the sliding-window settings (patch size, window batch, overlap, AMP, class chunks) apply.
        model: an already loaded model (e.g. shared by a Ray actor or a test).
    """

    def __init__(self, cfg: InferenceConfig, model: LoadedModel | None = None) -> None:
        self.cfg = cfg
        self._model = model
        self._device: torch.device | None = None

    @property
    def device(self) -> torch.device:
        """The device inference runs on (``cfg.device``; ``auto``: CUDA when available, else CPU)."""
        if self._device is None:
            self._device = resolve_device(self.cfg.device)
        return self._device

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
        return self._model

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
        model = self.model  # load outside the timer on first use
        with timed(timings if timings is not None else {}, "infer"):
            image = prepared.image.as_tensor()[None]
            in_channels = model.architecture.in_channels
            if image.shape[1] != in_channels:
                raise ConfigError(f"checkpoint expects {in_channels} input channels, the volume has {image.shape[1]}")
            if prompts.with_points:
                assert prepared.points is not None and prepared.point_labels is not None
                labels = segment_points(model.network, image, prompts.class_ids[0], prepared.points,
                                        prepared.point_labels, self.cfg, self.device, should_stop=should_stop)
            else:
                labels = segment_classes(model.network, image, prompts.class_ids, self.cfg, self.device,
                                         should_stop=should_stop)
            return labels.cpu().numpy()
