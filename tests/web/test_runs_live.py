"""Meta-training and adaption through a real Celery worker: tiny presets, real Omniglot, live progress."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import pytest
from channels.layers import get_channel_layer
from django.contrib.auth import get_user_model
from django.test import Client

from devices import services as device_services
from devices.models import Device
from nasweb.core.models import JobStatus
from nasweb.runs import services
from nasweb.runs.models import AdaptedModel, AdaptionRun, MetaTrainingRun, Method
from tests.conftest import wait_until

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

CLASSIFY = r"""
import json, sys, torch
model = torch.jit.load(sys.argv[1])
x = torch.zeros(1, 1, 28, 28)
with torch.no_grad():
    logits = model(x)
print(json.dumps({"shape": list(logits.shape), "engine_imported": "engine" in sys.modules}))
"""


def _listen(group: str):
    """A channel subscribed to ``group`` and a function collecting what arrived."""
    layer = get_channel_layer()
    loop = asyncio.new_event_loop()
    channel = loop.run_until_complete(layer.new_channel("test."))
    loop.run_until_complete(layer.group_add(group, channel))

    def drain(timeout: float = 0.2) -> list[dict]:
        messages = []

        async def receive_all():
            while True:
                try:
                    messages.append(await asyncio.wait_for(layer.receive(channel), timeout=timeout))
                except TimeoutError:
                    return

        loop.run_until_complete(receive_all())
        return messages

    return drain


def _wait(run, worker, timeout: float):
    wait_until(
        lambda: type(run).objects.get(pk=run.pk).is_finished,
        timeout=timeout,
        message=f"{run} finished; worker log:\n{worker.log()[-4000:]}",
    )
    run.refresh_from_db()
    return run


def test_tiny_metatraining_then_adaption_through_a_worker(celery_worker_process, tmp_path):
    user = get_user_model().objects.create_user("trainer", password="pw-trainer-123")
    run = services.metatrain_start(owner=user, method=Method.HMETANAS, ways=5, shots=1, preset="tiny")
    events = _listen(f"job.metatrain.{run.pk}")
    run = _wait(run, celery_worker_process, timeout=300)
    assert run.status == JobStatus.SUCCEEDED, run.error
    assert run.summary["test"]["mean"] > 0.3  # 5-way chance is 0.2
    assert run.space and run.space["num_classes"] == 5
    assert len(run.history) >= 5 and {"loss", "accuracy"} <= set(run.history[-1])
    received = events(timeout=0.5)
    kinds = {m["payload"].get("kind") for m in received if m["type"] == "job.progress"}
    assert "meta_train" in kinds
    assert any(m["type"] == "job.status" and m["payload"]["status"] == "succeeded" for m in received)

    device_services.seed_builtin_devices()
    cpu = Device.objects.get(builtin_key="local-cpu")
    adaption = services.adaption_start(
        owner=user, supernet=run, device=cpu, constraint="params", budgets=[3000, 8000]
    )
    listen = _listen(adaption.group_name)
    adaption = _wait(adaption, celery_worker_process, timeout=400)
    assert adaption.status == JobStatus.SUCCEEDED, adaption.error
    assert adaption.request["search_workers"] == 2  # GA candidates scored in 2 forked processes
    # The super-net's fitness memo sits beside its checkpoint; random search already re-met
    # architectures the GA had scored on the same slices and took their losses from it.
    memo = Path(run.out_dir) / "fitness-memo.sqlite"
    assert adaption.request["fitness_memo"] == str(memo)
    with closing(sqlite3.connect(memo)) as connection:
        assert connection.execute("SELECT COUNT(*) FROM fitness").fetchone()[0] > 0
    assert adaption.result["memo_hits"] > 0
    generations = [
        m["payload"]
        for m in listen(timeout=0.5)
        if m["type"] == "job.progress" and m["payload"].get("kind") == "adapt"
    ]
    assert generations and generations[0]["population"]  # the chart's live points arrived
    assert adaption.history and adaption.result["outcomes"]
    # The stored generations and the result say what their fitness measures (tiny: the loss).
    assert {point["metric"] for point in adaption.history} == {"loss"} == {g["metric"] for g in generations}
    assert adaption.result["search_metric"] == "loss"
    models = list(AdaptedModel.objects.filter(run=adaption))
    assert len(models) == 2
    for model, budget in zip(models, [3000, 8000], strict=True):
        assert model.card["params"] <= budget
        out = subprocess.run(
            [sys.executable, "-c", CLASSIFY, model.torchscript], capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == {"shape": [1, 5], "engine_imported": False}

    # The page shows what the real cards hold: budgets in their unit, the end-to-end latency the
    # worker measured (this server is the device), accuracy in percent; no LUT for a params budget.
    client = Client()
    client.force_login(user)
    page = client.get(f"/runs/adapt/{adaption.pk}/").content.decode()
    assert "params ≤ 3,000, 8,000" in page
    assert f"{adaption.result['memo_hits']} from the fitness memo" in page
    for model in models:
        measured = model.card["latency_ms"]["measured_here"]["median_ms"]
        assert model.latency["measured_ms"] == measured > 0 and model.latency["predicted_ms"] is None
        assert f"{measured:.4g} ms measured on this server" in page
        assert f"{100 * model.card['accuracy']['mean']:.1f} ± " in page
    assert "latency-predicted" not in page and "reference speed" not in page  # no table, no reference

    # A latency budget: the CPU is profiled on demand, the card carries the LUT's prediction too.
    timed = services.adaption_start(
        owner=user, supernet=run, device=cpu, constraint="latency_ms", budgets=[1000]
    )
    timed = _wait(timed, celery_worker_process, timeout=400)
    assert timed.status == JobStatus.SUCCEEDED, timed.error
    model = AdaptedModel.objects.get(run=timed)
    latency = model.latency
    assert 0 < latency["predicted_ms"] <= 1000 and latency["measured_ms"] > 0
    assert latency["lut_device"] == model.card["latency_ms"]["lut_device"] is not None
    page = client.get(f"/runs/adapt/{timed.pk}/").content.decode()
    assert "latency_ms ≤ 1000 ms" in page
    assert f"{latency['predicted_ms']:.4g} ms predicted" in page
    assert f"{latency['measured_ms']:.4g} ms measured on this server" in page
    # The on-demand table was timed at a speed reference: the card restates the measurement in it.
    assert latency["measured_at_reference_ms"] > 0
    assert f"({latency['measured_at_reference_ms']:.4g} ms at the table's reference speed)" in page
    assert client.get(f"/runs/adapt/{timed.pk}.json").json()["models"][0]["latency"] == latency


def test_adaption_requests_are_validated(tmp_path):
    user = get_user_model().objects.create_user("validator", password="pw-validator-123")
    device_services.seed_builtin_devices()
    cpu = Device.objects.get(builtin_key="local-cpu")
    unfinished = MetaTrainingRun.objects.create(owner=user, preset="tiny", spec={}, ways=5)
    with pytest.raises(services.RunInputError, match="finished H-Meta-NAS super-net"):
        services.adaption_start(
            owner=user, supernet=unfinished, device=cpu, constraint="params", budgets=[1000]
        )
    MetaTrainingRun.objects.filter(pk=unfinished.pk).update(
        status=JobStatus.SUCCEEDED, space={"num_classes": 5}
    )
    unfinished.refresh_from_db()
    for budgets, message in [
        ([], "at least one budget"),
        ([0], "finite positive"),
        ([float("nan")], "finite positive"),
        ([-3], "finite positive"),
    ]:
        with pytest.raises(services.RunInputError, match=message):
            services.adaption_start(
                owner=user, supernet=unfinished, device=cpu, constraint="params", budgets=budgets
            )
    assert not AdaptionRun.objects.exists()


@pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="checks the error of a worker that has no GPU"
)
def test_a_gpu_training_run_on_a_worker_without_a_gpu_fails_with_a_clear_error(
    celery_worker_process, settings
):
    """NASWEB_TRAIN_DEVICE=cuda writes device "cuda" and the vmap strategy into the run's spec; a
    worker without a GPU then fails the run saying so, instead of training on the CPU unasked."""
    settings.NASWEB_TRAIN_DEVICE = "cuda"
    user = get_user_model().objects.create_user("gpu-trainer", password="pw-trainer-123")
    run = services.metatrain_start(owner=user, method=Method.HMETANAS, ways=5, shots=1, preset="tiny")
    assert run.spec["device"] == "cuda" and run.spec["strategy"] == "vmap"
    run = _wait(run, celery_worker_process, timeout=120)
    assert run.status == JobStatus.FAILED
    assert "no CUDA GPU" in run.error
