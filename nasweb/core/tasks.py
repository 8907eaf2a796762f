"""Celery tasks of the core app: thin, load by id, call a service."""

from __future__ import annotations

from celery import shared_task


@shared_task(name="core.collect_worker_report")
def collect_worker_report(report_id: int) -> None:
    from nasweb.core.services import worker_report_collect

    worker_report_collect(report_id=report_id)
