"""A resumed adaption runs the request its saved state is of, not one rebuilt from today's database.

Seen in CI: a MAML++ baseline of the same task finished between the first attempt (killed) and the
second; the rebuilt request listed its checkpoint, the saved state refused it as "a different
adaption request" and the run failed instead of resuming.
"""

from __future__ import annotations

import pytest
from django.conf import settings
from django.contrib.auth import get_user_model

from devices import services as device_services
from devices.models import Device, LatencyTableRecord, ProfilingJob
from engine.adaption import AdaptionRequest
from engine.latency.lut import LatencyTable
from engine.meta.train import CHECKPOINT_NAME
from nasweb.core.models import JobStatus
from nasweb.runs import services
from nasweb.runs.models import AdaptionRun, MetaTrainingRun, Method
from tests.conftest import tiny_space

pytestmark = pytest.mark.django_db


@pytest.fixture
def adaption(tmp_path):
    owner = get_user_model().objects.create_user("resumer", password="pw-resumer-123")
    device_services.seed_builtin_devices()
    supernet = MetaTrainingRun.objects.create(
        owner=owner, method=Method.HMETANAS, ways=5, preset="tiny", spec={}, status=JobStatus.SUCCEEDED,
        space={"num_classes": 5, "in_channels": 1, "image_size": 28}, out_dir=str(tmp_path / "supernet"),
    )  # fmt: skip
    run = AdaptionRun.objects.create(
        owner=owner, supernet=supernet, device=Device.objects.get(builtin_key="eyeriss"),
        constraint="params", budgets=[3000.0, 5000.0], status=JobStatus.RUNNING, out_dir=str(tmp_path / "run"),
    )  # fmt: skip
    return run


def _finished_baseline(run: AdaptionRun, folder) -> str:
    """A MAML++ baseline of the run's task, visible to its owner, with its checkpoint on disk."""
    MetaTrainingRun.objects.create(
        owner=run.owner, method=Method.MAMLPP, ways=run.supernet.ways, preset="tiny", spec={},
        status=JobStatus.SUCCEEDED, out_dir=str(folder),
    )  # fmt: skip
    folder.mkdir(parents=True)
    (folder / CHECKPOINT_NAME).write_bytes(b"checkpoint")
    return str(folder / CHECKPOINT_NAME)


def test_a_new_attempt_builds_the_request_from_the_database(adaption, tmp_path):
    checkpoint = _finished_baseline(adaption, tmp_path / "baseline")
    request = services._adaption_request(adaption, tmp_path / "run" / "state.json", progress=None)
    assert request.baseline_checkpoints == (checkpoint,)  # the measured reference point is included
    assert request.budgets == (3000.0, 5000.0) and request.lut is None
    assert request.patience == 0  # the run's own: every generation
    AdaptionRun.objects.filter(pk=adaption.pk).update(patience=9)
    adaption.refresh_from_db()
    assert services._adaption_request(adaption, tmp_path / "run" / "state.json", progress=None).patience == 9
    # Blank search metric and deepen mode: the preset's (None in the request); else the user's.
    assert (request.search_metric, request.deepen, request.search_precision) == (None, None, None)
    assert request.depth_elites is None and request.preset_values.depth_elites == 0
    assert request.search_metric_value == "loss"  # the tiny preset's
    assert request.search_precision_value == "float32"
    AdaptionRun.objects.filter(pk=adaption.pk).update(
        search_metric="accuracy", deepen="copy-last", search_precision="bfloat16", depth_elites=3
    )
    adaption.refresh_from_db()
    chosen = services._adaption_request(adaption, tmp_path / "run" / "state.json", progress=None)
    assert (chosen.search_metric, chosen.deepen, chosen.search_metric_value) == (
        "accuracy",
        "copy-last",
        "accuracy",
    )
    assert chosen.search_precision == "bfloat16"
    assert chosen.depth_elites == 3
    # Losses are kept beside the super-net's checkpoint for its later adaptions.
    assert request.fitness_memo == str(tmp_path / "supernet" / "fitness-memo.sqlite")


def test_the_fitness_memo_can_be_switched_off(adaption, tmp_path, settings):
    settings.NASWEB_FITNESS_MEMO = False
    assert (
        services._adaption_request(adaption, tmp_path / "run" / "state.json", progress=None).fitness_memo
        is None
    )


def test_a_resumed_attempt_keeps_the_saved_request_and_takes_only_how_to_run_it(adaption, tmp_path):
    first = services._adaption_request(adaption, tmp_path / "run" / "state.json", progress=None)
    stored = {**first.to_dict(), "threads": 7, "search_workers": 5}  # another worker's machine
    del stored["fitness_memo"]  # as saved before the memo existed
    AdaptionRun.objects.filter(pk=adaption.pk).update(request=stored)
    adaption.refresh_from_db()
    state = tmp_path / "run" / "state.json"
    state.parent.mkdir(parents=True)
    state.write_text("{}")
    _finished_baseline(adaption, tmp_path / "baseline")  # finished while the first worker was dead

    resumed = services._adaption_request(adaption, state, progress=None)
    assert resumed.identity() == AdaptionRequest.from_dict(stored).identity()
    assert resumed.baseline_checkpoints == ()  # not the baseline that appeared in between
    assert resumed.fitness_memo == first.fitness_memo  # a request saved before the memo gets it too
    assert (resumed.threads, resumed.search_workers) == (
        settings.NASWEB_TORCH_THREADS,
        settings.NASWEB_SEARCH_WORKERS,
    )


def test_a_gpu_worker_asks_for_the_gpu_and_a_resumed_attempt_keeps_the_first_ones_device(
    adaption, tmp_path, settings
):
    settings.NASWEB_ADAPT_DEVICE = "cuda"  # the `settings` fixture restores it afterwards
    on_gpu = services._adaption_request(adaption, tmp_path / "run" / "state.json", progress=None)
    assert (on_gpu.device, on_gpu.search_workers) == ("cuda", 1)
    AdaptionRun.objects.filter(pk=adaption.pk).update(request=on_gpu.to_dict())
    adaption.refresh_from_db()
    state = tmp_path / "run" / "state.json"
    state.parent.mkdir(parents=True)
    state.write_text("{}")
    settings.NASWEB_ADAPT_DEVICE = "cpu"  # resumed by a worker without a GPU: same request
    resumed = services._adaption_request(adaption, state, progress=None)
    assert resumed.identity() == on_gpu.identity() and resumed.search_workers == 1


def test_a_size_budget_uses_the_devices_existing_table_for_predicted_latency_but_never_profiles(
    adaption, tmp_path
):
    """Under a params budget the cards still show the device's predicted latency when it has a table."""
    space = tiny_space()
    MetaTrainingRun.objects.filter(pk=adaption.supernet_id).update(space=space.to_dict())
    adaption.refresh_from_db()
    request = services._adaption_request(adaption, tmp_path / "run" / "state.json", progress=None)
    assert request.lut is None  # Eyeriss has no table for this space: nothing is simulated for it
    assert not ProfilingJob.objects.exists()

    space_dict = space.to_dict()
    entries = {spec.key: 0.25 for spec in space.all_layer_specs()}
    table = LatencyTable(device=adaption.device.name, entries=entries, metadata={"search_space": space_dict})
    LatencyTableRecord.objects.create(
        device=adaption.device, space=space_dict, space_key=device_services.space_key(space_dict),
        table=table.to_dict(), entries_count=len(entries),
    )  # fmt: skip
    (tmp_path / "run").mkdir(parents=True)
    request = services._adaption_request(adaption, tmp_path / "run" / "state.json", progress=None)
    assert request.constraint == "params" and request.lut is not None
    assert LatencyTable.load(request.lut).entries == entries
