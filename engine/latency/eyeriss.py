"""A simulated Eyeriss accelerator: layer -> systolic-array cycles -> latency, via scalesim 3.0.0.

scalesim's full simulation pushes every operand address through a cycle-by-cycle SRAM/DRAM model
and is far too slow for thousands of LUT entries (a 64->64 3x3 conv at 84x84 takes minutes and GBs
of RAM). Its *compute* model is simple, though: each dataflow folds the layer's GEMM onto the
``rows x cols`` array and emits one demand-matrix row per cycle. With the memory system in scalesim's
bandwidth-estimation mode (``InterfaceBandwidth: CALC``, the paper's "assume DRAM requirements are
met") there are no stall cycles, and the reported "Total Cycles" of a layer is the number of demand
rows minus one. :func:`systolic_cycles` is that count in closed form; :func:`compute_model_cycles`
obtains it from scalesim's own operand-matrix and systolic-compute classes, and
:func:`full_simulation` runs the complete simulator (tests prove all three agree on small layers).

Closed forms, with ``P`` output pixels per filter, ``N`` filters, ``W = fh*fw*C`` window size and a
``R x C`` array (``ceil`` written ``⌈⌉``):

- ``os``: ``⌈P/R⌉·⌈N/C⌉·(W + R + C - 2) - 1``
- ``ws``: ``⌈W/R⌉·⌈N/C⌉·(2R + C + P - 2) - 1``
- ``is``: ``⌈W/R⌉·⌈P/C⌉·(2R + C + N - 2) - 1``

scalesim must never ``exit()`` or write into a worker's working directory: :func:`full_simulation`
writes its config/topology files and reports only inside a private temporary folder given by
absolute paths (no ``chdir``, which would be process-global), silences its prints and turns its
``exit()`` calls into :class:`ScalesimError`.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.atomic import atomic_write_json
from engine.paths import cache_dir

if TYPE_CHECKING:  # pragma: no cover - typing only
    from engine.space import LayerSpec

DATAFLOWS = ("os", "ws", "is")

#: Eyeriss's processing-element array (Chen et al., JSSC 2017): 12 rows x 14 columns.
EYERISS_ROWS = 12
EYERISS_COLS = 14
#: Eyeriss's nominal core clock.
EYERISS_CLOCK_MHZ = 200.0


class EyerissConfigError(ValueError):
    """An invalid simulated-accelerator configuration or layer shape."""


class ScalesimError(RuntimeError):
    """scalesim refused to run (it tried to ``exit()``) or produced no report."""


@dataclass(frozen=True)
class EyerissConfig:
    """The simulated array: its size, dataflow and clock (latency = cycles / clock)."""

    rows: int = EYERISS_ROWS
    cols: int = EYERISS_COLS
    dataflow: str = "os"
    clock_mhz: float = EYERISS_CLOCK_MHZ

    def __post_init__(self) -> None:
        if self.dataflow not in DATAFLOWS:
            raise EyerissConfigError(f"dataflow must be one of {DATAFLOWS}, got {self.dataflow!r}")
        for name in ("rows", "cols"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise EyerissConfigError(f"array {name} must be a positive int, got {value!r}")
        if not (math.isfinite(self.clock_mhz) and self.clock_mhz > 0):
            raise EyerissConfigError(f"clock_mhz must be a finite positive number, got {self.clock_mhz!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "cols": self.cols, "dataflow": self.dataflow, "clock_mhz": self.clock_mhz}

    def cycles_to_ms(self, cycles: int) -> float:
        return cycles / (self.clock_mhz * 1e3)


@dataclass(frozen=True)
class ConvDims:
    """One row of a scalesim conv topology file.

    ``ifmap_h``/``ifmap_w`` are the input size *as scalesim sees it*: padding included and trimmed
    to the rows/cols the convolution windows actually touch (see :func:`layer_dims`).
    """

    ifmap_h: int
    ifmap_w: int
    filter_h: int
    filter_w: int
    channels: int
    num_filters: int
    stride: int

    def __post_init__(self) -> None:
        for name in ("ifmap_h", "ifmap_w", "filter_h", "filter_w", "channels", "num_filters", "stride"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise EyerissConfigError(f"ConvDims.{name} must be a positive int, got {value!r}")
        if self.filter_h > self.ifmap_h or self.filter_w > self.ifmap_w:
            raise EyerissConfigError(f"filter larger than ifmap in {self}")

    @property
    def ofmap_h(self) -> int:
        # scalesim's formula (topology_utils.topo_calc_hyperparams).
        return math.ceil((self.ifmap_h - self.filter_h + self.stride) / self.stride)

    @property
    def ofmap_w(self) -> int:
        return math.ceil((self.ifmap_w - self.filter_w + self.stride) / self.stride)

    @property
    def ofmap_pixels(self) -> int:
        return self.ofmap_h * self.ofmap_w

    @property
    def window(self) -> int:
        return self.filter_h * self.filter_w * self.channels

    @property
    def macs(self) -> int:
        return self.ofmap_pixels * self.window * self.num_filters

    @property
    def key(self) -> str:
        return (
            f"{self.ifmap_h}x{self.ifmap_w}|{self.filter_h}x{self.filter_w}|"
            f"{self.channels}|{self.num_filters}|{self.stride}"
        )

    def topology_row(self, name: str = "layer0") -> str:
        return (
            f"{name}, {self.ifmap_h}, {self.ifmap_w}, {self.filter_h}, {self.filter_w}, "
            f"{self.channels}, {self.num_filters}, {self.stride},"
        )


def conv_dims(in_size: int, in_channels: int, out_channels: int, kernel: int, stride: int) -> ConvDims:
    """scalesim dims of a square ``Conv2d(kernel, stride, padding=kernel // 2)`` on ``in_size``.

    PyTorch's output size is ``floor((in + 2p - k) / s) + 1``; scalesim computes
    ``ceil((H - k + s) / s)``, which overshoots by one when ``(in + 2p - k)`` is not a multiple of
    ``s``. Feeding scalesim ``H = (out - 1) * s + k`` (the padded input rows the windows touch, the
    remainder is never read) makes both agree exactly.
    """
    if min(in_size, in_channels, out_channels, kernel, stride) < 1:
        raise EyerissConfigError(
            f"conv dims must be positive: in_size={in_size} channels={in_channels}->{out_channels} "
            f"kernel={kernel} stride={stride}"
        )
    padding = kernel // 2
    out_size = (in_size + 2 * padding - kernel) // stride + 1
    effective = (out_size - 1) * stride + kernel
    return ConvDims(effective, effective, kernel, kernel, in_channels, out_channels, stride)


def layer_dims(spec: LayerSpec) -> ConvDims:
    """Map a LayerSpec onto the one GEMM-shaped layer scalesim simulates.

    - ``conv``: the convolution (BatchNorm and activation are not simulated: on Eyeriss they are
      folded into the weights or applied on the fly at the array's output).
    - ``shortcut``: the 1x1 strided convolution (padding 0, so ``kernel // 2 == 0`` holds too).
    - ``head``: the Linear layer as a GEMM ``1 x (C*pool*pool) -> num_classes``, i.e. a 1x1 conv on a
      1x1 ifmap; the adaptive average pooling before it is not simulated.
    """
    if spec.op in ("conv", "shortcut"):
        return conv_dims(spec.in_size, spec.in_channels, spec.out_channels, spec.kernel, spec.stride)
    if spec.op == "head":
        features = spec.in_channels * spec.pool_size * spec.pool_size
        return ConvDims(1, 1, 1, 1, features, spec.num_classes, 1)
    raise EyerissConfigError(f"no Eyeriss mapping for layer op {spec.op!r}")


def systolic_cycles(dims: ConvDims, rows: int, cols: int, dataflow: str) -> int:
    """scalesim's compute cycles for ``dims`` on a ``rows x cols`` array (closed form, no stalls)."""
    if dataflow == "os":
        folds = math.ceil(dims.ofmap_pixels / rows) * math.ceil(dims.num_filters / cols)
        per_fold = dims.window + rows + cols - 2
    elif dataflow == "ws":
        folds = math.ceil(dims.window / rows) * math.ceil(dims.num_filters / cols)
        per_fold = 2 * rows + cols + dims.ofmap_pixels - 2
    elif dataflow == "is":
        folds = math.ceil(dims.window / rows) * math.ceil(dims.ofmap_pixels / cols)
        per_fold = 2 * rows + cols + dims.num_filters - 2
    else:
        raise EyerissConfigError(f"dataflow must be one of {DATAFLOWS}, got {dataflow!r}")
    return folds * per_fold - 1


def _scalesim_config(rows: int, cols: int, dataflow: str):
    from scalesim.scale_config import scale_config

    config = scale_config()
    config.set_arr_dims(rows=rows, cols=cols)
    config.set_dataflow(dataflow)
    config.force_valid()
    return config


def compute_model_cycles(dims: ConvDims, rows: int, cols: int, dataflow: str) -> int:
    """The same count from scalesim's own operand matrices and systolic compute classes.

    Exactly what ``single_layer_sim.run`` does before handing the demand matrices to the memory
    system; one demand row is one cycle and the last row is serviced at cycle ``rows - 1``.
    """
    from scalesim.compute.operand_matrix import operand_matrix
    from scalesim.compute.systolic_compute_is import systolic_compute_is
    from scalesim.compute.systolic_compute_os import systolic_compute_os
    from scalesim.compute.systolic_compute_ws import systolic_compute_ws
    from scalesim.layout_utils import layouts
    from scalesim.topology_utils import topologies

    if dataflow not in DATAFLOWS:
        raise EyerissConfigError(f"dataflow must be one of {DATAFLOWS}, got {dataflow!r}")
    config = _scalesim_config(rows, cols, dataflow)
    topology = topologies()
    topology.load_layer_params_from_list(
        "layer0",
        [
            "layer0",
            dims.ifmap_h,
            dims.ifmap_w,
            dims.filter_h,
            dims.filter_w,
            dims.channels,
            dims.num_filters,
            dims.stride,
            dims.stride,
            1,
            1,
        ],
    )
    matrices = operand_matrix()
    matrices.set_params(config_obj=config, topoutil_obj=topology, layoututil_obj=layouts(), layer_id=0)
    _, ifmap = matrices.get_ifmap_matrix()
    _, filters = matrices.get_filter_matrix()
    _, ofmap = matrices.get_ofmap_matrix()
    compute = {"os": systolic_compute_os, "ws": systolic_compute_ws, "is": systolic_compute_is}[dataflow]()
    compute.set_params(config_obj=config, ifmap_op_mat=ifmap, filter_op_mat=filters, ofmap_op_mat=ofmap)
    ifmap_demand, _, _ = compute.get_demand_matrices()
    return int(ifmap_demand.shape[0]) - 1


@dataclass(frozen=True)
class FullSimulationResult:
    """The compute-report figures of one layer from scalesim's complete simulator."""

    total_cycles: int  # "Total Cycles": compute + stall cycles (what systolic_cycles predicts)
    stall_cycles: int
    total_cycles_incl_prefetch: int  # from the first DRAM read to the last DRAM write


_CONFIG_TEMPLATE = """[general]
run_name = nasweb

[architecture_presets]
ArrayHeight: {rows}
ArrayWidth: {cols}
IfmapSramSzkB: {sram_kb}
FilterSramSzkB: {sram_kb}
OfmapSramSzkB: {sram_kb}
IfmapOffset: 0
FilterOffset: 10000000
OfmapOffset: 20000000
Dataflow: {dataflow}
Bandwidth: 10
ReadRequestBuffer: 32
WriteRequestBuffer: 32

[layout]
IfmapCustomLayout: False
IfmapSRAMBankBandwidth: 10
IfmapSRAMBankNum: 10
IfmapSRAMBankPort: 2
FilterCustomLayout: False
FilterSRAMBankBandwidth: 10
FilterSRAMBankNum: 10
FilterSRAMBankPort: 2

[sparsity]
SparsitySupport: false
SparseRep: ellpack_block
OptimizedMapping: false
BlockSize: 8
RandomNumberGeneratorSeed: 40

[run_presets]
InterfaceBandwidth: CALC
UseRamulatorTrace: False
"""

#: Refuse full simulations bigger than this many demand rows (cycles): they take minutes.
FULL_SIMULATION_MAX_CYCLES = 200_000


def full_simulation(
    dims: ConvDims, rows: int, cols: int, dataflow: str, *, sram_kb: int = 64, allow_large: bool = False
) -> FullSimulationResult:
    """Run scalesim's complete simulator (compute + SRAM/DRAM model) on one layer.

    Everything scalesim writes lands in a private temporary folder addressed by absolute paths;
    its console output is captured and its ``exit()`` calls become :class:`ScalesimError`.
    """
    if dataflow not in DATAFLOWS:
        raise EyerissConfigError(f"dataflow must be one of {DATAFLOWS}, got {dataflow!r}")
    expected = systolic_cycles(dims, rows, cols, dataflow)
    if expected > FULL_SIMULATION_MAX_CYCLES and not allow_large:
        raise EyerissConfigError(
            f"full scalesim simulation of {dims.key} would take ~{expected} cycles "
            f"(> {FULL_SIMULATION_MAX_CYCLES}); pass allow_large=True to run it anyway"
        )
    from scalesim.scale_sim import scalesim

    with tempfile.TemporaryDirectory(prefix="nasweb-scalesim-") as tmp:
        folder = Path(tmp).resolve()
        config_path = folder / "eyeriss.cfg"
        topology_path = folder / "topology.csv"
        layout_path = folder / "layout.csv"
        config_path.write_text(
            _CONFIG_TEMPLATE.format(rows=rows, cols=cols, dataflow=dataflow, sram_kb=sram_kb)
        )
        topology_path.write_text(
            "Layer name, IFMAP Height, IFMAP Width, Filter Height, Filter Width, Channels, "
            "Num Filter, Strides,\n" + dims.topology_row() + "\n"
        )
        layout_path.write_text("Layer name,\n")  # custom layouts are off; scalesim still opens it
        console = io.StringIO()
        try:
            with contextlib.redirect_stdout(console), warnings.catch_warnings():
                # scalesim 3.0.0 converts 1-element arrays with int(); numpy deprecates that.
                warnings.simplefilter("ignore", DeprecationWarning)
                simulator = scalesim(
                    save_disk_space=True,
                    verbose=False,
                    config=str(config_path),
                    topology=str(topology_path),
                    layout=str(layout_path),
                )
                simulator.run_scale(top_path=str(folder / "reports"))
        except SystemExit as exc:  # scalesim calls exit() on bad paths
            raise ScalesimError(f"scalesim exited ({exc.code!r}): {console.getvalue().strip()}") from None
        layers = simulator.runner.single_layer_sim_object_list
        if len(layers) != 1:
            raise ScalesimError(f"scalesim simulated {len(layers)} layers, expected 1")
        overall, total, stalls = layers[0].get_compute_report_items()[:3]
    return FullSimulationResult(
        total_cycles=int(total), stall_cycles=int(stalls), total_cycles_incl_prefetch=int(overall)
    )


class EyerissSimulator:
    """Latency of LayerSpecs on a simulated Eyeriss: a LUT ``measure_fn`` (spec -> ms).

    Cycle counts depend only on the scalesim dims and the array, not on the clock, so they are
    cached per (rows, cols, dataflow) in a JSON file under ``cache_dir()/eyeriss`` (loaded on first
    use, written by :meth:`save`).
    """

    def __init__(self, config: EyerissConfig | None = None, *, cache_path: Path | None = None) -> None:
        self.config = config or EyerissConfig()
        self.cache_path = cache_path or (
            cache_dir() / "eyeriss" / f"{self.config.rows}x{self.config.cols}_{self.config.dataflow}.json"
        )
        self._cycles: dict[str, int] | None = None
        self._dirty = False

    def _cache(self) -> dict[str, int]:
        if self._cycles is None:
            self._cycles = {}
            if self.cache_path.is_file():
                try:
                    stored = json.loads(self.cache_path.read_text())
                    self._cycles = {str(k): int(v) for k, v in stored.get("cycles", {}).items()}
                except (ValueError, AttributeError, TypeError):
                    self._cycles = {}  # a corrupt cache is recomputed, never trusted
        return self._cycles

    def dims_cycles(self, dims: ConvDims) -> int:
        cache = self._cache()
        cycles = cache.get(dims.key)
        if cycles is None:
            cycles = systolic_cycles(dims, self.config.rows, self.config.cols, self.config.dataflow)
            cache[dims.key] = cycles
            self._dirty = True
        return cycles

    def cycles(self, spec: LayerSpec) -> int:
        return self.dims_cycles(layer_dims(spec))

    def latency_ms(self, spec: LayerSpec) -> float:
        return self.config.cycles_to_ms(self.cycles(spec))

    __call__ = latency_ms

    def save(self) -> Path | None:
        """Write the cycle cache if anything new was computed; returns the path written."""
        if not self._dirty:
            return None
        payload = {
            "array": {"rows": self.config.rows, "cols": self.config.cols, "dataflow": self.config.dataflow},
            "cycles": dict(sorted(self._cache().items())),
        }
        atomic_write_json(self.cache_path, payload)
        self._dirty = False
        return self.cache_path
