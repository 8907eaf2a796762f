"""Latency lookup tables on a small real search space with real CPU measurements."""

from __future__ import annotations

import json
import math

import pytest

from engine.latency.lut import (
    LatencyTable,
    LatencyTableError,
    MissingLatencyEntry,
    accuracy_report,
    build_lut,
    error_metrics,
    fit_overhead,
    keys_for,
)
from engine.latency.measure import ArchTimer, LayerTimer
from engine.progress import JobCancelled, ListProgress
from engine.seeding import make_rngs
from engine.space import Arch, SearchSpace


def small_space() -> SearchSpace:
    return SearchSpace(
        backbone="vgg9",
        in_channels=1,
        image_size=8,
        num_classes=3,
        pool_size=2,
        kernels=(1, 3),
        widths=(0.25, 0.5),
        activations=("relu", "sigmoid"),
        base_channels=(8,) * 4,
        strides=(2,) * 4,
    )


@pytest.fixture(scope="module")
def measured_table() -> LatencyTable:
    timer = LayerTimer(repeats=5, warmup=2, threads=1)
    return build_lut(small_space(), timer, metadata=timer.metadata())


class CountingMeasure:
    """A deterministic measure_fn: a latency derived from the layer's MACs."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, spec) -> float:
        self.calls.append(spec.key)
        return 0.001 + spec.macs() * 1e-6


def test_real_build_covers_every_key_with_positive_finite_ms(measured_table):
    space = small_space()
    keys = keys_for(space)
    assert len(keys) == len(set(keys)) > 10
    assert set(measured_table.entries) == set(keys)
    assert all(math.isfinite(ms) and ms > 0 for ms in measured_table.entries.values())
    assert measured_table.missing(space) == []
    assert measured_table.metadata["runtime"] == "torchscript"
    assert measured_table.metadata["threads"] == 1
    assert measured_table.metadata["search_space"] == space.to_dict()


def test_prediction_is_overhead_plus_sum_of_entries(measured_table):
    space = small_space()
    rngs = make_rngs(3)
    table = LatencyTable(
        "cpu", dict(measured_table.entries), overhead_ms=0.0125, metadata=dict(measured_table.metadata)
    )
    for _ in range(20):
        arch = space.sample(rngs.numpy)
        expected = 0.0125 + sum(table.entries[spec.key] for spec in space.layer_specs(arch))
        assert table.predict(space, arch) == pytest.approx(expected, rel=1e-12)
        assert table.predict(None, arch) == pytest.approx(expected, rel=1e-12)  # space from metadata


def test_missing_entry_error_names_the_key():
    space = small_space()
    table = build_lut(space, CountingMeasure())
    arch = space.largest()
    gone = space.layer_specs(arch)[1].key
    del table.entries[gone]
    with pytest.raises(MissingLatencyEntry) as caught:
        table.predict(space, arch)
    assert isinstance(caught.value, KeyError)
    assert gone in str(caught.value) and "cpu" in str(caught.value)
    assert table.missing(space) == [gone]


def test_build_is_resumable_after_cancellation(tmp_path):
    space = small_space()
    checkpoint = tmp_path / "lut.json"
    total = len(keys_for(space))

    def cancel_after_ten(event):
        if event["current"] == 10:
            raise JobCancelled

    with pytest.raises(JobCancelled):
        build_lut(space, CountingMeasure(), cancel_after_ten, checkpoint=checkpoint, checkpoint_every=4)
    partial = LatencyTable.load(checkpoint)
    assert len(partial) == 10
    measure = CountingMeasure()
    progress = ListProgress()
    table = build_lut(space, measure, progress, existing=partial, checkpoint=checkpoint)
    assert len(measure.calls) == total - 10
    assert not set(measure.calls) & set(partial.entries.keys() - set(measure.calls))
    events = progress.of_kind("profile")
    assert [e["current"] for e in events] == list(range(1, total - 9))
    assert all(e["total"] == total - 10 for e in events)
    assert LatencyTable.load(checkpoint).entries == table.entries
    assert len(table) == total


def test_save_load_roundtrip_and_rejects_bad_files(tmp_path):
    space = small_space()
    table = build_lut(space, CountingMeasure(), device="eyeriss", metadata={"repeats": 3})
    table.overhead_ms = 0.5
    table.accuracy = {"n": 1, "within_10pct": 1.0}
    path = table.save(tmp_path / "t.json")
    loaded = LatencyTable.load(path)
    assert loaded == table
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(LatencyTableError, match="not JSON"):
        LatencyTable.load(tmp_path / "bad.json")
    data = json.loads(path.read_text())
    data["entries"]["x"] = -1
    with pytest.raises(LatencyTableError, match="'x'"):
        LatencyTable.from_dict(data)
    with pytest.raises(LatencyTableError, match="format"):
        LatencyTable.from_dict({"device": "cpu"})


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0, -1.0, True, "1"])
def test_build_rejects_invalid_measurements(bad):
    with pytest.raises(LatencyTableError, match="measure_fn returned"):
        build_lut(small_space(), lambda spec: bad)


def _archs_with_depth(space, count, seed=0):
    """Random archs of ``space`` grouped by how many LayerSpecs (layers + head) they have."""
    rngs = make_rngs(seed)
    by_depth: dict[int, list[Arch]] = {}
    while sum(len(v) for v in by_depth.values()) < count * 4:
        arch = space.sample(rngs.numpy)
        by_depth.setdefault(len(space.layer_specs(arch)), []).append(arch)
    return by_depth


def test_fit_overhead_is_median_residual_when_all_networks_have_one_depth():
    space = small_space()
    table = build_lut(space, CountingMeasure())
    depth, archs = max(_archs_with_depth(space, 5).items(), key=lambda item: len(item[1]))
    archs = archs[:5]
    assert len(archs) == 5
    sums = [table.predict(space, arch) for arch in archs]
    residuals = [0.1, 0.2, 0.3, 0.4, 5.0]
    overhead = fit_overhead(
        space, table, [(a, s + r) for a, s, r in zip(archs, sums, residuals, strict=True)]
    )
    assert overhead == pytest.approx(0.3)
    assert table.per_layer_ms == 0.0
    assert table.predict(space, archs[0]) == pytest.approx(sums[0] + 0.3)


def test_fit_overhead_recovers_a_per_network_and_a_per_layer_term_despite_an_outlier():
    space = small_space()
    table = build_lut(space, CountingMeasure())
    by_depth = _archs_with_depth(space, 6)
    assert len(by_depth) >= 3, by_depth.keys()
    archs = [arch for group in by_depth.values() for arch in group[:3]]
    sums = [table.predict(space, arch) for arch in archs]
    measured = [s + 0.05 - 0.0005 * len(space.layer_specs(a)) for a, s in zip(archs, sums, strict=True)]
    measured[0] += 10.0  # one timing disturbed by another process
    fit_overhead(space, table, list(zip(archs, measured, strict=True)))
    assert table.overhead_ms == pytest.approx(0.05)
    assert table.per_layer_ms == pytest.approx(-0.0005)
    for arch, ms in zip(archs[1:], measured[1:], strict=True):
        assert table.predict(space, arch) == pytest.approx(ms)
    restored = LatencyTable.from_dict(json.loads(json.dumps(table.to_dict())))
    assert restored.per_layer_ms == table.per_layer_ms
    assert restored.predict(space, archs[1]) == pytest.approx(table.predict(space, archs[1]))


def test_a_copy_keeps_everything_and_shares_nothing():
    table = LatencyTable(
        device="cpu", entries={"a": 0.5, "b": 0.25}, overhead_ms=0.1, per_layer_ms=-0.01,
        metadata={"speed_reference": {"base_ms": 0.2}}, accuracy={"mape": 3.0},
    )  # fmt: skip
    copied = table.copy()
    assert copied.to_dict() == table.to_dict()
    copied.set("a", 0.75)
    copied.metadata["speed_reference"]["base_ms"] = 0.3
    copied.accuracy["mape"] = 9.0
    assert table.entries["a"] == 0.5
    assert table.metadata["speed_reference"]["base_ms"] == 0.2 and table.accuracy["mape"] == 3.0


def test_fit_overhead_never_predicts_a_network_at_or_below_zero():
    # CI: entries timed alone each carry a call cost; fitted on deep networks as one constant, the
    # overhead came out negative and a depth-1 network was predicted at -0.036 ms.
    space = small_space()
    table = build_lut(space, CountingMeasure())
    by_depth = _archs_with_depth(space, 6)
    deepest = max(by_depth)
    archs = by_depth[deepest][:5]
    measured = [0.2 * table.predict(space, arch) for arch in archs]  # far below the layer sum
    overhead = fit_overhead(space, table, list(zip(archs, measured, strict=True)))
    assert overhead == 0.0
    assert table.per_layer_ms < 0
    rngs = make_rngs(3)
    for _ in range(200):
        assert table.predict(space, space.sample(rngs.numpy)) > 0


def test_error_metrics():
    metrics = error_metrics([1.05, 2.0, 3.6], [1.0, 2.0, 3.0])
    assert metrics["within_10pct"] == pytest.approx(2 / 3)
    assert metrics["mape"] == pytest.approx(100 * (0.05 + 0 + 0.2) / 3)
    assert metrics["mse"] == pytest.approx((0.05**2 + 0 + 0.6**2) / 3)


def test_accuracy_report_against_real_end_to_end_timings(measured_table):
    space = small_space()
    progress = ListProgress()
    timer = ArchTimer(space, repeats=10, warmup=3, threads=1)
    report = accuracy_report(space, measured_table, timer, 4, make_rngs(1), progress)
    assert report["n"] == 4 and len(report["samples"]) == 4
    assert 0.0 <= report["within_10pct"] <= 1.0 and report["mape"] >= 0 and report["mse"] >= 0
    for sample in report["samples"]:
        assert sample["measured_ms"] > 0
        arch = Arch.from_dict(sample["arch"])
        assert sample["predicted_ms"] == measured_table.predict(space, arch)
    assert [e["current"] for e in progress.of_kind("accuracy")] == [1, 2, 3, 4]
    json.dumps(report)  # storable with the LUT


def test_accuracy_report_metrics_from_known_errors():
    space = small_space()
    table = build_lut(space, CountingMeasure())
    report = accuracy_report(space, table, lambda arch: table.predict(space, arch) / 1.05, 10, make_rngs(2))
    assert report["within_10pct"] == 1.0
    assert report["mape"] == pytest.approx(5.0)
    with pytest.raises(LatencyTableError, match="finite positive"):
        accuracy_report(space, table, lambda arch: float("nan"), 1, make_rngs(2))
