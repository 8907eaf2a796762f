"""The Eyeriss closed form equals scalesim's compute model and its full simulation."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch

from engine.latency import eyeriss
from engine.latency.eyeriss import (
    ConvDims,
    EyerissConfig,
    EyerissConfigError,
    EyerissSimulator,
    ScalesimError,
    compute_model_cycles,
    conv_dims,
    full_simulation,
    layer_dims,
    systolic_cycles,
)

# Small layers: odd sizes, stride 2 with a remainder, 1x1 and 5x5 kernels, more filters than
# columns, a GEMM-shaped classifier head (1x1 ifmap, many channels).
SMALL_LAYERS = [
    conv_dims(6, 2, 4, 3, 1),
    conv_dims(7, 3, 20, 3, 2),
    conv_dims(9, 1, 5, 5, 2),
    conv_dims(5, 4, 16, 1, 2),
    conv_dims(8, 8, 15, 3, 1),
    ConvDims(1, 1, 1, 1, 50, 5, 1),
]


@pytest.mark.parametrize("dataflow", eyeriss.DATAFLOWS)
def test_closed_form_equals_full_scalesim_simulation(dataflow, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything scalesim wrote relative to cwd would land here
    before = sorted(os.listdir(tmp_path))
    for dims in SMALL_LAYERS:
        result = full_simulation(dims, 12, 14, dataflow)
        assert result.stall_cycles == 0
        assert systolic_cycles(dims, 12, 14, dataflow) == result.total_cycles, dims
        assert result.total_cycles_incl_prefetch >= result.total_cycles
    assert sorted(os.listdir(tmp_path)) == before


def test_full_simulation_on_other_array_shape_and_bigger_layer():
    dims = conv_dims(14, 16, 24, 3, 2)
    for dataflow in eyeriss.DATAFLOWS:
        assert full_simulation(dims, 8, 6, dataflow).total_cycles == systolic_cycles(dims, 8, 6, dataflow)


@pytest.mark.parametrize("dataflow", eyeriss.DATAFLOWS)
def test_closed_form_equals_scalesim_compute_model_on_larger_layers(dataflow):
    layers = [
        conv_dims(28, 1, 144, 5, 2),
        conv_dims(14, 48, 96, 3, 2),
        conv_dims(7, 144, 112, 1, 2),
        ConvDims(1, 1, 1, 1, 64 * 25, 20, 1),
    ]
    for dims in layers:
        assert systolic_cycles(dims, 12, 14, dataflow) == compute_model_cycles(dims, 12, 14, dataflow), dims


def test_conv_dims_output_size_matches_pytorch():
    for in_size in (1, 2, 4, 7, 14, 28):
        for kernel in (1, 3, 5):
            for stride in (1, 2):
                dims = conv_dims(in_size, 2, 3, kernel, stride)
                conv = torch.nn.Conv2d(2, 3, kernel, stride, kernel // 2)
                out = conv(torch.zeros(1, 2, in_size, in_size))
                assert (dims.ofmap_h, dims.ofmap_w) == tuple(out.shape[2:]), (in_size, kernel, stride)
                assert dims.macs == 2 * 3 * kernel * kernel * out.shape[2] * out.shape[3]


def test_layer_dims_maps_conv_shortcut_and_head():
    conv = SimpleNamespace(op="conv", in_size=28, in_channels=1, out_channels=16, kernel=3, stride=2)
    assert layer_dims(conv) == conv_dims(28, 1, 16, 3, 2)
    shortcut = SimpleNamespace(op="shortcut", in_size=14, in_channels=16, out_channels=32, kernel=1, stride=2)
    assert layer_dims(shortcut) == ConvDims(13, 13, 1, 1, 16, 32, 2)
    head = SimpleNamespace(op="head", in_size=2, in_channels=64, pool_size=5, num_classes=20)
    assert layer_dims(head) == ConvDims(1, 1, 1, 1, 64 * 25, 20, 1)
    with pytest.raises(EyerissConfigError, match="pool"):
        layer_dims(SimpleNamespace(op="pool"))


def test_config_validation():
    with pytest.raises(EyerissConfigError, match="dataflow"):
        EyerissConfig(dataflow="rs")
    with pytest.raises(EyerissConfigError, match="rows"):
        EyerissConfig(rows=0)
    with pytest.raises(EyerissConfigError, match="clock"):
        EyerissConfig(clock_mhz=float("nan"))
    with pytest.raises(EyerissConfigError, match="ifmap"):
        ConvDims(2, 2, 3, 3, 1, 1, 1)


def test_simulator_latency_and_cache_roundtrip(tmp_path):
    cache = tmp_path / "eyeriss.json"
    spec = SimpleNamespace(op="conv", in_size=28, in_channels=1, out_channels=32, kernel=3, stride=2)
    simulator = EyerissSimulator(EyerissConfig(dataflow="ws", clock_mhz=200.0), cache_path=cache)
    cycles = simulator.cycles(spec)
    assert cycles == systolic_cycles(conv_dims(28, 1, 32, 3, 2), 12, 14, "ws")
    assert simulator(spec) == pytest.approx(cycles / 200e3)
    assert simulator.save() == cache
    assert simulator.save() is None  # nothing new
    stored = json.loads(cache.read_text())
    assert stored["cycles"] == {conv_dims(28, 1, 32, 3, 2).key: cycles}
    # A second simulator reads the cache instead of recomputing.
    stored["cycles"][conv_dims(28, 1, 32, 3, 2).key] = 12345
    cache.write_text(json.dumps(stored))
    assert EyerissSimulator(EyerissConfig(dataflow="ws"), cache_path=cache).cycles(spec) == 12345
    # A corrupt cache is ignored.
    cache.write_text("{not json")
    assert EyerissSimulator(EyerissConfig(dataflow="ws"), cache_path=cache).cycles(spec) == cycles


def test_full_simulation_refuses_huge_layers_and_guards_exit(monkeypatch):
    with pytest.raises(EyerissConfigError, match="allow_large"):
        full_simulation(conv_dims(84, 64, 64, 3, 1), 12, 14, "os")

    from scalesim.scale_sim import scalesim

    def exits(self, *args, **kwargs):
        print("ERROR: scalesim.scale.py: Config file not found")
        exit()

    monkeypatch.setattr(scalesim, "set_params", exits)
    with pytest.raises(ScalesimError, match="Config file not found"):
        full_simulation(SMALL_LAYERS[0], 12, 14, "os")
