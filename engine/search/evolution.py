"""Algorithm 1 of H-Meta-NAS (Appendix E): hardware-constrained genetic adaption.

The search is written against injected functions so it runs without a super-net:

* ``fitness_fn(arch, slice_id) -> float``: the mean query loss of ``arch`` over the tasks of
  validation slice ``slice_id`` (lower is better). :mod:`engine.search.adapt` builds the real one
  (inner loop on each task's support set from the inherited meta-weights); tests use synthetic ones.
* ``costs_fn(arch) -> {"latency_ms", "params", "macs"}`` (any subset the constraints need).

Semantics chosen where the paper leaves room (documented in docs/ADAPTION.md):

* **Slices.** The validation tasks are cut into ``num_slices`` fixed slices of ``tasks_per_slice``
  tasks. Each generation draws one slice and evaluates the *whole* pool on it, so the ranking
  inside a generation compares like with like. The fitness cache is keyed by
  ``(arch.canonical(), slice_id)``: an elite that survives into a generation whose slice it has
  already seen, or a duplicate inside a pool, costs no evaluation.
* **Population.** ``Mutate`` keeps the best ``elite_size = round(top_fraction * P)`` distinct
  architectures unchanged and fills the other ``P - elite_size`` places with children: a child is
  a uniformly drawn elite (with ``crossover=True`` a uniform crossover of two distinct elites)
  with ``mutations_per_child`` distinct choices of ``space.choices()`` changed to a *different*
  option. A child is kept only if it is valid, feasible and not already in the new pool (so a
  mutation that only touches layers beyond ``depth`` - the same network - is rejected). Every
  child gets at most ``max_mutation_tries`` attempts; then a feasible random architecture is
  tried (same bound), and as the very last resort an elite is repeated. Nothing loops unbounded.
  With ``depth_elites=k`` the best ``k`` architectures of every depth in the ranking (of finite
  loss) join the elites where those best ``elite_size`` hold fewer, so a deeper lineage whose
  first nets score worse than the shallow leaders keeps parenting children.
* **Last generation.** Algorithm 1 mutates after the last evaluation too; those children would
  never be scored, so the search stops after ranking generation ``M - 1``.
* **Final choice.** Loss on one 16-task slice is noisy, so the top ``final_candidates`` of the
  last ranking are scored on *every* slice (cached slices are free) and the lowest mean loss
  wins. ``final_candidates=0`` returns the last generation's best as is. With
  ``final_slices > 0`` the finalists are scored instead on that many *held-out* slices (ids
  ``num_slices ..``) that the search never drew: the elites survived selection on the search
  slices, so their losses there can be optimistic (the winner's curse); fresh tasks (in
  :mod:`engine.adaption` also with more query images) rank them without that bias. (On a
  real super-net, holding out alone ranked no better; the error rate as the final criterion
  did - docs/BENCHMARKS.md, "The final choice among the finalists".) What
  ``fitness_fn`` returns for a held-out slice may be another criterion than the search's loss
  (lower is better; :mod:`engine.adaption` can return the query *error rate* there), so those
  values live in a cache of their own and never enter a front; the result's ``best_loss`` stays
  the choice's mean loss over the search slices it was scored on, and ``stats["final_score"]``
  holds its held-out mean. With ``finalists_from="archive"`` the finalists are instead the best
  of *every* architecture the run scored, by :func:`archive_ranking` (rank within each slice),
  not the last generation's neighbourhood of the elites.
* **Budget sweeps (Pareto fronts).** :func:`search_budgets` runs one GA per budget, all sharing
  one :class:`FitnessCache` and one cost cache, and reports the front over every architecture
  evaluated for any budget plus each budget's choice. With ``warm_start > 0`` it runs the
  loosest budget first and each later GA's pool starts with the best feasible architectures
  already in the cache (:func:`warm_start_seeds`), the rest random as in Init(P).

Determinism: every random decision (slice draw, sampling, mutation, crossover) comes from one
``numpy.random.Generator`` made by :func:`engine.seeding.make_rngs` from ``config.seed``. Its
state is part of :data:`GAState`, so a run resumed from a saved state continues exactly as the
uninterrupted run would.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from engine.adaption_presets import (  # torch-free, so the web form can offer and check them
    DEEPEN_MODES,
    TOP_FRACTION,
    elite_count,
    most_depth_elites,
)
from engine.atomic import atomic_write_json
from engine.progress import ProgressCallback, null_progress
from engine.search.constraints import (
    Constraint,
    CostModel,
    CostsFn,
    InfeasibleBudgetError,
    check_constraints,
    violations,
)
from engine.search.pareto import front_1d, pareto_front
from engine.seeding import derive_seed, make_rngs

FitnessFn = Callable[[Any, int], float]
GAState = dict[str, Any]
STATE_VERSION = 1
#: GAConfig.finalists_from's choices.
FINALISTS_FROM = ("last", "archive")


class GAConfigError(ValueError):
    """A GA setting out of range."""


class GAStateError(ValueError):
    """A saved GA state that does not belong to this search (other config, constraints or format)."""


def _positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise GAConfigError(f"{name} must be an int >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class GAConfig:
    """Algorithm 1's knobs (paper defaults P=100, M=200, 16 tasks per slice, best 10 %, 2 mutations)."""

    pool_size: int = 100
    iterations: int = 200
    tasks_per_slice: int = 16
    num_slices: int = 8
    top_fraction: float = TOP_FRACTION
    mutations_per_child: int = 2
    crossover: bool = False
    max_init_tries: int = 20_000
    max_mutation_tries: int = 50
    final_candidates: int = 10
    #: Held-out slices (ids ``num_slices .. num_slices + final_slices - 1``) that only the final
    #: choice scores on; 0: the finalists are scored on the search slices.
    final_slices: int = 0
    #: Where the finalists come from: "last", the best of the last generation's ranking, or
    #: "archive", the best of every architecture this run scored by mean rank within each
    #: search slice (see :func:`archive_ranking`).
    finalists_from: str = "last"
    #: In a budget sweep, a GA starts its pool with at most this many of the best feasible
    #: architectures the shared cache already holds (by :func:`archive_ranking`), the rest being
    #: Algorithm 1's random Init(P); the sweep then runs its budgets loosest first, so a tighter
    #: budget starts from what the looser searches found inside it. 0: random Init(P) only, in
    #: the order given. Why: one GA per budget can settle in a local optimum while a looser
    #: budget's GA has already scored better architectures that fit (docs/ADAPTION.md).
    warm_start: int = 0
    #: Stop before ``iterations`` once the elite set (the best ``elite_size``, which parent the
    #: next pool) has come through this many generations in a row unchanged; 0: always run all
    #: ``iterations`` (Algorithm 1). Why: on one slice the elites are the best architectures
    #: scored so far, so while they stand still the generations only add children that rank
    #: below them, and a request can spend most of its time there (docs/ADAPTION.md).
    patience: int = 0
    #: When a mutation raises the depth, the layers it adds hold "stored", the choices the
    #: architecture's unused layers carried (Algorithm 1 on this encoding: whatever an ancestor
    #: drew there, never scored), or "copy-last", the choices of the last layer (block) before
    #: them, which the architecture was scored with. Why: on a full super-net every chosen
    #: sub-net ended in a `selu` layer, so a deepened child was competitive only when its
    #: stored new last layer happened to be `selu` (one chance in six); see docs/ADAPTION.md.
    deepen: str = "stored"
    #: Besides the best ``elite_size``, the best this many architectures of every depth the
    #: ranking holds (of finite loss) survive and parent children too; 0: Algorithm 1's elites
    #: only. Why: at a loose budget the elites of most GAs on full super-nets settled on
    #: two-layer nets within a few generations and a deeper lineage died out, while the two
    #: GAs that happened to keep one picked three- and four-layer nets about 10 points more
    #: accurate on test tasks (docs/BENCHMARKS.md, "Several seeds at once"). Opt-in: on another
    #: super-net it found far better deep nets, which still tested below the two-layer picks,
    #: and it chose the same sub-nets with up to 2.8x the evaluations ("Elites of every depth").
    depth_elites: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        _positive_int("pool_size", self.pool_size, 2)
        _positive_int("iterations", self.iterations)
        _positive_int("tasks_per_slice", self.tasks_per_slice)
        _positive_int("num_slices", self.num_slices)
        _positive_int("mutations_per_child", self.mutations_per_child)
        _positive_int("max_init_tries", self.max_init_tries)
        _positive_int("max_mutation_tries", self.max_mutation_tries)
        _positive_int("final_candidates", self.final_candidates, 0)
        _positive_int("final_slices", self.final_slices, 0)
        _positive_int("warm_start", self.warm_start, 0)
        _positive_int("patience", self.patience, 0)
        _positive_int("depth_elites", self.depth_elites, 0)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise GAConfigError(f"seed must be an int, got {self.seed!r}")
        if not isinstance(self.crossover, bool):
            raise GAConfigError(f"crossover must be a bool, got {self.crossover!r}")
        if self.deepen not in DEEPEN_MODES:
            raise GAConfigError(f"deepen must be one of {DEEPEN_MODES}, got {self.deepen!r}")
        if self.finalists_from not in FINALISTS_FROM:
            raise GAConfigError(
                f"finalists_from must be one of {FINALISTS_FROM}, got {self.finalists_from!r}"
            )
        fraction = self.top_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction <= 1:
            raise GAConfigError(f"top_fraction must be in (0, 1], got {fraction!r}")

    @property
    def elite_size(self) -> int:
        """How many of the best architectures survive and parent the next pool (at least 1)."""
        return elite_count(self.pool_size, self.top_fraction)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def final_slice_ids(self) -> range:
        """The slices the final choice scores its candidates on (see ``final_slices``)."""
        return final_slice_ids(self.num_slices, self.final_slices)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GAConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise GAConfigError(f"unknown GA config keys {sorted(unknown)}")
        return cls(**data)


class FitnessCache:
    """Losses by ``(arch.canonical(), slice_id)``: no architecture is evaluated twice on one slice.

    Shared by every GA of a budget sweep (and may be shared with anything else that scores
    architectures on the same slices). ``evaluations`` counts calls of the fitness function,
    ``hits`` lookups answered from the cache.
    """

    def __init__(self) -> None:
        self._losses: dict[Any, dict[int, float]] = {}
        self._dicts: dict[Any, dict[str, Any]] = {}
        self.evaluations = 0
        self.hits = 0
        self.non_finite = 0

    def __len__(self) -> int:
        return sum(len(by_slice) for by_slice in self._losses.values())

    def lookup(self, arch: Any, slice_id: int, fitness_fn: FitnessFn) -> tuple[float, bool]:
        """``(loss, was_cached)``; a NaN or infinite loss is stored as ``inf`` (ranked last)."""
        return self.lookup_canonical(arch.canonical(), slice_id, fitness_fn)

    def lookup_canonical(self, key: Any, slice_id: int, fitness_fn: FitnessFn) -> tuple[float, bool]:
        by_slice = self._losses.setdefault(key, {})
        if slice_id in by_slice:
            self.hits += 1
            return by_slice[slice_id], True
        raw = fitness_fn(key, slice_id)
        try:
            loss = float(raw)
        except (TypeError, ValueError):
            raise TypeError(
                f"fitness_fn must return a number, returned {raw!r} for slice {slice_id}"
            ) from None
        if not math.isfinite(loss):
            self.non_finite += 1
            loss = math.inf
        by_slice[slice_id] = loss
        self.evaluations += 1
        return loss, False

    def contains(self, key: Any, slice_id: int) -> bool:
        """Whether canonical ``key`` already has a loss on ``slice_id`` (no lookup is counted)."""
        return slice_id in self._losses.get(key, {})

    def loss_on(self, key: Any, slice_id: int) -> float | None:
        """Canonical ``key``'s cached loss on ``slice_id``, or None (no lookup is counted)."""
        return self._losses.get(key, {}).get(slice_id)

    def losses(self, arch: Any) -> dict[int, float]:
        return dict(self._losses.get(arch.canonical(), {}))

    def mean_loss(self, arch: Any) -> float:
        by_slice = self._losses.get(arch.canonical())
        if not by_slice:
            raise KeyError(f"architecture was never evaluated: {arch!r}")
        return float(sum(by_slice.values()) / len(by_slice))

    def archs(self) -> list[Any]:
        return [arch for arch, by_slice in self._losses.items() if by_slice]

    def arch_dict(self, key: Any) -> dict[str, Any]:
        """``key.to_dict()``, memoised: states are written every generation."""
        found = self._dicts.get(key)
        if found is None:
            found = self._dicts[key] = key.to_dict()
        return found

    def to_state(self) -> dict[str, Any]:
        return {
            "entries": [
                [self.arch_dict(arch), slice_id, _json_loss(loss)]
                for arch, by_slice in self._losses.items()
                for slice_id, loss in by_slice.items()
            ],
            "evaluations": self.evaluations,
            "hits": self.hits,
            "non_finite": self.non_finite,
        }

    def load_state(self, data: Mapping[str, Any], decode: Callable[[dict[str, Any]], Any]) -> None:
        """Replace the contents with a saved state (``decode`` turns an arch dict into an Arch)."""
        self._losses = {}
        for arch_dict, slice_id, loss in data["entries"]:
            self._losses.setdefault(decode(arch_dict).canonical(), {})[int(slice_id)] = _loss_from_json(loss)
        self.evaluations = int(data["evaluations"])
        self.hits = int(data["hits"])
        self.non_finite = int(data.get("non_finite", 0))


def prefetched(cache: FitnessCache, fitness_fn: FitnessFn, pairs: Sequence[tuple[Any, int]]) -> FitnessFn:
    """``fitness_fn`` with the uncached ``(canonical arch, slice)`` pairs of ``pairs`` scored up front.

    When ``fitness_fn`` has ``many(pairs) -> losses`` (:class:`engine.search.parallel.ProcessFitness`)
    the pairs a generation is about to look up are scored together, in parallel; the returned
    function hands those losses out as the cache asks for them, so the cache, the counters and
    the order of everything else are exactly those of one-by-one scoring.
    """
    many = getattr(fitness_fn, "many", None)
    if many is None:
        return fitness_fn
    pending = list(dict.fromkeys(pair for pair in pairs if not cache.contains(*pair)))
    if len(pending) < 2:
        return fitness_fn
    ready = dict(zip(pending, many(pending), strict=True))

    def fitness(key: Any, slice_id: int) -> float:
        loss = ready.pop((key, slice_id), None)
        return fitness_fn(key, slice_id) if loss is None else loss

    return fitness


def _json_loss(loss: float) -> float | None:
    """Losses go to JSON (states, progress): ``inf`` becomes ``None`` so strict JSON parsers cope."""
    return loss if math.isfinite(loss) else None


def _loss_from_json(value: float | None) -> float:
    return math.inf if value is None else float(value)


@dataclass(frozen=True)
class FrontPoint:
    """One evaluated architecture: its costs and its estimated loss (mean over the slices it saw)."""

    arch: Any
    costs: dict[str, float]
    loss: float
    slices: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "arch": self.arch.to_dict(),
            "costs": dict(self.costs),
            "loss": _json_loss(self.loss),
            "slices": self.slices,
        }


@dataclass(frozen=True)
class SearchResult:
    """What one constrained search (GA or random) found, and what it cost."""

    method: str
    best_arch: Any
    best_loss: float
    best_costs: dict[str, float]
    constraints: tuple[Constraint, ...]
    evaluations: int
    cache_hits: int
    evaluated_archs: int
    front: tuple[FrontPoint, ...]
    history: tuple[dict[str, Any], ...] = ()
    stats: dict[str, Any] = field(default_factory=dict)
    elapsed_s: float = 0.0

    @property
    def constraint_met(self) -> bool:
        return all(c.satisfied_by(self.best_costs) for c in self.constraints)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "best_arch": self.best_arch.to_dict(),
            "best_loss": _json_loss(self.best_loss),
            "best_costs": dict(self.best_costs),
            "constraints": [c.to_dict() for c in self.constraints],
            "constraint_met": self.constraint_met,
            "evaluations": self.evaluations,
            "cache_hits": self.cache_hits,
            "evaluated_archs": self.evaluated_archs,
            "front": [point.to_dict() for point in self.front],
            "history": list(self.history),
            "stats": dict(self.stats),
            "elapsed_s": self.elapsed_s,
        }


# --------------------------------------------------------------------------- architecture edits
def get_choice(arch: Any, key: int | str, name: str) -> Any:
    """The current value of one architectural choice (``key`` is a layer index or ``"depth"``)."""
    if key == "depth":
        return arch.depth
    return getattr(arch.layers[key], name)


def set_choice(arch: Any, key: int | str, name: str, value: Any) -> Any:
    if key == "depth":
        return arch.with_depth(value)
    return arch.with_layer(key, **{name: value})


def mutable_choices(space: Any) -> list[tuple[int | str, str, tuple[Any, ...]]]:
    choices = [choice for choice in space.choices() if len(choice[2]) > 1]
    if not choices:
        raise GAConfigError("the search space has no choice with two or more options: nothing to search")
    return choices


def mutate(
    arch: Any,
    choices: Sequence[tuple[int | str, str, tuple[Any, ...]]],
    count: int,
    rng: np.random.Generator,
    deepen: str = "stored",
) -> Any:
    """Change ``count`` distinct randomly picked choices to a different option each (Appendix E).

    ``deepen="copy-last"``: a larger depth fills the layers it adds with the choices of the last
    layer (block) before them (:func:`deepened`), and the depth changes before the layer
    choices, so that a mutation picked for one of the added layers still applies to it."""
    picked = sorted(int(i) for i in rng.choice(len(choices), size=min(count, len(choices)), replace=False))
    if deepen == "copy-last":
        picked.sort(key=lambda index: choices[index][0] != "depth")  # stable: the depth first
    for index in picked:
        key, name, options = choices[index]
        current = get_choice(arch, key, name)
        others = [option for option in options if option != current]
        value = others[int(rng.integers(len(others)))]
        if key == "depth" and deepen == "copy-last" and value > current:
            arch = deepened(arch, value, choices)
        else:
            arch = set_choice(arch, key, name, value)
    return arch


def deepened(arch: Any, depth: int, choices: Sequence[tuple[int | str, str, tuple[Any, ...]]]) -> Any:
    """``arch`` at a larger ``depth``, each added layer holding the choices of the same layer of
    the last used depth unit (vgg9: the last layer; resnet12: the same layer of the last block)
    where the space offers that option there; otherwise it keeps its own."""
    used = arch.n_used_layers
    per_unit = used // arch.depth
    offered = {(key, name): options for key, name, options in choices}
    grown = arch.with_depth(depth)
    for index in range(used, grown.n_used_layers):
        source = arch.layers[used - per_unit + (index - used) % per_unit]
        for name in ("kernel", "width", "activation"):
            value = getattr(source, name)
            if value in offered.get((index, name), ()):
                grown = grown.with_layer(index, **{name: value})
    return grown


def crossover(
    first: Any,
    second: Any,
    choices: Sequence[tuple[int | str, str, tuple[Any, ...]]],
    rng: np.random.Generator,
) -> Any:
    """Uniform crossover: every choice comes from either parent with probability 1/2."""
    child = first
    take_second = rng.random(len(choices)) < 0.5
    for (key, name, _options), swap in zip(choices, take_second, strict=True):
        if swap:
            child = set_choice(child, key, name, get_choice(second, key, name))
    return child


def _valid(space: Any, arch: Any) -> bool:
    try:
        space.validate(arch)
    except ValueError:
        return False
    return True


def cheapest_candidates(space: Any) -> list[Any]:
    """``space.smallest()`` and its variants with every activation on all layers.

    Params and MACs do not depend on the activation and grow with kernel, width and depth, so
    the smallest architecture is the cheapest there; a latency table may rank activations
    differently, hence one candidate per activation.
    """
    smallest = space.smallest()
    candidates = [smallest]
    for activation in getattr(space, "activations", ()):
        variant = smallest
        for index in range(len(smallest.layers)):
            variant = variant.with_layer(index, activation=activation)
        variant = variant.canonical()
        if variant not in candidates and _valid(space, variant):
            candidates.append(variant)
    return candidates


#: Random architectures :func:`check_reachable` also tries (own fixed-seed generator).
REACHABILITY_SAMPLES = 2000
REACHABILITY_SEED = 20_240_607


def check_reachable(space: Any, cost_model: CostModel, constraints: Sequence[Constraint]) -> None:
    """Raise :class:`InfeasibleBudgetError` when no architecture can be found that meets the budgets.

    Tries the cheapest architectures first, then ``REACHABILITY_SAMPLES`` random ones: with a
    measured latency table the smallest network need not be the fastest (a shallow net feeds a
    larger feature map to the head, and tiny layers are within timing noise), so a budget that
    random sub-nets meet must not be refused. The samples come from their own fixed-seed
    generator: the search's random stream is untouched.
    """
    candidates = cheapest_candidates(space)
    if any(cost_model.feasible(arch, constraints) for arch in candidates):
        return
    rng = np.random.default_rng(REACHABILITY_SEED)
    if any(cost_model.feasible(space.sample(rng), constraints) for _ in range(REACHABILITY_SAMPLES)):
        return
    smallest = candidates[0]
    broken = "; ".join(violations(constraints, cost_model.costs(smallest)))
    wanted = " and ".join(c.describe() for c in constraints)
    raise InfeasibleBudgetError(
        f"no architecture of this search space can meet {wanted}: the smallest one "
        f"(depth {smallest.depth}) has {broken}, and none of {REACHABILITY_SAMPLES} random ones fits"
    )


# --------------------------------------------------------------------------- the GA
class SearchLog:
    """Mutable bookkeeping of one GA run (everything here is part of the saved state).

    Keeps, per canonical architecture this run scored, its primary cost and the running sum
    and count of its cached losses, so the per-generation front is one vectorised pass
    instead of re-reading the cache for every architecture ever seen.
    """

    def __init__(self, cost_model: CostModel, primary: str) -> None:
        self.cost_model = cost_model
        self.primary = primary
        self.index: dict[Any, int] = {}
        self.archs: list[Any] = []  # canonical, in first-seen order
        self.primary_cost: list[float] = []
        self.loss_sum: list[float] = []
        self.loss_count: list[int] = []
        self.evaluations = 0
        self.cache_hits = 0
        self.history: list[dict[str, Any]] = []
        self.stats: dict[str, int] = {
            "warm_start_seeds": 0,
            "init_samples": 0,
            "init_mutation_fill": 0,
            "init_duplicates": 0,
            "children": 0,
            "rejected_invalid": 0,
            "rejected_duplicate": 0,
            "rejected_infeasible": 0,
            "fallback_random": 0,
            "fallback_duplicate": 0,
        }

    def register(self, key: Any, cache: FitnessCache) -> None:
        losses = cache.losses(key)
        self.index[key] = len(self.archs)
        self.archs.append(key)
        self.primary_cost.append(self.cost_model.costs(key)[self.primary])
        self.loss_sum.append(float(sum(losses.values())))
        self.loss_count.append(len(losses))

    def score(self, cache: FitnessCache, arch: Any, slice_id: int, fitness_fn: FitnessFn) -> float:
        key = arch.canonical()
        loss, cached = cache.lookup_canonical(key, slice_id, fitness_fn)
        if cached:
            self.cache_hits += 1
        else:
            self.evaluations += 1
        position = self.index.get(key)
        if position is None:
            self.register(key, cache)
        elif not cached:
            self.loss_sum[position] += loss
            self.loss_count[position] += 1
        return loss

    def score_aside(self, cache: FitnessCache, arch: Any, slice_id: int, fitness_fn: FitnessFn) -> float:
        """Like :meth:`score` (counted as an evaluation or a cache hit) but kept out of the front."""
        value, cached = cache.lookup_canonical(arch.canonical(), slice_id, fitness_fn)
        if cached:
            self.cache_hits += 1
        else:
            self.evaluations += 1
        return value

    def front(self) -> tuple[FrontPoint, ...]:
        """Primary cost vs. mean loss over the slices each architecture was scored on."""
        if not self.archs:
            return ()
        means = np.asarray(self.loss_sum) / np.asarray(self.loss_count)
        chosen = front_1d(self.primary_cost, means)
        return tuple(
            FrontPoint(
                self.archs[i], self.cost_model.costs(self.archs[i]), float(means[i]), self.loss_count[i]
            )
            for i in chosen
        )


class _Search:
    """The GA's operators bound to one space, cost model, constraint set, config and RNG."""

    def __init__(
        self,
        space: Any,
        cost_model: CostModel,
        constraints: tuple[Constraint, ...],
        config: GAConfig,
        rng: np.random.Generator,
        run: SearchLog,
    ) -> None:
        self.space = space
        self.cost_model = cost_model
        self.constraints = constraints
        self.config = config
        self.rng = rng
        self.run = run
        self.choices = mutable_choices(space)

    def feasible(self, arch: Any) -> bool:
        return self.cost_model.feasible(arch, self.constraints)

    def random_feasible(self, exclude: Mapping[Any, Any], tries: int) -> Any | None:
        for _ in range(tries):
            arch = self.space.sample(self.rng)
            if arch.canonical() not in exclude and self.feasible(arch):
                return arch
        return None

    def initial_population(self, seeds: Sequence[Any] = ()) -> list[Any]:
        """Init(P): ``seeds`` (feasible, distinct; see :func:`warm_start_seeds`), then distinct
        feasible random architectures up to P, with bounded fallbacks."""
        config = self.config
        found: dict[Any, Any] = {}
        for arch in seeds[: config.pool_size]:
            found.setdefault(arch.canonical(), arch)
        self.run.stats["warm_start_seeds"] = len(found)
        for _ in range(config.max_init_tries):
            if len(found) >= config.pool_size:
                break
            self.run.stats["init_samples"] += 1
            arch = self.space.sample(self.rng)
            key = arch.canonical()
            if key not in found and self.feasible(arch):
                found[key] = arch
        if len(found) < config.pool_size:
            # A tight budget: random samples rarely fit. Seed with the cheapest archs and grow
            # the pool by mutating what fits (local search around the feasible corner).
            for arch in cheapest_candidates(self.space):
                if len(found) < config.pool_size and arch not in found and self.feasible(arch):
                    found[arch] = arch
            if not found:
                raise InfeasibleBudgetError(
                    f"no feasible architecture found in {config.max_init_tries} random samples for "
                    + " and ".join(c.describe() for c in self.constraints)
                )
            parents = list(found.values())
            for _ in range(config.max_mutation_tries * (config.pool_size - len(found))):
                if len(found) >= config.pool_size:
                    break
                parent = parents[int(self.rng.integers(len(parents)))]
                child = mutate(
                    parent, self.choices, self.config.mutations_per_child, self.rng, self.config.deepen
                )
                key = child.canonical()
                if key not in found and _valid(self.space, child) and self.feasible(child):
                    found[key] = child
                    parents.append(child)
                    self.run.stats["init_mutation_fill"] += 1
        population = list(found.values())
        distinct = len(population)
        while len(population) < config.pool_size:
            # The feasible set is smaller than the pool: repeat members (cache hits, no cost).
            population.append(population[len(population) % distinct])
            self.run.stats["init_duplicates"] += 1
        return population

    def elites(self, ranked: Sequence[Any], losses: Sequence[float]) -> list[Any]:
        """The best ``elite_size`` distinct architectures of ``ranked`` (best first, ``losses``
        beside it), then with ``depth_elites`` the best of each depth they left short."""
        chosen: dict[Any, Any] = {}
        for arch in ranked:
            key = arch.canonical()
            if key not in chosen:
                chosen[key] = arch
                if len(chosen) == self.config.elite_size:
                    break
        per_depth = self.config.depth_elites
        if per_depth:
            kept = Counter(arch.depth for arch in chosen.values())
            for arch, loss in zip(ranked, losses, strict=True):
                key = arch.canonical()
                # A diverged score says nothing of its depth: it never holds a place open.
                if key not in chosen and kept[arch.depth] < per_depth and math.isfinite(loss):
                    chosen[key] = arch
                    kept[arch.depth] += 1
        return list(chosen.values())

    def child(self, elites: Sequence[Any], taken: Mapping[Any, Any]) -> Any | None:
        stats = self.run.stats
        for _ in range(self.config.max_mutation_tries):
            first = int(self.rng.integers(len(elites)))
            parent = elites[first]
            if self.config.crossover and len(elites) > 1:
                second = int(self.rng.integers(len(elites) - 1))
                second += second >= first  # a different elite
                parent = crossover(parent, elites[second], self.choices, self.rng)
            candidate = mutate(
                parent, self.choices, self.config.mutations_per_child, self.rng, self.config.deepen
            )
            if not _valid(self.space, candidate):
                stats["rejected_invalid"] += 1
            elif candidate.canonical() in taken:
                stats["rejected_duplicate"] += 1
            elif not self.feasible(candidate):
                stats["rejected_infeasible"] += 1
            else:
                return candidate
        return None

    def next_population(self, elites: Sequence[Any]) -> list[Any]:
        """Mutate(A, L_a, H_t, C): ``elites`` (from :meth:`elites`) survive, children of elites
        fill the pool to P."""
        population = list(elites)
        taken: dict[Any, None] = {arch.canonical(): None for arch in elites}
        stats = self.run.stats
        while len(population) < self.config.pool_size:
            child = self.child(elites, taken)
            if child is not None:
                stats["children"] += 1
            else:
                child = self.random_feasible(taken, self.config.max_mutation_tries)
                if child is not None:
                    stats["fallback_random"] += 1
                else:
                    child = elites[len(population) % len(elites)]
                    stats["fallback_duplicate"] += 1
            population.append(child)
            taken[child.canonical()] = None
        return population


def _front(
    archs: Sequence[Any], cache: FitnessCache, cost_model: CostModel, kind: str
) -> tuple[FrontPoint, ...]:
    points = []
    for arch in archs:
        losses = cache.losses(arch)
        if losses:
            points.append(FrontPoint(arch, cost_model.costs(arch), cache.mean_loss(arch), len(losses)))
    chosen = pareto_front([(point.costs[kind], point.loss) for point in points])
    return tuple(points[i] for i in chosen)


def _final_choice(
    ranked: Sequence[Any],
    last_losses: Sequence[float],
    cache: FitnessCache,
    run: SearchLog,
    fitness_fn: FitnessFn,
    config: GAConfig,
) -> tuple[Any, float, dict[str, Any]]:
    """Score the top ``final_candidates`` of the last ranking (or, with ``finalists_from=
    "archive"``, of :func:`archive_ranking`) on ``config.final_slice_ids``; lowest mean wins."""
    if config.final_candidates == 0:
        return ranked[0], last_losses[0], {"final_candidates": 0}
    if config.finalists_from == "archive":
        ranked = archive_ranking(run.archs, cache, config.num_slices)
    candidates: dict[Any, Any] = {}
    for arch in ranked:
        candidates.setdefault(arch.canonical(), arch)
        if len(candidates) == config.final_candidates:
            break
    best, best_loss, final_stats = final_choice(
        list(candidates.values()), cache, run, fitness_fn, config.num_slices, config.final_slices
    )
    return best, best_loss, {"final_candidates": len(candidates), **final_stats}


def archive_ranking(archs: Sequence[Any], cache: FitnessCache, num_slices: int) -> list[Any]:
    """``archs`` (canonical, in first-seen order) best first by their mean rank within each
    search slice they were scored on, as a fraction (0 the slice's best of ``archs``, 1 its
    worst); more slices first on ties, then first seen.

    Why ranks and not the mean loss: slices differ in difficulty, and the last generation's
    children were each scored on one slice while the elites met several, so mean losses over
    different slices are not comparable; within one slice they are. Why the whole archive: the
    last generation is the elites and their mutants, one neighbourhood; a final criterion that
    ranks better than the search's loss (the held-out error rate) can only choose among what it
    is shown."""
    order = {key: i for i, key in enumerate(archs)}
    fractions: dict[Any, list[float]] = {key: [] for key in archs}
    for slice_id in range(num_slices):
        scored = sorted(
            (loss, order[key], key) for key in archs if (loss := cache.loss_on(key, slice_id)) is not None
        )
        last = max(1, len(scored) - 1)
        for position, (_, _, key) in enumerate(scored):
            fractions[key].append(position / last)
    return sorted(
        (key for key in archs if fractions[key]),
        key=lambda key: (sum(fractions[key]) / len(fractions[key]), -len(fractions[key]), order[key]),
    )


def warm_start_seeds(
    cache: FitnessCache,
    cost_model: CostModel,
    constraints: Sequence[Constraint],
    num_slices: int,
    count: int,
) -> list[Any]:
    """The ``count`` best architectures in ``cache`` that meet ``constraints`` and have a finite
    loss, best first by :func:`archive_ranking` (rank within each slice, so architectures scored
    on different slices compare fairly); ``[]`` for ``count=0`` or an empty cache."""
    if count == 0:
        return []
    feasible = [
        key
        for key in cache.archs()
        if math.isfinite(cache.mean_loss(key)) and cost_model.feasible(key, constraints)
    ]
    return archive_ranking(feasible, cache, num_slices)[:count]


def sweep_order(budgets: Sequence[float], warm_start: int) -> list[int]:
    """The indices of ``budgets`` (upper limits of one cost kind) in the order a sweep runs them:
    loosest first when warm starting - a tighter budget's feasible set lies inside a looser
    one's, so the looser GAs' best architectures that fit can seed it - else as given."""
    if warm_start == 0:
        return list(range(len(budgets)))
    return sorted(range(len(budgets)), key=lambda index: (-float(budgets[index]), index))


def final_slice_ids(num_slices: int, final_slices: int) -> range:
    """The held-out slices ``num_slices ..`` when ``final_slices`` > 0, else the search slices."""
    if final_slices:
        return range(num_slices, num_slices + final_slices)
    return range(num_slices)


def final_choice(
    candidates: Sequence[Any],
    cache: FitnessCache,
    run: SearchLog,
    fitness_fn: FitnessFn,
    num_slices: int,
    final_slices: int,
) -> tuple[Any, float, dict[str, Any]]:
    """The candidate with the lowest mean over :func:`final_slice_ids` (the first on ties); GA
    and random search share it. Returns ``(best, best_loss, stats)``: ``best_loss`` is always
    its mean search-slice loss; held-out values are scored into a cache of their own with
    :meth:`SearchLog.score_aside` (they may be another criterion) and their mean is
    ``stats["final_score"]``."""
    held_out = final_slices > 0
    slice_ids = final_slice_ids(num_slices, final_slices)
    scores = FitnessCache() if held_out else cache
    score = run.score_aside if held_out else run.score
    best, best_mean = None, math.inf
    scorer = prefetched(scores, fitness_fn, [(arch.canonical(), s) for arch in candidates for s in slice_ids])
    for arch in candidates:
        values = [score(scores, arch, s, scorer) for s in slice_ids]
        mean = float(sum(values) / len(values))
        if best is None or mean < best_mean:
            best, best_mean = arch, mean
    if not held_out:
        return best, best_mean, {"final_slices": 0, "final_score": None}
    return best, cache.mean_loss(best), {"final_slices": final_slices, "final_score": _json_loss(best_mean)}


def _check_state(state: Mapping[str, Any], config: GAConfig, constraints: Sequence[Constraint]) -> None:
    if not isinstance(state, Mapping) or state.get("version") != STATE_VERSION:
        raise GAStateError(f"not a GA state of version {STATE_VERSION}")
    # Through from_dict, so a state saved before a knob existed reads as that knob's default.
    try:
        saved_config = GAConfig.from_dict(state.get("config") or {})
    except (GAConfigError, TypeError):
        saved_config = None
    if saved_config != config:
        raise GAStateError("the saved GA state was made with a different GAConfig")
    if state.get("constraints") != [c.to_dict() for c in constraints]:
        raise GAStateError("the saved GA state was made for different constraints")


def _check_depth_elites(config: GAConfig, space: Any) -> None:
    """Refuse elites of every depth that would leave fewer than half of the pool to children."""
    depths = len(getattr(space, "depths", ())) or 1
    most = most_depth_elites(config.pool_size, config.top_fraction, depths)
    if config.depth_elites > most:
        raise GAConfigError(
            f"depth_elites {config.depth_elites} of each of {depths} depths, besides the best "
            f"{config.elite_size}, would leave fewer than half of a pool of {config.pool_size} to "
            f"children; at most {most} with this pool"
        )


def run_ga(
    space: Any,
    fitness_fn: FitnessFn,
    costs_fn: CostsFn | CostModel,
    constraints: Sequence[Constraint],
    config: GAConfig | None = None,
    *,
    progress: ProgressCallback = null_progress,
    cache: FitnessCache | None = None,
    state: GAState | None = None,
    on_state: Callable[[GAState], None] | None = None,
    event_extra: Mapping[str, Any] | None = None,
) -> SearchResult:
    """Algorithm 1: the feasible architecture with the lowest few-shot loss under ``constraints``.

    ``state`` resumes a run from what ``on_state`` received after some generation (also after
    the last one: then only the final choice is made). ``on_state`` is called after every
    generation, *before* the progress event, so a :class:`engine.progress.JobCancelled` raised by
    ``progress`` leaves a state that resumes at the next generation. One
    ``{"kind": "adapt", ...}`` event per generation carries the pool's (costs, fitness) points,
    the current front (primary constraint's cost vs. estimated loss over every architecture
    this run evaluated), the best architecture, evaluations and cache hits. With
    ``config.patience`` the run ends once its elites stood still that many generations; the last
    event then has ``stopped_early`` and ``stats["generations"]`` says how many ran.
    """
    config = config if config is not None else GAConfig()
    _check_depth_elites(config, space)
    constraints = check_constraints(constraints)
    cost_model = costs_fn if isinstance(costs_fn, CostModel) else CostModel(costs_fn)
    cache = cache if cache is not None else FitnessCache()
    primary = constraints[0].kind
    started = time.perf_counter()
    rng = make_rngs(config.seed).numpy
    run = SearchLog(cost_model, primary)
    search = _Search(space, cost_model, constraints, config, rng, run)
    decode = type(space.smallest()).from_dict
    ranked: list[Any] = []
    last_losses: list[float] = []

    if state is None:
        check_reachable(space, cost_model, constraints)
        seeds = warm_start_seeds(cache, cost_model, constraints, config.num_slices, config.warm_start)
        population = search.initial_population(seeds)
        start = 0
    else:
        _check_state(state, config, constraints)
        rng.bit_generator.state = state["rng"]
        cache.load_state(state["cache"], decode)
        population = [decode(d) for d in state["population"]]
        ranked = [decode(d) for d in state["ranked"]]
        last_losses = [_loss_from_json(v) for v in state["ranked_losses"]]
        for arch_dict in state["seen"]:
            run.register(decode(arch_dict).canonical(), cache)
        run.evaluations = int(state["evaluations"])
        run.cache_hits = int(state["cache_hits"])
        run.history = list(state["history"])
        run.stats.update(state["stats"])
        start = int(state["generation"])

    extra = dict(event_extra or {})
    previous_elites = _keys(search.elites(ranked, last_losses)) if ranked else None
    # True from the start only for a resumed run that had already stopped early.
    stopping = _patience_spent(run.history, config.patience)
    for generation in range(start, config.iterations):
        if stopping:
            break
        slice_id = int(rng.integers(config.num_slices))
        scorer = prefetched(cache, fitness_fn, [(arch.canonical(), slice_id) for arch in population])
        losses = [run.score(cache, arch, slice_id, scorer) for arch in population]
        order = sorted(range(len(population)), key=lambda i: (losses[i], i))
        ranked = [population[i] for i in order]
        last_losses = [losses[i] for i in order]
        finite = [loss for loss in losses if math.isfinite(loss)]
        elite_archs = search.elites(ranked, last_losses)
        elites = _keys(elite_archs)
        run.history.append(
            {
                "generation": generation,
                "slice": slice_id,
                "best_loss": _json_loss(last_losses[0]),
                "mean_loss": float(sum(finite) / len(finite)) if finite else None,
                "evaluations": run.evaluations,
                "cache_hits": run.cache_hits,
                "elites_changed": elites != previous_elites,
            }
        )
        previous_elites = elites
        stopping = _patience_spent(run.history, config.patience)
        if generation < config.iterations - 1 and not stopping:
            population = search.next_population(elite_archs)
        if on_state is not None:
            on_state(
                {
                    "version": STATE_VERSION,
                    "generation": generation + 1,
                    "config": config.to_dict(),
                    "constraints": [c.to_dict() for c in constraints],
                    "rng": rng.bit_generator.state,
                    "population": [arch.to_dict() for arch in population],
                    "ranked": [arch.to_dict() for arch in ranked],
                    "ranked_losses": [_json_loss(loss) for loss in last_losses],
                    "seen": [cache.arch_dict(arch) for arch in run.archs],
                    "evaluations": run.evaluations,
                    "cache_hits": run.cache_hits,
                    "history": list(run.history),
                    "stats": dict(run.stats),
                    "cache": cache.to_state(),
                }
            )
        front = run.front()
        progress(
            {
                **extra,
                "kind": "adapt",
                "current": generation + 1,
                "total": config.iterations,
                "generation": generation,
                "slice": slice_id,
                "population": [
                    {"costs": cost_model.costs(arch), "fitness": _json_loss(loss)}
                    for arch, loss in zip(ranked, last_losses, strict=True)
                ],
                "front": [point.to_dict() for point in front],
                "front_cost": primary,
                "best": ranked[0].to_dict(),
                "stopped_early": stopping and generation < config.iterations - 1,
                "best_fitness": _json_loss(last_losses[0]),
                "mean_fitness": run.history[-1]["mean_loss"],
                "evaluations": run.evaluations,
                "cache_hits": run.cache_hits,
                "constraints": [c.to_dict() for c in constraints],
            }
        )

    if not ranked:
        raise GAStateError("the GA state has no evaluated generation to choose from")
    best, best_loss, final_stats = _final_choice(ranked, last_losses, cache, run, fitness_fn, config)
    return SearchResult(
        method="ga",
        best_arch=best.canonical(),
        best_loss=best_loss,
        best_costs=cost_model.costs(best),
        constraints=constraints,
        evaluations=run.evaluations,
        cache_hits=run.cache_hits,
        evaluated_archs=len(run.archs),
        front=run.front(),
        history=tuple(run.history),
        stats={
            **run.stats,
            **final_stats,
            "elite_size": config.elite_size,
            "generations": len(run.history),
            "non_finite": cache.non_finite,
        },
        elapsed_s=time.perf_counter() - started,
    )


def _keys(archs: Sequence[Any]) -> frozenset[Any]:
    return frozenset(arch.canonical() for arch in archs)


def _patience_spent(history: Sequence[Mapping[str, Any]], patience: int) -> bool:
    """Whether the last ``patience`` generations all left the elite set as it was (``GAConfig.
    patience``; 0 never stops). A history saved before the knob existed has no ``elites_changed``
    and reads as changed, so such a run goes on to its ``iterations``."""
    if patience == 0 or len(history) < patience:
        return False
    return not any(entry.get("elites_changed", True) for entry in history[-patience:])


def save_state(path: str | Path, state: GAState) -> Path:
    """Write a GA state atomically (a reader never sees half a checkpoint)."""
    return atomic_write_json(path, state, compact=True)


def load_state(path: str | Path) -> GAState:
    import json

    try:
        return json.loads(Path(path).read_text())
    except ValueError as error:
        raise GAStateError(f"{path}: not a JSON GA state ({error})") from None


# --------------------------------------------------------------------------- budget sweeps
@dataclass(frozen=True)
class BudgetSweepResult:
    """One GA per budget of one cost kind, sharing evaluations; the front over all of them."""

    kind: str
    unit: str
    budgets: tuple[float, ...]
    results: tuple[SearchResult, ...]
    front: tuple[FrontPoint, ...]
    evaluations: int
    cache_hits: int
    elapsed_s: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "unit": self.unit,
            "budgets": list(self.budgets),
            "results": [result.to_dict() for result in self.results],
            "front": [point.to_dict() for point in self.front],
            "evaluations": self.evaluations,
            "cache_hits": self.cache_hits,
            "elapsed_s": self.elapsed_s,
        }


def search_budgets(
    space: Any,
    fitness_fn: FitnessFn,
    costs_fn: CostsFn | CostModel,
    kind: str,
    budgets: Sequence[float],
    config: GAConfig | None = None,
    *,
    unit: str | None = None,
    extra_constraints: Sequence[Constraint] = (),
    progress: ProgressCallback = null_progress,
    cache: FitnessCache | None = None,
) -> BudgetSweepResult:
    """A Pareto sweep: one GA per budget (seed ``derive_seed(config.seed, index)``), one shared cache.

    With ``config.warm_start`` the budgets run loosest first (:func:`sweep_order`) and each GA
    starts from the best feasible architectures the earlier ones scored; results are in the
    order of ``budgets`` either way.

    Every budget is validated and checked for reachability before anything is evaluated, so a
    bad list fails at once. The returned front covers every architecture evaluated for any
    budget: ``kind`` cost against the mean loss over the slices the architecture was scored on.
    Progress events carry ``budget_index`` and ``budget``.
    """
    config = config if config is not None else GAConfig()
    if isinstance(budgets, str | bytes) or not isinstance(budgets, Sequence) or not budgets:
        raise ValueError(f"budgets must be a non-empty list of numbers, got {budgets!r}")
    started = time.perf_counter()
    cost_model = costs_fn if isinstance(costs_fn, CostModel) else CostModel(costs_fn)
    cache = cache if cache is not None else FitnessCache()
    constraint_sets = [(Constraint(kind, limit, unit), *extra_constraints) for limit in budgets]
    for constraints in constraint_sets:
        check_reachable(space, cost_model, check_constraints(constraints))
    evaluations_before, hits_before = cache.evaluations, cache.hits
    results: dict[int, SearchResult] = {}
    for index in sweep_order(budgets, config.warm_start):
        constraints = constraint_sets[index]
        budget_config = GAConfig.from_dict({**config.to_dict(), "seed": derive_seed(config.seed, index)})
        results[index] = run_ga(
            space,
            fitness_fn,
            cost_model,
            constraints,
            budget_config,
            progress=progress,
            cache=cache,
            event_extra={"budget_index": index, "budget": constraints[0].to_dict()},
        )
    return BudgetSweepResult(
        kind=kind,
        unit=constraint_sets[0][0].unit,
        budgets=tuple(float(b) for b in budgets),
        results=tuple(results[index] for index in range(len(budgets))),
        front=_front(cache.archs(), cache, cost_model, kind),
        evaluations=cache.evaluations - evaluations_before,
        cache_hits=cache.hits - hits_before,
        elapsed_s=time.perf_counter() - started,
    )
