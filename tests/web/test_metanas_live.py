"""MetaNAS as a method of the product: a tiny run and an adaption through a real Celery worker
(real Omniglot, real Redis), its point on the H-Meta-NAS Pareto chart, and the forms/API choices."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from rest_framework.test import APIClient

from devices import services as device_services
from devices.models import Device
from nasweb.core.models import JobStatus
from nasweb.runs import services
from nasweb.runs.models import AdaptedModel, AdaptionRun, MetaTrainingRun, Method
from tests.conftest import wait_until

# A fresh process that knows nothing of nasweb: load, classify a batch, count the parameters.
CLASSIFY = r"""
import json, sys, torch
model = torch.jit.load(sys.argv[1])
torch.manual_seed(0)
x = torch.rand(5, 1, 28, 28)
with torch.no_grad():
    logits = model(x)
print(json.dumps({
    "shape": list(logits.shape),
    "finite": bool(torch.isfinite(logits).all()),
    "params": sum(p.numel() for p in model.parameters()),
    "engine_imported": "engine" in sys.modules,
}))
"""


def _wait(run, worker, timeout: float):
    wait_until(
        lambda: type(run).objects.get(pk=run.pk).is_finished,
        timeout=timeout,
        message=f"{run} finished; worker log:\n{worker.log()[-4000:]}",
    )
    run.refresh_from_db()
    return run


@pytest.mark.slow
@pytest.mark.timeout(900)  # its inner waits allow a loaded machine more than the suite's 300 s
@pytest.mark.django_db(transaction=True)
def test_metanas_run_and_adaption_through_a_worker(celery_worker_process, settings):
    # The spec records the thread count; one thread like the worker's (a two-thread OpenMP team spins
    # at every barrier when the shared test machine is oversubscribed: minutes instead of seconds).
    settings.NASWEB_TORCH_THREADS = 1
    user = get_user_model().objects.create_user("metanas", password="pw-metanas-123")
    metanas = services.metatrain_start(owner=user, method=Method.METANAS, ways=5, shots=1, preset="tiny")
    # Queued behind it on the one worker: a small H-Meta-NAS super-net whose chart must show MetaNAS.
    supernet = services.metatrain_start(
        owner=user, method=Method.HMETANAS, ways=5, shots=1, preset="tiny", iterations=8
    )
    metanas = _wait(metanas, celery_worker_process, timeout=300)
    assert metanas.status == JobStatus.SUCCEEDED, metanas.error
    assert metanas.spec["method"] == "metanas" and metanas.backbone == "darts" and metanas.space is None
    summary = metanas.summary
    assert summary["iterations"] == 4  # the tiny preset's meta-epochs
    reference = summary["reference"]
    assert reference["name"] == "MetaNAS" and reference["accuracy"]["tasks"] == 4
    assert 0.0 <= reference["accuracy"]["mean"] <= 1.0
    assert reference["params"] > 0 and reference["macs"] > reference["params"]
    assert reference["measured_latency_ms"] > 0  # each task network timed end to end
    # The meta-epoch curve reached the history in the H-Meta-NAS event shape (same chart).
    assert [p["current"] for p in metanas.history] == [1, 2, 3, 4]
    assert {"loss", "accuracy"} <= set(metanas.history[-1])

    device_services.seed_builtin_devices()
    cpu = Device.objects.get(builtin_key="local-cpu")
    adaption = services.adaption_start(
        owner=user, supernet=metanas, device=cpu, constraint="params", budgets=[100, 1_000_000]
    )
    adaption = _wait(adaption, celery_worker_process, timeout=300)
    assert adaption.status == JobStatus.SUCCEEDED, adaption.error
    model = AdaptedModel.objects.get(run=adaption)
    card = model.card
    assert card["method"] == "metanas" and card["genotype"]["normal"]
    assert card["measured_latency_ms"] > 0 and card["latency_ms"]["lut_predicted"] is None
    assert "this server's CPU" in card["latency_ms"]["measured_note"]
    # Budgets are checked, not searched: 100 parameters cannot hold a 5-way DARTS network.
    assert [check["met"] for check in card["budgets"]] == [False, True]
    out = subprocess.run(
        [sys.executable, "-c", CLASSIFY, model.torchscript], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    loaded = json.loads(out.stdout)
    assert loaded == {"shape": [5, 5], "finite": True, "params": card["params"], "engine_imported": False}
    assert json.loads(open(model.card_path).read())["params"] == card["params"]

    client = Client()
    client.force_login(user)
    payload = client.get(f"/runs/adapt/{adaption.pk}.json").json()
    assert payload["method"] == "metanas"
    (outcome,) = payload["outcomes"]
    assert outcome["costs"]["params"] == card["params"] and outcome["search_loss"] > 0
    page = client.get(f"/runs/adapt/{adaption.pk}/").content.decode()
    assert f"{card['measured_latency_ms']:.4g} ms measured on this server" in page and "MetaNAS" in page
    assert (
        model.latency["measured_ms"] == card["measured_latency_ms"] and model.latency["predicted_ms"] is None
    )
    download = client.get(f"/models/{model.pk}/torchscript")
    assert download.status_code == 200

    supernet = _wait(supernet, celery_worker_process, timeout=300)
    assert supernet.status == JobStatus.SUCCEEDED, supernet.error
    search = services.adaption_start(
        owner=user, supernet=supernet, device=cpu, constraint="params", budgets=[8000]
    )
    search = _wait(search, celery_worker_process, timeout=400)
    assert search.status == JobStatus.SUCCEEDED, search.error
    chart = client.get(f"/runs/adapt/{search.pk}.json").json()
    points = [b for b in chart["baselines"] if b["name"] == "MetaNAS"]
    assert len(points) == 1, chart["baselines"]
    (point,) = points
    assert point["costs"]["params"] == reference["params"]
    assert point["costs"]["latency_ms"] == reference["measured_latency_ms"]  # local CPU: same machine
    assert point["accuracy"]["mean"] == reference["accuracy"]["mean"]
    assert point["source"] == f"MetaNAS run #{metanas.pk}"


def _offered_runs(client) -> list[str]:
    """The values of the adaption form's meta-trained-run choices."""
    page = client.get("/runs/adapt/").content.decode()
    select = re.search(r'<select name="supernet".*?</select>', page, re.S).group(0)
    return re.findall(r'<option value="(\d+)"', select)


@pytest.mark.django_db
def test_metanas_is_a_method_of_the_forms_and_the_api():
    user = get_user_model().objects.create_user("chooser", password="pw-chooser-123")
    client = Client()
    client.force_login(user)
    page = client.get("/runs/train/").content.decode()
    assert '<option value="metanas">MetaNAS' in page

    response = client.post(
        "/runs/train/", {"method": "metanas", "dataset": "omniglot", "ways": 5, "shots": 1, "backbone": "vgg9",
                         "preset": "tiny"},
    )  # fmt: skip
    assert response.status_code == 302
    run = MetaTrainingRun.objects.get()
    assert run.method == Method.METANAS and run.backbone == "darts"
    assert run.spec == {"method": "metanas", "dataset": "omniglot", "ways": 5, "shots": 1, "preset": "tiny",
                        "queries": None, "meta_epochs": None, "seed": 0, "threads": run.spec["threads"]}  # fmt: skip

    api = APIClient()
    api.force_authenticate(user)
    created = api.post("/api/runs/train/", {"method": "metanas", "ways": 3, "preset": "cpu"}, format="json")
    assert created.status_code == 201, created.content
    assert created.json()["method"] == "metanas" and created.json()["backbone"] == "darts"
    bad = api.post("/api/runs/train/", {"method": "metanas", "preset": "huge"}, format="json")
    assert bad.status_code == 400 and MetaTrainingRun.objects.count() == 2

    # Only a finished MetaNAS run is offered to, and accepted by, an adaption request.
    device_services.seed_builtin_devices()
    board = device_services.board_register(owner=user, name="pi").device
    with pytest.raises(services.RunInputError, match="finished H-Meta-NAS super-net or MetaNAS"):
        services.adaption_start(owner=user, supernet=run, device=board, constraint="latency_ms", budgets=[5])
    assert _offered_runs(client) == []
    MetaTrainingRun.objects.filter(pk=run.pk).update(status=JobStatus.SUCCEEDED)
    assert _offered_runs(client) == [str(run.pk)]
    # A board without a latency table is fine for MetaNAS: its networks are measured end to end.
    run.refresh_from_db()
    adaption = services.adaption_start(
        owner=user, supernet=run, device=board, constraint="latency_ms", budgets=[5]
    )
    assert AdaptionRun.objects.get() == adaption
