"""Celery tasks of runs: thin, load by id, call a service (queues: train, adapt)."""

from __future__ import annotations

from celery import shared_task


@shared_task(name="runs.meta_train")
def meta_train(run_id: int) -> None:
    from nasweb.runs.demo import demo_followup
    from nasweb.runs.services import metatrain_execute

    metatrain_execute(run_id=run_id)
    demo_followup(run_id=run_id)  # nothing unless this was the first-launch demo run


@shared_task(name="runs.adapt")
def adapt(run_id: int) -> None:
    from nasweb.runs.services import adaption_execute

    adaption_execute(run_id=run_id)
