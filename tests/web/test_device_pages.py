"""Device pages and their JSON: login boundary, owner/other/staff, registration shows the token once."""

from __future__ import annotations

import re

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


def _store_table(device, space, *, ms: float, within: float) -> LatencyTableRecord:
    """A finished table for ``space`` as profiling stores it (entries for every key of the space)."""
    from engine.latency.lut import LatencyTable

    space_dict = space.to_dict()
    entries = {spec.key: ms for spec in space.all_layer_specs()}
    table = LatencyTable(
        device=device.name, entries=entries, overhead_ms=0.01, metadata={"search_space": space_dict}
    )
    accuracy = {"n": 4, "within_10pct": within, "mape": 3.5, "mse": 0.001, "samples": []}
    return LatencyTableRecord.objects.create(
        device=device, space=space_dict, space_key=services.space_key(space_dict), table=table.to_dict(),
        entries_count=len(entries), accuracy=accuracy,
    )  # fmt: skip


@pytest.fixture
def board_with_two_spaces(board):
    """The board's 5-way table, then a 20-way one at 32x32, then a newer 5-way table."""
    device, _ = board
    twenty_way = _store_table(device, tiny_space(num_classes=20, image_size=32), ms=0.2, within=0.5)
    five_way = _store_table(device, tiny_space(), ms=0.3, within=0.75)
    return device, five_way, twenty_way


def test_the_device_page_lists_every_search_space_and_shows_the_chosen_table(
    client, board_with_two_spaces, users
):
    device, five_way, twenty_way = board_with_two_spaces
    client.force_login(users["owner"])
    response = client.get(f"/devices/{device.pk}/")
    rows = [entry.latest.pk for entry in response.context["tables"]]
    assert rows == [five_way.pk, twenty_way.pk]  # one row per space, newest first
    page = response.content.decode()
    assert "VGG9, 1×28×28 input, 5-way" in page and "VGG9, 1×32×32 input, 20-way" in page
    assert "(replaces 1 older)" in page  # the fixture's first 5-way table
    assert response.context["table"] == five_way and "75 % of 4" in page

    assert "lut-speed-reference" not in page  # a table from before speed references: nothing to say

    # A table timed without one (a job made with speed_reference=False) says so.
    five_way.table["metadata"]["speed_reference"] = None
    five_way.save()
    assert "none: raw medians" in client.get(f"/devices/{device.pk}/").content.decode()

    # A table of this server's CPU says at which reference speed its entries and checks are.
    twenty_way.table["metadata"]["speed_reference"] = {"workload": "conv3x3 32->32", "base_ms": 0.10421}
    twenty_way.save()
    chosen = client.get(f"/devices/{device.pk}/?table={twenty_way.pk}")
    assert "where the reference takes 0.1042 ms" in chosen.content.decode()
    assert chosen.context["table"] == twenty_way
    assert "lut-context" not in chosen.content.decode()  # isolated entries only: nothing to say
    # A table whose layers were timed again in context says how.
    twenty_way.table["metadata"]["context"] = {
        "chains": 1821, "repeats_per_key": 2, "layer_calls": 45675, "build_s": 6.39,
    }  # fmt: skip
    twenty_way.save()
    chosen = client.get(f"/devices/{device.pk}/?table={twenty_way.pk}")
    assert "each layer in ≥ 2 of 1821 chains, 45675 layer timings, 6.4 s" in chosen.content.decode()
    assert "lut-context-choice" not in chosen.content.decode()  # a table from before the choice
    # ... and which entries the job kept: those closer to the sub-nets it timed whole.
    twenty_way.table["metadata"]["context"]["choice"] = {
        "kept": "isolated", "networks": 8, "in_context": {"mape": 14.68, "within_10pct": 0.357},
        "isolated": {"mape": 4.83, "within_10pct": 0.887},
    }  # fmt: skip
    twenty_way.save()
    page = client.get(f"/devices/{device.pk}/?table={twenty_way.pk}").content.decode()
    assert "kept the isolated entries (MAPE 14.68 % in context, 4.83 % isolated, over 8 sub-nets" in page
    assert f"#{twenty_way.pk}: VGG9, 1×32×32 input, 20-way" in chosen.content.decode()
    assert f"table.json?table={twenty_way.pk}" in chosen.content.decode()  # the charts follow the choice

    data = client.get(f"/devices/{device.pk}/table.json?table={twenty_way.pk}").json()
    assert data["table"] == twenty_way.pk and data["search_space"].startswith("VGG9, 1×32×32 input, 20-way")
    assert {row["ms"] for rows in data["layers"].values() for row in rows} == {0.2}
    assert client.get(f"/devices/{device.pk}/table.json").json()["table"] == five_way.pk


def test_the_device_list_and_dashboard_show_each_devices_newest_table_without_a_query_per_device(
    client, board_with_two_spaces, users, django_assert_max_num_queries
):
    device, five_way, _ = board_with_two_spaces
    for name in ("rpi-a", "rpi-b", "rpi-c"):
        other = services.board_register(owner=users["owner"], name=name).device
        _store_table(other, tiny_space(), ms=0.4, within=0.5)
    client.force_login(users["owner"])
    with django_assert_max_num_queries(5):  # 4 here; a query per device would add 4
        listing = client.get("/devices/").content.decode()
    row = listing[listing.index("jetson") :].split("</tr>")[0]
    assert f"{five_way.entries_count} layers, " in row and "(newest of 3)" in row
    with django_assert_max_num_queries(9):  # 8 here
        assert "jetson" in client.get("/").content.decode()


def test_a_table_of_another_device_or_a_bad_id_is_not_found(client, board_with_two_spaces, users):
    device, _, _ = board_with_two_spaces
    other_board = services.board_register(owner=users["owner"], name="coral").device
    foreign = _store_table(other_board, tiny_space(), ms=0.4, within=1.0)
    client.force_login(users["owner"])
    for query in [f"table={foreign.pk}", "table=abc", "table=-1", "table=999999"]:
        assert client.get(f"/devices/{device.pk}/?{query}").status_code == 404, query
        assert client.get(f"/devices/{device.pk}/table.json?{query}").status_code == 404, query


def test_reprofiling_chooses_among_the_devices_spaces(client, board_with_two_spaces, users):
    device, five_way, twenty_way = board_with_two_spaces
    client.force_login(users["owner"])
    settings_of_job = {"repeats": 5, "warmup": 1, "accuracy_subnets": 0}
    offered = [
        key
        for key, _ in client.get(f"/devices/{device.pk}/").context["profiling_form"].fields["space"].choices
    ]
    default_key = services.space_key(services.default_profiling_space().to_dict())
    assert offered == [five_way.space_key, twenty_way.space_key, default_key]

    response = client.post(
        f"/devices/{device.pk}/profile/", {**settings_of_job, "space": twenty_way.space_key}
    )
    assert response.status_code == 302
    job = ProfilingJob.objects.filter(device=device).latest("created_at")
    assert job.space_key == twenty_way.space_key and job.space == twenty_way.space
    assert job.total_layers == twenty_way.entries_count

    client.post(f"/devices/{device.pk}/profile/", settings_of_job)  # no space: the newest table's
    assert ProfilingJob.objects.filter(device=device).latest("created_at").space_key == five_way.space_key

    before = ProfilingJob.objects.filter(device=device).count()
    refused = client.post(
        f"/devices/{device.pk}/profile/", {**settings_of_job, "space": "f" * 64}, follow=True
    )
    assert "Invalid profiling settings" in refused.content.decode()
    assert ProfilingJob.objects.filter(device=device).count() == before


def test_reprofiling_a_space_that_cannot_be_read_is_refused_with_a_message(client, board, users):
    device, _ = board
    broken = LatencyTableRecord.objects.create(
        device=device, space={"backbone": "vgg9", "in_channels": 1, "image_size": 28, "num_classes": 5, "colour": 1},
        space_key="b" * 64, table={"entries": {}}, entries_count=0,
    )  # fmt: skip
    client.force_login(users["owner"])
    page = client.get(f"/devices/{device.pk}/?table={broken.pk}").content.decode()
    assert "a search space this version cannot read" in page
    before = ProfilingJob.objects.filter(device=device).count()
    response = client.post(
        f"/devices/{device.pk}/profile/", {"repeats": 5, "warmup": 1, "accuracy_subnets": 0, "space": "b" * 64},
        follow=True,
    )  # fmt: skip
    assert "this search space cannot be read" in response.content.decode()
    assert ProfilingJob.objects.filter(device=device).count() == before


def test_a_device_without_tables_offers_the_default_space(client, users):
    device = services.board_register(owner=users["owner"], name="new board").device
    client.force_login(users["owner"])
    response = client.get(f"/devices/{device.pk}/")
    assert response.context["tables"] == [] and response.context["table"] is None
    choices = response.context["profiling_form"].fields["space"].choices
    default = services.default_profiling_space()
    assert choices == [(services.space_key(default.to_dict()), f"{default.describe()} (the default)")]
    client.post(f"/devices/{device.pk}/profile/", {"repeats": 5, "warmup": 1, "accuracy_subnets": 0})
    assert ProfilingJob.objects.get(device=device).space == default.to_dict()


def test_the_speed_reference_is_ticked_by_default_and_unticking_it_makes_a_raw_timing_job(
    client, users, board
):
    client.force_login(users["owner"])
    form_page = client.get("/devices/register/").content.decode()
    assert re.search(r'<input type="checkbox" name="speed_reference"[^>]* checked>', form_page)
    # A browser sends a ticked checkbox as "on" and an unticked one not at all.
    on = client.post("/devices/register/", {"name": "ref on", "preset": "tiny", "speed_reference": "on"})
    off = client.post("/devices/register/", {"name": "ref off", "preset": "tiny"})
    assert "without a speed reference" not in on.content.decode()
    assert "raw medians, without a speed reference" in off.content.decode()
    assert ProfilingJob.objects.get(device__name="ref on").speed_reference is True
    assert ProfilingJob.objects.get(device__name="ref off").speed_reference is False

    device, _ = board
    settings_of_job = {"repeats": 5, "warmup": 1, "accuracy_subnets": 0}
    client.post(f"/devices/{device.pk}/profile/", settings_of_job)
    assert ProfilingJob.objects.filter(device=device).latest("created_at").speed_reference is False
    client.post(f"/devices/{device.pk}/profile/", {**settings_of_job, "speed_reference": "on"})
    assert ProfilingJob.objects.filter(device=device).latest("created_at").speed_reference is True
    assert 'name="speed_reference"' in client.get(f"/devices/{device.pk}/").content.decode()


def test_the_profiling_form_sets_chains_per_layer_for_this_cpu_only(client, users, board):
    services.seed_builtin_devices()
    cpu = Device.objects.get(builtin_key="local-cpu")
    client.force_login(users["staff"])
    page = client.get(f"/devices/{cpu.pk}/").content.decode()
    assert re.search(r'<input type="number" name="context_repeats" value="2"', page)
    settings_of_job = {"repeats": 5, "warmup": 1, "accuracy_subnets": 0}
    # (The test's transaction is never committed, so no job reaches a worker's queue.)
    client.post(f"/devices/{cpu.pk}/profile/", settings_of_job)
    assert ProfilingJob.objects.filter(device=cpu).latest("created_at").context_repeats == 2
    client.post(f"/devices/{cpu.pk}/profile/", {**settings_of_job, "context_repeats": 0})
    assert ProfilingJob.objects.filter(device=cpu).latest("created_at").context_repeats == 0
    before = ProfilingJob.objects.count()
    response = client.post(
        f"/devices/{cpu.pk}/profile/", {**settings_of_job, "context_repeats": 11}, follow=True
    )
    assert ProfilingJob.objects.count() == before
    assert "Ensure this value is less than or equal to 10" in response.content.decode()

    # A board's agent times its layers alone: its page does not offer the setting.
    device, _ = board
    client.force_login(users["owner"])
    assert 'name="context_repeats"' not in client.get(f"/devices/{device.pk}/").content.decode()
