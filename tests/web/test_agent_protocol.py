"""The board agent protocol on the server: tokens, ownership, validation, idempotency, completion."""

from __future__ import annotations

import json
import math
import uuid

import pytest
from django.contrib.auth import get_user_model
from rest_framework.test import APIClient

from devices import services
from devices.models import (
    AgentBatch,
    DeviceStatus,
    DeviceToken,
    LatencyTableRecord,
    LayerTiming,
    hash_device_token,
)
from nasweb.core.models import JobStatus
from tests.conftest import tiny_space

pytestmark = pytest.mark.django_db


@pytest.fixture
def owner():
    return get_user_model().objects.create_user("board-owner", password="pw-board-owner-1")


@pytest.fixture
def board(owner):
    registration = services.board_register(owner=owner, name="rpi-4b")
    job = services.profiling_start(
        device=registration.device, owner=owner, space=tiny_space(), repeats=3, warmup=1
    )
    return registration, job


def agent(token: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Device {token}")
    return client


def post(client, url, body):
    return client.post(url, data=json.dumps(body), content_type="application/json")


def results_url(job) -> str:
    return f"/api/agent/jobs/{job.pk}/results"


def batch(job, items, batch_id=None):
    return {"batch_id": str(batch_id or uuid.uuid4()), "results": items}


def test_registration_stores_only_the_hash_of_the_token(board):
    registration, _ = board
    row = DeviceToken.objects.get(device=registration.device)
    assert registration.token not in (row.token_hash, row.prefix)
    assert row.token_hash == hash_device_token(registration.token)
    assert len(registration.token) >= 40
    assert "--token " + registration.token in registration.agent_command("http://srv:8000/")


def test_the_agent_gets_its_job_and_the_job_starts(board):
    registration, job = board
    response = agent(registration.token).get("/api/agent/job")
    assert response.status_code == 200
    body = response.json()
    assert body["job_id"] == str(job.pk)
    assert len(body["layers"]) == job.total_layers == 36
    assert body["done_keys"] == []
    job.refresh_from_db()
    assert job.status == JobStatus.RUNNING


@pytest.mark.parametrize("header", ["Device not-a-token", "Device", "Token abc", "Device a b", ""])
def test_forged_or_malformed_tokens_are_rejected(board, header):
    _, job = board
    client = APIClient()
    if header:
        client.credentials(HTTP_AUTHORIZATION=header)
    response = post(client, results_url(job), batch(job, [{"key": job.layers[0]["key"], "ms": 1.0}]))
    assert response.status_code in (401, 403)
    assert LayerTiming.objects.count() == 0


def test_a_revoked_token_is_rejected(board):
    registration, job = board
    services.device_revoke(device=registration.device)
    assert agent(registration.token).get("/api/agent/job").status_code in (401, 403)
    response = post(
        agent(registration.token), results_url(job), batch(job, [{"key": job.layers[0]["key"], "ms": 1.0}])
    )
    assert response.status_code in (401, 403)
    assert LayerTiming.objects.count() == 0
    registration.device.refresh_from_db()
    assert registration.device.status == DeviceStatus.REVOKED


def test_another_devices_job_is_not_found_and_nothing_is_written(board, owner):
    _, job = board
    other = services.board_register(owner=owner, name="other-board")
    response = post(
        agent(other.token), results_url(job), batch(job, [{"key": job.layers[0]["key"], "ms": 1.0}])
    )
    assert response.status_code == 404
    assert LayerTiming.objects.count() == 0


BAD_VALUES = [float("nan"), float("inf"), -1.0, 0, "1.0", True, None, 1e9]


@pytest.mark.parametrize("bad_ms", BAD_VALUES, ids=[repr(v) for v in BAD_VALUES])
def test_non_finite_or_non_positive_timings_reject_the_whole_batch(board, bad_ms):
    registration, job = board
    items = [{"key": job.layers[0]["key"], "ms": 0.5}, {"key": job.layers[1]["key"], "ms": bad_ms}]
    # json.dumps writes NaN/Infinity literals, as a careless client would.
    response = agent(registration.token).post(
        results_url(job), data=json.dumps(batch(job, items)), content_type="application/json"
    )
    assert response.status_code == 400
    assert "error" in response.json()
    assert LayerTiming.objects.count() == 0 and AgentBatch.objects.count() == 0


@pytest.mark.parametrize(
    "body",
    [
        {"batch_id": "not-a-uuid", "results": [{"key": "K", "ms": 1.0}]},
        {"batch_id": str(uuid.uuid4()), "results": []},
        {"batch_id": str(uuid.uuid4()), "results": "nope"},
        {"batch_id": str(uuid.uuid4()), "results": [{"key": "conv|1|2|3", "ms": 1.0}]},
        {"batch_id": str(uuid.uuid4()), "results": [{"key": "K", "ms": 1.0, "extra": 1}]},
        {"batch_id": str(uuid.uuid4()), "results": [{"key": "K", "ms": 1.0}, {"key": "K", "ms": 2.0}]},
        {"batch_id": str(uuid.uuid4()), "results": [{"key": "K", "ms": 1.0}], "surprise": True},
        ["a", "list"],
    ],
    ids=[
        "bad-uuid",
        "empty",
        "not-a-list",
        "unknown-key",
        "unknown-field",
        "key-twice",
        "unknown-top-field",
        "list-body",
    ],
)
def test_malformed_batches_are_rejected_with_nothing_written(board, body):
    registration, job = board
    text = json.dumps(body).replace('"K"', json.dumps(job.layers[0]["key"]))
    response = agent(registration.token).post(results_url(job), data=text, content_type="application/json")
    assert response.status_code == 400, response.content
    assert LayerTiming.objects.count() == 0


def test_malformed_json_and_huge_bodies_are_rejected(board):
    registration, job = board
    client = agent(registration.token)
    response = client.post(results_url(job), data="{not json", content_type="application/json")
    assert response.status_code == 400
    huge = json.dumps(batch(job, [{"key": job.layers[0]["key"], "ms": 1.0}] * 1)) + " " * (3 * 1024 * 1024)
    response = client.post(results_url(job), data=huge, content_type="application/json")
    assert response.status_code in (400, 413)
    assert LayerTiming.objects.count() == 0


def test_replayed_batches_are_idempotent(board):
    registration, job = board
    client = agent(registration.token)
    body = batch(job, [{"key": layer["key"], "ms": 0.25} for layer in job.layers[:5]])
    first = post(client, results_url(job), body)
    again = post(client, results_url(job), body)
    assert first.status_code == again.status_code == 200
    assert first.json()["done"] == 5 and again.json()["duplicate"] is True
    assert LayerTiming.objects.count() == 5 and AgentBatch.objects.count() == 1
    # The same keys in a new batch are kept once, never duplicated.
    other = post(client, results_url(job), batch(job, [{"key": job.layers[0]["key"], "ms": 9.0}]))
    assert other.status_code == 200
    assert LayerTiming.objects.filter(key=job.layers[0]["key"]).count() == 1


def test_complete_builds_the_table_only_when_every_layer_is_there(board):
    registration, job = board
    client = agent(registration.token)
    half = len(job.layers) // 2
    post(
        client,
        results_url(job),
        batch(job, [{"key": layer["key"], "ms": 0.1 + i / 100} for i, layer in enumerate(job.layers[:half])]),
    )
    response = post(
        client,
        f"/api/agent/jobs/{job.pk}/complete",
        {"call_overhead_ms": 0.01, "metadata": {"torch": "2.13.0"}},
    )
    assert response.status_code == 409
    assert len(response.json()["missing"]) == len(job.layers) - half
    assert LatencyTableRecord.objects.count() == 0

    post(
        client,
        results_url(job),
        batch(job, [{"key": layer["key"], "ms": 0.2} for layer in job.layers[half:]]),
    )
    response = post(
        client,
        f"/api/agent/jobs/{job.pk}/complete",
        {"call_overhead_ms": 0.01, "metadata": {"torch": "2.13.0"}},
    )
    assert response.status_code == 200 and response.json() == {"complete": True}
    record = LatencyTableRecord.objects.get()
    assert record.entries_count == len(job.layers)
    job.refresh_from_db()
    registration.device.refresh_from_db()
    assert job.status == JobStatus.SUCCEEDED and job.result == record
    assert registration.device.status == DeviceStatus.READY
    # The prediction of an arch is the overhead plus the sum of its layers' entries.
    from engine.latency.lut import LatencyTable

    table = LatencyTable.from_dict(record.table)
    space = tiny_space()
    arch = space.largest()
    expected = 0.01 + sum(record.table["entries"][spec.key] for spec in space.layer_specs(arch))
    assert math.isclose(table.predict(space, arch), expected)
    # Completing again is harmless; posting after the end is refused.
    assert post(client, f"/api/agent/jobs/{job.pk}/complete", {}).status_code == 200
    late = post(client, results_url(job), batch(job, [{"key": job.layers[0]["key"], "ms": 0.3}]))
    assert late.status_code == 409
    assert agent(registration.token).get("/api/agent/job").status_code == 204


def test_the_agent_file_downloads_without_authentication(client):
    response = client.get("/agent/nasweb_agent.py")
    assert response.status_code == 200
    text = b"".join(response.streaming_content).decode()
    assert "def main(" in text and "import django" not in text
