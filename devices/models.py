"""Hardware the adapted models must run on, and how each was profiled."""

from __future__ import annotations

import hashlib
import secrets
import string

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.urls import reverse

from nasweb.core.models import Job


class DeviceKind(models.TextChoices):
    LOCAL_CPU = "local_cpu", "This server's CPU"
    LOCAL_GPU = "local_gpu", "This server's GPU"
    SIMULATED = "simulated", "Simulated accelerator"
    REMOTE = "remote", "Remote board"


class DeviceStatus(models.TextChoices):
    NEW = "new", "Not profiled"
    PROFILING = "profiling", "Profiling"
    READY = "ready", "Ready"
    FAILED = "failed", "Profiling failed"
    REVOKED = "revoked", "Revoked"


class DeviceQuerySet(models.QuerySet):
    def visible_to(self, user):
        """Built-in devices are shared; registered boards belong to their owner (staff see all)."""
        if not user.is_authenticated:
            return self.none()
        if user.is_staff:
            return self
        return self.filter(Q(owner__isnull=True) | Q(owner=user))

    def with_table_summaries(self):
        """Prefetch each device's latency tables, newest first, without their entries (thousands
        per table) into ``device.table_summaries``: lists show only a table's space, size, date
        and accuracy."""
        tables = LatencyTableRecord.objects.defer("table")
        return self.prefetch_related(
            models.Prefetch("latency_tables", queryset=tables, to_attr="table_summaries")
        )


class Device(models.Model):
    name = models.CharField(max_length=120)
    kind = models.CharField(max_length=16, choices=DeviceKind.choices)
    status = models.CharField(max_length=16, choices=DeviceStatus.choices, default=DeviceStatus.NEW)
    description = models.TextField(blank=True)
    #: Built-in devices have no owner; boards belong to whoever registered them.
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.CASCADE)
    #: Stable identity of a built-in device, so seeding is idempotent.
    builtin_key = models.CharField(max_length=64, unique=True, null=True, blank=True)
    #: Kind-specific settings, e.g. the simulated array size and clock.
    config = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = DeviceQuerySet.as_manager()

    class Meta:
        ordering = ["kind", "name"]

    def __str__(self) -> str:
        return self.name

    @property
    def is_builtin(self) -> bool:
        return self.builtin_key is not None


def hash_device_token(token: str) -> str:
    """Device tokens are 256-bit random strings: a plain SHA-256 is enough (no brute-force surface)."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_device_token() -> str:
    """A URL-safe secret (> 256 bits) whose first character is a letter or digit.

    A plain token_urlsafe() starts with "-" once in 64 tokens, and `nasweb_agent.py --token -x...`
    then fails: argparse reads the token as an option."""
    return secrets.choice(string.ascii_letters + string.digits) + secrets.token_urlsafe(32)


class DeviceToken(models.Model):
    """The credential a board's agent uses; only its hash is stored, the token is shown once."""

    device = models.ForeignKey(Device, on_delete=models.CASCADE, related_name="tokens")
    token_hash = models.CharField(max_length=64, unique=True)
    prefix = models.CharField(max_length=8, help_text="First characters, to tell tokens apart")
    created_at = models.DateTimeField(auto_now_add=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.prefix}… ({'revoked' if self.revoked_at else 'active'})"

    @classmethod
    def issue(cls, device: Device) -> tuple[DeviceToken, str]:
        token = new_device_token()
        row = cls.objects.create(device=device, token_hash=hash_device_token(token), prefix=token[:8])
        return row, token


class LatencyTableRecord(models.Model):
    """A device's layer-wise latency lookup table for one search space (engine.latency.lut.LatencyTable)."""

    device = models.ForeignKey(Device, on_delete=models.CASCADE, related_name="latency_tables")
    space = models.JSONField(help_text="SearchSpace.to_dict() the table covers")
    space_key = models.CharField(max_length=64, db_index=True)
    table = models.JSONField(help_text="LatencyTable.to_dict(): entries, overhead, metadata")
    entries_count = models.PositiveIntegerField(default=0)
    accuracy = models.JSONField(null=True, blank=True, help_text="predicted vs measured report")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        # Newest first, and the later row first where two share a timestamp, so "the latest
        # table" is one row everywhere (lists, the device page, a run's pricing).
        ordering = ["-created_at", "-pk"]
        verbose_name = "latency table"

    def __str__(self) -> str:
        return f"LUT {self.device} ({self.entries_count} entries)"


class ProfilingJob(Job):
    """Profiling of one device over one search space: every layer key measured once."""

    job_kind = "profiling"
    listing_deferred_fields = ("space", "layers")

    device = models.ForeignKey(Device, on_delete=models.CASCADE, related_name="profiling_jobs")
    space = models.JSONField()
    space_key = models.CharField(max_length=64, db_index=True)
    layers = models.JSONField(help_text="[{key, spec}] of every layer the space can produce")
    batch_size = models.PositiveIntegerField(default=1)
    repeats = models.PositiveIntegerField(default=20)
    warmup = models.PositiveIntegerField(default=5)
    threads = models.PositiveIntegerField(null=True, blank=True)
    accuracy_subnets = models.PositiveIntegerField(
        default=0, help_text="sub-nets measured end to end to check the table"
    )
    overhead_subnets = models.PositiveIntegerField(
        default=5, help_text="other sub-nets measured end to end to fit the per-network overhead term"
    )
    total_layers = models.PositiveIntegerField(default=0)
    done_layers = models.PositiveIntegerField(default=0)
    speed_reference = models.BooleanField(
        default=True,
        help_text="CPU timings: each timed call follows one call of a fixed reference convolution and "
        "is expressed at one reference speed, which cancels a machine's speed phases; off: raw medians, "
        "10-25 % faster profiling, measured 3-10x less accurate tables",
    )
    context_repeats = models.PositiveSmallIntegerField(
        default=2,
        help_text="local CPU, VGG9 spaces: after its own timing every layer is timed again inside at "
        "least this many whole chains of layers, where a network runs it, and its entry becomes the "
        "median of those timings (a few seconds more); the job keeps whichever table, in-context or "
        "isolated, is closer to the sub-nets it timed whole (docs/PROFILING.md). 0: isolated entries "
        "only. Boards, GPUs and ResNet12 spaces keep isolated entries",
    )
    reference_ms = models.FloatField(
        null=True,
        blank=True,
        help_text="local CPU: the speed reference's calibrated time; every timing is expressed at it, "
        "kept so a resumed job continues in the same unit",
    )
    result = models.ForeignKey(
        LatencyTableRecord, null=True, blank=True, on_delete=models.SET_NULL, related_name="profiling_jobs"
    )

    class Meta(Job.Meta):
        pass

    def celery_route(self) -> tuple[str, str] | None:
        if self.device.kind == DeviceKind.REMOTE:
            return None  # the board's agent measures it
        return "devices.profile_device", "profile"

    def __str__(self) -> str:
        return f"Profiling #{self.pk} of {self.device} ({self.status})"

    def get_absolute_url(self) -> str:
        return reverse("devices:detail", args=[self.device_id])

    def status_url(self) -> str:
        return reverse("devices:profiling-json", args=[self.pk])


class LayerTiming(models.Model):
    """One measured layer of a profiling job; kept when a job stops, so it resumes where it was."""

    job = models.ForeignKey(ProfilingJob, on_delete=models.CASCADE, related_name="timings")
    key = models.CharField(max_length=200)
    ms = models.FloatField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["job", "key"], name="one_timing_per_key")]


class AgentBatch(models.Model):
    """A results batch an agent posted; its id makes re-sent batches idempotent."""

    job = models.ForeignKey(ProfilingJob, on_delete=models.CASCADE, related_name="agent_batches")
    batch_id = models.UUIDField()
    accepted = models.PositiveIntegerField(default=0)
    received_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["job", "batch_id"], name="one_batch_per_id")]


class ModelMeasurement(models.Model):
    """A whole sub-net measured end to end on the device, to validate the table's predictions."""

    job = models.ForeignKey(ProfilingJob, on_delete=models.CASCADE, related_name="model_measurements")
    index = models.PositiveIntegerField()
    #: "fit" sub-nets set the table's overhead term; "check" sub-nets (never the same) report its accuracy.
    purpose = models.CharField(max_length=8, default="check")
    arch = models.JSONField()
    input_shape = models.JSONField()
    file = models.CharField(max_length=500, help_text="TorchScript file under NASWEB_ARTIFACT_DIR")
    measured_ms = models.FloatField(null=True, blank=True)

    class Meta:
        ordering = ["index"]
        constraints = [models.UniqueConstraint(fields=["job", "index"], name="one_model_per_index")]
