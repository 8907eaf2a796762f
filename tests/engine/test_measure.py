"""TorchScript timing of layers and networks: robust statistics, threads, compiled-module reuse."""

from __future__ import annotations

import time

import pytest
import torch

from engine.latency.measure import (
    ArchTimer,
    LayerTimer,
    MeasurementError,
    SpeedReference,
    measure_call_overhead,
    measure_layer,
    measure_module,
    robust_stats,
    sequential_network,
    time_callable,
    torch_threads,
)
from engine.space import SearchSpace


def test_robust_stats_drops_outliers_and_reports_spread():
    samples = [1_000_000, 1_020_000, 980_000, 1_010_000, 990_000, 40_000_000]
    stats = robust_stats(samples)
    assert stats.samples == 6 and stats.kept == 5
    assert stats.median_ms == pytest.approx(1.0)
    assert stats.max_ms == pytest.approx(40.0)
    assert 0 < stats.spread < 0.05
    assert robust_stats([2_000_000] * 4).kept == 4
    with pytest.raises(MeasurementError, match="no timing samples"):
        robust_stats([])


def test_time_callable_counts_calls_and_validates():
    calls = []
    stats = time_callable(lambda: calls.append(1), repeats=7, warmup=3)
    assert len(calls) == 10 and stats.samples == 7
    with pytest.raises(MeasurementError, match="repeats"):
        time_callable(lambda: None, repeats=0, warmup=1)
    with pytest.raises(MeasurementError, match="warmup"):
        time_callable(lambda: None, repeats=1, warmup=-1)


def test_torch_threads_sets_and_restores():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(MeasurementError, match="threads"):
        with torch_threads(0):
            pass


def test_measure_module_times_scripted_network_and_bigger_is_slower():
    small = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU())
    big = torch.nn.Sequential(torch.nn.Conv2d(1, 64, 5, padding=2), torch.nn.Conv2d(64, 64, 5, padding=2))
    fast = measure_module(small, (1, 1, 16, 16), repeats=15, warmup=3, threads=1)
    slow = measure_module(big, (1, 1, 16, 16), repeats=15, warmup=3, threads=1)
    assert 0 < fast.median_ms < slow.median_ms
    assert measure_call_overhead(repeats=20, warmup=5, threads=1).median_ms > 0
    with pytest.raises(MeasurementError, match="input_shape"):
        measure_module(small, (1, 0, 4, 4), repeats=1, warmup=0)


def test_layer_timer_reuses_one_compiled_module_per_structure():
    space = SearchSpace.vgg9(image_size=16, num_classes=5)
    specs = [s for s in space.all_layer_specs() if s.activation in ("relu", "elu") and s.kernel == 3][:40]
    specs += [s for s in space.all_layer_specs() if s.op == "head"][:5]
    structures = {(s.op, s.kernel, s.stride, s.activation, s.pool_size) for s in specs}
    timer = LayerTimer(repeats=3, warmup=1, threads=1)
    for spec in specs:
        assert timer(spec) > 0
    assert timer.fresh_compiles == len(structures)
    meta = timer.metadata()
    assert meta["runtime"] == "torchscript" and meta["threads"] == 1 and meta["batch_size"] == 1


def test_layer_timer_matches_reference_measurement_order_of_magnitude():
    space = SearchSpace.vgg9()
    spec = next(
        s for s in space.all_layer_specs() if s.in_size == 14 and s.in_channels == 144 and s.kernel == 5
    )
    timer = LayerTimer(repeats=15, warmup=3, threads=1)
    timer(
        next(
            s
            for s in space.all_layer_specs()
            if s.in_size == 14 and s.kernel == 5 and s.activation == spec.activation
        )
    )
    # Two separate timings on a VM whose CPU changes speed in phases of seconds (docs/PROFILING.md)
    # can land in different phases; a timer that is really off fails all three tries.
    ratios = []
    for _ in range(3):
        reference = measure_layer(spec, repeats=15, warmup=3, threads=1).median_ms
        ratios.append(timer(spec) / reference)
        if 0.5 < ratios[-1] < 2.0:
            return
    raise AssertionError(f"LayerTimer / measure_layer ratios {ratios} are all outside 0.5-2")


def test_batch_size_is_honoured():
    spec = SearchSpace.vgg9().all_layer_specs()[0]
    one = measure_layer(spec, batch_size=1, repeats=5, warmup=1, threads=1)
    assert one.median_ms > 0
    with pytest.raises(MeasurementError, match="batch_size"):
        LayerTimer(batch_size=0)


def test_sequential_network_and_arch_timer():
    space = SearchSpace.vgg9(image_size=16, num_classes=5)
    arch = space.largest()
    net = sequential_network(space, arch)
    assert net(torch.zeros(2, 1, 16, 16)).shape == (2, 5)
    assert ArchTimer(space, repeats=3, warmup=1, threads=1)(arch) > 0
    with pytest.raises(MeasurementError, match="extract_subnet"):
        sequential_network(SearchSpace.resnet12(), SearchSpace.resnet12().largest())


def _busy_wait(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_a_speed_reference_cancels_a_change_of_the_machines_speed_mid_measurement():
    """Busy-wait callables on a machine that "slows down" 3x halfway: the raw median is thrown off,
    the ratio to the reference timed just before each call is not."""
    state = {"calls": 0, "unit": 0.0002}

    def reference() -> None:
        _busy_wait(state["unit"])

    def work() -> None:
        state["calls"] += 1
        if state["calls"] == 12:  # call 1 warms up; 10 timed calls run fast, the other 11 slow
            state["unit"] = 0.0006
        _busy_wait(2 * state["unit"])

    stats = time_callable(work, repeats=21, warmup=1, reference=reference)
    assert stats.relative == pytest.approx(2.0, rel=0.15)
    assert stats.at_reference(0.2) == pytest.approx(0.4, rel=0.15)  # the fast phase's speed
    assert 0.15 <= stats.reference_ms <= 0.65 and stats.median_ms > 0.7  # raw: the slow phase, 1.2 ms
    plain = time_callable(lambda: None, repeats=3, warmup=0)
    assert plain.relative is None and plain.reference_ms is None
    with pytest.raises(MeasurementError, match="without a speed reference"):
        plain.at_reference(0.1)


def test_speed_reference_timers_record_their_base_and_refuse_a_gpu():
    space = SearchSpace.vgg9(image_size=16, num_classes=5)
    spec = space.all_layer_specs()[0]
    reference = SpeedReference()
    timer = LayerTimer(repeats=5, warmup=1, threads=1, speed_reference=reference)
    entry = timer(spec)
    base = timer.base_ms()
    assert entry > 0 and 0.005 < base < 50  # calibrated on first use: a ~0.1 ms convolution
    assert timer.metadata()["speed_reference"] == {"workload": reference.description, "base_ms": base}
    resumed = LayerTimer(repeats=5, warmup=1, threads=1, speed_reference=reference, reference_base_ms=0.5)
    assert resumed.base_ms() == 0.5  # a resumed build keeps its first part's unit, no new calibration
    # A network timed at the same base: its figure is the ratio to the reference times that base.
    arch_timer = ArchTimer(
        space, repeats=5, warmup=1, threads=1, speed_reference=reference, reference_base_ms=0.5
    )
    arch = space.largest()
    stats = arch_timer.stats(arch)
    assert stats.relative > 0 and arch_timer.figure_ms(stats) == pytest.approx(stats.relative * 0.5)
    assert LayerTimer(repeats=5, warmup=1).metadata()["speed_reference"] is None
    with pytest.raises(MeasurementError, match="GPU"):
        LayerTimer(device="cuda", speed_reference=reference)
    with pytest.raises(MeasurementError, match="reference_base_ms"):
        ArchTimer(space, speed_reference=reference, reference_base_ms=float("nan"))
    with pytest.raises(MeasurementError, match="no speed reference"):
        LayerTimer().base_ms()


def test_the_call_overhead_subtracted_from_entries_is_in_their_unit():
    """With a speed reference the entries are at the reference speed; so is the overhead."""
    raw = LayerTimer(repeats=5, warmup=1, threads=1, subtract_call_overhead=True)
    # A base of 1000 ms per reference call: the empty call (a small fraction of a 0.1 ms
    # convolution) becomes tens of ms in that unit, while raw it is a few microseconds.
    scaled = LayerTimer(
        repeats=5,
        warmup=1,
        threads=1,
        subtract_call_overhead=True,
        speed_reference=SpeedReference(),
        reference_base_ms=1000.0,
    )
    assert 0 < raw.call_overhead_ms() < 1 < scaled.call_overhead_ms() < 1000
