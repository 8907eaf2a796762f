"""TorchScript timing of layers and networks: robust statistics, threads, compiled-module reuse."""

from __future__ import annotations

import pytest
import torch

from engine.latency.measure import (
    ArchTimer,
    LayerTimer,
    MeasurementError,
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
    reference = measure_layer(spec, repeats=15, warmup=3, threads=1).median_ms
    timer = LayerTimer(repeats=15, warmup=3, threads=1)
    timer(
        next(
            s
            for s in space.all_layer_specs()
            if s.in_size == 14 and s.kernel == 5 and s.activation == spec.activation
        )
    )
    assert 0.5 * reference < timer(spec) < 2.0 * reference


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
