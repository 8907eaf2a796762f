"""The devices REST API: a table per search space, a chosen table, re-profiling a chosen space."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from rest_framework.test import APIClient

from devices import services
from devices.models import LatencyTableRecord, ProfilingJob
from engine.latency.lut import LatencyTable
from tests.conftest import tiny_space

pytestmark = pytest.mark.django_db


def _store_table(device, space, *, ms: float) -> LatencyTableRecord:
    space_dict = space.to_dict()
    entries = {spec.key: ms for spec in space.all_layer_specs()}
    table = LatencyTable(device=device.name, entries=entries, overhead_ms=0.01, metadata={})
    return LatencyTableRecord.objects.create(
        device=device, space=space_dict, space_key=services.space_key(space_dict), table=table.to_dict(),
        entries_count=len(entries), accuracy={"n": 2, "within_10pct": 0.5, "mape": 9.0, "mse": 0.01, "samples": []},
    )  # fmt: skip


@pytest.fixture
def world():
    users = get_user_model().objects
    owner = users.create_user("owner", password="pw-owner-123")
    other = users.create_user("other", password="pw-other-123")
    board = services.board_register(owner=owner, name="jetson").device
    old_five = _store_table(board, tiny_space(), ms=0.1)
    twenty = _store_table(board, tiny_space(num_classes=20, image_size=32), ms=0.2)
    five = _store_table(board, tiny_space(), ms=0.3)
    client = APIClient()
    client.force_authenticate(owner)
    return {
        "owner": owner,
        "other": other,
        "board": board,
        "tables": (old_five, twenty, five),
        "client": client,
    }


def test_a_device_lists_its_newest_table_per_space(world):
    _, twenty, five = world["tables"]
    data = world["client"].get(f"/api/devices/{world['board'].pk}/").json()
    assert [row["id"] for row in data["tables"]] == [five.pk, twenty.pk]
    assert data["tables"][1]["search_space"].startswith("VGG9, 1×32×32 input, 20-way")
    assert data["tables"][1]["space_key"] == twenty.space_key
    assert data["latest_table"]["id"] == five.pk and data["latest_table"]["accuracy"]["mape"] == 9.0
    listed = world["client"].get("/api/devices/").json()
    assert [row["tables"] for row in listed if row["id"] == world["board"].pk] == [data["tables"]]


def test_the_device_list_reads_the_tables_without_a_query_per_device(world, django_assert_max_num_queries):
    for index in range(4):
        device = services.board_register(owner=world["owner"], name=f"board {index}").device
        _store_table(device, tiny_space(), ms=0.1)
        _store_table(device, tiny_space(num_classes=20), ms=0.1)
    with django_assert_max_num_queries(4):  # 3 here; a query per device would add 5
        rows = world["client"].get("/api/devices/").json()
    assert sum(len(row["tables"]) for row in rows) == 2 + 4 * 2


def test_the_table_endpoint_gives_the_chosen_table(world):
    old_five, twenty, five = world["tables"]
    client, pk = world["client"], world["board"].pk
    assert client.get(f"/api/devices/{pk}/table/").json()["id"] == five.pk
    data = client.get(f"/api/devices/{pk}/table/?table={twenty.pk}").json()
    assert data["id"] == twenty.pk and data["space"] == twenty.space
    assert set(data["table"]["entries"].values()) == {0.2}
    assert client.get(f"/api/devices/{pk}/table/?table={old_five.pk}").json()["id"] == old_five.pk
    foreign = _store_table(services.board_register(owner=world["other"], name="x").device, tiny_space(), ms=1)
    for bad in [foreign.pk, "abc", 10**9]:
        response = client.get(f"/api/devices/{pk}/table/?table={bad}")
        assert response.status_code == 404 and "error" in response.json(), bad


def test_reprofiling_through_the_api_chooses_a_space_and_refuses_others(world):
    _, twenty, five = world["tables"]
    client, board = world["client"], world["board"]
    response = client.post(
        f"/api/devices/{board.pk}/profile/", {"space_key": twenty.space_key}, format="json"
    )
    assert response.status_code == 201
    assert ProfilingJob.objects.get(pk=response.json()["id"]).space_key == twenty.space_key
    response = client.post(f"/api/devices/{board.pk}/profile/", {}, format="json")
    assert ProfilingJob.objects.get(pk=response.json()["id"]).space_key == five.space_key
    before = ProfilingJob.objects.count()
    response = client.post(f"/api/devices/{board.pk}/profile/", {"space_key": "0" * 64}, format="json")
    assert response.status_code == 400 and "space_key" in response.json()
    assert ProfilingJob.objects.count() == before


def test_reprofiling_through_the_api_can_turn_the_speed_reference_off(world):
    client, board = world["client"], world["board"]
    response = client.post(f"/api/devices/{board.pk}/profile/", {}, format="json")
    assert response.status_code == 201 and response.json()["speed_reference"] is True
    response = client.post(f"/api/devices/{board.pk}/profile/", {"speed_reference": False}, format="json")
    assert response.status_code == 201 and response.json()["speed_reference"] is False
    assert ProfilingJob.objects.get(pk=response.json()["id"]).speed_reference is False
    before = ProfilingJob.objects.count()
    response = client.post(
        f"/api/devices/{board.pk}/profile/", {"speed_reference": "sometimes"}, format="json"
    )
    assert response.status_code == 400 and "speed_reference" in response.json()
    assert ProfilingJob.objects.count() == before


def test_reprofiling_through_the_api_sets_the_chains_per_layer_within_range(world):
    client, board = world["client"], world["board"]
    response = client.post(f"/api/devices/{board.pk}/profile/", {}, format="json")
    assert response.status_code == 201 and response.json()["context_repeats"] == 2
    response = client.post(f"/api/devices/{board.pk}/profile/", {"context_repeats": 0}, format="json")
    assert response.status_code == 201 and response.json()["context_repeats"] == 0
    assert ProfilingJob.objects.get(pk=response.json()["id"]).context_repeats == 0
    before = ProfilingJob.objects.count()
    for bad in (-1, 11, "two"):
        response = client.post(f"/api/devices/{board.pk}/profile/", {"context_repeats": bad}, format="json")
        assert response.status_code == 400 and "context_repeats" in response.json()
    assert ProfilingJob.objects.count() == before
