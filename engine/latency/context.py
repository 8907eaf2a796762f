"""Layer latencies timed *in context*: each layer inside whole chains of layers, not alone.

Why: a layer timed alone in a loop finds its weights and its input in the core's caches on every
call. Inside a network its input has just been written by the layer before, and the other layers'
weights compete for the same caches, so its cost differs, by a different amount for every layer.
On a quiet Intel Xeon (docs/BENCHMARKS.md, "Latency lookup tables") no per-group correction of
isolated entries closed that gap: 6-7 % of sub-nets stayed outside ±10 % while two timings of a
sub-net almost never disagreed that much.

So :func:`refine_in_context` times *chains*: valid sub-nets of the space chosen by
:func:`covering_chains` so that every layer key occurs in at least ``repeats_per_key`` of them. Each
chain runs layer by layer (one scripted module per key, called in order from Python) with a clock
read between the layers, so every layer is timed where a network runs it: after its predecessor,
with its neighbours' weights around it. A key's entry becomes the median of its timings over all
the chains it occurs in, which averages over its contexts. Each layer carries one Python-to-
TorchScript call, as an isolated entry does; ``fit_overhead``'s per-layer term removes it.

Only chains can be timed this way: a residual block's shortcut and addition do not run as a
sequence of table layers, so ResNet12 tables keep their isolated entries (``supports``). The
speed reference (engine.latency.measure.SpeedReference) works as in the isolated timings: one
reference call before each timed chain, every layer expressed at the reference speed.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from engine.export import script_module
from engine.latency.measure import (
    MIN_LAYER_MS,
    MeasurementError,
    SpeedReference,
    _checked_reference,
    _load_tensors,
    _structure,
    torch_threads,
)
from engine.progress import ProgressCallback, null_progress
from engine.space import Arch, LayerChoice, LayerSpec

if TYPE_CHECKING:  # pragma: no cover - typing only
    import numpy as np

    from engine.latency.lut import LatencyTable
    from engine.space import SearchSpace

#: How often (in chains) a progress event is sent while timing chains.
PROGRESS_EVERY = 50


def supports(space: SearchSpace) -> bool:
    """Whether ``space``'s sub-nets are plain chains of table layers (VGG9), timeable in context."""
    return space.backbone == "vgg9"


def _require_chains(space: SearchSpace) -> None:
    if not supports(space):
        raise MeasurementError(f"only chain backbones (vgg9) can be timed in context, not {space.backbone!r}")


def _conv_key(space: SearchSpace, index: int, in_channels: int, choice: LayerChoice) -> str:
    out_channels = int(round(space.base_channels[index] * choice.width))
    return space._conv_spec(index, in_channels, out_channels, choice.kernel, choice.activation).key


def covering_chains(space: SearchSpace, repeats_per_key: int, rng: np.random.Generator) -> list[Arch]:
    """Sub-nets of ``space`` in which every layer key occurs at least ``repeats_per_key`` times.

    Greedy: each chain takes, layer by layer, the option whose key has occurred least so far
    (given the previous layer's width; ties broken by ``rng``), then the depth that brings the most
    keys still short of ``repeats_per_key`` (ties: the deeper). On the VGG9 Omniglot space (2,800
    keys) one repeat needs 912 chains, close to the 882 that its 882 keys per deep position force.
    """
    _require_chains(space)
    if isinstance(repeats_per_key, bool) or not isinstance(repeats_per_key, int) or repeats_per_key < 1:
        raise MeasurementError(f"repeats_per_key must be a positive int, got {repeats_per_key!r}")
    counts: Counter[str] = Counter()
    options = [
        [
            LayerChoice(kernel=kernel, width=width, activation=activation)
            for kernel in space.kernels
            for width in space.allowed_widths(index)
            for activation in space.activations
        ]
        for index in range(space.n_layers)
    ]
    key_cache: dict[tuple[int, int], list[str]] = {}
    chains: list[Arch] = []
    short = len(space.all_layer_specs())  # keys still below repeats_per_key
    # Counts grow wherever the greedy path goes, so it moves on to the least-occurred options and
    # reaches every key (912 chains for 2,800 keys at one repeat); the bound only guards against
    # an endless loop in a space where that would fail.
    max_chains = repeats_per_key * short
    for _ in range(max_chains):
        if short == 0:
            return chains
        layers: list[LayerChoice] = []
        in_channels = space.in_channels
        for index in range(space.n_layers):
            keys_here = key_cache.get((index, in_channels))
            if keys_here is None:
                keys_here = key_cache[(index, in_channels)] = [
                    _conv_key(space, index, in_channels, choice) for choice in options[index]
                ]
            # Least-occurred key first; the random fraction breaks ties (it is below 1).
            scores = rng.random(len(keys_here)) + [counts[key] for key in keys_here]
            best = options[index][int(scores.argmin())]
            layers.append(best)
            in_channels = int(round(space.base_channels[index] * best.width))
        full = Arch(backbone=space.backbone, layers=tuple(layers), depth=max(space.depths))

        def gain(depth: int, full: Arch = full) -> tuple[int, int]:
            specs = space.layer_specs(full.with_depth(depth))
            return sum(counts[spec.key] < repeats_per_key for spec in specs), depth

        arch = full.with_depth(max(space.depths, key=gain)).canonical()
        for spec in space.layer_specs(arch):
            counts[spec.key] += 1
            if counts[spec.key] == repeats_per_key:
                short -= 1
        chains.append(arch)
    if short:
        raise MeasurementError(f"covering_chains left {short} keys short after {len(chains)} chains")
    return chains


class ChainTimer:
    """Times chains of layers on this CPU layer by layer; ``samples`` are per key, in ms.

    ``repeats`` timed calls per chain after ``warmup`` untimed ones (TorchScript specialises a
    module during its first calls). With ``speed_reference`` each timed chain follows one reference
    call and every layer's sample is expressed at ``reference_base_ms`` (see
    engine.latency.measure); pass the isolated timer's base so both phases share one speed.
    """

    def __init__(
        self,
        *,
        repeats: int = 5,
        warmup: int = 2,
        threads: int | None = None,
        speed_reference: SpeedReference | None = None,
        reference_base_ms: float | None = None,
    ) -> None:
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise MeasurementError(f"repeats must be a positive int, got {repeats!r}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise MeasurementError(f"warmup must be a non-negative int, got {warmup!r}")
        _checked_reference(speed_reference, reference_base_ms, torch.device("cpu"))
        if speed_reference is not None and reference_base_ms is None:
            reference_base_ms = speed_reference.calibrate(threads=threads)
        self.repeats = repeats
        self.warmup = warmup
        self.threads = threads
        self.speed_reference = speed_reference
        self.reference_base_ms = reference_base_ms
        self._compiled: dict[tuple, torch.jit.ScriptModule] = {}
        self._modules: dict[str, torch.jit.ScriptModule] = {}
        self._checked: set[tuple] = set()
        self._buffers: dict[tuple, torch.Tensor] = {}

    def _module(self, spec: LayerSpec) -> torch.jit.ScriptModule:
        """The key's scripted module: a copy of its structure's compiled module holding the
        layer's tensors (see _share_weights; scripting each of 2,800 layers would cost ~7 ms apiece).

        The compiled forward reads only the module's tensors, never a channel count, so the
        copy's output is compared with the eager module's once per structure and input size
        (comparing every key cost 0.9 s of a 7.5 s phase); a copy that differs is compiled
        afresh, as LayerTimer does."""
        module = self._modules.get(spec.key)
        if module is not None:
            return module
        eager = spec.build_module()
        self._share_weights(spec, eager)
        structure = _structure(spec)
        compiled = self._compiled.get(structure)
        if compiled is None:
            module = self._compiled[structure] = script_module(eager)
        else:
            module = copy.deepcopy(compiled)
            _load_tensors(module, eager)
            checked = (structure, spec.in_size)
            if checked not in self._checked:
                example = spec.example_input()
                expected, got = eager(example), module(example)
                if got.shape == expected.shape and torch.allclose(got, expected):
                    self._checked.add(checked)
                else:
                    module = script_module(eager)
        self._modules[spec.key] = module
        return module

    def _share_weights(self, spec: LayerSpec, eager: torch.nn.Module) -> None:
        """Point the layer's large tensors at the front of one buffer per place in a chain.

        Own weights for every key would hold 0.8 GB for the VGG9 space (a key's chains are spread
        over the whole cover, so none could be freed early). Timings do not depend on the values,
        only on where they live: the layers of one chain still have separate buffers (each place
        in a chain, ``(op, in_size)``, has its own), and one chain's weights are as hot on its
        next call as a whole network's are when it is timed call after call."""
        for name, parameter in eager.named_parameters():
            if parameter.numel() < 1024:  # BatchNorm's per-channel vectors: a few hundred bytes
                continue
            slot = (spec.op, spec.in_size, name)
            buffer = self._buffers.get(slot)
            if buffer is None or buffer.numel() < parameter.numel():
                generator = torch.Generator().manual_seed(len(self._buffers))
                buffer = torch.randn(parameter.numel(), generator=generator) * 0.05
                self._buffers[slot] = buffer
            parameter.data = buffer[: parameter.numel()].view_as(parameter)

    def time_chains(
        self,
        space: SearchSpace,
        chains: Sequence[Arch],
        progress: ProgressCallback = null_progress,
    ) -> dict[str, list[float]]:
        """Per key, one sample (ms) per timed call of every chain it occurs in."""
        _require_chains(space)
        samples: dict[str, list[float]] = {}
        clock = time.perf_counter_ns
        reference = self.speed_reference
        image = torch.randn(
            (1, space.in_channels, space.image_size, space.image_size),
            generator=torch.Generator().manual_seed(0),
        )
        # Every key's module is dropped after the last chain that runs it.
        last_use = {spec.key: index for index, arch in enumerate(chains) for spec in space.layer_specs(arch)}
        started = time.perf_counter()
        with torch_threads(self.threads), torch.inference_mode():
            for done, arch in enumerate(chains, start=1):
                chain = [(spec.key, self._module(spec)) for spec in space.layer_specs(arch)]
                for _ in range(self.warmup):
                    x = image
                    for _, module in chain:
                        x = module(x)
                for _ in range(self.repeats):
                    scale = 1e-6  # ns -> ms
                    if reference is not None:
                        before = clock()
                        reference()
                        scale = self.reference_base_ms / max(clock() - before, 1)
                    x = image
                    times = []
                    last = clock()
                    for _, module in chain:
                        x = module(x)
                        now = clock()
                        times.append(now - last)
                        last = now
                    for (key, _), elapsed in zip(chain, times, strict=True):
                        samples.setdefault(key, []).append(elapsed * scale)
                for key, _ in chain:
                    if last_use[key] == done - 1:
                        del self._modules[key]
                if done % PROGRESS_EVERY == 0 or done == len(chains):
                    progress(
                        {
                            "kind": "profile",
                            "phase": "context",
                            "current": done,
                            "total": len(chains),
                            "elapsed_s": time.perf_counter() - started,
                            "message": f"layers in context: chain {done}/{len(chains)}",
                        }
                    )
        return samples


def refine_in_context(
    space: SearchSpace,
    table: LatencyTable,
    timer: ChainTimer,
    rng: np.random.Generator,
    *,
    repeats_per_key: int = 2,
    progress: ProgressCallback = null_progress,
) -> dict[str, Any]:
    """Replace every entry of ``table`` by the median of its in-context timings (see the module doc).

    ``table`` must already hold every key of ``space`` (its isolated entries); they are kept in
    the table's ``metadata["context"]`` summary only as their median ratio to the new entries.
    Returns that summary."""
    from engine.latency.lut import LatencyTableError

    missing = table.missing(space)
    if missing:
        raise LatencyTableError(f"refine_in_context needs a complete table; {len(missing)} keys are missing")
    started = time.perf_counter()
    chains = covering_chains(space, repeats_per_key, rng)
    samples = timer.time_chains(space, chains, progress)
    ratios = []
    for key, values in samples.items():
        ms = statistics.median(values)
        ratios.append(ms / table.entries[key])
        table.set(key, max(ms, MIN_LAYER_MS))
    summary = {
        "chains": len(chains),
        "repeats_per_key": repeats_per_key,
        "repeats": timer.repeats,
        "warmup": timer.warmup,
        "layer_calls": sum(len(values) for values in samples.values()),
        "median_ratio_to_isolated": statistics.median(ratios),
        "build_s": time.perf_counter() - started,
    }
    table.metadata["context"] = summary
    table.metadata["build_s"] = table.metadata.get("build_s", 0.0) + summary["build_s"]
    return summary
