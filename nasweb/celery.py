"""The Celery app: configured from Django settings (CELERY_ namespace), tasks autodiscovered."""

from __future__ import annotations

import os

from celery import Celery
from celery.signals import worker_init, worker_process_init, worker_ready

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "nasweb.settings")

app = Celery("nasweb")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@worker_init.connect
def _start_lifeline(**_kwargs) -> None:
    from nasweb.core.lifeline import watch_parent_from_env

    watch_parent_from_env()


@worker_process_init.connect
def _limit_torch_threads(**_kwargs) -> None:
    """Pin torch's thread pool per worker process so concurrent workers never oversubscribe the cores."""
    import torch
    from django.conf import settings

    torch.set_num_threads(settings.NASWEB_TORCH_THREADS)


@worker_ready.connect
def _start_job_recovery(**_kwargs) -> None:
    """Resume jobs whose worker died and re-send lost messages (nasweb/core/recovery.py)."""
    from nasweb.core.recovery import start_recovery_thread

    start_recovery_thread(app)
