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
    new_device_token,
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


def test_tokens_never_read_as_an_option_on_the_agent_command_line():
    from engine.agent import nasweb_agent

    # What happened to one registration in 64: argparse takes a token starting with "-" for an option.
    with pytest.raises(SystemExit) as refused:
        nasweb_agent.main(["--server", "http://127.0.0.1:9", "--token", "-Zs8kQ0x", "--once"])
    assert refused.value.code == 2
    tokens = [new_device_token() for _ in range(2000)]  # a "-" first would be ~31 of them
    assert not [token for token in tokens if token.startswith("-")]
    assert len(set(tokens)) == len(tokens) and min(map(len, tokens)) >= 44


def test_the_agent_gets_its_job_and_the_job_starts(board):
    registration, job = board
    response = agent(registration.token).get("/api/agent/job")
    assert response.status_code == 200
    body = response.json()
    assert body["job_id"] == str(job.pk)
    assert len(body["layers"]) == job.total_layers == 36
    assert body["done_keys"] == [] and body["reference_ms"] is None  # the agent calibrates it
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


# --- hostile agents: whatever they send, the stored timings and the LUT stay sound ------------------


def model_result_url(job, index=0) -> str:
    return f"/api/agent/jobs/{job.pk}/models/{index}/result"


def complete_url(job) -> str:
    return f"/api/agent/jobs/{job.pk}/complete"


@pytest.fixture
def board_with_model(owner, tmp_path):
    """A board's job with one end-to-end model to time (its file made here, not by scripting)."""
    from devices.models import ModelMeasurement

    registration = services.board_register(owner=owner, name="rpi-5")
    job = services.profiling_start(
        device=registration.device, owner=owner, space=tiny_space(), repeats=3, warmup=1, overhead_subnets=1
    )
    model_file = tmp_path / "model-0.pt"
    model_file.write_bytes(b"a torchscript model")
    arch = tiny_space().largest().to_dict()
    ModelMeasurement.objects.create(
        job=job, index=0, purpose="fit", arch=arch, input_shape=[1, 1, 28, 28], file=str(model_file)
    )
    return registration, job


def stored_state(job) -> tuple:
    from devices.models import ModelMeasurement

    return (
        sorted(LayerTiming.objects.filter(job=job).values_list("key", "ms")),
        AgentBatch.objects.filter(job=job).count(),
        sorted(ModelMeasurement.objects.filter(job=job).values_list("index", "measured_ms")),
        LatencyTableRecord.objects.count(),
        type(job).objects.values_list("reference_ms", flat=True).get(pk=job.pk),
    )


BAD_MODEL_BODIES = [
    "NaN", "Infinity", "-Infinity", -1.0, 0, 1e9, "1.5", None, True, [1.0],
]  # fmt: skip


@pytest.mark.parametrize("bad", BAD_MODEL_BODIES, ids=[repr(v) for v in BAD_MODEL_BODIES])
def test_a_bad_whole_model_timing_is_refused(board_with_model, bad):
    registration, job = board_with_model
    before = stored_state(job)
    text = '{"ms": %s}' % (bad if isinstance(bad, str) and bad[0] in "NI-" else json.dumps(bad))
    response = agent(registration.token).post(
        model_result_url(job), data=text, content_type="application/json"
    )
    assert response.status_code == 400, response.content
    assert "error" in response.json()
    assert stored_state(job) == before


@pytest.mark.parametrize(
    "body",
    [
        '{"ms": 1.0, "extra": 2}',
        "{}",
        "[1.0]",
        '{"ms": 1.0',
        "",
    ],
    ids=["unknown-field", "empty-object", "list", "malformed", "empty-body"],
)
def test_malformed_whole_model_bodies_are_refused(board_with_model, body):
    registration, job = board_with_model
    before = stored_state(job)
    response = agent(registration.token).post(
        model_result_url(job), data=body, content_type="application/json"
    )
    assert response.status_code == 400, response.content
    assert stored_state(job) == before


@pytest.mark.parametrize(
    "body",
    [
        '{"call_overhead_ms": NaN}',
        '{"call_overhead_ms": Infinity}',
        '{"call_overhead_ms": -0.5}',
        '{"call_overhead_ms": 1e300}',
        '{"call_overhead_ms": "0.1"}',
        '{"call_overhead_ms": 0.01, "surprise": 1}',
        '{"call_overhead_ms": 0.01, "metadata": ["not", "an", "object"]}',
        '{"call_overhead_ms": 0.01, "metadata": {"blob": "%s"}}' % ("x" * 20_000),
        '"complete"',
        "{not json",
    ],
    ids=[
        "nan",
        "inf",
        "negative",
        "absurd",
        "string",
        "unknown-field",
        "metadata-list",
        "metadata-huge",
        "string-body",
        "malformed",
    ],  # fmt: skip
)
def test_a_bad_completion_is_refused_and_builds_no_table(board_with_model, body):
    registration, job = board_with_model
    client = agent(registration.token)
    post(client, results_url(job), batch(job, [{"key": layer["key"], "ms": 0.2} for layer in job.layers]))
    post(client, model_result_url(job), {"ms": 3.0})
    before = stored_state(job)
    response = client.post(complete_url(job), data=body, content_type="application/json")
    assert response.status_code == 400, response.content
    assert stored_state(job) == before
    job.refresh_from_db()
    assert job.status == JobStatus.RUNNING or job.status == JobStatus.QUEUED


@pytest.mark.parametrize("endpoint", ["results", "model-file", "model-result", "reference", "complete"])
def test_another_devices_job_is_refused_on_every_endpoint(board_with_model, owner, endpoint):
    registration, job = board_with_model
    other = services.board_register(owner=owner, name="another board of the same owner")
    client = agent(other.token)
    before = stored_state(job)
    if endpoint == "results":
        response = post(client, results_url(job), batch(job, [{"key": job.layers[0]["key"], "ms": 1.0}]))
    elif endpoint == "model-file":
        response = client.get(f"/api/agent/jobs/{job.pk}/models/0/file")
    elif endpoint == "model-result":
        response = post(client, model_result_url(job), {"ms": 1.0})
    elif endpoint == "reference":
        response = post(client, f"/api/agent/jobs/{job.pk}/reference", {"reference_ms": 0.1})
    else:
        response = post(client, complete_url(job), {"call_overhead_ms": 0.0})
    assert response.status_code == 404
    assert stored_state(job) == before
    job.refresh_from_db()
    assert job.status == JobStatus.QUEUED  # nothing the other board did touched it


@pytest.mark.parametrize(
    "job_id", ["0", "-1", "1.0", "1e3", "9" * 30, "%2e%2e", "abc", "1%00"], ids=lambda v: v[:12]
)
def test_odd_job_ids_are_not_found(board, job_id):
    registration, _ = board
    client = agent(registration.token)
    response = post(
        client, f"/api/agent/jobs/{job_id}/results", {"batch_id": str(uuid.uuid4()), "results": []}
    )
    assert response.status_code == 404
    assert client.get(f"/api/agent/jobs/{job_id}/models/0/file").status_code == 404
    assert post(client, f"/api/agent/jobs/{job_id}/complete", {}).status_code == 404
    assert LayerTiming.objects.count() == 0


def test_a_replayed_batch_id_with_different_values_changes_nothing(board):
    registration, job = board
    client = agent(registration.token)
    batch_id = uuid.uuid4()
    keys = [layer["key"] for layer in job.layers[:3]]
    first = post(client, results_url(job), batch(job, [{"key": k, "ms": 0.5} for k in keys], batch_id))
    assert first.status_code == 200
    forged = post(client, results_url(job), batch(job, [{"key": k, "ms": 99.0} for k in keys], batch_id))
    assert forged.status_code == 200 and forged.json()["duplicate"] is True
    assert dict(LayerTiming.objects.values_list("key", "ms")) == {k: 0.5 for k in keys}


def test_oversized_batches_are_refused(board):
    registration, job = board
    client = agent(registration.token)
    too_many = [{"key": job.layers[0]["key"], "ms": 1.0}] * (services.MAX_RESULTS_PER_BATCH + 1)
    response = post(client, results_url(job), batch(job, too_many))
    assert response.status_code == 400 and "at most" in response.json()["error"]
    huge_key = post(client, results_url(job), batch(job, [{"key": "k" * 1_000_000, "ms": 1.0}]))
    assert huge_key.status_code == 400
    assert LayerTiming.objects.count() == 0 and AgentBatch.objects.count() == 0


def test_a_cancelled_job_takes_no_more_results(board):
    from nasweb.core.services import job_cancel

    registration, job = board
    client = agent(registration.token)
    client.get("/api/agent/job")
    job_cancel(job=job)
    response = post(client, results_url(job), batch(job, [{"key": job.layers[0]["key"], "ms": 1.0}]))
    assert response.status_code == 409
    assert post(client, complete_url(job), {"call_overhead_ms": 0.0}).status_code == 409
    assert LayerTiming.objects.count() == 0 and LatencyTableRecord.objects.count() == 0


def test_a_token_revoked_mid_job_stops_the_agent_and_keeps_what_was_stored(board):
    registration, job = board
    client = agent(registration.token)
    post(client, results_url(job), batch(job, [{"key": job.layers[0]["key"], "ms": 0.7}]))
    services.device_revoke(device=registration.device)
    response = post(client, results_url(job), batch(job, [{"key": job.layers[1]["key"], "ms": 0.7}]))
    assert response.status_code in (401, 403)
    assert list(LayerTiming.objects.values_list("key", "ms")) == [(job.layers[0]["key"], 0.7)]


def test_after_a_barrage_of_garbage_the_table_holds_exactly_the_accepted_timings(board_with_model):
    """Replays, forgeries, NaNs, unknown keys and a foreign board: the LUT is built from the first
    valid value of every key and nothing else."""
    registration, job = board_with_model
    client = agent(registration.token)
    intruder = services.board_register(owner=registration.device.owner, name="intruder")
    accepted = {layer["key"]: 0.1 + i / 1000 for i, layer in enumerate(job.layers)}
    items = [{"key": key, "ms": ms} for key, ms in accepted.items()]
    half = len(items) // 2
    first_id = uuid.uuid4()
    assert post(client, results_url(job), batch(job, items[:half], first_id)).status_code == 200
    garbage = [
        (client, batch(job, [{**item, "ms": 50.0} for item in items[:half]], first_id)),  # replayed id
        (client, batch(job, [{**item, "ms": 60.0} for item in items[:half]])),  # same keys, new id
        (agent(intruder.token), batch(job, [{**item, "ms": 70.0} for item in items[half:]])),
        (client, batch(job, [{"key": items[half]["key"], "ms": -1.0}])),
        (client, {**batch(job, items[half:]), "extra": True}),
    ]
    for sender, body in garbage:
        assert post(sender, results_url(job), body).status_code in (200, 400, 404)
    text = json.dumps(batch(job, [{"key": items[half]["key"], "ms": float("nan")}]))
    assert client.post(results_url(job), data=text, content_type="application/json").status_code == 400
    assert post(client, results_url(job), batch(job, items[half:])).status_code == 200
    assert post(client, model_result_url(job), {"ms": 2.5}).status_code == 200
    assert (
        post(client, complete_url(job), {"call_overhead_ms": 0.01, "metadata": {"torch": "2"}}).status_code
        == 200
    )

    record = LatencyTableRecord.objects.get()
    assert record.table["entries"] == accepted
    assert all(math.isfinite(ms) and ms > 0 for ms in record.table["entries"].values())
    assert math.isfinite(record.table["overhead_ms"]) and record.table["overhead_ms"] >= 0
    assert LayerTiming.objects.filter(job=job).count() == len(job.layers)


@pytest.mark.parametrize("fit,check", [(5, 3), (3, 5), (10, 30), (1, 1), (0, 4), (4, 0), (7, 1)])
def test_fit_and_check_networks_are_interleaved_in_timing_order(fit, check):
    """Drift during a board's run must hit the fit and the check networks alike: at every point of
    the timing order, the check networks done so far are their fair share, to within one."""
    purposes = services.interleaved_purposes(fit, check)
    assert purposes.count("fit") == fit and purposes.count("check") == check
    for done in range(1, fit + check + 1):
        fair_share = done * check / (fit + check)
        assert abs(purposes[:done].count("check") - fair_share) < 1


def test_a_retried_job_times_the_same_interleaved_networks(owner):
    registration = services.board_register(owner=owner, name="rpi-3")
    job = services.profiling_start(
        device=registration.device, owner=owner, space=tiny_space(), overhead_subnets=4, accuracy_subnets=2
    )
    first = services._validation_archs(job, tiny_space())
    again = services._validation_archs(job, tiny_space())
    assert [purpose for purpose, _ in first] == ["fit", "fit", "check", "fit", "fit", "check"]
    assert [(p, a.to_dict()) for p, a in first] == [(p, a.to_dict()) for p, a in again]


@pytest.mark.parametrize(
    "body",
    [{}, {"reference_ms": "NaN"}, {"reference_ms": -0.1}, {"reference_ms": 0}, {"reference_ms": True},
     {"reference_ms": "0.1"}, {"reference_ms": 1e9}, {"reference_ms": 0.1, "extra": 1}, [0.1]],
    ids=repr,
)  # fmt: skip
def test_a_bad_speed_reference_is_refused_with_nothing_stored(board, body):
    registration, job = board
    before = stored_state(job)
    response = post(agent(registration.token), f"/api/agent/jobs/{job.pk}/reference", body)
    assert response.status_code == 400, response.content
    assert stored_state(job) == before


def test_the_first_speed_reference_is_kept_and_goes_into_the_table(board):
    """A restarted agent calibrates again; the job keeps the unit its first timings are in."""
    registration, job = board
    client = agent(registration.token)
    url = f"/api/agent/jobs/{job.pk}/reference"
    assert post(client, url, {"reference_ms": 0.104}).json() == {"reference_ms": 0.104}
    assert post(client, url, {"reference_ms": 0.151}).json() == {"reference_ms": 0.104}
    fetched = client.get("/api/agent/job").json()
    assert fetched["reference_ms"] == 0.104
    post(client, results_url(job), batch(job, [{"key": layer["key"], "ms": 0.2} for layer in job.layers]))
    for model in fetched["models"]:  # the overhead-fit networks the job asks the board to time
        post(client, f"/api/agent/jobs/{job.pk}/models/{model['model_id']}/result", {"ms": 1.0})
    assert post(client, complete_url(job), {"call_overhead_ms": 0.01}).status_code == 200
    record = LatencyTableRecord.objects.get()
    assert record.table["metadata"]["speed_reference"]["base_ms"] == 0.104
    assert post(client, url, {"reference_ms": 0.2}).status_code == 409  # the job is over


def test_a_job_without_a_speed_reference_sends_no_base_and_refuses_one(owner):
    """The agent times raw medians when the job has no "reference_ms" key (the owner's choice)."""
    from engine.agent import nasweb_agent

    registration = services.board_register(owner=owner, name="quiet board")
    job = services.profiling_start(
        device=registration.device,
        owner=owner,
        space=tiny_space(),
        repeats=3,
        warmup=1,
        speed_reference=False,
    )
    client = agent(registration.token)
    fetched = client.get("/api/agent/job").json()
    assert "reference_ms" not in fetched
    lines = []
    assert nasweb_agent.speed_reference(None, fetched, lines.append) == (None, None)  # posts nothing
    assert lines == ["no speed reference for this job: timings are raw medians"]
    before = stored_state(job)
    response = post(client, f"/api/agent/jobs/{job.pk}/reference", {"reference_ms": 0.1})
    assert response.status_code == 409 and "without a speed reference" in response.json()["error"]
    assert stored_state(job) == before
    post(client, results_url(job), batch(job, [{"key": layer["key"], "ms": 0.2} for layer in job.layers]))
    for model in fetched["models"]:
        post(client, f"/api/agent/jobs/{job.pk}/models/{model['model_id']}/result", {"ms": 1.0})
    assert post(client, complete_url(job), {"call_overhead_ms": 0.01}).status_code == 200
    assert (
        LatencyTableRecord.objects.get(device=registration.device).table["metadata"]["speed_reference"]
        is None
    )
