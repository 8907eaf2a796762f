"""The admin's "re-run" actions start a new run with every setting of the selected one."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model

from devices import services as device_services
from devices.models import Device
from nasweb.core.models import JobStatus
from nasweb.runs.models import AdaptionRun, MetaTrainingRun, Method

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_client(client):
    admin = get_user_model().objects.create_superuser("root", password="pw-root-123")
    client.force_login(admin)
    client.admin = admin
    return client


def rerun_in_admin(admin_client, run):
    """Post the changelist's "rerun" action for ``run``; the one new run it started."""
    changelist = f"/admin/runs/{type(run)._meta.model_name}/"
    response = admin_client.post(changelist, {"action": "rerun", "_selected_action": [run.pk]})
    assert response.status_code == 302
    return type(run).objects.exclude(pk=run.pk).get()


def test_re_running_an_adaption_keeps_its_search_settings(admin_client, monkeypatch):
    from engine import cpu

    # bfloat16 search is refused on a CPU without bfloat16 instructions; pinned so that this
    # test means the same on every machine.
    monkeypatch.setattr(cpu, "bfloat16_flags", lambda: ["avx512_bf16"])
    device_services.seed_builtin_devices()
    owner = get_user_model().objects.create_user("owner", password="pw-owner-123")
    supernet = MetaTrainingRun.objects.create(
        owner=owner, method=Method.HMETANAS, ways=5, preset="tiny", spec={}, status=JobStatus.SUCCEEDED,
        space={"num_classes": 5, "in_channels": 1, "image_size": 28},
    )  # fmt: skip
    run = AdaptionRun.objects.create(
        owner=owner, supernet=supernet, device=Device.objects.get(builtin_key="local-cpu"), constraint="params",
        budgets=[3000.0, 5000.0], preset="cpu", patience=7, search_metric="loss", deepen="copy-last",
        search_precision="bfloat16", depth_elites=2, status=JobStatus.SUCCEEDED,
    )  # fmt: skip
    again = rerun_in_admin(admin_client, run)
    settings = (
        "supernet",
        "device",
        "constraint",
        "budgets",
        "preset",
        "patience",
        "search_metric",
        "deepen",
        "search_precision",
        "depth_elites",
    )
    assert {name: getattr(again, name) for name in settings} == {
        name: getattr(run, name) for name in settings
    }
    assert again.owner == admin_client.admin and again.status == JobStatus.QUEUED
    assert again.name == f"{run} (re-run)"


@pytest.mark.parametrize(
    ("method", "spec", "length"),
    [(Method.HMETANAS, {"iterations": 40, "seed": 5}, "iterations"), (Method.METANAS, {"meta_epochs": 3, "seed": 5}, "meta_epochs")],
)  # fmt: skip
def test_re_running_a_meta_training_keeps_its_length_and_seed(admin_client, method, spec, length):
    run = MetaTrainingRun.objects.create(
        owner=admin_client.admin, method=method, dataset="omniglot", ways=5, shots=1, preset="tiny", spec=spec,
        status=JobStatus.FAILED,
    )  # fmt: skip
    again = rerun_in_admin(admin_client, run)
    assert (again.method, again.preset, again.ways) == (method, "tiny", 5)
    assert again.spec[length] == spec[length] and again.spec["seed"] == 5
