"""/healthz reports real checks: green with everything up, 503 when the worker is stopped."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from tests.conftest import child_env, free_port, start_daphne, start_worker, wait_for_http, wait_until

pytestmark = pytest.mark.django_db(transaction=True)


def _isolated_redis_url(session_url: str) -> str:
    """A broker database next to the session's, which no other test's worker listens on, so
    "worker stopped" really means no worker."""
    from urllib.parse import urlparse

    parsed = urlparse(session_url)
    session_db = int(parsed.path.strip("/") or 0)
    return parsed._replace(path=f"/{(session_db + 1) % 16}").geturl()


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=15) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def test_green_with_everything_up_and_503_without_a_worker(tmp_path):
    import os

    redis_url = _isolated_redis_url(os.environ["REDIS_URL"])
    import redis

    redis.Redis.from_url(redis_url).flushdb()
    env = child_env(REDIS_URL=redis_url)
    port = free_port()
    web = start_daphne(port, tmp_path / "web.log", env=env)
    worker = start_worker(tmp_path / "worker.log", env=env)
    url = f"http://127.0.0.1:{port}/healthz"
    try:
        wait_for_http(url, child=web)
        status, report = wait_until(
            lambda: (lambda r: r if r[0] == 200 else None)(_get(url)),
            timeout=90,
            message=f"green healthz; worker log:\n{worker.log()[-2000:]}",
        )
        assert report["ok"] is True
        assert set(report["checks"]) == {"database", "broker", "channel_layer", "workers"}
        assert all(check["ok"] for check in report["checks"].values())
        assert report["checks"]["workers"]["workers"]

        worker.stop()
        status, report = _get(url)
        assert status == 503
        assert report["ok"] is False
        assert report["checks"]["workers"]["ok"] is False
        assert "no Celery worker" in report["checks"]["workers"]["error"]
        assert report["checks"]["database"]["ok"] and report["checks"]["broker"]["ok"]
    finally:
        worker.stop()
        web.stop()


def test_503_when_redis_is_unreachable(client, settings):
    dead = f"redis://127.0.0.1:{free_port()}/0"
    settings.CHANNEL_LAYERS = {
        "default": {"BACKEND": "channels_redis.core.RedisChannelLayer", "CONFIG": {"hosts": [dead]}}
    }
    from channels.layers import channel_layers

    channel_layers.backends.clear()
    try:
        response = client.get("/healthz")
        assert response.status_code == 503
        body = response.json()
        assert body["checks"]["channel_layer"]["ok"] is False
        assert body["checks"]["database"]["ok"] is True
    finally:
        channel_layers.backends.clear()
