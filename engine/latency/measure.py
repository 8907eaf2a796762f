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
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover - typing only
    from engine.space import Arch, LayerSpec, SearchSpace

#: Scale that turns a median absolute deviation into a standard-deviation estimate (normal data).
MAD_TO_SIGMA = 1.4826


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
    fn: Callable[[], object], *, repeats: int, warmup: int, synchronize: Callable[[], None] | None = None
) -> TimingStats:
    """Time ``fn()`` ``repeats`` times after ``warmup`` untimed calls (``synchronize`` for CUDA)."""
    _check_counts(repeats, warmup)
    for _ in range(warmup):
        fn()
    if synchronize is not None:
        synchronize()
    samples: list[int] = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        fn()
        if synchronize is not None:
            synchronize()
        samples.append(time.perf_counter_ns() - start)
    return robust_stats(samples)


def _synchronizer(device: torch.device) -> Callable[[], None] | None:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return None


def script_module(module: nn.Module) -> torch.jit.ScriptModule:
    """``module`` in eval mode as TorchScript (already-scripted modules pass through)."""
    module = module.eval()
    if isinstance(module, torch.jit.ScriptModule):
        return module
    with warnings.catch_warnings():
        # torch >= 2.10 marks TorchScript deprecated; it is still the deployable format we ship.
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.script(module)


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
) -> TimingStats:
    """End-to-end latency of a whole network for an input of ``input_shape`` (batch dim included)."""
    _check_counts(repeats, warmup)
    device = torch.device(device)
    with torch_threads(threads), torch.inference_mode():
        runnable = script_module(module) if script else module.eval()
        runnable = runnable.to(device)
        example = _example(input_shape, device)
        return time_callable(
            lambda: runnable(example), repeats=repeats, warmup=warmup, synchronize=_synchronizer(device)
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
) -> TimingStats:
    """Latency of calling an empty scripted module: the fixed cost every timed call includes."""
    return measure_module(
        _Identity(), input_shape, repeats=repeats, warmup=warmup, threads=threads, device=device
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
        min_ms: float = 1e-4,
        reuse_compiled: bool = True,
    ) -> None:
        _check_counts(repeats, warmup, batch_size)
        self.batch_size = batch_size
        self.repeats = repeats
        self.warmup = warmup
        self.threads = threads
        self.device = torch.device(device)
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
        }

    def call_overhead_ms(self) -> float:
        if self._call_overhead_ms is None:
            self._call_overhead_ms = measure_call_overhead(
                (self.batch_size, 1, 8, 8), threads=self.threads, device=self.device
            ).median_ms
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
            )

    def __call__(self, spec: LayerSpec) -> float:
        ms = self.stats(spec).median_ms
        if self.subtract_call_overhead:
            ms -= self.call_overhead_ms()
        return max(ms, self.min_ms) if math.isfinite(ms) else ms


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
    """``timer(arch) -> median ms`` of the whole sub-network, scripted and timed end to end."""

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
    ) -> None:
        _check_counts(repeats, warmup, batch_size)
        self.space = space
        self.network_fn = network_fn or (lambda arch: sequential_network(space, arch))
        self.batch_size = batch_size
        self.repeats = repeats
        self.warmup = warmup
        self.threads = threads
        self.device = device

    def stats(self, arch: Arch) -> TimingStats:
        shape = (self.batch_size, self.space.in_channels, self.space.image_size, self.space.image_size)
        return measure_module(
            self.network_fn(arch),
            shape,
            repeats=self.repeats,
            warmup=self.warmup,
            threads=self.threads,
            device=self.device,
        )

    def __call__(self, arch: Arch) -> float:
        return self.stats(arch).median_ms
