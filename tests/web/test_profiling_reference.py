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


def _isolated_table(space):
    from engine.latency.lut import LatencyTable

    return LatencyTable(device="test", entries=dict.fromkeys((s.key for s in space.all_layer_specs()), 0.01))


def test_the_local_cpu_times_its_layers_again_in_context_unless_the_job_says_0():
    from engine.progress import ListProgress

    services.seed_builtin_devices()
    cpu = Device.objects.get(builtin_key="local-cpu")
    for repeats_per_key in (2, 0):
        job = services.profiling_start(
            device=cpu, space=tiny_space(), repeats=3, warmup=1, threads=1,
            context_repeats=repeats_per_key, enqueue=False,
        )  # fmt: skip
        services._measure_fn_for(cpu, job)  # calibrates the job's reference, as a worker does first
        job.refresh_from_db()
        table, events = _isolated_table(tiny_space()), ListProgress()
        services._refine_in_context(job, tiny_space(), table, events)
        if repeats_per_key:
            assert table.metadata["context"]["repeats_per_key"] == 2
            assert table.metadata["context"]["repeats"] == 3
            assert all(ms != 0.01 for ms in table.entries.values())
            assert events.events[-1]["phase"] == "context"
        else:
            assert "context" not in table.metadata and set(table.entries.values()) == {0.01}
            assert not events.events


def test_simulated_devices_and_residual_spaces_keep_their_isolated_entries():
    import dataclasses

    from engine.space import SearchSpace

    services.seed_builtin_devices()
    eyeriss = Device.objects.get(builtin_key="eyeriss")
    job = services.profiling_start(device=eyeriss, space=tiny_space(), enqueue=False)
    table = _isolated_table(tiny_space())
    services._refine_in_context(job, tiny_space(), table, lambda event: None)
    assert "context" not in table.metadata

    cpu = Device.objects.get(builtin_key="local-cpu")
    resnet = dataclasses.replace(SearchSpace.resnet12(), kernels=(1,), widths=(0.5,), activations=("relu",))
    job = services.profiling_start(device=cpu, space=resnet, repeats=1, warmup=0, threads=1, enqueue=False)
    table = _isolated_table(resnet)
    services._refine_in_context(job, resnet, table, lambda event: None)
    assert "context" not in table.metadata and set(table.entries.values()) == {0.01}


def test_the_job_keeps_whichever_table_is_closer_to_the_sub_nets_it_timed_whole():
    """On one machine the in-context entries were better, on another the isolated ones: both are
    fitted on the same sub-nets and the one with the lower MAPE over every measured sub-net stays."""
    from engine.latency.lut import LatencyTable
    from engine.seeding import make_rngs

    space = tiny_space()
    rng = make_rngs(0).numpy
    archs = [space.sample(rng) for _ in range(8)]
    truth = {spec.key: 0.01 + 1e-7 * spec.macs() for spec in space.all_layer_specs()}

    def table_with(entries):
        return LatencyTable(device="test", entries=dict(entries), metadata={"context": {"chains": 3}})

    measured = [("fit" if i < 5 else "check", arch, sum(truth[s.key] for s in space.layer_specs(arch)))
                for i, arch in enumerate(archs)]  # fmt: skip
    skewed = {key: ms * (3.0 if key.startswith("head") else 1.0) for key, ms in truth.items()}
    for in_context, isolated, kept in ((truth, skewed, "in_context"), (skewed, truth, "isolated")):
        a, b = table_with(in_context), table_with(isolated)
        b.metadata.pop("context")  # the isolated copy is taken before the context phase
        services._fit_and_check(space, a, measured)
        services._fit_and_check(space, b, measured)
        chosen = services._keep_better(space, a, b, measured)
        assert chosen is (a if kept == "in_context" else b)
        choice = chosen.metadata["context"]["choice"]
        assert choice["kept"] == kept and choice["networks"] == 8
        assert (
            choice[kept]["mape"] < 1e-6 < choice["isolated" if kept == "in_context" else "in_context"]["mape"]
        )
        assert chosen.metadata["context"]["chains"] == 3  # the context summary goes with either
