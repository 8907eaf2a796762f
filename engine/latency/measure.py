"""Wall-clock latency of one layer or one whole network on this machine, as TorchScript.

Protocol (same for layers, networks and the remote agent): eval mode, ``torch.jit.script``,
``warmup`` untimed calls (the profiling executor specialises the graph during the first calls),
then ``repeats`` calls each timed with ``time.perf_counter_ns`` under ``torch.inference_mode``.
The figure is the median after rejecting samples outside ``median ± 3·MAD`` (MAD scaled by 1.4826
to estimate a standard deviation), which discards the long tail caused by other processes on a
shared machine; the spread (scaled MAD / median) is reported with it.

Building a lookup table times thousands of layers, and compiling each with ``torch.jit.script``
costs 15-25 ms, more than timing it. :class:`LayerTimer` therefore compiles one TorchScript module
per *structure* (op, kernel, stride, activation, pooling) and loads each layer's own tensors into it
-- the compiled forward only reads ``self.weight`` etc., never the channel counts -- and checks the
result against the freshly built eager module before timing it.

A shared virtual machine changes speed in phases: on the developers' 2-core VM a fixed convolution
took 0.104 ms for ten seconds, then 0.145 ms for the next twenty (its host's other tenants), so the
same sub-network timed a minute apart differed by 25-30 %, and a table whose entries were timed in
different phases disagreed with the network it sums. With a :class:`SpeedReference` every timed
call is preceded by one call of a fixed reference convolution, and the result is also expressed at
a fixed reference speed: ``median(t_i / r_i) * base_ms`` (``TimingStats.at_reference``), which
cancels what the machine's phase does to both. The raw median stays the ``median_ms``.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from engine.export import script_module

if TYPE_CHECKING:  # pragma: no cover - typing only
    from engine.space import Arch, LayerSpec, SearchSpace

#: Scale that turns a median absolute deviation into a standard-deviation estimate (normal data).
MAD_TO_SIGMA = 1.4826
#: The least a table entry may hold, in ms: a layer whose call overhead was subtracted can come
#: out at zero or below, and a table of zeros would call every such layer free.
MIN_LAYER_MS = 1e-4


class MeasurementError(ValueError):
    """Bad measurement settings, or a module whose output cannot be timed."""


@dataclass(frozen=True)
class TimingStats:
    """Robust summary of repeated timings, in milliseconds."""

    median_ms: float
    mad_ms: float  # scaled MAD of all samples (a robust standard deviation)
    mean_ms: float  # of the kept samples
    min_ms: float
    max_ms: float
    samples: int
    kept: int
    #: With a SpeedReference: the reference call's median (ms) during these samples and the median
    #: of the per-sample ratios (this call / the reference call just before it).
    reference_ms: float | None = None
    relative: float | None = None

    def at_reference(self, base_ms: float) -> float:
        """The latency at the speed where the reference call takes ``base_ms`` (see the module doc)."""
        if self.relative is None:
            raise MeasurementError("these timings were taken without a speed reference")
        return self.relative * base_ms

    @property
    def spread(self) -> float:
        """Relative spread: scaled MAD / median."""
        return self.mad_ms / self.median_ms if self.median_ms > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "spread": self.spread}


def robust_stats(samples_ns: Sequence[int | float], *, mad_k: float = 3.0) -> TimingStats:
    """Median of the samples within ``median ± mad_k·MAD`` (scaled MAD), plus their spread."""
    if not samples_ns:
        raise MeasurementError("no timing samples to summarise")
    values = [float(v) / 1e6 for v in samples_ns]
    median = statistics.median(values)
    mad = MAD_TO_SIGMA * statistics.median(abs(v - median) for v in values)
    kept = [v for v in values if abs(v - median) <= mad_k * mad] if mad > 0 else values
    return TimingStats(
        median_ms=statistics.median(kept),
        mad_ms=mad,
        mean_ms=statistics.fmean(kept),
        min_ms=min(values),
        max_ms=max(values),
        samples=len(values),
        kept=len(kept),
    )


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run with ``torch.set_num_threads(threads)`` (``None`` keeps the current setting), then restore."""
    if threads is None:
        yield
        return
    if not isinstance(threads, int) or threads < 1:
        raise MeasurementError(f"threads must be a positive int, got {threads!r}")
    previous = torch.get_num_threads()
    if previous != threads:  # a call per scored candidate or meta-step: skip the no-op resets
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


def _check_counts(repeats: int, warmup: int, batch_size: int = 1) -> None:
    if not isinstance(repeats, int) or repeats < 1:
        raise MeasurementError(f"repeats must be a positive int, got {repeats!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise MeasurementError(f"warmup must be a non-negative int, got {warmup!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise MeasurementError(f"batch_size must be a positive int, got {batch_size!r}")


def time_callable(
    fn: Callable[[], object],
    *,
    repeats: int,
    warmup: int,
    synchronize: Callable[[], None] | None = None,
    reference: Callable[[], object] | None = None,
) -> TimingStats:
    """Time ``fn()`` ``repeats`` times after ``warmup`` untimed calls (``synchronize`` for CUDA).

    With ``reference`` (a CPU callable of fixed work) each timed call of ``fn`` directly follows a
    timed call of ``reference``, and the stats carry both the reference's median and the median
    of the per-sample ratios: the two calls run in the same phase of the machine's speed."""
    _check_counts(repeats, warmup)
    if reference is not None and synchronize is not None:
        raise MeasurementError("a speed reference runs on the CPU: it cannot track a GPU's speed")
    for _ in range(warmup):
        fn()
    if synchronize is not None:
        synchronize()
    samples: list[int] = []
    reference_samples: list[int] = []
    clock = time.perf_counter_ns
    for _ in range(repeats):
        if reference is not None:
            before = clock()
            reference()
            reference_samples.append(clock() - before)
        start = clock()
        fn()
        if synchronize is not None:
            synchronize()
        samples.append(clock() - start)
    stats = robust_stats(samples)
    if reference is None:
        return stats
    ratios = [sample / max(ref, 1) for sample, ref in zip(samples, reference_samples, strict=True)]
    return replace(
        stats,
        reference_ms=statistics.median(reference_samples) / 1e6,
        relative=statistics.median(ratios),
    )


def reference_description(channels: int = 32) -> str:
    """What :class:`SpeedReference` runs (the board agent's reference is the 32-channel one)."""
    return f"conv3x3 {channels}->{channels} on 1x{channels}x14x14 + ReLU, TorchScript"


class SpeedReference:
    """A fixed CPU workload timed next to every measurement to track the machine's current speed.

    A 3x3 convolution (``channels`` in and out, default 32) on 14x14 and a ReLU (about 0.1 ms on
    one core at 32 channels), scripted, with seeded weights and input: the same work in every
    process, so tables and the networks checked against them are expressed at one reference speed,
    ``base_ms`` (the reference's median in a calibration, kept in the table's metadata so a resumed
    build and a later check use the same one)."""

    def __init__(self, channels: int = 32) -> None:
        if not isinstance(channels, int) or channels < 1:
            raise MeasurementError(f"channels must be a positive int, got {channels!r}")
        generator = torch.Generator().manual_seed(0)
        # skip_init: the default initialisation would draw from the global torch RNG.
        conv = nn.utils.skip_init(nn.Conv2d, channels, channels, 3, padding=1)
        with torch.no_grad():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.05)
            conv.bias.zero_()
        self.description = reference_description(channels)
        self._module = script_module(nn.Sequential(conv, nn.ReLU()))
        self._input = torch.randn((1, channels, 14, 14), generator=generator)
        with torch.inference_mode():  # TorchScript specialises during the first calls: not timed
            for _ in range(5):
                self()

    def __call__(self) -> torch.Tensor:
        return self._module(self._input)

    def calibrate(self, calls: int = 300, threads: int | None = None) -> float:
        """The reference's median over ``calls`` calls (ms): the base of a new table."""
        with torch_threads(threads), torch.inference_mode():
            return time_callable(self, repeats=calls, warmup=20).median_ms

    def metadata(self, base_ms: float) -> dict[str, Any]:
        return {"workload": self.description, "base_ms": base_ms}


def _synchronizer(device: torch.device) -> Callable[[], None] | None:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return None


def _example(shape: Sequence[int], device: torch.device) -> torch.Tensor:
    shape = tuple(int(s) for s in shape)
    if not shape or min(shape) < 1:
        raise MeasurementError(f"input_shape must be a non-empty shape of positive sizes, got {shape!r}")
    generator = torch.Generator().manual_seed(0)  # inputs do not affect dense-op latency; fixed anyway
    return torch.randn(shape, generator=generator).to(device)


def measure_module(
    module: nn.Module,
    input_shape: Sequence[int],
    *,
    repeats: int = 50,
    warmup: int = 10,
    threads: int | None = None,
    device: str | torch.device = "cpu",
    script: bool = True,
    reference: SpeedReference | None = None,
) -> TimingStats:
    """End-to-end latency of a whole network for an input of ``input_shape`` (batch dim included).

    With ``reference`` the stats also carry ``relative`` (see :func:`time_callable`)."""
    _check_counts(repeats, warmup)
    device = torch.device(device)
    with torch_threads(threads), torch.inference_mode():
        runnable = script_module(module) if script else module.eval()
        runnable = runnable.to(device)
        example = _example(input_shape, device)
        return time_callable(
            lambda: runnable(example),
            repeats=repeats,
            warmup=warmup,
            synchronize=_synchronizer(device),
            reference=reference,
        )


def measure_layer(
    spec: LayerSpec,
    *,
    batch_size: int = 1,
    repeats: int = 50,
    warmup: int = 10,
    threads: int | None = None,
    device: str | torch.device = "cpu",
) -> TimingStats:
    """Latency of one LayerSpec's module, freshly built and scripted (the reference path)."""
    _check_counts(repeats, warmup, batch_size)
    shape = tuple(spec.example_input(batch_size).shape)
    return measure_module(
        spec.build_module(), shape, repeats=repeats, warmup=warmup, threads=threads, device=device
    )


class _Identity(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def measure_call_overhead(
    input_shape: Sequence[int] = (1, 1, 28, 28),
    *,
    repeats: int = 200,
    warmup: int = 20,
    threads: int | None = None,
    device: str | torch.device = "cpu",
    reference: SpeedReference | None = None,
) -> TimingStats:
    """Latency of calling an empty scripted module: the fixed cost every timed call includes."""
    return measure_module(
        _Identity(),
        input_shape,
        repeats=repeats,
        warmup=warmup,
        threads=threads,
        device=device,
        reference=reference,
    )


def _structure(spec: LayerSpec) -> tuple:
    """What the compiled TorchScript of a layer depends on (everything but tensor shapes)."""
    return (spec.op, spec.kernel, spec.stride, spec.activation, spec.pool_size)


def _load_tensors(scripted: torch.jit.ScriptModule, module: nn.Module) -> None:
    for name, tensor in module.state_dict(keep_vars=True).items():
        path, _, leaf = name.rpartition(".")
        target = scripted
        for part in filter(None, path.split(".")):
            target = getattr(target, part)
        setattr(target, leaf, tensor)


class LayerTimer:
    """A LUT ``measure_fn``: ``timer(spec) -> median ms`` of the spec's scripted module.

    ``subtract_call_overhead`` removes the cost of an empty scripted call (measured once, lazily)
    from every entry, so that a network of L layers, timed as one call, is predicted by
    ``overhead + sum(entries)`` rather than paying the call cost L times; entries never drop below
    ``min_ms``.

    With ``speed_reference`` every entry is the layer's latency at the reference speed
    ``reference_base_ms`` (calibrated on first use unless given: a resumed build passes the base
    its first part used), so entries timed in different phases of a shared machine agree.
    """

    def __init__(
        self,
        *,
        batch_size: int = 1,
        repeats: int = 20,
        warmup: int = 5,
        threads: int | None = None,
        device: str | torch.device = "cpu",
        subtract_call_overhead: bool = False,
        min_ms: float = MIN_LAYER_MS,
        reuse_compiled: bool = True,
        speed_reference: SpeedReference | None = None,
        reference_base_ms: float | None = None,
    ) -> None:
        _check_counts(repeats, warmup, batch_size)
        self.batch_size = batch_size
        self.repeats = repeats
        self.warmup = warmup
        self.threads = threads
        self.device = torch.device(device)
        self.speed_reference, self.reference_base_ms = _checked_reference(
            speed_reference, reference_base_ms, self.device
        )
        self.subtract_call_overhead = subtract_call_overhead
        self.min_ms = min_ms
        self.reuse_compiled = reuse_compiled
        self._compiled: dict[tuple, torch.jit.ScriptModule] = {}
        self._call_overhead_ms: float | None = None
        self.fresh_compiles = 0

    def metadata(self) -> dict[str, Any]:
        return {
            "runtime": "torchscript",
            "torch": torch.__version__,
            "device": str(self.device),
            "threads": self.threads if self.threads is not None else torch.get_num_threads(),
            "repeats": self.repeats,
            "warmup": self.warmup,
            "batch_size": self.batch_size,
            "subtract_call_overhead": self.subtract_call_overhead,
            "call_overhead_ms": self._call_overhead_ms,
            "speed_reference": self.speed_reference.metadata(self.base_ms())
            if self.speed_reference is not None
            else None,
        }

    def base_ms(self) -> float:
        """The reference speed entries are expressed at (calibrated on first use)."""
        return _calibrated_base(self)

    def call_overhead_ms(self) -> float:
        """The empty call's cost, in the unit of the entries it is subtracted from."""
        if self._call_overhead_ms is None:
            stats = measure_call_overhead(
                (self.batch_size, 1, 8, 8),
                threads=self.threads,
                device=self.device,
                reference=self.speed_reference,
            )
            self._call_overhead_ms = _in_timer_unit(self, stats)
        return self._call_overhead_ms

    def _runnable(self, spec: LayerSpec, module: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
        key = _structure(spec)
        compiled = self._compiled.get(key) if self.reuse_compiled else None
        if compiled is not None:
            _load_tensors(compiled, module)
            expected = module(example)
            try:
                got = compiled(example)
            except RuntimeError:
                got = None
            if got is not None and got.shape == expected.shape and torch.allclose(got, expected):
                return compiled
        compiled = script_module(module)
        self.fresh_compiles += 1
        if self.reuse_compiled:
            self._compiled[key] = compiled
        return compiled

    def stats(self, spec: LayerSpec) -> TimingStats:
        with torch_threads(self.threads), torch.inference_mode():
            module = spec.build_module().eval().to(self.device)
            example = spec.example_input(self.batch_size).to(self.device)
            runnable = self._runnable(spec, module, example)
            return time_callable(
                lambda: runnable(example),
                repeats=self.repeats,
                warmup=self.warmup,
                synchronize=_synchronizer(self.device),
                reference=self.speed_reference,
            )

    def entry_ms(self, stats: TimingStats) -> float:
        """The table entry of a layer's timings: at the reference speed when there is one."""
        ms = _in_timer_unit(self, stats)
        if self.subtract_call_overhead:
            ms -= self.call_overhead_ms()
        return max(ms, self.min_ms) if math.isfinite(ms) else ms

    def __call__(self, spec: LayerSpec) -> float:
        return self.entry_ms(self.stats(spec))


def _checked_reference(
    reference: SpeedReference | None, base_ms: float | None, device: torch.device
) -> tuple[SpeedReference | None, float | None]:
    if reference is not None and device.type != "cpu":
        raise MeasurementError("a speed reference runs on the CPU: it cannot track a GPU's speed")
    if base_ms is not None and not (math.isfinite(base_ms) and base_ms > 0):
        raise MeasurementError(f"reference_base_ms must be a finite positive ms, got {base_ms!r}")
    return reference, base_ms


def _calibrated_base(timer: LayerTimer | ArchTimer) -> float:
    if timer.speed_reference is None:
        raise MeasurementError("this timer has no speed reference")
    if timer.reference_base_ms is None:
        timer.reference_base_ms = timer.speed_reference.calibrate(threads=timer.threads)
    return timer.reference_base_ms


def _in_timer_unit(timer: LayerTimer | ArchTimer, stats: TimingStats) -> float:
    """``stats`` in the unit of ``timer``'s figures: at its reference speed when it has one."""
    return (
        stats.at_reference(_calibrated_base(timer)) if timer.speed_reference is not None else stats.median_ms
    )


def sequential_network(space: SearchSpace, arch: Arch) -> nn.Sequential:
    """A VGG9 sub-network as the chain of its LayerSpec modules (convs, then the head).

    For the plain VGG9 backbone this is exactly the extracted sub-network's computation; residual
    backbones are not a chain, so ResNet12 callers pass ``engine.supernet.extract_subnet`` to
    :class:`ArchTimer` instead.
    """
    if space.backbone != "vgg9":
        raise MeasurementError(
            f"sequential_network builds vgg9 sub-nets only, not {space.backbone!r}; "
            "pass network_fn=lambda arch: extract_subnet(supernet, arch) to ArchTimer"
        )
    return nn.Sequential(*(spec.build_module() for spec in space.layer_specs(arch))).eval()


class ArchTimer:
    """``timer(arch) -> median ms`` of the whole sub-network, scripted and timed end to end.

    With ``speed_reference`` the figure is at the reference speed ``reference_base_ms`` (pass the
    table's ``metadata["speed_reference"]["base_ms"]`` to check a table built with one)."""

    def __init__(
        self,
        space: SearchSpace,
        *,
        network_fn: Callable[[Arch], nn.Module] | None = None,
        batch_size: int = 1,
        repeats: int = 30,
        warmup: int = 5,
        threads: int | None = None,
        device: str | torch.device = "cpu",
        speed_reference: SpeedReference | None = None,
        reference_base_ms: float | None = None,
    ) -> None:
        _check_counts(repeats, warmup, batch_size)
        self.space = space
        self.network_fn = network_fn or (lambda arch: sequential_network(space, arch))
        self.batch_size = batch_size
        self.repeats = repeats
        self.warmup = warmup
        self.threads = threads
        self.device = device
        self.speed_reference, self.reference_base_ms = _checked_reference(
            speed_reference, reference_base_ms, torch.device(device)
        )

    def stats(self, arch: Arch) -> TimingStats:
        shape = (self.batch_size, self.space.in_channels, self.space.image_size, self.space.image_size)
        return measure_module(
            self.network_fn(arch),
            shape,
            repeats=self.repeats,
            warmup=self.warmup,
            threads=self.threads,
            device=self.device,
            reference=self.speed_reference,
        )

    def base_ms(self) -> float:
        """The reference speed figures are expressed at (calibrated on first use unless given)."""
        return _calibrated_base(self)

    def figure_ms(self, stats: TimingStats) -> float:
        """The figure of one sub-net's timings: at the reference speed when there is one."""
        return _in_timer_unit(self, stats)

    def __call__(self, arch: Arch) -> float:
        return self.figure_ms(self.stats(arch))
