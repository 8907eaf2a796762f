"""A real Celery worker process runs a real task through real Redis; the result reaches the DB."""

import os

import pytest

from nasweb.core.models import JobStatus, WorkerReport
from nasweb.core.services import worker_report_request
from tests.conftest import wait_until

pytestmark = pytest.mark.django_db(transaction=True)


def test_it_runs_a_task_in_a_worker_process_and_stores_the_result(celery_worker_process):
    report = worker_report_request(queue="default")

    def finished():
        report.refresh_from_db()
        return report.is_finished

    wait_until(
        finished, timeout=60, message=f"report finished; worker log:\n{celery_worker_process.log()[-2000:]}"
    )
    assert report.status == JobStatus.SUCCEEDED, report.error
    assert report.pid and report.pid != os.getpid()  # it ran in the worker, not here
    assert report.torch_version.startswith("2.13.0")
    assert report.torch_threads == 1  # NASWEB_TORCH_THREADS applied per worker process
    assert report.celery_task_id
    assert report.attempts == 1


def test_each_queue_is_consumed(celery_worker_process):
    reports = [worker_report_request(queue=queue) for queue in ("train", "profile", "adapt")]
    wait_until(
        lambda: (
            WorkerReport.objects.filter(pk__in=[r.pk for r in reports], status=JobStatus.SUCCEEDED).count()
            == 3
        ),
        timeout=60,
        message="all three queues served",
    )


def test_a_redelivered_task_does_not_redo_finished_work(celery_worker_process):
    from nasweb.core.services import worker_report_collect

    report = worker_report_request(queue="default")
    wait_until(
        lambda: WorkerReport.objects.get(pk=report.pk).is_finished, timeout=60, message="report finished"
    )
    first = WorkerReport.objects.get(pk=report.pk)
    again = worker_report_collect(report_id=report.pk)  # as if the broker delivered it twice
    assert again.attempts == first.attempts == 1
    assert again.pid == first.pid
