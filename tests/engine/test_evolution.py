"""Algorithm 1 (engine.search.evolution) against the real search space with synthetic fitness.

The fitness functions here are synthetic on purpose: they make the optimum known by
enumeration and every evaluation observable. The real super-net fitness is tested in
test_adapt.py.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from engine.cost import arch_macs, arch_params
from engine.progress import JobCancelled, ListProgress
from engine.search.constraints import Constraint, ConstraintError, CostModel, InfeasibleBudgetError
from engine.search.evolution import (
    FitnessCache,
    GAConfig,
    GAConfigError,
    GAStateError,
    archive_ranking,
    deepened,
    get_choice,
    load_state,
    mutable_choices,
    mutate,
    run_ga,
    save_state,
    search_budgets,
    sweep_order,
    warm_start_seeds,
)
from engine.search.pareto import dominates, pareto_front
from engine.search.random_search import random_search
from engine.space import DEFAULT_CHOICE, Arch, LayerChoice, SearchSpace

SMALL_KERNELS = (1, 3)
SMALL_WIDTHS = (0.25, 0.5, 1.0, 2.0)
SMALL_ACTIVATIONS = ("relu", "elu")


def small_space() -> SearchSpace:
    """vgg9 with 2 kernels x 4 widths x 2 activations: 69,904 distinct networks, enumerable."""
    return SearchSpace(
        backbone="vgg9",
        in_channels=1,
        image_size=28,
        num_classes=5,
        kernels=SMALL_KERNELS,
        widths=SMALL_WIDTHS,
        activations=SMALL_ACTIVATIONS,
    )


def enumerate_distinct(space: SearchSpace) -> list[Arch]:
    options = [
        LayerChoice(kernel=k, width=w, activation=a)
        for k in space.kernels
        for w in space.widths
        for a in space.activations
    ]
    archs = []
    for depth in space.depths:
        for used in itertools.product(options, repeat=depth):
            layers = tuple(used) + (DEFAULT_CHOICE,) * (space.n_layers - depth)
            archs.append(Arch(backbone=space.backbone, layers=layers, depth=depth))
    return archs


class SyntheticFitness:
    """Additive per-layer loss table + a per-slice offset; records every call.

    Wider layers and more depth tend to lower the loss (as capacity does in a real super-net),
    with seeded random perturbations so the constrained optimum is not obvious. The slice
    offset shifts every architecture equally: it changes losses, never a ranking on one slice.
    """

    def __init__(self, space: SearchSpace, seed: int = 7, num_slices: int = 4) -> None:
        rng = np.random.default_rng(seed)
        n = space.n_layers
        self.kernel_term = {(i, k): float(rng.normal(0, 0.15)) for i in range(n) for k in space.kernels}
        self.width_term = {
            (i, w): -0.25 * math.log2(w) + float(rng.normal(0, 0.15)) for i in range(n) for w in space.widths
        }
        self.activation_term = {
            (i, a): float(rng.normal(0, 0.1)) for i in range(n) for a in space.activations
        }
        self.depth_term = {d: 1.0 - 0.15 * d + float(rng.normal(0, 0.05)) for d in space.depths}
        self.slice_offset = [float(x) for x in rng.normal(0, 0.3, size=num_slices)]
        self.calls: list[tuple[Arch, int]] = []

    def true_loss(self, arch: Arch) -> float:
        total = self.depth_term[arch.depth]
        for index in range(arch.depth):
            layer = arch.layers[index]
            total += self.kernel_term[(index, layer.kernel)]
            total += self.width_term[(index, layer.width)]
            total += self.activation_term[(index, layer.activation)]
        return total

    def __call__(self, arch: Arch, slice_id: int) -> float:
        self.calls.append((arch, slice_id))
        return self.true_loss(arch) + self.slice_offset[slice_id]


def costs_fn_for(space: SearchSpace):
    def costs(arch: Arch) -> dict[str, float]:
        return {"params": arch_params(space, arch), "macs": arch_macs(space, arch)}

    return costs


@pytest.fixture(scope="module")
def space() -> SearchSpace:
    return small_space()


@pytest.fixture(scope="module")
def enumerated(space):
    """Every distinct network of the small space with its params (computed once)."""
    archs = enumerate_distinct(space)
    params = np.array([arch_params(space, arch) for arch in archs], dtype=float)
    return archs, params


def small_config(**overrides) -> GAConfig:
    values = dict(pool_size=20, iterations=12, num_slices=4, final_candidates=3, max_init_tries=2000, seed=3)
    values.update(overrides)
    return GAConfig(**values)


# --------------------------------------------------------------------------- constraints
@pytest.mark.parametrize("limit", [0, -1.0, math.nan, math.inf, -math.inf, True, "3"])
def test_bad_budget_is_refused_with_a_clear_error(limit):
    with pytest.raises(ConstraintError, match="latency_ms budget"):
        Constraint("latency_ms", limit)


def test_unknown_kind_and_unit_are_refused():
    with pytest.raises(ConstraintError, match="unknown constraint kind 'energy'"):
        Constraint("energy", 1.0)
    with pytest.raises(ConstraintError, match="unknown unit 'K' for latency_ms"):
        Constraint("latency_ms", 1.0, "K")


def test_constraint_parse_and_units():
    assert Constraint.parse("latency_ms=3").base_limit == 3.0
    assert Constraint.parse("params=70K").base_limit == 70_000.0
    assert Constraint.parse("macs=24.1M").base_limit == pytest.approx(24.1e6)
    assert Constraint.parse("latency_ms=500us").base_limit == pytest.approx(0.5)
    for text in ("latency_ms=nan", "params=-3", "params=0", "latency_ms", "params=inf"):
        with pytest.raises(ConstraintError):
            Constraint.parse(text)
    c = Constraint("params", 70, "K")
    assert Constraint.from_dict(c.to_dict()) == c
    assert c.satisfied_by({"params": 70_000}) and not c.satisfied_by({"params": 70_001})
    with pytest.raises(ConstraintError, match="no 'params' cost"):
        c.satisfied_by({"macs": 1})


def test_ga_config_is_validated():
    for bad in (
        {"pool_size": 1},
        {"iterations": 0},
        {"top_fraction": 0},
        {"top_fraction": 1.5},
        {"max_mutation_tries": 0},
        {"final_candidates": -1},
        {"final_slices": -1},
        {"final_slices": True},
        {"seed": 1.5},
        {"deepen": "grow"},
    ):
        with pytest.raises(GAConfigError):
            GAConfig(**bad)
    assert GAConfig().elite_size == 10
    assert GAConfig(pool_size=5, top_fraction=0.1).elite_size == 1


# --------------------------------------------------------------------------- pareto
def brute_force_front(points):
    vectors = [((*np.atleast_1d(cost),), loss) for cost, loss in points]
    result = []
    for i, (cost, loss) in enumerate(vectors):
        vector = (*cost, loss)
        if not all(math.isfinite(x) for x in vector):
            continue
        dominated = any(
            dominates((*c2, l2), vector) or ((*c2, l2) == vector and j < i)
            for j, (c2, l2) in enumerate(vectors)
            if j != i and all(math.isfinite(x) for x in (*c2, l2))
        )
        if not dominated:
            result.append(i)
    return sorted(result)


@pytest.mark.parametrize("dims", [1, 2])
def test_pareto_front_matches_brute_force(dims):
    rng = np.random.default_rng(dims)
    for _ in range(20):
        n = int(rng.integers(1, 40))
        # Small integer grids force ties and duplicates.
        costs = rng.integers(0, 6, size=(n, dims)).astype(float)
        losses = rng.integers(0, 6, size=n).astype(float)
        points = [
            (float(c[0]) if dims == 1 else tuple(c), float(loss))
            for c, loss in zip(costs, losses, strict=True)
        ]
        front = pareto_front(points)
        assert sorted(front) == brute_force_front(points)
        # Sorted by cost, and along a 1-D front the loss strictly falls.
        keys = [points[i][0] for i in front]
        assert keys == sorted(keys)
        if dims == 1:
            front_losses = [points[i][1] for i in front]
            assert all(a > b for a, b in itertools.pairwise(front_losses))


def test_pareto_front_skips_nan_and_inf_and_checks_dimensions():
    points = [(1.0, math.nan), (2.0, 1.0), (0.5, math.inf), (3.0, 0.5), (2.5, 2.0)]
    assert pareto_front(points) == [1, 3]
    assert pareto_front([]) == []
    with pytest.raises(ValueError, match="costs"):
        pareto_front([((1.0, 2.0), 1.0), (1.0, 1.0)])


# --------------------------------------------------------------------------- mutation
def test_mutate_changes_exactly_two_choices_to_different_values(space):
    rng = np.random.default_rng(0)
    choices = mutable_choices(space)
    for _ in range(200):
        parent = space.sample(rng)
        child = mutate(parent, choices, 2, rng)
        changed = [c for c in choices if get_choice(parent, c[0], c[1]) != get_choice(child, c[0], c[1])]
        assert len(changed) == 2
        space.validate(child)


def test_copy_last_fills_the_layers_a_mutation_adds_with_the_last_layers_choices(space):
    rng = np.random.default_rng(1)
    choices = mutable_choices(space)
    deepenings = 0
    for _ in range(1000):
        parent = space.sample(rng)
        child = mutate(parent, choices, 2, rng, "copy-last")
        space.validate(child)
        changed = [c for c in choices if get_choice(parent, c[0], c[1]) != get_choice(child, c[0], c[1])]
        if child.depth <= parent.depth:
            assert len(changed) == 2  # as Algorithm 1's mutation
            continue
        deepenings += 1
        last = parent.layers[parent.depth - 1]
        # The added layers are the last layer, up to the one other choice the mutation changed.
        differences = [
            (index, name)
            for index in range(parent.depth, child.depth)
            for name in ("kernel", "width", "activation")
            if getattr(child.layers[index], name) != getattr(last, name)
        ]
        before = [c for c in changed if c[0] != "depth" and c[0] < parent.depth]
        # (None at all when the other choice was a layer beyond the new depth.)
        assert len(differences) + len(before) <= 1, (parent, child)
    assert deepenings > 40  # 80 of these 1,000


def test_copy_last_copies_a_resnet_block_layer_by_layer():
    space = SearchSpace.resnet12(in_channels=1, image_size=28, num_classes=5)
    rng = np.random.default_rng(4)
    arch = space.sample(rng)
    while arch.depth != 1:
        arch = space.sample(rng)
    grown = deepened(arch, 3, space.choices())
    per_block = grown.n_used_layers // grown.depth
    assert grown.depth == 3 and per_block == 3
    for index in range(per_block, grown.n_used_layers):
        source = arch.layers[index % per_block]
        target = grown.layers[index]
        for name, options in (("kernel", space.kernels), ("width", space.allowed_widths(index)),
                              ("activation", space.activations)):  # fmt: skip
            value = getattr(source, name)
            expected = value if value in options and len(options) > 1 else getattr(arch.layers[index], name)
            assert getattr(target, name) == expected, (index, name)
    assert grown.layers[:per_block] == arch.layers[:per_block]
    space.validate(grown)


def test_a_ga_that_copies_the_last_layer_keeps_every_constraint_and_its_seed(space):
    def run(deepen):
        fitness = SyntheticFitness(space)
        config = small_config(seed=11, deepen=deepen)
        result = run_ga(space, fitness, costs_fn_for(space), [Constraint("params", 50_000)], config)
        return result, fitness.calls

    first, again, stored = run("copy-last"), run("copy-last"), run("stored")
    assert first[0].to_dict() | {"elapsed_s": 0} == again[0].to_dict() | {"elapsed_s": 0}
    assert first[1] == again[1] and first[1] != stored[1]
    assert all(arch_params(space, arch) <= 50_000 for arch, _ in first[1])


# --------------------------------------------------------------------------- the GA
def test_infeasible_budget_fails_before_any_evaluation(space):
    fitness = SyntheticFitness(space)
    smallest_params = arch_params(space, space.smallest())
    with pytest.raises(InfeasibleBudgetError, match=r"params <= .*smallest"):
        run_ga(
            space, fitness, costs_fn_for(space), [Constraint("params", smallest_params - 1)], small_config()
        )
    assert fitness.calls == []
    with pytest.raises(InfeasibleBudgetError):
        search_budgets(
            space, fitness, costs_fn_for(space), "params", [1e9, smallest_params - 1], small_config()
        )
    assert fitness.calls == []


def test_every_evaluated_and_chosen_arch_meets_all_constraints(space, enumerated):
    archs, params = enumerated
    limit_params = float(np.quantile(params, 0.3))
    costs = costs_fn_for(space)
    macs = np.array([arch_macs(space, a) for a in archs[:: max(1, len(archs) // 3000)]])
    limit_macs = float(np.quantile(macs, 0.5))
    constraints = [Constraint("params", limit_params), Constraint("macs", limit_macs)]
    fitness = SyntheticFitness(space)
    progress = ListProgress()
    result = run_ga(space, fitness, costs, constraints, small_config(), progress=progress)
    assert result.constraint_met
    for arch, _ in fitness.calls:
        c = costs(arch)
        assert c["params"] <= limit_params and c["macs"] <= limit_macs
    events = progress.of_kind("adapt")
    assert [e["current"] for e in events] == list(range(1, 13))
    for event in events:
        assert len(event["population"]) == 20
        for point in event["population"]:
            assert point["costs"]["params"] <= limit_params and point["costs"]["macs"] <= limit_macs
        front_costs = [p["costs"]["params"] for p in event["front"]]
        front_losses = [p["loss"] for p in event["front"]]
        assert front_costs == sorted(front_costs)
        assert all(a > b for a, b in itertools.pairwise(front_losses))
        json.dumps(event, allow_nan=False)  # the dashboard gets strict JSON


def test_cache_prevents_reevaluation_and_counts(space):
    fitness = SyntheticFitness(space)
    config = small_config(iterations=25, num_slices=2)
    result = run_ga(space, fitness, costs_fn_for(space), [Constraint("params", 60_000)], config)
    keys = [(arch, slice_id) for arch, slice_id in fitness.calls]
    assert len(keys) == len(set(keys)), "an architecture was evaluated twice on one slice"
    assert all(arch == arch.canonical() for arch, _ in fitness.calls)
    assert result.evaluations == len(fitness.calls)
    # Every pool member is looked up once per generation, plus the final choice on all slices.
    lookups = config.pool_size * config.iterations + config.final_candidates * config.num_slices
    assert result.evaluations + result.cache_hits == lookups
    # With two slices, surviving elites meet a slice again: the cache must have answered.
    assert result.cache_hits >= config.elite_size * (config.iterations // 2)


def test_same_seed_same_run_other_seed_other_run(space):
    def run(seed):
        fitness = SyntheticFitness(space)
        progress = ListProgress()
        result = run_ga(
            space,
            fitness,
            costs_fn_for(space),
            [Constraint("params", 50_000)],
            small_config(seed=seed),
            progress=progress,
        )
        return result, fitness.calls, progress.events

    first, second, other = run(11), run(11), run(12)
    assert first[0].to_dict() | {"elapsed_s": 0} == second[0].to_dict() | {"elapsed_s": 0}
    assert first[1] == second[1]
    assert first[2] == second[2]
    assert first[1] != other[1]


def test_ga_beats_random_search_at_equal_evaluations(space, enumerated):
    """The constrained optimum is known by enumerating all 69,904 networks."""
    archs, params = enumerated
    fitness = SyntheticFitness(space, seed=7)
    limit = float(np.quantile(params, 0.25))
    true = np.array([fitness.true_loss(a) for a in archs])
    feasible = params <= limit
    optimum = float(true[feasible].min())
    spread = float(true[feasible].max() - optimum)
    costs = CostModel(costs_fn_for(space))
    constraint = [Constraint("params", limit)]
    ga_regret, random_regret = [], []
    for seed in range(4):
        config = small_config(pool_size=30, iterations=20, seed=seed)
        ga = run_ga(space, fitness, costs, constraint, config)
        rs = random_search(
            space,
            fitness,
            costs,
            constraint,
            evaluations=ga.evaluations,
            num_slices=config.num_slices,
            final_candidates=config.final_candidates,
            seed=seed,
        )
        assert ga.constraint_met and rs.constraint_met
        assert rs.evaluations <= ga.evaluations
        ga_regret.append(fitness.true_loss(ga.best_arch) - optimum)
        random_regret.append(fitness.true_loss(rs.best_arch) - optimum)
    assert min(ga_regret) >= -1e-9 and min(random_regret) >= -1e-9
    # Better on average and never worse by much; regrets relative to the feasible loss spread.
    assert np.mean(ga_regret) < 0.5 * np.mean(random_regret), (ga_regret, random_regret)
    assert np.mean(ga_regret) < 0.05 * spread, (ga_regret, spread)


def test_resume_from_saved_state_equals_uninterrupted_run(space, tmp_path):
    constraint = [Constraint("params", 60_000)]
    config = small_config(iterations=10, crossover=True)
    uninterrupted = run_ga(space, SyntheticFitness(space), costs_fn_for(space), constraint, config)

    checkpoint = tmp_path / "ga_state.json"

    def cancel_after_four(event):
        if event["current"] == 4:
            raise JobCancelled()

    fitness = SyntheticFitness(space)
    with pytest.raises(JobCancelled):
        run_ga(
            space,
            fitness,
            costs_fn_for(space),
            constraint,
            config,
            progress=cancel_after_four,
            on_state=lambda state: save_state(checkpoint, state),
        )
    state = load_state(checkpoint)
    assert state["generation"] == 4
    evaluated_before = list(fitness.calls)
    resumed = run_ga(
        space,
        fitness,
        costs_fn_for(space),
        constraint,
        config,
        state=state,
    )
    a, b = uninterrupted.to_dict(), resumed.to_dict()
    a["elapsed_s"] = b["elapsed_s"] = 0
    assert a == b
    # The resumed run did not redo the first four generations' evaluations.
    assert len(fitness.calls) == uninterrupted.evaluations
    assert len(evaluated_before) < uninterrupted.evaluations

    # A state of another search is refused.
    with pytest.raises(GAStateError, match="different GAConfig"):
        run_ga(space, fitness, costs_fn_for(space), constraint, small_config(seed=99), state=state)
    with pytest.raises(GAStateError, match="different constraints"):
        run_ga(space, fitness, costs_fn_for(space), [Constraint("params", 1e6)], config, state=state)


def test_a_state_saved_before_final_slices_existed_resumes_as_final_slices_0(space, tmp_path):
    constraint = [Constraint("params", 60_000)]
    config = small_config(iterations=4)
    checkpoint = tmp_path / "ga_state.json"

    def cancel_after_two(event):
        if event["current"] == 2:
            raise JobCancelled()

    with pytest.raises(JobCancelled):
        run_ga(
            space, SyntheticFitness(space), costs_fn_for(space), constraint, config,
            progress=cancel_after_two, on_state=lambda state: save_state(checkpoint, state),
        )  # fmt: skip
    state = load_state(checkpoint)
    del state["config"]["final_slices"]
    resumed = run_ga(space, SyntheticFitness(space), costs_fn_for(space), constraint, config, state=state)
    uninterrupted = run_ga(space, SyntheticFitness(space), costs_fn_for(space), constraint, config)
    assert resumed.best_arch == uninterrupted.best_arch
    with pytest.raises(GAStateError, match="different GAConfig"):
        run_ga(
            space, SyntheticFitness(space, num_slices=6), costs_fn_for(space), constraint,
            small_config(iterations=4, final_slices=2), state=state,
        )  # fmt: skip


def test_final_choice_on_held_out_slices_scores_only_there(space):
    fitness = SyntheticFitness(space, num_slices=6)
    config = small_config(num_slices=4, final_candidates=3, final_slices=2)
    assert list(config.final_slice_ids) == [4, 5]
    result = run_ga(space, fitness, costs_fn_for(space), [Constraint("params", 60_000)], config)
    held_out = [(arch, s) for arch, s in fitness.calls if s >= config.num_slices]
    # The search never draws a held-out slice; the final choice scores its 3 finalists on both.
    assert fitness.calls[-len(held_out) :] == held_out
    assert sorted({s for _, s in held_out}) == [4, 5] and len(held_out) == 3 * 2
    finalists = {arch for arch, _ in held_out}
    assert result.best_arch in finalists
    expected = np.mean([fitness.true_loss(result.best_arch) + fitness.slice_offset[s] for s in (4, 5)])
    assert result.stats["final_score"] == pytest.approx(expected)
    assert min(
        np.mean([fitness.true_loss(arch) + fitness.slice_offset[s] for s in (4, 5)]) for arch in finalists
    ) == pytest.approx(expected)
    assert result.stats["final_slices"] == 2
    # best_loss and the front stay search-slice losses: held-out values may be another metric.
    searched = {s for arch, s in fitness.calls if arch == result.best_arch and s < 4}
    assert result.best_loss == pytest.approx(
        np.mean([fitness.true_loss(result.best_arch) + fitness.slice_offset[s] for s in searched])
    )
    for point in result.front:
        assert point.slices <= 4
    assert result.evaluations == len(fitness.calls)

    rs_fitness = SyntheticFitness(space, num_slices=6)
    rs = random_search(
        space, rs_fitness, costs_fn_for(space), [Constraint("params", 60_000)],
        evaluations=60, num_slices=4, final_candidates=3, final_slices=2, seed=1,
    )  # fmt: skip
    screening = {s for _, s in rs_fitness.calls if s < 4}
    assert len(screening) == 1  # random search screens on one search slice ...
    rs_held_out = [(arch, s) for arch, s in rs_fitness.calls if s >= 4]
    assert len(rs_held_out) == 3 * 2 and rs.best_arch in {arch for arch, _ in rs_held_out}  # ... then 3 x 2
    assert rs.evaluations == len(rs_fitness.calls) <= 60
    assert rs.stats["final_slices"] == 2 and rs.stats["final_score"] is not None
    with pytest.raises(ValueError, match="final_slices"):
        random_search(
            space, rs_fitness, costs_fn_for(space), [Constraint("params", 60_000)],
            evaluations=60, num_slices=4, final_slices=-1,
        )  # fmt: skip


def test_archive_ranking_compares_architectures_within_slices_not_across(space):
    a, b, c, d = (space.sample(np.random.default_rng(seed)).canonical() for seed in range(4))
    assert len({a, b, c, d}) == 4
    cache = FitnessCache()
    losses = {(a, 0): 1.0, (b, 0): 1.1, (c, 0): 1.2, (d, 1): 3.0, (a, 1): 3.1}
    for (arch, slice_id), loss in losses.items():
        cache.lookup_canonical(arch, slice_id, lambda *_, loss=loss: loss)
    # Raw mean losses would say b (1.1) < c (1.2) < a (2.05) < d (3.0). Within its slices, d is
    # the best of slice 1 (the hard one), a is best of slice 0 and worst of slice 1, b is the
    # middle of slice 0 (a tie with a, broken by a's two slices), c is worst of slice 0.
    assert archive_ranking([a, b, c, d], cache, num_slices=2) == [d, a, b, c]
    # Held-out slices (ids >= num_slices) and architectures never scored are left out.
    cache.lookup_canonical(c, 2, lambda *_: 0.0)
    e = space.sample(np.random.default_rng(9)).canonical()
    assert archive_ranking([a, b, c, d, e], cache, num_slices=2) == [d, a, b, c]
    assert cache.loss_on(a, 1) == 3.1 and cache.loss_on(e, 0) is None


def test_finalists_from_the_archive_are_its_best_ranked(space):
    config = small_config(num_slices=4, final_candidates=3, final_slices=2, finalists_from="archive")
    fitness = SyntheticFitness(space, num_slices=6)
    cache = FitnessCache()
    result = run_ga(space, fitness, costs_fn_for(space), [Constraint("params", 60_000)], config, cache=cache)
    finalists = list(dict.fromkeys(arch for arch, s in fitness.calls if s >= config.num_slices))
    searched = list(dict.fromkeys(arch.canonical() for arch, s in fitness.calls if s < config.num_slices))
    assert finalists == archive_ranking(searched, cache, config.num_slices)[:3]
    assert result.best_arch in finalists and result.stats["final_candidates"] == 3
    # The default still takes the last generation's best, and a bad value is refused.
    assert GAConfig().finalists_from == "last"
    with pytest.raises(GAConfigError, match="finalists_from"):
        small_config(finalists_from="everything")


def test_tight_budget_finishes_with_bounded_fallbacks(space):
    """Only a handful of networks fit: the pool cannot be filled with distinct children."""
    smallest = space.smallest()
    limit = arch_params(space, smallest) + 150  # a few depth-1 variants only
    fitness = SyntheticFitness(space)
    config = small_config(iterations=4, max_init_tries=200, max_mutation_tries=5)
    result = run_ga(space, fitness, costs_fn_for(space), [Constraint("params", limit)], config)
    assert result.constraint_met
    assert result.evaluated_archs < config.pool_size
    assert result.stats["init_duplicates"] > 0
    assert result.stats["fallback_duplicate"] > 0


def test_non_finite_losses_rank_last_and_bad_fitness_type_is_reported(space):
    def fitness(arch, slice_id):
        return math.nan if arch.depth == 4 else float(arch.depth)

    result = run_ga(
        space, fitness, costs_fn_for(space), [Constraint("params", 1e9)], small_config(iterations=3)
    )
    assert result.best_arch.depth == 1
    assert result.stats["non_finite"] > 0
    json.dumps(result.to_dict(), allow_nan=False)

    with pytest.raises(TypeError, match="fitness_fn must return a number"):
        run_ga(space, lambda a, s: "low", costs_fn_for(space), [Constraint("params", 1e9)], small_config())


def test_budget_sweep_shares_evaluations_and_returns_a_front(space, enumerated):
    _, params = enumerated
    budgets = [float(np.quantile(params, q)) for q in (0.1, 0.3, 0.6)]
    config = small_config(iterations=8)
    costs = CostModel(costs_fn_for(space))
    fitness = SyntheticFitness(space)
    progress = ListProgress()
    sweep = search_budgets(space, fitness, costs, "params", budgets, config, progress=progress)
    assert len(sweep.results) == 3
    for budget, result in zip(budgets, sweep.results, strict=True):
        assert result.best_costs["params"] <= budget
        assert result.constraints[0].limit == budget
    assert {e["budget_index"] for e in progress.of_kind("adapt")} == {0, 1, 2}
    assert sweep.evaluations == len(fitness.calls) == sum(r.evaluations for r in sweep.results)
    # Independent runs (own caches) pay at least as much; the same trajectories, shared cache.
    independent = 0
    for index, budget in enumerate(budgets):
        from engine.seeding import derive_seed

        seeded = GAConfig.from_dict({**config.to_dict(), "seed": derive_seed(config.seed, index)})
        alone = run_ga(space, SyntheticFitness(space), costs, [Constraint("params", budget)], seeded)
        assert alone.best_arch == sweep.results[index].best_arch
        independent += alone.evaluations
    assert sweep.evaluations <= independent
    # The front is non-dominated, covers the cheapest evaluated arch, and each choice is near it.
    points = [(p.costs["params"], p.loss) for p in sweep.front]
    assert sorted(pareto_front(points)) == list(range(len(points)))
    json.dumps(sweep.to_dict(), allow_nan=False)


def test_sweep_order_is_loosest_first_only_when_warm_starting():
    assert sweep_order([3.0, 1.0, 2.0, 3.0], warm_start=5) == [0, 3, 2, 1]  # ties keep the given order
    assert sweep_order([3.0, 1.0, 2.0], warm_start=0) == [0, 1, 2]


def test_warm_start_seeds_are_the_best_fitting_archs_in_the_cache(space, enumerated):
    archs, params = enumerated
    fitness = SyntheticFitness(space)
    costs = CostModel(costs_fn_for(space))
    rng = np.random.default_rng(0)
    cache = FitnessCache()
    picked = [archs[i] for i in rng.choice(len(archs), 300, replace=False)]
    for position, arch in enumerate(picked):
        cache.lookup(arch, position % 2, fitness)  # two slices of different difficulty
    limit = float(np.median([arch_params(space, arch) for arch in picked]))
    constraint = [Constraint("params", limit)]
    seeds = warm_start_seeds(cache, costs, constraint, 2, 7)
    assert len(seeds) == 7 and all(costs.feasible(arch, constraint) for arch in seeds)
    feasible = [arch.canonical() for arch in picked if costs.feasible(arch, constraint)]
    assert seeds == archive_ranking(feasible, cache, 2)[:7]
    assert warm_start_seeds(cache, costs, constraint, 2, 0) == []
    assert warm_start_seeds(FitnessCache(), costs, constraint, 2, 7) == []


def test_warm_started_sweep_runs_loosest_first_and_never_ends_worse_than_its_seeds(space, enumerated):
    _, params = enumerated
    budgets = [float(np.quantile(params, q)) for q in (0.1, 0.3, 0.6)]
    config = small_config(iterations=8, warm_start=4)
    costs = CostModel(costs_fn_for(space))
    fitness = SyntheticFitness(space)
    progress = ListProgress()
    sweep = search_budgets(space, fitness, costs, "params", budgets, config, progress=progress)
    # Results in the given order; the GAs ran loosest first.
    assert [r.constraints[0].limit for r in sweep.results] == budgets
    ran = list(dict.fromkeys(e["budget_index"] for e in progress.of_kind("adapt")))
    assert ran == [2, 1, 0]
    assert sweep.results[2].stats["warm_start_seeds"] == 0  # the first GA finds an empty cache
    # Replay: the cache as the looser GAs left it gives each tighter GA its seeds, and the same
    # GA started from them chooses what the sweep chose, never worse than its best seed.
    from engine.seeding import derive_seed

    cache = FitnessCache()
    for index in ran:
        constraint = [Constraint("params", budgets[index])]
        seeds = warm_start_seeds(cache, costs, constraint, config.num_slices, config.warm_start)
        seeded = GAConfig.from_dict({**config.to_dict(), "seed": derive_seed(config.seed, index)})
        alone = run_ga(space, SyntheticFitness(space), costs, constraint, seeded, cache=cache)
        result = sweep.results[index]
        assert alone.best_arch == result.best_arch and result.constraint_met
        assert result.stats["warm_start_seeds"] == len(seeds)
        if index != 2:
            assert len(seeds) == config.warm_start
            assert fitness.true_loss(result.best_arch) <= min(fitness.true_loss(s) for s in seeds) + 1e-12
    # Without warm starts: the given order, random pools.
    cold = search_budgets(
        space, SyntheticFitness(space), costs, "params", budgets, small_config(iterations=8)
    )
    assert all(r.stats["warm_start_seeds"] == 0 for r in cold.results)


def test_patience_stops_once_the_elites_stand_still_and_changes_nothing_before(space):
    constraint = [Constraint("params", 60_000)]
    full_config = small_config(iterations=60, num_slices=1)
    config = small_config(iterations=60, num_slices=1, patience=4)
    full = run_ga(space, SyntheticFitness(space, num_slices=1), costs_fn_for(space), constraint, full_config)
    progress = ListProgress()
    fitness = SyntheticFitness(space, num_slices=1)
    stopped = run_ga(space, fitness, costs_fn_for(space), constraint, config, progress=progress)

    generations = len(stopped.history)
    assert stopped.stats["generations"] == generations < 60
    assert full.stats["generations"] == 60
    # Until it stops it is the same run: same slices, same pools, same counts.
    assert list(stopped.history) == list(full.history[:generations])
    changed = [entry["elites_changed"] for entry in stopped.history]
    assert changed[0] and changed[-4:] == [False] * 4
    assert not any(changed[i : i + 4] == [False] * 4 for i in range(generations - 4))
    assert stopped.evaluations < full.evaluations and len(fitness.calls) == stopped.evaluations
    events = progress.of_kind("adapt")
    assert len(events) == generations
    assert [e["stopped_early"] for e in events] == [False] * (generations - 1) + [True]
    # The elites are the best scored so far on the one slice, so the choice stays among them.
    assert stopped.best_loss == full.history[generations - 1]["best_loss"]
    assert full.stats["generations"] == 60 and not full.history[-1]["elites_changed"]


def test_a_stopped_run_resumes_stopped_and_a_run_cut_before_its_stop_stops_the_same(space, tmp_path):
    constraint = [Constraint("params", 60_000)]
    config = small_config(iterations=60, num_slices=1, patience=4)
    uninterrupted = run_ga(
        space, SyntheticFitness(space, num_slices=1), costs_fn_for(space), constraint, config
    )
    states: list[dict] = []
    run_ga(
        space, SyntheticFitness(space, num_slices=1), costs_fn_for(space), constraint, config,
        on_state=lambda state: states.append(json.loads(json.dumps(state))),
    )  # fmt: skip
    assert len(states) == len(uninterrupted.history)

    def comparable(result):
        data = result.to_dict()
        data["elapsed_s"] = 0
        return data

    for state in (states[2], states[-1]):
        fitness = SyntheticFitness(space, num_slices=1)
        resumed = run_ga(space, fitness, costs_fn_for(space), constraint, config, state=state)
        assert comparable(resumed) == comparable(uninterrupted)
    assert fitness.calls == []  # resumed after its stop: nothing left to score
    # A history saved before the knob existed has no elites_changed: it reads as "changed".
    legacy = json.loads(json.dumps(states[-1]))
    for entry in legacy["history"]:
        del entry["elites_changed"]
    longer = run_ga(
        space, SyntheticFitness(space, num_slices=1), costs_fn_for(space), constraint, config, state=legacy
    )
    assert len(longer.history) >= len(uninterrupted.history) + 4
    with pytest.raises(GAConfigError, match="patience"):
        small_config(patience=-1)


def test_random_search_in_a_sweep_chooses_among_what_earlier_budgets_scored(space, enumerated):
    _, params = enumerated
    loose, tight = (float(np.quantile(params, q)) for q in (0.9, 0.4))
    fitness = SyntheticFitness(space)
    costs = CostModel(costs_fn_for(space))
    cache = FitnessCache()
    common = dict(num_slices=1, final_candidates=3, cache=cache)
    first = random_search(
        space, fitness, costs, [Constraint("params", loose)], evaluations=60, seed=1, **common
    )
    inherited = [a for a in cache.archs() if costs.feasible(a, [Constraint("params", tight)])]
    assert first.stats["inherited"] == 0 and inherited
    calls_before = len(fitness.calls)
    second = random_search(
        space, fitness, costs, [Constraint("params", tight)], evaluations=10, seed=2, **common
    )
    assert second.stats["inherited"] == len(inherited)
    assert second.evaluations == len(fitness.calls) - calls_before <= 10  # inherited losses are free
    assert second.constraint_met
    best_inherited = min(fitness.true_loss(a) for a in inherited)
    assert fitness.true_loss(second.best_arch) <= best_inherited + 1e-12
    # Never an architecture scored twice: the new samples avoid what the cache holds.
    assert len({(a.canonical(), s) for a, s in fitness.calls}) == len(fitness.calls)
    # With several slices a sweep pins the screening slice, so the next search can inherit.
    pinned = random_search(space, fitness, costs, [Constraint("params", tight)], evaluations=10,
                           num_slices=3, screening_slice=2, seed=3)  # fmt: skip
    assert pinned.stats["screening_slice"] == 2
    with pytest.raises(ValueError, match="screening_slice"):
        random_search(space, fitness, costs, [Constraint("params", tight)], evaluations=10, num_slices=3,
                      screening_slice=3)  # fmt: skip


def test_fitness_cache_state_round_trip(space):
    cache = FitnessCache()
    fitness = SyntheticFitness(space)
    rng = np.random.default_rng(1)
    archs = [space.sample(rng) for _ in range(5)]
    for arch in archs:
        cache.lookup(arch, 0, fitness)
        cache.lookup(arch, 0, fitness)
    restored = FitnessCache()
    restored.load_state(json.loads(json.dumps(cache.to_state())), Arch.from_dict)
    assert restored.evaluations == 5 and restored.hits == 5
    for arch in archs:
        assert restored.losses(arch) == cache.losses(arch)


class PidRecordingFitness(SyntheticFitness):
    """SyntheticFitness that notes which process computed each loss (one line per call in a file)."""

    def __init__(self, space: SearchSpace, log: Path) -> None:
        super().__init__(space)
        self.log = log

    def __call__(self, arch: Arch, slice_id: int) -> float:
        with self.log.open("a") as handle:
            handle.write(f"{os.getpid()}\n")
        return super().__call__(arch, slice_id)


def test_scoring_in_worker_processes_changes_nothing_but_where_it_runs(space, tmp_path):
    """ProcessFitness.many scores a generation's new candidates in forked workers; GA and random
    search pick, count and cache exactly what one-by-one scoring does."""
    from engine.search.parallel import ProcessFitness

    limit = float(np.median([arch_params(space, space.sample(np.random.default_rng(s))) for s in range(40)]))
    costs = CostModel(costs_fn_for(space))
    constraint = [Constraint("params", limit)]
    config = small_config(pool_size=20, iterations=8, seed=3)

    def search(fitness):
        ga = run_ga(space, fitness, costs, constraint, config)
        rs = random_search(
            space, fitness, costs, constraint, evaluations=ga.evaluations,
            num_slices=config.num_slices, final_candidates=config.final_candidates, seed=3,
        )  # fmt: skip
        return ga.to_dict() | {"elapsed_s": None}, rs.to_dict() | {"elapsed_s": None}

    plain = search(SyntheticFitness(space))
    log = tmp_path / "pids"
    with ProcessFitness(PidRecordingFitness(space, log), workers=2) as parallel:
        assert search(parallel) == plain
    pids = [int(line) for line in log.read_text().split()]
    assert len(set(pids) - {os.getpid()}) == 2  # both workers scored candidates
    assert pids.count(os.getpid()) < len(pids) / 4  # only stragglers (single new candidates) ran here
    with pytest.raises(ValueError, match="workers"):
        ProcessFitness(SyntheticFitness(space), workers=0)


def _score_in_a_prefork_child(_: int) -> list[float]:
    from engine.search.parallel import ProcessFitness

    space = small_space()
    archs = [(space.sample(np.random.default_rng(seed)), 0) for seed in range(6)]
    with ProcessFitness(SyntheticFitness(space), workers=2) as parallel:
        return parallel.many(archs)


def test_workers_do_not_run_the_parents_after_fork_hooks(space):
    """multiprocessing children run register_after_fork hooks; kombu's closes the inherited Redis
    connection and waited forever in CI. ProcessFitness workers run nothing of the parent's."""
    import multiprocessing.util
    import time

    from engine.search.parallel import ProcessFitness

    class Connection:  # stands in for kombu's connection pool
        pass

    holder = Connection()
    multiprocessing.util.register_after_fork(holder, lambda _: time.sleep(3600))
    pairs = [(space.sample(np.random.default_rng(seed)), 1) for seed in range(6)]
    fitness = SyntheticFitness(space)
    with ProcessFitness(fitness, workers=2) as parallel:
        assert parallel.many(pairs) == [fitness(arch, s) for arch, s in pairs]


def _broken_fitness(arch, slice_id):
    # Module level, not a closure: on a machine with CUDA the workers are spawned and receive the
    # fitness function pickled (engine.search.parallel._fork_breaks_autograd).
    raise ValueError("no such layer")


def test_a_failing_evaluation_is_reported_not_hung(space):
    from engine.search.parallel import ProcessFitness, WorkerError

    with (
        ProcessFitness(_broken_fitness, workers=2) as parallel,
        pytest.raises(WorkerError, match="no such layer"),
    ):
        parallel.many([(space.sample(np.random.default_rng(seed)), 0) for seed in range(4)])


def test_worker_processes_start_inside_a_celery_prefork_child():
    """Celery runs tasks in daemonic billiard processes, which multiprocessing refuses children."""
    import billiard

    space = small_space()
    expected = [SyntheticFitness(space)(space.sample(np.random.default_rng(seed)), 0) for seed in range(6)]
    with billiard.Pool(1) as pool:
        assert pool.map(_score_in_a_prefork_child, [0]) == [expected]


def test_workers_die_with_a_killed_parent(tmp_path):
    """kill -9 of the process that started the workers leaves no worker behind (PR_SET_PDEATHSIG)."""
    import signal
    import subprocess
    import sys
    import textwrap

    import psutil

    script = textwrap.dedent(
        """
        import sys, time
        import numpy as np
        sys.path.insert(0, sys.argv[1])
        from tests.engine.test_evolution import SyntheticFitness, small_space
        from engine.search.parallel import ProcessFitness
        space = small_space()
        parallel = ProcessFitness(SyntheticFitness(space), workers=2)
        parallel.many([(space.sample(np.random.default_rng(s)), 0) for s in range(4)])
        print("ready", flush=True)
        time.sleep(600)
        """
    )
    root = str(Path(__file__).resolve().parents[2])
    parent = subprocess.Popen(
        [sys.executable, "-c", script, root], stdout=subprocess.PIPE, text=True, cwd=root
    )
    try:
        assert parent.stdout.readline().strip() == "ready"
        workers = psutil.Process(parent.pid).children()
        assert len(workers) == 2
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        gone, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive
    finally:
        if parent.poll() is None:
            parent.kill()


# --------------------------------------------------------------------------- elites per depth
class ShallowTrapFitness(SyntheticFitness):
    """One- and two-layer nets score a little better than most deeper ones, while the best
    four-layer nets (wide layers) beat them all: a GA that lets its deep lineage die out early
    settles on shallow nets. ``diverged_depth`` scores every net of that depth as diverged."""

    def __init__(self, space: SearchSpace, diverged_depth: int | None = None) -> None:
        super().__init__(space, num_slices=1)
        self.diverged_depth = diverged_depth

    def true_loss(self, arch: Arch) -> float:
        if arch.depth == self.diverged_depth:
            return math.inf
        used = arch.layers[: arch.depth]
        wide = sum(layer.width == max(SMALL_WIDTHS) for layer in used)
        if arch.depth <= 2:
            return 1.0 - 0.05 * wide
        return 2.0 - 0.3 * wide


def test_depth_elites_keep_the_best_net_of_every_depth_parenting(space):
    constraint = [Constraint("params", 400_000)]
    config = small_config(iterations=10, num_slices=1, depth_elites=1)
    states: list[dict] = []
    fitness = ShallowTrapFitness(space, diverged_depth=3)
    uninterrupted = run_ga(space, fitness, costs_fn_for(space), constraint, config, on_state=states.append)
    decode = Arch.from_dict
    assert len(states) == 10
    for state in states[:-1]:  # the last generation makes no next pool
        ranked = [decode(d) for d in state["ranked"]]
        losses = [math.inf if v is None else v for v in state["ranked_losses"]]
        pool = [decode(d).canonical() for d in state["population"]]
        best_of_depth = {}
        for arch, loss in zip(ranked, losses, strict=True):
            if math.isfinite(loss):
                best_of_depth.setdefault(arch.depth, arch.canonical())
        distinct_best = list(dict.fromkeys(arch.canonical() for arch in ranked))[: config.elite_size]
        extra = [key for key in best_of_depth.values() if key not in distinct_best]
        # The pool starts with Algorithm 1's elites, then the best of each depth they lacked.
        assert pool[: len(distinct_best) + len(extra)] == distinct_best + extra
        assert {1, 2, 4} <= set(best_of_depth)
        # A diverged depth holds no place open: no elite of depth 3 unless by rank.
        assert all(decode(d).depth != 3 for d in state["population"][: config.elite_size + len(extra)])
    # A run resumed from a mid-way state goes on as the uninterrupted one.
    resumed_states: list[dict] = []
    resumed = run_ga(
        space, ShallowTrapFitness(space, diverged_depth=3), costs_fn_for(space), constraint, config,
        state=json.loads(json.dumps(states[4])), on_state=resumed_states.append,
    )  # fmt: skip
    assert [s["population"] for s in resumed_states] == [s["population"] for s in states[5:]]
    assert (resumed.best_arch, resumed.evaluations) == (uninterrupted.best_arch, uninterrupted.evaluations)
    with pytest.raises(GAConfigError, match="depth_elites"):
        small_config(depth_elites=-1)
    assert GAConfig().depth_elites == 0


def test_depth_elites_that_would_crowd_out_the_children_are_refused_before_any_evaluation(space):
    """Elites of every depth take places children would have: a pool of 20 keeps its best 2,
    and at most (10 - 2) // depths per depth leave half of it to children."""
    depths = len(space.depths)
    most = (20 // 2 - 2) // depths
    assert most >= 1
    scored: list = []

    def fitness(arch, slice_id):
        scored.append(arch)
        return float(arch.depth)

    constraint = [Constraint("params", 1e9)]
    run_ga(space, fitness, costs_fn_for(space), constraint, small_config(iterations=2, depth_elites=most))
    scored.clear()
    with pytest.raises(GAConfigError, match=rf"fewer than half of a pool of 20 .* at most {most}"):
        run_ga(
            space, fitness, costs_fn_for(space), constraint, small_config(iterations=2, depth_elites=most + 1)
        )
    assert scored == []


def test_depth_elites_escape_a_shallow_optimum_that_traps_algorithm_1(space, enumerated):
    archs, params = enumerated
    limit = 400_000
    constraint = [Constraint("params", limit)]
    trap = ShallowTrapFitness(space)
    optimum = min(trap.true_loss(a) for a, p in zip(archs, params, strict=True) if p <= limit)
    best_shallow = min(trap.true_loss(a) for a in archs if a.depth <= 2)
    assert optimum < best_shallow  # the optimum is deep

    def found(depth_elites: int, seed: int) -> float:
        config = small_config(iterations=30, num_slices=1, depth_elites=depth_elites, seed=seed)
        result = run_ga(space, ShallowTrapFitness(space), costs_fn_for(space), constraint, config)
        assert result.best_costs["params"] <= limit
        return result.best_loss - trap.slice_offset[0]

    seeds = range(8)
    plain = [found(0, seed) for seed in seeds]
    per_depth = [found(1, seed) for seed in seeds]
    # Algorithm 1 settles on a shallow net in half the seeds or more; with the best four-layer
    # net kept as an elite, its children climb to the optimum in every seed.
    assert sum(loss == pytest.approx(optimum) for loss in plain) <= len(seeds) // 2
    assert per_depth == pytest.approx([optimum] * len(seeds))
