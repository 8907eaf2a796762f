"""Plan a meta-training run to fill a wall-clock budget on this machine (shared by benchmarks).

A run's cosine schedule, derivative-order annealing and progressive shrinking are laid out over
its planned iterations, so a run cut at a deadline is not the run that was asked for. The plan
therefore times this machine first. Timing only the slowest step (second order, largest net)
left super-net runs using about 60 % of their share (first-order epochs and sampled sub-nets are
faster), so the plan times each kind of step and averages them over the run's schedule.
The plan assumes the run is at least one iteration per epoch long (``iterations >= epochs``),
so that its epochs are the preset's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.meta.runs import RunSpec, build_run, task_source
from engine.meta.service import execute_meta_training, load_run
from engine.meta.tasks import batch_on
from engine.meta.train import CHECKPOINT_NAME, read_metrics
from engine.progress import JobCancelled

#: Sampled sub-nets timed per derivative order (their cost varies with width, depth and kernels).
SAMPLED_ARCHS = 8


@dataclass(frozen=True)
class IterationPlan:
    iterations: int
    #: Expected seconds per iteration averaged over the schedule.
    seconds_per_iteration: float
    #: Measured seconds per step by kind, e.g. {"second_order/1_query_steps/largest": 0.52}.
    step_seconds: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {
            "iterations": self.iterations,
            "seconds_per_iteration": round(self.seconds_per_iteration, 4),
            "step_seconds": {key: round(value, 4) for key, value in self.step_seconds.items()},
        }


def _time_steps(run: Any, source: Any, epoch: int, archs: list[Any], repeats: int) -> float:
    """Mean seconds of one meta-step at ``epoch`` over ``archs`` (``None``: a fixed network)."""
    rng = np.random.default_rng(0)
    learner, meta_batch = run.learner, run.config.meta_batch
    device = next(learner.parameters()).device
    kwargs = {"arch": archs[0]} if archs[0] is not None else {}
    learner.meta_step(
        batch_on(source(rng, meta_batch), device), epoch=epoch, forward_kwargs=kwargs
    )  # warm-up
    total, steps = 0.0, 0
    for arch in archs:
        kwargs = {"arch": arch} if arch is not None else {}
        for _ in range(repeats):
            batch = batch_on(source(rng, meta_batch), device)
            started = time.perf_counter()
            learner.meta_step(batch, epoch=epoch, forward_kwargs=kwargs)
            total += time.perf_counter() - started
            steps += 1
    return total / steps


def _step_kind(learner: Any, epoch: int) -> str:
    """What decides a meta-step's cost at ``epoch``: derivative order and multi-step loss.

    While the multi-step loss is on, every inner step also runs the query set forward and
    backward; afterwards only the last does (``MamlLearner._adapt_task``)."""
    order = "second_order" if learner.second_order_at(epoch) else "first_order"
    queries = int((learner.loss_weights(epoch) > 0).sum())
    return f"{order}/{queries}_query_steps"


def plan_iterations(spec: RunSpec, budget_s: float, *, minimum: int = 4) -> IterationPlan:
    """How many meta-iterations of ``spec`` fit in ``budget_s`` seconds on this machine.

    Every kind of epoch of the run's schedule (derivative order x multi-step loss on or off) is
    timed at its first epoch, for the largest net and for sampled sub-nets of a super-net, and the
    times are averaged over the schedule with progressive shrinking's p(largest) per epoch."""
    run = build_run(spec)
    source, _ = task_source(spec, "train")
    config, learner = run.config, run.learner
    epochs = config.epochs
    kinds = [_step_kind(learner, epoch) for epoch in range(epochs)]
    arch_rng = np.random.default_rng(1)
    step_seconds: dict[str, float] = {}
    for kind in dict.fromkeys(kinds):
        epoch = kinds.index(kind)
        if run.space is None:
            step_seconds[f"{kind}/fixed"] = _time_steps(run, source, epoch, [None], repeats=2)
            continue
        step_seconds[f"{kind}/largest"] = _time_steps(run, source, epoch, [run.space.largest()], repeats=2)
        sampled = [run.space.sample(arch_rng) for _ in range(SAMPLED_ARCHS)]
        step_seconds[f"{kind}/sampled"] = _time_steps(run, source, epoch, sampled, repeats=1)
    per_epoch_seconds = []
    for epoch, kind in enumerate(kinds):
        if run.space is None:
            per_epoch_seconds.append(step_seconds[f"{kind}/fixed"])
            continue
        p_largest = config.shrink.probability(epoch, epochs)
        per_epoch_seconds.append(
            p_largest * step_seconds[f"{kind}/largest"] + (1 - p_largest) * step_seconds[f"{kind}/sampled"]
        )
    mean_seconds = float(np.mean(per_epoch_seconds))
    return IterationPlan(max(minimum, int(budget_s / mean_seconds)), mean_seconds, step_seconds)


#: A run planned for a budget is cut at this multiple of it (the plan is an estimate).
OVERSHOOT_LIMIT = 1.25


def cancel_after(budget_s: float) -> Callable[[dict[str, Any]], None]:
    """A progress callback that cancels the job once ``OVERSHOOT_LIMIT x budget_s`` have passed."""
    deadline = time.perf_counter() + OVERSHOOT_LIMIT * budget_s

    def stop_at_deadline(event: dict[str, Any]) -> None:
        if time.perf_counter() > deadline:
            raise JobCancelled()

    return stop_at_deadline


@dataclass
class BudgetedRun:
    """A meta-training run made to fill a budget: the trained run and how it went."""

    spec: RunSpec
    run: Any
    checkpoint: Path
    report: dict[str, Any]


def meta_train_within(spec: RunSpec, budget_s: float, out: Path) -> BudgetedRun:
    """Meta-train ``spec`` planned to fill ``budget_s``; cut at 1.25x the budget if the plan was off.

    The run goes through the product's own service (``execute_meta_training``, no evaluation), so
    ``out`` is a run folder adaption (``engine.adaption``) and ``load_run`` can read; a run cut at
    the deadline leaves a checkpoint at the iteration it stopped (``meta_train``)."""
    plan = plan_iterations(spec, budget_s)
    spec = spec.with_(iterations=plan.iterations)
    started = time.perf_counter()
    completed = True
    try:
        execute_meta_training(spec, out, progress=cancel_after(budget_s), eval_tasks=0)
    except JobCancelled:
        completed = False
    train_s = time.perf_counter() - started
    run, _ = load_run(out)
    report = {
        "backbone": spec.backbone,
        "algorithm": spec.algorithm,
        "ways": spec.ways,
        "shots": spec.shots,
        "iterations_planned": run.config.total_iterations,
        "iterations_done": read_metrics(out)["iteration"],
        "completed": completed,
        "train_minutes": round(train_s / 60, 2),
        "plan": plan.to_dict(),
    }
    return BudgetedRun(spec, run, out / CHECKPOINT_NAME, report)
