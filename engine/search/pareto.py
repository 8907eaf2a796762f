"""Non-dominated (Pareto) fronts: minimise every cost and the loss at once."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Cost = float | Sequence[float]


def _as_vector(cost: Cost) -> tuple[float, ...]:
    if isinstance(cost, int | float):
        return (float(cost),)
    return tuple(float(c) for c in cost)


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """``a`` is no worse than ``b`` in every coordinate and strictly better in at least one."""
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(x < y for x, y in zip(a, b, strict=True))


def front_1d(costs: Sequence[float] | np.ndarray, losses: Sequence[float] | np.ndarray) -> list[int]:
    """Indices of the non-dominated points of one cost and one loss, by increasing cost.

    After sorting by (cost, loss, index) a point is on the front exactly when its loss is below
    every loss before it; vectorised, this stays cheap for the tens of thousands of points a
    long adaption evaluates (the dashboard gets a fresh front every generation).
    """
    cost = np.asarray(costs, dtype=float)
    loss = np.asarray(losses, dtype=float)
    if cost.shape != loss.shape or cost.ndim != 1:
        raise ValueError(f"costs and losses must be 1-D and equally long, got {cost.shape} and {loss.shape}")
    keep = np.flatnonzero(np.isfinite(cost) & np.isfinite(loss))
    if keep.size == 0:
        return []
    order = keep[np.lexsort((keep, loss[keep], cost[keep]))]
    sorted_loss = loss[order]
    best_before = np.concatenate(([np.inf], np.minimum.accumulate(sorted_loss)[:-1]))
    return [int(i) for i in order[sorted_loss < best_before]]


def pareto_front(points: Sequence[tuple[Cost, float]]) -> list[int]:
    """Indices of the non-dominated ``(cost, loss)`` points, sorted by cost (then loss).

    ``cost`` is one number or a vector of costs (e.g. latency and parameters); every cost and
    the loss are minimised. Of several identical points only the first is kept. Points with a
    NaN or infinite value are never on the front (a diverged loss is no trade-off worth
    showing). With several costs the points are sorted lexicographically, so a point can only
    be dominated by an earlier one - and by transitivity by an earlier *front* point.
    """
    vectors: list[tuple[float, ...]] = []
    dims = None
    for index, (cost, loss) in enumerate(points):
        vector = (*_as_vector(cost), float(loss))
        if dims is None:
            dims = len(vector)
        elif len(vector) != dims:
            raise ValueError(f"point {index} has {len(vector) - 1} costs, earlier points have {dims - 1}")
        vectors.append(vector)
    if dims == 2:
        return front_1d([v[0] for v in vectors], [v[1] for v in vectors])
    order = sorted(
        (i for i, v in enumerate(vectors) if all(math.isfinite(x) for x in v)),
        key=lambda i: (vectors[i], i),
    )
    front: list[int] = []
    for index in order:
        vector = vectors[index]
        if any(vectors[kept] == vector or dominates(vectors[kept], vector) for kept in front):
            continue
        front.append(index)
    return front
