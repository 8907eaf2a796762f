"""Websocket progress through Channels on the real Redis layer, in-process and through daphne."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.parse
import urllib.request
from http.cookiejar import CookieJar

import pytest
import websockets
from asgiref.sync import sync_to_async
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.contrib.auth import get_user_model

from nasweb.core.models import WorkerReport
from nasweb.core.progress import JobProgress
from nasweb.routing import websocket_urlpatterns
from tests.conftest import free_port, start_daphne, wait_for_http

pytestmark = pytest.mark.django_db(transaction=True)


def _user(name: str, *, staff: bool = False):
    return get_user_model().objects.create_user(name, password="pw-" + name + "-12345", is_staff=staff)


async def _connect(user, path: str) -> tuple[WebsocketCommunicator, bool, int | None]:
    communicator = WebsocketCommunicator(URLRouter(websocket_urlpatterns), path)
    communicator.scope["user"] = user
    connected, code = await communicator.connect(timeout=30)
    return communicator, connected, code


def _login_cookies(base: str, username: str) -> str:
    """Log in through the live server's form; the Cookie header its websockets need."""
    jar = CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    page = opener.open(f"{base}/accounts/login/").read().decode()
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)
    form = urllib.parse.urlencode(
        {"username": username, "password": f"pw-{username}-12345", "csrfmiddlewaretoken": token}
    )
    opener.open(
        urllib.request.Request(f"{base}/accounts/login/", data=form.encode(), headers={"Referer": base + "/"})
    )
    cookies = "; ".join(f"{c.name}={c.value}" for c in jar)
    assert "sessionid" in cookies
    return cookies


def test_owner_receives_progress_sent_through_the_redis_layer():
    owner = _user("owner")
    report = WorkerReport.objects.create(owner=owner)

    async def scenario():
        communicator, connected, _ = await _connect(owner, f"/ws/jobs/workerreport/{report.pk}/")
        assert connected
        progress = JobProgress(report, db_interval_s=0)
        await sync_to_async(progress)({"kind": "test", "current": 3, "total": 4, "message": "three of four"})
        message = await communicator.receive_json_from(timeout=30)
        assert message["type"] == "progress"
        assert message["current"] == 3 and message["message"] == "three of four"
        await communicator.send_json_to({"type": "ping"})
        assert await communicator.receive_json_from(timeout=30) == {"type": "pong"}
        await communicator.disconnect()

    asyncio.run(scenario())
    report.refresh_from_db()
    assert report.progress == pytest.approx(0.75)


def test_anonymous_and_other_users_are_refused():
    from django.contrib.auth.models import AnonymousUser

    owner, stranger, staff = _user("owner2"), _user("stranger"), _user("staffer", staff=True)
    report = WorkerReport.objects.create(owner=owner)
    path = f"/ws/jobs/workerreport/{report.pk}/"

    async def scenario():
        _, connected, code = await _connect(AnonymousUser(), path)
        assert not connected and code == 4403
        _, connected, code = await _connect(stranger, path)
        assert not connected and code == 4404
        _, connected, code = await _connect(owner, "/ws/jobs/nosuchkind/1/")
        assert not connected and code == 4404
        communicator, connected, _ = await _connect(staff, path)
        assert connected
        await communicator.disconnect()

    asyncio.run(scenario())


def test_round_trip_through_daphne_on_a_live_port(tmp_path):
    owner = _user("liveowner")
    report = WorkerReport.objects.create(owner=owner)
    port = free_port()
    web = start_daphne(port, tmp_path / "daphne.log")
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for_http(f"{base}/accounts/login/", child=web)
        cookies = _login_cookies(base, "liveowner")

        async def scenario():
            async with websockets.connect(
                f"ws://127.0.0.1:{port}/ws/jobs/workerreport/{report.pk}/",
                additional_headers={"Cookie": cookies, "Origin": base},
                open_timeout=10,
            ) as socket:
                await asyncio.sleep(0.3)  # the consumer joins its group right after accepting
                await sync_to_async(JobProgress(report, db_interval_s=0))(
                    {"kind": "test", "current": 1, "total": 2}
                )
                message = json.loads(await asyncio.wait_for(socket.recv(), timeout=10))
                assert message["type"] == "progress" and message["current"] == 1

        asyncio.run(scenario())
    finally:
        web.stop()


def test_an_idle_socket_through_daphne_outlives_the_redis_read_timeout(tmp_path):
    """A job can be quiet for a while (queued, a long step): its page's socket must stay open.

    channels_redis blocks 5 s in BZPOPMIN per receive; redis-py 8 also defaults to a 5 s socket
    read timeout, so without a longer one the lone consumer died after ~5 s of silence.
    """
    owner = _user("quietowner")
    report = WorkerReport.objects.create(owner=owner)
    port = free_port()
    web = start_daphne(port, tmp_path / "daphne.log")
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for_http(f"{base}/accounts/login/", child=web)
        cookie = _login_cookies(base, "quietowner")

        async def scenario():
            async with websockets.connect(
                f"ws://127.0.0.1:{port}/ws/jobs/workerreport/{report.pk}/",
                additional_headers={"Cookie": cookie, "Origin": base},
                open_timeout=10,
            ) as socket:
                await asyncio.sleep(12)  # two BZPOPMIN periods with nothing to receive
                await sync_to_async(JobProgress(report, db_interval_s=0))({"kind": "test", "current": 1})
                message = json.loads(await asyncio.wait_for(socket.recv(), timeout=10))
                assert message["type"] == "progress" and message["current"] == 1

        asyncio.run(scenario())
        assert "Timeout reading from" not in web.log()
    finally:
        web.stop()
