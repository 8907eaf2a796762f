"""One hardware-constrained adaption request, end to end (what the dashboard's worker calls).

``run_adaption(request, out_dir=..., progress=..., state_path=...)``:

1. **Check everything before writing anything**: the super-net checkpoint (a ``meta_train``
   checkpoint of a super-net run; its :class:`~engine.meta.runs.RunSpec` rebuilds learner and
   space), the budgets (finite, positive, reachable by the cheapest architecture), the latency
   table (built for this super-net's search space), the support set (exactly the super-net's
   N classes), the MAML/MAML++ baseline checkpoints.
2. **Search**: one GA (Algorithm 1) per budget, all sharing one fitness cache (a Pareto sweep,
   same seeds and events as :func:`engine.search.evolution.search_budgets`), on fixed 16-task
   slices of the super-net dataset's validation tasks (or of tasks cut from the support set).
   A JSON state is written atomically after every generation; the same ``state_path`` after a
   crash or :class:`~engine.progress.JobCancelled` continues the run where it stopped, with the
   same result as an uninterrupted run.
3. **Baselines**: random search with the GA's number of evaluations per budget; the MAML and
   MAML++ 4-conv nets as reference points (measured accuracy when their checkpoints are given,
   otherwise exact params/MACs and ``accuracy: null``).
4. **Test accuracy** (mean ± 95 % CI over test tasks) of every chosen architecture.
5. **Packages**: one folder per budget (``engine.search.package``), built in a temporary folder
   inside ``out_dir`` and renamed into place only when all of them are complete; then
   ``adaption.json`` (the :class:`AdaptionResult`).

:func:`retrain_subnet` is the paper's optional last stage: meta-train one fixed sub-net further
from its inherited weights.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.adaption_presets import ADAPTION_PRESETS, FINAL_METRICS, SEARCH_PRECISIONS, AdaptionPreset
from engine.atomic import atomic_write_json
from engine.cost import count_macs, count_params
from engine.data.dataset import CIFAR100_NORMALIZATION, IMAGENET_NORMALIZATION, UNIT_RANGE, Normalization
from engine.data.errors import DatasetError
from engine.latency.measure import SpeedReference, measure_module, torch_threads
from engine.meta.evaluate import confidence_interval95
from engine.meta.runs import DEVICES, RunSpec, build_run, spec_on_device, task_source
from engine.meta.train import load_checkpoint, meta_train
from engine.progress import ProgressCallback, null_progress
from engine.search.adapt import (
    AdaptionInputError,
    ArchScore,
    SuperNetScorer,
    inner_loop_from_learner,
    make_costs_fn,
    scoring_precision,
    slice_tasks,
    task_slices,
    task_tensors,
)
from engine.search.constraints import (
    COST_KINDS,
    Constraint,
    ConstraintError,
    CostModel,
    InfeasibleBudgetError,
)
from engine.search.evolution import (
    DEEPEN_MODES,
    FINALISTS_FROM,
    FitnessCache,
    FrontPoint,
    GAConfig,
    SearchResult,
    check_reachable,
    run_ga,
    sweep_order,
)
from engine.search.memo import FitnessMemo, FitnessMemoError, arch_text, model_key, tasks_key
from engine.search.package import (
    PackageInputs,
    Preprocessing,
    arch_code,
    budget_slug,
    extended_inner_loop,
    extract_for_export,
    finetune_supernet,
    query_bn_step,
    recalibrate_batchnorm,
    strict_json,
    write_package,
)
from engine.search.parallel import ProcessFitness
from engine.search.pareto import pareto_front
from engine.search.random_search import random_search
from engine.seeding import derive_seed, make_rngs
from engine.supernet import SuperNet

__all__ = [
    "ADAPTION_PRESETS",
    "AdaptionInputError",
    "AdaptionPreset",
    "AdaptionRequest",
    "AdaptionRequestError",
    "AdaptionResult",
    "AdaptionStateError",
    "BudgetOutcome",
    "InfeasibleBudgetError",
    "RetrainResult",
    "accuracy_on_tasks",
    "paired_difference",
    "request_test_tasks",
    "retrain_subnet",
    "run_adaption",
    "search_error",
]

STATE_VERSION = 1
#: Request fields that say how to run the search here, not what it computes (see AdaptionRequest.identity).
EXECUTION_FIELDS = ("threads", "search_workers", "fitness_memo")
RESULT_NAME = "adaption.json"
TASK_SOURCES = ("validation", "support")
#: Weight of the loss in the "accuracy" search fitness, error + weight * min(loss, cap). The term
#: is at most 2e-5; a mean error rate over up to four slices of up to 12,000 query images each
#: moves in steps of at least 1 / 48,000 = 2.08e-5, so the term only orders equal error rates.
SEARCH_ERROR_TIE_BREAK = 1e-6
MAX_TIE_BREAK_LOSS = 20.0
WEIGHTS = ("meta", "finetuned")
# Random streams (engine.seeding.derive_seed) of one request's seed.
VALIDATION_TASK_STREAM = 11
SUPPORT_TASK_STREAM = 12
TEST_TASK_STREAM = 13
FINAL_TASK_STREAM = 14
FINAL_SUPPORT_TASK_STREAM = 15
RANDOM_SEARCH_STREAM = 1000
#: Images per dataset (channels, normalisation, Omniglot's inverted strokes) - how the
#: super-net's training images were made, hence how a support set must be prepared.
DATASET_PREPROCESSING: dict[str, tuple[Normalization, bool]] = {
    "omniglot": (UNIT_RANGE, True),
    "mini-imagenet": (IMAGENET_NORMALIZATION, False),
    "cifar-fs": (CIFAR100_NORMALIZATION, False),
    "fc100": (CIFAR100_NORMALIZATION, False),
    "synthetic": (UNIT_RANGE, False),
}
#: Filters of the papers' 4-conv nets per (channels, image size): 64 for Omniglot, 48 for
#: Mini-ImageNet (MAML, MAML++); 64 otherwise (CIFAR-FS's 4-conv baselines).
PAPER_BASELINE_FILTERS = {(1, 28): 64, (3, 84): 48}
MAX_FRONT_POINTS_IN_EVENT = 64


class AdaptionRequestError(ValueError):
    """A request that cannot be run: a bad field, a file that does not fit the super-net."""


class AdaptionStateError(ValueError):
    """A saved adaption state that belongs to another request or is damaged."""


# --------------------------------------------------------------------------- the request
def _check_int(name: str, value: Any, minimum: int, optional: bool = True) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise AdaptionRequestError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_path(name: str, value: Any, optional: bool = True) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or not value.strip():
        raise AdaptionRequestError(f"{name} must be a non-empty path string, got {value!r}")


@dataclass(frozen=True)
class AdaptionRequest:
    """Everything one adaption job needs, as plain JSON-friendly values.

    ``budgets`` are limits of one ``constraint`` kind in ``unit`` (``None``: the kind's base
    unit - ms, parameters, MACs); one package per budget. ``None`` for a GA/evaluation size
    means the preset's value. ``task_source="support"`` scores architectures on tasks cut from
    the support set (each class's images split into support and query) instead of the super-net
    dataset's validation tasks. ``weights``: ``"finetuned"`` (default with a support set) or
    ``"meta"`` (default without). ``test_tasks=0`` skips the test-accuracy evaluation.
    """

    supernet: str
    constraint: str
    budgets: tuple[float, ...]
    unit: str | None = None
    lut: str | None = None
    preset: str = "cpu"
    pool_size: int | None = None
    iterations: int | None = None
    tasks_per_slice: int | None = None
    num_slices: int | None = None
    final_candidates: int | None = None
    final_slices: int | None = None
    final_metric: str | None = None
    finalists_from: str | None = None
    warm_start: int | None = None
    patience: int | None = None
    deepen: str | None = None
    depth_elites: int | None = None
    search_metric: str | None = None
    #: The arithmetic of the search slices' scores (SEARCH_PRECISIONS); None: the preset's.
    search_precision: str | None = None
    seed: int = 0
    task_source: str = "validation"
    support: str | None = None
    invert_support: bool | None = None
    weights: str | None = None
    finetune_steps: int | None = None
    search_queries: int | None = None
    test_tasks: int | None = None
    random_baseline: bool = True
    baseline_checkpoints: tuple[str, ...] = ()
    export_onnx: bool = True
    measure_latency: bool = False
    threads: int = 1
    #: Processes scoring GA candidates in parallel (one torch thread each); None: ``threads``.
    search_workers: int | None = None
    #: Where the search and the test-task scoring run: "cpu" or "cuda" (this machine's GPU; the
    #: search then runs in this process). Packages are always built on the CPU. Part of the
    #: request's identity: scores on another device differ in float rounding.
    device: str = "cpu"
    #: A SQLite file of losses kept across requests of this super-net (engine.search.memo);
    #: None: none. A cache only - hits are the numbers a fresh evaluation gives - so not part of
    #: the request's identity.
    fitness_memo: str | None = None

    def __post_init__(self) -> None:
        _check_path("supernet", self.supernet, optional=False)
        if self.constraint not in COST_KINDS:
            raise AdaptionRequestError(f"constraint must be one of {COST_KINDS}, got {self.constraint!r}")
        budgets = self.budgets
        if isinstance(budgets, str | bytes) or not isinstance(budgets, Sequence) or not budgets:
            raise AdaptionRequestError(f"budgets must be a non-empty list of numbers, got {budgets!r}")
        object.__setattr__(self, "budgets", tuple(budgets))
        for index, budget in enumerate(self.budgets):
            try:
                Constraint(self.constraint, budget, self.unit)
            except ConstraintError as error:
                raise AdaptionRequestError(f"budget {index + 1} ({budget!r}): {error}") from None
        normalised = [float(b) for b in self.budgets]
        if len(set(normalised)) != len(normalised):
            raise AdaptionRequestError(f"budgets must be distinct, got {list(self.budgets)}")
        object.__setattr__(self, "budgets", tuple(normalised))
        object.__setattr__(self, "unit", Constraint(self.constraint, normalised[0], self.unit).unit)
        _check_path("lut", self.lut)
        if self.constraint == "latency_ms" and self.lut is None:
            raise AdaptionRequestError("a latency_ms budget needs a latency table (lut) of the target device")
        if self.preset not in ADAPTION_PRESETS:
            raise AdaptionRequestError(
                f"unknown preset {self.preset!r}; choose one of {', '.join(ADAPTION_PRESETS)}"
            )
        _check_int("pool_size", self.pool_size, 2)
        for name in ("iterations", "tasks_per_slice", "num_slices", "finetune_steps", "search_queries"):
            _check_int(name, getattr(self, name), 1)
        _check_int("final_candidates", self.final_candidates, 0)
        _check_int("final_slices", self.final_slices, 0)
        _check_int("warm_start", self.warm_start, 0)
        _check_int("patience", self.patience, 0)
        _check_int("depth_elites", self.depth_elites, 0)
        if self.deepen is not None and self.deepen not in DEEPEN_MODES:
            raise AdaptionRequestError(f"deepen must be one of {DEEPEN_MODES}, got {self.deepen!r}")
        for name in ("final_metric", "search_metric"):
            value = getattr(self, name)
            if value is not None and value not in FINAL_METRICS:
                raise AdaptionRequestError(f"{name} must be one of {FINAL_METRICS}, got {value!r}")
        if self.search_precision is not None and self.search_precision not in SEARCH_PRECISIONS:
            raise AdaptionRequestError(
                f"search_precision must be one of {SEARCH_PRECISIONS}, got {self.search_precision!r}"
            )
        if self.finalists_from is not None and self.finalists_from not in FINALISTS_FROM:
            raise AdaptionRequestError(
                f"finalists_from must be one of {FINALISTS_FROM}, got {self.finalists_from!r}"
            )
        _check_int("seed", self.seed, 0, optional=False)
        _check_int("threads", self.threads, 1, optional=False)
        _check_int("search_workers", self.search_workers, 1)
        if self.device not in DEVICES:
            raise AdaptionRequestError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.device == "cuda" and (self.search_workers or 1) > 1:
            raise AdaptionRequestError(
                "search_workers must be 1 on cuda: the GPU scores the candidates in this process "
                "(worker processes share CPU cores)"
            )
        if self.device == "cuda" and self.search_precision_value != "float32":
            raise AdaptionRequestError(
                f"search_precision {self.search_precision_value!r} is a CPU option (autocast on the "
                "CPU); on cuda the search scores in float32"
            )
        if self.test_tasks is not None:
            _check_int("test_tasks", self.test_tasks, 0)
            if self.test_tasks == 1:
                raise AdaptionRequestError("test_tasks must be 0 (skip) or >= 2 (a confidence interval)")
        if self.task_source not in TASK_SOURCES:
            raise AdaptionRequestError(f"task_source must be one of {TASK_SOURCES}, got {self.task_source!r}")
        _check_path("support", self.support)
        _check_path("fitness_memo", self.fitness_memo)
        if self.task_source == "support" and self.support is None:
            raise AdaptionRequestError("task_source='support' needs a support set")
        if self.weights is not None and self.weights not in WEIGHTS:
            raise AdaptionRequestError(f"weights must be one of {WEIGHTS}, got {self.weights!r}")
        if self.weights == "finetuned" and self.support is None:
            raise AdaptionRequestError("weights='finetuned' needs a support set to fine-tune on")
        for name in ("random_baseline", "export_onnx", "measure_latency"):
            if not isinstance(getattr(self, name), bool):
                raise AdaptionRequestError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.invert_support is not None and not isinstance(self.invert_support, bool):
            raise AdaptionRequestError(
                f"invert_support must be true, false or null, got {self.invert_support!r}"
            )
        checkpoints = self.baseline_checkpoints
        if isinstance(checkpoints, str | bytes) or not isinstance(checkpoints, Sequence):
            raise AdaptionRequestError(f"baseline_checkpoints must be a list of paths, got {checkpoints!r}")
        object.__setattr__(self, "baseline_checkpoints", tuple(checkpoints))
        for index, path in enumerate(self.baseline_checkpoints):
            _check_path(f"baseline_checkpoints[{index}]", path, optional=False)

    # ------------------------------------------------------------------ derived
    @property
    def preset_values(self) -> AdaptionPreset:
        return ADAPTION_PRESETS[self.preset]

    @property
    def weights_kind(self) -> str:
        if self.weights is not None:
            return self.weights
        return "finetuned" if self.support is not None else "meta"

    @property
    def final_metric_value(self) -> str:
        return self.preset_values.final_metric if self.final_metric is None else self.final_metric

    @property
    def search_metric_value(self) -> str:
        return self.preset_values.search_metric if self.search_metric is None else self.search_metric

    @property
    def search_precision_value(self) -> str:
        return self.preset_values.search_precision if self.search_precision is None else self.search_precision

    @property
    def test_task_count(self) -> int:
        return self.preset_values.test_tasks if self.test_tasks is None else self.test_tasks

    def constraints(self) -> list[Constraint]:
        return [Constraint(self.constraint, budget, self.unit) for budget in self.budgets]

    def ga_config(self) -> GAConfig:
        """The GA's settings: the preset's, overridden by the request's."""
        preset = self.preset_values

        def pick(name: str) -> Any:
            value = getattr(self, name)
            return getattr(preset, name) if value is None else value

        return GAConfig(
            pool_size=pick("pool_size"),
            iterations=pick("iterations"),
            tasks_per_slice=pick("tasks_per_slice"),
            num_slices=pick("num_slices"),
            final_candidates=pick("final_candidates"),
            final_slices=pick("final_slices"),
            finalists_from=pick("finalists_from"),
            warm_start=pick("warm_start"),
            patience=pick("patience"),
            deepen=pick("deepen"),
            depth_elites=pick("depth_elites"),
            seed=self.seed,
        )

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["budgets"] = list(self.budgets)
        data["baseline_checkpoints"] = list(self.baseline_checkpoints)
        return data

    def identity(self) -> dict[str, Any]:
        """What the search's outcome depends on: the request without how this machine runs it.

        A run resumed by another worker (other cores, other ``NASWEB_SEARCH_WORKERS``) is still
        the same request; everything else must match the saved state."""
        return request_identity(self.to_dict())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AdaptionRequest:
        if not isinstance(data, Mapping):
            raise AdaptionRequestError(
                f"an adaption request must be a JSON object, got {type(data).__name__}"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise AdaptionRequestError(f"unknown adaption request fields {unknown}")
        missing = sorted(name for name in ("supernet", "constraint", "budgets") if name not in data)
        if missing:
            raise AdaptionRequestError(f"adaption request lacks {missing}")
        values = dict(data)
        for name in ("budgets", "baseline_checkpoints"):
            if isinstance(values.get(name), list):
                values[name] = tuple(values[name])
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> AdaptionRequest:
        try:
            data = json.loads(text)
        except ValueError as error:
            raise AdaptionRequestError(f"adaption request is not valid JSON: {error}") from None
        return cls.from_dict(data)

    @classmethod
    def from_budget_strings(cls, budgets: Sequence[str], **fields_: Any) -> AdaptionRequest:
        """A request from ``["latency_ms=3", "latency_ms=500us"]`` (one kind; units may differ)."""
        if not budgets:
            raise AdaptionRequestError("at least one budget is needed, e.g. latency_ms=3")
        try:
            parsed = [Constraint.parse(text) for text in budgets]
        except ConstraintError as error:
            raise AdaptionRequestError(str(error)) from None
        kinds = sorted({c.kind for c in parsed})
        if len(kinds) > 1:
            raise AdaptionRequestError(f"all budgets of one request must be of one kind, got {kinds}")
        units = {c.unit for c in parsed}
        if len(units) == 1:
            unit, limits = parsed[0].unit, [c.limit for c in parsed]
        else:  # mixed units: express every budget in the kind's base unit
            unit, limits = None, [c.base_limit for c in parsed]
        return cls(constraint=kinds[0], budgets=tuple(limits), unit=unit, **fields_)


# --------------------------------------------------------------------------- the result
def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


@dataclass(frozen=True)
class BudgetOutcome:
    """What one budget of the sweep produced (JSON-native fields)."""

    index: int
    budget: dict[str, Any]
    slug: str
    arch: dict[str, Any]
    arch_code: str
    costs: dict[str, float]
    constraint_met: bool
    search_loss: float | None
    evaluations: int
    cache_hits: int
    search_s: float
    test_accuracy: dict[str, Any] | None
    random: dict[str, Any] | None
    package: str
    model_card: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class AdaptionResult:
    """The outcome of :func:`run_adaption` (also written to ``out_dir/adaption.json``)."""

    request: AdaptionRequest
    outcomes: tuple[BudgetOutcome, ...]
    front: tuple[dict[str, Any], ...]
    baselines: tuple[dict[str, Any], ...]
    supernet: dict[str, Any]
    device: str | None
    evaluations: int
    cache_hits: int
    ms_per_evaluation: float | None
    search_s: float
    random_s: float
    elapsed_s: float
    out_dir: str
    resumed: bool = False
    #: Every call of the fitness (the GA sweep's ``evaluations``, random search's, the final
    #: choices' held-out scores) and how many of them the request's fitness memo answered;
    #: ``ms_per_evaluation`` is over the others, the ones actually scored.
    fitness_calls: int = 0
    memo_hits: int = 0

    @property
    def constraints_met(self) -> bool:
        return all(outcome.constraint_met for outcome in self.outcomes)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["request"] = self.request.to_dict()
        data["outcomes"] = [outcome.to_dict() for outcome in self.outcomes]
        data["front"] = list(self.front)
        data["baselines"] = list(self.baselines)
        data["constraints_met"] = self.constraints_met
        # What the front's and the outcomes' search losses measure (the preset's metric when the
        # request left it open), so that a reader need not know the presets of this version.
        data["search_metric"] = self.request.search_metric_value
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AdaptionResult:
        values = {f.name: data[f.name] for f in fields(cls) if f.name in data}
        values["request"] = AdaptionRequest.from_dict(data["request"])
        values["outcomes"] = tuple(BudgetOutcome(**outcome) for outcome in data["outcomes"])
        values["front"] = tuple(data["front"])
        values["baselines"] = tuple(data["baselines"])
        return cls(**values)

    @classmethod
    def load(cls, out_dir: str | Path) -> AdaptionResult:
        path = Path(out_dir) / RESULT_NAME
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise AdaptionStateError(f"{path}: not a readable adaption result ({error!r})") from None


#: AdaptionRequest fields whose default is None ("the preset's value", "none").
_OPTIONAL_OVERRIDES = frozenset(f.name for f in fields(AdaptionRequest) if f.default is None)


def request_identity(data: Mapping[str, Any]) -> dict[str, Any]:
    """A request's JSON without :data:`EXECUTION_FIELDS` (see :meth:`AdaptionRequest.identity`)
    and without the optional overrides left unset (``None``), so that a request saved before
    such an override existed still matches its state."""
    return {
        name: value
        for name, value in data.items()
        if name not in EXECUTION_FIELDS and not (value is None and name in _OPTIONAL_OVERRIDES)
    }


# --------------------------------------------------------------------------- preparation
def search_error(score: ArchScore) -> float:
    """The "accuracy" search fitness of a search slice: the query error rate, ties broken by the
    loss.

    On a slice's ~1,000 query images whole families of sub-nets share one error rate, and their
    order would otherwise be the pool's. (It did not make the GAs run longer before patience
    stopped them: docs/BENCHMARKS.md, "Which score ranks sub-nets".) The loss term stays below
    the smallest step of a mean error rate (SEARCH_ERROR_TIE_BREAK); a NaN loss makes the
    fitness NaN, which the GA treats as infinite, as it does in the loss search."""
    return 1.0 - score.accuracy + SEARCH_ERROR_TIE_BREAK * min(score.loss, MAX_TIE_BREAK_LOSS)


@dataclass
class TimedFitness:
    """The GA's fitness with a stopwatch (ms per evaluation is a reported figure).

    Evaluations run in ``workers`` processes (:class:`engine.search.parallel.ProcessFitness`,
    one torch thread each, so the losses do not depend on ``workers``); ``seconds`` is wall
    time, so ms per evaluation is the effective cost with all workers busy.
    """

    scorer: SuperNetScorer
    slices: list[list[Any]]
    workers: int = 1
    #: Slices from this id on are the final choice's held-out ones; with final_metric
    #: "accuracy" they score the query error rate instead of the loss.
    search_slices: int | None = None
    final_metric: str = "loss"
    #: "accuracy": the search slices score the query error rate too (AdaptionPreset.search_metric).
    search_metric: str = "loss"
    #: The search slices' arithmetic (AdaptionPreset.search_precision); held-out slices, which
    #: decide the final choice, always score in float32.
    search_precision: str = "float32"
    #: Losses kept across requests (:mod:`engine.search.memo`); a hit is the same number a fresh
    #: evaluation would give, so the search's choices do not depend on it.
    memo: FitnessMemo | None = None
    seconds: float = 0.0
    calls: int = 0
    #: Calls answered by ``memo`` (included in ``calls``).
    memo_hits: int = 0
    parallel: ProcessFitness = field(init=False, repr=False)
    _slice_keys: list[str] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.parallel = ProcessFitness(self._loss, self.workers)

    def _held_out(self, slice_id: int) -> bool:
        return self.search_slices is not None and slice_id >= self.search_slices

    def _scored(self, slice_id: int) -> str:
        """What slice ``slice_id`` scores: "loss", "error" (a held-out slice's error rate) or
        "error-then-loss" (a search slice's error rate, ties broken by the loss)."""
        held_out = self._held_out(slice_id)
        if (self.final_metric if held_out else self.search_metric) != "accuracy":
            return "loss"
        return "error" if held_out else "error-then-loss"

    def _precision(self, slice_id: int) -> str:
        return "float32" if self._held_out(slice_id) else self.search_precision

    def _memo_name(self, slice_id: int) -> str:
        """The memo's name for what slice ``slice_id`` scores and in which arithmetic, so that
        entries of one never answer for another ("loss", "error-then-loss@bfloat16", ...)."""
        precision = self._precision(slice_id)
        scored = self._scored(slice_id)
        return scored if precision == "float32" else f"{scored}@{precision}"

    def _loss(self, arch: Any, slice_id: int) -> float:
        with scoring_precision(self._precision(slice_id)):
            score = self.scorer.score(arch, self.slices[slice_id])
        scored = self._scored(slice_id)
        if scored == "loss":
            return score.loss
        if scored == "error":
            return 1.0 - score.accuracy
        return search_error(score)

    def slice_key(self, slice_id: int) -> str:
        """The memo's key of a slice: its tasks and what is scored on it (computed once)."""
        if self._slice_keys is None:
            self._slice_keys = [
                tasks_key([task_tensors(task) for task in tasks], self._memo_name(index))
                for index, tasks in enumerate(self.slices)
            ]
        return self._slice_keys[slice_id]

    def counters(self) -> dict[str, Any]:
        """What a saved state keeps of the stopwatch (so a resumed run reports the whole run)."""
        return {"fitness_s": self.seconds, "fitness_calls": self.calls, "memo_hits": self.memo_hits}

    def __call__(self, arch: Any, slice_id: int) -> float:
        return self.many([(arch, slice_id)])[0]

    def many(self, pairs: Sequence[tuple[Any, int]]) -> list[float]:
        started = time.perf_counter()
        try:
            if self.memo is None:
                return self.parallel.many(pairs)
            memo_keys = [(self.slice_key(slice_id), arch_text(arch)) for arch, slice_id in pairs]
            known = self.memo.get_many(memo_keys)
            missing = [index for index, key in enumerate(memo_keys) if key not in known]
            scored = self.parallel.many([pairs[index] for index in missing])
            new = dict(zip((memo_keys[index] for index in missing), scored, strict=True))
            self.memo.put_many((tasks, arch, loss) for (tasks, arch), loss in new.items())
            self.memo_hits += len(pairs) - len(missing)
            return [known[key] if key in known else new[key] for key in memo_keys]
        finally:
            self.seconds += time.perf_counter() - started
            self.calls += len(pairs)

    def close(self) -> None:
        self.parallel.close()


@dataclass
class _Context:
    request: AdaptionRequest
    checkpoint_path: Path
    checkpoint_iteration: int
    spec: RunSpec
    learner: Any
    supernet: SuperNet
    space: Any
    lut: Any
    cost_model: CostModel
    constraints: list[Constraint]
    config: GAConfig
    validation_tasks: list[Any]
    fitness: TimedFitness
    scorer: SuperNetScorer
    support: Any
    preprocessing: Preprocessing
    baselines: list[tuple[Path, Any, dict[str, Any]]] = field(default_factory=list)


def load_supernet(path: str | Path, device: str = "cpu") -> tuple[RunSpec, Any, int]:
    """``(spec, run, iteration)`` of a super-net meta-training checkpoint, weights loaded, the
    learner on ``device`` whatever it was trained on; ``spec`` is the stored one."""
    path = Path(path)
    state = load_checkpoint(path)  # MetaTrainError (a ValueError) when missing or foreign
    info = state.get("run_info") or {}
    if "spec" not in info:
        raise AdaptionRequestError(
            f"{path}: checkpoint has no run spec (write it with engine.meta meta-train / build_run)"
        )
    spec = RunSpec.from_dict(info["spec"])
    if spec.backbone == "maml":
        raise AdaptionRequestError(f"{path}: checkpoint is a fixed MAML++ 4-conv baseline, not a super-net")
    if "retrain" in info:
        raise AdaptionRequestError(f"{path}: checkpoint holds a re-trained fixed sub-net, not a super-net")
    run = build_run(spec_on_device(spec, device))
    run.learner.load_state_dict(state["learner"])
    run.learner.eval()
    return spec, run, int(state["iteration"])


def _load_baseline(path: Path, spec: RunSpec) -> tuple[Any, dict[str, Any]]:
    state = load_checkpoint(path)
    info = state.get("run_info") or {}
    if "spec" not in info:
        raise AdaptionRequestError(f"baseline {path}: checkpoint has no run spec")
    baseline_spec = RunSpec.from_dict(info["spec"])
    if baseline_spec.backbone != "maml":
        raise AdaptionRequestError(
            f"baseline {path}: not a MAML/MAML++ 4-conv checkpoint ({baseline_spec.backbone})"
        )
    mine = (spec.dataset, spec.ways, spec.shots)
    theirs = (baseline_spec.dataset, baseline_spec.ways, baseline_spec.shots)
    if mine != theirs:
        raise AdaptionRequestError(
            f"baseline {path}: trained on {theirs[0]} {theirs[1]}-way {theirs[2]}-shot, "
            f"the super-net on {mine[0]} {mine[1]}-way {mine[2]}-shot"
        )
    run = build_run(baseline_spec)
    run.learner.load_state_dict(state["learner"])
    return run, {"spec": baseline_spec.to_dict(), "iteration": int(state["iteration"])}


def _load_support(request: AdaptionRequest, spec: RunSpec, space: Any, preprocessing: Preprocessing) -> Any:
    from engine.data.image_folder import load_support_set

    path = Path(request.support)  # type: ignore[arg-type]
    if not path.exists():
        raise AdaptionRequestError(f"support set {path} does not exist")
    normalization = Normalization(mean=preprocessing.mean, std=preprocessing.std)
    try:
        support = load_support_set(
            path,
            image_size=space.image_size,
            channels=space.in_channels,
            normalization=normalization,
            workers=1,
        )
    except DatasetError as error:
        raise AdaptionRequestError(f"support set {path}: {error}") from None
    if support.ways != spec.ways:
        raise AdaptionRequestError(
            f"support set {path} has {support.ways} classes ({', '.join(support.class_names)}) but the "
            f"super-net is {spec.ways}-way: give exactly {spec.ways} class folders"
        )
    if preprocessing.invert:
        from engine.data.image_folder import SupportSet

        support = SupportSet(
            x=preprocessing.invert_tensor(support.x).contiguous(),
            y=support.y,
            class_names=support.class_names,
        )
    return support


def _support_tasks(support: Any, count: int, seed: int) -> list[tuple[torch.Tensor, ...]]:
    """``count`` tasks cut from the support set: each class's images split into support and query."""
    labels = support.y.numpy()
    by_class = [np.flatnonzero(labels == c) for c in range(support.ways)]
    small = [support.class_names[c] for c, idx in enumerate(by_class) if len(idx) < 2]
    if small:
        raise AdaptionRequestError(
            f"task_source='support' needs >= 2 images per class (one for support, one for query); "
            f"too few in {small}"
        )
    rng = make_rngs(seed).numpy
    tasks = []
    for _ in range(count):
        support_idx, query_idx = [], []
        for indices in by_class:
            order = rng.permutation(indices)
            queries = max(1, len(order) // 2)
            query_idx.extend(order[:queries])
            support_idx.extend(order[queries:])
        s, q = torch.as_tensor(np.asarray(support_idx)), torch.as_tensor(np.asarray(query_idx))
        tasks.append((support.x[s], support.y[s], support.x[q], support.y[q]))
    return tasks


def _validation_tasks(
    request: AdaptionRequest, spec: RunSpec, count: int, *, final: bool = False
) -> list[Any]:
    """``count`` validation tasks: the search's (``search_queries`` query images per class) or,
    with ``final``, the final choice's held-out ones (another random stream, the spec's query count)."""
    if final:
        task_spec, stream = spec, FINAL_TASK_STREAM
    else:
        task_spec = spec if request.search_queries is None else spec.with_(queries=request.search_queries)
        stream = VALIDATION_TASK_STREAM
    _, batches = task_source(task_spec, "val")
    tasks: list[Any] = []
    for batch in batches(count, 16, derive_seed(request.seed, stream)):
        tasks.extend(slice_tasks(batch))
    return tasks


def _prepare(request: AdaptionRequest) -> _Context:
    """Load and check every input; raises before anything is written."""
    from engine.latency.lut import LatencyTable

    spec, run, iteration = load_supernet(request.supernet, request.device)
    space, learner = run.space, run.learner
    supernet: SuperNet = learner.model
    lut = None
    if request.lut is not None:
        if not Path(request.lut).is_file():
            raise AdaptionRequestError(f"latency table {request.lut} does not exist")
        lut = LatencyTable.load(request.lut)
    cost_model = CostModel(make_costs_fn(space, lut))  # AdaptionInputError for another space's LUT
    constraints = request.constraints()
    for constraint in constraints:
        check_reachable(space, cost_model, (constraint,))  # InfeasibleBudgetError
    normalization, invert = DATASET_PREPROCESSING[spec.dataset]
    if request.invert_support is not None:
        invert = request.invert_support
    preprocessing = Preprocessing(
        channels=space.in_channels,
        image_size=space.image_size,
        mean=normalization.mean,
        std=normalization.std,
        invert=invert,
    )
    support = _load_support(request, spec, space, preprocessing) if request.support is not None else None
    config = request.ga_config()
    count = config.tasks_per_slice * config.num_slices
    final_count = config.tasks_per_slice * config.final_slices
    if request.task_source == "support":
        tasks = _support_tasks(support, count, derive_seed(request.seed, SUPPORT_TASK_STREAM))
        final_tasks = _support_tasks(
            support, final_count, derive_seed(request.seed, FINAL_SUPPORT_TASK_STREAM)
        )
    else:
        tasks = _validation_tasks(request, spec, count)
        final_tasks = _validation_tasks(request, spec, final_count, final=True) if final_count else []
    # Slice ids 0 .. num_slices - 1 are the search's, the rest the final choice's (GAConfig.final_slices).
    slices = task_slices(tasks, config.tasks_per_slice)
    if final_tasks:
        slices += task_slices(final_tasks, config.tasks_per_slice)
    scorer = SuperNetScorer(supernet, inner_loop_from_learner(learner))
    memo = None
    if request.fitness_memo is not None:
        try:
            memo = FitnessMemo(request.fitness_memo, model_key(learner.state_dict(), request.device))
        except FitnessMemoError as error:
            raise AdaptionRequestError(str(error)) from None
    context = _Context(
        request=request,
        checkpoint_path=Path(request.supernet),
        checkpoint_iteration=iteration,
        spec=spec,
        learner=learner,
        supernet=supernet,
        space=space,
        lut=lut,
        cost_model=cost_model,
        constraints=constraints,
        config=config,
        validation_tasks=tasks,
        fitness=TimedFitness(
            scorer,
            slices,
            workers=1 if request.device == "cuda" else request.search_workers or request.threads,
            search_slices=config.num_slices,
            final_metric=request.final_metric_value,
            search_metric=request.search_metric_value,
            search_precision=request.search_precision_value,
            memo=memo,
        ),
        scorer=scorer,
        support=support,
        preprocessing=preprocessing,
    )
    for path in request.baseline_checkpoints:
        run_b, info = _load_baseline(Path(path), spec)
        context.baselines.append((Path(path), run_b, info))
    return context


# --------------------------------------------------------------------------- state
def _search_result_from_dict(
    data: Mapping[str, Any], decode: Callable[[dict[str, Any]], Any]
) -> SearchResult:
    def loss(value: float | None) -> float:
        return math.inf if value is None else float(value)

    return SearchResult(
        method=data["method"],
        best_arch=decode(data["best_arch"]).canonical(),
        best_loss=loss(data["best_loss"]),
        best_costs=dict(data["best_costs"]),
        constraints=tuple(Constraint.from_dict(c) for c in data["constraints"]),
        evaluations=int(data["evaluations"]),
        cache_hits=int(data["cache_hits"]),
        evaluated_archs=int(data["evaluated_archs"]),
        front=tuple(
            FrontPoint(decode(p["arch"]), dict(p["costs"]), loss(p["loss"]), int(p["slices"]))
            for p in data["front"]
        ),
        history=tuple(data.get("history", ())),
        stats=dict(data.get("stats", {})),
        elapsed_s=float(data.get("elapsed_s", 0.0)),
    )


class _StateFile:
    """The resumable state of one request (JSON, written atomically after every step)."""

    def __init__(self, path: Path | None, request: AdaptionRequest) -> None:
        self.path = path
        self.resumed = False
        self.data: dict[str, Any] = {
            "version": STATE_VERSION,
            "request": request.to_dict(),
            # The request may leave the metric to its preset, and a preset's metric can change
            # between versions (`cpu`'s did): a sweep must not switch metric when it resumes.
            "search_metric": request.search_metric_value,
            "completed": [],
            "cache": None,
            "ga_index": None,
            "ga_state": None,
            "random": {},
            "test": {},
            "fitness_s": 0.0,
            "fitness_calls": 0,
            "memo_hits": 0,
        }
        if path is not None and path.exists():
            try:
                stored = json.loads(path.read_text())
            except (OSError, ValueError) as error:
                raise AdaptionStateError(f"{path}: not a readable adaption state ({error})") from None
            if not isinstance(stored, dict) or stored.get("version") != STATE_VERSION:
                raise AdaptionStateError(f"{path}: not an adaption state of version {STATE_VERSION}")
            saved_request = stored.get("request")
            if not isinstance(saved_request, dict) or request_identity(saved_request) != request.identity():
                raise AdaptionStateError(f"{path}: the saved state belongs to a different adaption request")
            # States saved before the field existed searched on the loss (every preset did then).
            saved_metric = stored.get("search_metric", "loss")
            if saved_metric != request.search_metric_value:
                raise AdaptionStateError(
                    f"{path}: the saved state's search minimised the {saved_metric!r} metric, this "
                    f"request's minimises {request.search_metric_value!r} (its preset's default "
                    "changed); start the request again"
                )
            self.data = stored
            self.resumed = True

    def save(self) -> None:
        if self.path is not None:
            atomic_write_json(self.path, self.data, compact=True)


# --------------------------------------------------------------------------- events
def _round(value: Any, digits: int = 5) -> Any:
    if isinstance(value, float):
        return float(f"{value:.{digits}g}") if math.isfinite(value) else None
    return value


def _compact_adapt_event(
    event: Mapping[str, Any], index: int, position: int, budgets: int, decode: Callable, metric: str
) -> dict[str, Any]:
    """run_ga's per-generation event, small enough to stream (< 20 KB even at P=100).
    ``index``: the budget's place in the request; ``position``: how many budgets ran before it
    (a warm-started sweep runs them loosest first), so ``current`` only ever grows. ``metric``:
    the request's search metric, what every "fitness" and "loss" of the event measures."""
    iterations = int(event["total"])
    front = [
        {
            "costs": {k: _round(v) for k, v in point["costs"].items()},
            "loss": _round(point["loss"]),
            "arch": arch_code(decode(point["arch"])),
        }
        for point in event["front"]
    ]
    truncated = len(front) > MAX_FRONT_POINTS_IN_EVENT
    if truncated:  # keep an even spread along the cost axis, always both ends
        keep = np.unique(np.linspace(0, len(front) - 1, MAX_FRONT_POINTS_IN_EVENT).round().astype(int))
        front = [front[i] for i in keep]
    return {
        "kind": "adapt",
        "current": position * iterations + int(event["current"]),
        "total": budgets * iterations,
        "budget_index": index,
        "budgets": budgets,
        "budget": event["budget"],
        "metric": metric,
        "generation": event["generation"],
        "generations": iterations,
        "stopped_early": bool(event.get("stopped_early", False)),
        "slice": event["slice"],
        "population": [
            {"costs": {k: _round(v) for k, v in p["costs"].items()}, "fitness": _round(p["fitness"])}
            for p in event["population"]
        ],
        "front": front,
        "front_truncated": truncated,
        "front_cost": event["front_cost"],
        "best": event["best"],
        "best_code": arch_code(decode(event["best"])),
        "best_fitness": _round(event["best_fitness"]),
        "mean_fitness": _round(event["mean_fitness"]),
        "evaluations": event["evaluations"],
        "cache_hits": event["cache_hits"],
    }


def _final_choice_summary(result: SearchResult, context: _Context) -> dict[str, Any]:
    """How a search chose among its finalists: on which slices, by what, with what score."""
    config = context.config
    summary: dict[str, Any] = {
        "candidates": result.stats.get("final_candidates"),
        "held_out_slices": config.final_slices,
        "tasks_per_slice": config.tasks_per_slice,
        "metric": context.request.final_metric_value
        if config.final_slices
        else context.request.search_metric_value,
    }
    if result.method == "ga":
        summary["finalists_from"] = config.finalists_from
    score = result.stats.get("final_score")
    if config.final_slices and score is not None:
        held_out = "held_out_accuracy" if summary["metric"] == "accuracy" else "held_out_loss"
        summary[held_out] = 1.0 - score if summary["metric"] == "accuracy" else score
    return summary


def _stage(progress: ProgressCallback, stage: str, current: int, total: int, **extra: Any) -> None:
    progress({"kind": "adapt_stage", "stage": stage, "current": current, "total": total, **extra})


# --------------------------------------------------------------------------- the stages
def _sweep(
    context: _Context, state: _StateFile, progress: ProgressCallback
) -> tuple[list[SearchResult], FitnessCache]:
    """One GA per budget sharing one fitness cache, resumable at generation granularity."""
    space, config = context.space, context.config
    decode = type(space.smallest()).from_dict
    data = state.data
    completed = [_search_result_from_dict(r, decode) for r in data["completed"]]
    cache = FitnessCache()
    if data["cache"] is not None:
        cache.load_state(data["cache"], decode)
    fitness = context.fitness
    fitness.seconds, fitness.calls = float(data["fitness_s"]), int(data["fitness_calls"])
    fitness.memo_hits = int(data.get("memo_hits", 0))  # states saved before the memo lack it
    budgets = len(context.constraints)
    metric = context.request.search_metric_value
    order = data.setdefault(
        "order", sweep_order([c.base_limit for c in context.constraints], config.warm_start)
    )
    # ``completed`` is in run order; the results go back in the request's order at the end.
    for position in range(len(completed), budgets):
        index = order[position]
        constraint = context.constraints[index]
        budget_config = GAConfig.from_dict({**config.to_dict(), "seed": derive_seed(config.seed, index)})
        resume = data["ga_state"] if data["ga_index"] == index else None

        def on_state(ga_state: dict[str, Any], index: int = index) -> None:
            data.update(ga_index=index, ga_state=ga_state, **fitness.counters())
            state.save()

        def forward(event: dict[str, Any], index: int = index, position: int = position) -> None:
            progress(_compact_adapt_event(event, index, position, budgets, decode, metric))

        result = run_ga(
            space,
            fitness,
            context.cost_model,
            (constraint,),
            budget_config,
            progress=forward,
            cache=cache,
            state=resume,
            on_state=on_state,
            event_extra={"budget_index": index, "budget": constraint.to_dict()},
        )
        completed.append(result)
        data.update(
            completed=[r.to_dict() for r in completed],
            cache=cache.to_state(),
            ga_index=None,
            ga_state=None,
            **fitness.counters(),
        )
        state.save()
    by_index = dict(zip(order, completed, strict=True))
    return [by_index[index] for index in range(budgets)], cache


def _random_baselines(
    context: _Context, ga_results: Sequence[SearchResult], state: _StateFile, progress: ProgressCallback
) -> list[SearchResult | None]:
    """Random search per budget at its GA's evaluation count. Against a warm-started sweep they
    run in the sweep's order on one cache of their own, so each may choose among what the
    earlier random searches scored, as each GA could start from what the earlier GAs found."""
    decode = type(context.space.smallest()).from_dict
    if not context.request.random_baseline:
        return [None] * len(context.constraints)
    data = state.data
    stored = data["random"]
    # Against a cold sweep each random search keeps a cache of its own (random_search's default).
    shared = FitnessCache() if context.config.warm_start > 0 else None
    if shared is not None and data.get("random_cache") is not None:
        shared.load_state(data["random_cache"], decode)
    screening_slice = None
    for done, index in enumerate(data["order"], start=1):
        key = str(index)
        if key not in stored:
            result = random_search(
                context.space,
                context.fitness,
                context.cost_model,
                (context.constraints[index],),
                evaluations=max(1, ga_results[index].evaluations),
                num_slices=context.config.num_slices,
                final_candidates=context.config.final_candidates,
                final_slices=context.config.final_slices,
                seed=derive_seed(context.config.seed, RANDOM_SEARCH_STREAM + index),
                cache=shared,
                screening_slice=screening_slice,
            )
            stored[key] = result.to_dict()
            if shared is not None:
                data["random_cache"] = shared.to_state()
            data.update(context.fitness.counters())
            state.save()
        if shared is not None:  # the later ones screen where the first did, so its losses serve them
            screening_slice = stored[key]["stats"]["screening_slice"]
        _stage(progress, "random_search", done, len(context.constraints), budget_index=index)
    return [_search_result_from_dict(stored[str(index)], decode) for index in range(len(context.constraints))]


def request_test_tasks(
    request: AdaptionRequest, spec: RunSpec, *, draw: int = 0, count: int | None = None
) -> list[Any]:
    """The request's test tasks in batches of 16: the same tasks for every architecture it
    scores (so differences can be paired task by task), drawn from its seed's own stream.

    ``draw`` > 0 gives another, independent set of ``count`` (default: as many) test tasks of
    the same request: an unbiased second look at a sub-net picked *because* it scored best on
    the first set (benchmarks/headroom.py)."""
    count = request.test_task_count if count is None else count
    if count == 0:
        return []
    seed = derive_seed(request.seed, TEST_TASK_STREAM)
    if draw:
        seed = derive_seed(seed, draw)
    _, batches = task_source(spec, "test")
    return list(batches(count, 16, seed))


def _test_batches(context: _Context) -> list[Any]:
    return request_test_tasks(context.request, context.spec)


def _accuracy(values: Sequence[float]) -> dict[str, Any]:
    array = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(array.mean()),
        "ci95": _finite(confidence_interval95(array)),
        "tasks": int(array.size),
    }


def accuracy_on_tasks(
    scorer: SuperNetScorer, arch: Any, batches: Sequence[Any], dataset: str
) -> dict[str, Any]:
    """``arch``'s mean query accuracy ± 95 % CI on ``batches`` (inherited weights + inner loop),
    with the per-task list that :func:`paired_difference` needs."""
    accuracies: list[float] = []
    for batch in batches:
        accuracies.extend(scorer.score(arch, batch).task_accuracies)
    return {
        **_accuracy(accuracies),
        "split": "test",
        "dataset": dataset,
        "task_accuracies": [float(value) for value in accuracies],
    }


def _test_accuracies(
    context: _Context, archs: Sequence[Any], state: _StateFile, progress: ProgressCallback
) -> dict[str, dict[str, Any]]:
    """Mean query accuracy ± 95 % CI over the test tasks (inherited weights + inner loop), per arch."""
    stored: dict[str, Any] = state.data["test"]
    wanted = list(dict.fromkeys(arch.canonical().to_json() for arch in archs))
    missing = [key for key in wanted if key not in stored]
    if missing and context.request.test_task_count > 0:
        batches = _test_batches(context)
        decode = type(context.space.smallest()).from_json
        for done, key in enumerate(missing, start=1):
            arch = decode(key)
            stored[key] = accuracy_on_tasks(context.scorer, arch, batches, context.spec.dataset)
            state.save()
            _stage(progress, "evaluate", done, len(missing), arch=arch_code(arch))
    # With the per-task lists (paired differences); cards and results get _without_task_list.
    return {key: stored.get(key) for key in wanted}


def _without_task_list(entry: dict[str, Any] | None) -> dict[str, Any] | None:
    if entry is None:
        return None
    return {k: v for k, v in entry.items() if k != "task_accuracies"}


def paired_difference(first: dict[str, Any] | None, second: dict[str, Any] | None) -> dict[str, Any] | None:
    """Mean ± 95 % CI of ``first - second`` task by task, for two archs scored on the same tasks.

    The test tasks are drawn once per request, so the GA's choice and random search's meet the
    same ones; the per-task differences cancel what makes a task hard for both, which is most of
    each accuracy's own CI. None where either entry predates the per-task lists (2026-12-06)."""
    if first is None or second is None:
        return None
    a, b = first.get("task_accuracies"), second.get("task_accuracies")
    if a is None or b is None or len(a) != len(b) or not a:
        return None
    return _accuracy(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))


def _paper_baseline_module(spec: RunSpec, space: Any) -> tuple[Any, int]:
    from engine.baselines import MamlConvNet

    filters = PAPER_BASELINE_FILTERS.get((space.in_channels, space.image_size), 64)
    return MamlConvNet(space.in_channels, space.image_size, spec.ways, filters=filters), filters


def _reference_baselines(context: _Context, progress: ProgressCallback) -> list[dict[str, Any]]:
    """MAML and MAML++ 4-conv nets: exact cost; accuracy measured when a checkpoint is given."""
    space, spec, request = context.space, context.spec, context.request
    shape = (space.in_channels, space.image_size, space.image_size)
    lut_note = (
        "the 4-conv net's layers (3x3 stride-1 conv with bias, BN, ReLU, 2x2 max-pool) are not layers "
        "of the search space, so the device's lookup table cannot predict its latency"
    )
    references: list[dict[str, Any]] = []

    def costs(module: Any) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "params": count_params(module),
            "macs": count_macs(module, shape),
            "latency_ms_lut": None,
            "latency_note": lut_note,
            "measured_latency_ms": None,
        }
        if request.measure_latency:
            entry["measured_latency_ms"] = measure_module(
                module, (1, *shape), repeats=30, warmup=5, threads=request.threads
            ).to_dict()
        return entry

    if context.baselines:
        batches = _test_batches(context)
        from engine.meta.evaluate import evaluate

        for done, (path, run, info) in enumerate(context.baselines, start=1):
            maml_config = run.learner.config
            label = "MAML++ 4-conv" if maml_config.learnable_inner_lr else "MAML 4-conv"
            module = run.learner.model.extract()
            accuracy = None
            if batches:
                result = evaluate(run.learner, batches)
                accuracy = {**_accuracy(result.accuracies), "split": "test", "dataset": spec.dataset}
            references.append(
                {
                    "name": label,
                    "source": "checkpoint",
                    "checkpoint": str(path),
                    "filters": run.learner.model.filters,
                    **info,
                    **costs(module),
                    "accuracy": accuracy,
                }
            )
            _stage(progress, "baselines", done, len(context.baselines))
        return references
    module, filters = _paper_baseline_module(spec, space)
    plain = module.extract()
    entry = costs(plain)
    for label in ("MAML 4-conv", "MAML++ 4-conv"):
        references.append(
            {
                "name": label,
                "source": "paper architecture (no checkpoint given)",
                "filters": filters,
                **entry,
                "accuracy": None,
                "accuracy_note": "no baseline checkpoint was given, so no accuracy was measured; MAML and "
                "MAML++ deploy the same 4-conv network and differ only in training",
            }
        )
    return references


def _package_module(context: _Context, arch: Any, weights: str) -> tuple[Any, Any, dict[str, Any], Any]:
    """(extracted module with recalibrated BN, inner loop, card fields, example input)."""
    learner, supernet = context.learner, context.supernet
    eval_steps = learner.config.eval_inner_steps or learner.config.inner_steps
    if weights == "finetuned":
        support = context.support
        steps = context.request.finetune_steps or context.request.preset_values.finetune_factor * eval_steps
        inner_loop = extended_inner_loop(learner, steps)
        adapted = finetune_supernet(supernet, arch, inner_loop, support.x, support.y)
        module = extract_for_export(adapted, arch, query_bn_step(supernet, steps))
        images = recalibrate_batchnorm(module, [support.x])
        with torch.no_grad():
            predictions = torch.cat(
                [module(support.x[i : i + 1]).argmax(dim=1) for i in range(len(support.y))]
            )
        support_accuracy = float((predictions == support.y).float().mean())
        card = {
            "classes": list(support.class_names),
            "finetuning": {
                "steps": steps,
                "meta_training_inner_steps": eval_steps,
                "rule": "MAML++ inner loop (learned per-layer, per-step rates; steps beyond the learned "
                "ones reuse the last rate), BN batch statistics, starting from the inherited meta-weights",
                "support_images": int(len(support.y)),
                "support_accuracy": support_accuracy,
                "support_accuracy_note": "exported model, batch size 1, on the images it was fine-tuned on "
                "(a training accuracy, not a test accuracy)",
            },
            "bn_statistics": {
                "source": "support set",
                "images": images,
                "note": "running statistics recomputed on the support set as one batch, so eval mode "
                "reproduces the fine-tuned network's train-mode output on the support set",
            },
        }
        return module, inner_loop, card, support.x[: min(8, len(support.y))]
    inner_loop = inner_loop_from_learner(learner)
    module = extract_for_export(supernet, arch, query_bn_step(supernet, eval_steps))
    # Each task's support and query images as one batch, as meta-training normalised them.
    calibration = [torch.cat([task[0], task[2]]) for task in context.validation_tasks[:16]]
    images = recalibrate_batchnorm(module, calibration)
    card = {
        "classes": "task-agnostic",
        "classes_note": "inherited meta-weights: adapt on the device to an N-way support set with "
        "inner_loop.json before classifying; output i means the i-th class of that support set",
        "bn_statistics": {
            "source": f"{len(calibration)} {context.request.task_source} tasks ({context.spec.dataset})",
            "images": images,
            "note": "running statistics recomputed (each task one batch, cumulative average): the "
            "super-net's running statistics are shared by all sub-nets and not meaningful for one",
        },
    }
    return module, inner_loop, card, calibration[0][:8]


def _speed_reference_of(context: _Context) -> tuple[SpeedReference | None, float | None]:
    """A reference for timing packages here when the table was built at a reference speed.

    Only when this machine measures (``measure_latency``: the table's device is this server's CPU)
    and the table records its base: then the card can state the measured latency in the table's
    unit next to the raw one (docs/PROFILING.md, "Speed reference")."""
    recorded = (context.lut.metadata.get("speed_reference") or {}) if context.lut is not None else {}
    base = recorded.get("base_ms")
    if not context.request.measure_latency or not isinstance(base, int | float) or base <= 0:
        return None, None
    return SpeedReference(), float(base)


def _write_packages(
    context: _Context,
    out: Path,
    ga_results: Sequence[SearchResult],
    randoms: Sequence[SearchResult | None],
    accuracies: Mapping[str, dict[str, Any] | None],
    progress: ProgressCallback,
) -> list[BudgetOutcome]:
    """Every package into one temp folder inside ``out``, then renamed into place."""
    request = context.request
    weights = request.weights_kind
    out.mkdir(parents=True, exist_ok=True)
    staging = out / f".staging-{uuid.uuid4().hex[:12]}"
    outcomes = []
    reference, reference_base = _speed_reference_of(context)
    try:
        staging.mkdir()
        for index, (constraint, ga, rs) in enumerate(
            zip(context.constraints, ga_results, randoms, strict=True)
        ):
            arch = ga.best_arch
            slug = budget_slug(constraint)
            module, inner_loop, extra, example = _package_module(context, arch, weights)
            shape = (1, context.space.in_channels, context.space.image_size, context.space.image_size)
            measured = None
            at_reference = None
            if request.measure_latency:
                stats = measure_module(
                    module, shape, repeats=30, warmup=5, threads=request.threads, reference=reference
                )
                measured = stats.to_dict()
                if reference is not None:
                    at_reference = stats.at_reference(reference_base)
            scored = accuracies.get(arch.canonical().to_json())
            accuracy = _without_task_list(scored)
            random_summary = None
            if rs is not None:
                random_scored = accuracies.get(rs.best_arch.canonical().to_json())
                random_summary = {
                    "arch": rs.best_arch.to_dict(),
                    "arch_code": arch_code(rs.best_arch),
                    "costs": rs.best_costs,
                    "constraint_met": rs.constraint_met,
                    "search_loss": _finite(rs.best_loss),
                    "final_choice": _final_choice_summary(rs, context),
                    "evaluations": rs.evaluations,
                    # Candidates it took from the earlier budgets' random searches (free).
                    "inherited": rs.stats.get("inherited", 0),
                    "elapsed_s": rs.elapsed_s,
                    "test_accuracy": _without_task_list(random_scored),
                    # The GA's choice minus this one, task by task on the same test tasks.
                    "ga_minus_random": paired_difference(scored, random_scored),
                }
            card_extra = {
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
                "device": context.lut.device if context.lut is not None else None,
                "budget": {
                    **constraint.to_dict(),
                    "base_limit": constraint.base_limit,
                    "text": constraint.describe(),
                },
                "constraint_met": ga.constraint_met,
                "latency_ms": {
                    "lut_predicted": ga.best_costs.get("latency_ms"),
                    "lut_device": context.lut.device if context.lut is not None else None,
                    "measured_here": measured,
                    # The same timings at the table's reference speed, comparable with lut_predicted.
                    "measured_at_reference": at_reference,
                    "measured_note": None
                    if measured is not None
                    else "not measured (request.measure_latency is false)",
                },
                "accuracy": accuracy,
                "accuracy_protocol": (
                    f"{request.test_task_count} {context.spec.dataset} test tasks "
                    f"({context.spec.ways}-way {context.spec.shots}-shot): inherited meta-weights, "
                    f"{inner_loop_from_learner(context.learner).steps} MAML++ inner steps per task, "
                    "query accuracy with batch statistics; mean ± 95 % CI (1.96 standard errors)"
                ),
                "search": {
                    "method": "ga",
                    "loss": _finite(ga.best_loss),
                    # What "loss" (and random search's search_loss) measures: "loss", the mean
                    # query loss, or "accuracy", for which it is the query error rate.
                    "metric": request.search_metric_value,
                    # The arithmetic of the search slices' scores ("loss" above is one of them);
                    # the final choice's held-out scores and "accuracy" are float32.
                    "precision": request.search_precision_value,
                    "evaluations": ga.evaluations,
                    # How many of its first pool the looser budgets' GAs had found (warm start).
                    "warm_start_seeds": ga.stats.get("warm_start_seeds", 0),
                    # Fewer than the request's iterations when its patience stopped the GA.
                    "generations": len(ga.history),
                    "task_source": request.task_source,
                    # How the finalists were compared ("loss" above stays the search slices' mean).
                    "final_choice": _final_choice_summary(ga, context),
                },
                "random_search": random_summary,
                "supernet": {
                    "checkpoint": str(context.checkpoint_path),
                    "iteration": context.checkpoint_iteration,
                    "spec": context.spec.to_dict(),
                },
                **extra,
            }
            package_inputs = PackageInputs(
                space=context.space,
                arch=arch,
                module=module,
                preprocessing=context.preprocessing,
                weights=weights,
                inner_loop=inner_loop,
                card=card_extra,
                example=example,
            )
            card = write_package(staging / slug, package_inputs, onnx=request.export_onnx)
            outcomes.append(
                BudgetOutcome(
                    index=index,
                    budget=constraint.to_dict(),
                    slug=slug,
                    arch=arch.to_dict(),
                    arch_code=arch_code(arch),
                    costs=dict(ga.best_costs),
                    constraint_met=ga.constraint_met,
                    search_loss=_finite(ga.best_loss),
                    evaluations=ga.evaluations,
                    cache_hits=ga.cache_hits,
                    search_s=ga.elapsed_s,
                    test_accuracy=accuracy,
                    random=random_summary,
                    package=str(out / slug),
                    model_card=strict_json(card),
                )
            )
            _stage(progress, "package", index + 1, len(context.constraints), budget_index=index, slug=slug)
        for outcome in outcomes:  # every package is complete: move them into place
            target = out / outcome.slug
            if target.exists():
                old = out / f".replaced-{outcome.slug}-{uuid.uuid4().hex[:8]}"
                target.rename(old)
                shutil.rmtree(old, ignore_errors=True)
            (staging / outcome.slug).rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return outcomes


def _sweep_front(context: _Context, cache: FitnessCache) -> list[dict[str, Any]]:
    """Cost (the request's kind) vs. mean loss over every architecture any budget evaluated."""
    archs = cache.archs()
    kind = context.request.constraint
    points = [(context.cost_model.costs(a)[kind], cache.mean_loss(a)) for a in archs]
    chosen = pareto_front(points)
    return [
        {
            "arch": archs[i].to_dict(),
            "arch_code": arch_code(archs[i]),
            "costs": context.cost_model.costs(archs[i]),
            "loss": _finite(points[i][1]),
            "slices": len(cache.losses(archs[i])),
        }
        for i in chosen
    ]


# --------------------------------------------------------------------------- entry points
def run_adaption(
    request: AdaptionRequest,
    *,
    out_dir: str | Path,
    progress: ProgressCallback = null_progress,
    state_path: str | Path | None = None,
) -> AdaptionResult:
    """Run one adaption request (see the module docstring); packages and ``adaption.json`` go to ``out_dir``.

    Raises :class:`AdaptionRequestError`, :class:`~engine.search.constraints.InfeasibleBudgetError`,
    :class:`~engine.search.adapt.AdaptionInputError` (a LUT of another space) and other
    ``ValueError`` subclasses for bad input before writing anything; ``JobCancelled`` from
    ``progress`` propagates after the state at ``state_path`` is saved.
    """
    if not isinstance(request, AdaptionRequest):
        raise AdaptionRequestError(f"expected an AdaptionRequest, got {type(request).__name__}")
    started = time.perf_counter()
    out = Path(out_dir)
    with torch_threads(request.threads):
        context = _prepare(request)
        state = _StateFile(Path(state_path) if state_path is not None else None, request)
        if state.resumed and "order" not in state.data:
            # A state saved before sweeps warm-started (2026-12-06) resumes as it ran: budgets in
            # the given order, random Init(P), random searches on caches of their own.
            context.config = GAConfig.from_dict({**context.config.to_dict(), "warm_start": 0})
        search_started = time.perf_counter()
        try:
            ga_results, cache = _sweep(context, state, progress)
            random_started = time.perf_counter()
            randoms = _random_baselines(context, ga_results, state, progress)
        finally:
            context.fitness.close()  # the search's worker processes end with it
        search_s, random_s = random_started - search_started, time.perf_counter() - random_started
        archs = [r.best_arch for r in ga_results] + [r.best_arch for r in randoms if r is not None]
        accuracies = _test_accuracies(context, archs, state, progress)
        context.learner.cpu()  # export, fine-tuning on the support set and latency: on the CPU
        baselines = _reference_baselines(context, progress)
        outcomes = _write_packages(context, out, ga_results, randoms, accuracies, progress)
        fitness = context.fitness
        result = AdaptionResult(
            request=request,
            outcomes=tuple(outcomes),
            front=tuple(_sweep_front(context, cache)),
            baselines=tuple(baselines),
            supernet={
                "checkpoint": str(context.checkpoint_path),
                "iteration": context.checkpoint_iteration,
                "spec": context.spec.to_dict(),
                "space": context.space.to_dict(),
            },
            device=context.lut.device if context.lut is not None else None,
            evaluations=cache.evaluations,
            cache_hits=cache.hits,
            ms_per_evaluation=1000 * fitness.seconds / scored
            if (scored := fitness.calls - fitness.memo_hits)
            else None,
            search_s=search_s,
            random_s=random_s,
            elapsed_s=time.perf_counter() - started,
            out_dir=str(out),
            resumed=state.resumed,
            fitness_calls=fitness.calls,
            memo_hits=fitness.memo_hits,
        )
        atomic_write_json(out / RESULT_NAME, strict_json(result.to_dict()))
    return result


# --------------------------------------------------------------------------- re-training
class FixedArchNet(SuperNet):
    """A super-net that always runs one architecture: meta-training it trains that sub-net only.

    Same parameter names as :class:`~engine.supernet.SuperNet` (so the super-net learner's state,
    LSLR rates included, loads as is) and the MAML++ ``forward(x, step=...)`` convention the
    learner expects. Layers the sub-net does not use get no gradient and stay unchanged.
    """

    def __init__(self, space: Any, arch: Any, bn_steps: int = 1) -> None:
        super().__init__(space, bn_steps=bn_steps)
        space.validate(arch)
        self.fixed_arch = arch.canonical()

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, arch: Any = None, step: int = 0, track_stats: bool = True
    ) -> torch.Tensor:
        return super().forward(x, self.fixed_arch if arch is None else arch, step, track_stats)


@dataclass(frozen=True)
class RetrainResult:
    checkpoint: str
    arch: dict[str, Any]
    iterations: int
    seconds: float
    accuracy_before: dict[str, Any] | None
    accuracy_after: dict[str, Any] | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def retrain_subnet(
    checkpoint: str | Path,
    arch: Any,
    *,
    iterations: int,
    out: str | Path,
    progress: ProgressCallback = null_progress,
    test_tasks: int = 0,
    threads: int | None = None,
    seed: int = 0,
) -> RetrainResult:
    """Meta-train the fixed sub-net ``arch`` further, starting from its inherited super-net weights.

    The same MAML++ learner (inner loop, LSLR rates, per-step BN) and ``meta_train`` as the
    super-net, with every meta-batch on ``arch``; ``iterations`` meta-iterations (the run's
    preset decides meta-batch size and schedules). Checkpoints go to ``out`` (resumable: calling
    again with the same arguments continues). ``test_tasks > 0`` reports the few-shot test
    accuracy before and after. ``arch`` is an ``Arch`` or its dict.
    """
    _check_int("iterations", iterations, 1, optional=False)
    _check_int("test_tasks", test_tasks, 0, optional=False)
    spec, run, source_iteration = load_supernet(checkpoint)
    if isinstance(arch, Mapping):
        arch = type(run.space.smallest()).from_dict(dict(arch))
    run.space.validate(arch)  # ArchError (a ValueError) names the bad layer
    retrain_spec = spec.with_(iterations=iterations, seed=seed, threads=threads or spec.threads)
    retrain_run = build_run(retrain_spec)
    fixed = FixedArchNet(run.space, arch, bn_steps=run.learner.model.bn_steps)
    from engine.meta.maml import MamlLearner

    learner = MamlLearner(fixed, retrain_run.config.maml)
    learner.load_state_dict(run.learner.state_dict())
    out_path = Path(out)
    from engine.meta.train import CHECKPOINT_NAME

    def accuracy() -> dict[str, Any] | None:
        if test_tasks == 0:
            return None
        from engine.meta.evaluate import evaluate

        _, batches = task_source(spec, "test")
        result = evaluate(learner, batches(test_tasks, 16, derive_seed(seed, TEST_TASK_STREAM)))
        return _accuracy(result.accuracies)

    before = accuracy()
    train_source, _ = task_source(retrain_spec, "train")
    run_info = {
        "spec": retrain_spec.to_dict(),
        "retrain": {
            "arch": fixed.fixed_arch.to_dict(),
            "source_checkpoint": str(checkpoint),
            "source_iteration": source_iteration,
        },
    }
    result = meta_train(
        learner,
        train_source,
        retrain_run.config,
        out_dir=out_path,
        space=None,
        resume=(out_path / CHECKPOINT_NAME).exists(),
        progress=progress,
        run_info=run_info,
    )
    after = accuracy()
    summary = RetrainResult(
        checkpoint=str(result.checkpoint),
        arch=fixed.fixed_arch.to_dict(),
        iterations=result.iterations,
        seconds=result.seconds,
        accuracy_before=before,
        accuracy_after=after,
    )
    atomic_write_json(out_path / "retrain.json", summary.to_dict())
    return summary
