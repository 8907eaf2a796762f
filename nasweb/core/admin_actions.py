"""Admin actions shared by every job model."""

from __future__ import annotations

from django.contrib import admin, messages

from nasweb.core.services import job_cancel


@admin.action(description="Cancel selected jobs")
def cancel_jobs(modeladmin, request, queryset) -> None:
    count = 0
    for job in queryset:
        if not job.is_finished:
            job_cancel(job=job)
            count += 1
    modeladmin.message_user(request, f"Cancellation requested for {count} job(s).", messages.SUCCESS)


JOB_LIST_FILTER = ("status", "created_at")
JOB_READONLY = (
    "status",
    "progress",
    "progress_message",
    "error",
    "celery_task_id",
    "attempts",
    "created_at",
    "started_at",
    "finished_at",
)
