"""Episodic N-way K-shot Q-query task sampling, vectorised over a batch of tasks.

Sampling is split in two steps so that fixed evaluation sets stay small:

1. ``TaskSampler.plan`` draws, with a numpy ``Generator``, which classes (in which
   order, so labels are permuted per task), which images and which rotations
   every task uses; the result is a ``TaskPlan`` of integer arrays.
2. ``TaskSampler.render`` turns a plan into tensors: one numpy fancy-index into the
   uint8 image array, optional vectorised ``rot90``, then one uint8 -> float32
   conversion with normalisation. No Python loop runs per image or per task.

Within a task, class ``j`` of the plan gets label ``j``; the support set is
ordered class by class (``[c0 shot0, c0 shot1, ..., c1 shot0, ...]``), and so is
the query set.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from engine.data.dataset import FewShotDataset, Normalization
from engine.data.errors import DatasetError, NotEnoughClassesError, NotEnoughImagesError
from engine.seeding import Rngs, make_rngs


@dataclass(frozen=True)
class TaskBatch:
    """A batch of tasks as tensors.

    ``support_x``: float32 ``[tasks, ways*shots, C, H, W]``; ``support_y``: int64
    ``[tasks, ways*shots]`` in ``0..ways-1``; ``query_x``/``query_y`` likewise with
    ``ways*queries``. ``class_ids`` ``[tasks, ways]``: the dataset class behind each
    label; ``support_image_ids``/``query_image_ids``: the dataset image indices used;
    ``rotations``: quarter turns applied per (task, label).
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    class_ids: np.ndarray
    support_image_ids: np.ndarray
    query_image_ids: np.ndarray
    rotations: np.ndarray

    @property
    def num_tasks(self) -> int:
        return int(self.support_x.shape[0])

    def task(self, index: int) -> TaskBatch:
        """Task ``index`` alone, as a batch of one."""
        part = slice(index, index + 1)
        return TaskBatch(
            support_x=self.support_x[part],
            support_y=self.support_y[part],
            query_x=self.query_x[part],
            query_y=self.query_y[part],
            class_ids=self.class_ids[part],
            support_image_ids=self.support_image_ids[part],
            query_image_ids=self.query_image_ids[part],
            rotations=self.rotations[part],
        )


@dataclass(frozen=True)
class TaskPlan:
    """Which images make up each task: ``image_ids`` ``[tasks, ways, shots+queries]``
    (the first ``shots`` of each row are support), ``class_ids`` ``[tasks, ways]``,
    ``rotations`` ``[tasks, ways]`` quarter turns (all 0 without augmentation)."""

    class_ids: np.ndarray
    image_ids: np.ndarray
    rotations: np.ndarray

    def __len__(self) -> int:
        return int(self.class_ids.shape[0])

    def slice(self, start: int, stop: int) -> TaskPlan:
        return TaskPlan(self.class_ids[start:stop], self.image_ids[start:stop], self.rotations[start:stop])


def _smallest_keys(keys: np.ndarray, count: int) -> np.ndarray:
    """Indices of the ``count`` smallest keys along the last axis, in increasing key order."""
    if count < keys.shape[-1]:
        chosen = np.argpartition(keys, count - 1, axis=-1)[..., :count]
    else:
        chosen = np.broadcast_to(np.arange(keys.shape[-1]), keys.shape).copy()
    order = np.argsort(np.take_along_axis(keys, chosen, axis=-1), axis=-1)
    return np.take_along_axis(chosen, order, axis=-1)


class TaskSampler:
    """Draws N-way K-shot Q-query tasks from a ``FewShotDataset``.

    ``rngs`` is an ``engine.seeding.Rngs`` (pass ``rngs.child(stream)`` when the
    caller's generators serve other purposes too) or an int seed. Only its numpy
    generator is used, so the same seed gives the same tasks on every machine.

    ``augment_rotations`` rotates every class of a task by a random multiple of
    90 degrees (the same turn for its support and query images), the Omniglot
    augmentation of H-Meta-NAS Appendix F / MAML++.
    """

    def __init__(
        self,
        dataset: FewShotDataset,
        ways: int,
        shots: int,
        queries: int,
        rngs: Rngs | int = 0,
        *,
        augment_rotations: bool = False,
        normalization: Normalization | None = None,
    ) -> None:
        for label, value, minimum in (("ways", ways, 1), ("shots", shots, 1), ("queries", queries, 0)):
            if not isinstance(value, int | np.integer) or value < minimum:
                raise ValueError(f"{label} must be an integer >= {minimum}, got {value!r}")
        if dataset.num_classes < ways:
            raise NotEnoughClassesError(
                f"{dataset.name}: {ways}-way tasks need {ways} classes, the dataset has {dataset.num_classes}"
            )
        per_class = shots + queries
        too_small = np.flatnonzero(dataset.class_counts < per_class)
        if too_small.size:
            named = ", ".join(
                f"{dataset.class_names[i]!r} ({dataset.class_counts[i]})" for i in too_small[:5]
            )
            more = f" and {too_small.size - 5} more" if too_small.size > 5 else ""
            raise NotEnoughImagesError(
                f"{dataset.name}: {shots} shots + {queries} queries need {per_class} images per class; "
                f"too few in {named}{more}"
            )
        height, width, channels = dataset.image_shape
        if augment_rotations and height != width:
            raise DatasetError(
                f"{dataset.name}: rotation augmentation needs square images, got {height}x{width}"
            )
        self.dataset = dataset
        self.ways, self.shots, self.queries = int(ways), int(shots), int(queries)
        self.augment_rotations = augment_rotations
        self.normalization = normalization or dataset.normalization
        self.rngs = rngs if isinstance(rngs, Rngs) else make_rngs(int(rngs))
        scale, shift = self.normalization.per_channel(channels)
        self._scale = scale.reshape(1, 1, channels, 1, 1)
        self._shift = shift.reshape(1, 1, channels, 1, 1) if np.any(shift) else None
        # Columns past a class's image count are never chosen: their sort keys are pushed above 1.
        counts = dataset.class_counts
        self._padding = np.arange(dataset.class_image_table.shape[1])[None, :] >= counts[:, None]

    # -- planning -------------------------------------------------------------------------------
    def plan(self, num_tasks: int, generator: np.random.Generator | None = None) -> TaskPlan:
        """Choose classes, images and rotations for ``num_tasks`` tasks."""
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        rng = generator if generator is not None else self.rngs.numpy
        n_classes = self.dataset.num_classes
        # A uniformly random ordered choice without replacement per task; the order is the label
        # permutation. One call per task (not per image): cheaper than sorting n_classes random keys.
        class_ids = np.stack([rng.choice(n_classes, self.ways, replace=False) for _ in range(num_tasks)])
        per_class = self.shots + self.queries
        keys = rng.random((num_tasks, self.ways, self.dataset.class_image_table.shape[1]))
        keys[self._padding[class_ids]] = 2.0
        columns = _smallest_keys(keys, per_class)
        image_ids = np.take_along_axis(self.dataset.class_image_table[class_ids], columns, axis=2)
        if self.augment_rotations:
            rotations = rng.integers(0, 4, size=(num_tasks, self.ways), dtype=np.int8)
        else:
            rotations = np.zeros((num_tasks, self.ways), dtype=np.int8)
        return TaskPlan(class_ids=class_ids, image_ids=image_ids, rotations=rotations)

    # -- rendering ------------------------------------------------------------------------------
    def render(self, plan: TaskPlan) -> TaskBatch:
        """Tensors for a plan (see ``TaskBatch``)."""
        num_tasks, ways, per_class = plan.image_ids.shape
        height, width, channels = self.dataset.image_shape
        pixels = self.dataset.images[plan.image_ids.reshape(-1)]
        pixels = pixels.reshape(num_tasks, ways, per_class, height, width, channels)
        for quarter_turns in (1, 2, 3):
            selected = plan.rotations == quarter_turns
            if selected.any():
                pixels[selected] = np.rot90(pixels[selected], k=quarter_turns, axes=(2, 3))
        shots = self.shots
        support = pixels[:, :, :shots].reshape(num_tasks, ways * shots, height, width, channels)
        query = pixels[:, :, shots:].reshape(num_tasks, ways * (per_class - shots), height, width, channels)
        labels = torch.arange(ways, dtype=torch.int64)
        return TaskBatch(
            support_x=self._to_tensor(support),
            support_y=labels.repeat_interleave(shots).expand(num_tasks, -1).contiguous(),
            query_x=self._to_tensor(query),
            query_y=labels.repeat_interleave(per_class - shots).expand(num_tasks, -1).contiguous(),
            class_ids=plan.class_ids,
            support_image_ids=plan.image_ids[:, :, :shots].reshape(num_tasks, -1),
            query_image_ids=plan.image_ids[:, :, shots:].reshape(num_tasks, -1),
            rotations=plan.rotations,
        )

    def _to_tensor(self, pixels: np.ndarray) -> torch.Tensor:
        """uint8 ``[T, M, H, W, C]`` -> normalised float32 ``[T, M, C, H, W]``.

        Done in numpy: torch's intra-op threads made this small conversion ~100x slower when
        the cores are busy (measured on 2 shared cores), and changing torch's thread count
        here would change it for the whole training process.
        """
        planar = np.moveaxis(pixels, -1, 2)  # [T, M, C, H, W]; a free view when C == 1
        out = planar.astype(np.float32, order="C")
        out *= self._scale
        if self._shift is not None:
            out += self._shift
        return torch.from_numpy(out)

    # -- public entry points -------------------------------------------------------------------
    def sample(self, batch_tasks: int) -> TaskBatch:
        """``batch_tasks`` fresh tasks, advancing this sampler's generator."""
        return self.render(self.plan(batch_tasks))

    def fixed_tasks(self, num_tasks: int, seed: int) -> FixedTaskSet:
        """A reproducible evaluation set (e.g. 600 test tasks) that depends only on ``seed``.

        It never touches this sampler's own generator, so drawing it does not change
        the training tasks.
        """
        return FixedTaskSet(self, self.plan(num_tasks, make_rngs(seed).numpy))


class FixedTaskSet:
    """A fixed list of tasks stored as a ``TaskPlan``; tensors are rendered per batch."""

    def __init__(self, sampler: TaskSampler, plan: TaskPlan) -> None:
        self.sampler = sampler
        self.plan = plan

    def __len__(self) -> int:
        return len(self.plan)

    def batch(self, start: int, stop: int) -> TaskBatch:
        return self.sampler.render(self.plan.slice(start, stop))

    def batches(self, batch_tasks: int) -> Iterator[TaskBatch]:
        """All tasks, in order, ``batch_tasks`` at a time (the last batch may be smaller)."""
        if batch_tasks < 1:
            raise ValueError(f"batch_tasks must be >= 1, got {batch_tasks}")
        for start in range(0, len(self), batch_tasks):
            yield self.batch(start, min(start + batch_tasks, len(self)))
