"""Synthetic few-shot tasks: for speed benchmarks and smoke runs that must not need a dataset.

Each of ``num_classes`` classes is a fixed random smooth image (its prototype, from the seed);
an example of a class is its prototype plus Gaussian noise. Tasks are therefore learnable,
which keeps smoke runs meaningful, but they say nothing about real-data accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from engine.meta.tasks import TaskBatch


@dataclass(frozen=True)
class SyntheticTasks:
    """A :data:`~engine.meta.tasks.TaskSource` of N-way K-shot Q-query tasks on synthetic images."""

    ways: int
    shots: int
    queries: int
    channels: int = 1
    image_size: int = 28
    num_classes: int = 200
    noise: float = 0.6
    seed: int = 0

    def __post_init__(self) -> None:
        if self.ways < 2 or self.shots < 1 or self.queries < 1:
            raise ValueError(
                f"need ways >= 2, shots >= 1, queries >= 1; got {self.ways}, {self.shots}, {self.queries}"
            )
        if self.num_classes < self.ways:
            raise ValueError(f"num_classes ({self.num_classes}) must be >= ways ({self.ways})")
        generator = torch.Generator().manual_seed(self.seed)
        coarse = torch.randn(self.num_classes, self.channels, 7, 7, generator=generator)
        prototypes = F.interpolate(
            coarse, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False
        )
        object.__setattr__(self, "_prototypes", prototypes)

    def __call__(self, rng: np.random.Generator, count: int) -> TaskBatch:
        prototypes: torch.Tensor = self._prototypes  # type: ignore[attr-defined]
        classes = np.stack(
            [rng.choice(self.num_classes, size=self.ways, replace=False) for _ in range(count)]
        )
        per_class = self.shots + self.queries
        noise = rng.standard_normal(
            (count, self.ways, per_class, self.channels, self.image_size, self.image_size)
        )
        images = (
            prototypes[torch.from_numpy(classes)].unsqueeze(2) + self.noise * torch.from_numpy(noise).float()
        )
        size = (self.channels, self.image_size, self.image_size)
        labels = torch.arange(self.ways)
        return TaskBatch(
            support_x=images[:, :, : self.shots].reshape(count, self.ways * self.shots, *size).contiguous(),
            support_y=labels.repeat_interleave(self.shots).expand(count, -1).contiguous(),
            query_x=images[:, :, self.shots :].reshape(count, self.ways * self.queries, *size).contiguous(),
            query_y=labels.repeat_interleave(self.queries).expand(count, -1).contiguous(),
        )
