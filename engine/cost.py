"""Exact parameter and MAC counts: from the architecture alone, and counted on a module.

Definitions (the same on both sides, so they can be compared exactly):

* params: trainable parameters (``nn.Parameter`` elements). BN running statistics are
  buffers and do not count. Sub-nets have no conv bias (BN follows), BN gamma/beta count.
* MACs: multiply-accumulates of convolutions and linear layers only, for one image:
  conv = out_h * out_w * out_c * (in_c / groups) * k_h * k_w; linear = in_features *
  out_features. Bias adds, BatchNorm, activations, pooling and the residual add are 0.

``arch_params``/``arch_macs`` sum ``LayerSpec.params()/macs()``; ``count_params``/
``count_macs`` look at a real module (forward hooks), so a test can check one against
the other for any extracted sub-net.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from engine.ops import ElasticConv2d, ElasticLinear
from engine.space import Arch, SearchSpace


def count_params(module: nn.Module) -> int:
    """Number of trainable parameter elements (shared tensors counted once)."""
    return sum(parameter.numel() for parameter in module.parameters())


def count_macs(
    module: nn.Module, input_shape: Sequence[int], forward_kwargs: dict[str, Any] | None = None
) -> int:
    """MACs of one forward pass of one image, counted with forward hooks.

    ``input_shape`` is ``(C, H, W)`` or ``(1, C, H, W)``. Counts ``nn.Conv2d``,
    ``nn.Linear`` and the elastic ``ElasticConv2d``/``ElasticLinear`` (so a ``SuperNet``
    can be counted too, with ``forward_kwargs={"arch": arch}``). The module runs in eval
    mode under ``no_grad`` (its running statistics are untouched) and its mode is restored.
    """
    shape = tuple(input_shape)
    if len(shape) == 3:
        shape = (1, *shape)
    if len(shape) != 4 or shape[0] != 1:
        raise ValueError(f"input_shape must be (C, H, W) or (1, C, H, W), got {tuple(input_shape)}")
    total = 0

    def conv_hook(layer: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(layer, ElasticConv2d):
            in_channels, kernel = inputs[0].shape[1], inputs[2]
            kernel_area, groups = kernel * kernel, 1
        else:
            in_channels, groups = layer.in_channels, layer.groups
            kernel_area = layer.kernel_size[0] * layer.kernel_size[1]
        total += output[0].numel() * (in_channels // groups) * kernel_area

    def linear_hook(layer: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        nonlocal total
        # ElasticLinear receives the unpooled map; what it classifies is the pooled one.
        if isinstance(layer, ElasticLinear):
            in_features = inputs[0].shape[-3] * layer.pool_size**2
        else:
            in_features = layer.in_features
        total += in_features * output[0].numel()

    handles = []
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d | ElasticConv2d):
            handles.append(layer.register_forward_hook(conv_hook))
        elif isinstance(layer, nn.Linear | ElasticLinear):
            handles.append(layer.register_forward_hook(linear_hook))
    was_training = module.training
    try:
        module.eval()
        with torch.no_grad():
            module(torch.zeros(shape), **(forward_kwargs or {}))
    finally:
        module.train(was_training)
        for handle in handles:
            handle.remove()
    return total


def arch_params(space: SearchSpace, arch: Arch) -> int:
    """Parameters of the sub-net ``arch`` from its LayerSpecs (no module is built)."""
    return sum(spec.params() for spec in space.layer_specs(arch))


def arch_macs(space: SearchSpace, arch: Arch) -> int:
    """MACs of the sub-net ``arch`` for one image, from its LayerSpecs (no forward pass)."""
    return sum(spec.macs() for spec in space.layer_specs(arch))
