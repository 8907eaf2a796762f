"""Device pages and their JSON: login boundary, owner/other/staff, registration shows the token once."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model

from devices import services
from devices.models import Device, DeviceToken, LatencyTableRecord, ProfilingJob, hash_device_token
from tests.conftest import tiny_space

pytestmark = pytest.mark.django_db


@pytest.fixture
def users():
    model = get_user_model()
    return {
        "owner": model.objects.create_user("owner", password="pw-owner-123"),
        "other": model.objects.create_user("other", password="pw-other-123"),
        "staff": model.objects.create_user("staff", password="pw-staff-123", is_staff=True),
    }


@pytest.fixture
def board(users):
    registration = services.board_register(owner=users["owner"], name="jetson")
    job = services.profiling_start(device=registration.device, owner=users["owner"], space=tiny_space())
    entries = {layer["key"]: 0.1 for layer in job.layers}
    from engine.latency.lut import LatencyTable

    table = LatencyTable(
        device="jetson",
        entries=entries,
        overhead_ms=0.02,
        per_layer_ms=-0.003,
        metadata={"search_space": job.space},
    )
    table.accuracy = {
        "n": 1,
        "within_10pct": 1.0,
        "mape": 1.0,
        "mse": 0.0,
        "samples": [{"predicted_ms": 1.0, "measured_ms": 1.01, "arch": {}}],
    }
    LatencyTableRecord.objects.create(
        device=registration.device, space=job.space, space_key=job.space_key, table=table.to_dict(),
        entries_count=len(entries), accuracy=table.accuracy,
    )  # fmt: skip
    return registration.device, job


def test_anonymous_users_are_sent_to_login(client, board):
    device, job = board
    for url in [
        "/devices/",
        "/devices/register/",
        f"/devices/{device.pk}/",
        f"/devices/{device.pk}/table.json",
        f"/profiling/{job.pk}.json",
    ]:
        response = client.get(url)
        assert response.status_code == 302 and response["Location"].startswith("/accounts/login/"), url


def test_owner_and_staff_see_the_board_and_others_get_404(client, board, users):
    device, job = board
    for name, expected in [("owner", 200), ("staff", 200), ("other", 404)]:
        client.force_login(users[name])
        assert client.get(f"/devices/{device.pk}/").status_code == expected, name
        assert client.get(f"/devices/{device.pk}/table.json").status_code == expected, name
        assert client.get(f"/profiling/{job.pk}.json").status_code == expected, name
        listing = client.get("/devices/").content.decode()
        assert ("jetson" in listing) == (expected == 200), name


def test_the_table_json_has_the_breakdown_and_the_scatter(client, board, users):
    device, _ = board
    client.force_login(users["owner"])
    data = client.get(f"/devices/{device.pk}/table.json").json()
    assert set(data["layers"]) == {"conv", "head"}
    assert sum(len(rows) for rows in data["layers"].values()) == 36
    assert data["samples"] == [{"predicted_ms": 1.0, "measured_ms": 1.01}]
    assert data["accuracy"]["within_10pct"] == 1.0
    assert (data["overhead_ms"], data["per_layer_ms"]) == (0.02, -0.003)
    page = client.get(f"/devices/{device.pk}/").content.decode()
    assert "overhead 0.0200 ms + -0.0030 ms per layer" in page


def test_registering_a_board_shows_the_token_once_and_starts_profiling(client, users):
    client.force_login(users["owner"])
    response = client.post("/devices/register/", {"name": "rpi zero", "description": "lab", "preset": "tiny"})
    assert response.status_code == 200
    token = response.context["token"]
    page = response.content.decode()
    assert token in page and "--token " + token in page
    device = Device.objects.get(name="rpi zero")
    assert device.owner == users["owner"]
    assert DeviceToken.objects.get(device=device).token_hash == hash_device_token(token)
    assert ProfilingJob.objects.filter(device=device).count() == 1
    detail = client.get(f"/devices/{device.pk}/").content.decode()
    assert token not in detail  # never shown again


def test_registration_form_errors_are_shown(client, users):
    client.force_login(users["owner"])
    response = client.post("/devices/register/", {"name": ""})
    assert response.status_code == 400
    assert "This field is required" in response.content.decode()
    assert not Device.objects.filter(owner=users["owner"]).exists()


def test_only_owner_or_staff_can_reprofile(client, board, users):
    device, _ = board
    client.force_login(users["other"])
    assert (
        client.post(
            f"/devices/{device.pk}/profile/", {"repeats": 5, "warmup": 1, "accuracy_subnets": 0}
        ).status_code
        == 404
    )
    services.seed_builtin_devices()
    cpu = Device.objects.get(builtin_key="local-cpu")
    assert (
        client.post(
            f"/devices/{cpu.pk}/profile/", {"repeats": 5, "warmup": 1, "accuracy_subnets": 0}
        ).status_code
        == 403
    )
    client.force_login(users["owner"])
    before = ProfilingJob.objects.filter(device=device).count()
    response = client.post(
        f"/devices/{device.pk}/profile/", {"repeats": 5, "warmup": 1, "accuracy_subnets": 0}
    )
    assert response.status_code == 302
    assert ProfilingJob.objects.filter(device=device).count() == before + 1
    response = client.post(
        f"/devices/{device.pk}/profile/", {"repeats": 0, "warmup": 1, "accuracy_subnets": 0}, follow=True
    )
    assert "Invalid profiling settings" in response.content.decode()


def test_plotly_is_served_locally(client):
    response = client.get("/static/vendor/plotly/plotly.min.js")
    assert response.status_code == 200


def test_the_dashboard_lists_active_jobs_and_devices(client, board, users):
    device, job = board
    client.force_login(users["owner"])
    page = client.get("/").content.decode()
    assert f"Profiling #{job.pk}" in page and f'data-job-id="{job.pk}"' in page
    assert "jetson" in page
    client.force_login(users["other"])
    page = client.get("/").content.decode()
    assert f"Profiling #{job.pk}" not in page and "jetson" not in page
