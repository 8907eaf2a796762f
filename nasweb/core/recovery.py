"""Crash safety: job leases, and jobs whose worker died or whose message was lost run again.

Delivery is at-least-once (acks_late, reject_on_worker_lost), so a task can arrive more than
once. A worker killed with SIGKILL leaves its message unacknowledged in Redis, where kombu restores
it only after the broker's visibility_timeout: hours, because a shorter one would hand a long
meta-training to a second worker while the first still runs it. Recovery therefore does not wait
for the broker; the job rows are the truth:

* Lease. A worker process takes a job with a compare-and-swap on its row (``job_claim``): a
  queued job, or a running job whose lease is dead. A lease is dead when it was not renewed for
  NASWEB_JOB_LEASE_S, or at once when its owner ran in this machine's pid namespace and that
  process is gone (a worker restarted on the same host resumes without waiting). While the job
  runs, a heartbeat thread renews the lease every NASWEB_JOB_HEARTBEAT_S. A delivery that cannot
  claim (the job finished, or it is alive elsewhere) does nothing, so at most one process executes
  a job at a time and a finished job is never executed again. Results are written only while the
  lease is held (``Job.mark_finished(lease_owner=...)``); a process that lost its lease stops at
  its next progress report (``LeaseLost``) without writing.
* Recovery. Every worker scans the job tables when it is ready and then every
  NASWEB_RECOVERY_INTERVAL_S (``RecoveryScanner``). A running job with a dead lease goes back to
  queued and its task is sent again; a queued job whose message is in no Redis queue and not
  unacknowledged either, for NASWEB_LOST_MESSAGE_GRACE_S (Redis restarted without its data, or a
  process died between the commit and the send), is sent again. A compare-and-swap on the row
  lets one scanner win. The execute functions resume from their checkpoint / generation state /
  stored timings, so a crash loses at most one checkpoint interval.

Clocks: lease times are written and compared by the workers' clocks; keep hosts NTP-synced (skew
must stay well below the lease). A worker cut off from the database for longer than the lease can
overlap with its successor until its next progress report.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timedelta
from typing import Any

import psutil
from django.conf import settings
from django.db import DatabaseError, connection
from django.db.models import DateTimeField, F, Value
from django.db.models.functions import Coalesce
from django.utils import timezone

from nasweb.core.models import FINISHED_STATUSES, JobStatus, job_models

logger = logging.getLogger(__name__)


class LeaseLost(Exception):
    """Another process holds this job now (or it was finished meanwhile): stop without writing.

    Deliberately not a JobCancelled: engine loops checkpoint on JobCancelled, and a process that
    lost its lease must not overwrite its successor's checkpoint."""


# --- who holds a lease ----------------------------------------------------------------------


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:  # not Linux: no fast path, leases expire by time only
        return ""


def lease_owner_id(pid: int | None = None) -> str:
    """``host/pid-namespace/pid/start-time`` of a process: unique even when pids are reused."""
    pid = pid or os.getpid()
    started = f"{psutil.Process(pid).create_time():.2f}"
    return f"{socket.gethostname()}/{_pid_namespace()}/{pid}/{started}"


def owner_is_gone(owner: str) -> bool:
    """True only when the owner provably died: it ran in this pid namespace and is not running."""
    parts = owner.split("/")
    if len(parts) != 4:
        return False
    host, namespace, pid, started = parts
    if host != socket.gethostname() or not namespace or namespace != _pid_namespace() or not pid.isdigit():
        return False
    try:
        process = psutil.Process(int(pid))
        return process.status() == psutil.STATUS_ZOMBIE or f"{process.create_time():.2f}" != started
    except psutil.NoSuchProcess:
        return True
    except psutil.AccessDenied:
        return False


def lease_is_dead(owner: str, renewed_at: datetime | None, now: datetime | None = None) -> bool:
    if not owner or renewed_at is None:
        return True  # running without a lease: written before leases existed, its worker is gone
    now = now or timezone.now()
    if renewed_at < now - timedelta(seconds=settings.NASWEB_JOB_LEASE_S):
        return True
    return owner_is_gone(owner)


# --- claiming and holding a job -------------------------------------------------------------


class JobLease:
    """This process's hold on one running job; ``with lease:`` keeps it renewed."""

    def __init__(self, job, owner: str) -> None:
        self.job = job
        self.owner = owner
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> JobLease:
        self._thread = threading.Thread(
            target=self._heartbeat, name=f"nasweb-lease-{self.job.group_name}", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    def _rows(self):
        return type(self.job).objects.filter(pk=self.job.pk, lease_owner=self.owner, status=JobStatus.RUNNING)

    def _heartbeat(self) -> None:
        try:
            while not self._stop.wait(settings.NASWEB_JOB_HEARTBEAT_S):
                try:
                    held = self._rows().update(lease_renewed_at=timezone.now()) == 1
                except DatabaseError:  # the database may be back before the lease runs out
                    logger.warning("could not renew the lease of %s", self.job.group_name, exc_info=True)
                    continue
                if not held and not self._stop.is_set():
                    self.lost = True
                    logger.warning("%s: lease lost to another worker; stopping", self.job.group_name)
                    return
        finally:
            connection.close()  # this thread's own connection

    def check(self, row: dict[str, Any] | None = None) -> None:
        """Raise LeaseLost when the heartbeat (or ``row``, a fresh read) says the job is not ours."""
        if row is not None and (row["lease_owner"] != self.owner or row["status"] != JobStatus.RUNNING):
            self.lost = True
        if self.lost:
            raise LeaseLost(f"{self.job.group_name} is held by another worker now")

    def finish(self, status: JobStatus, error: str = "") -> bool:
        """Mark the job finished, only while this process still holds it."""
        self.stop()
        return self.job.mark_finished(status, error, lease_owner=self.owner)


def job_claim(job) -> JobLease | None:
    """Take ``job`` for this process; None when it finished or a live process executes it.

    Reads the row, then swaps it to running under this process only if nobody changed it in
    between, so two deliveries of one task (or a delivery and a recovery) never both run it."""
    model = type(job)
    now = timezone.now()
    row = model.objects.filter(pk=job.pk).values("status", "lease_owner", "lease_renewed_at").first()
    if row is None or row["status"] in FINISHED_STATUSES:
        return None
    if row["status"] == JobStatus.RUNNING and not lease_is_dead(
        row["lease_owner"], row["lease_renewed_at"], now
    ):
        return None
    owner = lease_owner_id()
    claimed = model.objects.filter(pk=job.pk, **row).update(
        status=JobStatus.RUNNING,
        lease_owner=owner,
        lease_renewed_at=now,
        attempts=F("attempts") + 1,
        started_at=Coalesce("started_at", Value(now, output_field=DateTimeField())),
        error="",
    )
    if claimed != 1:
        return None
    job.refresh_from_db()
    return JobLease(job, owner)


# --- finding lost jobs ----------------------------------------------------------------------


def broker_task_ids(app, queues: set[str]) -> set[str] | None:
    """Ids of every task waiting in ``queues`` or delivered and not yet acknowledged, read from
    Redis; None for another broker (the lost-message check is then skipped)."""
    with app.connection_for_read() as conn:
        if conn.transport.driver_type != "redis":
            return None
        channel = conn.default_channel
        client = channel.client
        raw: list[bytes] = []
        for queue in queues:
            for priority in channel.priority_steps:
                raw.extend(client.lrange(channel._q_for_pri(queue, priority), 0, -1))
        messages = [json.loads(item) for item in raw]
        messages += [json.loads(item)[0] for item in client.hvals(channel.unacked_key)]
    return {message.get("headers", {}).get("id") for message in messages} - {None}


class RecoveryScanner:
    """Puts back jobs whose worker died and re-sends queued jobs whose message was lost.

    Keeps, between passes, since when each queued job's message has been missing: a message is
    briefly in neither place while a worker moves it from the queue to the unacknowledged set."""

    def __init__(self, app=None) -> None:
        from nasweb.celery import app as default_app

        self.app = app or default_app
        self._missing_since: dict[tuple[str, int, str], float] = {}

    def run_once(self) -> list[str]:
        """One pass; returns what it re-sent ("metatrain #3: its worker died")."""
        now = timezone.now()
        grace = settings.NASWEB_LOST_MESSAGE_GRACE_S
        resent: list[str] = []
        queued = []
        for model in job_models():
            for job in self._with_route(
                model.objects.filter(status=JobStatus.RUNNING).exclude(celery_task_id="")
            ):
                if lease_is_dead(job.lease_owner, job.lease_renewed_at, now):
                    expect = {"status": JobStatus.RUNNING, "lease_owner": job.lease_owner,
                              "lease_renewed_at": job.lease_renewed_at}  # fmt: skip
                    if job.cancel_requested:  # the user cancelled it while its worker was gone
                        self._cancel(job, expect)
                    elif self._resend(job, expect, "its worker stopped"):
                        resent.append(f"{job.job_kind} #{job.pk}: its worker stopped")
            queued += self._with_route(
                model.objects.filter(status=JobStatus.QUEUED, created_at__lte=now - timedelta(seconds=grace))
            )
        seen = set()
        present = broker_task_ids(self.app, {job.celery_route()[1] for job in queued}) if queued else None
        for job in queued if present is not None else []:
            key = (job.job_kind, job.pk, job.celery_task_id)
            if job.celery_task_id in present:
                continue
            seen.add(key)
            first_missing = self._missing_since.setdefault(key, time.monotonic())
            if time.monotonic() - first_missing < grace:
                continue
            expect = {"status": JobStatus.QUEUED, "celery_task_id": job.celery_task_id}
            if self._resend(job, expect, "its queued message was lost"):
                resent.append(f"{job.job_kind} #{job.pk}: its queued message was lost")
        self._missing_since = {key: since for key, since in self._missing_since.items() if key in seen}
        return resent

    @staticmethod
    def _with_route(rows) -> list:
        if hasattr(rows.model, "device"):
            rows = rows.select_related("device")
        return [job for job in rows if job.celery_route() is not None]

    @staticmethod
    def _cancel(job, expect: dict[str, Any]) -> None:
        from nasweb.core.progress import broadcast_status

        finished = (
            type(job)
            .objects.filter(pk=job.pk, **expect)
            .update(status=JobStatus.CANCELLED, error="cancelled by the user", finished_at=timezone.now())
        )
        if finished == 1:
            job.refresh_from_db()
            broadcast_status(job)

    def _resend(self, job, expect: dict[str, Any], reason: str) -> bool:
        """Swap the row to queued under a new task id, then send that task; False if another
        scanner (or a worker) changed the row first."""
        from nasweb.core.progress import broadcast_status

        task_name, queue = job.celery_route()
        task_id = str(uuid.uuid4())
        swapped = (
            type(job)
            .objects.filter(pk=job.pk, **expect)
            .update(
                status=JobStatus.QUEUED,
                celery_task_id=task_id,
                lease_owner="",
                lease_renewed_at=None,
                progress_message=f"queued again: {reason}",
            )
        )
        if swapped != 1:
            return False
        self.app.send_task(task_name, args=[job.pk], queue=queue, task_id=task_id)
        logger.warning("%s #%s queued again (%s) as task %s", job.job_kind, job.pk, reason, task_id)
        job.refresh_from_db()
        broadcast_status(job)
        return True


def start_recovery_thread(app=None) -> threading.Thread:
    """Scan now and every NASWEB_RECOVERY_INTERVAL_S in a daemon thread (the worker's main process)."""
    scanner = RecoveryScanner(app)

    def loop() -> None:
        while True:
            try:
                scanner.run_once()
            except Exception:  # noqa: BLE001 - a failed pass (database or broker away) is retried
                logger.warning("job recovery pass failed", exc_info=True)
            finally:
                connection.close()
            time.sleep(settings.NASWEB_RECOVERY_INTERVAL_S)

    thread = threading.Thread(target=loop, name="nasweb-recovery", daemon=True)
    thread.start()
    return thread
