"""Per-device latency lookup tables (H-Meta-NAS Section 3, "Layer-wise profiling").

A table maps every distinct layer a search space can produce (``LayerSpec.key``) to its measured
latency on one device. A sub-network's latency is predicted as

    predict(arch) = overhead_ms + sum(entries[spec.key] + per_layer_ms for spec in space.layer_specs(arch))

so a search never runs a candidate on the device. The table is built once per device (resumable:
only missing keys are measured), stored as JSON with the metadata needed to judge it later
(runtime, torch version, threads, repeats, batch size, date, search space) and, once measured, an
accuracy report against end-to-end timings of random sub-networks.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.atomic import atomic_write_json
from engine.progress import JobCancelled, ProgressCallback, null_progress

if TYPE_CHECKING:  # pragma: no cover - typing only
    from engine.seeding import Rngs
    from engine.space import Arch, LayerSpec, SearchSpace

FORMAT_VERSION = 1


class LatencyTableError(ValueError):
    """A malformed table file or an invalid latency value."""


class MissingLatencyEntry(KeyError):
    """The table has no entry for a layer the architecture uses."""

    def __init__(self, key: str, device: str) -> None:
        super().__init__(key)
        self.key = key
        self.device = device

    def __str__(self) -> str:
        return f"latency table for device {self.device!r} has no entry for layer {self.key!r}"


def valid_ms(value: Any) -> bool:
    """A latency the table accepts: a finite, strictly positive number (not a bool)."""
    return (
        isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    )


def keys_for(space: SearchSpace) -> list[str]:
    """Every LUT key of ``space`` (one per distinct LayerSpec), in the space's order."""
    return [spec.key for spec in space.all_layer_specs()]


@dataclass
class LatencyTable:
    """Layer latencies of one device, in milliseconds."""

    device: str
    entries: dict[str, float] = field(default_factory=dict)
    overhead_ms: float = 0.0
    metadata: dict[str, Any] = field(default_factory=dict)
    accuracy: dict[str, Any] | None = None
    #: Correction added to every layer of a network (see ``fit_overhead``); usually <= 0 because
    #: each entry, timed alone, carries one call's cost that a whole network pays only once.
    per_layer_ms: float = 0.0

    def __post_init__(self) -> None:
        if not math.isfinite(self.overhead_ms):
            raise LatencyTableError(f"overhead_ms must be finite, got {self.overhead_ms!r}")
        if not math.isfinite(self.per_layer_ms):
            raise LatencyTableError(f"per_layer_ms must be finite, got {self.per_layer_ms!r}")
        for key, ms in self.entries.items():
            if not valid_ms(ms):
                raise LatencyTableError(f"entry {key!r} must be a finite positive ms, got {ms!r}")

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key: object) -> bool:
        return key in self.entries

    def set(self, key: str, ms: float) -> None:
        if not valid_ms(ms):
            raise LatencyTableError(f"entry {key!r} must be a finite positive ms, got {ms!r}")
        self.entries[key] = float(ms)

    keys_for = staticmethod(keys_for)

    def missing(self, space: SearchSpace) -> list[str]:
        """Keys of ``space`` this table still lacks."""
        return [key for key in keys_for(space) if key not in self.entries]

    def space(self) -> SearchSpace:
        """The search space recorded in the metadata (the one the table was built for)."""
        from engine.space import SearchSpace

        stored = self.metadata.get("search_space")
        if not stored:
            raise LatencyTableError(f"latency table for {self.device!r} records no search space")
        return SearchSpace.from_dict(stored)

    def predict_specs(self, specs: Iterable[LayerSpec]) -> float:
        total = self.overhead_ms
        for spec in specs:
            key = spec.key
            try:
                total += self.entries[key] + self.per_layer_ms
            except KeyError:
                raise MissingLatencyEntry(key, self.device) from None
        return total

    def predict(self, space: SearchSpace | None, arch: Arch) -> float:
        """Predicted latency (ms) of ``arch``: overhead + sum of its layers' (entry + per-layer term).

        ``space`` may be ``None`` to use the search space recorded in the table's metadata.
        """
        space = space if space is not None else self.space()
        return self.predict_specs(space.layer_specs(arch))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "device": self.device,
            "overhead_ms": self.overhead_ms,
            "per_layer_ms": self.per_layer_ms,
            "metadata": self.metadata,
            "accuracy": self.accuracy,
            "entries": dict(sorted(self.entries.items())),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatencyTable:
        if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION:
            raise LatencyTableError(f"not a latency table of format {FORMAT_VERSION}")
        try:
            return cls(
                device=str(data["device"]),
                entries={str(k): v for k, v in data["entries"].items()},
                overhead_ms=float(data.get("overhead_ms", 0.0)),
                per_layer_ms=float(data.get("per_layer_ms", 0.0)),
                metadata=dict(data.get("metadata") or {}),
                accuracy=data.get("accuracy"),
            )
        except (KeyError, AttributeError, TypeError) as error:
            raise LatencyTableError(f"malformed latency table: {error!r}") from None

    def copy(self) -> LatencyTable:
        """An independent copy: entries, fit and metadata (e.g. the isolated entries, kept before
        the in-context phase replaces them)."""
        return LatencyTable.from_dict(copy.deepcopy(self.to_dict()))

    def save(self, path: str | Path) -> Path:
        """Write atomically: a reader sees the previous table or this one, never half of one."""
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> LatencyTable:
        try:
            data = json.loads(Path(path).read_text())
        except ValueError as error:
            raise LatencyTableError(f"{path}: not JSON ({error})") from None
        return cls.from_dict(data)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def build_lut(
    space: SearchSpace,
    measure_fn: Callable[[LayerSpec], float],
    progress: ProgressCallback = null_progress,
    existing: LatencyTable | None = None,
    *,
    device: str = "cpu",
    metadata: dict[str, Any] | None = None,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 100,
) -> LatencyTable:
    """Measure every layer of ``space`` the table lacks; returns the (possibly ``existing``) table.

    Resumable: entries already in ``existing`` are kept and not measured again. With
    ``checkpoint`` the partial table is saved every ``checkpoint_every`` entries and whenever the
    build stops (including :class:`JobCancelled` raised by ``progress``), so a restarted build
    loads it and continues. One ``{"kind": "profile", ...}`` progress event per measured entry.
    """
    table = existing if existing is not None else LatencyTable(device=device)
    table.metadata.setdefault("created", _now())
    table.metadata.update(metadata or {})
    table.metadata["search_space"] = space.to_dict()
    specs = [spec for spec in space.all_layer_specs() if spec.key not in table.entries]
    total = len(specs)
    started = time.perf_counter()
    measured_since_checkpoint = 0
    try:
        for index, spec in enumerate(specs, start=1):
            ms = measure_fn(spec)
            if not valid_ms(ms):
                raise LatencyTableError(f"measure_fn returned {ms!r} ms for layer {spec.key!r}")
            table.set(spec.key, ms)
            measured_since_checkpoint += 1
            if checkpoint is not None and measured_since_checkpoint >= checkpoint_every:
                table.save(checkpoint)
                measured_since_checkpoint = 0
            progress(
                {
                    "kind": "profile",
                    "current": index,
                    "total": total,
                    "key": spec.key,
                    "ms": ms,
                    "elapsed_s": time.perf_counter() - started,
                }
            )
    except (JobCancelled, KeyboardInterrupt):
        if checkpoint is not None:
            table.save(checkpoint)
        raise
    table.metadata["updated"] = _now()
    table.metadata["build_s"] = table.metadata.get("build_s", 0.0) + (time.perf_counter() - started)
    if checkpoint is not None:
        table.save(checkpoint)
    return table


def fit_overhead(
    space: SearchSpace,
    table: LatencyTable,
    measured: Sequence[tuple[Arch, float]],
) -> float:
    """Fit the per-network ``overhead_ms`` and ``per_layer_ms`` terms to end-to-end timings.

    Each residual r = measured - sum(entries) of a network with L layers is modelled as
    ``overhead + L * per_layer``. The overhead absorbs what per-layer timing cannot see (the one
    call into the network, pooling/flatten glue); the per-layer term mostly removes the call cost
    that every entry, timed on its own, carries once per layer (so it is usually negative). A
    single constant fitted on deep networks came out negative and predicted small networks
    below zero. The fit is robust like a median: Theil-Sen (median of pairwise slopes over
    networks of different depth, then the median intercept). When all networks have the same
    depth, only the constant is fitted. Physical bounds are kept: the overhead is never negative
    (a negative residual is put on the layers instead) and no layer's corrected entry drops
    below a tenth of its measured value, so every prediction stays positive. Returns the overhead.
    """
    if not measured:
        raise LatencyTableError("fit_overhead needs at least one (arch, measured ms) pair")
    residuals: list[float] = []
    depths: list[int] = []
    for arch, ms in measured:
        if not valid_ms(ms):
            raise LatencyTableError(f"measured latency must be a finite positive ms, got {ms!r}")
        entries = [table.entries[spec.key] for spec in space.layer_specs(arch)]
        residuals.append(ms - sum(entries))
        depths.append(len(entries))
    slopes = [
        (residuals[j] - residuals[i]) / (depths[j] - depths[i])
        for i in range(len(residuals))
        for j in range(i + 1, len(residuals))
        if depths[i] != depths[j]
    ]
    per_layer = float(statistics.median(slopes)) if slopes else 0.0
    overhead = float(statistics.median(r - per_layer * d for r, d in zip(residuals, depths, strict=True)))
    if overhead < 0:
        overhead = 0.0
        per_layer = float(statistics.median(r / d for r, d in zip(residuals, depths, strict=True)))
    per_layer = max(per_layer, -0.9 * min(table.entries.values()))
    table.overhead_ms = overhead
    table.per_layer_ms = per_layer
    table.metadata["overhead_fit"] = {
        "networks": len(residuals),
        "residuals_ms": residuals,
        "layers": depths,
        "overhead_ms": overhead,
        "per_layer_ms": per_layer,
    }
    return overhead


def error_metrics(predicted: Sequence[float], measured: Sequence[float]) -> dict[str, float]:
    """Share within ±10 %, mean absolute percentage error (%), mean squared error (ms²)."""
    if len(predicted) != len(measured) or not predicted:
        raise LatencyTableError("need equally many, and at least one, predicted and measured values")
    relative = [abs(p - m) / m for p, m in zip(predicted, measured, strict=True)]
    return {
        "within_10pct": sum(r <= 0.10 for r in relative) / len(relative),
        "mape": 100.0 * statistics.fmean(relative),
        "mse": statistics.fmean((p - m) ** 2 for p, m in zip(predicted, measured, strict=True)),
    }


def accuracy_report(
    space: SearchSpace,
    lut: LatencyTable,
    measure_fn_for_arch: Callable[[Arch], float],
    n: int,
    rngs: Rngs,
    progress: ProgressCallback = null_progress,
) -> dict[str, Any]:
    """Compare LUT predictions with end-to-end measurements of ``n`` random sub-networks.

    Returns ``{"n", "within_10pct", "mape", "mse", "samples": [{"predicted_ms", "measured_ms",
    "arch"}...], "date"}``; emits ``{"kind": "accuracy", ...}`` progress per sub-network.
    """
    if not isinstance(n, int) or n < 1:
        raise LatencyTableError(f"n must be a positive int, got {n!r}")
    samples = []
    for index in range(1, n + 1):
        arch = space.sample(rngs.numpy)
        predicted = lut.predict(space, arch)
        measured = measure_fn_for_arch(arch)
        if not valid_ms(measured):
            raise LatencyTableError(f"measured latency must be a finite positive ms, got {measured!r}")
        samples.append({"predicted_ms": predicted, "measured_ms": measured, "arch": arch.to_dict()})
        progress(
            {
                "kind": "accuracy",
                "current": index,
                "total": n,
                "predicted_ms": predicted,
                "measured_ms": measured,
            }
        )
    metrics = error_metrics([s["predicted_ms"] for s in samples], [s["measured_ms"] for s in samples])
    return {"n": n, **metrics, "samples": samples, "date": _now()}
