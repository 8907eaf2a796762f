"""Engine progress -> database row + channel-layer group -> websocket -> browser."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

from engine.progress import JobCancelled, ProgressEvent

logger = logging.getLogger(__name__)


def _json_safe(value: Any) -> Any:
    """NaN/Inf are not JSON: send them as null so the browser never chokes."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def broadcast(group: str, message_type: str, payload: dict[str, Any]) -> None:
    """Send one message to a job's group; a broken channel layer must never kill the job."""
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        async_to_sync(layer.group_send)(group, {"type": message_type, "payload": _json_safe(payload)})
    except Exception:  # noqa: BLE001 - progress is best effort; the DB row stays the truth
        logger.warning("could not broadcast to %s", group, exc_info=True)


class JobProgress:
    """The progress callback a service passes to the engine for one job.

    Every event goes to the websocket group at once (charts are live); the DB row
    (progress bar, message, cancel flag) is written at most every ``db_interval_s``.
    """

    def __init__(self, job, *, db_interval_s: float = 1.0, lease=None) -> None:
        self.job = job
        self.db_interval_s = db_interval_s
        #: The worker's JobLease: the job stops (LeaseLost) once another worker holds it.
        self.lease = lease
        self._last_db_write = 0.0

    def __call__(self, event: ProgressEvent) -> None:
        if self.lease is not None:
            self.lease.check()
        event = dict(event)
        event.setdefault("sent_at", time.time())
        broadcast(self.job.group_name, "job.progress", event)
        now = time.monotonic()
        if now - self._last_db_write < self.db_interval_s and not event.get("final"):
            return
        self._last_db_write = now
        total = event.get("total")
        current = event.get("current")
        fields = []
        if total and current is not None:
            self.job.progress = max(0.0, min(1.0, float(current) / float(total)))
            fields.append("progress")
        message = event.get("message")
        if message:
            self.job.progress_message = str(message)[:300]
            fields.append("progress_message")
        if fields:
            type(self.job).objects.filter(pk=self.job.pk).update(**{f: getattr(self.job, f) for f in fields})
        rows = type(self.job).objects.filter(pk=self.job.pk)
        row = rows.values("cancel_requested", "lease_owner", "status").first()
        if self.lease is not None:
            self.lease.check(row)
        if row and row["cancel_requested"]:
            raise JobCancelled(f"{self.job.job_kind} #{self.job.pk} was cancelled")


def broadcast_status(job) -> None:
    broadcast(
        job.group_name,
        "job.status",
        {"status": job.status, "error": job.error, "progress": job.progress, "message": job.progress_message},
    )
