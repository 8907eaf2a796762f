"""The few-shot task batch the meta-learner consumes, and the source protocol that yields them.

The meta-learning code only needs tensors; where they come from (Omniglot, Mini-ImageNet,
synthetic images) is the task source's business. A source is any callable
``source(rng, count) -> TaskBatch`` that draws ``count`` tasks using only ``rng`` for its
random decisions, so a run is reproducible (and resumable) from the generator's state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


class TaskBatchError(ValueError):
    """A task batch whose tensors do not fit together."""


@dataclass(frozen=True)
class TaskBatch:
    """``T`` few-shot tasks with the same shapes.

    ``support_x``: [T, n_support, C, H, W], ``support_y``: [T, n_support] (labels 0..ways-1),
    ``query_x``: [T, n_query, C, H, W], ``query_y``: [T, n_query].
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor

    def __post_init__(self) -> None:
        if self.support_x.dim() != 5 or self.query_x.dim() != 5:
            raise TaskBatchError(
                f"support_x and query_x must be [tasks, samples, C, H, W]; got {tuple(self.support_x.shape)} "
                f"and {tuple(self.query_x.shape)}"
            )
        tasks = self.support_x.shape[0]
        for name in ("support_y", "query_x", "query_y"):
            if getattr(self, name).shape[0] != tasks:
                raise TaskBatchError(
                    f"{name} has {getattr(self, name).shape[0]} tasks, support_x has {tasks}"
                )
        if self.support_y.shape != self.support_x.shape[:2]:
            raise TaskBatchError(
                f"support_y shape {tuple(self.support_y.shape)} != {tuple(self.support_x.shape[:2])}"
            )
        if self.query_y.shape != self.query_x.shape[:2]:
            raise TaskBatchError(
                f"query_y shape {tuple(self.query_y.shape)} != {tuple(self.query_x.shape[:2])}"
            )
        if self.support_x.shape[2:] != self.query_x.shape[2:]:
            raise TaskBatchError("support and query images differ in shape")

    @property
    def num_tasks(self) -> int:
        return int(self.support_x.shape[0])

    def task(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.support_x[index], self.support_y[index], self.query_x[index], self.query_y[index]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> TaskBatch:
        return TaskBatch(
            support_x=self.support_x.to(device=device, dtype=dtype),
            support_y=self.support_y.to(device),
            query_x=self.query_x.to(device=device, dtype=dtype),
            query_y=self.query_y.to(device),
        )

    @staticmethod
    def stack(tasks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]) -> TaskBatch:
        if not tasks:
            raise TaskBatchError("cannot stack an empty list of tasks")
        return TaskBatch(*(torch.stack([task[i] for task in tasks]) for i in range(4)))


def batch_on(batch: Any, device: torch.device) -> Any:
    """``batch`` with its four task tensors on ``device``: any batch type with
    ``support_x/support_y/query_x/query_y`` (this module's or ``engine.data.sampling``'s, a
    frozen dataclass); the same object when they are there already (the CPU case)."""
    names = ("support_x", "support_y", "query_x", "query_y")
    if all(getattr(batch, name).device == device for name in names):
        return batch
    return dataclasses.replace(batch, **{name: getattr(batch, name).to(device) for name in names})


#: ``source(rng, count) -> TaskBatch``; all randomness drawn from ``rng``.
TaskSource = Callable[[np.random.Generator, int], TaskBatch]
