"""How run pages write costs and accuracies: budgets in their own unit, counts with thousands
separators, latencies to four significant digits, accuracies in percent."""

from __future__ import annotations

import math

from django import template

register = template.Library()

MISSING = "—"


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


@register.filter
def cost(value, kind: str) -> str:
    """A cost of ``kind`` as a person reads it: ``3,000`` parameters, ``0.1003 ms``."""
    number = _number(value)
    if number is None:
        return MISSING
    if kind == "latency_ms":
        return f"{number:.4g} ms"
    return f"{int(number):,}" if number.is_integer() else f"{number:,.4g}"


@register.filter
def costs(values, kind: str) -> str:
    """A list of budgets of one kind, e.g. ``3,000, 8,000``."""
    return ", ".join(cost(value, kind) for value in values or ())


@register.filter
def percent(fraction) -> str:
    """A fraction (0.435) as a percentage with one decimal (43.5)."""
    number = _number(fraction)
    return MISSING if number is None else f"{100 * number:.1f}"


@register.filter
def accuracy(summary) -> str:
    """An accuracy summary (``mean``, ``ci95`` as fractions) as ``43.5 ± 4.0 %``."""
    summary = summary if isinstance(summary, dict) else {}
    return f"{percent(summary.get('mean'))} ± {percent(summary.get('ci95'))} %"


@register.filter
def points(summary) -> str:
    """A paired difference of accuracies (``mean``, ``ci95`` as fractions) as ``+5.9 ± 1.1 points``."""
    summary = summary if isinstance(summary, dict) else {}
    mean, ci95 = _number(summary.get("mean")), _number(summary.get("ci95"))
    if mean is None:
        return MISSING
    return f"{100 * mean:+.1f} ± {percent(ci95)} points"
