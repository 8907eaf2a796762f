"""Celery tasks of the devices app: thin, load by id, call a service."""

from __future__ import annotations

from celery import shared_task


@shared_task(name="devices.profile_device")
def profile_device(job_id: int) -> None:
    from devices.services import profiling_execute

    profiling_execute(job_id=job_id)
