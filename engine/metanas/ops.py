"""Candidate operations of the MetaNAS few-shot search space (Section 5.1).

Every operation maps ``C`` channels to ``C`` channels; ``stride=2`` halves the
spatial size (edges leaving the inputs of a reduction cell). All modules are
TorchScript-compatible because the exported task model reuses them unchanged.

BatchNorm always normalises with the statistics of the current batch
(``track_running_stats=False``): REPTILE and MetaNAS train and evaluate tasks in
training mode (transductively over the query batch), and an exported model keeps
exactly that behaviour instead of running statistics that were never estimated.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def batch_norm(channels: int, affine: bool) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, affine=affine, track_running_stats=False)


class PoolBN(nn.Module):
    """3x3 max or average pooling followed by BatchNorm."""

    def __init__(self, kind: str, channels: int, stride: int) -> None:
        super().__init__()
        if kind == "max":
            self.pool: nn.Module = nn.MaxPool2d(3, stride, 1)
        elif kind == "avg":
            self.pool = nn.AvgPool2d(3, stride, 1, count_include_pad=False)
        else:
            raise ValueError(f"pool kind must be 'max' or 'avg', got {kind!r}")
        self.bn = batch_norm(channels, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.pool(x))


class ReLUConvBN(nn.Module):
    """ReLU - Conv(kernel) - BN; the plain 3x3 convolution and the 1x1 cell pre-processing."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, padding: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=False)
        self.bn = batch_norm(c_out, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(F.relu(x)))


class FactorizedConv(nn.Module):
    """ReLU - Conv(1x5, stride) - Conv(5x1) - BN ("Conv1x5-5x1")."""

    def __init__(self, channels: int, length: int, stride: int) -> None:
        super().__init__()
        pad = length // 2
        self.conv_row = nn.Conv2d(channels, channels, (1, length), stride, (0, pad), bias=False)
        self.conv_col = nn.Conv2d(channels, channels, (length, 1), 1, (pad, 0), bias=False)
        self.bn = batch_norm(channels, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv_col(self.conv_row(F.relu(x))))


class DilatedSeparableConv(nn.Module):
    """ReLU - depthwise 3x3 (dilated) - pointwise 1x1 - BN."""

    def __init__(self, channels: int, kernel: int, stride: int, dilation: int) -> None:
        super().__init__()
        pad = dilation * (kernel - 1) // 2
        self.depthwise = nn.Conv2d(
            channels, channels, kernel, stride, pad, dilation=dilation, groups=channels, bias=False
        )
        self.pointwise = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn = batch_norm(channels, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.pointwise(self.depthwise(F.relu(x))))


class SeparableConv(nn.Module):
    """DARTS SepConv: two stacked depthwise-separable 3x3 convolutions, the first strided."""

    def __init__(self, channels: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.first = DilatedSeparableConv(channels, kernel, stride, dilation=1)
        self.second = DilatedSeparableConv(channels, kernel, 1, dilation=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


class FactorizedReduce(nn.Module):
    """Halve the spatial size with two offset strided 1x1 convolutions (DARTS)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        if c_out % 2:
            raise ValueError(f"FactorizedReduce needs an even number of output channels, got {c_out}")
        self.conv_even = nn.Conv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.conv_odd = nn.Conv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.bn = batch_norm(c_out, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(x)
        if x.size(2) % 2 == 0 and x.size(3) % 2 == 0:
            shifted = x[:, :, 1:, 1:]
        else:
            # Odd sizes: a shifted view would give one row/column fewer than the unshifted one.
            shifted = x
        return self.bn(torch.cat([self.conv_even(x), self.conv_odd(shifted)], dim=1))


class Identity(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def make_operation(name: str, channels: int, stride: int) -> nn.Module:
    """Build candidate operation ``name`` (one of ``config.OPERATIONS``)."""
    if stride not in (1, 2):
        raise ValueError(f"stride must be 1 or 2, got {stride}")
    if name == "max_pool_3x3":
        return PoolBN("max", channels, stride)
    if name == "avg_pool_3x3":
        return PoolBN("avg", channels, stride)
    if name == "skip_connect":
        return Identity() if stride == 1 else FactorizedReduce(channels, channels)
    if name == "conv_1x5_5x1":
        return FactorizedConv(channels, 5, stride)
    if name == "conv_3x3":
        return ReLUConvBN(channels, channels, 3, stride, 1)
    if name == "sep_conv_3x3":
        return SeparableConv(channels, 3, stride)
    if name == "dil_conv_3x3":
        return DilatedSeparableConv(channels, 3, stride, dilation=2)
    raise ValueError(f"unknown MetaNAS operation {name!r}")


class Stem(nn.Module):
    """Conv3x3 - BN from the image to ``stem_multiplier * channels`` feature maps."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False)
        self.bn = batch_norm(c_out, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def make_preprocess(c_in: int, c_out: int, reduce: bool) -> nn.Module:
    """Cell input pre-processing: factorized reduction when the input is at twice the resolution."""
    return FactorizedReduce(c_in, c_out) if reduce else ReLUConvBN(c_in, c_out, 1, 1, 0)
