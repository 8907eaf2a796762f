"""Hardware budgets and the cost model the search checks them against.

A cost model is any ``costs_fn(arch) -> {"latency_ms": ..., "params": ..., "macs": ...}`` in base
units (milliseconds, parameter count, multiply-accumulates). A :class:`Constraint` states one
budget in a unit of its kind (``ms``/``s``/``us`` for latency, ``""``/``K``/``M``/``G`` for counts);
a request may combine several (e.g. latency on a device *and* a parameter cap).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

CostsFn = Callable[[Any], Mapping[str, float]]

# kind -> {unit: multiplier to the base unit}; the first unit listed is the base unit.
UNITS: dict[str, dict[str, float]] = {
    "latency_ms": {"ms": 1.0, "s": 1e3, "us": 1e-3},
    "params": {"": 1.0, "K": 1e3, "M": 1e6, "G": 1e9},
    "macs": {"": 1.0, "K": 1e3, "M": 1e6, "G": 1e9},
}
COST_KINDS: tuple[str, ...] = tuple(UNITS)


class ConstraintError(ValueError):
    """A budget that cannot be a budget: unknown kind or unit, non-numeric, non-positive, non-finite."""


class InfeasibleBudgetError(ValueError):
    """No architecture of the search space could be found that meets the budget(s)."""


@dataclass(frozen=True)
class Constraint:
    """``costs[kind] <= limit * UNITS[kind][unit]``. ``unit=None`` means the kind's base unit."""

    kind: str
    limit: float
    unit: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in UNITS:
            raise ConstraintError(f"unknown constraint kind {self.kind!r}; expected one of {COST_KINDS}")
        unit = next(iter(UNITS[self.kind])) if self.unit is None else self.unit
        if unit not in UNITS[self.kind]:
            raise ConstraintError(
                f"unknown unit {unit!r} for {self.kind}; expected one of {tuple(UNITS[self.kind])}"
            )
        object.__setattr__(self, "unit", unit)
        limit = self.limit
        if isinstance(limit, bool) or not isinstance(limit, int | float):
            raise ConstraintError(f"{self.kind} budget must be a number, got {limit!r}")
        if not math.isfinite(limit):
            raise ConstraintError(f"{self.kind} budget must be finite, got {limit!r}")
        if limit <= 0:
            raise ConstraintError(f"{self.kind} budget must be positive, got {limit!r}")
        object.__setattr__(self, "limit", float(limit))

    @property
    def base_limit(self) -> float:
        """The budget in the cost model's base unit (ms, count)."""
        return self.limit * UNITS[self.kind][self.unit]

    def cost_of(self, costs: Mapping[str, float]) -> float:
        try:
            value = costs[self.kind]
        except KeyError:
            raise ConstraintError(
                f"the cost model returned no {self.kind!r} cost (it returned {sorted(costs)})"
            ) from None
        return float(value)

    def satisfied_by(self, costs: Mapping[str, float]) -> bool:
        value = self.cost_of(costs)
        return math.isfinite(value) and value <= self.base_limit

    def describe(self) -> str:
        unit = self.unit or ""
        return f"{self.kind} <= {self.limit:g}{unit}"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "limit": self.limit, "unit": self.unit}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Constraint:
        try:
            return cls(kind=data["kind"], limit=data["limit"], unit=data.get("unit"))
        except (KeyError, TypeError) as error:
            raise ConstraintError(f"malformed constraint {data!r}: {error!r}") from None

    @classmethod
    def parse(cls, text: str) -> Constraint:
        """``"latency_ms=3"``, ``"params=70K"``, ``"macs=24.1M"``, ``"latency_ms=500us"``."""
        match = re.fullmatch(r"\s*([a-z_]+)\s*=\s*([-+0-9.eE]+|nan|inf)\s*([A-Za-z]*)\s*", text)
        if not match:
            raise ConstraintError(f"cannot parse budget {text!r}; expected e.g. latency_ms=3 or params=70K")
        kind, number, unit = match.groups()
        try:
            limit = float(number)
        except ValueError:
            raise ConstraintError(f"budget {text!r}: {number!r} is not a number") from None
        return cls(kind=kind, limit=limit, unit=unit if unit else None)


def check_constraints(constraints: Iterable[Constraint]) -> tuple[Constraint, ...]:
    result = tuple(constraints)
    if not result:
        raise ConstraintError("at least one constraint is needed")
    for item in result:
        if not isinstance(item, Constraint):
            raise ConstraintError(f"expected Constraint objects, got {item!r}")
    return result


def violations(constraints: Sequence[Constraint], costs: Mapping[str, float]) -> list[str]:
    """Human-readable descriptions of every constraint ``costs`` breaks (empty: feasible)."""
    return [
        f"{c.kind} = {c.cost_of(costs):g} > {c.base_limit:g}"
        for c in constraints
        if not c.satisfied_by(costs)
    ]


class CostModel:
    """Caches ``costs_fn`` by canonical architecture and answers feasibility questions."""

    def __init__(self, costs_fn: CostsFn) -> None:
        self._costs_fn = costs_fn
        self._cache: dict[Any, dict[str, float]] = {}

    def costs(self, arch: Any) -> dict[str, float]:
        key = arch.canonical()
        found = self._cache.get(key)
        if found is None:
            found = {str(k): float(v) for k, v in self._costs_fn(key).items()}
            self._cache[key] = found
        return found

    def feasible(self, arch: Any, constraints: Sequence[Constraint]) -> bool:
        costs = self.costs(arch)
        return all(c.satisfied_by(costs) for c in constraints)
