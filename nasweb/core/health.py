"""Real checks of every service nasweb needs; /healthz reports them."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import connection


def _timed(check) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        detail = check()
        result = {"ok": True}
        if detail:
            result.update(detail)
    except Exception as exc:  # noqa: BLE001 - a health check reports, it does not raise
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    result["ms"] = round((time.perf_counter() - started) * 1000, 1)
    return result


def check_database() -> dict[str, Any]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()
    return {"vendor": connection.vendor}


def check_broker() -> dict[str, Any]:
    from nasweb.celery import app

    with app.connection_for_read() as conn:
        conn.ensure_connection(max_retries=1, timeout=2)
        conn.default_channel.client.ping()
    return {}


def check_channel_layer() -> dict[str, Any]:
    layer = get_channel_layer()
    if layer is None:
        raise RuntimeError("no channel layer configured")

    async def round_trip() -> None:
        channel = await layer.new_channel("healthz.")
        await layer.send(channel, {"type": "healthz.ping"})
        message = await asyncio.wait_for(layer.receive(channel), timeout=2)
        if message.get("type") != "healthz.ping":
            raise RuntimeError(f"unexpected message {message!r}")

    async_to_sync(round_trip)()
    return {"backend": type(layer).__name__}


def check_workers(timeout: float = 1.0) -> dict[str, Any]:
    from nasweb.celery import app

    replies = app.control.ping(timeout=timeout) or []
    workers = sorted(name for reply in replies for name in reply)
    if not workers:
        raise RuntimeError("no Celery worker answered a ping")
    return {"workers": workers}


def health_report() -> dict[str, Any]:
    checks = {
        "database": _timed(check_database),
        "broker": _timed(check_broker),
        "channel_layer": _timed(check_channel_layer),
        "workers": _timed(lambda: check_workers(getattr(settings, "NASWEB_HEALTH_PING_TIMEOUT_S", 1.0))),
    }
    return {"ok": all(check["ok"] for check in checks.values()), "checks": checks}
