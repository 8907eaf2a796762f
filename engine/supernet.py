"""The weight-sharing super-net of a search space and sub-net extraction.

``SuperNet.forward(x, arch, step)`` runs the sub-net ``arch`` on the shared weights; it
is a pure function of (parameters, buffers, x, arch, step), so the meta-learner can call
it through ``torch.func.functional_call`` and differentiate with ``torch.func.grad``
(pass ``track_stats=False`` under ``vmap``). ``extract_subnet`` turns one arch into a
standalone plain module (``nn.Conv2d``/``nn.BatchNorm2d``/``nn.Linear``...) with copied
weights: the thing that is exported, profiled and re-trained.

Parameter names (stable, used e.g. for per-layer learning rates):
``layers.<i>.conv.weight``, ``layers.<i>.bn.{weight,bias}``, ``shortcuts.<b>.conv.weight``,
``shortcuts.<b>.bn.{weight,bias}`` (resnet12 only), ``head.{weight,bias}``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from engine.ops import (
    ACTIVATION_FUNCTIONS,
    BN_EPS,
    BN_MOMENTUM,
    ElasticBatchNorm2d,
    ElasticConv2d,
    ElasticLinear,
    FixedAvgPool2d,
    crop_conv_weight,
    make_activation,
)
from engine.space import Arch, LayerSpec, SearchSpace

# Plans are tiny; the cap only bounds memory over a long search.
_PLAN_CACHE_SIZE = 100_000


@dataclass(frozen=True)
class _ConvStep:
    layer: int
    out_channels: int
    kernel: int
    stride: int
    activation: Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class _Block:
    convs: tuple[_ConvStep, ...]
    shortcut: int  # block index of the residual shortcut, -1 for none (vgg9)
    shortcut_stride: int


class ConvBN(nn.Module):
    """Elastic conv followed by its per-step BatchNorm (the activation is chosen per call)."""

    def __init__(self, max_in_channels: int, max_out_channels: int, max_kernel: int, bn_steps: int) -> None:
        super().__init__()
        self.conv = ElasticConv2d(max_in_channels, max_out_channels, max_kernel)
        self.bn = ElasticBatchNorm2d(max_out_channels, bn_steps)

    def forward(
        self, x: torch.Tensor, out_channels: int, kernel: int, stride: int, step: int, track_stats: bool
    ) -> torch.Tensor:
        return self.bn(self.conv(x, out_channels, kernel, stride), step, track_stats)


class SuperNet(nn.Module):
    """All sub-nets of ``space`` in one module: one weight tensor per layer at the largest size."""

    def __init__(self, space: SearchSpace, bn_steps: int = 1) -> None:
        super().__init__()
        if bn_steps < 1:
            raise ValueError(f"bn_steps must be >= 1, got {bn_steps}")
        self.space = space
        self.bn_steps = bn_steps
        max_kernel = max(space.kernels)
        layers = []
        for index in range(space.n_layers):
            max_in = space.in_channels if index == 0 else space.max_channels(index - 1)
            layers.append(ConvBN(max_in, space.max_channels(index), max_kernel, bn_steps))
        self.layers = nn.ModuleList(layers)
        self.residual = space.backbone == "resnet12"
        if self.residual:
            shortcuts = []
            for block in range(space.max_depth):
                first, last = 3 * block, 3 * block + 2
                max_in = space.in_channels if first == 0 else space.max_channels(first - 1)
                shortcuts.append(ConvBN(max_in, space.max_channels(last), 1, bn_steps))
            self.shortcuts = nn.ModuleList(shortcuts)
        self.head = ElasticLinear(space.head_max_channels(), space.pool_size, space.num_classes)
        self._plans: OrderedDict[Arch, tuple[_Block, ...]] = OrderedDict()

    def plan(self, arch: Arch) -> tuple[_Block, ...]:
        """The validated execution plan of ``arch`` (memoised: forward is the hot path)."""
        cached = self._plans.get(arch)
        if cached is not None:
            return cached
        space = self.space
        space.validate(arch)
        per_block = space.layers_per_depth
        blocks = []
        for block in range(arch.depth):
            convs = []
            for index in range(block * per_block, (block + 1) * per_block):
                choice = arch.layers[index]
                convs.append(
                    _ConvStep(
                        layer=index,
                        out_channels=space.channels(arch, index),
                        kernel=choice.kernel,
                        stride=space.strides[index],
                        activation=ACTIVATION_FUNCTIONS[choice.activation],
                    )
                )
            stride = 1
            for conv in convs:
                stride *= conv.stride
            blocks.append(_Block(tuple(convs), block if self.residual else -1, stride))
        plan = tuple(blocks)
        self._plans[arch] = plan
        if len(self._plans) > _PLAN_CACHE_SIZE:
            self._plans.popitem(last=False)
        return plan

    def sliced_parameters(
        self, arch: Arch, params: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """The parameters sub-net ``arch`` uses, each cut to exactly the part it reads.

        Passed to ``functional_call(self, ...)`` in place of the full tensors, they give the same
        logits (every elastic op's slice of an already-cut tensor is the whole tensor) and their
        gradients are the used part of the full gradients. An inner loop on them does the same
        arithmetic as on the full tensors without allocating, and updating, the unused parts.
        ``params`` defaults to this module's own; the BN rows of every inner step are kept.
        """
        params = dict(self.named_parameters()) if params is None else params
        sliced: dict[str, torch.Tensor] = {}

        def conv_bn(prefix: str, in_channels: int, out_channels: int, kernel: int) -> None:
            weight = params[f"{prefix}.conv.weight"]
            sliced[f"{prefix}.conv.weight"] = crop_conv_weight(weight, in_channels, out_channels, kernel)
            for name in ("weight", "bias"):
                sliced[f"{prefix}.bn.{name}"] = params[f"{prefix}.bn.{name}"][:, :out_channels]

        channels = self.space.in_channels
        for block in self.plan(arch):
            block_in = channels
            for conv in block.convs:
                conv_bn(f"layers.{conv.layer}", channels, conv.out_channels, conv.kernel)
                channels = conv.out_channels
            if block.shortcut >= 0:
                conv_bn(f"shortcuts.{block.shortcut}", block_in, channels, 1)
        sliced["head.weight"] = params["head.weight"][:, :channels]
        sliced["head.bias"] = params["head.bias"]
        return sliced

    def forward(self, x: torch.Tensor, arch: Arch, step: int = 0, track_stats: bool = True) -> torch.Tensor:
        """Logits of sub-net ``arch`` using BN step ``step`` (``track_stats=False``: no running-stat update)."""
        if not -self.bn_steps <= step < self.bn_steps:
            raise IndexError(f"BN step {step} out of range for bn_steps={self.bn_steps}")
        layers = self.layers
        for block in self.plan(arch):
            identity = x
            last = len(block.convs) - 1
            for position, conv in enumerate(block.convs):
                x = layers[conv.layer](x, conv.out_channels, conv.kernel, conv.stride, step, track_stats)
                if block.shortcut < 0 or position < last:
                    x = conv.activation(x)
            if block.shortcut >= 0:
                shortcut = self.shortcuts[block.shortcut](
                    identity, block.convs[last].out_channels, 1, block.shortcut_stride, step, track_stats
                )
                x = block.convs[last].activation(x + shortcut)
        return self.head(x)  # pools to pool_size x pool_size, then classifies


class ResidualBlock(nn.Module):
    """Plain residual block of an extracted resnet12 sub-net: ``act(body(x) + shortcut(x))``."""

    def __init__(self, body: nn.Sequential, shortcut: nn.Sequential, activation: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.shortcut = shortcut
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.body(x) + self.shortcut(x))


def _copy(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().clone(memory_format=torch.contiguous_format)


def _plain_conv_bn(spec: LayerSpec, source: ConvBN, step: int, with_activation: bool) -> nn.Sequential:
    """Conv2d + BatchNorm2d (+ activation) holding copies of ``source``'s weights for ``spec``.

    Modules are created on the meta device (no init of weights about to be overwritten)
    and then given real tensors: extraction sits on the search's hot path.
    """
    channels = spec.out_channels
    conv = nn.Conv2d(
        spec.in_channels,
        channels,
        spec.kernel,
        stride=spec.stride,
        padding=spec.kernel // 2,
        bias=False,
        device="meta",
    )
    conv.weight = nn.Parameter(_copy(source.conv.sub_weight(spec.in_channels, channels, spec.kernel)))
    bn = nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM, device="meta")
    bn.weight = nn.Parameter(_copy(source.bn.weight[step, :channels]))
    bn.bias = nn.Parameter(_copy(source.bn.bias[step, :channels]))
    bn.running_mean = _copy(source.bn.running_mean[step, :channels])
    bn.running_var = _copy(source.bn.running_var[step, :channels])
    bn.num_batches_tracked = torch.zeros((), dtype=torch.long)
    parts: list[nn.Module] = [conv, bn]
    if with_activation:
        parts.append(make_activation(spec.activation))
    return nn.Sequential(*parts)


def _plain_head(spec: LayerSpec, head: ElasticLinear) -> nn.Sequential:
    linear = nn.Linear(spec.in_channels * spec.pool_size**2, spec.num_classes, device="meta")
    linear.weight = nn.Parameter(_copy(head.sub_weight(spec.in_channels)))
    linear.bias = nn.Parameter(_copy(head.bias))
    return nn.Sequential(FixedAvgPool2d(spec.in_size, spec.pool_size), nn.Flatten(), linear)


def extract_subnet(supernet: SuperNet, arch: Arch, step: int = -1) -> nn.Module:
    """A standalone eval-mode module for ``arch`` with weights copied from ``supernet``.

    BN parameters and running statistics come from BN step ``step`` (default: the last
    inner-loop step, the one used at test time after adaption). In eval mode its output
    equals ``supernet.eval()(x, arch, step)``.
    """
    if not -supernet.bn_steps <= step < supernet.bn_steps:
        raise IndexError(f"BN step {step} out of range for bn_steps={supernet.bn_steps}")
    space = supernet.space
    specs = space.layer_specs(arch)  # validates
    modules: OrderedDict[str, nn.Module] = OrderedDict()
    if supernet.residual:
        position = 0
        for block in range(arch.depth):
            body = []
            for offset in range(3):
                index = 3 * block + offset
                body.append(
                    _plain_conv_bn(specs[position], supernet.layers[index], step, with_activation=offset < 2)
                )
                position += 1
            shortcut = _plain_conv_bn(specs[position], supernet.shortcuts[block], step, with_activation=False)
            position += 1
            activation = make_activation(arch.layers[3 * block + 2].activation)
            modules[f"block{block}"] = ResidualBlock(nn.Sequential(*body), shortcut, activation)
    else:
        for index in range(arch.depth):
            modules[f"layer{index}"] = _plain_conv_bn(
                specs[index], supernet.layers[index], step, with_activation=True
            )
    modules["head"] = _plain_head(specs[-1], supernet.head)
    # Weights are already on the super-net's device; this moves the pooling matrices and counters.
    return nn.Sequential(modules).to(supernet.head.weight.device).eval()
