"""A local-CPU profiling job keeps one speed-reference base for its whole life, resumes included."""

from __future__ import annotations

import pytest

from devices import services
from devices.models import Device, ProfilingJob
from tests.conftest import tiny_space

pytestmark = pytest.mark.django_db


def test_the_first_run_calibrates_and_stores_the_base_and_a_resumed_run_keeps_it():
    services.seed_builtin_devices()
    cpu = Device.objects.get(builtin_key="local-cpu")
    job = services.profiling_start(
        device=cpu, space=tiny_space(), repeats=3, warmup=1, threads=1, enqueue=False
    )
    assert job.reference_ms is None
    timer, metadata, _ = services._measure_fn_for(cpu, job)
    stored = ProfilingJob.objects.get(pk=job.pk).reference_ms
    assert stored is not None and stored > 0 and timer.base_ms() == stored
    assert metadata["speed_reference"]["base_ms"] == stored

    # The worker died; another one picks the job up: same unit, no new calibration.
    ProfilingJob.objects.filter(pk=job.pk).update(reference_ms=0.37)
    resumed, metadata, _ = services._measure_fn_for(cpu, ProfilingJob.objects.get(pk=job.pk))
    assert resumed.base_ms() == 0.37 and metadata["speed_reference"]["base_ms"] == 0.37
    spec = tiny_space().all_layer_specs()[0]
    stats = resumed.stats(spec)
    # The entry is the layer's ratio to the reference in the stored unit (one timing, so exact: CI
    # saw two separate timings of a layer differ 2.2x when the first one compiled the layer).
    assert resumed.entry_ms(stats) == pytest.approx(stats.relative * 0.37)


def test_simulated_devices_have_no_speed_reference():
    services.seed_builtin_devices()
    eyeriss = Device.objects.get(builtin_key="eyeriss")
    job = services.profiling_start(device=eyeriss, space=tiny_space(), enqueue=False)
    services._measure_fn_for(eyeriss, job)
    assert ProfilingJob.objects.get(pk=job.pk).reference_ms is None


def test_a_job_made_without_a_speed_reference_times_raw_medians():
    services.seed_builtin_devices()
    cpu = Device.objects.get(builtin_key="local-cpu")
    job = services.profiling_start(
        device=cpu, space=tiny_space(), repeats=3, warmup=1, threads=1, speed_reference=False, enqueue=False
    )
    timer, metadata, _ = services._measure_fn_for(cpu, job)
    assert timer.speed_reference is None and metadata["speed_reference"] is None
    assert ProfilingJob.objects.get(pk=job.pk).reference_ms is None  # nothing calibrated
    stats = timer.stats(tiny_space().all_layer_specs()[0])
    assert stats.relative is None and timer.entry_ms(stats) == pytest.approx(
        max(stats.median_ms, timer.min_ms)
    )
