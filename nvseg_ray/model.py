"""VISTA3D network construction and checkpoint loading.

The network is MONAI's ``vista3d132`` family (SegResNetDS2 encoder with a point branch and an
automatic branch, a class head and a SAM-style point head). Its two free architecture parameters --
the input channel count and the embedding width -- are read from the checkpoint's tensor shapes, so
the released NV-Segment-CTMR weights (1 channel, width 48, ~218 M parameters), finetuned
multi-channel checkpoints and the tiny checkpoints the tests generate all load without flags.
"""

from __future__ import annotations

import functools
import hashlib
import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .errors import CheckpointError, StorageError
from .io import read_bytes

#: state-dict key whose weight has shape [embed_dim, in_channels, 3, 3, 3].
ENCODER_STEM_KEY = "image_encoder.encoder.conv_init.weight"
#: key prefixes every VISTA3D state dict (MONAI >= 1.4 naming) has.
EXPECTED_PREFIXES = ("image_encoder.", "class_head.", "point_head.")
#: wrappers seen around the state dict in the wild: ignite / MONAI CheckpointSaver, plain torch.save.
_WRAPPER_KEYS = ("model", "state_dict", "network", "net")
#: Widest accepted embedding: the released model uses 48 (~218 M parameters, growing with the width squared),
#: the test models 8. 64 (~390 M parameters, ~1.5 GB) leaves room for variants; a wider stem is refused before
#: a network is built (width 4096 would ask for ~10^12 parameters).
MAX_EMBED_DIM = 64
#: Smallest width the point head accepts.
MIN_EMBED_DIM = 8
#: Most input channels (co-registered sequences of a finetuned multi-channel model).
MAX_IN_CHANNELS = 16
#: Most parameters a checkpoint may hold: the network at MAX_EMBED_DIM and MAX_IN_CHANNELS stays below it.
MAX_PARAMETERS = 400_000_000


@dataclass(frozen=True)
class Architecture:
    """The two free parameters of ``monai.networks.nets.vista3d132``."""

    in_channels: int = 1
    embed_dim: int = 48

    def build(self) -> torch.nn.Module:
        """Instantiate an untrained network (float32, CPU, eval mode)."""
        from monai.networks.nets import vista3d132

        return vista3d132(encoder_embed_dim=self.embed_dim, in_channels=self.in_channels).eval()


def architecture_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Architecture:
    """Read input channels and embedding width from the encoder stem's weight shape."""
    stem = state_dict.get(ENCODER_STEM_KEY)
    if stem is None or stem.ndim != 5:
        raise CheckpointError(
            f"checkpoint has no VISTA3D encoder stem '{ENCODER_STEM_KEY}'",
            hint="expected an NV-Segment-CTMR / VISTA3D state dict saved with MONAI >= 1.4 key names "
            "(older MONAI-1.3 research checkpoints use different names and cannot be loaded)",
        )
    embed_dim, in_channels = int(stem.shape[0]), int(stem.shape[1])
    if not MIN_EMBED_DIM <= embed_dim <= MAX_EMBED_DIM or not 1 <= in_channels <= MAX_IN_CHANNELS:
        raise CheckpointError(
            f"checkpoint's encoder stem '{ENCODER_STEM_KEY}' has shape {list(stem.shape)}: width {embed_dim} and "
            f"{in_channels} input channel(s), outside the supported {MIN_EMBED_DIM}..{MAX_EMBED_DIM} and "
            f"1..{MAX_IN_CHANNELS} (the released NV-Segment-CTMR model: width 48, 1 channel)",
            hint="use a NV-Segment-CTMR / VISTA3D checkpoint saved from monai.networks.nets.vista3d132",
            embed_dim=embed_dim, in_channels=in_channels,
        )
    return Architecture(in_channels=in_channels, embed_dim=embed_dim)


def unwrap_state_dict(obj: Any, *, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Normalise the containers found in the wild to a plain ``{name: tensor}`` dict.

    Accepts a plain state dict, ``{"model": sd}`` (MONAI/ignite ``CheckpointSaver``), ``{"state_dict": sd}``
    and DDP/``torch.compile`` prefixes (``module.``, ``_orig_mod.``).
    """
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source} does not contain a state dict (found {type(obj).__name__})")
    if ENCODER_STEM_KEY not in obj and not any(str(k).startswith("module.") for k in obj):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), Mapping):
                return unwrap_state_dict(obj[key], source=source)
    out: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        name = str(key)
        for prefix in ("module.", "_orig_mod."):
            while name.startswith(prefix):
                name = name[len(prefix) :]
        if isinstance(value, torch.Tensor):
            out[name] = value
    if not out:
        raise CheckpointError(f"{source} holds no tensors", hint="is this a VISTA3D model.pt?")
    return out


def load_state_dict_from_uri(uri: str, *, storage_options: dict | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """Read a checkpoint from a local path or fsspec URI, safely (``weights_only=True``).

    Returns:
        ``(state_dict, sha256)`` where ``sha256`` is the hex digest of the file's bytes.
    """
    try:
        raw = read_bytes(uri, storage_options)
    except StorageError as err:
        raise CheckpointError(f"cannot read checkpoint: {err.message}",
                              hint="download the weights once with `nvseg weights download --dest models/model.pt` "
                              "and pass --checkpoint models/model.pt") from None
    if not raw:
        raise CheckpointError(f"cannot read checkpoint {uri}: the file is empty",
                              hint="re-download it with `nvseg weights download --overwrite`")
    digest = hashlib.sha256(raw).hexdigest()
    try:
        obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, zip errors, unsafe globals
        raise CheckpointError(
            f"cannot read checkpoint {uri}: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}",
            hint="checkpoints are loaded with torch.load(weights_only=True); re-save a plain state dict "
            "with torch.save(model.state_dict(), path) if this file contains pickled objects",
        ) from None
    return unwrap_state_dict(obj, source=uri), digest


def build_network(state_dict: Mapping[str, torch.Tensor], *, source: str = "checkpoint") -> torch.nn.Module:
    """Build the network that matches ``state_dict`` and load it strictly.

    The stem width / channel count and the total parameter count are bounded before the network is built,
    so a checkpoint whose shapes imply a huge network is refused without allocating it.

    Raises:
        CheckpointError: naming the missing / unexpected / mis-shaped keys.
    """
    arch = architecture_from_state_dict(state_dict)
    n_parameters = sum(int(t.numel()) for t in state_dict.values())
    if n_parameters > MAX_PARAMETERS:
        raise CheckpointError(
            f"{source} holds {n_parameters:,} parameters, far more than a VISTA3D network "
            f"(~218 M for the released model; limit {MAX_PARAMETERS:,})",
            hint="use a NV-Segment-CTMR / VISTA3D checkpoint saved from monai.networks.nets.vista3d132",
            n_parameters=n_parameters,
        )
    net = arch.build()
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mis_shaped = sorted(
        k for k in set(expected) & set(state_dict) if tuple(expected[k].shape) != tuple(state_dict[k].shape)
    )
    if missing or unexpected or mis_shaped:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mis_shaped)):
            if keys:
                shown = ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
                parts.append(f"{len(keys)} {label} key(s): {shown}")
        raise CheckpointError(
            f"{source} does not match a VISTA3D network ({arch.in_channels} input channel(s), "
            f"width {arch.embed_dim}): " + "; ".join(parts),
            hint="use a NV-Segment-CTMR / VISTA3D checkpoint saved from monai.networks.nets.vista3d132",
            missing=missing[:50],
            unexpected=unexpected[:50],
        )
    net.load_state_dict(state_dict, strict=True)
    return net.eval()


@dataclass
class LoadedModel:
    """A network ready for inference plus the facts recorded in every output report."""

    network: torch.nn.Module
    architecture: Architecture
    uri: str
    sha256: str


def load_model(uri: str, *, storage_options: dict | None = None) -> LoadedModel:
    """Load a checkpoint (path or fsspec URI) into a network on CPU in eval mode."""
    state_dict, digest = load_state_dict_from_uri(uri, storage_options=storage_options)
    network = build_network(state_dict, source=uri)
    return LoadedModel(network, architecture_from_state_dict(state_dict), uri, digest)


#: sidecar written next to finetuned checkpoints (``nvseg_ray.training``): label mapping, subclass behaviour.
LABELS_SIDECAR_SUFFIX = ".labels.json"


def checkpoint_label_info(uri: str | None, storage_options: dict | None = None) -> dict:
    """The ``<checkpoint>.labels.json`` sidecar of a finetuned checkpoint, or ``{}`` when there is none.

    Read once per process and checkpoint (it is a few hundred bytes next to the weights).
    """
    if not uri:
        return {}
    import json

    return json.loads(_read_label_info(uri, json.dumps(storage_options or {}, sort_keys=True)))


@functools.lru_cache(maxsize=16)
def _read_label_info(uri: str, storage_options_json: str) -> str:
    import json

    try:
        raw = read_bytes(uri + LABELS_SIDECAR_SUFFIX, json.loads(storage_options_json))
        info = json.loads(raw)
    except (StorageError, ValueError):
        return "{}"
    return json.dumps(info if isinstance(info, dict) else {})
