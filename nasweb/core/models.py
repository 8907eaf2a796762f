"""The job state machine every long-running thing in nasweb shares.

A job row is created in the request, its Celery task only carries the id, and
the worker moves it queued -> running -> succeeded / failed / cancelled. The
row (not Celery's result) is the source of truth the pages read.
"""

from __future__ import annotations

from django.apps import apps
from django.conf import settings
from django.db import models
from django.utils import timezone


class JobStatus(models.TextChoices):
    QUEUED = "queued", "Queued"
    RUNNING = "running", "Running"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"
    CANCELLED = "cancelled", "Cancelled"


FINISHED_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})


class JobQuerySet(models.QuerySet):
    def visible_to(self, user):
        """Owners see their jobs, staff see all, anonymous users see none."""
        if not user.is_authenticated:
            return self.none()
        if user.is_staff:
            return self
        return self.filter(owner=user)

    def active(self):
        return self.filter(status__in=[JobStatus.QUEUED, JobStatus.RUNNING])

    def for_listing(self):
        """Without the big JSON columns (histories, results) that lists and choices never show:
        decoding them was most of a list page's time. A deferred field still loads on access."""
        return self.defer(*self.model.listing_deferred_fields)


class Job(models.Model):
    """Abstract base of every job model; ``job_kind`` names it in URLs and channel groups."""

    job_kind: str = ""
    #: Large JSON fields that ``JobQuerySet.for_listing`` leaves out.
    listing_deferred_fields: tuple[str, ...] = ()

    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.CASCADE, related_name="+"
    )
    status = models.CharField(
        max_length=16, choices=JobStatus.choices, default=JobStatus.QUEUED, db_index=True
    )
    progress = models.FloatField(default=0.0, help_text="0..1")
    progress_message = models.CharField(max_length=300, blank=True)
    error = models.TextField(blank=True)
    cancel_requested = models.BooleanField(default=False)
    celery_task_id = models.CharField(max_length=64, blank=True)
    attempts = models.PositiveIntegerField(default=0, help_text="How many times a worker started this job")
    # The lease of the worker process executing the job (nasweb.core.recovery): who holds it and
    # when it last said it is alive. A running job whose lease went stale is put back on the queue.
    lease_owner = models.CharField(max_length=300, blank=True, help_text="host/pid-namespace/pid/start-time")
    lease_renewed_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    objects = JobQuerySet.as_manager()

    class Meta:
        abstract = True
        ordering = ["-created_at"]

    @property
    def is_finished(self) -> bool:
        return self.status in FINISHED_STATUSES

    def celery_route(self) -> tuple[str, str] | None:
        """(task name, queue) that executes this job, so a lost job can be sent again; None when
        no Celery task runs it (a board's agent does)."""
        return None

    @property
    def group_name(self) -> str:
        """Channel-layer group of this job (ASCII letters, digits, dots: Channels' rule)."""
        return f"job.{self.job_kind}.{self.pk}"

    def mark_running(self) -> None:
        self.status = JobStatus.RUNNING
        self.attempts += 1
        self.started_at = self.started_at or timezone.now()
        self.error = ""
        self.save(update_fields=["status", "attempts", "started_at", "error"])

    def mark_finished(self, status: JobStatus, error: str = "", *, lease_owner: str | None = None) -> bool:
        """Finish the job; with ``lease_owner`` only while that worker process still holds it
        running (nasweb.core.recovery), so a worker that lost its job never writes its end."""
        fields = {"status": status, "error": error, "finished_at": timezone.now()}
        if status == JobStatus.SUCCEEDED:
            fields["progress"] = 1.0
        rows = type(self).objects.filter(pk=self.pk)
        if lease_owner is not None:
            rows = rows.filter(lease_owner=lease_owner, status=JobStatus.RUNNING)
        if rows.update(**fields) != 1:
            return False
        for name, value in fields.items():
            setattr(self, name, value)
        return True


def job_models() -> list[type[Job]]:
    return [model for model in apps.get_models() if issubclass(model, Job) and model.job_kind]


def job_model_for_kind(kind: str) -> type[Job] | None:
    """The concrete job model whose ``job_kind`` is ``kind`` (None when unknown)."""
    for model in apps.get_models():
        if issubclass(model, Job) and model.job_kind == kind:
            return model
    return None


class WorkerReport(Job):
    """A worker describes itself (host, torch, threads, CUDA): proves the queue and shows capacity."""

    job_kind = "workerreport"

    queue = models.CharField(max_length=32, default="default")
    hostname = models.CharField(max_length=255, blank=True)
    pid = models.IntegerField(null=True, blank=True)
    torch_version = models.CharField(max_length=64, blank=True)
    torch_threads = models.IntegerField(null=True, blank=True)
    cuda_available = models.BooleanField(null=True)
    cpu_count = models.IntegerField(null=True, blank=True)

    class Meta(Job.Meta):
        pass

    def celery_route(self) -> tuple[str, str] | None:
        return "core.collect_worker_report", self.queue

    def __str__(self) -> str:
        return f"Worker report #{self.pk} ({self.status})"
