"""Few-shot evaluation: mean accuracy and 95 % confidence interval over test tasks.

The same function serves the super-net's sub-nets (``forward_kwargs={"arch": arch}``) and the
fixed baselines (no kwargs): adapt on each task's support set with the learned inner loop, then
classify its query set.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.meta.maml import MamlLearner
from engine.meta.tasks import TaskSource, batch_on
from engine.progress import ProgressCallback, null_progress

#: Test tasks of the standard few-shot protocol (MAML++, H-Meta-NAS).
STANDARD_TEST_TASKS = 600


class EvaluationError(ValueError):
    """Evaluation asked for something impossible (no tasks, bad counts)."""


@dataclass(frozen=True)
class EvalResult:
    """Mean query accuracy over ``tasks`` tasks and the half-width of its 95 % confidence interval."""

    mean: float
    ci95: float
    tasks: int
    accuracies: tuple[float, ...]

    def to_dict(self, with_accuracies: bool = False) -> dict[str, Any]:
        data: dict[str, Any] = {"mean": self.mean, "ci95": self.ci95, "tasks": self.tasks}
        if with_accuracies:
            data["accuracies"] = list(self.accuracies)
        return data

    def __str__(self) -> str:
        return f"{100 * self.mean:.2f}% ± {100 * self.ci95:.2f}% ({self.tasks} tasks)"


def confidence_interval95(values: np.ndarray) -> float:
    """Half-width of the normal-approximation 95 % CI of the mean (1.96 standard errors)."""
    if values.size < 2:
        return float("nan")
    return float(1.96 * values.std(ddof=1) / math.sqrt(values.size))


def batches_from_source(
    source: TaskSource, rng: np.random.Generator, tasks: int, batch_tasks: int
) -> Iterator[Any]:
    """``tasks`` tasks from ``source`` in batches of at most ``batch_tasks``."""
    if tasks < 1 or batch_tasks < 1:
        raise EvaluationError(f"tasks and batch_tasks must be >= 1, got {tasks} and {batch_tasks}")
    for start in range(0, tasks, batch_tasks):
        yield source(rng, min(batch_tasks, tasks - start))


def evaluate(
    learner: MamlLearner,
    batches: Iterable[Any],
    *,
    forward_kwargs: Mapping[str, Any] | None = None,
    steps: int | None = None,
    total_tasks: int | None = None,
    progress: ProgressCallback = null_progress,
) -> EvalResult:
    """Adapt-and-test every task of ``batches``; report mean accuracy ± 95 % CI.

    BatchNorm uses each task's batch statistics (train mode, as MAML++ evaluates); the model
    and its running statistics are left unchanged.
    """
    was_training = learner.training
    learner.train()
    device = next(learner.parameters()).device
    accuracies: list[float] = []
    try:
        for batch in batches:
            batch = batch_on(batch, device)
            accuracies.extend(learner.evaluate_batch(batch, forward_kwargs=forward_kwargs, steps=steps))
            progress(
                {
                    "kind": "evaluate",
                    "current": len(accuracies),
                    "total": total_tasks,
                    "accuracy": float(np.mean(accuracies)),
                }
            )
    finally:
        learner.train(was_training)
    if not accuracies:
        raise EvaluationError("no tasks to evaluate")
    values = np.asarray(accuracies, dtype=np.float64)
    return EvalResult(
        mean=float(values.mean()),
        ci95=confidence_interval95(values),
        tasks=len(values),
        accuracies=tuple(accuracies),
    )
