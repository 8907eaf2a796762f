"""The fixed MAML / MAML++ 4-conv baseline ("VGG-based" in the H-Meta-NAS tables).

Four times ``Conv2d(3x3, padding 1, bias) -> BatchNorm -> ReLU -> MaxPool2d(2)``, then a
Linear classifier over the flattened features, as in HowToTrainYourMAMLPytorch
(``VGGReLUNormNetwork`` with max-pooling). BatchNorm is MAML++-style: per-step
statistics and affine parameters (``bn_steps`` rows), selected by ``forward(x, step)``,
the same convention as ``SuperNet``.

Parameter counts (``bn_steps=1``) reproduce the papers: 113,236 (113.2K) for Omniglot
20-way with 64 filters at 28x28x1, and 70,085 (70.09K) for Mini-ImageNet 5-way with 48
filters at 84x84x3. MACs: see ``docs/SEARCH_SPACE.md`` (``ceil_pooling_macs`` reproduces
the papers' 10.07M / 57.38M).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from engine.kernels import max_pool2d_2x2
from engine.ops import BN_EPS, BN_MOMENTUM, ElasticBatchNorm2d

N_CONV_LAYERS = 4


def _feature_size(image_size: int) -> int:
    size = image_size
    for _ in range(N_CONV_LAYERS):
        size //= 2  # MaxPool2d(2), floor mode
    return size


class MamlConvNet(nn.Module):
    """conv3x3 -> BN -> ReLU -> max-pool 2, four times, then Linear (MAML/MAML++ baseline)."""

    def __init__(
        self, in_channels: int, image_size: int, num_classes: int, filters: int = 64, bn_steps: int = 1
    ) -> None:
        super().__init__()
        for name, value in (
            ("in_channels", in_channels),
            ("image_size", image_size),
            ("num_classes", num_classes),
            ("filters", filters),
            ("bn_steps", bn_steps),
        ):
            if value < 1:
                raise ValueError(f"MamlConvNet {name} must be >= 1, got {value}")
        self.feature_size = _feature_size(image_size)
        if self.feature_size < 1:
            raise ValueError(f"image_size {image_size} is too small for 4 max-pools (needs >= 16)")
        self.in_channels = in_channels
        self.image_size = image_size
        self.num_classes = num_classes
        self.filters = filters
        self.bn_steps = bn_steps
        self.convs = nn.ModuleList(
            nn.Conv2d(in_channels if i == 0 else filters, filters, 3, padding=1, bias=True)
            for i in range(N_CONV_LAYERS)
        )
        self.bns = nn.ModuleList(ElasticBatchNorm2d(filters, bn_steps) for _ in range(N_CONV_LAYERS))
        self.head = nn.Linear(filters * self.feature_size**2, num_classes)

    def forward(self, x: torch.Tensor, step: int = 0, track_stats: bool = True) -> torch.Tensor:
        if not -self.bn_steps <= step < self.bn_steps:
            raise IndexError(f"BN step {step} out of range for bn_steps={self.bn_steps}")
        for conv, bn in zip(self.convs, self.bns, strict=True):
            x = max_pool2d_2x2(F.relu(bn(conv(x), step, track_stats)))
        return self.head(x.flatten(-3))

    def extract(self, step: int = -1) -> nn.Module:
        """A plain eval-mode copy (nn.Conv2d/BatchNorm2d/ReLU/MaxPool2d/Linear) using BN step ``step``."""
        if not -self.bn_steps <= step < self.bn_steps:
            raise IndexError(f"BN step {step} out of range for bn_steps={self.bn_steps}")
        modules: OrderedDict[str, nn.Module] = OrderedDict()
        with torch.no_grad():
            for index, (conv, bn) in enumerate(zip(self.convs, self.bns, strict=True)):
                plain_conv = nn.Conv2d(conv.in_channels, self.filters, 3, padding=1, bias=True)
                plain_conv.load_state_dict(conv.state_dict())
                plain_bn = nn.BatchNorm2d(self.filters, eps=BN_EPS, momentum=BN_MOMENTUM)
                plain_bn.weight.copy_(bn.weight[step])
                plain_bn.bias.copy_(bn.bias[step])
                plain_bn.running_mean.copy_(bn.running_mean[step])
                plain_bn.running_var.copy_(bn.running_var[step])
                modules[f"layer{index}"] = nn.Sequential(plain_conv, plain_bn, nn.ReLU(), nn.MaxPool2d(2))
            head = nn.Linear(self.head.in_features, self.num_classes)
            head.load_state_dict(self.head.state_dict())
        modules["flatten"] = nn.Flatten()
        modules["head"] = head
        return nn.Sequential(modules).eval()


def maml_omniglot(ways: int = 20, bn_steps: int = 1) -> MamlConvNet:
    """MAML/MAML++ Omniglot net: 64 filters, 28x28x1 (113,236 parameters at 20-way)."""
    return MamlConvNet(in_channels=1, image_size=28, num_classes=ways, filters=64, bn_steps=bn_steps)


def maml_miniimagenet(ways: int = 5, bn_steps: int = 1) -> MamlConvNet:
    """MAML/MAML++ Mini-ImageNet net: 48 filters, 84x84x3 (70,085 parameters at 5-way)."""
    return MamlConvNet(in_channels=3, image_size=84, num_classes=ways, filters=48, bn_steps=bn_steps)


def ceil_pooling_macs(in_channels: int, image_size: int, num_classes: int, filters: int) -> int:
    """Conv+linear MACs of the baseline if every halving rounded *up* (28->14->7->4->2).

    This is not the network we build (MaxPool2d floors: 28->14->7->3->1). It is how the
    papers' MAC figures come out: 10,078,208 (Omniglot 20-way) and 57,385,152
    (Mini-ImageNet 5-way), i.e. the quoted 10.07M and 57.38M truncated to two decimals,
    while their parameter counts (113.2K, 70.09K) need the floor sizes. Kept to document
    that gap, see docs/SEARCH_SPACE.md.
    """
    size, channels, total = image_size, in_channels, 0
    for _ in range(N_CONV_LAYERS):
        total += size * size * filters * channels * 9
        size, channels = -(-size // 2), filters
    return total + size * size * filters * num_classes
