"""Task batches as MetaNAS consumes them, and a synthetic task source for tests and smoke runs.

A task source is any callable ``source(meta_batch_size, rngs) -> batch`` where ``batch``
has ``support_x``, ``support_y``, ``query_x`` and ``query_y`` (attributes, or a 4-tuple
in that order) of shapes ``[tasks, N*K, C, H, W]`` and ``[tasks, N*K]``. The ``rngs``
passed in are derived from the run seed and the meta-epoch, so a source that draws all
its randomness from them makes a run exactly resumable. A sampler with its own
generator can be wrapped as ``lambda n, rngs: sampler.sample(n)`` (then resuming replays
other tasks); ``sampler_task_source`` adapts an ``engine.data.TaskSampler`` exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from engine.seeding import Rngs


class TaskBatchError(ValueError):
    """A task batch has the wrong shape, dtype or labels; the message names the tensor."""


@dataclass(frozen=True)
class TaskBatch:
    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor

    def __len__(self) -> int:
        return int(self.support_x.shape[0])


TaskSource = Callable[[int, Rngs], Any]


def sampler_task_source(sampler: Any) -> TaskSource:
    """A task source drawing from an ``engine.data.TaskSampler`` with the run's per-epoch generators.

    Uses ``sampler.plan(n, generator)`` and ``sampler.render(plan)``, never the sampler's own
    generator, so a resumed meta-training run sees exactly the tasks of an uninterrupted one.
    """
    if not (callable(getattr(sampler, "plan", None)) and callable(getattr(sampler, "render", None))):
        raise TypeError(f"{type(sampler).__name__} has no plan()/render(); wrap it as lambda n, rngs: ...")

    def source(meta_batch_size: int, rngs: Rngs) -> Any:
        return sampler.render(sampler.plan(meta_batch_size, rngs.numpy))

    return source


def as_task_batch(batch: Any, *, n_way: int, in_channels: int) -> TaskBatch:
    """Accept a TaskBatch-like object or 4-tuple and check it against the model's task shape."""
    if isinstance(batch, tuple | list):
        if len(batch) != 4:
            raise TaskBatchError(
                f"a task batch tuple needs 4 tensors (support_x, support_y, query_x, query_y), got {len(batch)}"
            )
        support_x, support_y, query_x, query_y = batch
    else:
        try:
            support_x, support_y = batch.support_x, batch.support_y
            query_x, query_y = batch.query_x, batch.query_y
        except AttributeError as error:
            raise TaskBatchError(f"task batch {type(batch).__name__} lacks {error.name}") from error
    for name, x in (("support_x", support_x), ("query_x", query_x)):
        check_images(name, x, in_channels, batched=True)
    for name, y, x in (("support_y", support_y, support_x), ("query_y", query_y, query_x)):
        check_labels(name, y, n_way, expected_shape=tuple(x.shape[:2]))
    if support_x.shape[0] != query_x.shape[0]:
        raise TaskBatchError(f"support_x has {support_x.shape[0]} tasks but query_x has {query_x.shape[0]}")
    return TaskBatch(support_x.float(), support_y.long(), query_x.float(), query_y.long())


def check_images(name: str, x: Any, in_channels: int, *, batched: bool) -> None:
    dims = 5 if batched else 4
    if not isinstance(x, torch.Tensor) or x.dim() != dims:
        layout = "[tasks, N*K, C, H, W]" if batched else "[N*K, C, H, W]"
        raise TaskBatchError(f"{name} must be a {dims}-d tensor {layout}, got {getattr(x, 'shape', type(x))}")
    if x.shape[-3] != in_channels:
        raise TaskBatchError(f"{name} has {x.shape[-3]} channels, the model expects {in_channels}")
    if not torch.is_floating_point(x):
        raise TaskBatchError(f"{name} must be floating point, got {x.dtype}")


def check_labels(name: str, y: Any, n_way: int, *, expected_shape: tuple[int, ...]) -> None:
    if not isinstance(y, torch.Tensor) or tuple(y.shape) != expected_shape:
        raise TaskBatchError(
            f"{name} must have shape {list(expected_shape)}, got {getattr(y, 'shape', type(y))}"
        )
    if y.is_floating_point() or y.dtype == torch.bool:
        raise TaskBatchError(f"{name} must hold integer class indices, got {y.dtype}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= n_way):
        raise TaskBatchError(
            f"{name} holds labels outside [0, {n_way}): min {int(y.min())}, max {int(y.max())}"
        )


@dataclass(frozen=True)
class SyntheticTaskSource:
    """N-way tasks whose classes are random blurred prototype images plus Gaussian noise.

    Every task draws fresh prototypes, so a model can only do well by adapting quickly:
    a miniature of the few-shot setting, cheap enough for tests.
    """

    n_way: int
    shots: int
    query_shots: int
    in_channels: int = 1
    image_size: int = 12
    noise: float = 0.6

    def __call__(self, meta_batch_size: int, rngs: Rngs) -> TaskBatch:
        if meta_batch_size < 1:
            raise TaskBatchError(f"meta_batch_size must be positive, got {meta_batch_size}")
        generator = rngs.torch
        tasks = [self.sample_task(generator) for _ in range(meta_batch_size)]
        return TaskBatch(*(torch.stack([task[i] for task in tasks]) for i in range(4)))

    def sample_task(self, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        size = self.image_size
        coarse = torch.randn(
            self.n_way, self.in_channels, max(2, size // 3), max(2, size // 3), generator=generator
        )
        prototypes = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)

        def draw(per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
            labels = torch.arange(self.n_way).repeat_interleave(per_class)
            noise = torch.randn(len(labels), self.in_channels, size, size, generator=generator) * self.noise
            return prototypes[labels] + noise, labels

        support_x, support_y = draw(self.shots)
        query_x, query_y = draw(self.query_shots)
        return support_x, support_y, query_x, query_y
