"""Schemathesis fuzzes every operation of /api/schema/ in-process (Django's WSGI app, the test
database): whatever it sends - wrong types, huge or negative ids, missing or surplus fields,
odd strings - no answer may be a server error.

Two passes: as a signed-in user (an API token) over the user API, and as a board (its device
token) over the agent protocol. Real rows exist behind the low ids, so generated ids sometimes
hit them; every request runs inside the test's transaction.
"""

from __future__ import annotations

import pytest
import schemathesis
from django.contrib.auth import get_user_model
from django.core.handlers.wsgi import WSGIHandler
from django.core.signals import request_finished, request_started
from django.db import close_old_connections
from django.test import override_settings
from hypothesis import HealthCheck, settings
from rest_framework.authtoken.models import Token

from devices import services as device_services
from devices.models import Device
from nasweb.core.models import JobStatus
from nasweb.runs.models import AdaptedModel, AdaptionRun, MetaTrainingRun, Method
from tests.conftest import tiny_space

pytestmark = pytest.mark.django_db
AGENT_PATHS = "^/api/agent/"


@pytest.fixture(autouse=True)
def requests_share_the_test_transaction():
    """Django closes a connection whose autocommit differs from its settings at the start and end
    of every request - the test transaction would be lost - so that handler is off while the
    fuzzer runs, as in Django's own test client."""
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    try:
        with override_settings(ALLOWED_HOSTS=["localhost"]):
            yield
    finally:
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)


@pytest.fixture
def world(tmp_path):
    owner = get_user_model().objects.create_user("fuzzer", password="pw-fuzzer-123")
    device_services.seed_builtin_devices()
    cpu = Device.objects.get(builtin_key="local-cpu")
    registration = device_services.board_register(owner=owner, name="fuzzed board")
    device_services.profiling_start(
        device=registration.device, owner=owner, space=tiny_space(), overhead_subnets=0
    )
    supernet = MetaTrainingRun.objects.create(
        owner=owner, method=Method.HMETANAS, ways=5, spec={}, status=JobStatus.SUCCEEDED,
        space={"num_classes": 5, "in_channels": 1, "image_size": 28},
    )  # fmt: skip
    run = AdaptionRun.objects.create(
        owner=owner, supernet=supernet, device=cpu, constraint="params", budgets=[3000.0],
        status=JobStatus.SUCCEEDED, result={"front": [], "baselines": [], "outcomes": []},
    )  # fmt: skip
    model_file = tmp_path / "model.pt"
    model_file.write_bytes(b"torchscript-bytes")
    AdaptedModel.objects.create(
        run=run, budget=3000, arch={}, card={}, torchscript=str(model_file), card_path=str(model_file)
    )
    return {
        "user": {"Authorization": f"Token {Token.objects.create(user=owner).key}"},
        "board": {"Authorization": f"Device {registration.token}"},
    }


# Loaded at collection, from the app itself (the schema view needs no database).
with override_settings(ALLOWED_HOSTS=["localhost"]):
    schema = schemathesis.openapi.from_wsgi("/api/schema/", WSGIHandler())
FUZZ = settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def assert_no_server_error(case, headers: dict) -> None:
    response = case.call(headers=headers)
    assert response.status_code < 500, (
        f"{case.method} {case.formatted_path} -> {response.status_code}\n"
        f"query={case.query!r} body={case.body!r}\n{response.text[:2000]}"
    )


@schema.exclude(path_regex=AGENT_PATHS).parametrize()
@FUZZ
def test_the_user_api_never_fails_with_a_server_error(case, world):
    assert_no_server_error(case, world["user"])


@schema.include(path_regex=AGENT_PATHS).parametrize()
@FUZZ
def test_the_agent_api_never_fails_with_a_server_error(case, world):
    assert_no_server_error(case, world["board"])
