"""The adapted-model package: one chosen sub-net as deployable files plus its model card.

A package is a folder::

    model.ts          TorchScript (``torch.jit.load`` only: no ``engine`` import needed)
    model.onnx        ONNX, dynamic batch axis (optional)
    weights.pt        the extracted module's ``state_dict`` (plain nn.Conv2d/BatchNorm2d/Linear names)
    inner_loop.json   MAML++ inner-loop rates per parameter of the extracted module (on-device adaption)
    model_card.json   what it is, what it costs, how accurate it is, how to feed it

Weights are either the sub-net's **inherited meta-weights** (task-agnostic: meant to be adapted
on the device with ``inner_loop.json``), or **fine-tuned** on a user's support set: the MAML++
inner loop (the learner's learned per-layer, per-step rates; steps beyond the learned ones reuse
the last step's rate) run for more steps than at meta-training, on the super-net with the
sub-net's per-step BatchNorm rows, then extracted.

BatchNorm for batch-size-1 inference: the super-net's running statistics are shared by every
sub-net (a wider or narrower predecessor changes a layer's input statistics) and MAML++ itself
normalises with each task's batch statistics, so the stored running statistics do not describe
any particular sub-net. Before export the statistics are therefore **recomputed**
(:func:`recalibrate_batchnorm`, cumulative average, affine weights untouched): on the support
set as one batch for fine-tuned weights - so the exported eval-mode network reproduces, image
by image, exactly the train-mode network the inner loop produced on the support set - and on
the images of validation tasks (each task one batch, as during meta-training) for meta-weights.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from engine.atomic import atomic_write, atomic_write_json
from engine.cost import arch_macs, arch_params, count_params
from engine.export import export_onnx, export_torchscript
from engine.search.adapt import AdaptionInputError, LslrInnerLoop, batch_statistics
from engine.supernet import SuperNet, extract_subnet

PACKAGE_FORMAT = "nasweb-adapted-model/1"
TORCHSCRIPT_NAME = "model.ts"
ONNX_NAME = "model.onnx"
WEIGHTS_NAME = "weights.pt"
INNER_LOOP_NAME = "inner_loop.json"
MODEL_CARD_NAME = "model_card.json"
WEIGHT_KINDS = ("meta", "finetuned")


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the network's input tensor (recorded in the model card).

    ``x = (pixel / 255 - mean) / std`` per channel on the image converted to ``L`` (1 channel)
    or ``RGB`` and resized to ``image_size`` squared with PIL's LANCZOS filter (no crop);
    ``invert`` first replaces ``pixel`` by ``255 - pixel`` (Omniglot networks are trained on
    white strokes on black). Layout NCHW float32.
    """

    channels: int
    image_size: int
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    invert: bool = False

    def to_dict(self) -> dict[str, Any]:
        channels = self.channels
        return {
            "input_shape": [1, channels, self.image_size, self.image_size],
            "layout": "NCHW float32",
            "channels": channels,
            "color_mode": "L" if channels == 1 else "RGB",
            "input_size": [self.image_size, self.image_size],
            "resize": "PIL LANCZOS to input_size, no crop",
            "invert": self.invert,
            "scale": "x = ((255 - pixel if invert else pixel) / 255 - mean) / std",
            "mean": [float(v) for v in _per_channel(self.mean, channels)],
            "std": [float(v) for v in _per_channel(self.std, channels)],
        }

    def invert_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """Inputs normalised from ``pixel`` -> the same normalisation of ``255 - pixel``."""
        mean = torch.tensor(_per_channel(self.mean, x.shape[1]), dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(_per_channel(self.std, x.shape[1]), dtype=x.dtype).view(1, -1, 1, 1)
        unit = x * std + mean  # pixel / 255
        return ((1.0 - unit) - mean) / std


def _per_channel(values: Sequence[float], channels: int) -> list[float]:
    return list(values) * channels if len(values) == 1 else list(values)


# --------------------------------------------------------------------------- fine-tuning
def extended_inner_loop(learner: Any, steps: int) -> LslrInnerLoop:
    """The learner's MAML++ inner loop (LSLR rates, adapted names) for ``steps`` steps.

    Steps beyond the learned ones reuse the last learned rate (MAML++ learns rates only for the
    steps it was meta-trained with).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise AdaptionInputError(f"fine-tuning steps must be an int >= 1, got {steps!r}")
    rates = {}
    for name in learner.inner_names:
        learned = learner.inner_lr(name).detach().clone()
        if steps <= learned.numel():
            rates[name] = learned[:steps]
        else:
            tail = learned[-1:].expand(steps - learned.numel())
            rates[name] = torch.cat([learned, tail])
    return LslrInnerLoop(
        steps=steps,
        default_lr=float(learner.config.inner_lr),
        learning_rates=rates,
        adapted_names=tuple(learner.inner_names),
    )


def finetune_supernet(
    supernet: SuperNet, arch: Any, inner_loop: LslrInnerLoop, support_x: torch.Tensor, support_y: torch.Tensor
) -> SuperNet:
    """A copy of ``supernet`` whose weights are adapted to one support set for ``arch``.

    The inner loop is the one the GA's fitness runs (batch statistics, per-step BN rows, steps
    beyond the super-net's rows use its last row); ``supernet`` itself is not modified.
    """
    params = {name: p.detach() for name, p in supernet.named_parameters()}
    buffers = {name: b.detach() for name, b in supernet.named_buffers()}
    bn_steps = supernet.bn_steps

    def forward(weights: dict[str, torch.Tensor], x: torch.Tensor, step: int) -> torch.Tensor:
        return functional_call(
            supernet,
            (weights, buffers),
            (x,),
            {"arch": arch, "step": min(step, bn_steps - 1), "track_stats": False},
        )

    with batch_statistics(supernet):
        fast = inner_loop(forward, params, support_x, support_y)
    adapted = copy.deepcopy(supernet)
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            parameter.copy_(fast[name])
    return adapted


def query_bn_step(supernet: SuperNet, steps: int) -> int:
    """The BN row the query pass uses after ``steps`` inner steps (as in the GA's fitness)."""
    return min(steps, supernet.bn_steps) - 1


# --------------------------------------------------------------------------- batch norm
def recalibrate_batchnorm(module: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Replace every BatchNorm's running statistics by the average over ``batches``.

    Each batch is normalised with its own statistics (train mode) and the running mean and
    (unbiased) variance become the cumulative average of the batches' statistics
    (``momentum=None``). Affine weights are not touched. Returns the number of images; the
    module is left in eval mode.
    """
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    images = 0
    try:
        module.train()
        with torch.no_grad():
            for batch in batches:
                if batch.shape[0] < 2:
                    raise AdaptionInputError("BatchNorm recalibration needs batches of at least 2 images")
                module(batch)
                images += int(batch.shape[0])
    finally:
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum
        module.eval()
    if images == 0:
        raise AdaptionInputError("no images to recalibrate BatchNorm statistics with")
    return images


# --------------------------------------------------------------------------- names and rates
def extracted_parameter_names(space: Any, arch: Any) -> dict[str, str]:
    """Super-net parameter name -> name in :func:`engine.supernet.extract_subnet`'s module (used layers)."""
    names: dict[str, str] = {}
    if space.backbone == "resnet12":
        for block in range(arch.depth):
            for offset in range(3):
                index = 3 * block + offset
                prefix = f"block{block}.body.{offset}"
                names[f"layers.{index}.conv.weight"] = f"{prefix}.0.weight"
                names[f"layers.{index}.bn.weight"] = f"{prefix}.1.weight"
                names[f"layers.{index}.bn.bias"] = f"{prefix}.1.bias"
            names[f"shortcuts.{block}.conv.weight"] = f"block{block}.shortcut.0.weight"
            names[f"shortcuts.{block}.bn.weight"] = f"block{block}.shortcut.1.weight"
            names[f"shortcuts.{block}.bn.bias"] = f"block{block}.shortcut.1.bias"
    else:
        for index in range(arch.depth):
            names[f"layers.{index}.conv.weight"] = f"layer{index}.0.weight"
            names[f"layers.{index}.bn.weight"] = f"layer{index}.1.weight"
            names[f"layers.{index}.bn.bias"] = f"layer{index}.1.bias"
    names["head.weight"] = "head.2.weight"
    names["head.bias"] = "head.2.bias"
    return names


def inner_loop_description(inner_loop: LslrInnerLoop, space: Any, arch: Any) -> dict[str, Any]:
    """The inner loop for on-device adaption, in the extracted module's parameter names."""
    mapping = extracted_parameter_names(space, arch)
    adapted = inner_loop.adapted_names if inner_loop.adapted_names is not None else tuple(mapping)
    rates = {}
    for name in adapted:
        if name in mapping:
            rate = inner_loop.learning_rates.get(name, inner_loop.default_lr)
            values = rate.reshape(-1).tolist() if isinstance(rate, torch.Tensor) else [float(rate)]
            rates[mapping[name]] = [float(v) for v in values]
    return {
        "steps": inner_loop.steps,
        "rule": "w <- w - lr[name][step] * dLoss/dw on the support set (cross-entropy); BN in train mode",
        "learning_rates": rates,
        "not_adapted": sorted(set(mapping.values()) - set(rates)),
    }


# --------------------------------------------------------------------------- the package
def arch_code(arch: Any) -> str:
    """A short human-readable code of an architecture (used layers only), e.g. ``d2:3/1/relu,5/0.5/elu``."""
    layers = arch.layers[: arch.n_used_layers]
    return f"d{arch.depth}:" + ",".join(f"{c.kernel}/{c.width:g}/{c.activation}" for c in layers)


def budget_slug(constraint: Any) -> str:
    """Folder name of a budget's package, e.g. ``latency_ms-3ms`` or ``params-70K``."""
    text = f"{constraint.kind}-{constraint.limit:g}{constraint.unit or ''}"
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)


def _json_float(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


@dataclass(frozen=True)
class PackageInputs:
    """What a package is built from (everything already computed by the caller)."""

    space: Any
    arch: Any
    module: nn.Module  # extracted, BN recalibrated, eval mode
    preprocessing: Preprocessing
    weights: str  # "meta" | "finetuned"
    inner_loop: LslrInnerLoop
    card: Mapping[str, Any]  # extra model-card fields (budget, device, accuracy, ...)
    example: torch.Tensor  # a batch of real inputs, used to check the exports


def write_package(folder: str | Path, inputs: PackageInputs, *, onnx: bool = True) -> dict[str, Any]:
    """Write the files of one package into ``folder`` (which the caller renames into place).

    Returns the model card. The TorchScript and ONNX exports are checked against the module on
    ``inputs.example`` (engine.export raises :class:`engine.export.ExportError` otherwise).
    """
    if inputs.weights not in WEIGHT_KINDS:
        raise AdaptionInputError(f"weights must be one of {WEIGHT_KINDS}, got {inputs.weights!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    module = inputs.module.eval()
    export_torchscript(module, folder / TORCHSCRIPT_NAME, inputs.example)
    files = {"torchscript": TORCHSCRIPT_NAME, "weights": WEIGHTS_NAME, "inner_loop": INNER_LOOP_NAME}
    if onnx:
        export_onnx(module, folder / ONNX_NAME, inputs.example)
        files["onnx"] = ONNX_NAME
    state = {name: tensor.detach().cpu() for name, tensor in module.state_dict().items()}

    def save_weights(handle: Any) -> None:
        torch.save(state, handle)

    atomic_write(folder / WEIGHTS_NAME, save_weights)
    atomic_write_json(
        folder / INNER_LOOP_NAME, inner_loop_description(inputs.inner_loop, inputs.space, inputs.arch)
    )
    params = arch_params(inputs.space, inputs.arch)
    if count_params(module) != params:  # the cost model and the exported module must agree
        raise AdaptionInputError(
            f"extracted module has {count_params(module)} parameters, the cost model says {params}"
        )
    card = {
        "format": PACKAGE_FORMAT,
        "architecture": inputs.arch.to_dict(),
        "arch_code": arch_code(inputs.arch),
        "backbone": inputs.space.backbone,
        "search_space": inputs.space.to_dict(),
        "params": params,
        "macs": arch_macs(inputs.space, inputs.arch),
        "num_classes": inputs.space.num_classes,
        "preprocessing": inputs.preprocessing.to_dict(),
        "weights": inputs.weights,
        "files": files,
        **dict(inputs.card),
    }
    atomic_write_json(folder / MODEL_CARD_NAME, strict_json(card))
    return card


def strict_json(value: Any) -> Any:
    """NaN/inf -> None, tuples -> lists: the card must load with any strict JSON parser."""
    if isinstance(value, float):
        return _json_float(value)
    if isinstance(value, Mapping):
        return {str(k): strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    return value


def read_model_card(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / MODEL_CARD_NAME
    try:
        card = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise AdaptionInputError(f"{path}: not a readable model card ({error})") from None
    if card.get("format") != PACKAGE_FORMAT:
        raise AdaptionInputError(f"{path}: not a {PACKAGE_FORMAT} model card")
    return card


def extract_for_export(supernet: SuperNet, arch: Any, bn_step: int) -> nn.Module:
    """``extract_subnet`` on the super-net's device, as a CPU module (exports run on CPU)."""
    return extract_subnet(supernet, arch, step=bn_step).cpu().eval()
