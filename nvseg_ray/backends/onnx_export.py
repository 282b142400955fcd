"""The ONNX step of MONAI's ``trt_compile`` for VISTA3D's image encoder, runnable without TensorRT or a GPU.

Upstream's ``configs/inference_trt.json`` calls ``trt_compile(net, path, args={"dynamic_batchsize": [1, sw, sw]},
submodule=["image_encoder.encoder"])``. On the first forward call MONAI 1.6.1's ``TrtCompiler`` exports that
submodule to ONNX, then builds a TensorRT engine from the ONNX file. TensorRT cannot be installed here, but the
export can be checked: :func:`export_encoder_onnx` runs MONAI's own export code (``TrtCompiler._build_and_save``,
with only its last step, the TensorRT build, replaced by a copy of the ONNX file), and
:func:`check_with_onnxruntime` runs the file with onnxruntime on the CPU and compares every output with PyTorch.

onnx, onnxscript and onnxruntime import lazily (``pip install 'nvseg-ray[trt]'``, onnxruntime from the ``test``
extra); a missing one raises :class:`~nvseg_ray.errors.ConfigError` saying what to install.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError

#: The submodule upstream compiles (``submodule=["image_encoder.encoder"]``).
ENCODER_SUBMODULE = "image_encoder.encoder"

_INSTALL_HINT = "pip install 'nvseg-ray[trt]' (onnx, onnxscript; onnxruntime for the check: pip install onnxruntime)"


def _require(*names: str) -> None:
    """Import ``names`` or raise a :class:`ConfigError` naming the missing package and how to install it."""
    import importlib

    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(f"exporting the image encoder to ONNX needs the {name!r} package ({exc})",
                              hint=_INSTALL_HINT, package=name) from None


def _encoder(network: torch.nn.Module) -> torch.nn.Module:
    """``network.image_encoder.encoder`` (a MONAI ``SegResEncoder``: ``forward(x) -> list[Tensor]``)."""
    try:
        return network.image_encoder.encoder
    except AttributeError:
        raise ConfigError(f"{type(network).__name__} has no {ENCODER_SUBMODULE!r} submodule (not a VISTA3D network?)",
                          hint="pass a monai.networks.nets.VISTA3D (e.g. vista3d132())") from None


def _device_of(module: torch.nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


#: Above this many bytes of weights the ONNX file keeps them as external data (protobuf's limit is 2 GiB).
_INLINE_LIMIT = 1_800_000_000


def _save_onnx_as(source: str | Path, target: Path) -> None:
    """Copy the exported model at ``source`` (plus the external data the dynamo exporter wrote next to it, which
    the graph names by ``source``'s file name) to ``target``: weights inline when they fit in one protobuf, else in
    ``<target name>.data``. Same graph and weights, only the weights' location changes."""
    import onnx

    model = onnx.load(str(source))  # resolves external data relative to source's folder
    target.unlink(missing_ok=True)
    if model.ByteSize() < _INLINE_LIMIT:
        onnx.save_model(model, str(target))
    else:
        data = target.with_name(target.name + ".data")
        data.unlink(missing_ok=True)
        onnx.save_model(model, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name)


def export_encoder_onnx(network: torch.nn.Module, path: str | Path, *, patch_size: tuple[int, int, int],
                        window_batch: int = 1, in_channels: int = 1, dynamic_batch: bool = True,
                        opset: int | None = None) -> Path:
    """Export ``network.image_encoder.encoder`` to ONNX exactly as MONAI 1.6.1's ``trt_compile`` does before its
    TensorRT build, and return ``path``.

    The encoder's ``forward(x)`` takes one tensor ``[B, C_in, H, W, D]`` and returns a list of 5 feature maps, one
    per level: ``[B, w * 2**k, H / 2**k, W / 2**k, D / 2**k]`` for ``k = 0..4`` (``w`` the width, 48 upstream);
    the ONNX graph has one input ``x`` and the list flattened into 5 outputs, in the list's order (what
    ``TrtCompiler.forward`` hands back: ``ret = list(ret.values())``).

    What is reproduced (``monai/networks/trt_compiler.py`` and ``monai/networks/utils.py``, monai 1.6.1):

    * the code path itself: :class:`monai.networks.trt_compiler.TrtCompiler` is constructed as ``trt_compile``'s
      ``wrap`` does (``TrtCompiler(model, path + ".plan", logger=logger, **args)``, with ``trt_compile``'s
      defaults ``"method": "onnx", "precision": "fp16", "build_args": {...}`` plus ``dynamic_batchsize``) and its
      ``_build_and_save(model, build_args)`` runs; only ``_onnx_to_trt`` (the TensorRT build) is replaced.
    * input names from the signature: ``input_names = self.argspec.args[1:]`` -> ``["x"]``; the example is the
      dict ``{"x": tensor}`` (``args.update(self._inputs_to_dict(argv))``).
    * ``add_casts_around_norms(model)`` before the export (wraps every ``InstanceNorm3d`` in ``CastToFloat``; a
      no-op numerically in fp32). It modifies the module in place, so a deep copy of the encoder is exported and
      ``network`` is left untouched.
    * dynamic axes from ``dynamic_batchsize``: ``profile[id] = [[dbs[0], *sh], [dbs[1], *sh], [dbs[2], *sh]]``, then
      ``get_dynamic_axes`` keeps the axes where ``vals[0][i] != vals[2][i]``, and
      ``export_args.update({"dynamic_axes": self.dynamic_axes})``. ``dynamic_batch=True`` passes
      ``[1, window_batch, max(2, window_batch)]`` (axis 0 of ``x`` dynamic); ``dynamic_batch=False`` passes no
      ``dynamic_batchsize`` (static shapes). NB upstream's ``[1, sw_batch_size, sw_batch_size]`` with its
      ``sw_batch_size`` 1 has min == max, so upstream's own export is static: ``dynamic_batch=False``.
    * ``convert_to_onnx(model, input_example, filename=onnx_path, input_names=list(unrolled_input.keys()),
      output_names=self.output_names, **export_args)`` with ``output_names`` ``[]`` (-> ``None``), which calls
      ``torch.onnx.export(model, (inputs,), f=f, input_names=..., output_names=None, dynamic_axes=...,
      opset_version=opset_version, do_constant_folding=True)`` under ``model.eval()`` and ``torch.no_grad()``:
      no ``dynamo`` argument, so torch's default (``dynamo=True`` since torch 2.9: torch.export + onnxscript), and
      the dynamo exporter turns the trailing dict into ``kwargs`` and ``dynamic_axes`` into ``dynamic_shapes``.
      ``opset`` goes in as ``export_args={"opset_version": opset}`` (upstream passes none: torch's default).
    * polygraphy's ``fold_constants`` pass, which ``convert_to_onnx`` applies when polygraphy is importable.
    * the ``TemporaryDirectory`` export (the dynamo exporter writes the weights as external data,
      ``model.onnx.data``, next to ``model.onnx``): the model is loaded from there and saved as ``path``, weights
      inline below ~1.8 GB (the full-width encoder is ~0.7 GB), else in ``<path name>.data``.

    Args:
        network: a VISTA3D network (``vista3d132()``); the encoder is exported on the device of its parameters.
        path: the ``.onnx`` file to write (its folder must exist).
        patch_size: the sliding window (each a multiple of 16: the encoder downsamples 4 times).
        window_batch: windows per call (the example's batch, upstream's ``sw_batch_size``).
        in_channels: image channels (1 for CT/MRI).
        dynamic_batch: make the batch axis dynamic (see above).
        opset: ONNX opset, or None for torch's default (what upstream gets).

    Raises:
        ConfigError: onnx or onnxscript missing, or ``network`` has no ``image_encoder.encoder``.
    """
    _require("onnx", "onnxscript")
    from monai.networks.trt_compiler import TrtCompiler

    path = Path(path)
    if len(tuple(patch_size)) != 3 or any(int(n) % 16 for n in patch_size):
        raise ConfigError(f"patch_size {tuple(patch_size)}: VISTA3D's encoder needs three sizes, each a multiple "
                          f"of 16", hint="e.g. 32,32,32 or upstream's 192,192,128")
    encoder = copy.deepcopy(_encoder(network)).eval()  # add_casts_around_norms swaps modules in place
    device = _device_of(encoder)
    example = torch.randn(int(window_batch), int(in_channels), *(int(n) for n in patch_size), device=device)

    class _OnnxOnly(TrtCompiler):
        """MONAI's compiler with the TensorRT build replaced by keeping the ONNX file(s) it builds from."""

        def _onnx_to_trt(self, onnx_path: str) -> None:  # noqa: D401 - MONAI's hook
            _save_onnx_as(onnx_path, path)
            return None  # no engine bytes: _build_and_save writes no .plan file

    args: dict[str, Any] = {"method": "onnx", "precision": "fp16",  # trt_compile's default_args
                            "build_args": {"builder_optimization_level": 5, "precision_constraints": "obey"}}
    if dynamic_batch:
        args["dynamic_batchsize"] = [1, int(window_batch), max(2, int(window_batch))]
    if opset is not None:
        args["export_args"] = {"opset_version": int(opset)}
    with tempfile.TemporaryDirectory() as scratch:
        compiler = _OnnxOnly(encoder, str(Path(scratch) / "encoder.plan"), **args)
        build_args = dict(compiler.defaults)  # TrtCompiler.forward: args = self.defaults; args.update(...)
        build_args.update(compiler._inputs_to_dict((example,)))
        with torch.no_grad():
            compiler._build_and_save(encoder, build_args)
    if not path.is_file():
        raise ConfigError(f"the ONNX export wrote no {path.name!r}", hint="see the torch.onnx export log above")
    return path


def check_with_onnxruntime(path: str | Path, network: torch.nn.Module, example: torch.Tensor, *, atol: float,
                           rtol: float) -> dict[str, Any]:
    """Run the exported encoder with onnxruntime (CPU) on ``example`` and compare every output with PyTorch's
    ``network.image_encoder.encoder(example)`` (eval, no grad, float32).

    Returns:
        ``{"outputs": n, "max_abs_diff": float, "max_rel_diff": float, "shapes": [...], "ok": bool}``; ``ok`` when
        the output counts and shapes match and every element satisfies ``|ort - torch| <= atol + rtol * |torch|``.
    """
    _require("onnx", "onnxruntime")
    import numpy as np
    import onnxruntime as ort

    encoder = _encoder(network)
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad():
            expected = encoder(example.to(_device_of(encoder), torch.float32))
    finally:
        encoder.train(was_training)
    if isinstance(expected, torch.Tensor):
        expected = [expected]
    expected = [t.detach().float().cpu().numpy() for t in expected]

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ConfigError(f"{path}: expected one ONNX input (the encoder's x), found {[i.name for i in inputs]}")
    got = session.run(None, {inputs[0].name: example.detach().float().cpu().numpy()})

    ok = len(got) == len(expected)
    max_abs = max_rel = 0.0
    for out, ref in zip(got, expected):
        if out.shape != ref.shape:
            ok = False
            continue
        diff = np.abs(out.astype(np.float64) - ref.astype(np.float64))
        max_abs = max(max_abs, float(diff.max(initial=0.0)))
        max_rel = max(max_rel, float((diff / np.maximum(np.abs(ref), 1e-12)).max(initial=0.0)))
        ok = ok and bool(np.all(diff <= atol + rtol * np.abs(ref)))
    return {"outputs": len(got), "max_abs_diff": max_abs, "max_rel_diff": max_rel,
            "shapes": [list(o.shape) for o in got], "ok": ok}
