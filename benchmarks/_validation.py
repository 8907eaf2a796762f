"""Validation tasks, mean ± 95 % CI and rank correlation, shared by the benchmarks that score
sub-nets on them."""

from __future__ import annotations

from typing import Any

import numpy as np

from engine.meta.evaluate import confidence_interval95
from engine.meta.runs import RunSpec, task_source
from engine.search.adapt import slice_tasks
from engine.seeding import derive_seed

#: Seed stream of the validation tasks: every benchmark scores on the same tasks for a seed.
VALIDATION_STREAM = 10


def validation_tasks(spec: RunSpec, count: int, seed: int) -> list[Any]:
    """``count`` tasks of ``spec``'s validation split, one by one, the same for the same seed."""
    _, eval_batches = task_source(spec, "val")
    return [
        task
        for batch in eval_batches(count, count, derive_seed(seed, VALIDATION_STREAM))
        for task in slice_tasks(batch)
    ]


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its normal-approximation 95 % CI (NaN for fewer than 2 values)."""
    array = np.asarray(values, dtype=float)
    return float(array.mean()), confidence_interval95(array)


def average_ranks(values: Any) -> np.ndarray:
    """0-based ranks, tied values sharing the mean of their positions (error rates tie often)."""
    array = np.asarray(values, dtype=float)
    order = np.argsort(array, kind="stable")
    ranks = np.empty(len(array))
    ranks[order] = np.arange(len(array))
    for value in np.unique(array):
        tied = array == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(a: Any, b: Any) -> float:
    """Spearman's rank correlation of two equally long sequences (ties: average ranks)."""
    return float(np.corrcoef(average_ranks(a), average_ranks(b))[0, 1])
