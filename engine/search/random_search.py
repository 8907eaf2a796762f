"""The random-search baseline, at the GA's evaluation budget and under the same constraints.

Protocol (mirrors the GA's so the comparison is about the search, not the bookkeeping): one
validation slice is drawn; distinct feasible architectures, drawn uniformly from the space by
rejection sampling, are scored on it until only the final-choice reserve of the budget is left;
then, exactly as the GA does, the top ``final_candidates`` are scored on every slice (with
``final_slices > 0``: on the held-out slices ``num_slices ..`` instead) and the lowest mean loss
wins. ``evaluations`` counts fitness-function calls, so "the same number of
evaluations" means the same number of (architecture, slice) scorings as the GA paid for.
Against a warm-started GA sweep, the random searches of the budgets share one cache in the same
order, so each may also choose among what the earlier ones scored (``cache=``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from engine.search.constraints import (
    Constraint,
    CostModel,
    CostsFn,
    InfeasibleBudgetError,
    check_constraints,
)
from engine.search.evolution import (
    FitnessCache,
    FitnessFn,
    SearchLog,
    SearchResult,
    check_reachable,
    final_choice,
    prefetched,
)
from engine.seeding import make_rngs


def random_search(
    space: Any,
    fitness_fn: FitnessFn,
    costs_fn: CostsFn | CostModel,
    constraints: Sequence[Constraint],
    *,
    evaluations: int,
    num_slices: int,
    final_candidates: int = 10,
    final_slices: int = 0,
    seed: int = 0,
    max_tries_per_sample: int = 1000,
    cache: FitnessCache | None = None,
    screening_slice: int | None = None,
) -> SearchResult:
    """Best of uniformly sampled feasible architectures, using at most ``evaluations`` scorings.

    Uses its own fitness cache so it never profits from another search's evaluations. Stops
    early (with what it has) when rejection sampling cannot find a new feasible architecture in
    ``max_tries_per_sample`` draws - the feasible set is then nearly exhausted.

    ``cache``: the cache of a random-search *sweep* (the counterpart of a warm-started GA
    sweep, :func:`engine.search.evolution.search_budgets`): the feasible architectures it
    already holds with a loss on the screening slice join the candidates without counting as
    evaluations (cache hits), and new samples are drawn beside them. Without it, a fresh cache.
    ``screening_slice``: screen on this slice instead of a random one (a sweep's random searches
    all screen on the first one's, so what one scored can serve the next).
    """
    if isinstance(evaluations, bool) or not isinstance(evaluations, int) or evaluations < 1:
        raise ValueError(f"evaluations must be a positive int, got {evaluations!r}")
    if isinstance(num_slices, bool) or not isinstance(num_slices, int) or num_slices < 1:
        raise ValueError(f"num_slices must be a positive int, got {num_slices!r}")
    if isinstance(final_candidates, bool) or not isinstance(final_candidates, int) or final_candidates < 0:
        raise ValueError(f"final_candidates must be an int >= 0, got {final_candidates!r}")
    if isinstance(final_slices, bool) or not isinstance(final_slices, int) or final_slices < 0:
        raise ValueError(f"final_slices must be an int >= 0, got {final_slices!r}")
    constraints = check_constraints(constraints)
    cost_model = costs_fn if isinstance(costs_fn, CostModel) else CostModel(costs_fn)
    check_reachable(space, cost_model, constraints)
    started = time.perf_counter()
    rng = make_rngs(seed).numpy
    cache = cache if cache is not None else FitnessCache()
    run = SearchLog(cost_model, constraints[0].kind)

    # The final choice scores each candidate on the slices it has not seen yet: the other
    # num_slices - 1 search slices, or the final_slices held-out ones.
    per_finalist = final_slices or num_slices - 1
    candidates_wanted = min(final_candidates, evaluations)
    reserve = candidates_wanted * per_finalist
    screening_budget = max(candidates_wanted, evaluations - reserve)
    slice_id = int(rng.integers(num_slices))
    if screening_slice is not None:
        if not 0 <= screening_slice < num_slices:
            raise ValueError(f"screening_slice must be in [0, {num_slices}), got {screening_slice!r}")
        slice_id = screening_slice
    # What an earlier budget of the sweep already scored on this slice and fits this one.
    scored_before = cache.archs()
    inherited = [
        key
        for key in scored_before
        if cache.contains(key, slice_id) and cost_model.feasible(key, constraints)
    ]
    # Draw the distinct feasible samples first (sampling never depends on a loss), then score
    # them together: in parallel when fitness_fn can (engine.search.parallel).
    chosen: list[Any] = []
    seen: set[Any] = set(scored_before)
    stopped_early = False
    while len(chosen) < screening_budget:
        arch = None
        for _ in range(max_tries_per_sample):
            sample = space.sample(rng)
            key = sample.canonical()
            if key not in seen and cost_model.feasible(sample, constraints):
                arch = key
                break
        if arch is None:
            stopped_early = True
            break
        seen.add(arch)
        chosen.append(arch)
    scorer = prefetched(cache, fitness_fn, [(arch, slice_id) for arch in chosen])
    scored: list[tuple[float, int, Any]] = [
        (run.score(cache, arch, slice_id, scorer), index, arch)
        for index, arch in enumerate(inherited + chosen)
    ]
    if not scored:
        raise InfeasibleBudgetError(
            f"random search found no feasible architecture in {max_tries_per_sample} samples for "
            + " and ".join(c.describe() for c in constraints)
        )
    scored.sort(key=lambda item: (item[0], item[1]))

    best, best_loss = scored[0][2], scored[0][0]
    final_stats: dict[str, Any] = {"final_slices": final_slices, "final_score": None}
    if final_candidates > 0:
        # Never spend more than ``evaluations`` in total: a short budget scores fewer candidates.
        # Each candidate costs per_finalist new evaluations; the first is always scored.
        spent, finalists = run.evaluations, []
        for _, _, arch in scored[:candidates_wanted]:
            if finalists and spent + per_finalist > evaluations:
                break
            finalists.append(arch)
            spent += per_finalist
        best, best_loss, final_stats = final_choice(
            finalists, cache, run, fitness_fn, num_slices, final_slices
        )
    return SearchResult(
        method="random",
        best_arch=best,
        best_loss=best_loss,
        best_costs=cost_model.costs(best),
        constraints=constraints,
        evaluations=run.evaluations,
        cache_hits=run.cache_hits,
        evaluated_archs=len(run.archs),
        front=run.front(),
        stats={
            "screened": len(scored),
            "inherited": len(inherited),
            "screening_slice": slice_id,
            "final_candidates": min(len(scored), candidates_wanted),
            **final_stats,
            "stopped_early": stopped_early,
        },
        elapsed_s=time.perf_counter() - started,
    )
