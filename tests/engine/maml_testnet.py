"""A tiny functional conv net with MAML++ per-step BatchNorm, for the meta-learning tests.

It follows the engine convention ``forward(x, step=...)`` like the super-net and the MAML
baselines, so the learner is tested without depending on them. Its BatchNorm updates the
running statistics in a way that also works under ``torch.func.vmap``, as the engine's does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class StepBatchNorm(nn.Module):
    """BatchNorm with one row of weights, biases and running statistics per inner step."""

    def __init__(self, channels: int, bn_steps: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(bn_steps, channels))
        self.bias = nn.Parameter(torch.zeros(bn_steps, channels))
        self.register_buffer("running_mean", torch.zeros(bn_steps, channels))
        self.register_buffer("running_var", torch.ones(bn_steps, channels))

    def forward(self, x: torch.Tensor, step: int) -> torch.Tensor:
        if not self.training:
            return F.batch_norm(
                x, self.running_mean[step], self.running_var[step], self.weight[step], self.bias[step]
            )
        # The running statistics are updated explicitly, not by F.batch_norm: under torch.func.vmap
        # with per-task buffers (the learner's ``vmap`` strategy) F.batch_norm's in-place update of
        # a row view is lost (engine.ops.ElasticBatchNorm2d does the same).
        with torch.no_grad():
            var, mean = torch.var_mean(x.detach(), dim=(0, 2, 3), correction=1)
            self.running_mean[step].mul_(0.9).add_(mean, alpha=0.1)
            self.running_var[step].mul_(0.9).add_(var, alpha=0.1)
        return F.batch_norm(x, None, None, self.weight[step], self.bias[step], training=True)


class TinyStepNet(nn.Module):
    def __init__(
        self,
        in_channels: int = 1,
        filters: int = 8,
        ways: int = 5,
        bn_steps: int = 3,
        layers: int = 2,
        image_size: int = 8,
        unused_param: bool = False,
    ) -> None:
        super().__init__()
        self.bn_steps = bn_steps
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        channels = in_channels
        for _ in range(layers):
            self.convs.append(nn.Conv2d(channels, filters, 3, padding=1))
            self.norms.append(StepBatchNorm(filters, bn_steps))
            channels = filters
        size = image_size // (2**layers)
        self.head = nn.Linear(filters * size * size, ways)
        if unused_param:
            self.spare = nn.Parameter(torch.zeros(3))

    def forward(self, x: torch.Tensor, step: int = 0, scale: float = 1.0) -> torch.Tensor:
        for conv, norm in zip(self.convs, self.norms, strict=True):
            x = F.max_pool2d(F.relu(norm(conv(x), step)), 2)
        return self.head(x.flatten(1)) * scale
