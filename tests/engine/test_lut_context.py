"""Layer latencies timed inside chains of layers (engine.latency.context), with real CPU timings."""

from __future__ import annotations

import math
import statistics
from collections import Counter

import pytest

from engine.latency.context import ChainTimer, covering_chains, refine_in_context, supports
from engine.latency.lut import LatencyTable, LatencyTableError, build_lut, keys_for
from engine.latency.measure import LayerTimer, MeasurementError, SpeedReference
from engine.progress import JobCancelled, ListProgress
from engine.seeding import make_rngs
from engine.space import SearchSpace
from tests.engine.test_lut import small_space


def _occurrences(space: SearchSpace, chains) -> Counter:
    return Counter(spec.key for arch in chains for spec in space.layer_specs(arch))


@pytest.mark.parametrize("repeats_per_key", [1, 3])
def test_covering_chains_put_every_key_in_enough_valid_chains(repeats_per_key):
    space = small_space()
    chains = covering_chains(space, repeats_per_key, make_rngs(0).numpy)
    for arch in chains:
        space.validate(arch)
        assert arch == arch.canonical()
    occurrences = _occurrences(space, chains)
    assert set(occurrences) == set(keys_for(space))
    assert min(occurrences.values()) >= repeats_per_key
    # Seeded: the same chains again; another seed breaks ties differently.
    assert covering_chains(space, repeats_per_key, make_rngs(0).numpy) == chains
    assert covering_chains(space, repeats_per_key, make_rngs(1).numpy) != chains


def test_the_vgg9_omniglot_space_is_covered_by_few_more_chains_than_its_deepest_keys_force():
    space = SearchSpace.vgg9(in_channels=1, image_size=28, num_classes=20, pool_size=5)
    chains = covering_chains(space, 1, make_rngs(0).numpy)
    occurrences = _occurrences(space, chains)
    assert len(occurrences) == len(keys_for(space)) == 2800
    # Each chain holds at most one of the 882 keys of layer 3 (7 x 7 channel pairs x 3 kernels x 6
    # activations), so 882 chains is the least any cover needs.
    assert 882 <= len(chains) <= 950


def test_residual_spaces_and_bad_settings_are_refused():
    resnet = SearchSpace.resnet12()
    assert supports(small_space()) and not supports(resnet)
    with pytest.raises(MeasurementError, match="chain backbones"):
        covering_chains(resnet, 1, make_rngs(0).numpy)
    with pytest.raises(MeasurementError, match="chain backbones"):
        ChainTimer(repeats=1).time_chains(resnet, [resnet.largest()])
    for bad in (0, -1, 1.5, True):
        with pytest.raises(MeasurementError, match="repeats_per_key"):
            covering_chains(small_space(), bad, make_rngs(0).numpy)
    with pytest.raises(MeasurementError, match="repeats"):
        ChainTimer(repeats=0)
    with pytest.raises(MeasurementError, match="warmup"):
        ChainTimer(warmup=-1)
    with pytest.raises(MeasurementError, match="reference_base_ms"):
        ChainTimer(reference_base_ms=float("nan"))


@pytest.mark.parametrize("with_reference", [False, True])
def test_every_layer_of_every_chain_is_timed_once_per_timed_call(with_reference):
    space = small_space()
    chains = covering_chains(space, 2, make_rngs(0).numpy)
    timer = ChainTimer(
        repeats=3, warmup=1, threads=1, speed_reference=SpeedReference(8) if with_reference else None
    )
    if with_reference:
        assert timer.reference_base_ms > 0  # calibrated when none is given
    samples = timer.time_chains(space, chains)
    occurrences = _occurrences(space, chains)
    assert {key: len(values) for key, values in samples.items()} == {
        key: 3 * count for key, count in occurrences.items()
    }
    assert all(math.isfinite(ms) and 0 < ms < 100 for values in samples.values() for ms in values)


def test_a_layer_doing_far_more_work_takes_longer_in_its_chain():
    """Real timings, not bookkeeping: in the same chain, a 144->144-channel 5x5 convolution with
    stride 2 at 14x14 (25 MMAC) against the 20-way head behind it (a pool and a 3,600 x 20 linear)."""
    space = SearchSpace.vgg9(in_channels=1, image_size=28, num_classes=20, pool_size=5)
    arch = space.largest().with_depth(2)
    samples = ChainTimer(repeats=7, warmup=2, threads=1).time_chains(space, [arch])
    conv, head = (spec.key for spec in space.layer_specs(arch)[1:])
    # Medians, not min against max: one preempted head sample (0.25 ms against a 0.135 ms median
    # in a CI run) must not fail a test about which layer does more work.
    assert statistics.median(samples[conv]) > 3 * statistics.median(samples[head])


def test_refine_replaces_every_entry_with_its_context_median_and_records_how():
    space = small_space()
    isolated_timer = LayerTimer(repeats=3, warmup=1, threads=1)
    table = build_lut(space, isolated_timer)
    isolated = dict(table.entries)
    events = ListProgress()
    summary = refine_in_context(
        space, table, ChainTimer(repeats=3, warmup=1, threads=1), make_rngs(0).numpy, progress=events
    )
    assert set(table.entries) == set(isolated)
    assert sum(table.entries[key] != isolated[key] for key in isolated) >= len(isolated) - 1
    assert all(ms > 0 and math.isfinite(ms) for ms in table.entries.values())
    assert table.metadata["context"] == summary
    assert summary["repeats_per_key"] == 2 and summary["repeats"] == 3
    assert summary["chains"] == len(covering_chains(space, 2, make_rngs(0).numpy))
    assert summary["layer_calls"] >= 3 * 2 * len(isolated)
    assert summary["median_ratio_to_isolated"] > 0 and summary["build_s"] > 0
    context_events = [e for e in events.events if e.get("phase") == "context"]
    assert (
        context_events and context_events[-1]["current"] == context_events[-1]["total"] == summary["chains"]
    )
    # Still a sum of its layers.
    arch = space.largest()
    assert table.predict(space, arch) == pytest.approx(
        sum(table.entries[spec.key] for spec in space.layer_specs(arch))
    )


def test_refine_needs_a_complete_table_and_stops_when_cancelled():
    space = small_space()
    partial = LatencyTable(device="cpu", entries={keys_for(space)[0]: 0.01})
    with pytest.raises(LatencyTableError, match="complete table"):
        refine_in_context(space, partial, ChainTimer(repeats=1), make_rngs(0).numpy)
    assert partial.entries == {keys_for(space)[0]: 0.01} and "context" not in partial.metadata

    table = LatencyTable(device="cpu", entries=dict.fromkeys(keys_for(space), 0.01))

    def cancel(event):
        raise JobCancelled("stop")

    with pytest.raises(JobCancelled):
        refine_in_context(space, table, ChainTimer(repeats=1, warmup=0), make_rngs(0).numpy, progress=cancel)
    assert set(table.entries.values()) == {0.01} and "context" not in table.metadata


def test_each_keys_scripted_copy_computes_its_layer_and_a_chain_never_reuses_a_weight():
    """The copies of one compiled structure must not bake in another layer's sizes (heads at every
    exit resolution, convolutions at every input size); the layers of one chain must have weights
    of their own (shared weights would be in cache when a network's are not)."""
    import torch

    space = SearchSpace.vgg9(in_channels=1, image_size=28, num_classes=20, pool_size=5)
    specs = space.all_layer_specs()
    sample = specs[::97] + [spec for spec in specs if spec.op == "head"]
    timer = ChainTimer(repeats=1)
    with torch.inference_mode():
        modules = {spec.key: timer._module(spec) for spec in sample}
        for spec in sample:
            eager = spec.build_module()
            eager.load_state_dict(modules[spec.key].state_dict())
            example = spec.example_input()
            assert torch.allclose(modules[spec.key](example), eager(example)), spec.key
        for arch in covering_chains(space, 1, make_rngs(0).numpy)[:50]:
            pointers = [
                tensor.data_ptr()
                for spec in space.layer_specs(arch)
                for tensor in timer._module(spec).state_dict().values()
            ]
            assert len(set(pointers)) == len(pointers)
