"""Services of the core app (writes that span models or enqueue tasks)."""

from __future__ import annotations

import os
import socket

from django.db import transaction

from nasweb.core.models import JobStatus, WorkerReport
from nasweb.core.progress import broadcast_status


def worker_report_request(*, owner=None, queue: str = "default") -> WorkerReport:
    """Create a report row and ask a worker on ``queue`` to fill it in (after the commit)."""
    from nasweb.core.tasks import collect_worker_report

    report = WorkerReport.objects.create(owner=owner, queue=queue)

    def enqueue() -> None:
        result = collect_worker_report.apply_async(args=[report.pk], queue=queue)
        WorkerReport.objects.filter(pk=report.pk).update(celery_task_id=result.id)

    transaction.on_commit(enqueue)
    return report


def worker_report_collect(*, report_id: int) -> WorkerReport:
    """Runs in the worker: record what this worker process is."""
    import torch

    from nasweb.core.recovery import job_claim

    report = WorkerReport.objects.get(pk=report_id)
    lease = job_claim(report)
    if lease is None:
        return report  # at-least-once delivery: a redelivered task must not redo finished work
    broadcast_status(report)
    report.hostname = socket.gethostname()
    report.pid = os.getpid()
    report.torch_version = torch.__version__
    report.torch_threads = torch.get_num_threads()
    report.cuda_available = torch.cuda.is_available()
    report.cpu_count = os.cpu_count()
    report.save(
        update_fields=["hostname", "pid", "torch_version", "torch_threads", "cuda_available", "cpu_count"]
    )
    if lease.finish(JobStatus.SUCCEEDED):
        broadcast_status(report)
    return report


def job_cancel(*, job) -> None:
    """Cancel a job: a queued one at once; a running one at its next progress report.

    Running engine loops call the job's progress callback often; it raises JobCancelled once
    ``cancel_requested`` is set, and the service marks the job cancelled after the loop has left
    its checkpoint consistent. A job without a worker (a board's profiling) is cancelled at once.
    """
    from nasweb.celery import app

    job.refresh_from_db()
    if job.is_finished:
        return
    type(job).objects.filter(pk=job.pk).update(cancel_requested=True)
    job.cancel_requested = True
    if job.status == JobStatus.QUEUED or not job.celery_task_id:
        if job.celery_task_id:
            app.control.revoke(job.celery_task_id)
        job.mark_finished(JobStatus.CANCELLED, "cancelled by the user")
        broadcast_status(job)
