"""The first-launch demo: a newcomer who runs `make run` sees a live chart without configuring anything.

`demo_start` queues a tiny H-Meta-NAS meta-training run (Omniglot 5-way 1-shot) owned by the admin
account; when it succeeds the worker runs `demo_followup`, which requests an adapted model for this
server's CPU under two parameter budgets, so the adaption page then draws a live Pareto front. Both
are ordinary runs: they show up on the dashboard, can be cancelled, and their models downloaded.
"""

from __future__ import annotations

import math

from django.contrib.auth import get_user_model
from django.db import transaction

from devices.models import Device, DeviceKind
from nasweb.core.models import JobStatus
from nasweb.runs.models import AdaptionRun, MetaTrainingRun, Method

DEMO_NAME = "demo: tiny Omniglot 5-way 1-shot super-net"
DEMO_ADAPTION_NAME = "demo: adapted for this server's CPU"
# Budgets as fractions of the way from the smallest to the largest sub-net, on a log scale: one
# tight and one loose budget give two points on the front without the user choosing numbers.
DEMO_BUDGET_FRACTIONS = (0.35, 0.7)


def demo_wanted() -> bool:
    """Only on a first launch: no run of any kind exists yet."""
    return not MetaTrainingRun.objects.exists() and not AdaptionRun.objects.exists()


def demo_start(*, owner=None) -> MetaTrainingRun | None:
    """Queue the demo meta-training run, with the adaption chained after it (None if not wanted)."""
    if not demo_wanted():
        return None
    if owner is None:
        owner = get_user_model().objects.filter(is_superuser=True).order_by("pk").first()
    if owner is None:
        return None
    from nasweb.runs.services import metatrain_start

    with transaction.atomic():
        run = metatrain_start(
            owner=owner,
            method=Method.HMETANAS,
            dataset="omniglot",
            ways=5,
            shots=1,
            preset="tiny",
            name=DEMO_NAME,
        )
    return run


def demo_budgets(space_dict: dict) -> list[float]:
    from engine.cost import arch_params
    from engine.space import SearchSpace

    space = SearchSpace.from_dict(space_dict)
    low, high = arch_params(space, space.smallest()), arch_params(space, space.largest())
    return [
        float(round(math.exp(math.log(low) + fraction * (math.log(high) - math.log(low)))))
        for fraction in DEMO_BUDGET_FRACTIONS
    ]


def demo_followup(*, run_id: int) -> AdaptionRun | None:
    """After the demo super-net finished: request the demo adaption once (idempotent on redelivery)."""
    from nasweb.runs.services import adaption_start

    run = MetaTrainingRun.objects.get(pk=run_id)
    if run.name != DEMO_NAME or run.status != JobStatus.SUCCEEDED or not run.space:
        return None
    existing = AdaptionRun.objects.filter(supernet=run, name=DEMO_ADAPTION_NAME).first()
    if existing is not None:
        return existing
    device = Device.objects.filter(kind=DeviceKind.LOCAL_CPU).order_by("pk").first()
    if device is None:
        return None
    return adaption_start(
        owner=run.owner,
        supernet=run,
        device=device,
        constraint="params",
        budgets=demo_budgets(run.space),
        preset="tiny",
        name=DEMO_ADAPTION_NAME,
    )
