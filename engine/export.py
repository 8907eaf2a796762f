"""Export a plain (extracted) network to TorchScript and ONNX, and check the round trip.

* TorchScript: ``torch.jit.script`` (the extracted sub-nets and baselines are plain
  modules, so scripting works and keeps no dependency on ``engine``: the saved archive
  loads with bare ``torch.jit.load``).
* ONNX: the legacy TorchScript-based exporter (``dynamo=False``; the dynamo exporter
  needs onnxscript, which is not a dependency). Batch size is a dynamic axis.

Files are written atomically (temp file + rename), so a reader never sees half a model.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from engine.atomic import atomic_write_bytes

ONNX_OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


class ExportError(ValueError):
    """The exported model could not be produced or does not reproduce the module's output."""


def script_module(module: nn.Module) -> torch.jit.ScriptModule:
    """``module`` in eval mode as TorchScript (already-scripted modules pass through)."""
    module = module.eval()
    if isinstance(module, torch.jit.ScriptModule):
        return module
    with warnings.catch_warnings():
        # torch >= 2.10 marks TorchScript deprecated; it is still the deployable format we ship.
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.script(module)


def save_torchscript(scripted: torch.jit.ScriptModule, path: str | os.PathLike) -> Path:
    """Write ``scripted`` to ``path`` atomically (a reader never sees half a model)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # as in script_module
        torch.jit.save(scripted, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def export_torchscript(module: nn.Module, path: str | os.PathLike, example_input: torch.Tensor) -> Path:
    """Script ``module`` (eval mode), check it on ``example_input`` and save it to ``path``."""
    module = module.eval()
    scripted = script_module(module)
    with torch.no_grad():
        expected = module(example_input)
        actual = scripted(example_input)
    _check_close("TorchScript", expected, actual)
    return save_torchscript(scripted, path)


def load_torchscript(path: str | os.PathLike) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(str(path), map_location="cpu")


def export_onnx(
    module: nn.Module, path: str | os.PathLike, example_input: torch.Tensor, opset: int = ONNX_OPSET
) -> Path:
    """Export ``module`` (eval mode) to ONNX at ``path`` with a dynamic batch axis and check it."""
    module = module.eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter warns that it is deprecated
        torch.onnx.export(
            module,
            (example_input,),
            buffer,
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
    data = buffer.getvalue()
    import onnx  # local: only export needs it

    onnx.checker.check_model(onnx.load_from_string(data))
    with torch.no_grad():
        expected = module(example_input)
    actual = torch.from_numpy(_run_onnx_bytes(data, example_input))
    _check_close("ONNX", expected, actual)
    return atomic_write_bytes(path, data)


def run_onnx(path: str | os.PathLike, x: torch.Tensor | np.ndarray) -> np.ndarray:
    """Run an exported ONNX model with onnxruntime (CPU) on ``x``."""
    return _run_onnx_bytes(Path(path).read_bytes(), x)


def _run_onnx_bytes(data: bytes, x: torch.Tensor | np.ndarray) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    array = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return session.run([OUTPUT_NAME], {INPUT_NAME: array.astype(np.float32)})[0]


def torchscript_roundtrip_error(module: nn.Module, path: str | os.PathLike, x: torch.Tensor) -> float:
    """Max abs difference between ``module(x)`` and the saved TorchScript model's output."""
    loaded = load_torchscript(path)
    with torch.no_grad():
        return float((module.eval()(x) - loaded(x)).abs().max())


def onnx_roundtrip_error(module: nn.Module, path: str | os.PathLike, x: torch.Tensor) -> float:
    """Max abs difference between ``module(x)`` and the ONNX model's output (onnxruntime)."""
    with torch.no_grad():
        expected = module.eval()(x).numpy()
    return float(np.abs(expected - run_onnx(path, x)).max())


def _check_close(kind: str, expected: torch.Tensor, actual: torch.Tensor) -> None:
    scale = float(expected.abs().max()) + 1.0
    error = float((expected - actual).abs().max())
    if not error <= 1e-4 * scale:
        raise ExportError(f"{kind} export does not reproduce the module: max abs error {error:.3g}")
