"""Epoch-dependent schedules of MAML++ and of H-Meta-NAS progressive shrinking.

Pure functions of the epoch so that a resumed run recomputes exactly the values the
uninterrupted run would have used.
"""

from __future__ import annotations

import math

import numpy as np


class ScheduleError(ValueError):
    """A schedule parameter outside its valid range."""


def per_step_loss_weights(epoch: int, steps: int, multi_step_epochs: int) -> np.ndarray:
    """MAML++ multi-step loss importance vector (Antoniou et al., section 4 "MSL").

    Starts uniform (1/steps each); the weights of all but the last step decay linearly towards
    ``0.03 / steps`` while the last grows, so that after ``multi_step_epochs`` epochs only the final
    step's query loss matters (weights then [0.03/steps, ..., 1 - 0.03 (steps-1)/steps]; callers
    may switch multi-step off entirely from that epoch on). ``multi_step_epochs = 0`` means
    "final-step loss only" from the start (plain MAML).
    """
    if steps < 1:
        raise ScheduleError(f"steps must be >= 1, got {steps}")
    if multi_step_epochs < 0:
        raise ScheduleError(f"multi_step_epochs must be >= 0, got {multi_step_epochs}")
    if multi_step_epochs == 0 or epoch >= multi_step_epochs:
        weights = np.zeros(steps)
        weights[-1] = 1.0
        return weights
    weights = np.full(steps, 1.0 / steps)
    decay = 1.0 / steps / multi_step_epochs
    floor = 0.03 / steps
    weights[:-1] = np.maximum(weights[:-1] - epoch * decay, floor)
    weights[-1] = min(weights[-1] + epoch * (steps - 1) * decay, 1.0 - (steps - 1) * floor)
    return weights


def use_second_order(epoch: int, second_order: bool, first_order_epochs: int) -> bool:
    """MAML++ derivative-order annealing: first-order for the first ``first_order_epochs`` epochs."""
    return bool(second_order) and epoch >= first_order_epochs


def shrink_start_epoch(total_epochs: int, start_fraction: float) -> int:
    """e_s: the epoch progressive shrinking starts (paper: 30 of 100 epochs)."""
    if not 0.0 <= start_fraction <= 1.0:
        raise ScheduleError(f"shrink start fraction must be in [0, 1], got {start_fraction}")
    return int(round(total_epochs * start_fraction))


def largest_probability(
    epoch: float,
    total_epochs: int,
    *,
    p_end: float,
    p_initial: float = 1.0,
    alpha: float = 5.0,
    start_fraction: float = 0.3,
) -> float:
    """Probability of training the largest sub-net this meta-batch (H-Meta-NAS eq. 4).

    ``p = p_e + (p_i - p_e) * exp(-alpha * (e - e_s) / (e_m - e_s))`` for e >= e_s, ``p_i`` before,
    with e_s = ``start_fraction`` * e_m and e_m = ``total_epochs``.
    """
    for name, value in (("p_end", p_end), ("p_initial", p_initial)):
        if not 0.0 <= value <= 1.0:
            raise ScheduleError(f"{name} must be a probability in [0, 1], got {value}")
    if total_epochs < 1:
        raise ScheduleError(f"total_epochs must be >= 1, got {total_epochs}")
    e_s = shrink_start_epoch(total_epochs, start_fraction)
    if epoch < e_s or total_epochs == e_s:
        return p_initial
    return p_end + (p_initial - p_end) * math.exp(-alpha * (epoch - e_s) / (total_epochs - e_s))
